package PgPush::WS;

# A small WebSocket client for the suites, on Debian's Protocol::WebSocket: the handshake
# (including the Sec-WebSocket-Accept check) and well-formed client frames come from it;
# server frames are parsed here byte by byte so tests can assert exactly what was sent, and
# raw() lets a test send deliberately broken frames.
#
#   my $ws = PgPush::WS->connect('/ws?id=ch1', port => 8080, headers => {Origin => 'x'});
#   (rcvbuf => 4096 makes a client whose receive window fills quickly; ssl => 1 is wss://)
#   $ws->{status}                    101, or the HTTP status of a refused handshake
#   $ws->send_text('hi');  $ws->ping('x');  $ws->close(1000, 'bye');
#   my $f = $ws->read_frame(2);      {opcode, fin, rsv, payload} or undef on timeout/EOF
#   my $m = $ws->read_message(2);    data frames reassembled; control frames returned as is
#   my $text = $ws->payload;         the next data payload, pings skipped

use warnings;
use strict;

use IO::Select;
use IO::Socket::INET;
use Socket qw/ SOL_SOCKET SO_RCVBUF inet_aton pack_sockaddr_in /;
use Protocol::WebSocket::Frame;
use Protocol::WebSocket::Handshake::Client;
use Test::Nginx qw//;
use Time::HiRes qw/ time /;

sub connect {
	my ($class, $path, %opts) = @_;
	# raw_port: a real port, not one of the test ports Test::Nginx remaps
	my $port = $opts{raw_port} // Test::Nginx::port($opts{port} || 8080);
	my $sock;
	if ($opts{ssl}) {
		require IO::Socket::SSL;
		$sock = IO::Socket::SSL->new(
			PeerAddr => "127.0.0.1:$port", Timeout => 5,
			SSL_verify_mode => IO::Socket::SSL::SSL_VERIFY_NONE(),
		) or die "cannot connect to 127.0.0.1:$port over TLS: $IO::Socket::SSL::SSL_ERROR\n";
	} elsif (my $rcvbuf = $opts{rcvbuf}) {
		# a small receive buffer, set before connecting so the window stays small
		$sock = IO::Socket::INET->new(Proto => 'tcp') or die "socket: $!\n";
		setsockopt($sock, SOL_SOCKET, SO_RCVBUF, $rcvbuf) or die "SO_RCVBUF: $!\n";
		$sock->connect(pack_sockaddr_in($port, inet_aton('127.0.0.1')))
			or die "cannot connect to 127.0.0.1:$port: $!\n";
	} else {
		$sock = IO::Socket::INET->new(
			Proto => 'tcp', PeerAddr => "127.0.0.1:$port", Timeout => 5,
		) or die "cannot connect to 127.0.0.1:$port: $!\n";
	}
	$sock->autoflush(1);

	my $scheme = $opts{ssl} ? 'wss' : 'ws';
	my $hs = Protocol::WebSocket::Handshake::Client->new(url => "$scheme://127.0.0.1:$port$path");
	my $req = $hs->to_string;
	if (my $h = $opts{headers}) {
		my $extra = join '', map { "$_: $h->{$_}\r\n" } sort keys %$h;
		$req =~ s/\r\n\r\n\z/\r\n$extra\r\n/;
	}

	my $self = bless { sock => $sock, buf => '', hs => $hs }, $class;
	$sock->syswrite($req);

	# read the response head
	my $deadline = time + ($opts{timeout} || 5);
	while ($self->{buf} !~ /\r\n\r\n/) {
		$self->_fill($deadline) or last;
	}
	my ($head, $rest) = split /\r\n\r\n/, $self->{buf}, 2;
	$self->{response} = $head // '';
	$self->{buf} = $rest // '';
	($self->{status}) = ($self->{response} =~ m!^HTTP/1\.\d (\d+)!);
	$self->{status} //= 0;
	if ($self->{status} == 101) {
		$hs->parse("$head\r\n\r\n");
		die 'handshake: ' . $hs->error . "\n" if $hs->error;
	}
	return $self;
}

sub header {
	my ($self, $name) = @_;
	my ($v) = $self->{response} =~ /^\Q$name\E:\s*(.*?)\r?$/mi;
	return $v;
}

sub _fill {
	my ($self, $deadline) = @_;
	my $left = $deadline - time;
	return 0 if $left <= 0;
	# TLS may hold decrypted bytes that select() cannot see
	my $pending = $self->{sock}->can('pending') && $self->{sock}->pending;
	return 0 unless $pending || IO::Select->new($self->{sock})->can_read($left);
	my $n = $self->{sock}->sysread(my $chunk, 65536);
	return 0 unless $n;
	$self->{buf} .= $chunk;
	return 1;
}

# Sends bytes as they are.
sub raw {
	my ($self, $bytes) = @_;
	return $self->{sock}->syswrite($bytes);
}

sub _send {
	my ($self, %args) = @_;
	my $f = Protocol::WebSocket::Frame->new(masked => 1, max_payload_size => 0, %args);
	return $self->raw($f->to_bytes);
}

