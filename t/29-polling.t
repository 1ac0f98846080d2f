#!/usr/bin/perl

# The polling subscriber (push_stream_subscriber polling): answered at once; with no
# stored message to send it is push-stream's 304, echoing the client's position
# (If-Modified-Since / If-None-Match, or push_stream_last_received_message_time / _tag).
# And X-Nginx-PushStream-Mode, which turns a streaming request into a polling or a
# long-polling one.

use warnings;
use strict;

use IO::Socket::INET;
use Test::More;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush qw/ publish /;
use PgPush::PG;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http/)->plan(17);

my $pg = PgPush::PG->start();
my $conninfo = $pg->conninfo;

$t->write_file_expand('nginx.conf', <<"EOF");

%%TEST_GLOBALS%%

daemon off;
worker_processes 1;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    push_stream_postgres "$conninfo";

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location /poll {
            default_type text/plain;
            push_stream_subscriber polling;
            push_stream_channels_path \$arg_id;
        }

        location /poll_args {
            push_stream_subscriber polling;
            push_stream_channels_path \$arg_id;
            push_stream_last_received_message_time \$arg_time;
            push_stream_last_received_message_tag \$arg_tag;
        }

        location /sub {
            push_stream_subscriber;
            push_stream_channels_path \$arg_id;
            push_stream_longpolling_connection_ttl 2s;
        }

        location /pub {
            push_stream_publisher;
            push_stream_channels_path \$arg_id;
        }
    }
}

EOF

$t->run();
ok($pg->wait_sessions(1), 'side connection');
unlike($t->read_file('error.log'), qr/has no effect/, 'polling has its effect');

sub get {
	my ($uri, @h) = @_;
	my $extra = join '', map { "$_\r\n" } @h;
	return http("GET $uri HTTP/1.0\r\nHost: localhost\r\n$extra\r\n");
}

my $r = get('/poll?id=p1');
like($r, qr/^HTTP\/1\.1 304/, 'nothing new: 304');
like($r, qr/Content-Type: text\/plain/, 'with the location\'s content type');
like($r, qr/Expires: Thu, 01 Jan 1970 00:00:01 GMT/, 'not cached');
unlike($r, qr/Etag|Last-Modified/, 'no position sent, none echoed');
like(get('/pub?id=p1'), qr/^HTTP\/1\.1 200.*"subscribers": 0/s, 'the channel was created');

$r = get('/poll?id=p1', 'If-Modified-Since: Thu, 04 Dec 2025 10:00:00 GMT', 'If-None-Match: W/3');
like($r, qr/Last-Modified: Thu, 04 Dec 2025 10:00:00 GMT/, 'Last-Modified echoed');
like($r, qr/Etag: W\/3/, 'Etag echoed');

$r = get('/poll_args?id=p1&time=Thu%2C%2004%20Dec%202025%2010%3A00%3A00%20GMT&tag=5');
like($r, qr/Last-Modified: Thu, 04 Dec 2025 10:00:00 GMT.*Etag: W\/5/s,
	'or the position from push_stream_last_received_message_time and _tag');

like(http("POST /poll?id=p1 HTTP/1.0\r\nHost: localhost\r\nContent-Length: 1\r\n\r\nx"),
	qr/^HTTP\/1\.1 405.*Allow: GET/s, 'GET only');
like(get('/poll?id='), qr/^HTTP\/1\.1 400.*X-Nginx-PushStream-Explain: No channel id provided\./s,
	'no channel: 400');
like(get('/poll?id=ALL'), qr/^HTTP\/1\.1 403/, 'ALL is refused');

# X-Nginx-PushStream-Mode
like(get('/sub?id=m1', 'X-Nginx-PushStream-Mode: polling'), qr/^HTTP\/1\.1 304/,
	'a streaming location answers a polling request');
my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . port(8080)) or die "$!\n";
$s->syswrite("GET /sub?id=m1 HTTP/1.0\r\nHost: localhost\r\nX-Nginx-PushStream-Mode: long-polling\r\n\r\n");
select undef, undef, undef, 0.3;
publish('m1', 'for the long-poll');
my $buf = '';
while ($s->sysread($buf, 4096, length $buf)) {}
like($buf, qr/^HTTP\/1\.1 200/, 'and a long-polling request');
like($buf, qr/\r\n\r\nfor the long-poll$/, 'with one message');
like(get('/sub?id=m1', 'X-Nginx-PushStream-Mode: long-polling'), qr/^HTTP\/1\.1 304.*Etag: W\/0/s,
	'which times out as long-polling does');
