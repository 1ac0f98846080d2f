#!/usr/bin/perl

# The streaming and eventsource subscribers (push_stream_subscriber streaming|eventsource):
# one HTTP response per subscriber, answered once every LISTEN is confirmed, with
# push-stream's head (content type, chunked, never cached), the header template, one
# chunk per message (EventSource: `: ` comments, `data:` lines per message line, an empty
# line after each event, `: -1` pings), and at the connection ttl the footer and the last
# chunk. HTTP/1.0 clients get the bytes unchunked. Wrong method or channel: push-stream's
# HTTP errors.

use warnings;
use strict;

use Compress::Raw::Zlib;
use IO::Select;
use IO::Socket::INET;
use Test::More;
use Time::HiRes qw/ sleep time /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush qw/ flood publish /;
use PgPush::PG;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http/)->plan(46);

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

        location /es {
            push_stream_subscriber eventsource;
            push_stream_channels_path \$arg_id;
            push_stream_ping_message_interval 1s;
        }

        location /st {
            default_type text/plain;
            push_stream_subscriber streaming;
            push_stream_channels_path \$arg_id;
            push_stream_header_template "HEAD";
            push_stream_footer_template "FOOT";
            push_stream_message_template "~text~|";
            push_stream_subscriber_connection_ttl 2s;
        }

        location /pub {
            push_stream_publisher;
            push_stream_channels_path \$arg_id;
        }

        location /sthdr {
            push_stream_subscriber streaming;
            push_stream_channels_path \$arg_id;
            push_stream_header_template "HEAD";
            push_stream_footer_template "FOOT";
            push_stream_subscriber_connection_ttl 3s;
            default_type text/plain;
            charset utf-8;
            add_header X-Site pgpush;
            gzip on;
            gzip_types text/plain text/event-stream;
            gzip_min_length 0;
        }

        location /eshdr {
            push_stream_subscriber eventsource;
            push_stream_channels_path \$arg_id;
            add_header X-Site pgpush;
        }

        location /stif {
            push_stream_subscriber eventsource;
            push_stream_channels_path \$arg_id;
            push_stream_header_template "head";
            push_stream_message_template "~channel~:~text~";
            if (\$arg_test) {
                push_stream_channels_path test_\$arg_id;
            }
            location /stif/nested {
                return 204;
            }
        }

        location /cors {
            push_stream_subscriber eventsource;
            push_stream_channels_path \$arg_id;
            push_stream_allowed_origins \$arg_domain;
        }

        location /corspub {
            push_stream_publisher;
            push_stream_channels_path \$arg_id;
            push_stream_allowed_origins "*";
        }
    }
}

EOF

$t->run();
ok($pg->wait_sessions(2), 'two side connections');
unlike($t->read_file('error.log'), qr/has no effect/, 'allowed_origins and the stream modes have their effect');

###############################################################################

# A raw HTTP client that reads the head, then the body as it comes (chunks decoded).
sub open_stream {
	my ($path, $version) = @_;
	$version //= '1.1';
	my $s = IO::Socket::INET->new(Proto => 'tcp', PeerAddr => '127.0.0.1:' . Test::Nginx::port(8080))
		or die "connect: $!\n";
	$s->syswrite("GET $path HTTP/$version\r\nHost: localhost\r\n\r\n");
	my $self = { sock => $s, raw => '', body => '', chunked => 0, done => 0 };
	fill($self, 3) while $self->{raw} !~ /\r\n\r\n/ && !$self->{eof};
	($self->{head}, $self->{raw}) = split /\r\n\r\n/, $self->{raw}, 2;
	$self->{raw} //= '';
	$self->{chunked} = $self->{head} =~ /^Transfer-Encoding: chunked/mi;
	decode($self);
	return $self;
}

sub fill {
	my ($self, $timeout) = @_;
	return 0 unless IO::Select->new($self->{sock})->can_read($timeout);
	my $n = $self->{sock}->sysread(my $buf, 65536);
	if (!$n) { $self->{eof} = 1; return 0 }
	$self->{raw} .= $buf;
	return 1;
}

sub decode {
	my ($self) = @_;
	if (!$self->{chunked}) {
		$self->{body} .= $self->{raw};
		$self->{raw} = '';
		return;
	}
	while ($self->{raw} =~ /^([0-9a-f]+)\r\n/i) {
		my $len = hex $1;
		my $hl = length($1) + 2;
		last if length $self->{raw} < $hl + $len + 2;
		$self->{done} = 1 if $len == 0;
		$self->{body} .= substr($self->{raw}, $hl, $len);
		substr($self->{raw}, 0, $hl + $len + 2) = '';
	}
}

