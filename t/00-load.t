#!/usr/bin/perl

# The foundation: the module loads into nginx (one and two workers, and across a reload),
# every example configuration in nginx-conf/ passes `nginx -t`, and bad configurations fail
# `nginx -t` with the exact [emerg] text, file and line a user would need. It also keeps
# README.md's directive reference in step with the directive table.

use warnings;
use strict;

use Test::More;

BEGIN { use FindBin; chdir($FindBin::Bin); }

BEGIN { push @INC, "$FindBin::Bin/lib"; }
use Test::Nginx;
use PgPush qw/ config_test repo_root /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $root = repo_root();
my @examples = sort glob("$root/nginx-conf/*.conf");
my @directives = directive_table();

open my $rd, '<', "$root/README.md" or die "README.md: $!";
my $readme = do { local $/; <$rd> };
close $rd;

# Each bad configuration: [name, directives (http level), location body, expected message,
# and optionally the main-context prefix]. The first line of the location body, or of the
# http part when the location is empty, is where nginx must point.
my @bad = (
	['duplicate flag', '', "push_stream_store_messages on;\n push_stream_store_messages off;",
		qr/"push_stream_store_messages" directive is duplicate in %F:%L1/],
	['bad flag', '', 'push_stream_store_messages yes;',
		qr/invalid value "yes" in "push_stream_store_messages" directive, it must be "on" or "off" in %F:%L/],
	['bad number', 'push_stream_max_channel_id_length abc;', '',
		qr/invalid value "abc" in "push_stream_max_channel_id_length" directive, it must be a number in %F:%H/],
	['zero limit', 'push_stream_max_subscribers_per_channel 0;', '',
		qr/invalid value "0" in "push_stream_max_subscribers_per_channel" directive, push_stream_max_subscribers_per_channel cannot be zero in %F:%H/],
	['bad time', '', 'push_stream_ping_message_interval 10x;',
		qr/invalid value "10x" in "push_stream_ping_message_interval" directive, it must be a time, e\.g\. "500ms", "30s", "1m" in %F:%L/],
	['zero time', 'push_stream_message_ttl 0;', '',
		qr/invalid value "0" in "push_stream_message_ttl" directive, push_stream_message_ttl cannot be zero in %F:%H/],
	['bad subscriber mode', '', "push_stream_subscriber websockets;\n push_stream_channels_path \$arg_id;",
		qr/invalid value "websockets" in "push_stream_subscriber" directive, invalid push_stream_subscriber mode value: websockets, accepted values \(streaming, polling, long-polling, eventsource, websocket\) in %F:%L/],
	['bad publisher mode', '', "push_stream_publisher root;\n push_stream_channels_path \$arg_id;",
		qr/invalid value "root" in "push_stream_publisher" directive, invalid push_stream_publisher mode value: root, accepted values \(normal, admin\) in %F:%L/],
	['subscriber without channels path', '', 'push_stream_subscriber websocket;',
		qr/push stream module: push_stream_channels_path must be set\. \("push_stream_subscriber" needs it\) in %F:%L/],
	['publisher without channels path', '', 'push_stream_publisher;',
		qr/push stream module: push_stream_channels_path must be set\. \("push_stream_publisher" needs it\) in %F:%L/],
	['subscriber and publisher in one location', '',
		"push_stream_channels_path \$arg_id;\n push_stream_subscriber;\n push_stream_publisher;",
		qr/"push_stream_publisher" cannot be combined with "push_stream_subscriber" in one location in %F:%L2/],
	['duplicate subscriber', '',
		"push_stream_channels_path \$arg_id;\n push_stream_subscriber;\n push_stream_subscriber;",
		qr/"push_stream_subscriber" directive is duplicate in %F:%L2/],
	['subscriber outside location', 'push_stream_subscriber;', '',
		qr/"push_stream_subscriber" directive is not allowed here in %F:%H/],
	['wrong number of arguments', 'push_stream_postgres_reconnect 1s;', '',
		qr/invalid number of arguments in "push_stream_postgres_reconnect" directive in %F:%H/],
	['reconnect min above max', 'push_stream_postgres_reconnect 10s 1s;', '',
		qr/invalid value "10s 1s" in "push_stream_postgres_reconnect" directive, the minimum must not exceed the maximum in %F:%H/],
	['reconnect bad time', 'push_stream_postgres_reconnect soon 1s;', '',
		qr/invalid value "soon" in "push_stream_postgres_reconnect" directive, it must be a time, e\.g\. "500ms", "30s", "1m" in %F:%H/],
	['malformed conninfo, password masked', 'push_stream_postgres "postgres://app:hunter2@db:notaport/x";', '',
		qr/invalid value "postgres:\/\/app:\*\*\*\*\*\*\*\*\@db:notaport\/x" in "push_stream_postgres" directive, invalid connection string: invalid value for option `port` in %F:%H/],
	['conninfo without user', 'push_stream_postgres "host=127.0.0.1 password=hunter2 dbname=x";', '',
		qr/invalid value "host=127\.0\.0\.1 password=\*\*\*\*\*\*\*\* dbname=x" in "push_stream_postgres" directive, no "user" given \(add user=\.\.\. or postgres:\/\/user\@host\/db\) in %F:%H/],
	['conninfo unknown option', 'push_stream_postgres "user=a colour=blue";', '',
		qr/invalid value "user=a colour=blue" in "push_stream_postgres" directive, .*unknown option `colour` in %F:%H/],
	['empty conninfo', 'push_stream_postgres "";', '',
		qr/invalid value "" in "push_stream_postgres" directive, empty connection string in %F:%H/],
	['duplicate conninfo', "push_stream_postgres \"user=a\";\n push_stream_postgres \"user=b\";", '',
		qr/"push_stream_postgres" directive is duplicate in %F:%H1/],
	['SQL hook without push_stream_postgres', '',
		"push_stream_subscriber websocket;\n push_stream_channels_path \$arg_id;\n push_stream_postgres_on_subscribe \"select 1\";",
		qr/SQL hooks need "push_stream_postgres" in the http block in %F:%L2/],
	['empty SQL hook', 'push_stream_postgres "user=a";', 'push_stream_postgres_on_publish "  ";',
		qr/invalid value "  " in "push_stream_postgres_on_publish" directive, it must not be empty in %F:%L/],
	['channel prefix too long', 'push_stream_postgres_channel_prefix ' . ('p' x 63) . ';', '',
		qr/invalid value "p{63}" in "push_stream_postgres_channel_prefix" directive, it must be at most 62 bytes, as PostgreSQL channel names are in %F:%H/],
	['channel prefix not UTF-8', "push_stream_postgres_channel_prefix \"ab\xff\";", '',
		qr/invalid value "ab.*" in "push_stream_postgres_channel_prefix" directive, it must be UTF-8 in %F:%H/],
	['empty message template', '', 'push_stream_message_template "";',
		qr/invalid value "" in "push_stream_message_template" directive, push_stream_message_template cannot be blank in %F:%L/],
	['missing header template file', '', 'push_stream_header_template_file /nonexistent/header.html;',
		qr/push stream module: unable to open file "\/nonexistent\/header\.html" for header template \(No such file or directory .*in %F:%L/],
	['header template set twice', '', "push_stream_header_template a;\n push_stream_header_template_file /etc/hostname;",
		qr/"push_stream_header_template_file" directive is duplicate or template set by 'push_stream_header_template' in %F:%L1/],
	['bad padding', '', 'push_stream_padding_by_user_agent "[Ii][Ee],x,0";',
		qr/invalid value "\[Ii\]\[Ee\],x,0" in "push_stream_padding_by_user_agent" directive, padding pattern not match the value \[Ii\]\[Ee\],x,0 in %F:%L/],
	['bad second padding rule', '', 'push_stream_padding_by_user_agent "ie,1,0:op;2;0";',
		qr/directive, error applying padding pattern to op;2;0 in %F:%L/],
	['shared memory too small', 'push_stream_shared_memory_size 100k;', '',
		qr/invalid value "100k" in "push_stream_shared_memory_size" directive, The push_stream_shared_memory_size value must be at least \d+KiB in %F:%H/],
	['zero wildcard quota', '', 'push_stream_wildcard_channel_max_qtd 0;',
		qr/push_stream_wildcard_channel_max_qtd cannot be zero in %F:%L/],
	['wildcard quota without a prefix', '', "push_stream_subscriber;\n push_stream_channels_path \$arg_id;\n push_stream_wildcard_channel_max_qtd 2;",
		qr/cannot set wildcard channel max qtd if push_stream_wildcard_channel_prefix is not set or blank/],
	['wildcard quota above the maximum', "push_stream_wildcard_channel_prefix w_;\n push_stream_max_number_of_wildcard_channels 1;",
		"push_stream_subscriber;\n push_stream_channels_path \$arg_id;\n push_stream_wildcard_channel_max_qtd 2;",
		qr/max number of wildcard channels cannot be smaller than value in push_stream_wildcard_channel_max_qtd/],
	['bad shared memory size', 'push_stream_shared_memory_size lots;', '',
		qr/invalid value "lots" in "push_stream_shared_memory_size" directive, it must be a size, e\.g\. "32m" in %F:%H/],
	['unknown variable in channels path', '', "push_stream_subscriber;\n push_stream_channels_path \$no_such_var;",
		qr/unknown "no_such_var" variable/],
	['two workers without postgres', '', "push_stream_subscriber;\n push_stream_channels_path \$arg_id;",
		qr/"worker_processes 2" needs "push_stream_postgres": pgpush workers exchange messages only through PostgreSQL/,
		'worker_processes 2;'],
);

my $t = Test::Nginx->new()->has(qw/http/)
	->plan(7 + 2 * @examples + 2 * @bad + 4 + @directives);

###############################################################################

# The module loads, with two workers and every role configured; nothing needs PostgreSQL
# to be up for nginx to start.

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;
worker_processes 2;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    push_stream_postgres "host=127.0.0.1 port=9 user=nobody dbname=none connect_timeout=1";
    push_stream_channel_deleted_message_text "gone";

    server {
        listen       127.0.0.1:8080;
        server_name  localhost;

        location / {
            return 200 "plain\n";
        }

        location /sub {
            push_stream_subscriber websocket;
            push_stream_channels_path $arg_id;
        }

        location /pub {
            push_stream_publisher admin;
            push_stream_channels_path $arg_id;
        }

        location /stats {
            push_stream_channels_statistics;
            push_stream_store_messages on;
        }

        location /stats2 {
            push_stream_channels_statistics;
            push_stream_store_messages on;
        }
    }
}

