#!/usr/bin/perl

# The side connection: each worker holds exactly one PostgreSQL connection, opened in the
# worker (never in the master), that survives a database restart and a terminated backend,
# that retries while the database is down at startup without keeping nginx from serving,
# and that is closed cleanly when nginx stops. Every state change is logged once, without
# the password.

use warnings;
use strict;

use Test::More;
use Time::HiRes qw/ sleep /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush qw/ wait_log /;
use PgPush::PG;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http/)->plan(12);

my $pg = PgPush::PG->start();
my $conninfo = $pg->conninfo . ' password=hunter2';

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

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location / {
            return 200 "plain\\n";
        }
    }
}

EOF

$t->run();

ok($pg->wait_sessions(2), 'one side connection per worker');
like($t->read_file('error.log'), qr/\[notice\].*pgpush: connected to postgres postgres\@127\.0\.0\.1:\d+\/postgres/,
	'connection logged');

# the database restarts under the workers
$pg->restart();
ok(wait_log($t, qr/reconnected to postgres/, 2), 'both workers reconnected after a restart');
ok($pg->wait_sessions(2), 'two side connections again');
my $log = $t->read_file('error.log');
my @lost = $log =~ /\[error\].*pgpush: connection to postgres .* lost/g;
is(scalar @lost, 2, 'the loss is logged once per worker');

# an administrator kills the backends
$pg->terminate_sessions();
ok(wait_log($t, qr/reconnected to postgres/, 4), 'reconnected after pg_terminate_backend');
ok($pg->wait_sessions(2), 'two side connections after termination');

like(http_get('/'), qr/200 OK/, 'nginx served throughout');

# stop nginx: the connections are closed, not dropped
$t->stop();
ok($pg->wait_sessions(0), 'connections closed at shutdown');
unlike($t->read_file('error.log'), qr/hunter2/, 'password never logged');

###############################################################################

# The database is down when nginx starts: nginx serves, and connects once it is up.

$pg->halt();

$t->write_file('error.log', '');
$t->run();
like(http_get('/'), qr/200 OK/, 'serves while the database is down');
$pg->restart();
ok($pg->wait_sessions(2), 'connected once the database came up');

###############################################################################
