#!/usr/bin/perl

# Stored channels through failures: a payload over NOTIFY's 8000 bytes and a binary one
# arrive intact; when the side connection is killed, or PostgreSQL restarts, while another
# session publishes 1,000 stored messages, every subscriber gets all of them, in order,
# once; a plain channel is told of the gap instead; a notification that skips an offset
# has the skipped messages read from the store; the cleaner runs one at a time and
# honours push_stream_message_ttl.

use warnings;
use strict;

use DBI;
use IO::Select;
use IO::Socket::INET;
use POSIX ();
use Test::More;
use Time::HiRes qw/ sleep time /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush qw/ read_for /;
use PgPush::PG;
use PgPush::WS;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http/)->plan(35);

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
    push_stream_postgres_reconnect 50ms 200ms;
    push_stream_message_ttl 8s;
    client_max_body_size 5m;

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location /pub {
            push_stream_publisher admin;
            push_stream_channels_path \$arg_id;
            push_stream_store_messages on;
        }

        location /sub {
            push_stream_subscriber streaming;
            push_stream_channels_path \$arg_id;
            push_stream_message_template "~id~:~text~\\n";
            push_stream_subscriber_connection_ttl 60s;
        }

        location /poll {
            push_stream_subscriber polling;
            push_stream_channels_path \$arg_id;
            push_stream_message_template "~id~:~text~;";
        }

        location /authpoll {
            push_stream_subscriber polling;
            push_stream_channels_path \$arg_id;
            push_stream_authorized_channels_only on;
        }

        location /ws {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
        }
    }
}

EOF

$t->run();
ok($pg->wait_sessions(2), 'side connections');

sub post {
	my ($ch, $body) = @_;
	my $len = length $body;
	return http("POST /pub?id=$ch HTTP/1.0\r\nHost: localhost\r\nContent-Length: $len\r\n\r\n$body", raw => 1);
}

sub start_get {
	my ($path) = @_;
	my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . port(8080)) or die $!;
	$s->syswrite("GET $path HTTP/1.0\r\nHost: localhost\r\n\r\n");
	return $s;
}


