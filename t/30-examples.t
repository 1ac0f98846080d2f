#!/usr/bin/perl

# The shipped examples, end to end: nginx-conf/websocket-relay.conf runs as written
# (only its database, port and module path are pointed at the test's), a browser-style
# subscriber on /websocket?id=X gets a NOTIFY on X and a POST to /publisher; and
# scripts/demo --check brings the demo up, checks it and leaves nothing running.

use warnings;
use strict;

use IO::Socket::INET;
use Test::More;
use Time::HiRes qw/ sleep /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush qw/ repo_root /;
use PgPush::PG;
use PgPush::WS;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http/)->plan(7);

my $pg = PgPush::PG->start();
my $root = repo_root();
my $conf = do {
	local $/;
	open my $fh, '<', "$root/nginx-conf/websocket-relay.conf" or die $!;
	<$fh>;
};

# the example as a user would run it, pointed at the test's database and port
my $conninfo = $pg->conninfo;
$conf =~ s/^load_module .*$/%%TEST_GLOBALS%%\ndaemon off;/m or die 'no load_module line';
$conf =~ s/push_stream_postgres ".*?";/push_stream_postgres "$conninfo";/ or die 'no conninfo';
$conf =~ s/^(http \{)$/$1\n    %%TEST_GLOBALS_HTTP%%/m or die 'no http block';
$conf =~ s/worker_connections \d+/worker_connections 1024/;
$t->write_file_expand('nginx.conf', $conf);
$t->run();

ok($pg->wait_sessions(), 'the example connects to PostgreSQL');
my $ws = PgPush::WS->connect('/websocket?id=news');
is($ws->{status}, 101, 'subscribed to /websocket?id=news');
$pg->notify('news', 'hello');
is($ws->payload, 'hello', 'NOTIFY news reached the subscriber');

my $r = http(<<EOR);
POST /publisher?id=news HTTP/1.0
Host: localhost
Content-Length: 10

over http!
EOR
like($r, qr/^HTTP\/1\.1 200.*"channel": "news"/ms, 'POST /publisher answered');
is($ws->payload, 'over http!', 'the published message reached the subscriber');

###############################################################################

SKIP: {
	skip 'the demo runs the distro nginx; checked once', 2
		unless ($ENV{TEST_NGINX_BINARY} // '') eq '/usr/sbin/nginx';

	my $port = free_port();
	my $out = `PGPUSH_DEMO_PORT=$port $root/scripts/demo --check 2>&1`;
	is($?, 0, 'scripts/demo --check passes') or diag($out);
	like($out, qr/nothing left running/, 'the demo cleans up after itself');
}

###############################################################################

sub free_port {
	my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 1,
		ReuseAddr => 1) or die $!;
	return $s->sockport;
}

###############################################################################
