#!/usr/bin/perl

# Client publish over WebSocket (push_stream_websocket_allow_publish on): a client's
# message goes through PostgreSQL to every channel of its path, so every worker and every
# nginx node sharing the database delivers it, the sender's own subscription included.
# Text and binary round-trip byte-exact, fragments are reassembled with pings answered in
# between, one sender's messages keep their order, a message too large for a notification
# closes the sender with 1009, and while the database is down a message waits a bounded
# time: it is published if the database comes back, the sender is closed with 1011
# otherwise. With allow_publish off, data frames are ignored.

use warnings;
use strict;

use Test::More;
use Time::HiRes qw/ sleep /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush qw/ wait_log /;
use PgPush::PG;
use PgPush::WS;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http/)->plan(40);

my $pg = PgPush::PG->start();
my $conninfo = $pg->conninfo;

my $conf = <<"EOF";

%%TEST_GLOBALS%%

daemon off;
worker_processes 2;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    push_stream_postgres "$conninfo";
    push_stream_postgres_reconnect 50ms 200ms;
    push_stream_postgres_publish_timeout 3s;

    server {
        listen       127.0.0.1:PORT reuseport;
        server_name  localhost;

        location /ws {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_websocket_allow_publish on;
        }

        location /readonly {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
        }
    }
}

EOF

(my $one = $conf) =~ s/PORT/8080/;
$t->write_file_expand('nginx.conf', $one);
$t->run();

# a second node on the same database
my $t2 = Test::Nginx->new();
(my $two = $conf) =~ s/PORT/8081/;
$t2->write_file_expand('nginx.conf', $two);
$t2->run();
ok($pg->wait_sessions(4), 'two nodes, two workers each, four side connections');
unlike($t->read_file('error.log'), qr/has no effect/, 'allow_publish is not reported as without effect');

###############################################################################

# text: the sender, another subscriber of the node and one of the other node all get it

my $sender = PgPush::WS->connect('/ws?id=room');
is($sender->{status}, 101, 'sender subscribed');
my @others = map { PgPush::WS->connect('/ws?id=room') } 1 .. 10;   # both workers get some: 2^-10 odds otherwise
my $far = PgPush::WS->connect('/ws?id=room', port => 8081);
is($far->{status}, 101, 'subscriber on the other node');
ok($pg->wait_query(qr/LISTEN "room"/, 3), 'every worker of both nodes listens');

$sender->send_text("h\xc3\xa9llo 'quoted'; \"x\"");
is($sender->payload, "h\xc3\xa9llo 'quoted'; \"x\"", 'the sender gets its own message');
my $all = 1;
for my $o (@others) {
	my $got = $o->payload // 'none';
	$all = 0, diag("got $got") unless $got eq "h\xc3\xa9llo 'quoted'; \"x\"";
}
ok($all, 'every subscriber of the node, in both workers, gets it');
is($far->payload, "h\xc3\xa9llo 'quoted'; \"x\"", 'the other node delivers it too');

# a message starting with ESC, and one holding a NUL, travel as they are
$sender->send_text("\x1bb not an envelope");
is($far->payload, "\x1bb not an envelope", 'text starting with ESC round-trips');
$sender->send_text("a\x00b");
is($far->payload, "a\x00b", 'text holding a NUL round-trips');
$_->payload for $sender, $sender, map { ($_, $_) } @others;