# offsets received by a streaming subscriber: (count, gaps or repeats, gap messages)
sub check {
	my ($buf) = @_;
	my @o = ($buf =~ /^(\d+):k\d+$/mg);
	my $bad = grep { $o[$_] != $o[$_ - 1] + 1 } 1 .. $#o;
	my @gap = ($buf =~ /^-4:/mg);
	return (scalar @o, $bad, scalar @gap, $o[0] // 0, $o[-1] // 0);
}

# publishes 1,000 stored messages from another session, retrying through an outage
# without ever publishing one twice
sub publisher {
	my ($ch) = @_;
	my $pid = fork();
	return $pid if $pid;
	my $dsn = 'dbi:Pg:host=127.0.0.1;port=' . $pg->port . ';dbname=postgres';
	my $dbh;
	for my $i (1 .. 1000) {
		for (1 .. 200) {
			my $ok = eval {
				$dbh //= DBI->connect($dsn, 'postgres', '', { RaiseError => 1, PrintError => 0 });
				my $there = $dbh->selectrow_array(
					"SELECT count(*) FROM pgpush.messages WHERE channel = ? AND payload = ?",
					undef, $ch, "k$i");
				$dbh->do("SELECT pgpush.publish(?, ?)", undef, $ch, "k$i") unless $there;
				1;
			};
			last if $ok;
			undef $dbh;
			sleep(0.05);
		}
		sleep(0.003) if $i % 10 == 0;
	}
	POSIX::_exit(0);
}

###############################################################################

# a payload over NOTIFY's limit, and a binary one
my $ws = PgPush::WS->connect('/ws?id=big');
my $stream = start_get('/sub?id=big');
sleep(0.5);
my $big = join '', map { chr(97 + $_ % 26) } 1 .. 100_000;
like(post('big', $big), qr/^HTTP\/1\.1 200/, 'a 100 KB stored message is accepted');
my $m = $ws->read_message(5);
is(length($m->{payload} // ''), 100_000, 'it reaches a WebSocket subscriber whole');
ok(($m->{payload} // '') eq $big, 'byte for byte');
my $bin = join '', map { chr($_ % 256) } 0 .. 20_000;
post('big', $bin);
$m = $ws->read_message(5);
is($m && $m->{opcode}, 2, 'a body that is not UTF-8 is a binary frame');
ok(($m->{payload} // '') eq $bin, 'byte for byte');
my $r = read_for($stream, 3, qr/^2:/m);
like($r, qr/^1:\Q$big\E$/m, 'and the large one reaches a streaming subscriber too');

# one message over push_stream_subscriber_output_limit (256k by default) reaches
# subscribers that keep up: the limit bounds a backlog, not a message
my $huge = join '', map { chr(65 + $_ % 26) } 1 .. 4 * 1024 * 1024;
like(post('big', $huge), qr/^HTTP\/1\.1 200/, 'a 4 MB stored message is accepted');
$m = $ws->read_message(10);
ok(($m->{payload} // '') eq $huge, 'it reaches a WebSocket subscriber whole, past the output limit');
$r = read_for($stream, 10, qr/^3:.*\n/m);
ok(index($r, "3:$huge\n") >= 0, 'and a streaming subscriber');

# kill the side connections while 1,000 stored messages are published
my @subs = map { start_get('/sub?id=killed') } 1 .. 2;
my $plain = start_get('/sub?id=plain');
sleep(0.5);
my $pid = publisher('killed');
sleep(0.4);
$pg->terminate_sessions();
sleep(0.6);
$pg->terminate_sessions();
waitpid($pid, 0);
for my $k (0 .. 1) {
	my ($n, $bad, $gaps, $first, $last) = check(read_for($subs[$k], 8, qr/^1000:/m));
	is("$n $bad $first $last", '1000 0 1 1000', "subscriber $k: side connection killed twice: all 1,000, in order, once");
}
like(read_for($plain, 2), qr/^-4:$/m, 'a plain channel gets the gap message instead');

# a notification lost on the way (here a row stored without NOTIFY): the next one skips an
# offset, and the worker reads what it skipped from the store
my $lost = start_get('/sub?id=lost');
sleep(0.5);
post('lost', 'first');
$pg->do(<<'SQL');
WITH c AS (
	UPDATE pgpush.channels SET last_offset = last_offset + 1 WHERE channel = 'lost'
	RETURNING epoch, last_offset, last_second, last_tag
)
INSERT INTO pgpush.messages (channel, epoch, "offset", payload, second, tag)
SELECT 'lost', epoch, last_offset, 'silent', last_second, last_tag FROM c
SQL
$pg->query("SELECT pgpush.publish('lost', 'after')");
my $got = read_for($lost, 3, qr/^3:/m);
is(join(',', $got =~ /^(\d+:\w+)$/mg), '1:first,2:silent,3:after',
	'a skipped offset is read from the store, in order, once');

# restart PostgreSQL while 1,000 stored messages are published
@subs = map { start_get('/sub?id=restarted') } 1 .. 2;
sleep(0.5);
$pid = publisher('restarted');
sleep(0.5);
$pg->restart();
waitpid($pid, 0);
for my $k (0 .. 1) {
	my ($n, $bad, $gaps, $first, $last) = check(read_for($subs[$k], 10, qr/^1000:/m));
	is("$n $bad $first $last", '1000 0 1 1000', "subscriber $k: PostgreSQL restarted: all 1,000, in order, once");
}

# one cleaner at a time: while one holds the lock, another call does nothing
my $other = DBI->connect('dbi:Pg:host=127.0.0.1;port=' . $pg->port . ';dbname=postgres',
	'postgres', '', { RaiseError => 1, AutoCommit => 0 });
$other->do('SELECT pg_advisory_xact_lock(7310151040527013618)');
is($pg->query("SELECT pgpush.clean(NULL, '1 hour')")->[0][0], undef, 'the cleaner does not run while another one does');
$other->rollback;
is($pg->query("SELECT pgpush.clean(NULL, '1 hour') IS NOT NULL")->[0][0], 1, 'and runs once it is done');

# push_stream_message_ttl: history ends, and the cleaner deletes the rows
post('ttl', 'short lived');
like(http_get('/poll?id=ttl.b5'), qr/1:short lived;/, 'a fresh message is in the history');
like(http_get('/pub?id=ttl'), qr/"stored_messages": 1/, 'the channel keeps it');
unlike(http_get('/authpoll?id=ttl'), qr/^HTTP\/1\.1 403/, 'authorized channels only: it exists');
sleep(9);
like(http_get('/poll?id=ttl.b5'), qr/^HTTP\/1\.1 304/, 'past push_stream_message_ttl it is not');
like(http_get('/pub?id=ttl'), qr/"stored_messages": 0/, 'the channel keeps nothing, at once');
like(http_get('/authpoll?id=ttl'),
	qr/^HTTP\/1\.1 403 .*^X-Nginx-PushStream-Explain: Subscriber could not create channels\.\r$/ms,
	'and, as in push-stream, a channel without messages does not exist for authorized channels only');
my $left;
for (1 .. 40) {
	$left = $pg->query("SELECT count(*) FROM pgpush.messages WHERE channel = 'ttl'")->[0][0];
	last unless $left;
	sleep(0.25);
}
is($left, 0, 'and the cleaner deleted it');

###############################################################################

# a subscriber that resumes while PostgreSQL is down: its history is read once the
# database is back within push_stream_postgres_publish_timeout (5s), and past it the
# subscriber is told of the gap; it is never left with nothing

# (outage2 has had no subscriber: no worker has its messages in the recent-message cache,
# which would answer without the database)
for my $ch (qw/ outage outage2 /) {
	post($ch, "o$_") for 1 .. 3;
}
$pg->halt();
my $early = start_get('/sub?id=outage.b3');
sleep(1);
$pg->restart();
$r = read_for($early, 8, qr/^3:o3\n/m);
like($r, qr/^1:o1\n2:o2\n3:o3\n/m, 'resumed during an outage: the history once the database is back');
unlike($r, qr/^-4:/m, 'and no gap message');
ok($pg->wait_sessions(2), 'reconnected');

$pg->halt();
my $late = start_get('/sub?id=outage2.b3');
$r = read_for($late, 9, qr/^-4:/m);
like($r, qr/^-4:\n/m, 'past the timeout, the resuming subscriber is told of the gap');
unlike($r, qr/^\d+:o/m, 'with no message');
$pg->restart();
ok($pg->wait_sessions(2), 'reconnected again');
post('outage2', 'o4');
like(read_for($late, 5, qr/^4:o4\n/m), qr/^4:o4\n/m, 'and live messages follow');

# a resume of 1,000 messages of 400 bytes (400 KB, more than
# push_stream_subscriber_output_limit's 256 KiB): the history is written as the client
# reads it, and a subscriber that keeps up is not taken for a slow one

$pg->do(q{SELECT pgpush.publish('bulk', 'm' || i || repeat('y', 400)) FROM generate_series(1, 1000) i});
my $bulk = start_get('/sub?id=bulk.b1000');
my @bo = (read_for($bulk, 10, qr/^1000:m1000y+\n/m) =~ /^(\d+):m\d+y+$/mg);
is(join(',', @bo), join(',', 1 .. 1000), 'a 400 KB history reaches a streaming subscriber, whole and in order');
my $bws = PgPush::WS->connect('/ws?id=bulk.b1000');
my $wn = 0;
while (defined(my $p = $bws->payload(5))) {
	last unless $p =~ /^m(\d+)y+$/ && $1 == $wn + 1;
	$wn++;
	last if $wn == 1000;
}
is($wn, 1000, 'and a WebSocket subscriber');
unlike($t->read_file('error.log'), qr/too slow/, 'neither is closed as too slow');

###############################################################################
