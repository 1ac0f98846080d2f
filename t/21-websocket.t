#!/usr/bin/perl

# The WebSocket side of a subscriber, RFC 6455 as a client sees it: the handshake and
# push-stream's refusals, masked and fragmented client frames, UTF-8 and size limits with
# their close codes, ping/pong both ways, the close handshake, header and footer templates,
# the connection ttl, channel errors reported after the 101, and the close frame sent when
# nginx stops. One worker without PostgreSQL: the publisher delivers in the worker.

use warnings;
use strict;

use IO::Select;
use Test::More;
use Time::HiRes qw/ sleep /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush qw/ publish /;
use PgPush::WS;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http/)->plan(56);

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;
worker_processes 1;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location /ws {
            push_stream_subscriber websocket;
            push_stream_channels_path $arg_id;
            client_max_body_size 1k;
        }

        location /templated {
            push_stream_subscriber websocket;
            push_stream_channels_path $arg_id;
            push_stream_header_template "HEADER";
            push_stream_footer_template "FOOTER";
            push_stream_message_template "[~channel~:~id~:~size~] ~text~";
            push_stream_ping_message_interval 500ms;
            push_stream_subscriber_connection_ttl 2s;
        }

        location /full {
            push_stream_subscriber websocket;
            push_stream_channels_path $arg_id;
            push_stream_message_template "~time~|~event-type~|~event-id~|~tag~|~text~";
        }

        location /stats {
            push_stream_channels_statistics;
            push_stream_channels_path $arg_id;
        }

        location /polling {
            push_stream_subscriber polling;
            push_stream_channels_path $arg_id;
        }

        location /pub {
            push_stream_publisher;
            push_stream_channels_path $arg_id;
        }
    }
}

EOF

$t->run();

###############################################################################

# the handshake

my $ws = PgPush::WS->connect('/ws?id=hs');
is($ws->{status}, 101, 'version 13 handshake');
like($ws->{response}, qr/^Upgrade: websocket\r?$/mi, 'Upgrade header');
like($ws->{response}, qr/^Connection: upgrade\r?$/mi, 'Connection header');
undef $ws;

my $r = http(<<EOR);
GET /ws?id=hs HTTP/1.1
Host: localhost
Connection: close

EOR
like($r, qr/^HTTP\/1\.1 400/, 'plain GET refused');
like($r, qr/X-Nginx-PushStream-Explain: Don't have at least one of the mandatory headers/,
	'plain GET explained as push-stream does');

$r = http(<<EOR);
GET /ws?id=hs HTTP/1.1
Host: localhost
Connection: Upgrade
Upgrade: websocket
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==
Sec-WebSocket-Version: 7

EOR
like($r, qr/^HTTP\/1\.1 400/, 'version 7 refused');
like($r, qr/X-Nginx-PushStream-Explain: Version not supported\. Supported versions: 8, 13/,
	'version explained');
like($r, qr/^Sec-WebSocket-Version: 8, 13\r$/m, 'supported versions listed');

# push-stream's own exchange, byte for byte: HTTP/1.0, version 8
my $sock = http(<<EOR, start => 1);
GET /ws?id=raw HTTP/1.0
Connection: Upgrade
Sec-WebSocket-Key: /mQoZf6pRiv8+6o72GncLQ==
Upgrade: websocket
Sec-WebSocket-Version: 8

EOR
my $head = read_until($sock, "\r\n\r\n");
is($head, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n"
	. "Expires: Thu, 01 Jan 1970 00:00:01 GMT\r\nCache-Control: no-cache, no-store, must-revalidate\r\n"
	. "Sec-WebSocket-Accept: RaIOIcQ6CBoc74B9EKdH0avYZnw=\r\n\r\n",
	'the 101 as push-stream sends it, not cached');
publish('raw', 'Hello');
is(read_until($sock, 'Hello'), "\x81\x05Hello", 'a message as push-stream frames it');
close $sock;

$r = http(<<EOR);
POST /ws?id=hs HTTP/1.1
Host: localhost
Connection: close
Content-Length: 0

EOR
like($r, qr/^HTTP\/1\.1 405.*^Allow: GET/ms, 'POST to a subscriber: 405 with Allow');

like(http_get('/polling?id=x'), qr/^HTTP\/1\.1 304/, 'a polling location answers at once');

