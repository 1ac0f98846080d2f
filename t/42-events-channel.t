#!/usr/bin/perl

# push_stream_events_channel_id: a channel that carries push-stream's events about the
# others ({"type": "channel_created|channel_destroyed|client_subscribed|client_unsubscribed",
# "channel": "ID"}, with the type as event type), through PostgreSQL; subscribing to it
# needs push_stream_allow_connections_to_events_channel, and only pgpush writes to it.

use warnings;
use strict;

use IO::Socket::INET;
use Test::More;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush qw/ publish /;
use PgPush::PG;
use PgPush::WS;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http/)->plan(18);

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
    push_stream_events_channel_id "events";
    push_stream_channel_inactivity_time 1s;

    server {
        listen       127.0.0.1:8080 reuseport;
        server_name  localhost;

        location /ev {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_allow_connections_to_events_channel on;
            push_stream_message_template "~event-type~|~channel~|~text~";
        }

        location /sub {
            push_stream_subscriber;
            push_stream_channels_path \$arg_id;
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
unlike($t->read_file('error.log'), qr/has no effect/, 'the events directives have their effect');

like(http_get('/pub?id=events'), qr/^HTTP\/1\.1 200.*"channel": "events"/s, 'the events channel exists from the start');
like(http_get('/sub?id=events'), qr/^HTTP\/1\.1 403.*X-Nginx-PushStream-Explain: Subscription to events channel is not allowed\./s,
	'subscribing needs push_stream_allow_connections_to_events_channel');

my $ev = PgPush::WS->connect('/ev?id=events');
is($ev->{status}, 101, 'an events subscriber');

publish('c1', 'hello');
is($ev->payload, 'channel_created|events|{"type": "channel_created", "channel": "c1"}',
	'a publish creates a channel');

my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1:' . port(8080)) or die "$!\n";
$s->syswrite("GET /sub?id=c1 HTTP/1.1\r\nHost: localhost\r\n\r\n");
is($ev->payload, 'client_subscribed|events|{"type": "client_subscribed", "channel": "c1"}',
	'a subscriber joins');
close $s;
is($ev->payload, 'client_unsubscribed|events|{"type": "client_unsubscribed", "channel": "c1"}',
	'and leaves');

like(http("DELETE /pub?id=c1 HTTP/1.0\r\nHost: localhost\r\n\r\n"), qr/^HTTP\/1\.1 200/, 'DELETE');
is($ev->payload, 'channel_destroyed|events|{"type": "channel_destroyed", "channel": "c1"}',
	'destroys it');

# a channel deleted under its subscribers: they are unsubscribed, then it is destroyed
my $held = PgPush::WS->connect('/ev?id=held');
is(join(' ', map { $ev->payload } 1 .. 2),
	'channel_created|events|{"type": "channel_created", "channel": "held"} '
	. 'client_subscribed|events|{"type": "client_subscribed", "channel": "held"}',
	'a subscriber creates a channel, then joins it');
like(http("DELETE /pub?id=held HTTP/1.0\r\nHost: localhost\r\n\r\n"), qr/^HTTP\/1\.1 200/, 'DELETE it');
is(join(' ', map { $ev->payload } 1 .. 2),
	'client_unsubscribed|events|{"type": "client_unsubscribed", "channel": "held"} '
	. 'channel_destroyed|events|{"type": "channel_destroyed", "channel": "held"}',
	'its subscriber is unsubscribed, then the channel destroyed');

# a subscriber of the events channel and a new one: the channel is created before it is
# subscribed, so it hears of its subscription only (push-stream's order)
my $both = PgPush::WS->connect('/ev?id=events/fresh');
is($both->payload, 'client_subscribed|events|{"type": "client_subscribed", "channel": "fresh"}',
	'a subscriber does not hear of the creation of its own channel');
is(join(' ', map { $ev->payload } 1 .. 2),
	'channel_created|events|{"type": "channel_created", "channel": "fresh"} '
	. 'client_subscribed|events|{"type": "client_subscribed", "channel": "fresh"}',
	'the others do');

publish('idle', 'x');
is($ev->payload, 'channel_created|events|{"type": "channel_created", "channel": "idle"}', 'another channel');
is($ev->payload(9), 'channel_destroyed|events|{"type": "channel_destroyed", "channel": "idle"}',
	'dropped once inactive');

like(publish('events', 'forged'), qr/^HTTP\/1\.1 403.*X-Nginx-PushStream-Explain: Only internal routines can change events channel\./s,
	'nobody publishes to the events channel');
