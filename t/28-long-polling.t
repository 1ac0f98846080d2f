#!/usr/bin/perl

# The long-polling subscriber (push_stream_subscriber long-polling): the request waits for
# the next message on its channels and gets it as a 200 (header template, message,
# footer template; JSONP with ?callback=), or a 304 with Etag W/0 at
# push_stream_longpolling_connection_ttl; a waiting request that is dropped leaves its
# channels. A waiting HTTP/1.x poll is parked (its request freed, the connection kept)
# and its request replayed for the answer: add_header, the access log (one line, with
# the whole wait as $request_time) and keep-alive behave as for any request.

use warnings;
use strict;

use IO::Select;
use IO::Socket::INET;
use Test::More;
use Time::HiRes qw/ sleep time /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush qw/ publish /;
use PgPush::PG;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http/)->plan(35);

my $pg = PgPush::PG->start();
my $conninfo = $pg->conninfo;

$t->write_file_expand('nginx.conf', <<"EOF");

%%TEST_GLOBALS%%

daemon off;
worker_processes 1;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    push_stream_postgres "$conninfo";
    log_format polls '\$uri \$status \$request_time \$connection_requests';

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location /lpz {
            default_type text/plain;
            push_stream_subscriber long-polling;
            push_stream_channels_path \$arg_id;
            gzip on;
            gzip_types text/plain;
        }

        location /lpk {
            default_type text/plain;
            push_stream_subscriber long-polling;
            push_stream_channels_path \$arg_id;
            push_stream_longpolling_connection_ttl 1s;
            add_header X-Poll yes;
            access_log %%TESTDIR%%/polls.log polls;
        }

        location /lp {
            default_type text/plain;
            push_stream_subscriber long-polling;
            push_stream_channels_path \$arg_id;
            push_stream_header_template "<";
            push_stream_footer_template ">";
            push_stream_longpolling_connection_ttl 1s;
        }

        location /pub {
            push_stream_publisher;
            push_stream_channels_path \$arg_id;
        }
    }
}

EOF

$t->run();
ok($pg->wait_sessions(1), 'side connection');
unlike($t->read_file('error.log'), qr/has no effect/, 'long-polling and its ttl have their effect');

# Sends a GET and returns the socket; read_all() reads the whole response.
sub start_get {
	my ($path) = @_;
	my $s = IO::Socket::INET->new(Proto => 'tcp', PeerAddr => '127.0.0.1:' . port(8080))
		or die "connect: $!\n";
	$s->syswrite("GET $path HTTP/1.0\r\nHost: localhost\r\n\r\n");
	return $s;
}