EOF

$t->run();

like(http_get('/'), qr/200 OK.*plain/s, 'module loaded, nginx serves');

my $log = $t->read_file('error.log');
unlike($log, qr/has no effect yet/, 'every directive is built: none warns');
unlike($log, qr/\[(emerg|crit)\]/, 'no emerg or crit at startup');
unlike($log, qr/hunter2|password=[^*]/, 'no secret in the log');

$t->reload();
sleep 1;
like(http_get('/'), qr/200 OK.*plain/s, 'serves after reload');
like($t->read_file('error.log'), qr/reconfiguring/, 'reload happened');

$t->stop();
unlike($t->read_file('error.log'), qr/\[alert\]/, 'clean shutdown');

###############################################################################

# Every shipped example passes `nginx -t` (its load_module line replaced with the module
# under test, its listen ports with free ones). Relative paths such as the default access
# log resolve under the test directory, as nginx's prefix.

mkdir $t->testdir() . '/logs';

for my $file (@examples) {
	my $name = $file =~ s!.*/!!r;
	open my $fh, '<', $file or die "$file: $!";
	my $conf = do { local $/; <$fh> };
	close $fh;

	like($conf, qr/^load_module\s+\S+ngx_http_pgpush_module\.so;/m,
		"$name has a load_module line");
	$conf =~ s/^load_module\s+\S+;\s*$//m;
	$conf = "%%TEST_GLOBALS%%\n" . $conf;

	my ($rc, $out) = config_test($t, "example-$name", $conf);
	ok($rc == 0 && $out =~ /test is successful/, "nginx -t $name")
		or diag($out);
}

