#!/usr/bin/perl

# The native SQL hooks (push_stream_postgres_on_subscribe, _on_unsubscribe, _on_publish):
# bound parameters ($1 channel id, $2 message, $3... values with variables taken on the
# subscriber's request), one call per channel, in order per subscriber; the first column
# of on_publish's rows goes back to the sender only (text, bytea as binary, NULL skipped);
# an SQL error is logged with its SQLSTATE and keeps the client; a statement that does not
# prepare is logged once; a slow hook does not hold up notifications; hooks wait for a
# database that is down and run after the reconnect; every subscriber's unsubscribe hook
# runs, after a close frame, a TCP reset, and on reload; hostile values are bound, never
# spliced.

use warnings;
use strict;

use Test::More;
use Time::HiRes qw/ sleep time /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush qw/ wait_log /;
use PgPush::PG;
use PgPush::WS;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http/)->plan(34);

my $pg = PgPush::PG->start();
my $conninfo = $pg->conninfo;
$pg->do(q{CREATE TABLE hook_log (n serial, kind text, channel text, message text,
	extra text, extra2 text)});

$t->write_file_expand('nginx.conf', <<"EOF");

%%TEST_GLOBALS%%

daemon off;
worker_processes 1;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    push_stream_postgres "$conninfo";
    push_stream_postgres_reconnect 50ms 200ms;
    push_stream_postgres_channel_prefix "app_";

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location /ws {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_postgres_on_subscribe
                "insert into hook_log (kind, channel, message, extra, extra2)
                 values ('sub', \$1, \$2, \$3, \$4)" \$remote_addr \$arg_user;
            push_stream_postgres_on_unsubscribe
                "insert into hook_log (kind, channel, message, extra)
                 values ('unsub', \$1, \$2, \$3)" \$arg_user;
            push_stream_postgres_on_publish
                "insert into hook_log (kind, channel, message, extra)
                 values ('pub', \$1, \$2, \$3) returning 'got ' || \$2" \$arg_user;
        }

        location /rows {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_postgres_on_publish
                "select x from (values ('one'::text), (null), ('three')) v(x)
                 union all select now()::text where \$2 = 'now'";
        }

        location /bytes {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_postgres_on_publish "select \$2::bytea";
        }

        location /now {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_postgres_on_publish "select now()";
        }

        location /len {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_postgres_on_publish "select length(\$2)";
        }

        location /error {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_postgres_on_publish "select 1 / (length(\$2) - length(\$2))";
        }

        location /unprepared {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_postgres_on_publish "select * from no_such_table";
        }

        location /slow {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_postgres_on_publish "select pg_sleep(2)::text";
        }
    }
}

EOF

$t->run();
ok($pg->wait_sessions(2), 'a side connection and a hook connection');

sub rows {
	my ($sql, @bind) = @_;
	return $pg->query($sql, @bind);
}