sub read_all {
	my ($s, $timeout) = @_;
	my $buf = '';
	my $end = time + ($timeout // 3);
	while (time < $end) {
		last unless IO::Select->new($s)->can_read($end - time);
		my $n = $s->sysread($buf, 65536, length $buf);
		last unless $n;
	}
	return $buf;
}

###############################################################################

my $s = start_get('/lp?id=news');
sleep(0.3);
publish('news', 'hello');
my $r = read_all($s);
like($r, qr/^HTTP\/1\.1 200 OK/, 'a waiting request is answered by the next message');
like($r, qr/\r\n\r\n<hello>\z/, 'with the header and footer templates');
like($r, qr/^Etag: W\/[1-9]\d*\r$/m, 'Etag: the message\'s tag');
like($r, qr/^Last-Modified: \w{3}, /m, 'Last-Modified: its time');

# push-stream's tags number the messages of one second from 1
my @lp = map { start_get("/lp?id=tag$_") } 1 .. 2;
sleep(0.3);
publish("tag$_", "t$_") for 1 .. 2;
my @r = map { read_all($_) } @lp;
my @lm = map { /^Last-Modified: (.*?)\r$/m } @r;
my @tag = map { /^Etag: W\/(\d+)\r$/m } @r;
is($tag[1], $lm[0] eq $lm[1] ? $tag[0] + 1 : 1, 'a second message in the same second has the next tag');
like($r, qr/^Content-Type: text\/plain\r$/m, "the location's content type");

$s = start_get('/lp?id=news&callback=cb');
sleep(0.3);
publish('news', '"x"');
$r = read_all($s);
like($r, qr/\r\n\r\n<cb\(\["x"\]\);>\z/, 'JSONP with ?callback=');
like($r, qr/^Content-Type: application\/javascript\r$/m, 'as application/javascript');

$s = start_get('/lp?id=quiet');
my $t0 = time;
$r = read_all($s, 4);
like($r, qr/^HTTP\/1\.1 304/, 'nothing within the ttl: 304');
cmp_ok(time - $t0, '<', 3, 'at the ttl');

like(http(<<EOR), qr/^HTTP\/1\.1 405.*^Allow: GET/ms, 'POST: 405');
POST /lp?id=x HTTP/1.0
Host: localhost
Content-Length: 1

x
EOR

# a dropped waiting request leaves its channel: the channel lingers, listened, for a
# poll that comes back (2 to 4 s), then the worker UNLISTENs
$s = start_get('/lp?id=gone');
sleep(0.3);
close $s;
sleep(1);
unlike(join('|', map { $_->[1] } @{$pg->logged()}), qr/UNLISTEN "gone"/,
	'a dropped poll\'s channel lingers a moment');
ok($pg->wait_query(qr/UNLISTEN "gone"/, 1, 10), 'then nobody polls it: UNLISTEN');

# Parked polls on one keep-alive connection: answered by a message (add_header applies),
# again with If-Modified-Since / If-None-Match from the answer, then at the ttl, then
# once more; each is one request in the access log.

sub read_response {
	my ($s, $timeout) = @_;
	my $buf = '';
	my $end = time + ($timeout // 3);
	while (time < $end) {
		if ($buf =~ /\r\n\r\n/) {
			my ($head, $body) = split /\r\n\r\n/, $buf, 2;
			if ($head =~ /^Transfer-Encoding: chunked\r?$/mi) {
				# push-stream's pollers get chunked answers
				if ($body =~ /(?:^|\r\n)0\r\n\r\n\z/) {
					my $data = '';
					while ($body =~ s/^([0-9a-f]+)\r\n//i) {
						my $n = hex $1;
						last if $n == 0;
						$data .= substr($body, 0, $n, '');
						$body =~ s/^\r\n//;
					}
					return ($head, $data);
				}
			} else {
				my ($len) = $head =~ /^Content-Length: (\d+)\r?$/mi;
				return ($head, $body) if length($body) >= ($len // 0);
			}
		}
		last unless IO::Select->new($s)->can_read($end - time);
		my $n = $s->sysread($buf, 65536, length $buf);
		last unless $n;
	}
	return split /\r\n\r\n/, $buf, 2;
}

# every statement in PostgreSQL's log, to count the LISTENs
$pg->do(q{ALTER SYSTEM SET log_statement = 'all'});
$pg->do('SELECT pg_reload_conf()');
sleep(0.3);

my $k = IO::Socket::INET->new(Proto => 'tcp', PeerAddr => '127.0.0.1:' . port(8080))
	or die "connect: $!\n";
$k->syswrite("GET /lpk?id=kept HTTP/1.1\r\nHost: localhost\r\n\r\n");
sleep(0.5);
publish('kept', 'one');
my ($head, $body) = read_response($k);
like($head, qr/^HTTP\/1\.1 200 OK/, 'a parked poll is answered');
is($body, 'one', 'with the message');
like($head, qr/^X-Poll: yes\r?$/m, "the location's add_header applies to the answer");
like($head, qr/^Connection: keep-alive\r?$/m, 'and the connection is kept alive');
like($head, qr/^Transfer-Encoding: chunked\r?$/m, 'chunked, as push-stream answers');
my ($lm) = $head =~ /^Last-Modified: (.*?)\r?$/m;
my ($etag) = $head =~ /^Etag: (.*?)\r?$/m;

$k->syswrite("GET /lpk?id=kept HTTP/1.1\r\nHost: localhost\r\n"
	. "If-Modified-Since: $lm\r\nIf-None-Match: $etag\r\n\r\n");
sleep(0.3);
publish('kept', 'two');
($head, $body) = read_response($k);
is($body, 'two', 'the next poll on the same connection gets the next message');

$k->syswrite("GET /lpk?id=kept HTTP/1.1\r\nHost: localhost\r\n\r\n");
($head, $body) = read_response($k, 4);
like($head, qr/^HTTP\/1\.1 304/, 'a parked poll times out with 304');
like($head, qr/^X-Poll: yes\r?$/m, 'add_header on the 304 too');

$k->syswrite("GET /lpk?id=kept HTTP/1.1\r\nHost: localhost\r\n\r\n");
sleep(0.3);
publish('kept', 'three');
($head, $body) = read_response($k);
is($body, 'three', 'and the connection serves one more poll');
close $k;
# the worker writes the log line just after the answer
sleep(0.3);

# gzip applies to an answer of any size: it has no Content-Length
my $z = IO::Socket::INET->new(Proto => 'tcp', PeerAddr => '127.0.0.1:' . port(8080))
	or die "connect: $!\n";
$z->syswrite("GET /lpz?id=zipped HTTP/1.1\r\nHost: localhost\r\nAccept-Encoding: gzip\r\n\r\n");
sleep(0.3);
publish('zipped', 'hi');
($head, $body) = read_response($z);
like($head, qr/^Content-Encoding: gzip\r?$/m, 'a short answer is gzipped, as push-stream\'s');
close $z;

# the channel stayed listened between the polls: one LISTEN for all four
my $pglog = do { local (@ARGV, $/) = ($pg->dir . '/postgres.log'); <> } // '';
my $listens = () = $pglog =~ /statement: LISTEN "kept"/g;
is($listens, 1, 'one LISTEN for the four polls: the channel lingers between them');
my @log = grep { m{^/lpk } } split /\n/, $t->read_file('polls.log');
is(scalar @log, 4, 'one access log line per poll');
my @f = map { [split / /] } @log;
cmp_ok($f[0][2], '>=', 0.4, '$request_time spans the wait of a parked poll');
is(join(',', map { $_->[1] } @f), '200,200,304,200', 'with its status');
is(join(',', map { $_->[3] } @f), '1,2,3,4', 'and each poll counts once on its connection');

# a reload ends the old worker's waiting polls with 304, parked or not (an exiting worker
# may not come back to posted events: the replay runs at once)
$s = start_get('/lp?id=reloading');
sleep(0.3);
$t->reload();
$r = read_all($s, 4);
like($r, qr/^HTTP\/1\.1 304/, 'a reload answers a parked poll 304');

# push_stream_timeout_with_body on: the timeout is a 200 with push-stream's message -3

my $t2 = Test::Nginx->new();
$t2->write_file_expand('nginx.conf', <<"EOF");

%%TEST_GLOBALS%%

daemon off;
worker_processes 1;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    push_stream_postgres "$conninfo";
    push_stream_timeout_with_body on;

    server {
        listen       127.0.0.1:8081;
        server_name  localhost;

        location /lp {
            push_stream_subscriber long-polling;
            push_stream_channels_path \$arg_id;
            push_stream_message_template "~id~:~text~";
            push_stream_longpolling_connection_ttl 1s;
        }
    }
}

EOF
$t2->run();
my $s2 = IO::Socket::INET->new(Proto => 'tcp', PeerAddr => '127.0.0.1:' . port(8081))
	or die "connect: $!\n";
$s2->syswrite("GET /lp?id=quiet HTTP/1.0\r\nHost: localhost\r\n\r\n");
$r = read_all($s2, 4);
like($r, qr/^HTTP\/1\.1 200.*\r\n\r\n-3:Timed out\z/s, 'timeout_with_body: 200 with the message -3');
unlike($t2->read_file('error.log'), qr/has no effect/, 'push_stream_timeout_with_body has its effect');
$t2->stop();

###############################################################################
