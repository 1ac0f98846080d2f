#!/usr/bin/perl

# Channel ids of any length: a channel (prefix + id) longer than PostgreSQL's 63-byte
# identifiers is LISTENed under 'pgpush_' || md5(channel), which SQL computes too, and its
# notifications carry the full id, so channels that share a derived name never receive
# each other's messages.

use warnings;
use strict;

use Test::More;
use JSON::PP;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush qw/ publish /;
use PgPush::PG;
use PgPush::WS;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http/)->plan(15);

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
    push_stream_postgres_channel_prefix "app_";

    server {
        listen       127.0.0.1:8080 reuseport;
        server_name  localhost;

        location /ws {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_websocket_allow_publish on;
        }

        location /pub {
            push_stream_publisher admin;
            push_stream_channels_path \$arg_id;
        }
    }
}

EOF

$t->run();
ok($pg->wait_sessions(2), 'a side connection per worker');

my $long = 'channel_' . ('x' x 150) . '_end';
my $other = 'other_' . ('y' x 100);
my ($derived) = @{$pg->query(
	"SELECT CASE WHEN octet_length(c) <= 63 THEN c ELSE 'pgpush_' || md5(c) END
	   FROM (SELECT 'app_' || ?::text AS c) s", $long)->[0]};

my @subs = map { PgPush::WS->connect("/ws?id=$long") } 1 .. 6;
is(join(',', map { $_->{status} } @subs), join(',', (101) x 6), 'a 162-byte id is accepted');
ok($pg->wait_query(qr/LISTEN "\Q$derived\E"/, 1), 'LISTENed under the name SQL computes');

like(publish($long, 'to the long one'), qr/^HTTP\/1\.1 200.*"channel": "\Q$long\E", "published_messages": 1/s,
	'the publisher takes it, and its info names the full id');
is(join(',', map { $_->payload } @subs), join(',', ('to the long one') x 6),
	'every subscriber, in both workers, gets it');

# from SQL: the notification names the channel it is for
$pg->notify($derived, "\x1bm" . encode_json({ c => $long, t => 'from SQL' }));
is($subs[0]->payload, 'from SQL', 'a notification from SQL that names the id');
$pg->notify($derived, "\x1bm" . encode_json({ c => 'not_this_one', t => 'elsewhere' }));
$pg->notify($derived, 'bare');
is($subs[0]->payload, 'bare',
	'one that names another id is not delivered; one naming none goes to the name\'s channels');
# every worker has delivered both before anyone subscribes again: a worker still busy
# would hand a subscriber that joins meanwhile what was sent before it joined
is(join(',', map { $_->payload . '+' . $_->payload } @subs[1 .. 5]),
	join(',', ('from SQL+bare') x 5), 'in every worker');

# client publish and a second long channel on the same subscriber
my $both = PgPush::WS->connect("/ws?id=$long/$other");
is($both->{status}, 101, 'two long channels in one path');
$both->send_text('from a client');
is($both->payload, 'from a client', 'the sender gets its message once per channel');
is($both->payload, 'from a client', 'twice');
is($subs[1]->payload, 'from a client',
	'another subscriber gets what was sent, and only that');
my $stray = $subs[1]->read_frame(0.5);
ok(!$stray, 'and nothing from the other channel');

# DELETE names the full id too
like(http("DELETE /pub?id=$other HTTP/1.0\r\nHost: localhost\r\n\r\n"), qr/^HTTP\/1\.1 200/, 'DELETE of a long channel');
is($both->payload, 'Channel deleted', 'reaches its subscriber');