# binary: byte-exact, as a binary frame
my $bin = join '', map { chr } 0 .. 255;
$sender->send_binary($bin);
my $m = $far->read_message(3);
is($m->{opcode}, 2, 'a binary message arrives as a binary frame');
is($m->{payload}, $bin, 'byte-exact');
$m = $sender->read_message(3);
is($m->{payload}, $bin, 'the sender gets its binary message too');
$_->payload for @others;
# the largest binary message a notification carries: 7999 bytes hold 5997 bytes in base64
$sender->send_binary("\xff" x 5997);
is(length($far->read_message(3)->{payload} // ''), 5997, 'the largest binary message arrives whole');
$sender->payload;
$_->payload for @others;

# binary from SQL, as the README shows it (encode() breaks long base64 into lines)
$pg->do(q{SELECT pg_notify('room', chr(27) || 'b' || encode(decode(repeat('00ff', 100), 'hex'), 'base64'))});
$m = $far->read_message(3);
is($m->{opcode}, 2, 'a binary message from SQL arrives as a binary frame');
is($m->{payload}, "\x00\xff" x 100, 'byte-exact, line breaks of encode() ignored');
$_->payload for $sender, @others;

# fragmented: reassembled, with a ping between the fragments answered
$sender->raw(PgPush::WS->frame(opcode => 1, fin => 0, payload => 'frag'));
$sender->raw(PgPush::WS->frame(opcode => 9, payload => 'mid'));
$sender->raw(PgPush::WS->frame(opcode => 0, fin => 0, payload => 'men'));
$sender->raw(PgPush::WS->frame(opcode => 0, fin => 1, payload => 'ted'));
$m = $sender->read_message(3);
is($m->{opcode}, 10, 'a ping between fragments is answered at once');
is($m->{payload}, 'mid', 'with its payload');
is($sender->payload, 'fragmented', 'the fragments are published as one message');
is($far->payload, 'fragmented', 'and delivered as one');
$_->payload for @others;

# order: one sender's messages arrive in the order sent
$sender->send_text("n$_") for 1 .. 200;
my @got = map { $far->payload // 'none' } 1 .. 200;
is(join(',', @got), join(',', map { "n$_" } 1 .. 200), '200 messages in the order sent');
@got = map { $others[0]->payload // 'none' } 1 .. 200;
is(join(',', @got), join(',', map { "n$_" } 1 .. 200), 'in order in the other worker too');
$sender->payload for 1 .. 200;
$_->payload for @others[1 .. 3];

###############################################################################

# a/b: the message goes to both channels

my $a = PgPush::WS->connect('/readonly?id=a');
my $b = PgPush::WS->connect('/readonly?id=b');
my $ab = PgPush::WS->connect('/ws?id=a/b');
# (each 101 comes once the worker's LISTENs are confirmed)
is(join(',', map { $_->{status} } $a, $b, $ab), '101,101,101', 'a, b and a/b subscribed');
$ab->send_text('to both');
is($a->payload, 'to both', 'published to a');
is($b->payload, 'to both', 'published to b');
is(join(',', map { $ab->payload // 'none' } 1 .. 2), 'to both,to both',
	'a subscriber of a/b gets it once per channel');

###############################################################################

# allow_publish off: data frames are ignored, the connection stays

$a->send_text('ignored');
$a->ping('still');
$m = $a->read_message(3);
is($m->{opcode}, 10, 'allow_publish off: the connection stays');
is($b->payload(1), undef, 'and nothing was published');

###############################################################################

# too large for a notification: 1009 with a reason, one info line

my $big = PgPush::WS->connect('/ws?id=big');
$big->send_text('x' x 8000);
$m = $big->read_message(3);
my ($code, $reason) = PgPush::WS->close_status($m);
is($code, 1009, 'a message too large for a notification closes with 1009');
like($reason, qr/too large.*7999/, 'the reason says why');
ok(wait_log($t, qr/\[info\].*client message of 8000 bytes.*closing with 1009/, 1),
	'one info line is logged');

###############################################################################

# the database is down: a message waits for it, within the bounded time

$pg->halt();
ok(wait_log($t, qr/lost: .*reconnecting/, 2), 'the workers noticed the database is gone');
$sender->send_text('held');
sleep(0.5);
$pg->restart();
# the reconnect is announced (the gap message), then the held message is published: its
# sender's worker LISTENs again before it publishes, so the sender hears it (another worker
# that reconnects later may not: a plain notification is at-most-once, and the gap message
# says so)
is(join(',', map { $sender->payload(5) // 'none' } 1 .. 2), ',held',
	'a message sent while the database was down is published once it is back');
is($far->payload(5), '', 'the other node announces the gap');
1 while defined $far->payload(1);

# down past the bounded wait: close 1011
$pg->halt();
ok(wait_log($t, qr/lost: .*reconnecting/, 4), 'the database is gone again');
$sender->send_text('lost');
$m = $sender->read_message(6);
$m = $sender->read_message(6) while $m && $m->{opcode} != 8;
($code, $reason) = PgPush::WS->close_status($m);
is($code, 1011, 'past the wait the sender is closed with 1011');
is($reason, 'database unavailable', 'reason: database unavailable');
ok(wait_log($t, qr/\[error\].*client message not published/, 1), 'and it is logged');
$pg->restart();

###############################################################################

$t2->stop();
