#!/usr/bin/perl

# The message store (push_stream_store_messages on): the pgpush schema is installed on
# connect; a publish goes through pgpush.publish() and answers stored_messages; history
# by .bN backtrack, Last-Event-ID (header or push_stream_last_event_id), and
# If-Modified-Since / If-None-Match, in polling, long-polling, streaming and WebSocket;
# the channel offset is ~id~; a transactional publish from SQL delivers only at commit;
# a subscriber that joins while messages are being published misses none and gets none
# twice; the cleaner keeps at most max_messages_stored_per_channel.

use warnings;
use strict;

use IO::Select;
use IO::Socket::INET;
use Test::More;
use Time::HiRes qw/ sleep time /;
use DBI;
use POSIX ();

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush qw/ publish read_for /;
use PgPush::PG;
use PgPush::WS;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http/)->plan(53);

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
    push_stream_max_messages_stored_per_channel 5;

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location /pub {
            push_stream_publisher admin;
            push_stream_channels_path \$arg_id;
            push_stream_store_messages on;
        }

        location /pubif {
            push_stream_publisher;
            push_stream_channels_path \$arg_id;
            push_stream_store_messages off;
            if (\$arg_store) {
                push_stream_store_messages on;
            }
        }

        location /poll {
            default_type text/plain;
            push_stream_subscriber polling;
            push_stream_channels_path \$arg_id;
            push_stream_message_template "~id~:~text~";
        }

        location /pollpos {
            default_type text/plain;
            push_stream_subscriber polling;
            push_stream_channels_path \$arg_id;
            push_stream_message_template "~epoch~:~id~:~text~;";
        }

        location /poll_args {
            default_type text/plain;
            push_stream_subscriber polling;
            push_stream_channels_path \$arg_id;
            push_stream_message_template "~text~";
            push_stream_last_event_id \$arg_last;
        }

        location /lp {
            push_stream_subscriber long-polling;
            push_stream_channels_path \$arg_id;
            push_stream_message_template "~id~:~text~";
            push_stream_longpolling_connection_ttl 3s;
        }

        location /sub {
            push_stream_subscriber streaming;
            push_stream_channels_path \$arg_id;
            push_stream_header_template "HEADER\\n";
            push_stream_message_template "~channel~:~id~:~text~\\n";
        }

        location /ws {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_message_template "~id~:~text~";
        }
    }
}

EOF

$t->run();
ok($pg->wait_sessions(2), 'side connections');
is($pg->query('SELECT version FROM pgpush.schema_version')->[0][0], 2, 'schema installed, version 2');

sub pub {
	my ($ch, $msg, %h) = @_;
	my $len = length $msg;
	my $extra = join '', map { "$_: $h{$_}\r\n" } sort keys %h;
	return http(<<EOR);
POST /pub?id=$ch HTTP/1.0
Host: localhost
Content-Length: $len
$extra
$msg
EOR
}

