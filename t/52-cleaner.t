#!/usr/bin/perl

# The store's cleaner across nginx nodes: every worker of every node sharing a database
# runs the cleaner on its schedule, and one PostgreSQL advisory lock makes them take turns,
# so that while one cleaner runs (here, while the test holds the lock) no other deletes
# anything; once the lock is free, the next one deletes what is past
# push_stream_message_ttl. (t/50 checks push_stream_max_messages_stored_per_channel.)

use warnings;
use strict;

use DBI;
use Test::More;
use Time::HiRes qw/ sleep time /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush::PG;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http/)->plan(9);

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
    push_stream_message_ttl 2s;

    server {
        listen       127.0.0.1:PORT;
        server_name  localhost;

        location /pub {
            push_stream_publisher admin;
            push_stream_channels_path \$arg_id;
            push_stream_store_messages on;
        }
    }
}

EOF

(my $one = $conf) =~ s/PORT/8080/;
$t->write_file_expand('nginx.conf', $one);
$t->run();

my $t2 = Test::Nginx->new();
(my $two = $conf) =~ s/PORT/8081/;
$t2->write_file_expand('nginx.conf', $two);
$t2->run();
ok($pg->wait_sessions(4), 'two nodes, two workers each, four side connections');

###############################################################################

sub post {
	my ($port, $id, $body) = @_;
	return http("POST /pub?id=$id HTTP/1.0\r\nHost: localhost\r\n"
		. "Content-Length: " . length($body) . "\r\n\r\n$body",
		PeerAddr => '127.0.0.1:' . port($port));
}

sub stored {
	my ($id) = @_;
	return $pg->query('SELECT count(*) FROM pgpush.messages WHERE channel = ?', $id)->[0][0];
}

# the cleaner's lock, held by another session as by a cleaner that takes its time
my $lock = DBI->connect('dbi:Pg:host=127.0.0.1;port=' . $pg->port . ';dbname=postgres',
	'postgres', '', { RaiseError => 1, PrintError => 0, AutoCommit => 1 });
$lock->do('SELECT pg_advisory_lock(7310151040527013618)');

$pg->mark();
my $published = time;
my $ok = 1;
for my $n (1 .. 6) {
	$ok &&= post(8080, 'one', "one $n") =~ /^HTTP\/1\.1 200/;
	$ok &&= post(8081, 'two', "two $n") =~ /^HTTP\/1\.1 200/;
}
ok($ok, 'six messages published on each node');
is(stored('one') . ' ' . stored('two'), '6 6', 'each channel stores them');

# every worker of both nodes tries, each on its own schedule (every 2 s here)
ok($pg->wait_query(qr/"pgpush"\.clean\(/, 4, 10), 'the four workers of both nodes try to clean');
sleep($published + 2.5 - time) if $published + 2.5 > time;
$pg->mark();
ok($pg->wait_query(qr/"pgpush"\.clean\(/, 2, 10), 'and try again once the messages are past the ttl');
is(stored('one') . ' ' . stored('two'), '6 6',
	'but delete nothing while another cleaner holds the lock');

$lock->do('SELECT pg_advisory_unlock(7310151040527013618)');
my $left;
for (1 .. 60) {
	$left = stored('one') + stored('two');
	last unless $left;
	sleep(0.1);
}
is($left, 0, 'once the lock is free, the next cleaner deletes them');

###############################################################################
