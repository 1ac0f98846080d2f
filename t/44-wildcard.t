#!/usr/bin/perl

# Wildcard channels (push_stream_wildcard_channel_prefix): a subscriber may join at most
# push_stream_wildcard_channel_max_qtd of them, and only alongside a normal channel; they
# are counted apart (wildcard_channels, push_stream_max_number_of_wildcard_channels) and
# are exempt from push_stream_authorized_channels_only.

use warnings;
use strict;

use IO::Socket::INET;
use JSON::PP;
use Test::More;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush qw/ publish /;
use PgPush::PG;
use PgPush::WS;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http/)->plan(10);

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
    push_stream_wildcard_channel_prefix "bd_";
    push_stream_max_number_of_wildcard_channels 3;

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location /sub {
            push_stream_subscriber;
            push_stream_channels_path \$arg_id;
            push_stream_wildcard_channel_max_qtd 2;
            push_stream_authorized_channels_only on;
        }

        location /ws {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_wildcard_channel_max_qtd 2;
        }

        location /pub {
            push_stream_publisher;
            push_stream_channels_path \$arg_id;
        }

        location /stats {
            push_stream_channels_statistics;
            push_stream_channels_path \$arg_id;
        }
    }
}

EOF

$t->run();
ok($pg->wait_sessions(1), 'side connection');

sub stream {
	my ($uri) = @_;
	my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . port(8080)) or die "$!\n";
	$s->syswrite("GET $uri HTTP/1.1\r\nHost: localhost\r\n\r\n");
	my $head = '';
	while ($head !~ /\r\n\r\n/) {
		$s->sysread($head, 4096, length $head) or last;
	}
	return ($s, $head);
}

publish('normal', 'x');
my (undef, $h) = stream('/sub?id=bd_x');
like($h, qr/^HTTP\/1\.1 403.*X-Nginx-PushStream-Explain: Subscribed too much wildcard channels\./s,
	'wildcard channels alone are refused');
(undef, $h) = stream('/sub?id=normal/bd_1/bd_2/bd_3');
like($h, qr/^HTTP\/1\.1 403.*Subscribed too much wildcard channels\./s, 'more than the quota too');
my ($s, $ok) = stream('/sub?id=normal/bd_1/bd_2');
like($ok, qr/^HTTP\/1\.1 200/, 'a normal channel and two wildcard ones are fine');
my $ws = PgPush::WS->connect('/ws?id=bd_1');
my ($code, $reason) = PgPush::WS->close_status($ws->read_frame(3));
is($reason, '{"http_status": 403, "explain":"Subscribed too much wildcard channels."}',
	'over WebSocket: close 1008 with the explanation');

publish('bd_1', 'to every holder');
my $buf = '';
$s->sysread($buf, 4096);
like($buf, qr/to every holder/, 'a wildcard channel delivers as any channel');

my $sum = decode_json((split /\r\n\r\n/, http_get('/stats'), 2)[1]);
is($sum->{wildcard_channels}, 2, 'wildcard channels are counted apart');
is($sum->{channels}, 1, 'from the normal ones');

my $ws3 = PgPush::WS->connect('/ws?id=normal/bd_3');
is($ws3->{status}, 101, 'a third wildcard channel');
my $ws4 = PgPush::WS->connect('/ws?id=normal/bd_4');
($code, $reason) = PgPush::WS->close_status($ws4->read_frame(3));
like($reason, qr/Number of channels were exceeded\./, 'push_stream_max_number_of_wildcard_channels');
