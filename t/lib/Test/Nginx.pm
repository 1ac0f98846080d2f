package Test::Nginx;

# pgpush's own implementation of the subset of the nginx-tests library API that our suites
# use. It is written to be interchangeable with nginx-tests' lib/Test/Nginx.pm: point
# PERL5LIB at that lib instead and the suites run unchanged.
#
# Environment:
#   TEST_NGINX_BINARY        nginx to run (default /usr/sbin/nginx)
#   TEST_NGINX_GLOBALS       extra main-context lines, e.g. "load_module /path/x.so;"
#   TEST_NGINX_GLOBALS_HTTP  extra http-context lines
#   TEST_NGINX_LEAVE         keep the test directory
#   TEST_NGINX_CATLOG        print error.log at the end
#   TEST_NGINX_VERBOSE       log requests and responses

use warnings;
use strict;

use base qw/ Exporter /;

our @EXPORT = qw/ log_in log_out http http_get http_head port /;
our @EXPORT_OK = qw/ http_start http_end http_content /;

use File::Path qw/ rmtree /;
use File::Temp qw/ tempdir /;
use IO::Socket::INET;
use POSIX qw/ WNOHANG /;
use Socket qw/ CRLF /;
use Test::More qw//;
use Time::HiRes qw/ sleep time /;

our $NGINX = $ENV{TEST_NGINX_BINARY} // '/usr/sbin/nginx';
our %ports;

sub new {
	my ($class) = @_;
	my $self = bless {
		_pid => $$,
		_alerts => 1,
		_daemons => [],
	}, ref($class) || $class || __PACKAGE__;

	$self->{_testdir} = tempdir('nginx-test-XXXXXXXXXX', TMPDIR => 1)
		or die "cannot create a test directory: $!\n";
	# workers may run as an unprivileged user and must reach files served from here
	chmod 0755, $self->{_testdir};

	Test::More::BAIL_OUT("no nginx binary at $NGINX") unless -x $NGINX;
	return $self;
}

sub DESTROY {
	my ($self) = @_;
	local $?;
	return if !defined $self->{_pid} || $self->{_pid} != $$;

	$self->stop();
	$self->stop_daemons();

	if (Test::More->builder->expected_tests) {
		local $Test::Nginx::TODO = 'alerts' unless $self->{_alerts};
		my @alerts = $self->read_file('error.log') =~ /.+\[alert\].+/gm;
		Test::More::is(join("\n", @alerts), '', 'no alerts');

		my @san = $self->read_file('error.log') =~ /.+Sanitizer.+/gm;
		Test::More::is(join("\n", @san), '', 'no sanitizer errors');
	}

	system('cat', "$self->{_testdir}/error.log") if $ENV{TEST_NGINX_CATLOG};
	if ($ENV{TEST_NGINX_LEAVE}) {
		Test::More::diag("test directory left in $self->{_testdir}");
	} else {
		eval { rmtree($self->{_testdir}) };
	}
}

###############################################################################
# feature checks

sub _nginx_v {
	my ($self) = @_;
	$self->{_v} //= `$NGINX -V 2>&1`;
	return $self->{_v};
}

# Skips the whole test file unless every named module/feature is available.
sub has {
	my ($self, @features) = @_;
	for my $f (@features) {
		next if $self->has_module($f);
		Test::More::plan(skip_all => "no $f available");
	}
	return $self;
}

my %without = (
	http => qr/--without-http(?!\S)/,
	rewrite => qr/--without-http_rewrite_module/,
	proxy => qr/--without-http_proxy_module/,
	access => qr/--without-http_access_module/,
	map => qr/--without-http_map_module/,
	fastcgi => qr/--without-http_fastcgi_module/,
	uwsgi => qr/--without-http_uwsgi_module/,
	scgi => qr/--without-http_scgi_module/,
	limit_req => qr/--without-http_limit_req_module/,
	limit_conn => qr/--without-http_limit_conn_module/,
	upstream_keepalive => qr/--without-http_upstream_keepalive_module/,
);

