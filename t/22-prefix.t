#!/usr/bin/perl

# push_stream_postgres_channel_prefix: the PostgreSQL channel is prefix + channel id, for
# LISTEN, for pg_notify from the publisher and in the 63-byte limit; templates still show
# the channel id without the prefix.

use warnings;
use strict;

use Test::More;
use Time::HiRes qw/ sleep /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush::PG;
use PgPush::WS;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http/)->plan(8);

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
    push_stream_postgres_channel_prefix "app_";

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location /ws {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_message_template "~channel~: ~text~";
        }

        location /pub {
            push_stream_publisher;
            push_stream_channels_path \$arg_id;
        }
    }
}

EOF

$t->run();

my $ws = PgPush::WS->connect('/ws?id=news');
is($ws->{status}, 101, 'subscribed');
ok($pg->wait_query(qr/LISTEN "app_news"/), 'LISTEN on prefix + id');
$pg->notify('news', 'unprefixed');
$pg->notify('app_news', 'prefixed');
is($ws->payload, 'news: prefixed', 'NOTIFY on prefix + id delivered, the template shows the id');

my $r = http(<<EOR);
POST /pub?id=news HTTP/1.0
Host: localhost
Content-Length: 4

http
EOR
like($r, qr/^HTTP\/1\.1 200.*"channel": "news"/ms, 'the publisher answers with the id');
is($ws->payload, 'news: http', 'the publisher notifies prefix + id');

# 4 + 59 = 63 bytes fits, 4 + 60 is LISTENed under a derived name
$ws = PgPush::WS->connect('/ws?id=' . ('y' x 59));
$pg->notify('app_' . ('y' x 59), 'fits');
is($ws->payload, ('y' x 59) . ': fits', '63 bytes with the prefix');
# (the 63-byte subscriber stays: its leaving would UNLISTEN after the LISTEN looked for)
my $long = PgPush::WS->connect('/ws?id=' . ('y' x 60));
my ($derived) = @{$pg->query("SELECT 'pgpush_' || md5(?)", 'app_' . ('y' x 60))->[0]};
ok($pg->wait_query(qr/LISTEN "\Q$derived\E"/, 1), 'over 63 bytes with the prefix: a derived LISTEN name');
$pg->notify($derived, "\x1bm" . '{"c":"' . ('y' x 60) . '","t":"derived"}');
is($long->payload, ('y' x 60) . ': derived', 'the notification names the id');

###############################################################################
