#!/usr/bin/perl

# nginx-conf/seed-recipe.conf, run as written (only its database, ports and module path
# are pointed at the test's): both variants of the recipe work end to end. A client of
# /websocket?id=X gets what is published on X, its messages are published to X, and the
# SQL hook's `select now()` answers it alone; a client of /websocket-http runs the HTTP
# hooks against an application; the local publisher answers a header-only 200. No
# directive of the recipe is reported as without effect.

use warnings;
use strict;

use Test::More;
use Time::HiRes qw/ sleep /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush qw/ repo_root /;
use PgPush::App;
use PgPush::PG;
use PgPush::WS;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http proxy/)->plan(14);

my $pg = PgPush::PG->start();
my $root = repo_root();
my $conf = do {
	local $/;
	open my $fh, '<', "$root/nginx-conf/seed-recipe.conf" or die $!;
	<$fh>;
};

my $conninfo = $pg->conninfo;
my $app = Test::Nginx::port(8081);
$conf =~ s/^load_module .*$/%%TEST_GLOBALS%%\ndaemon off;/m or die 'no load_module line';
$conf =~ s/push_stream_postgres ".*?";/push_stream_postgres "$conninfo";/ or die 'no conninfo';
$conf =~ s/^(http \{)$/$1\n    %%TEST_GLOBALS_HTTP%%/m or die 'no http block';
$conf =~ s/worker_connections \d+/worker_connections 1024/;
$conf =~ s/127\.0\.0\.1:3000/127.0.0.1:$app/g or die 'no application';
$t->write_file_expand('nginx.conf', $conf);

my $rec = PgPush::App->start($t, 8081, sub { $_[1] =~ m!^/publish! ? "app says: $_[2]" : '' });
$t->run();

sub calls { $rec->wait(@_) }

ok($pg->wait_sessions(), 'the recipe connects to PostgreSQL');
unlike($t->read_file('error.log'), qr/has no effect/, 'every directive of the recipe has its effect');

###############################################################################

# variant 1: native SQL hooks

my $ws = PgPush::WS->connect('/websocket?id=chat');
is($ws->{status}, 101, 'subscribed to /websocket?id=chat');
my $peer = PgPush::WS->connect('/websocket?id=chat');
$pg->notify('chat', 'from sql');
is($ws->payload, 'from sql', 'NOTIFY chat reaches the subscriber');
$peer->payload;

$ws->send_text('hi all');
my @got = map { $ws->payload // 'none' } 1 .. 2;
is(join(',', grep { $_ eq 'hi all' } @got), 'hi all', 'the message is published to the channel');
like(join(',', grep { $_ ne 'hi all' } @got), qr/^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/,
	'"select now()" answers the sender');
is($peer->payload, 'hi all', 'the other subscriber gets the message');
is($peer->payload(1), undef, 'and not the answer');

my $r = http(<<EOR);
POST /publisher?id=chat HTTP/1.0
Host: localhost
Content-Length: 5

hello
EOR
like($r, qr/^HTTP\/1\.1 200 /, 'the publisher answers 200');
unlike($r, qr/"channel"/, 'without the channel info (channel_info_on_publish off)');
is($ws->payload, 'hello', 'and the message is delivered');

###############################################################################

# variant 2: the fork's HTTP hooks to the application

my $h = PgPush::WS->connect('/websocket-http?id=room');
ok(calls(qr{^GET /subscribe\?id=room }, 1), 'the application hears of the subscriber');
$h->send_text('ping app');
@got = map { $h->payload // 'none' } 1 .. 2;
is(join(',', sort @got), 'app says: ping app,ping app', 'the application answers the sender');
$h->close(1000);
ok(calls(qr{^GET /unsubscribe\?id=room }, 1), 'the application hears it leave');

###############################################################################
