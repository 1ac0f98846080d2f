package PgPush::PG;

# A throwaway PostgreSQL cluster for a test file, started through scripts/pg and driven with
# DBD::Pg. It is stopped (and its directory removed) when the object goes away.
#
#   my $pg = PgPush::PG->start();
#   $pg->conninfo;                     "host=127.0.0.1 port=N user=postgres dbname=postgres"
#   $pg->notify('ch', 'payload');
#   $pg->query('SELECT pg_listening_channels()');   list of row arrayrefs
#   $pg->sessions;                     pgpush side connections: [pid, state, last query]
#   $pg->restart;  $pg->halt;  $pg->terminate_sessions;

use warnings;
use strict;

use Test::More qw//;
use Time::HiRes qw//;

use DBI;
use File::Temp qw/ tempdir /;
use FindBin;

sub root {
	my $dir = __FILE__;
	$dir =~ s!/t/lib/PgPush/PG\.pm$!!;
	$dir = "$FindBin::Bin/.." unless -x "$dir/scripts/pg";
	return $dir;
}

# Every statement goes to the server log, prefixed with the session's pid and application
# name, so that a test can see a statement even when the session has run another since.
our $LOG_OPTS = '-c log_statement=all -c log_line_prefix=%p/%a:';

sub start {
	my ($class) = @_;
	my $dir = tempdir('pgpush-pg-XXXXXXXX', TMPDIR => 1);
	my $pg = root() . '/scripts/pg';
	local $ENV{PGPUSH_PG_OPTS} = $LOG_OPTS;
	my $conninfo = `$pg start $dir`;
	die "scripts/pg start failed\n" if $? != 0;
	chomp $conninfo;
	my ($port) = $conninfo =~ /port=(\d+)/;
	return bless {
		dir => $dir, conninfo => $conninfo, port => $port, pid => $$, script => $pg,
	}, $class;
}

sub conninfo { $_[0]{conninfo} }
sub port { $_[0]{port} }
sub dir { $_[0]{dir} }

sub dbh {
	my ($self) = @_;
	return $self->{dbh} if $self->{dbh} && $self->{dbh}->ping;
	$self->{dbh} = DBI->connect(
		"dbi:Pg:host=127.0.0.1;port=$self->{port};dbname=postgres", 'postgres', '',
		{ RaiseError => 1, PrintError => 0, AutoCommit => 1 },
	);
	return $self->{dbh};
}

sub do {
	my ($self, $sql, @bind) = @_;
	return $self->dbh->do($sql, undef, @bind);
}

sub query {
	my ($self, $sql, @bind) = @_;
	return $self->dbh->selectall_arrayref($sql, undef, @bind);
}

sub notify {
	my ($self, $channel, $payload) = @_;
	return $self->do('SELECT pg_notify(?, ?)', $channel, $payload);
}

# The side connections of pgpush workers (application_name 'pgpush'). A session's LISTEN
# set is private to it, so tests observe it through delivery and through the last statement
# each session ran (pg_stat_activity.query).
sub sessions {
	my ($self) = @_;
	return $self->query(
		"SELECT pid, state, query FROM pg_stat_activity WHERE application_name = 'pgpush' "
		. "ORDER BY pid");
}

# Waits until there are $n side connections (at least one if $n is undef).
sub wait_sessions {
	my ($self, $n) = @_;
	for (1 .. 100) {
		my $rows = eval { $self->sessions() } || [];
		return 1 if defined $n ? @$rows == $n : @$rows > 0;
		Time::HiRes::sleep(0.1);
	}
	return 0;
}

# Forgets the statements logged so far: wait_query then sees only those that come after.
sub mark {
	my ($self) = @_;
	$self->{mark} = -s "$self->{dir}/postgres.log" // 0;
	return $self;
}

# The statements (simple or prepared) pgpush side connections ran since the mark, from the server log, as
# [pid, statement].
sub logged {
	my ($self) = @_;
	open(my $fh, '<', "$self->{dir}/postgres.log") or return [];
	seek($fh, $self->{mark} // 0, 0);
	my @rows;
	while (my $line = <$fh>) {
		push @rows, [$1, $2] if $line =~ m!^(\d+)/pgpush:LOG:  (?:statement|execute [^:]*): (.*)$!;
	}
	return \@rows;
}

# Waits until at least $count side connections (default 1) ran a statement matching $re
# since the mark, for up to $seconds (default 5); says what they ran if that never happens.
sub wait_query {
	my ($self, $re, $count, $seconds) = @_;
	$count //= 1;
	for (1 .. 10 * ($seconds // 5)) {
		my %pids = map { $_->[0] => 1 } grep { $_->[1] =~ $re } @{$self->logged()};
		return 1 if keys(%pids) >= $count;
		Time::HiRes::sleep(0.1);
	}
	my $rows = eval { $self->sessions() } || [];
	Test::More::diag('last statements: ' . join(' | ', map { $_->[2] // '' } @$rows));
	return 0;
}

sub terminate_sessions {
	my ($self) = @_;
	return $self->query(
		"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pgpush'");
}

sub restart {
	my ($self) = @_;
	delete $self->{dbh};
	local $ENV{PGPUSH_PG_OPTS} = $LOG_OPTS;
	system($self->{script}, 'restart', $self->{dir}) == 0 or die "scripts/pg restart failed\n";
	return $self;
}

# Stops the server but keeps the cluster, to be started again with restart().
sub halt {
	my ($self) = @_;
	delete $self->{dbh};
	local $ENV{PGPUSH_PG_KEEP} = 1;
	system($self->{script}, 'stop', $self->{dir}) == 0 or die "scripts/pg stop failed\n";
	return $self;
}

sub stop {
	my ($self) = @_;
	return unless $self->{dir} && $self->{pid} == $$;
	if ($self->{dbh}) {
		$self->{dbh}->disconnect;
		delete $self->{dbh};
	}
	system($self->{script}, 'stop', $self->{dir});
	delete $self->{dir};
}

sub DESTROY {
	my ($self) = @_;
	local $?;
	$self->stop();
}

1;
