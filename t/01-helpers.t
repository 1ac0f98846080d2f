#!/usr/bin/perl

# The suites' own helpers, checked before anything relies on them: the WebSocket client's
# frame builder and parser agree with each other and with RFC 6455's examples, and the
# PostgreSQL helper starts a throwaway cluster that takes SQL and NOTIFY.

use warnings;
use strict;

use Test::More;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use PgPush::WS;
use PgPush::PG;

###############################################################################

plan(tests => 11);

# RFC 6455 section 5.7: an unmasked "Hello" text frame, and a masked one
my $ws = bless { buf => "\x81\x05\x48\x65\x6c\x6c\x6f" }, 'PgPush::WS';
my $f = $ws->_parse();
is_deeply([@$f{qw/fin opcode masked payload/}], [1, 1, 0, 'Hello'], 'unmasked frame parsed');

$ws->{buf} = "\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58";
$f = $ws->_parse();
is_deeply([@$f{qw/fin opcode masked payload/}], [1, 1, 1, 'Hello'], 'masked frame parsed');

# fragments: "Hel" + "lo"
$ws->{buf} = "\x01\x03\x48\x65\x6c" . "\x80\x02\x6c\x6f";
is($ws->_parse()->{fin}, 0, 'first fragment not final');
is($ws->_parse()->{opcode}, 0, 'continuation frame');

# our builder, with and without mask, at the three length encodings
for my $len (5, 300, 70000) {
	$ws->{buf} = PgPush::WS->frame(opcode => 2, payload => 'x' x $len);
	$f = $ws->_parse();
	ok($f && $f->{masked} && length($f->{payload}) == $len && $ws->{buf} eq '',
		"masked binary frame of $len bytes round-trips");
}
$ws->{buf} = PgPush::WS->frame(opcode => 9, payload => 'p', mask => 0, fin => 1);
is_deeply([@{$ws->_parse()}{qw/opcode masked payload/}], [9, 0, 'p'], 'unmasked ping');

is_deeply([PgPush::WS->close_status({ opcode => 8, payload => "\x03\xf0{}" })], [1008, '{}'],
	'close status decoded');

# the PostgreSQL helper: a cluster of our own, SQL and NOTIFY
my $pg = PgPush::PG->start();
like($pg->conninfo, qr/^host=127\.0\.0\.1 port=\d+ user=postgres dbname=postgres$/,
	'conninfo printed');
$pg->do('LISTEN "Mixed Case"');
$pg->notify('Mixed Case', 'payload');
my $n = $pg->dbh->pg_notifies;
is_deeply([$n->[0], $n->[2]], ['Mixed Case', 'payload'], 'NOTIFY through DBD::Pg');

###############################################################################
