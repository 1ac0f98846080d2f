#!/usr/bin/perl

# push_stream_padding_by_user_agent: for the first rule whose regex matches the user agent
# (push_stream_user_agent, else User-Agent), a streaming or EventSource header or message
# shorter than the rule's size is padded as push-stream pads: the shortfall rounded up to
# 100 bytes, capped by the location's largest size; CRLF pairs, or colons for EventSource.
# The sizes are push-stream's own spec figures.

use warnings;
use strict;

use IO::Select;
use IO::Socket::INET;
use Test::More;
use Time::HiRes qw/ time /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush qw/ publish /;
use PgPush::PG;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http/)->plan(11);

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

        location /sub {
            push_stream_subscriber;
            push_stream_channels_path \$arg_id;
            push_stream_header_template "0123456789";
            push_stream_padding_by_user_agent "[T|t]est 1,1024,508:[T|t]est 2,4097,0";
            push_stream_subscriber_connection_ttl 1s;
        }

        location /msg {
            push_stream_subscriber;
            push_stream_channels_path \$arg_id;
            push_stream_padding_by_user_agent "[T|t]est 1,0,545";
            push_stream_subscriber_connection_ttl 2s;
        }

        location /ev {
            push_stream_subscriber eventsource;
            push_stream_channels_path \$arg_id;
            push_stream_padding_by_user_agent "[T|t]est 1,1024,508";
            push_stream_user_agent \$http_x_ua;
            push_stream_subscriber_connection_ttl 1s;
        }

        location /evu {
            push_stream_subscriber eventsource;
            push_stream_channels_path \$arg_id;
            push_stream_padding_by_user_agent "[T|t]est 1,1024,508";
            push_stream_user_agent \$arg_ua;
            push_stream_subscriber_connection_ttl 1s;
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

# The whole body of a subscriber that ends at its ttl (HTTP/1.0: not chunked).
sub body_of {
	my ($uri, $ua, $during, $extra) = @_;
	$extra //= '';
	my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . port(8080)) or die "$!\n";
	$s->syswrite("GET $uri HTTP/1.0\r\nHost: localhost\r\nUser-Agent: $ua\r\n$extra\r\n");
	$during->() if $during;
	my $buf = '';
	my $deadline = time + 5;
	while (time < $deadline) {
		last unless IO::Select->new($s)->can_read($deadline - time);
		$s->sysread($buf, 65536, length $buf) or last;
	}
	return (split /\r\n\r\n/, $buf, 2)[1] // '';
}

my $b1 = body_of('/sub?id=h', 'Test 1');
is(length $b1, 10 + 1100, 'header padded to the next hundred past 1024');
like($b1, qr/^0123456789(\r\n)+$/, 'with CRLF pairs');
is(length body_of('/sub?id=h', 'Test 2'), 10 + 4097, 'or to the largest size, as it is');
is(body_of('/sub?id=h', 'Test 3'), '0123456789', 'no rule, no padding');

my @sizes = (1, 105, 221, 331, 435, 502, 550);
my $m = body_of('/msg?id=m', 'Test 1', sub {
	select undef, undef, undef, 0.3;
	publish('m', 'x' x $_) for @sizes;
});
my @pads = map { length } $m =~ /x+(\n?(?:\r\n)*)/g;
is(join(',', @pads), '545,500,400,300,200,100,0', 'messages padded by their size');

my $e = body_of('/ev?id=e', 'anything', sub {
	select undef, undef, undef, 0.3;
	publish('e', 'x' x 10);
}, "X-UA: Test 1\r\n");
like($e, qr/^: \n:{1023}\n/, "EventSource: the header padded to the location's largest size, 1024 (a comment of colons)");
like($e, qr/data: x{10}\n\n:{499}\n/, "and an 18-byte event to 518");
is(length body_of('/ev?id=e', 'Test 1'), 3, 'push_stream_user_agent decides, not the header');
is(length body_of('/evu?id=e&ua=test%201', 'none'), 3 + 1024,
	'push_stream_user_agent is unescaped, as push-stream does ($arg_ua=test%201)');
unlike($t->read_file('error.log'), qr/has no effect/, 'the padding directives have their effect');
