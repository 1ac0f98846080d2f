#!/usr/bin/perl

# WebSocket over TLS (wss://): the subscriber reads and writes through nginx's SSL layer
# (the connection's recv and send_chain, whose TLS buffer only writes on a flush), so
# delivery, large frames, bursts, ping/pong and the close handshake behave as on plain
# connections.

use warnings;
use strict;

use Test::More;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush qw/ publish /;
use PgPush::WS;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

eval { require IO::Socket::SSL; };
plan(skip_all => 'IO::Socket::SSL not installed') if $@;

my $t = Test::Nginx->new()->has(qw/http http_ssl/)->plan(9);

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;
worker_processes 1;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    server {
        listen       127.0.0.1:8081 ssl;
        listen       127.0.0.1:8080;
        server_name  localhost;

        ssl_certificate     localhost.crt;
        ssl_certificate_key localhost.key;

        location /ws {
            push_stream_subscriber websocket;
            push_stream_channels_path $arg_id;
        }

        location /pub {
            push_stream_publisher;
            push_stream_channels_path $arg_id;
            client_max_body_size 16k;
            client_body_buffer_size 16k;
        }
    }
}

EOF

my $d = $t->testdir();
system("openssl req -x509 -new -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost "
	. "-keyout $d/localhost.key -out $d/localhost.crt >/dev/null 2>&1") == 0
	or die "openssl failed\n";

$t->run();

###############################################################################

my $ws = PgPush::WS->connect('/ws?id=tls', port => 8081, ssl => 1);
is($ws->{status}, 101, 'wss handshake');

publish('tls', 'secret');
is($ws->payload, 'secret', 'delivered over TLS');

my $big = join '', map { chr(65 + $_ % 26) } 1 .. 7000;
publish('tls', $big);
is($ws->payload, $big, 'a 7000-byte message over TLS');

publish('tls', "m$_") for 1 .. 50;
is(join(',', map { $ws->payload } 1 .. 50), join(',', map { "m$_" } 1 .. 50),
	'a burst arrives in order');

$ws->ping('tls ping');
my $f = $ws->read_frame(3);
is($f->{opcode}, 10, 'pong over TLS');
is($f->{payload}, 'tls ping', 'pong payload');

$ws->close(1000, 'done');
my ($code, $reason) = PgPush::WS->close_status($ws->read_frame(3));
is($code, 1000, 'close handshake over TLS');
ok($ws->eof(3), 'connection closed');

# a client that goes away without a close frame
$ws = PgPush::WS->connect('/ws?id=tls', port => 8081, ssl => 1);
undef $ws;
publish('tls', 'nobody');
like(http_get('/pub?id=tls'), qr/"subscribers": 0\}/, 'the subscriber that vanished is gone');

###############################################################################
