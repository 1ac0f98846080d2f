package PgPush::App;

# A small recording HTTP application for the hook suites: one line per request in a
# file ("METHOD URI BODY", the body hex-encoded with hex => 1), answered by a callback.
#
#   my $app = PgPush::App->start($t, 8081, sub { my ($method, $uri, $body) = @_; 'reply' });
#   $app->calls(qr{^GET /subscribe})         lines so far that match
#   $app->wait(qr{^GET /subscribe}, 2)       waits (5 s at most) for 2 such lines; the count

use warnings;
use strict;

use IO::Socket::INET;
use Test::Nginx qw//;
use Time::HiRes qw//;

sub start {
	my ($class, $t, $port, $reply, %opts) = @_;
	my $real = Test::Nginx::port($port);
	my $file = $t->testdir() . "/app-$port.log";
	$t->run_daemon(\&serve, $real, $file, $reply, $opts{hex});
	$t->waitforsocket("127.0.0.1:$real") or die "the application did not start\n";
	return bless { file => $file, port => $real }, $class;
}

sub port { $_[0]{port} }

sub serve {
	my ($port, $file, $reply, $hex) = @_;
	my $server = IO::Socket::INET->new(
		Proto => 'tcp', LocalAddr => "127.0.0.1:$port", Listen => 64, ReuseAddr => 1,
	) or die "app: $!\n";
	while (my $c = $server->accept()) {
		my $head = '';
		while ($head !~ /\r\n\r\n/) {
			$c->sysread($head, 4096, length $head) or last;
		}
		# (waitforsocket connects without a request)
		next unless $head =~ /^(\S+) (\S+)/;
		my ($method, $uri) = ($1, $2);
		my ($h, $body) = split /\r\n\r\n/, $head, 2;
		$body //= '';
		my ($len) = $h =~ /^Content-Length:\s*(\d+)/mi;
		while (defined $len && length $body < $len) {
			$c->sysread($body, $len - length $body, length $body) or last;
		}
		open my $fh, '>>', $file or die "app: $!\n";
		print $fh "$method $uri " . ($hex ? unpack('H*', $body) : $body) . "\n";
		close $fh;
		my $out = $reply->($method, $uri, $body) // '';
		$c->print("HTTP/1.1 200 OK\r\nContent-Length: " . length($out)
			. "\r\nConnection: close\r\n\r\n$out");
		$c->close();
	}
}

sub calls {
	my ($self, $re) = @_;
	open my $fh, '<', $self->{file} or return ();
	return grep { $_ =~ $re } <$fh>;
}

sub wait {
	my ($self, $re, $n) = @_;
	for (1 .. 50) {
		my @c = $self->calls($re);
		return scalar @c if @c >= $n;
		Time::HiRes::sleep(0.1);
	}
	return scalar $self->calls($re);
}

1;
