#!/usr/bin/perl

# The push-stream fork's HTTP hooks: push_stream_client_subscribed_request,
# push_stream_client_unsubscribed_request and push_stream_client_publish_request are
# subrequests to locations (here proxied to a small recording upstream, or answered by
# `return`). The subscribed call is made once per subscriber, with the client's args when
# the target has no `?`; the unsubscribed call exactly once per subscriber, after a close
# frame, a TCP reset, the connection ttl, and on reload; each client message is POSTed to
# the publish hook and a 2xx body comes back to that sender only, in order, whether or not
# allow_publish is on. A failing hook is logged with its status and the subscriber stays.

use warnings;
use strict;

use Test::More;
use Time::HiRes qw/ sleep /;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush qw/ wait_log /;
use PgPush::App;
use PgPush::PG;
use PgPush::WS;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/http proxy/)->plan(23);

my $pg = PgPush::PG->start();
my $conninfo = $pg->conninfo;
my $app = Test::Nginx::port(8081);
my $dead = Test::Nginx::port(8082);

$t->write_file_expand('nginx.conf', <<"EOF");

%%TEST_GLOBALS%%

daemon off;
worker_processes 2;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    push_stream_postgres "$conninfo";
    push_stream_postgres_reconnect 50ms 200ms;

    server {
        listen       127.0.0.1:8080 reuseport;
        server_name  localhost;

        location /ws {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_websocket_allow_publish on;
            push_stream_client_subscribed_request /subscribe;
            push_stream_client_unsubscribed_request /unsubscribe;
            push_stream_client_publish_request /publish;
        }

        location /ttl {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_subscriber_connection_ttl 1s;
            push_stream_client_unsubscribed_request /unsubscribe?ttl=\$arg_id;
        }

        location /returned {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_client_publish_request /answer;
        }

        location /failing {
            push_stream_subscriber websocket;
            push_stream_channels_path \$arg_id;
            push_stream_client_subscribed_request /unreachable;
        }

        location = /subscribe   { internal; proxy_pass http://127.0.0.1:$app; }
        location = /unsubscribe { internal; proxy_pass http://127.0.0.1:$app; }
        location = /publish     { internal; proxy_pass http://127.0.0.1:$app; }
        location = /answer      { internal; return 200 "answered \$arg_id"; }
        location = /unreachable { internal; proxy_pass http://127.0.0.1:$dead; }
    }
}

EOF

# the recording application: /publish echoes the body
my $rec = PgPush::App->start($t, 8081, sub { $_[1] =~ m!^/publish! ? "echo:$_[2]" : '' }, hex => 1);
$t->run();
ok($pg->wait_sessions(2), 'two side connections');

sub calls { $rec->calls(@_) }
sub wait_calls { $rec->wait(@_) }

###############################################################################

# subscribed: once per subscriber, with its args

my $ws = PgPush::WS->connect('/ws?id=room&user=alice');
is($ws->{status}, 101, 'subscribed');
my $other = PgPush::WS->connect('/ws?id=room&user=bob');
is(wait_calls(qr{^GET /subscribe\?id=room&user=(alice|bob) $}, 2), 2,
	'one subscribed call per subscriber, with the client\'s args');

# publish: the body is POSTed; the answer comes back to the sender only, in order

$ws->send_text("m$_") for 1 .. 5;
my @got;
while (@got < 10) {
	my $p = $ws->payload(3);
	last unless defined $p;
	push @got, $p;
}
is(join(',', grep { /^echo:/ } @got), 'echo:m1,echo:m2,echo:m3,echo:m4,echo:m5',
	'each publish answer comes back to the sender, in order');
is(join(',', grep { !/^echo:/ } @got), 'm1,m2,m3,m4,m5', 'and the messages are published (allow_publish on)');
my @other;
while (defined(my $p = $other->payload(1))) { push @other, $p; }
is(join(',', @other), 'm1,m2,m3,m4,m5', 'the other subscriber gets the messages, not the answers');
is(wait_calls(qr{^POST /publish\?id=room&user=alice }, 5), 5, 'five POSTs to the publish hook');
my ($first) = calls(qr{^POST /publish});
like($first, qr/ 6d31$/, 'with the message as the body');

$ws->send_binary("\x00\xff");
is(wait_calls(qr{^POST /publish\S* 00ff$}, 1), 1, 'a binary message is POSTed byte-exact');
$ws->payload for 1 .. 2;

# a `return` location answers too; allow_publish off does not stop the hook
my $ret = PgPush::WS->connect('/returned?id=r1');
$ret->send_text('q');
is($ret->payload, 'answered r1', 'any handler can answer: return');

###############################################################################

# unsubscribed: exactly once, after a close frame and after a TCP reset

$ws->close(1000);
is(wait_calls(qr{^GET /unsubscribe\?id=room&user=alice $}, 1), 1, 'unsubscribed after a close frame');
$other->{sock}->close();
is(wait_calls(qr{^GET /unsubscribe\?id=room&user=bob $}, 1), 1, 'unsubscribed after a TCP close');
sleep(0.5);
is(scalar calls(qr{^GET /unsubscribe\?id=room}), 2, 'exactly once each');

# the connection ttl, with a target that has its own args
my $ttl = PgPush::WS->connect('/ttl?id=t1');
my $m = $ttl->read_message(3);
$m = $ttl->read_message(3) while $m && $m->{opcode} != 8;
$ttl->close();
is(wait_calls(qr{^GET /unsubscribe\?ttl=t1 $}, 1), 1, 'unsubscribed at the connection ttl, args from the target');

###############################################################################

# a failing hook is logged with its status; the subscriber stays

my $f = PgPush::WS->connect('/failing?id=f1');
is($f->{status}, 101, 'a failing subscribed hook does not refuse the subscriber');
ok(wait_log($t, qr/\[warn\].*push_stream_client_subscribed_request "\/unreachable" failed with status 502/, 1),
	'the failure is logged at warn with its status');
$f->ping('still');
is($f->read_message(3)->{opcode}, 10, 'and the subscriber stays');
$pg->notify('f1', 'after');
is($f->payload, 'after', 'and gets messages');
undef $f;

###############################################################################

# reload: every subscriber's unsubscribed call is made before the old workers exit

my @subs = map { PgPush::WS->connect("/ws?id=reload&user=r$_") } 1 .. 4;
is(wait_calls(qr{^GET /subscribe\?id=reload}, 4), 4, 'four subscribed');
$t->reload();
is(wait_calls(qr{^GET /unsubscribe\?id=reload}, 4), 4, 'reload: four unsubscribed calls');
ok(wait_log($t, qr/gracefully shutting down/, 2), 'old workers shut down');
undef @subs;
sleep(0.5);
is(scalar calls(qr{^GET /unsubscribe\?id=reload}), 4, 'exactly once each');
unlike($t->read_file('error.log'), qr/has no effect/, 'the hook directives are not reported as without effect');

###############################################################################