# Waits until $sql returns $n rows; returns them.
sub wait_rows {
	my ($n, $sql, @bind) = @_;
	my $r;
	for (1 .. 50) {
		$r = rows($sql, @bind);
		return $r if @$r >= $n;
		sleep(0.1);
	}
	diag('rows: ' . join(' | ', map { join ',', map { $_ // 'NULL' } @$_ } @$r));
	return $r;
}

###############################################################################

# subscribe: once per channel, with the id as the client named it and the values taken on
# its request; publish: the sender only gets the rows; unsubscribe with the kept values

my $ws = PgPush::WS->connect('/ws?id=news/sport&user=alice');
is($ws->{status}, 101, 'subscribed');
my $other = PgPush::WS->connect('/ws?id=news&user=bob');
my $r = wait_rows(3, q{SELECT channel, message, extra, extra2 FROM hook_log
	WHERE kind = 'sub' ORDER BY n});
is(join(';', map { join ',', map { $_ // 'NULL' } @$_ } @$r),
	'news,NULL,127.0.0.1,alice;sport,NULL,127.0.0.1,alice;news,NULL,127.0.0.1,bob',
	'on_subscribe: once per channel, $1 the id without the prefix, $2 NULL, $3 $4 from the request');

$ws->send_text('hello');
is(join(',', map { $ws->payload // 'none' } 1 .. 2), 'got hello,got hello',
	'on_publish rows come back to the sender, once per channel');
is($other->payload(1), undef, 'and to nobody else');
$r = wait_rows(2, q{SELECT channel, message, extra FROM hook_log WHERE kind = 'pub' ORDER BY n});
is(join(';', map { join ',', @$_ } @$r), 'news,hello,alice;sport,hello,alice',
	'on_publish gets the message and the subscriber\'s values');

$ws->close(1000);
$r = wait_rows(2, q{SELECT channel, message, extra FROM hook_log WHERE kind = 'unsub' ORDER BY n});
is(join(';', map { join ',', map { $_ // 'NULL' } @$_ } @$r), 'news,NULL,alice;sport,NULL,alice',
	'on_unsubscribe after a close frame, with the values kept from subscribe time');
$r = rows(q{SELECT kind FROM hook_log WHERE 'alice' IN (extra, extra2) ORDER BY n});
is(join(',', map { $_->[0] } @$r), 'sub,sub,pub,pub,unsub,unsub', 'in order for one subscriber');

# an abrupt TCP close runs it too
$other->{sock}->close();
$r = wait_rows(1, q{SELECT channel FROM hook_log WHERE kind = 'unsub' AND extra = 'bob'});
is(scalar @$r, 1, 'on_unsubscribe after a TCP close without a close frame');

###############################################################################

# results: rows in order, NULL skipped; bytea as a binary frame; now() as PostgreSQL prints it

my $rows = PgPush::WS->connect('/rows?id=r');
$rows->send_text('x');
is(join(',', map { $rows->payload // 'none' } 1 .. 2), 'one,three', 'one frame per row, NULL skipped');
$rows->send_text('now');
my @got = map { $rows->payload // 'none' } 1 .. 3;
like($got[2], qr/^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/, 'a row computed from the message');

my $bytes = PgPush::WS->connect('/bytes?id=b');
$bytes->send_binary("\x00\xff\x1b'");
my $m = $bytes->read_message(3);
is($m->{opcode}, 2, 'bytea comes back as a binary frame');
is($m->{payload}, "\x00\xff\x1b'", 'a binary message reaches $2 as bytea text, byte-exact');

my $now = PgPush::WS->connect('/now?id=n');
$now->send_text('what time is it');
like($now->payload, qr/^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?\+00$/,
	'the recipe\'s "select now()" answers a timestamptz as text');

###############################################################################

# hostile values are bound: quotes, semicolons, a hostile channel id, 1 MB

my $hostile = q{'); DROP TABLE hook_log; --"};
my $h = PgPush::WS->connect('/ws?id=' . 'a%27b%22%3Bc' . '&user=' . "x%27%3B");
$h->send_text($hostile);
is($h->payload, "got $hostile", 'a hostile message is a value');
$r = wait_rows(1, q{SELECT channel, message, extra FROM hook_log WHERE kind = 'pub' AND channel = 'a''b";c'});
# (\$arg_ is the raw argument, as nginx gives it)
is(join(',', @{ $r->[0] // [] }), qq{a'b";c,$hostile,x%27%3B}, 'hostile id, message and value stored as they are');
my $len = PgPush::WS->connect('/len?id=l');
$len->send_text('y' x (1024 * 1024 - 64));
is($len->payload(5), 1024 * 1024 - 64, 'a message of 1 MB is bound whole');
# a NUL cannot be in a text parameter: PostgreSQL's own error, logged; the client stays
$len->send_text("a\x00b");
ok(wait_log($t, qr/\[error\].*on_publish failed for channel "l": SQLSTATE 22021/, 1),
	'a text message holding a NUL is refused by PostgreSQL with SQLSTATE 22021, logged');
$len->send_text('after');
is($len->payload(5), 5, 'and the client stays');

###############################################################################

# an SQL error is logged with its SQLSTATE and the client stays; a statement that does not
# prepare is logged once

my $err = PgPush::WS->connect('/error?id=e');
$err->send_text('boom');
ok(wait_log($t, qr/\[error\].*push_stream_postgres_on_publish failed for channel "e": SQLSTATE 22012: division by zero/, 1),
	'an SQL error is logged with SQLSTATE, the hook and the channel');
$err->ping('alive');
$m = $err->read_message(3);
is($m->{opcode}, 10, 'the client stays connected');

my $bad = PgPush::WS->connect('/unprepared?id=u');
$bad->send_text("m$_") for 1 .. 3;
$bad->ping('sync');
$bad->read_message(3);
ok(wait_log($t, qr/SQLSTATE 42P01/, 1), 'a statement that does not prepare is logged');
sleep(0.5);
my @lines = $t->read_file('error.log') =~ /SQLSTATE 42P01/g;
is(scalar @lines, 1, 'once per connection, not once per message');

###############################################################################

# a 2 s hook does not hold up notifications

my $slow = PgPush::WS->connect('/slow?id=s');
my $listener = PgPush::WS->connect('/ws?id=fast&user=carol');
$slow->send_text('sleep');
sleep(0.2);
my $start = time;
$pg->notify('app_fast', 'quick');
is($listener->payload(3), 'quick', 'a notification arrives while a hook sleeps');
my $delay = time - $start;
cmp_ok($delay, '<', 1, 'without waiting for the hook');
diag(sprintf('notification delivered in %.1f ms while a hook ran pg_sleep(2)', $delay * 1000));
is($slow->payload(4), '', 'the slow hook answers in its time');

###############################################################################

# the database is down: hooks wait and run after the reconnect

$pg->halt();
ok(wait_log($t, qr/lost: .*reconnecting/, 1), 'the side connection noticed the database is gone');
my $late = PgPush::WS->connect('/ws?id=late&user=dave');
is($late->{status}, 101, 'a subscriber is accepted while the database is down');
$late->send_text('queued');
sleep(0.3);
$pg->restart();
$r = wait_rows(2, q{SELECT kind, message FROM hook_log WHERE 'dave' IN (extra, extra2) ORDER BY n});
is(join(';', map { join ',', map { $_ // 'NULL' } @$_ } @$r), 'sub,NULL;pub,queued',
	'its hooks ran after the reconnect, in order');
is(join(',', grep { $_ ne '' } map { $late->payload(3) // 'none' } 1 .. 2), 'got queued',
	'and the publish rows came back');

###############################################################################

# reload: every subscriber's unsubscribe hook runs before the old worker exits

my @subs = map { PgPush::WS->connect("/ws?id=reload&user=r$_") } 1 .. 3;
wait_rows(3, q{SELECT 1 FROM hook_log WHERE kind = 'sub' AND channel = 'reload'});
$t->reload();
$r = wait_rows(3, q{SELECT extra FROM hook_log WHERE kind = 'unsub' AND channel = 'reload' ORDER BY extra});
is(join(',', map { $_->[0] } @$r), 'r1,r2,r3', 'reload: every subscriber\'s unsubscribe hook ran');
ok(wait_log($t, qr/gracefully shutting down/, 1), 'the old worker shut down');
undef @subs;

# quit
$late->payload(1);
$t->stop();
$r = wait_rows(1, q{SELECT 1 FROM hook_log WHERE kind = 'unsub' AND extra = 'dave'});
is(scalar @$r, 1, 'quit: the unsubscribe hook ran');
unlike($t->read_file('error.log'), qr/has no effect/, 'no SQL hook directive is reported as without effect');

###############################################################################