# channel errors come after the 101, as a 1008 close frame carrying push-stream's JSON
$ws = PgPush::WS->connect('/ws?id=');
is($ws->{status}, 101, 'no channel: still 101');
my ($code, $reason) = PgPush::WS->close_status($ws->read_frame(3));
is($code, 1008, 'no channel: close 1008');
is($reason, '{"http_status": 400, "explain":"No channel id provided."}', 'no channel: reason');
is($ws->header('X-Nginx-PushStream-Explain'), 'No channel id provided.',
	'no channel: explained in a header too');

# ALL and ids with * are push-stream's statistics wildcards: refused with 403
for my $id ('ALL', 'news/a%2Ab') {
	$ws = PgPush::WS->connect("/ws?id=$id");
	($code, $reason) = PgPush::WS->close_status($ws->read_frame(3));
	is("$code $reason", '1008 {"http_status": 403, "explain":"Channel id not authorized for this method."}',
		"reserved id $id: 1008 with 403");
}

###############################################################################

# delivery and client frames

$ws = PgPush::WS->connect('/ws?id=frames');
publish('frames', 'first');
is($ws->payload, 'first', 'text frame delivered');

$ws->ping('are you there');
my $f = $ws->read_frame(3);
is($f->{opcode}, 10, 'ping answered with pong');
is($f->{payload}, 'are you there', 'pong echoes the payload');

$ws->raw(PgPush::WS->frame(opcode => 1, payload => 'frag', fin => 0)
	. PgPush::WS->frame(opcode => 9, payload => 'mid')
	. PgPush::WS->frame(opcode => 0, payload => 'men', fin => 0)
	. PgPush::WS->frame(opcode => 0, payload => 'ted', fin => 1));
$f = $ws->read_frame(3);
is($f->{opcode}, 10, 'control frame between fragments answered');
publish('frames', 'after fragments');
is($ws->payload, 'after fragments', 'fragmented message accepted, connection alive');

$ws->send_binary("\x00\x01\x02");
publish('frames', 'after binary');
is($ws->payload, 'after binary', 'binary client message ignored without error');

$ws->close(1000, 'bye');
($code, $reason) = PgPush::WS->close_status($ws->read_frame(3));
is($code, 1000, 'close handshake: code echoed');
is($reason, 'bye', 'close handshake: reason echoed');
ok($ws->eof(3), 'server closed the TCP connection after the close handshake');

$ws = PgPush::WS->connect('/ws?id=frames');
$ws->close(4001);
($code) = PgPush::WS->close_status($ws->read_frame(3));
is($code, 4001, 'application close code echoed');

# protocol errors, each with its code
is(fail_code(PgPush::WS->frame(opcode => 1, payload => 'plain', mask => 0)), 1002,
	'unmasked client frame: 1002');
is(fail_code(PgPush::WS->frame(opcode => 1, payload => "bad \xff\xfe utf8")), 1007,
	'invalid UTF-8 in a text message: 1007');
is(fail_code(PgPush::WS->frame(opcode => 1, payload => "\xc3", fin => 0)
	. PgPush::WS->frame(opcode => 0, payload => "\x28")), 1007,
	'invalid UTF-8 across fragments: 1007');
is(fail_code(PgPush::WS->frame(opcode => 1, payload => 'x' x 2048)), 1009,
	'message over client_max_body_size: 1009');
is(fail_code(PgPush::WS->frame(opcode => 0, payload => 'orphan')), 1002,
	'continuation without a start: 1002');
is(fail_code(PgPush::WS->frame(opcode => 3, payload => 'x')), 1002, 'reserved opcode: 1002');
is(fail_code(PgPush::WS->frame(opcode => 9, payload => 'p', fin => 0)), 1002,
	'fragmented control frame: 1002');
is(fail_code(PgPush::WS->frame(opcode => 1, payload => 'x', rsv => 4)), 1002,
	'reserved bit set: 1002');
is(fail_code(PgPush::WS->frame(opcode => 9, payload => 'p' x 126)), 1002,
	'control frame over 125 bytes: 1002');

