#!/usr/bin/perl

# push_stream_postgres_node_listener on: one side connection per node LISTENs, for every
# worker; the others get their notifications from it. Delivery on every worker; a stored
# channel stays gapless while the listening worker is killed and replaced; a killed
# follower and a reload leave the node delivering.

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

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http/)->plan(22);

my $pg = PgPush::PG->start();
my $conninfo = $pg->conninfo;

$t->write_file_expand('nginx.conf', <<"EOF");

%%TEST_GLOBALS%%

daemon off;
worker_processes 3;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    push_stream_postgres "$conninfo";
    push_stream_postgres_node_listener on;
    push_stream_postgres_reconnect 50ms 200ms;

    server {
        listen       127.0.0.1:8080 reuseport;
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
            # a catch-up comes at once
            push_stream_subscriber_output_limit 2m;
            add_header X-Worker \$pid;
        }
    }
}

EOF

$t->todo_alerts();
$t->run();
ok($pg->wait_sessions(3), 'every worker has its side connection');
my $master = $t->read_file('nginx.pid') =~ s/\s+//gr;

###############################################################################

# a streaming subscriber, with the pid of the worker that holds it
sub subscribe {
	my ($ch) = @_;
	my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . port(8080)) or die $!;
	$s->syswrite("GET /sub?id=$ch HTTP/1.0\r\nHost: localhost\r\n\r\n");
	my $head = read_for($s, 5, qr/\r\n\r\n/);
	my ($pid) = $head =~ /^X-Worker: (\d+)/m;
	return { sock => $s, pid => $pid // 0, ch => $ch };
}


# the worker whose side thread is pgpush-pg-0: the node's listener
sub leader {
	for my $task (glob '/proc/[0-9]*/task/[0-9]*/comm') {
		open(my $fh, '<', $task) or next;
		my $comm = <$fh> // '';
		next unless $comm =~ /^pgpush-pg-0$/;
		my ($pid) = $task =~ m!^/proc/(\d+)/!;
		open(my $st, '<', "/proc/$pid/status") or next;
		my ($ppid) = join('', <$st>) =~ /^PPid:\s+(\d+)/m;
		return $pid if $ppid == $master;
	}
	return 0;
}

