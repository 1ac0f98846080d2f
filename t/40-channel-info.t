#!/usr/bin/perl

# Channel info and statistics from the node-wide counter zone: the publisher's answers
# (one channel, a/b groups, Accept formats, GET 404), push_stream_channels_statistics
# (summary with by_worker, id=ALL, prefix*, single), subscriber counts exact across two
# workers and every mode, after abrupt disconnects and after kill -9 of a worker, and the
# limits (subscribers per channel, number of channels, authorized channels only).

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

my $t = Test::Nginx->new()->has(qw/http/)->plan(57);

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
    push_stream_shared_memory_size 4m;
    push_stream_max_subscribers_per_channel 3;
    push_stream_max_number_of_channels 20;

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
        }

        location /lp {
            push_stream_subscriber long-polling;
            push_stream_channels_path \$arg_id;
        }

        location /auth {
            push_stream_subscriber;
            push_stream_channels_path \$arg_id;
            push_stream_authorized_channels_only on;
        }

        location /pub {
            push_stream_publisher;
            push_stream_channels_path \$arg_id;
        }

        location /admin {
            push_stream_publisher admin;
            push_stream_channels_path \$arg_id;
        }

        location /stats {
            push_stream_channels_statistics;
            push_stream_channels_path \$arg_id;
        }
    }
}

EOF

$t->todo_alerts();
$t->run();
ok($pg->wait_sessions(2), 'a side connection per worker');

sub get {
	my ($uri, %h) = @_;
	my $extra = join '', map { "$_: $h{$_}\r\n" } sort keys %h;
	return http("GET $uri HTTP/1.0\r\nHost: localhost\r\n$extra\r\n");
}

sub body { my ($r) = @_; return (split /\r\n\r\n/, $r, 2)[1] // '' }

sub summary { return decode_json(body(get('/stats'))) }

# Opens a streaming subscriber; returns the socket once its head has arrived.
sub stream {
	my ($uri) = @_;
	my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . port(8080)) or die "$!\n";
	$s->syswrite("GET $uri HTTP/1.1\r\nHost: localhost\r\n\r\n");
	my $head = '';
	my $deadline = time + 3;
	while ($head !~ /\r\n\r\n/ && time < $deadline) {
		$s->sysread($head, 4096, length $head) or last;
	}
	return ($s, $head);
}

# Waits until the channel's subscriber count (publisher GET) is $n.
sub wait_subscribers {
	my ($ch, $n) = @_;
	my $got;
	for (1 .. 50) {
		($got) = get("/pub?id=$ch") =~ /"subscribers": (\d+)/;
		return $got if defined $got && $got == $n;
		sleep 0.1;
	}
	return $got // 'none';
}

# the publisher's channel info
is(body(publish('ch1', 'hello')),
	qq/{"channel": "ch1", "published_messages": 1, "stored_messages": 0, "subscribers": 0}\r\n/,
	'POST answers the channel info');
like(get('/pub?id=ch1'), qr/^HTTP\/1\.1 200.*Content-Type: application\/json.*"published_messages": 1/s,
	'GET answers it too');
like(get('/pub?id=nothing'), qr/^HTTP\/1\.1 404/, 'GET of a channel nobody created: 404');
is(body(get('/pub?id=nothing')), '', 'without a body');

my $group = body(publish('a1/a2', 'both'));
like($group, qr/^\{"hostname": "[^"]+", "time": "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", "channels": \d+, "wildcard_channels": 0, "uptime": \d+, "infos": \[\r\n/,
	'a/b answers a group');
like($group, qr/\{"channel": "a1", "published_messages": 1, "stored_messages": 0, "subscribers": 0\},\r\n\{"channel": "a2", "published_messages": 1, "stored_messages": 0, "subscribers": 0\}\r\n\]\}\r\n$/,
	'with both channels, in order');
my $info = decode_json(body(get('/pub?id=a2')));
is($info->{published_messages}, 1, 'a/b published once to each');

my $plain = get('/pub?id=ch1', Accept => 'text/plain');
like($plain, qr/Content-Type: text\/plain/, 'Accept: text/plain');
is(body($plain), "channel: ch1\r\npublished_messages: 1\r\nstored_messages: 0\r\nactive_subscribers: 0\r\n",
	'plain body');
like(get('/pub?id=ch1', Accept => 'application/yaml'), qr/Content-Type: application\/yaml.*\r\n\r\n  channel: ch1\r\n/s,
	'yaml');