# a failing connection leaves its channel as its close frame goes out, and the server
# ends it without waiting for the client's close frame
$ws = PgPush::WS->connect('/ws?id=failing');
like(http_get('/stats?id=failing'), qr/"subscribers": 1\b/, 'a subscriber is counted');
$ws->raw(PgPush::WS->frame(opcode => 1, payload => 'plain', mask => 0));
($code) = PgPush::WS->close_status($ws->read_frame(3));
is($code, 1002, 'it fails');
unlike(http_get('/stats?id=failing'), qr/"subscribers": [1-9]/,
	'and is no longer counted, its client still connected');
ok($ws->eof(3), 'the server ends the connection without waiting for the client');

# a message over the limit while the client still sends it: the server drains the rest,
# so the client reads the close code, not a reset
{
	local $SIG{PIPE} = 'IGNORE';
	local $SIG{ALRM} = sub { die "timed out sending\n" };
	alarm(30);
	my $big = PgPush::WS->connect('/ws?id=huge');
	my $bytes = PgPush::WS->frame(opcode => 1, payload => 'x' x (4 * 1024 * 1024));
	my $sent = 0;
	while ($sent < length $bytes) {
		my $n = $big->raw(substr($bytes, $sent, 65536)) or last;
		$sent += $n;
	}
	alarm(0);
	is($sent, length $bytes, '4 MB sent to a location taking 1k: the server reads it all');
	my $f;
	while ($f = $big->read_frame(3)) {
		last if $f->{opcode} == 8;
	}
	is((PgPush::WS->close_status($f))[0], 1009, 'the client reads 1009, not a reset');
}

###############################################################################

# templates, pings and the connection ttl

$ws = PgPush::WS->connect('/templated?id=tpl');
is($ws->payload, 'HEADER', 'header template first');
publish('tpl', 'one');
publish('tpl', 'twenty');
is($ws->payload, '[tpl:1:3] one', 'message template, first message');
is($ws->payload, '[tpl:2:6] twenty', 'message template, second message');

my ($pings, $footer, $close) = (0, undef, undef);
while (my $m = $ws->read_message(4)) {
	$pings++ if $m->{opcode} == 9;
	$footer = $m->{payload} if $m->{opcode} == 1;
	if ($m->{opcode} == 8) {
		$close = $m;
		last;
	}
}
cmp_ok($pings, '>=', 2, 'server pings every ping_message_interval');
is($footer, 'FOOTER', 'footer template before the close at the ttl');
is($close && $close->{payload}, '', 'connection ttl: a close frame without a code, as push-stream');
$ws->close(1000);
ok($ws->eof(3), 'closed after the ttl');

$ws = PgPush::WS->connect('/full?id=full');
publish('full', 'hello');
like($ws->payload, qr/^\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT\|\|\|[1-9]\d*\|hello\z/,
	'~time~ is an HTTP date, ~tag~ numbers the second\'s messages; no event type or id');

###############################################################################

# several channels on one connection

$ws = PgPush::WS->connect('/ws?id=left/right.b2');
publish('left', 'L');
publish('right', 'R');
publish('elsewhere', 'X');
is($ws->payload, 'L', 'two channels: first');
is($ws->payload, 'R', 'two channels: second');
publish('left', 'L2');
is($ws->payload, 'L2', 'no message of another channel');

###############################################################################

# nginx stops: held subscribers get a close frame

my $held = PgPush::WS->connect('/templated?id=bye');
is($held->payload, 'HEADER', 'held subscriber ready');
$t->stop();
my $last;
while (my $m = $held->read_message(3)) {
	$last = $m;
	last if $m->{opcode} == 8;
}
($code) = PgPush::WS->close_status($last);
is($code, 1001, 'shutdown: close 1001 (going away)');

###############################################################################

# Reads from a raw socket until $end has arrived; everything read.
sub read_until {
	my ($sock, $end) = @_;
	my $buf = '';
	my $sel = IO::Select->new($sock);
	while (index($buf, $end) < 0) {
		last unless $sel->can_read(3);
		last unless $sock->sysread($buf, 4096, length $buf);
	}
	return $buf;
}

# Sends bytes on a fresh subscriber; the close code the server answers with.
sub fail_code {
	my ($bytes) = @_;
	my $ws = PgPush::WS->connect('/ws?id=errors');
	$ws->raw($bytes);
	while (my $f = $ws->read_frame(3)) {
		next unless $f->{opcode} == 8;
		my ($code) = PgPush::WS->close_status($f);
		return $code;
	}
	return 'none';
}

###############################################################################