###############################################################################

# Bad configurations: exact [emerg] text, with file:line.

for my $case (@bad) {
	my ($title, $http, $loc, $re, $main) = @$case;
	$main //= 'worker_processes 1;';

	my $conf = <<"EOF";
%%TEST_GLOBALS%%
$main
events {
}
http {
    %%TEST_GLOBALS_HTTP%%
 $http
    server {
        listen 127.0.0.1:8080;
        location /x {
 $loc
        }
    }
}
EOF
	(my $name = "bad-$title.conf") =~ s/[^\w.-]+/-/g;
	my ($rc, $out) = config_test($t, $name, $conf);

	# %F is the file; %H/%L the first line of the http/location part, %H1/%L1 the next,
	# counted in the file as written (after %%TEST_GLOBALS%% expansion).
	my @lines = split /\n/, $t->read_file($name);
	my ($hline) = grep { $lines[$_ - 1] eq ' ' . (split /\n/, $http)[0] } 1 .. @lines
		if length $http;
	my ($lline) = grep { $lines[$_ - 1] eq ' ' . (split /\n/, $loc)[0] } 1 .. @lines
		if length $loc;
	$hline //= 0;
	$lline //= 0;

	my $pattern = "$re";
	$pattern =~ s/%F/\\S+\Q$name\E/g;
	$pattern =~ s/%H(\d?)/$hline + ($1 || 0)/ge;
	$pattern =~ s/%L(\d?)/$lline + ($1 || 0)/ge;

	isnt($rc, 0, "$title: nginx -t fails");
	like($out, qr/\[emerg\].*$pattern(?!\d)/, "$title: message") or diag($out);
}