sub send_text { my ($s, $t) = @_; $s->_send(buffer => $t, type => 'text') }
sub send_binary { my ($s, $b) = @_; $s->_send(buffer => $b, type => 'binary') }
sub ping { my ($s, $p) = @_; $s->_send(buffer => $p // '', type => 'ping') }
sub pong { my ($s, $p) = @_; $s->_send(buffer => $p // '', type => 'pong') }

sub close {
	my ($self, $code, $reason) = @_;
	my $payload = defined $code ? pack('n', $code) . ($reason // '') : '';
	return $self->_send(buffer => $payload, type => 'close');
}

# Builds one frame by hand: opcode, payload, fin (default 1), mask (default 1), rsv bits.
sub frame {
	my ($class, %f) = @_;
	my $payload = $f{payload} // '';
	my $fin = exists $f{fin} ? $f{fin} : 1;
	my $mask = exists $f{mask} ? $f{mask} : 1;
	my $b0 = ($fin ? 0x80 : 0) | (($f{rsv} // 0) << 4) | $f{opcode};
	my $len = length $payload;
	my $m = $mask ? 0x80 : 0;
	my $head = pack('C', $b0);
	if ($len < 126) {
		$head .= pack('C', $m | $len);
	} elsif ($len < 65536) {
		$head .= pack('Cn', $m | 126, $len);
	} else {
		$head .= pack('CNN', $m | 127, int($len / 2**32), $len % 2**32);
	}
	return $head . $payload unless $mask;
	my @key = map { int rand 256 } 1 .. 4;
	my $i = 0;
	my $masked = join '', map { chr(ord($_) ^ $key[$i++ % 4]) } split //, $payload;
	return $head . pack('C4', @key) . $masked;
}

sub read_frame {
	my ($self, $timeout) = @_;
	my $deadline = time + ($timeout // 3);
	while (1) {
		my $f = $self->_parse();
		return $f if $f;
		$self->_fill($deadline) or return undef;
	}
}

sub _parse {
	my ($self) = @_;
	my $buf = \$self->{buf};
	return undef if length $$buf < 2;
	my ($b0, $b1) = unpack 'CC', $$buf;
	my $len = $b1 & 0x7f;
	my $off = 2;
	if ($len == 126) {
		return undef if length $$buf < 4;
		$len = unpack 'n', substr($$buf, 2, 2);
		$off = 4;
	} elsif ($len == 127) {
		return undef if length $$buf < 10;
		my ($hi, $lo) = unpack 'NN', substr($$buf, 2, 8);
		$len = $hi * 2**32 + $lo;
		$off = 10;
	}
	my $masked = $b1 & 0x80;
	my $key = '';
	if ($masked) {
		return undef if length $$buf < $off + 4;
		$key = substr($$buf, $off, 4);
		$off += 4;
	}
	return undef if length $$buf < $off + $len;
	my $payload = substr($$buf, $off, $len);
	substr($$buf, 0, $off + $len) = '';
	if ($masked) {
		my @k = unpack 'C4', $key;
		my $i = 0;
		$payload = join '', map { chr(ord($_) ^ $k[$i++ % 4]) } split //, $payload;
	}
	return {
		fin => ($b0 & 0x80) ? 1 : 0,
		rsv => ($b0 >> 4) & 7,
		opcode => $b0 & 0x0f,
		masked => $masked ? 1 : 0,
		payload => $payload,
	};
}

# The next message: fragments reassembled; a control frame comes back on its own.
sub read_message {
	my ($self, $timeout) = @_;
	my $msg;
	while (my $f = $self->read_frame($timeout)) {
		return $f if $f->{opcode} >= 8;
		if (!$msg) {
			$msg = { %$f };
		} else {
			$msg->{payload} .= $f->{payload};
		}
		return $msg if $f->{fin};
	}
	return $msg;
}

# The next data payload, pings skipped; undef on timeout or EOF.
sub payload {
	my ($self, $timeout) = @_;
	while (my $m = $self->read_message($timeout)) {
		next if $m->{opcode} == 9;
		return $m->{payload};
	}
	return undef;
}

# For a close frame: (code, reason).
sub close_status {
	my ($class, $frame) = @_;
	return () unless $frame && $frame->{opcode} == 8;
	return (undef, '') if length $frame->{payload} < 2;
	return (unpack('n', $frame->{payload}), substr($frame->{payload}, 2));
}

# True once the server has closed the TCP connection.
sub eof {
	my ($self, $timeout) = @_;
	my $deadline = time + ($timeout // 3);
	while (time < $deadline) {
		return 0 if length $self->{buf};
		my $pending = $self->{sock}->can('pending') && $self->{sock}->pending;
		# nothing to read before the deadline: the connection is still open
		return 0 unless $pending || IO::Select->new($self->{sock})->can_read($deadline - time);
		my $n = $self->{sock}->sysread(my $chunk, 65536);
		return 1 if !$n;
		$self->{buf} .= $chunk;
	}
	return 0;
}

1;