like(get('/pub?id=ch1', Accept => 'application/xml'),
	qr/Content-Type: application\/xml.*<\?xml version="1.0" encoding="UTF-8" \?>\r\n<channel>\r\n  <name>ch1<\/name>/s, 'xml');
like(get('/pub?id=ch1', Accept => 'text/x-json'), qr/Content-Type: text\/x-json.*"channel": "ch1"/s, 'x-json');

# counts across both workers and every mode
my @ws = map { PgPush::WS->connect('/ws?id=cnt') } 1 .. 2;
is(join(',', map { $_->{status} } @ws), '101,101', 'two WebSocket subscribers');
my ($s1, $h1) = stream('/sub?id=cnt');
like($h1, qr/^HTTP\/1\.1 200/, 'a streaming subscriber');
is(wait_subscribers('cnt', 3), 3, 'three subscribers counted');

my ($s4, $h4) = stream('/sub?id=cnt');
like($h4, qr/^HTTP\/1\.1 403/, 'a fourth is refused');
like($h4, qr/X-Nginx-PushStream-Explain: Subscribers limit per channel has been exceeded\./,
	'with push-stream\'s explanation');
my $ws4 = PgPush::WS->connect('/ws?id=other/cnt');
my ($code, $reason) = PgPush::WS->close_status($ws4->read_frame(3));
is($code, 1008, 'a fourth WebSocket gets 1008');
is($reason, '{"http_status": 403, "explain":"Subscribers limit per channel has been exceeded."}',
	'with the status and explanation');

# abrupt disconnects count down at once
undef $ws[1];
close $s1;
is(wait_subscribers('cnt', 1), 1, 'a reset and a closed stream are not counted');

my $lp = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . port(8080)) or die "$!\n";
$lp->syswrite("GET /lp?id=cnt HTTP/1.0\r\nHost: localhost\r\n\r\n");
is(wait_subscribers('cnt', 2), 2, 'a waiting long-poll counts');
close $lp;
is(wait_subscribers('cnt', 1), 1, 'and leaves');

# statistics
my $s = summary();
is($s->{subscribers}, 1, 'summary: subscribers');
is(scalar @{$s->{by_worker}}, 2, 'summary: by_worker lists both workers');
like($s->{by_worker}[0]{pid}, qr/^\d+$/, 'pid as a string');
my $sum = 0;
$sum += $_->{subscribers} for @{$s->{by_worker}};
is($sum, 1, 'by_worker adds up');
is($s->{published_messages}, 3, 'published_messages: ch1, a1 and a2');
like(body(get('/stats', Accept => 'text/plain')), qr/^hostname: .*\r\nby_worker:\r\n  pid: \d+\r\n  subscribers: \d+\r\n  uptime: \d+,\r\n  pid: /s,
	'summary as plain');
like(get('/stats', Accept => 'application/xml'), qr/<infos>\r\n  <hostname>.*<by_worker><worker>\r\n  <pid>\d+<\/pid>/s,
	'summary as xml');

my $all = decode_json(body(get('/stats?id=ALL')));
is(join(',', map { $_->{channel} } @{$all->{infos}}), 'ch1,a1,a2,cnt',
	'id=ALL lists every channel, oldest first');
my $pre = decode_json(body(get('/stats?id=a*')));
is(join(',', map { $_->{channel} } @{$pre->{infos}}), 'a1,a2', 'a prefix*');
is(decode_json(body(get('/stats?id=cnt')))->{subscribers}, 1, 'one channel');
is(decode_json(body(get('/stats?id=cnt.b5')))->{channel}, 'cnt', 'a .bN backtrack is not part of the id');
like(get('/stats?id=missing'), qr/^HTTP\/1\.1 404/, 'a missing channel: 404');
like(http("POST /stats HTTP/1.0\r\nHost: localhost\r\nContent-Length: 1\r\n\r\nx"),
	qr/^HTTP\/1\.1 405.*Allow: GET/s, 'statistics take GET only');

# one subscriber on two channels is one subscriber in the summary, as in push-stream,
# and one in each channel's count
my $two = PgPush::WS->connect('/ws?id=m1/m2');
my $n2;
for (1 .. 30) {
	$n2 = summary()->{subscribers};
	last if $n2 == 2;
	sleep 0.1;
}
is($n2, 2, 'a subscriber on two channels counts once in the summary');
is(wait_subscribers('m2', 1), 1, 'and once in each channel');
$two->close();
for (1 .. 30) {
	$n2 = summary()->{subscribers};
	last if $n2 == 1;
	sleep 0.1;
}
is($n2, 1, 'and leaves once');

