package PgPush;

# Helpers shared by pgpush's suites that are not part of the nginx-tests API.

use warnings;
use strict;

use base qw/ Exporter /;
our @EXPORT_OK = qw/ config_test repo_root module_globals publish wait_log read_for flood /;

use FindBin;
use Test::Nginx qw//;
use Time::HiRes qw//;
use IO::Select;
use POSIX qw//;
use DBI;

sub repo_root {
	my $dir = __FILE__;
	$dir =~ s!/t/lib/PgPush\.pm$!!;
	return -d "$dir/nginx-conf" ? $dir : "$FindBin::Bin/..";
}

# The load_module line the suites need; scripts/test puts it in TEST_NGINX_GLOBALS.
sub module_globals {
	return $ENV{TEST_NGINX_GLOBALS} // '';
}

# Runs `nginx -t` on $conf (after %%TEST_GLOBALS%% and port expansion) in $t's directory.
# Returns (exit code, everything nginx printed).
sub config_test {
	my ($t, $name, $conf) = @_;
	$t->write_file_expand($name, $conf);
	my $d = $t->testdir();
	my $out = `$Test::Nginx::NGINX -t -p $d/ -c $name -e $d/$name.log 2>&1`;
	my $rc = $? >> 8;
	$out .= $t->read_file("$name.log");
	return ($rc, $out);
}

# POSTs $msg to the publisher location /pub?id=$ch; the whole response.
sub publish {
	my ($ch, $msg) = @_;
	my $len = length $msg;
	return Test::Nginx::http(<<EOR);
POST /pub?id=$ch HTTP/1.0
Host: localhost
Content-Length: $len

$msg
EOR
}

# Waits until $t's error.log matches $re at least $count times.
sub wait_log {
	my ($t, $re, $count) = @_;
	for (1 .. 100) {
		my @m = $t->read_file('error.log') =~ /$re/g;
		return 1 if @m >= $count;
		Time::HiRes::sleep(0.1);
	}
	return 0;
}

# Reads a socket for up to $secs seconds, or until what was read matches $until (or the
# peer closes); gives what was read.
sub read_for {
	my ($s, $secs, $until) = @_;
	my $buf = '';
	my $end = Time::HiRes::time() + $secs;
	while (Time::HiRes::time() < $end) {
		last if $until && $buf =~ $until;
		last unless IO::Select->new($s)->can_read($end - Time::HiRes::time());
		my $n = $s->sysread($buf, 65536, length $buf);
		last unless $n;
	}
	return $buf;
}

# A child that NOTIFYs $channel with $payload in a loop for $secs seconds, from its own
# session; gives its pid (kill it and waitpid when done).
sub flood {
	my ($pg, $channel, $payload, $secs) = @_;
	my $pid = fork();
	die "fork: $!\n" unless defined $pid;
	return $pid if $pid;
	my $dbh = DBI->connect('dbi:Pg:host=127.0.0.1;port=' . $pg->port . ';dbname=postgres',
		'postgres', '', { RaiseError => 1, PrintError => 0 });
	my $end = Time::HiRes::time() + $secs;
	$dbh->do('SELECT pg_notify(?, ?)', undef, $channel, $payload) while Time::HiRes::time() < $end;
	POSIX::_exit(0);
}

1;
