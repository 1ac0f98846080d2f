#!/usr/bin/perl

# The relay through PostgreSQL, with two workers: a NOTIFY reaches every WebSocket
# subscriber of its channel in every worker, byte-exact, with and without a template; a
# worker LISTENs with its first subscriber of a channel and UNLISTENs after the last;
# hostile channel ids are quoted, long ones LISTENed under a derived name; subscribers
# stay connected through a database restart and a terminated backend and get what is
# published afterwards; the HTTP publisher goes through pg_notify; a subscriber that never
# reads is closed once its output bound is reached.

use warnings;
use strict;

use Encode qw/ decode_utf8 /;
use Test::More;
use IO::Select;
use IO::Socket::INET;
use Time::HiRes qw/ sleep time /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush qw/ flood publish wait_log /;
use PgPush::PG;
use PgPush::WS;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http/)->plan(70);

my $pg = PgPush::PG->start();
my $conninfo = $pg->conninfo;

$t->write_file_expand('nginx.conf', <<"EOF");

%%TEST_GLOBALS%%

daemon off;
worker_processes 2;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    push_stream_postgres "$conninfo";
    push_stream_postgres_reconnect 50ms 500ms;
    push_stream_postgres_publish_timeout 300ms;

    server {
        # reuseport: the kernel spreads connections over both workers
        listen       127.0.0.1:8080 reuseport sndbuf=16k;
        server_name  localhost;

        location /ws {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
        }

        location /json {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_message_template '{"id":~id~,"channel":"~channel~","text":"~text~"}';
        }

        location /slow {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_subscriber_output_limit 32k;
        }

        location /roomy {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_subscriber_output_limit 8m;
        }

        location /pub {
            push_stream_publisher;
            push_stream_channels_path \$arg_id;
        }
    }
}

EOF

$t->run();
ok($pg->wait_sessions(2), 'two side connections');

###############################################################################

# delivery, byte-exact

my $ws = PgPush::WS->connect('/ws?id=news');
is($ws->{status}, 101, 'subscribed');
my $payload = qq{héllo "wörld" \\ 'quotes' <b>&amp;</b>\n\ttabs ✓};
# DBD::Pg takes characters: it sends them as UTF-8
$pg->notify('news', decode_utf8($payload));
my $m = $ws->read_message(3);
is($m->{opcode}, 1, 'a text frame');
is($m->{payload}, $payload, 'NOTIFY payload delivered byte-exact');

my $js = PgPush::WS->connect('/json?id=news');
$pg->notify('news', 'templated');
# ~id~ counts the channel's messages in the worker (ids from stored messages come later)
like($js->payload, qr/^\{"id":\d+,"channel":"news","text":"templated"\}\z/,
	'message template applied');
is($ws->payload, 'templated', 'same message untouched where there is no template');

# SQL NOTIFY as well as pg_notify(); a transaction delivers at commit, in order
$pg->do(q{NOTIFY news, 'from NOTIFY'});
is($ws->payload, 'from NOTIFY', 'NOTIFY statement delivered');
$pg->do('BEGIN');
$pg->notify('news', "tx $_") for 1 .. 3;
$pg->do('COMMIT');
is(join(',', map { $ws->payload } 1 .. 3), 'tx 1,tx 2,tx 3', 'transaction delivered in order');
undef $js;

###############################################################################

# 2 workers x 20 subscribers