# kill -9 of a worker: its subscribers' counts are taken back
my @more = map { PgPush::WS->connect("/ws?id=k$_") } 1 .. 6;
is(summary()->{subscribers}, 7, 'seven subscribers');
my ($victim) = grep { $_->{subscribers} > 0 } @{summary()->{by_worker}};
kill 'KILL', $victim->{pid};
my @alive = grep { !$_->eof(0.5) } $ws[0], @more;
my $n;
for (1 .. 50) {
	$n = summary()->{subscribers};
	last if $n == @alive;
	sleep 0.1;
}
is($n, scalar @alive, 'after kill -9 the count is the live subscribers');
ok(!grep({ $_->{pid} == $victim->{pid} } @{summary()->{by_worker}}), 'the dead worker is gone');

# authorized channels only
my (undef, $ha) = stream('/auth?id=never_published');
like($ha, qr/^HTTP\/1\.1 403.*X-Nginx-PushStream-Explain: Subscriber could not create channels\./s,
	'authorized_channels_only: a channel nobody published to');
my ($sa, $hb) = stream('/auth?id=ch1');
like($hb, qr/^HTTP\/1\.1 200/, 'a published channel is fine');
close $sa;

# admin DELETE
sub read_until {
	my ($s, $re) = @_;
	my $buf = '';
	my $deadline = time + 3;
	while ($buf !~ $re && time < $deadline) {
		my $sel = IO::Select->new($s);
		last unless $sel->can_read($deadline - time);
		$s->sysread($buf, 4096, length $buf) or last;
	}
	return $buf;
}

sub del {
	my ($loc, $ch, $body) = @_;
	$body //= '';
	my $len = length $body;
	return http("DELETE /$loc?id=$ch HTTP/1.0\r\nHost: localhost\r\nContent-Length: $len\r\n\r\n$body");
}

like(del('pub', 'ch1'), qr/^HTTP\/1\.1 405.*Allow: GET, POST, PUT\r\n/s, 'DELETE needs an admin publisher');
like(del('admin', 'nothing'), qr/^HTTP\/1\.1 404/, 'DELETE of a missing channel: 404');
my $wsd = PgPush::WS->connect('/ws?id=del1');
my ($sd, $hd) = stream('/sub?id=del1/del2');
my $lpd = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . port(8080)) or die "$!\n";
$lpd->syswrite("GET /lp?id=del1 HTTP/1.0\r\nHost: localhost\r\n\r\n");
wait_subscribers('del1', 3);
like(del('admin', 'del1'), qr/^HTTP\/1\.1 200.*X-Nginx-PushStream-Explain: Channel deleted\.\r\n/s, 'DELETE: 200');
is($wsd->payload, 'Channel deleted', 'a WebSocket subscriber gets the deleted message');
my ($dc) = PgPush::WS->close_status($wsd->read_frame(3));
ok(!defined $dc, 'then an empty close frame: it had no other channel');
like(read_until($sd, qr/Channel deleted/), qr/Channel deleted/, 'a streaming subscriber gets it too');
like(read_until($lpd, qr/Channel deleted/), qr/^HTTP\/1\.1 200.*Channel deleted$/s, 'and a long-poll, as its answer');
publish('del2', 'still here');
like(read_until($sd, qr/still here/), qr/still here/, 'a subscriber with another channel stays on it');
like(get('/pub?id=del1'), qr/^HTTP\/1\.1 404/, 'the deleted channel is gone');
del('admin', 'del2', 'custom goodbye');
like(read_until($sd, qr/0\r\n\r\n/), qr/custom goodbye.*0\r\n\r\n$/s, 'a DELETE body is the message, and the stream ends');

# the number of channels
my $channels = summary()->{channels};
publish("fill$_", 'x') for 1 .. 20 - $channels;
like(publish('one_too_many', 'x'), qr/^HTTP\/1\.1 403.*X-Nginx-PushStream-Explain: Number of channels were exceeded\./s,
	'push_stream_max_number_of_channels, publisher');
my (undef, $hc) = stream('/sub?id=one_too_many');
like($hc, qr/^HTTP\/1\.1 403.*Number of channels were exceeded\./s, 'and subscriber');

# the one alert expected is nginx's own about the killed worker
my @alerts = grep { !/exited on signal 9/ } $t->read_file('error.log') =~ /^.*\[(?:alert|emerg|crit)\].*$/gm;
is(join("\n", @alerts), '', 'no other alerts');