# Waits until the body holds $re (or the time is up); returns and removes what matched.
sub expect {
	my ($self, $re, $timeout) = @_;
	my $end = time + ($timeout // 3);
	while (1) {
		if ($self->{body} =~ /\A($re)/s) {
			substr($self->{body}, 0, length $1) = '';
			return $1;
		}
		last if time > $end || $self->{eof};
		fill($self, 0.2) and decode($self);
	}
	diag("body so far: " . $self->{body});
	return undef;
}


###############################################################################

# eventsource

my $es = open_stream('/es?id=news');
like($es->{head}, qr/^HTTP\/1\.1 200 OK/, 'eventsource: 200');
like($es->{head}, qr/^Content-Type: text\/event-stream; charset=utf-8\r?$/mi, 'eventsource: content type');
like($es->{head}, qr/^Transfer-Encoding: chunked\r?$/mi, 'chunked');
like($es->{head}, qr/^Cache-Control: no-cache, no-store, must-revalidate\r?$/mi, 'never cached');
ok(defined expect($es, qr/: \n/), 'the default header is an empty comment');
$pg->notify('news', "line 1\nline 2\r\nline 3");
is(expect($es, qr/data: [^\n]*\ndata: [^\n]*\ndata: [^\n]*\n\n/),
	"data: line 1\ndata: line 2\ndata: line 3\n\n", 'one data line per message line, then an empty line');
publish('news', 'over http');
is(expect($es, qr/data: over http\n\n/), "data: over http\n\n", 'published over HTTP');
http(<<EOR);
POST /pub?id=news HTTP/1.0
Host: localhost
Event-Id: ev-7
Event-Type: score
Content-Length: 4

1:0!
EOR
is(expect($es, qr/id: [^\n]*\nevent: [^\n]*\ndata: [^\n]*\n\n/), "id: ev-7\nevent: score\ndata: 1:0!\n\n",
	'Event-Id and Event-Type of the publisher become id: and event: lines');
ok(defined expect($es, qr/: -1\n/, 3), 'pings are comments after a quiet interval');

# streaming

my $st = open_stream('/st?id=sports');
like($st->{head}, qr/^HTTP\/1\.1 200 OK/, 'streaming: 200');
like($st->{head}, qr/^Content-Type: text\/plain\r?$/mi, "streaming: the location's type");
is(expect($st, qr/HEAD/), 'HEAD', 'header template first');
publish('sports', 'goal');
is(expect($st, qr/goal\|/), 'goal|', 'the message with its template');
is(expect($st, qr/FOOT/, 4), 'FOOT', 'the footer at the connection ttl');
fill($st, 2) and decode($st) until $st->{done} || $st->{eof};
ok($st->{done}, 'then the last chunk');
ok($st->{eof} || !fill($st, 2) && $st->{eof}, 'and the connection closes');

# HTTP/1.0: no chunks
my $old = open_stream('/st?id=old', '1.0');
unlike($old->{head}, qr/chunked/i, 'HTTP/1.0: not chunked');
is(expect($old, qr/HEAD/), 'HEAD', 'HTTP/1.0: the header as it is');
publish('old', 'plain');
is(expect($old, qr/plain\|/), 'plain|', 'HTTP/1.0: the message as it is');

###############################################################################

# errors, push-stream style

like(http(<<EOR), qr/^HTTP\/1\.1 405.*^Allow: GET/ms, 'POST: 405 with Allow');
POST /st?id=x HTTP/1.0
Host: localhost
Content-Length: 1

x
EOR
like(http_get('/st?id='), qr/^HTTP\/1\.1 400.*X-Nginx-PushStream-Explain: No channel id provided\./ms,
	'no channel: 400 explained');
# CORS with push_stream_allowed_origins (a value with variables), OPTIONS answered
my $c = open_stream('/cors?id=c&domain=example.org');
like($c->{head}, qr/^Access-Control-Allow-Origin: example\.org\r?$/mi, 'CORS: allowed origin');
like($c->{head}, qr/^Access-Control-Allow-Methods: GET\r?$/mi, 'CORS: methods of a subscriber');
like($c->{head}, qr/^Access-Control-Allow-Headers: If-Modified-Since,If-None-Match,Etag,Event-Id,Event-Type,Last-Event-Id\r?$/mi,
	'CORS: headers');
unlike(open_stream('/es?id=c2')->{head}, qr/Access-Control/i, 'no CORS headers without the directive');
like(http("OPTIONS /cors?id=c&domain=x HTTP/1.0\r\nHost: localhost\r\n\r\n"),
	qr/^HTTP\/1\.1 200.*^Access-Control-Allow-Origin: x\r$/ms, 'OPTIONS to a subscriber: 200 with CORS');
my $p = http("OPTIONS /corspub?id=c HTTP/1.0\r\nHost: localhost\r\n\r\n");
like($p, qr/^HTTP\/1\.1 200.*^Access-Control-Allow-Methods: GET, POST, PUT\r$/ms,
	'OPTIONS to a publisher: 200 with its methods');
like($p, qr/^Cache-Control: no-cache, no-store, must-revalidate\r$/m, 'publisher answers are never cached');

like(http_get('/es?id=ALL'), qr/^HTTP\/1\.1 403.*X-Nginx-PushStream-Explain: Channel id not authorized/ms,
	'ALL: 403 explained');

# the head goes through nginx's header filters, as push-stream's: add_header, charset,
# gzip; a gzipped stream's messages can be read as each arrives, and it ends whole
my $h = http("GET /sthdr?id=hdr HTTP/1.1\r\nHost: localhost\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n",
	start => 1);
my ($got, $body, $unz) = ('', '', '');
my $inflate = Compress::Raw::Zlib::Inflate->new(-WindowBits => WANT_GZIP);
my $sel = IO::Select->new($h);
# reads until the inflated body matches (or the connection ends)
my $read_gz = sub {
	my ($want) = @_;
	while ($unz !~ $want && $sel->can_read(5)) {
		$h->sysread($got, 4096, length $got) or last;
		my ($head, $rest) = split /\r\n\r\n/, $got, 2;
		next unless defined $rest;
		# the whole chunked body so far, inflated from the start again
		my $data = '';
		while ($rest =~ /\G([0-9a-f]+)\r\n/gc) {
			my $n = hex $1;
			last if length($rest) < pos($rest) + $n + 2;
			$data .= substr($rest, pos($rest), $n);
			pos($rest) += $n + 2;
		}
		next if $data eq $body;
		$body = $data;
		$inflate = Compress::Raw::Zlib::Inflate->new(-WindowBits => WANT_GZIP);
		my $in = $body;
		$unz = '';
		$inflate->inflate($in, $unz);
	}
	return $unz;
};
like($read_gz->(qr/HEAD/), qr/^HEAD\z/, 'a gzipped stream\'s header template can be read at once');
like($got, qr/^HTTP\/1\.1 200 OK\r\nServer: nginx.*^Date: /ms, 'a stream\'s head is nginx\'s');
like($got, qr/^X-Site: pgpush\r$/m, 'add_header applies');
like($got, qr/^Content-Type: text\/plain; charset=utf-8\r$/m, 'and charset');
like($got, qr/^Content-Encoding: gzip\r$/m, 'and gzip, as push-stream\'s');
like($got, qr/^Transfer-Encoding: chunked\r$/m, 'chunked');
publish('hdr', 'zipped');
like($read_gz->(qr/zipped/), qr/^HEADzipped\z/, 'a message can be read as it arrives');
$read_gz->(qr/FOOT/);
like($got, qr/\r\n0\r\n\r\n\z/, 'at its ttl the stream ends');
my $whole = '';
my $zst = Compress::Raw::Zlib::Inflate->new(-WindowBits => WANT_GZIP)->inflate(my $copy = $body, $whole);
is("$whole " . ($zst == Z_STREAM_END ? 'end' : "status $zst"), 'HEADzippedFOOT end',
	'with the footer template and gzip\'s trailer');
like(open_stream('/eshdr?id=hdr')->{head}, qr/^X-Site: pgpush\r?$/mi, 'an EventSource head too');

# a location whose directives an `if` block changes: the block is the same subscriber
my $plain = open_stream('/stif?id=ifch');
my $inif = open_stream('/stif?id=ifch&test=1');
like($inif->{head}, qr/^HTTP\/1\.1 200/, 'a subscriber location\'s if block subscribes too');
publish('ifch', 'one');
publish('test_ifch', 'two');
ok(defined expect($plain, qr/: head\n(?::\n)*data: ifch:one\n\n/), 'outside the if: its path');
ok(defined expect($inif, qr/: head\n(?::\n)*data: test_ifch:two\n\n/),
	'inside: the if block\'s path, the templates formatted once');
like(http_get('/stif/nested'), qr/^HTTP\/1\.1 204/, 'a nested location keeps its own handler');

# subscribers that join a channel already listened while it is busy: a message that
# arrives before a subscriber's head is sent goes out after its head and header template
my $flood = flood($pg, 'busy', 'b', 8);
my @keep = map { open_stream('/st?id=busy') } 1 .. 4;
my ($joined, $bad) = (0, '');
for (1 .. 150) {
	my $s = open_stream('/st?id=busy');
	while (length($s->{body}) < 6 && !$s->{eof}) {
		fill($s, 1) or last;
		decode($s);
	}
	$joined++;
	$bad ||= "$s->{head}\n\n$s->{body}" unless $s->{head} =~ /^HTTP\/1\.1 200/ && $s->{body} =~ /^HEAD(?:b\|)*\z/;
	close $s->{sock};
}
kill 'TERM', $flood;
waitpid($flood, 0);
is($bad, '', "$joined subscribers joining a busy channel: each gets its head, then HEAD, then messages");

###############################################################################