sub body { my ($r) = @_; $r =~ s/^.*?\r\n\r\n//s; $r }

sub start_get {
	my ($path, $headers) = @_;
	my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . port(8080)) or die $!;
	$s->syswrite("GET $path HTTP/1.0\r\nHost: localhost\r\n" . ($headers // '') . "\r\n");
	return $s;
}


###############################################################################

# stored_messages grows up to the limit
my @stored = map { body(pub('news', "m$_")) =~ /"stored_messages": (\d+)/ } 1 .. 7;
is("@stored", '1 2 3 4 5 5 5', 'stored_messages counts up to push_stream_max_messages_stored_per_channel');

my $r = http_get('/poll?id=news.b2');
like($r, qr/^HTTP\/1\.1 200/, 'polling with a backtrack: 200');
is(body($r), '6:m67:m7', 'the last two messages, ~id~ is the channel offset');
like($r, qr/^Etag: W\/\d+\r$/m, 'Etag: the tag of the last one');
like($r, qr/^Last-Modified: \w{3}, /m, 'Last-Modified: its time');

$r = http_get('/poll?id=news.b10');
is(body($r), '3:m34:m45:m56:m67:m7', 'a backtrack past the kept messages gives the kept ones');

$r = http_get('/poll?id=news');
like($r, qr/^HTTP\/1\.1 304/, 'polling without a position: 304');
unlike($r, qr/^Etag/m, 'with no Etag');

pub('ev', 'e1', 'Event-Id' => 'event 1');
pub('ev', 'e2', 'Event-Id' => 'event 2');
pub('ev', 'e3');
pub('ev', 'e4', 'Event-Id' => 'event 3');
$r = http(<<EOR);
GET /poll?id=ev HTTP/1.0
Host: localhost
Last-Event-ID: event 2

EOR
is(body($r), '3:e34:e4', 'Last-Event-ID: the messages after that event');
is(body(http_get('/poll_args?id=ev&last=event%202')), 'e3e4', 'push_stream_last_event_id');
like(http(<<EOR), qr/^HTTP\/1\.1 304/, 'an unknown event id: nothing old');
GET /poll?id=ev HTTP/1.0
Host: localhost
Last-Event-ID: nope

EOR

$r = http(<<EOR);
GET /poll?id=ev&callback=cb HTTP/1.0
Host: localhost
If-Modified-Since: Thu, 01 Jan 1970 00:00:00 GMT

EOR
is(body($r), 'cb([1:e1,2:e2,3:e3,4:e4]);', 'If-Modified-Since: every kept message, JSONP grouped');

# If-None-Match unties messages of the same second
my ($lm, $etag) = ($r =~ /^Last-Modified: (.*?)\r$/m, $r =~ /^Etag: W\/(\d+)\r$/m);
$r = http(<<EOR);
GET /poll?id=ev HTTP/1.0
Host: localhost
If-Modified-Since: $lm
If-None-Match: W/$etag

EOR
like($r, qr/^HTTP\/1\.1 304/, 'the position of the last message: nothing new');
pub('ev', 'e5');
$r = http(<<EOR);
GET /poll?id=ev HTTP/1.0
Host: localhost
If-Modified-Since: $lm
If-None-Match: W/$etag

EOR
is(body($r), '5:e5', 'one newer message: that one');

# a position older than every kept message, when older ones are gone: the gap message
# first (id -4, event type gap), and X-Pgpush-Gap on a polling answer
pub('trim', "t$_") for 1 .. 8;
$r = http(<<EOR);
GET /poll?id=trim HTTP/1.0
Host: localhost
If-Modified-Since: Thu, 01 Jan 1970 00:00:00 GMT

EOR
is(body($r), '-4:4:t45:t56:t67:t78:t8', 'a position before the deleted messages: the gap message, then what is kept');
like($r, qr/^X-Pgpush-Gap: 1\r$/m, 'and X-Pgpush-Gap');
unlike(http(<<EOR), qr/-4:|X-Pgpush-Gap/, 'a position inside what is kept: no gap');
GET /poll?id=trim.b2 HTTP/1.0
Host: localhost

EOR

# long-polling: the history answers at once; without one it waits for the next
$r = read_for(start_get('/lp?id=news.b1'), 3);
like($r, qr/^HTTP\/1\.1 200/, 'long-polling with a backtrack: answered at once');
is(body($r), '7:m7', 'with the last message');
my $s = start_get('/lp?id=news', "If-Modified-Since: " . ($r =~ /^Last-Modified: (.*?)\r$/m)[0]
	. "\r\nIf-None-Match: " . ($r =~ /^Etag: (.*?)\r$/m)[0] . "\r\n");
sleep(0.5);
pub('news', 'm8');
$r = read_for($s, 3);
is(body($r), '8:m8', 'long-polling from the last position waits for the next message');

# streaming: the header, the history in path order, then live messages
pub('a', "a$_") for 1 .. 3;
pub('b', "b$_") for 1 .. 3;
$s = start_get('/sub?id=x/a.b5/b.b2');
sleep(0.8);
pub('b', 'live');
$r = read_for($s, 1.5);
my @lines = grep { length } split /\n/, (split /\r\n\r\n/, $r, 2)[1] // '';
@lines = map { s/^[0-9a-f]+\r$//r } @lines;
@lines = grep { length && !/^\r?$/ } @lines;
is(join(' ', @lines), 'HEADER a:1:a1 a:2:a2 a:3:a3 b:2:b2 b:3:b3 b:4:live',
	'streaming: header, history per channel in path order, then live');

# WebSocket: .bN in the channels path
my $ws = PgPush::WS->connect('/ws?id=a.b2');
my @got;
push @got, $ws->payload(3) for 1 .. 2;
is("@got", '2:a2 3:a3', 'WebSocket: the backtrack');
pub('a', 'a4');
is($ws->payload(3), '4:a4', 'then live messages');

# transactional publish from SQL: nothing before commit, nothing after a rollback
my $dbh = $pg->dbh;
$dbh->begin_work;
$dbh->do("SELECT pgpush.publish('a', 'rolled back')");
$dbh->rollback;
$dbh->begin_work;
$dbh->do("SELECT pgpush.publish('a', 'committed', 'ev-9', 'kind')");
is($ws->payload(0.5), undef, 'nothing is delivered before the commit');
$dbh->commit;
is($ws->payload(3), '5:committed', 'the commit delivers once, after the rolled back offset was never taken');
is($ws->payload(0.5), undef, 'and only once');
is($pg->query("SELECT event_id, event_type FROM pgpush.messages WHERE channel = 'a' AND \"offset\" = 5")->[0][1],
	'kind', 'the event id and type are stored');

# binary payloads from SQL reach a WebSocket client as a binary frame
$dbh->do("SELECT pgpush.publish('a', '\\x00ff01'::bytea)");
my $f = $ws->read_message(3);
is($f && $f->{opcode}, 2, 'a bytea message is a binary frame');

# joining while another session publishes: no message missed, none twice
my $pid = fork();
if ($pid == 0) {
	my $p = DBI->connect('dbi:Pg:host=127.0.0.1;port=' . $pg->port . ';dbname=postgres',
		'postgres', '', { RaiseError => 1, AutoCommit => 1 });
	# spread over about a second, so that the subscriber joins mid-stream
	for (1 .. 200) {
		$p->do("SELECT pgpush.publish('race', ?)", undef, "r$_");
		select(undef, undef, undef, 0.004);
	}
	$p->disconnect;
	POSIX::_exit(0);
}
sleep(0.05);
my $race = start_get('/sub?id=race.b5');
waitpid($pid, 0);
$r = read_for($race, 2);
my @ids = ($r =~ /^race:(\d+):/mg);
my $gaps = grep { $ids[$_] != $ids[$_ - 1] + 1 } 1 .. $#ids;
ok(@ids > 5, 'a subscriber joining mid-stream gets messages (' . scalar(@ids) . ')');
is($gaps, 0, 'offsets are consecutive: no gap, no duplicate') or diag("@ids");
is($ids[-1], 200, 'up to the last one');

# push_stream_store_messages set in an if block of a publisher location
like(http("POST /pubif?id=ifstore HTTP/1.0\r\nHost: localhost\r\nContent-Length: 1\r\n\r\na"),
	qr/"stored_messages": 0/, 'a publisher location that does not store');
like(http("POST /pubif?id=ifstore&store=1 HTTP/1.0\r\nHost: localhost\r\nContent-Length: 1\r\n\r\nb"),
	qr/"published_messages": 2, "stored_messages": 1/, 'its if block, which does');

# the cleaner keeps at most max_messages_stored_per_channel rows per channel
my $kept;
for (1 .. 60) {
	$kept = $pg->query("SELECT count(*) FROM pgpush.messages WHERE channel = 'race'")->[0][0];
	last if $kept <= 5;
	sleep(0.25);
}
cmp_ok($kept, '<=', 5, 'the cleaner deletes what is over the limit');

# statistics report what is stored
like(http_get('/pub?id=news'), qr/"stored_messages": 5/, 'channel info: stored_messages');

# an admin DELETE forgets the channel's history: offsets start again from 1
like(http("DELETE /pub?id=news HTTP/1.0\nHost: localhost\n\n"), qr/^HTTP\/1\.1 200/, 'DELETE');
# the history is gone once DELETE answers; a worker forgets what it cached when the
# deletion reaches it, as a message does (through PostgreSQL), so a poll may still see it
# for that moment
my $after;
for (1 .. 20) {
	$after = http_get('/poll?id=news.b5');
	last if $after =~ /^HTTP\/1\.1 304/;
	select(undef, undef, undef, 0.1);
}
like($after, qr/^HTTP\/1\.1 304/, 'a deleted channel has no history');
is($pg->query("SELECT count(*) FROM pgpush.messages WHERE channel = 'news'")->[0][0], 0,
	'and no rows');
pub('news', 'again');
is(body(http_get('/poll?id=news.b5')), '1:again', 'and numbers its messages from 1 again');

# a position (epoch, offset), ~epoch~:~id~ in a template, resumes as Last-Event-ID
pub('pos', $_) for qw/a b c/;
my ($epoch) = body(http_get('/pollpos?id=pos.b3')) =~ /^(\d+):1:a;/;
ok($epoch, '~epoch~ is the channel\'s epoch');
sub from_position {
	my ($ch, $position) = @_;
	return http("GET /pollpos?id=$ch HTTP/1.0\r\nHost: localhost\r\nLast-Event-ID: $position\r\n\r\n");
}
is(body(from_position('pos', "$epoch:1")), "$epoch:2:b;$epoch:3:c;", 'Last-Event-ID EPOCH:OFFSET: what follows it');
like(from_position('pos', "$epoch:3"), qr/^HTTP\/1\.1 304/, 'nothing after the newest');
my $other = from_position('pos', ($epoch - 1) . ':1');
like($other, qr/^X-Pgpush-Gap: 1\r$/m, 'a position of another epoch: told it is a gap');
is(body($other), "$epoch:-4:;$epoch:1:a;$epoch:2:b;$epoch:3:c;", 'then the whole history of this epoch');
like(http("DELETE /pub?id=pos HTTP/1.0\nHost: localhost\n\n"), qr/^HTTP\/1\.1 200/, 'DELETE resets the history');
pub('pos', 'new');
my $reset = from_position('pos', "$epoch:3");
my ($new) = body($reset) =~ /^(\d+):-4:;/;
ok($new && $new != $epoch, 'an old position after a reset: a gap, in the new epoch');
is(body($reset), "$new:-4:;$new:1:new;", 'then what the new epoch has');
# an event id that is not kept on a channel that lost messages may have been one of them
my $unknown = http("GET /poll?id=race HTTP/1.0\r\nHost: localhost\r\nLast-Event-ID: nope\r\n\r\n");
is(body($unknown), '-4:', 'an unknown event id where messages were deleted: the gap alone');

# a channel this worker delivers: resumes are answered from its recent messages
my $hot = start_get('/sub?id=hot');
sleep(0.5);
pub('hot', "h$_", 'Event-Id' => "hot $_") for 1 .. 6;
read_for($hot, 1, qr/hot:6:/);
my @answers;
for (1 .. 10) {
	push @answers, body(http_get('/poll?id=hot.b3'));
	push @answers, body(http("GET /poll?id=hot HTTP/1.0\nHost: localhost\nLast-Event-ID: hot 4\n\n"));
}
my %distinct = map { $_ => 1 } @answers;
is(join(' | ', sort keys %distinct), '4:h45:h56:h6 | 5:h56:h6',
	'resumes on a live channel: the same answers, whichever worker or source');

# a schema of an older version is upgraded when the side connections come back
$pg->do('UPDATE pgpush.schema_version SET version = 1');
$pg->do('DROP FUNCTION pgpush.reset(text)');
$pg->terminate_sessions();
my $upgraded = '';
for (1 .. 50) {
	$upgraded = $pg->query("SELECT (SELECT max(version) FROM pgpush.schema_version) || ' '
		|| (to_regprocedure('pgpush.reset(text)') IS NOT NULL)")->[0][0];
	last if $upgraded eq '2 true';
	sleep(0.1);
}
is($upgraded, '2 true', 'an older schema is upgraded on reconnect');
$t->stop();
my @cached = $t->read_file('error.log') =~ /store: (\d+) of \d+ resumes answered from the recent-message cache/g;
my $hits = 0;
$hits += $_ for @cached;
cmp_ok($hits, '>=', 1, "the recent-message cache answered some ($hits)");

###############################################################################