###############################################################################

# The conninfo password never reaches the output, even when the string is malformed.

my (undef, $out) = config_test($t, 'secret.conf', <<'EOF');
%%TEST_GLOBALS%%
events {
}
http {
    push_stream_postgres "postgres://app:hunter2@db:notaport/x";
}
EOF
unlike($out, qr/hunter2/, 'password masked in URL form');

(undef, $out) = config_test($t, 'secret2.conf', <<'EOF');
%%TEST_GLOBALS%%
events {
}
http {
    push_stream_postgres "user=app password='hunter2' port=x";
}
EOF
unlike($out, qr/hunter2/, 'password masked in key/value form');

###############################################################################

# Every directive of push-stream 0.6.0 has its effect, except those the README lists as
# not built yet: nginx -t with all of them warns about exactly those.

my (undef, $pout) = config_test($t, 'push-stream-all.conf', <<'EOF');
%%TEST_GLOBALS%%
events {
}
http {
    push_stream_shared_memory_size 8m;
    push_stream_channel_deleted_message_text "gone";
    push_stream_ping_message_text "ping";
    push_stream_channel_inactivity_time 30s;
    push_stream_message_ttl 5m;
    push_stream_max_subscribers_per_channel 10;
    push_stream_max_messages_stored_per_channel 10;
    push_stream_max_channel_id_length 100;
    push_stream_max_number_of_channels 100;
    push_stream_max_number_of_wildcard_channels 10;
    push_stream_wildcard_channel_prefix "w_";
    push_stream_events_channel_id "events";
    push_stream_timeout_with_body on;
    server {
        listen 127.0.0.1:8080;
        location /sub {
            push_stream_subscriber streaming;
            push_stream_channels_path $arg_id;
            push_stream_store_messages on;
            push_stream_authorized_channels_only off;
            push_stream_header_template "h";
            push_stream_message_template "~text~";
            push_stream_footer_template "f";
            push_stream_wildcard_channel_max_qtd 2;
            push_stream_ping_message_interval 10s;
            push_stream_subscriber_connection_ttl 1m;
            push_stream_longpolling_connection_ttl 30s;
            push_stream_websocket_allow_publish on;
            push_stream_allow_connections_to_events_channel on;
            push_stream_last_received_message_time $arg_time;
            push_stream_last_received_message_tag $arg_tag;
            push_stream_last_event_id $arg_event_id;
            push_stream_user_agent $http_user_agent;
            push_stream_padding_by_user_agent "[Ii][Ee],1024,508";
            push_stream_allowed_origins "*";
        }
        location /sub2 {
            push_stream_subscriber;
            push_stream_channels_path $arg_id;
            push_stream_header_template_file /etc/hostname;
        }
        location /pub {
            push_stream_publisher admin;
            push_stream_channels_path $arg_id;
            push_stream_channel_info_on_publish on;
        }
        location /stats {
            push_stream_channels_statistics;
            push_stream_channels_path $arg_id;
        }
    }
}
EOF
my %warned = map { $_ => 1 } $pout =~ /"(push_stream_\w+)" has no effect yet/g;
is(join(' ', sort keys %warned), '', 'no directive of push-stream 0.6.0 warns')
	or diag($pout);
my ($differences) = $readme =~ /^## Differences from push-stream\n(.*?)^## /ms;
is(join(' ', grep { ($differences // '') !~ /`$_`/ } sort keys %warned), '',
	'the README lists each of them');

###############################################################################

# README.md documents every directive of the table.


for my $d (@directives) {
	like($readme, qr/^\|\s*`\Q$d\E`/m, "README documents $d");
}

###############################################################################

# The directive names, read from the table in src/nginx/conf/directives.rs.
sub directive_table {
	open my $fh, '<', "$root/src/nginx/conf/directives.rs" or die "directives.rs: $!";
	my $src = do { local $/; <$fh> };
	close $fh;
	my @names = $src =~ /\b(?:main|any|any_if|loc)!\(\s*"(push_stream_\w+)"/g;
	die "no directives found in directives.rs\n" unless @names > 40;
	return @names;
}

###############################################################################
