#!/usr/bin/perl

# Counts across a reload: the old workers end their subscribers' streams as push-stream
# does (footer and end of stream; WebSocket close 1001), new subscribers are served and
# counted by the new workers, and the node's statistics converge to the truth within 5 s,
# while publishing goes on.

use warnings;
use strict;

use IO::Select;
use IO::Socket::INET;
use JSON::PP;
use Test::More;
use Time::HiRes qw/ sleep time /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush qw/ publish /;
use PgPush::PG;
use PgPush::WS;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http/)->plan(19);

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

    server {
        listen       127.0.0.1:8080 reuseport;
        server_name  localhost;

        location /ws {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
        }

        location /sub {
            push_stream_subscriber;
            push_stream_channels_path \$arg_id;
            push_stream_footer_template "FOOTER";
        }

        location /lp {
            push_stream_subscriber long-polling;
            push_stream_channels_path \$arg_id;
            push_stream_longpolling_connection_ttl 60s;
        }

        location /pub {
            push_stream_publisher;
            push_stream_channels_path \$arg_id;
        }

        location /stats {
            push_stream_channels_statistics;
            push_stream_channels_path \$arg_id;
        }
    }
}

EOF

$t->run();
ok($pg->wait_sessions(2), 'a side connection per worker');

sub summary {
	my $r = http_get('/stats');
	return decode_json((split /\r\n\r\n/, $r, 2)[1] // '{}');
}

sub wait_count {
	my ($n) = @_;
	my $got;
	my $deadline = time + 5;
	while (time < $deadline) {
		$got = summary()->{subscribers} // -1;
		return $got if $got == $n;
		sleep 0.1;
	}
	return $got;
}

sub stream {
	my ($uri) = @_;
	my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . port(8080)) or die "$!\n";
	$s->syswrite("GET $uri HTTP/1.1\r\nHost: localhost\r\n\r\n");
	return $s;
}

sub read_all {
	my ($s, $timeout) = @_;
	my $buf = '';
	my $deadline = time + $timeout;
	while (time < $deadline) {
		last unless IO::Select->new($s)->can_read($deadline - time);
		$s->sysread($buf, 65536, length $buf) or last;
	}
	return $buf;
}

# a long-poll admitted on a new channel (its worker's LISTEN may still be in flight: the
# publish waits for it)
# gets a message published right then, from either worker
my $got = 0;
for my $k (1 .. 20) {
	my $lp = stream("/lp?id=fresh$k");
	for (1 .. 100) {
		last if http_get("/stats?id=fresh$k") =~ /"subscribers": 1/;
		sleep 0.005;
	}
	publish("fresh$k", "m$k");
	my ($buf, $end) = ('', time + 3);
	while ($buf !~ /m$k/ && time < $end) {
		last unless IO::Select->new($lp)->can_read($end - time);
		$lp->sysread($buf, 4096, length $buf) or last;
	}
	$got++ if $buf =~ /m$k/;
}
is($got, 20, 'a long-poll admitted on a new channel gets what is published right after, from either worker');

my @ws = map { PgPush::WS->connect("/ws?id=r$_") } 1 .. 20;
my @st = map { stream("/sub?id=r$_") } 1 .. 5;
is(wait_count(25), 25, '25 subscribers before the reload');
my @old = map { $_->{pid} } @{summary()->{by_worker}};

# publishing goes on during the reload
my $pid = fork() // die "fork: $!\n";
if ($pid == 0) {
	my $end = time + 3;
	publish('r1', 'during') while time < $end;
	exit 0;
}

$t->reload();

my %seen;
for my $w (@ws) {
	my $code;
	while (my $m = $w->read_message(5)) {
		next unless $m->{opcode} == 8;
		($code) = PgPush::WS->close_status($m);
		last;
	}
	$seen{$code // 'none'}++;
}
is(join(',', map { "$_=$seen{$_}" } sort keys %seen), '1001=20', 'every WebSocket subscriber is closed with 1001');
my @ends = map { read_all($_, 5) } @st;
is(scalar(grep { /FOOTER\r\n0\r\n\r\n$/ } @ends), 5, 'every stream ends with its footer and the last chunk');

is(wait_count(0), 0, 'the count converges to zero');
my @fresh = map { PgPush::WS->connect("/ws?id=n$_") } 1 .. 7;
is(scalar(grep { $_->{status} == 101 } @fresh), 7, 'new subscribers are served');
is(wait_count(7), 7, 'and counted');
my @now = map { $_->{pid} } @{summary()->{by_worker}};
my %was = map { $_ => 1 } @old;
ok(@now == 2 && !grep({ $was{$_} } @now), 'by_worker lists the two new workers only');

waitpid($pid, 0);
publish('n1', 'after');
is($fresh[0]->payload, 'after', 'delivery works after the reload');
my $stats = summary();
ok($stats->{published_messages} > 1, 'published messages survive the reload');
my $sum = 0;
$sum += $_->{subscribers} for @{$stats->{by_worker}};
is($sum, 7, 'by_worker adds up');
is($t->read_file('error.log') =~ /\[alert\]/ ? 'alert' : 'none', 'none', 'no alert');

# a reload that changes the zone's size keeps the running zone, and its counts, as
# push-stream does
my $published = summary()->{published_messages};
my $conf = $t->read_file('nginx.conf');
$conf =~ s/(push_stream_postgres ")/push_stream_shared_memory_size 20m;\n    $1/;
$t->write_file('nginx.conf', $conf);
$t->reload();
for (1 .. 50) {
	last if $t->read_file('error.log') =~ /Cannot change memory area size/;
	sleep 0.1;
}
like($t->read_file('error.log'),
	qr/\[warn\].*Cannot change memory area size without restart, ignoring change on zone: push_stream_module/,
	'a new zone size needs a restart: nginx says so');
my $after_size;
for (1 .. 50) {
	$after_size = summary();
	last if @{$after_size->{by_worker} // []} == 2 && !grep { $was{$_->{pid}} || $_->{pid} == $now[0] || $_->{pid} == $now[1] } @{$after_size->{by_worker}};
	sleep 0.1;
}
is($after_size->{published_messages}, $published, 'and the counts survive it');

# a fast shutdown (TERM: nginx -s stop) still ends every subscriber as push-stream does:
# the footer and the last chunk, a 304 to a waiting long-poll, a close frame
my $ws = PgPush::WS->connect('/ws?id=stop');
my $st = stream('/sub?id=stop');
my $lp = stream('/lp?id=stop');
is(wait_count(3), 3, 'subscribers before the stop');
my $master = $t->read_file('nginx.pid');
chomp $master;
kill 'TERM', $master;
like(read_all($st, 5), qr/FOOTER\r\n0\r\n\r\n\z/, 'stop: a stream ends with its footer and the last chunk');
like(read_all($lp, 5), qr/^HTTP\/1\.1 304 .*^Etag: W\/0\r$/ms, 'a waiting long-poll gets 304');
my $code;
while (my $m = $ws->read_message(5)) {
	next unless $m->{opcode} == 8;
	($code) = PgPush::WS->close_status($m);
	last;
}
is($code, 1001, 'a WebSocket subscriber a close frame with 1001');