my @subs = map { PgPush::WS->connect('/ws?id=fan') } 1 .. 20;
is(scalar(grep { $_->{status} == 101 } @subs), 20, '20 subscribers');
ok($pg->wait_query(qr/LISTEN "fan"/, 2), 'both workers LISTEN on the channel');
$pg->notify('fan', "to all $_") for 1 .. 5;
my $all = 1;
for my $s (@subs) {
	my $got = join ',', map { $s->payload // 'none' } 1 .. 5;
	$all = 0, diag("got $got") unless $got eq join ',', map { "to all $_" } 1 .. 5;
}
ok($all, 'every subscriber in both workers got every message, in order');
undef @subs;
ok($pg->wait_query(qr/UNLISTEN "fan"/, 2), 'both workers UNLISTEN after the last subscriber');

###############################################################################

# LISTEN follows the first and the last subscriber

my $a = PgPush::WS->connect('/ws?id=life');
ok($pg->wait_query(qr/LISTEN "life"/, 1), 'LISTEN with the first subscriber');
my $b = PgPush::WS->connect('/ws?id=life');
$pg->notify('life', 'both');
is($a->payload . $b->payload, 'bothboth', 'both subscribers get it');
undef $a;
sleep 0.3;
$pg->notify('life', 'one left');
is($b->payload, 'one left', 'the remaining subscriber still gets messages');
undef $b;
ok($pg->wait_query(qr/UNLISTEN "life"/, 1), 'UNLISTEN after the last one');

# churn: many short subscribers leave no LISTEN behind
for (1 .. 30) {
	my $c = PgPush::WS->connect('/ws?id=churn');
	$c->close(1000);
}
ok($pg->wait_query(qr/UNLISTEN "churn"/, 1), 'churn ends with UNLISTEN');

###############################################################################

# hostile and odd channel ids are quoted, never spliced

for my $id ('quo"te', 'semi;colon', "it's", 'a"; DROP TABLE x; --', 'ünïcödé✓', 'MixedCase',
	'with space')
{
	my $enc = $id;
	$enc =~ s/([^A-Za-z0-9])/sprintf('%%%02X', ord $1)/ge;
	my $s = PgPush::WS->connect("/ws?id=$enc");
	$pg->notify(decode_utf8($id), decode_utf8("for $id"));
	is($s->payload, "for $id", "channel id $id");
}

my $long = 'x' x 64;
my $s = PgPush::WS->connect("/ws?id=$long");
is($s->{status}, 101, 'a 64-byte channel is accepted (issue 10: a derived LISTEN name)');
like(publish($long, 'long'), qr/^HTTP\/1\.1 200/, 'and published to');
ok(!grep({ ($_->[2] // '') =~ /x{64}/ } @{$pg->sessions()}), 'no LISTEN is sent under the truncated name');
$s = PgPush::WS->connect('/ws?id=' . 'y' x 63);
$pg->notify('y' x 63, '63 bytes');
is($s->payload, '63 bytes', 'a 63-byte channel works');

###############################################################################

# the HTTP publisher goes through PostgreSQL: every worker delivers

@subs = map { PgPush::WS->connect('/ws?id=pub') } 1 .. 16;
ok($pg->wait_query(qr/LISTEN "pub"/, 2), 'publisher test: both workers listen');
my $r = publish('pub', 'over http');
like($r, qr/^HTTP\/1\.1 200/, 'publish: 200');
like($r, qr/^\{"channel": "pub", "published_messages": \d+, "stored_messages": 0, "subscribers": \d+\}\r$/m,
	'publish: channel info JSON');
is(scalar(grep { ($_->payload // '') eq 'over http' } @subs), 16, 'published message delivered everywhere');

$r = publish('pub', 'same');
$r = publish('pub', 'same');
is(scalar(grep { ($_->payload // '') . ($_->payload // '') eq 'samesame' } @subs), 16,
	'identical messages are not folded into one');

$r = publish('pub', '');
like($r, qr/^HTTP\/1\.1 400.*X-Nginx-PushStream-Explain: Empty post requests are not allowed\./ms,
	'empty body: 400 explained');
$r = publish('', 'x');
like($r, qr/^HTTP\/1\.1 400.*X-Nginx-PushStream-Explain: No channel id provided\./ms,
	'no channel: 400 explained');
$r = publish('z' x 64, 'x');
like($r, qr/^HTTP\/1\.1 200/, 'a channel over 63 bytes is published to');
$r = publish('ALL', 'x');
like($r, qr/^HTTP\/1\.1 403.*X-Nginx-PushStream-Explain: Channel id not authorized for this method\./ms,
	'publishing to ALL: 403 explained');
$r = publish('new*', 'x');
like($r, qr/^HTTP\/1\.1 403.*X-Nginx-PushStream-Explain: Channel id not authorized for this method\./ms,
	'publishing to an id with *: 403 explained');
# any bytes are a message: a body that is not UTF-8 reaches WebSocket subscribers as a
# binary frame, byte-exact
my $bin = PgPush::WS->connect('/ws?id=bytes');
$r = publish('bytes', "\xff\x00\xfe");
like($r, qr/^HTTP\/1\.1 200/, 'a body that is not UTF-8 is published');
my $bm = $bin->read_message(3);
is(($bm->{opcode} // 0) . ' ' . unpack('H*', $bm->{payload} // ''), '2 ff00fe',
	'and delivered as a binary frame, byte-exact');
undef $bin;
$r = publish('pub', 'x' x 8000);
like($r, qr/^HTTP\/1\.1 413.*X-Nginx-PushStream-Explain: Message is too large/ms,
	'payload over the NOTIFY limit: 413 explained');
$r = http(<<EOR);
DELETE /pub?id=pub HTTP/1.0
Host: localhost

EOR
like($r, qr/^HTTP\/1\.1 405.*^Allow: GET, POST, PUT/ms, 'DELETE outside admin mode: 405');
undef @subs;

###############################################################################

# the database restarts, then a backend is terminated: subscribers stay, and get what
# is published after the reconnect

@subs = map { PgPush::WS->connect('/ws?id=survive') } 1 .. 16;
my $tagged = PgPush::WS->connect('/json?id=survive');
ok($pg->wait_query(qr/LISTEN "survive"/, 2), 'restart test: both workers listen');
$t->write_file('error.log', '');
$pg->restart();
ok(wait_log($t, qr/reconnected to postgres/, 2), 'both workers reconnected after the restart');
is(scalar(grep { ($_->payload // 'none') eq '' } @subs), 16,
	'every subscriber is told of the gap');
is($tagged->payload, '{"id":-4,"channel":"survive","text":""}', 'the gap message has id -4');
$pg->notify('survive', 'after restart');
is(scalar(grep { ($_->payload // '') eq 'after restart' } @subs), 16,
	'delivered to every subscriber after the restart');

$pg->terminate_sessions();
ok(wait_log($t, qr/reconnected to postgres/, 4), 'both workers reconnected after termination');
is(scalar(grep { ($_->payload // 'none') eq '' } @subs), 16, 'gap told again');
$pg->notify('survive', 'after terminate');
is(scalar(grep { ($_->payload // '') eq 'after terminate' } @subs), 16,
	'delivered to every subscriber after pg_terminate_backend');
unlike($t->read_file('error.log'), qr/\[(alert|crit|emerg)\]|signal \d+/, 'no worker crashed');
undef @subs;

###############################################################################

# backends terminated while batches of publishes are in flight: every publish is answered
# (200 once committed, 503 when its connection went away or past the publish timeout),
# none is left waiting. Identical bodies each take a statement of their own (PostgreSQL
# folds identical notifications of one transaction), so a batch is many round trips.

my ($answered, $sent) = (0, 0);
for my $round (1 .. 6) {
	my @socks;
	for (1 .. 24) {
		my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . port(8080)) or next;
		print $s "POST /pub?id=dup HTTP/1.0\r\nHost: localhost\r\n"
			. "Content-Length: 4\r\n\r\nsame";
		push @socks, $s;
	}
	$sent += @socks;
	sleep(0.002 * $round);
	$pg->terminate_sessions();
	my $sel = IO::Select->new(@socks);
	my %got;
	my $deadline = time() + 8;
	while ($sel->count && time() < $deadline) {
		for my $s ($sel->can_read(0.2)) {
			my $n = sysread($s, my $buf, 4096);
			$got{$s} .= $buf if $n;
			next if $n;
			$sel->remove($s);
			$answered++ if ($got{$s} // '') =~ m{^HTTP/1\.1 (200|503) };
		}
	}
}
ok($pg->wait_sessions(2), 'both workers reconnected after the rounds');
is($answered, $sent, 'every publish answered with 200 or 503 across terminated backends');

###############################################################################

# a subscriber that never reads is closed at its bound; the others are not held back

my $slow = PgPush::WS->connect('/slow?id=slow', rcvbuf => 4096);
my $fast = PgPush::WS->connect('/roomy?id=slow');
my $chunk = 'm' x 7000;
$pg->do(q{SELECT pg_notify('slow', i || $1) FROM generate_series(1, 400) i}, $chunk);
my $n = 0;
while (my $p = $fast->payload) {
	$n++;
	last if $n == 400;
}
is($n, 400, 'a reading subscriber gets all 400 messages');
ok(wait_log($t, qr/too slow.*channel "slow"/, 1), 'the slow one is logged with its channel');
my $last;
while (my $f = $slow->read_message(3)) {
	$last = $f;
	last if $f->{opcode} == 8;
}
my ($code) = PgPush::WS->close_status($last);
is($code, 1013, 'the slow subscriber is closed with 1013');

###############################################################################

# the database is down: publishing fails once the bounded wait is over and says why;
# subscribers are still accepted

$pg->halt();
ok(wait_log($t, qr/lost: .*reconnecting/, 2), 'both workers noticed the database is gone');
$r = publish('pub', 'nobody hears');
like($r, qr/^HTTP\/1\.1 503.*X-Nginx-PushStream-Explain: Message not published: the connection to PostgreSQL is down/ms,
	'publish while the database is down: 503 explained');
$s = PgPush::WS->connect('/ws?id=later');
is($s->{status}, 101, 'a subscriber is accepted while the database is down');
$pg->restart();
ok(wait_log($t, qr/reconnected to postgres/, 2), 'reconnected once the database is back');
ok($pg->wait_query(qr/LISTEN "later"/, 1), 'its channel is LISTENed on reconnect');
is($s->payload, '', 'it is told of the gap');
$pg->notify('later', 'now');
is($s->payload, 'now', 'and it gets messages');

###############################################################################

# reload: the old workers tell their subscribers (1001) and close their side connections;
# the new workers relay

@subs = map { PgPush::WS->connect('/ws?id=reload') } 1 .. 4;
ok($pg->wait_query(qr/LISTEN "reload"/, 1), 'reload test: listening');
$t->reload();
my $told = 0;
for my $c (@subs) {
	while (my $m = $c->read_message(5)) {
		next unless $m->{opcode} == 8;
		my ($code) = PgPush::WS->close_status($m);
		$told++ if $code == 1001;
		last;
	}
}
is($told, 4, 'reload: every subscriber of the old workers got 1001');
ok(wait_log($t, qr/gracefully shutting down/, 2), 'old workers shut down');
ok($pg->wait_sessions(2), 'two side connections after the reload, not four');
$pg->mark();
$s = PgPush::WS->connect('/ws?id=reload');
ok($pg->wait_query(qr/LISTEN "reload"/, 1), 'a new worker listens');
$pg->notify('reload', 'new workers');
is($s->payload, 'new workers', 'the new workers relay');

# subscribers that join a channel already listened while it is busy: a message that
# arrives before a subscriber's 101 is sent follows it
my $flood = flood($pg, 'busy', 'b', 8);
my @keep = map { PgPush::WS->connect('/ws?id=busy') } 1 .. 4;
my ($joined, $bad) = (0, '');
for (1 .. 400) {
	my $ws = PgPush::WS->connect('/ws?id=busy');
	$joined++;
	my $m = $ws->{status} == 101 ? $ws->read_message(2) : undef;
	$bad ||= "status $ws->{status}: $ws->{response}" unless $m && ($m->{payload} // '') eq 'b';
}
kill 'TERM', $flood;
waitpid($flood, 0);
is($bad, '', "$joined subscribers joining a busy channel: each gets its 101, then the messages");

###############################################################################