sub wait_leader {
	my ($not) = @_;
	for (1 .. 50) {
		my $l = leader();
		return $l if $l && $l != ($not // 0);
		sleep(0.1);
	}
	return 0;
}

# publishes stored messages k1..k$n from another session
sub publisher {
	my ($ch, $n, $pause, $pad) = @_;
	my $pid = fork();
	return $pid if $pid;
	my $dbh = DBI->connect('dbi:Pg:host=127.0.0.1;port=' . $pg->port . ';dbname=postgres',
		'postgres', '', { RaiseError => 1, PrintError => 0 });
	for my $i (1 .. $n) {
		$dbh->do("SELECT pgpush.publish(?, ?)", undef, $ch, "k$i" . ($pad // ''));
		sleep($pause // 0.004);
	}
	POSIX::_exit(0);
}

###############################################################################

# subscribers spread over the workers (reuseport)
$pg->mark();
my @subs = map { subscribe("ch" . ($_ % 6)) } 1 .. 18;
my %workers = map { $_->{pid} => 1 } @subs;
cmp_ok(scalar keys %workers, '>=', 2, 'subscribers are held by several workers');
my %listeners = map { $_->[0] => 1 } grep { $_->[1] =~ /^LISTEN / } @{$pg->logged()};
is(scalar keys %listeners, 1, 'one side connection LISTENs for the whole node');

# every subscriber gets its channel's message
sub all_get {
	my ($list, $text) = @_;
	my $ok = 0;
	for my $s (@$list) {
		my $want = $text // 'hello' . ($s->{ch} =~ s/^ch//r);
		$ok++ if read_for($s->{sock}, 5, qr/^\d+:\Q$want\E\n/m) =~ /^\d+:\Q$want\E$/m;
	}
	return $ok;
}

$pg->notify("ch$_", "hello$_") for 0 .. 5;
is(all_get(\@subs), 18, 'a notification reaches the subscribers of every worker');

# a burst of subscriptions on new channels: the followers' requests leave in batches
my @burst;
for my $i (1 .. 90) {
	my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . port(8080)) or die $!;
	$s->syswrite("GET /sub?id=burst$i HTTP/1.0\r\nHost: localhost\r\n\r\n");
	push @burst, { sock => $s, ch => "burst$i" };
}
my $heads = grep { read_for($_->{sock}, 5, qr/\r\n\r\n/) =~ /^HTTP\/1\.1 200/ } @burst;
is($heads, 90, 'a burst of 90 subscribers on new channels: each answered');
$pg->notify("burst$_", "b$_") for 1 .. 90;
my $burst_ok = 0;
for my $s (@burst) {
	my $n = $s->{ch} =~ s/^burst//r;
	$burst_ok++ if read_for($s->{sock}, 5, qr/:b$n\n/) =~ /^\d+:b$n$/m;
}
is($burst_ok, 90, 'and each gets its channel\'s message');
close $_->{sock} for @burst;

# resuming subscribers join a stored channel while another session publishes to it: on
# every worker, consecutive offsets up to the last, none twice
my $rpid = publisher('race', 200);
sleep(0.3);
my @race = map { subscribe('race.b5') } 1 .. 9;
waitpid($rpid, 0);
my $race_bad = '';
for my $s (@race) {
	my @ids = (read_for($s->{sock}, 5, qr/^200:/m) =~ /^(\d+):k\d+$/mg);
	my $gaps = grep { $ids[$_] != $ids[$_ - 1] + 1 } 1 .. $#ids;
	$race_bad ||= "pid $s->{pid}: @ids" if $gaps || !@ids || $ids[-1] != 200;
}
is($race_bad, '', 'subscribers resuming mid-stream on every worker: no gap, no repeat');
close $_->{sock} for @race;

# the listening worker is killed while a stored channel gets 400 messages: the other
# workers' subscribers get every one, in order, once
my $leader = leader();
ok($leader, 'worker 0 listens for the node');
my @st = grep { $_->{pid} != $leader } map { subscribe('st') } 1 .. 12;
cmp_ok(scalar @st, '>=', 1, 'stored-channel subscribers on the other workers');
$pg->mark();
my $pid = publisher('st', 400);
sleep(0.5);
kill 'KILL', $leader;
my $new = wait_leader($leader);
ok($new, 'nginx replaced the listening worker');
waitpid($pid, 0);
my $bad = '';
for my $s (@st) {
	my $buf = read_for($s->{sock}, 8, qr/^400:/m);
	my @o = ($buf =~ /^(\d+):k\d+$/mg);
	$bad ||= "pid $s->{pid}: " . scalar(@o) . " messages" unless join(',', @o) eq join(',', 1 .. 400);
}
is($bad, '', 'every one got all 400 stored messages, in order, once');

my @alive = grep { $_->{pid} != $leader } @subs;
%listeners = map { $_->[0] => 1 } grep { $_->[1] =~ /^LISTEN / } @{$pg->logged()};
is(scalar keys %listeners, 1, 'the new listener LISTENs for the node, alone');
$pg->notify("ch$_", "after") for 0 .. 5;
is(all_get(\@alive, 'after'), scalar @alive, 'plain channels are delivered again');

# the listener's connection is killed (every side connection is) while 300 stored
# messages are published: it tells the others, which catch up
my @st2 = grep { $_->{pid} != $new } map { subscribe('st2') } 1 .. 12;
$pid = publisher('st2', 300);
sleep(0.4);
$pg->terminate_sessions();
waitpid($pid, 0);
$bad = '';
for my $s (@st2) {
	my $buf = read_for($s->{sock}, 8, qr/^300:/m);
	my @o = ($buf =~ /^(\d+):k\d+$/mg);
	$bad ||= "pid $s->{pid}: " . scalar(@o) . " messages" unless join(',', @o) eq join(',', 1 .. 300);
}
is($bad, '', 'side connections killed: the other workers still get all 300, in order, once');

# a follower stops reading (SIGSTOP) while its stored channel gets 100 messages of 6 KB,
# one datagram each, more than its socket holds: the listener stalls on it after 2s and
# drops what follows; once it reads again it is made to catch up, with no further message
# sent to it
my @stall;
for (1 .. 30) {
	my $s = subscribe('stall');
	push @stall, $s if $s->{pid} && $s->{pid} != $new;
	last if @stall;
}
ok(@stall, 'a subscriber of a follower');
kill 'STOP', $stall[0]{pid};
$pid = publisher('stall', 100, 0.04, 'x' x 6000);
waitpid($pid, 0);
kill 'CONT', $stall[0]{pid};
my @so = (read_for($stall[0]{sock}, 8, qr/^100:k100x+\n/m) =~ /^(\d+):k\d+x+$/mg);
is(join(',', @so), join(',', 1 .. 100), 'a follower that stalled catches up: all 100, in order, once');

# a killed follower: the others, and new subscribers, go on
my ($victim) = grep { $_ != $new } map { $_->{pid} } @alive;
kill 'KILL', $victim;
sleep(1);
my @rest = grep { $_->{pid} != $victim } @alive;
$pg->notify("ch$_", "still") for 0 .. 5;
is(all_get(\@rest, 'still'), scalar @rest, 'a killed follower: the other workers deliver');
my @fresh = map { subscribe('fresh') } 1 .. 12;
$pg->notify('fresh', 'new');
is(all_get(\@fresh, 'new'), 12, 'and new subscribers on every worker, the replaced one too');

# a reload: new workers, one new listener
$pg->mark();
$t->reload();
wait_leader($new);
sleep(1);
my @reloaded = map { subscribe('rl') } 1 .. 12;
$pg->notify('rl', 'reloaded');
is(all_get(\@reloaded, 'reloaded'), 12, 'after a reload every new worker delivers');
%listeners = map { $_->[0] => 1 } grep { $_->[1] =~ /^LISTEN .*"rl"/ } @{$pg->logged()};
is(scalar keys %listeners, 1, 'through one listener');

# the alerts expected are nginx's own about the killed workers
my @alerts = grep { !/exited on signal 9/ } $t->read_file('error.log') =~ /^.*\[(?:alert|emerg|crit)\].*$/gm;
is(join("\n", @alerts), '', 'no other alerts');
unlike($t->read_file('error.log'), qr/node listener: .*(?:does not parse|failed)/, 'no node listener errors');

###############################################################################