my %with = (
	http_ssl => qr/--with-http_ssl_module/,
	ssl => qr/--with-http_ssl_module/,
	http_v2 => qr/--with-http_v2_module/,
	realip => qr/--with-http_realip_module/,
	stub_status => qr/--with-http_stub_status_module/,
	auth_request => qr/--with-http_auth_request_module/,
	threads => qr/--with-threads/,
	stream => qr/--with-stream(?!_)/,
	debug => qr/--with-debug/,
);

sub has_module {
	my ($self, $feature) = @_;
	my $v = $self->_nginx_v();

	if ($feature eq 'pgpush') {
		return 1 if ($ENV{TEST_NGINX_GLOBALS} // '') =~ /pgpush/;
		return $v =~ /pgpush/ ? 1 : 0;
	}
	return $v !~ $without{$feature} ? 1 : 0 if exists $without{$feature};
	return $v =~ $with{$feature} ? 1 : 0 if exists $with{$feature};
	# unknown names: a configure argument mentioning it, or a dynamic module in globals
	return 1 if $v =~ /\Q$feature\E/;
	return 1 if ($ENV{TEST_NGINX_GLOBALS} // '') =~ /\Q$feature\E/;
	return 0;
}

sub has_version {
	my ($self, $need) = @_;
	my ($have) = $self->_nginx_v() =~ m!nginx/([0-9.]+)!;
	return 0 unless defined $have;
	my @h = split /\./, $have;
	my @n = split /\./, $need;
	for my $i (0 .. $#n) {
		my $x = $h[$i] // 0;
		return $x > $n[$i] ? 1 : 0 if $x != $n[$i];
	}
	return 1;
}

sub has_daemon {
	my ($self, $daemon) = @_;
	for my $dir (split /:/, $ENV{PATH} // '') {
		return $self if -x "$dir/$daemon";
	}
	Test::More::plan(skip_all => "$daemon not found");
	return $self;
}

sub plan {
	my ($self, $n) = @_;
	# two more: "no alerts" and "no sanitizer errors", checked when the object goes away
	Test::More::plan(tests => $n + 2);
	return $self;
}

sub todo_alerts {
	my ($self) = @_;
	$self->{_alerts} = 0;
	return $self;
}

###############################################################################
# files

sub testdir {
	my ($self) = @_;
	return $self->{_testdir};
}

sub read_file {
	my ($self, $name) = @_;
	open my $fh, '<', "$self->{_testdir}/$name" or return '';
	local $/;
	my $content = <$fh>;
	close $fh;
	return $content // '';
}

sub write_file {
	my ($self, $name, $content) = @_;
	open my $fh, '>', "$self->{_testdir}/$name"
		or die "cannot write $self->{_testdir}/$name: $!\n";
	binmode $fh;
	print $fh $content;
	close $fh;
	return $self;
}

sub write_file_expand {
	my ($self, $name, $content) = @_;
	$content =~ s/%%TEST_GLOBALS%%/$self->test_globals()/gme;
	$content =~ s/%%TEST_GLOBALS_HTTP%%/$self->test_globals_http()/gme;
	$content =~ s/%%TESTDIR%%/$self->{_testdir}/gm;
	$content =~ s/127\.0\.0\.1:(8\d\d\d)/'127.0.0.1:' . port($1)/gme;
	$content =~ s/%%PORT_(\d+)%%/port($1)/gme;
	return $self->write_file($name, $content);
}

sub test_globals {
	my ($self) = @_;
	return $self->{_test_globals} if defined $self->{_test_globals};
	my $s = "pid $self->{_testdir}/nginx.pid;\n"
		. "error_log $self->{_testdir}/error.log debug;\n";
	$s .= $ENV{TEST_NGINX_GLOBALS} . "\n" if $ENV{TEST_NGINX_GLOBALS};
	return $self->{_test_globals} = $s;
}

sub test_globals_http {
	my ($self) = @_;
	return $self->{_test_globals_http} if defined $self->{_test_globals_http};
	my $d = $self->{_testdir};
	my $s = "root $d;\naccess_log $d/access.log;\n"
		. "client_body_temp_path $d/client_body_temp;\n";
	$s .= "proxy_temp_path $d/proxy_temp;\n" if $self->has_module('proxy');
	$s .= "fastcgi_temp_path $d/fastcgi_temp;\n" if $self->has_module('fastcgi');
	$s .= "uwsgi_temp_path $d/uwsgi_temp;\n" if $self->has_module('uwsgi');
	$s .= "scgi_temp_path $d/scgi_temp;\n" if $self->has_module('scgi');
	$s .= $ENV{TEST_NGINX_GLOBALS_HTTP} . "\n" if $ENV{TEST_NGINX_GLOBALS_HTTP};
	return $self->{_test_globals_http} = $s;
}

###############################################################################
# ports

# A free local port standing for the configured one: tests write 127.0.0.1:8080 and get a
# port nobody else uses, the same one for the whole test file.
sub port {
	my ($num, %opts) = @_;
	unless (defined $ports{$num}) {
		my ($sock, $port);
		for my $try (1 .. 20) {
			$port = $try == 1 ? $num : int($num / 500) * 500 + int(rand(500));
			$sock = IO::Socket::INET->new(
				Proto => 'tcp',
				LocalAddr => "127.0.0.1:$port",
				Listen => 1,
				ReuseAddr => 1,
			) and last;
		}
		die "no free port near $num\n" unless $sock;
		# the socket is closed right away: nginx binds it next
		close $sock;
		$ports{$num} = { port => $port };
	}
	return $ports{$num}{port};
}

###############################################################################
# processes

sub run {
	my ($self, $conf) = @_;
	my $d = $self->{_testdir};

	if (defined $conf) {
		open my $fh, '<', $conf or die "cannot read $conf: $!\n";
		local $/;
		$self->write_file_expand('nginx.conf', <$fh>);
	}

	my $pid = fork();
	die "fork() failed: $!\n" unless defined $pid;
	if ($pid == 0) {
		my @g = $self->{_test_globals} ? ()
			: ('-g', "pid $d/nginx.pid; error_log $d/error.log debug;");
		exec($NGINX, '-p', "$d/", '-c', 'nginx.conf', '-e', 'error.log', @g)
			or die "exec $NGINX failed: $!\n";
	}
	$self->{_nginx_pid} = $pid;

	$self->waitforfile("$d/nginx.pid", $pid)
		or die "cannot start nginx:\n" . $self->read_file('error.log');

	$self->{_started} = 1;
	return $self;
}

sub try_run {
	my ($self, $message) = @_;
	eval {
		open my $olderr, '>&', \*STDERR;
		close STDERR;
		eval { $self->run() };
		my $e = $@;
		open STDERR, '>&', $olderr;
		die $e if $e;
	};
	return $self unless $@;
	log_core('||', $self->read_file('error.log')) if $ENV{TEST_NGINX_VERBOSE};
	Test::More::plan(skip_all => $message);
	return $self;
}

sub waitforfile {
	my ($self, $file, $pid) = @_;
	for (1 .. 100) {
		return 1 if -e $file;
		if (defined $pid) {
			return 0 if waitpid($pid, WNOHANG) == $pid;
		}
		sleep 0.05;
	}
	return 0;
}

sub waitforsocket {
	my ($self, $peer) = @_;
	for (1 .. 100) {
		my $s = IO::Socket::INET->new(Proto => 'tcp', PeerAddr => $peer);
		return 1 if $s;
		sleep 0.05;
	}
	return 0;
}

sub reload {
	my ($self) = @_;
	return $self unless $self->{_started};
	my $pid = $self->read_file('nginx.pid');
	chomp $pid;
	kill 'HUP', $pid if $pid;
	return $self;
}

sub stop {
	my ($self) = @_;
	return $self unless $self->{_started};

	my $pid = $self->{_nginx_pid};
	my $master = $self->read_file('nginx.pid');
	chomp $master;
	$pid = $master if $master;

	kill 'QUIT', $pid;
	my $exited = 0;
	for (1 .. 200) {
		if ($self->{_nginx_pid} && waitpid($self->{_nginx_pid}, WNOHANG) != 0) {
			$exited = 1;
			last;
		}
		sleep 0.05;
	}
	unless ($exited) {
		kill 'TERM', $pid;
		waitpid($self->{_nginx_pid}, 0) if $self->{_nginx_pid};
	}

	$self->{_started} = 0;
	return $self;
}

# Runs a helper process (a sub or a command line) for the duration of the test.
sub run_daemon {
	my ($self, $code, @args) = @_;
	my $pid = fork();
	die "fork() failed: $!\n" unless defined $pid;
	if ($pid == 0) {
		if (ref $code eq 'CODE') {
			$code->(@args);
			POSIX::_exit(0);
		}
		exec($code, @args) or die "exec $code failed: $!\n";
	}
	push @{$self->{_daemons}}, $pid;
	return $self;
}

sub stop_daemons {
	my ($self) = @_;
	while (my $pid = shift @{$self->{_daemons}}) {
		kill 'TERM', $pid;
		for (1 .. 100) {
			last if waitpid($pid, WNOHANG) != 0;
			sleep 0.05;
		}
		if (kill 0, $pid) {
			kill 'KILL', $pid;
			waitpid($pid, 0);
		}
	}
	return $self;
}

###############################################################################
# HTTP client

sub log_core {
	return unless $ENV{TEST_NGINX_VERBOSE};
	my ($prefix, $msg) = @_;
	($prefix, $msg) = ('', $prefix) unless defined $msg;
	$prefix .= ' ' if length $prefix;
	$msg =~ s/^/# $prefix/gm;
	$msg .= "\n" unless $msg =~ /\n\z/;
	print $msg;
}

sub log_out { log_core('>>', @_) }
sub log_in { log_core('<<', @_) }

sub http_get {
	my ($url, %extra) = @_;
	return http(<<EOF, %extra);
GET $url HTTP/1.0
Host: localhost

EOF
}

sub http_head {
	my ($url, %extra) = @_;
	return http(<<EOF, %extra);
HEAD $url HTTP/1.0
Host: localhost

EOF
}

# Sends a raw request (LF line ends become CRLF) and returns the whole response.
# Options: socket => existing socket, start => 1 to return the socket after sending,
# body => extra bytes sent after the request, sleep => seconds before the body.
sub http {
	my ($request, %extra) = @_;
	my $s = http_start($request, %extra) or return;
	return $s if $extra{start};
	return http_end($s, %extra);
}

sub http_start {
	my ($request, %extra) = @_;
	my $s;
	eval {
		local $SIG{ALRM} = sub { die "timeout\n" };
		alarm(8);
		$s = $extra{socket} || IO::Socket::INET->new(
			Proto => 'tcp',
			PeerAddr => '127.0.0.1:' . port($extra{port} || 8080),
		) or die "cannot connect: $!\n";
		$request =~ s/(?<!\r)\n/\r\n/g unless $extra{raw};
		log_out($request);
		$s->print($request);
		if (defined $extra{body}) {
			sleep $extra{sleep} if $extra{sleep};
			log_out($extra{body});
			$s->print($extra{body});
		}
		alarm(0);
	};
	alarm(0);
	if ($@) {
		log_in("died: $@");
		return undef;
	}
	return $s;
}

sub http_end {
	my ($s, %extra) = @_;
	my $reply = '';
	eval {
		local $SIG{ALRM} = sub { die "timeout\n" };
		alarm($extra{timeout} || 8);
		local $/;
		$reply = $s->getline() // '';
		alarm(0);
	};
	alarm(0);
	if ($@) {
		log_in("died: $@");
		return undef;
	}
	log_in($reply);
	return $reply;
}

sub http_content {
	my ($text) = @_;
	return undef unless defined $text;
	my ($headers, $body) = split /\x0d?\x0a\x0d?\x0a/, $text, 2;
	return $body // '' unless $headers =~ /Transfer-Encoding: chunked/i;
	my $content = '';
	while ($body =~ /\G\x0d?\x0a?([0-9a-f]+)\x0d\x0a?/gcmsi) {
		my $len = hex($1);
		$content .= substr($body, pos($body), $len);
		pos($body) += $len;
	}
	return $content;
}

1;
