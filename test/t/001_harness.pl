# The test harness itself: mqtx loads through shared_preload_libraries, a
# real RabbitMQ node starts and carries a message, and the broker URL (with
# its password) stays hidden from non-superusers and out of the server log.
use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $mq = MqtxTest::RabbitMQ->new(name => 'harness');
$mq->start;
ok($mq->port > 0, 'RabbitMQ node started on a loopback port');

# The node carries a message end to end (declare, publish, get).
$mq->declare_queue('harness.q');
amqp_tool('publish', '--url', $mq->url, '--exchange', '', '--routing-key',
	'harness.q', '--body', '{"hello": "broker"}');
is($mq->queue_depth('harness.q'), 1, 'the queue holds the published message');
my $msgs = amqp_messages($mq->url, 'harness.q');
is($msgs->[0]{body}, '{"hello": "broker"}', 'and gives it back unchanged');

$mq->add_user('mqtx', 'pw-4f7c1e-secret');
my $url = $mq->url(user => 'mqtx', password => 'pw-4f7c1e-secret');

my $node = mqtx_node('harness', 'mqtx.broker_url' => "'$url'",
	log_statement => "'all'");

is($node->safe_psql('postgres', 'SHOW shared_preload_libraries'),
	'mqtx', 'mqtx is preloaded');
is( $node->safe_psql('postgres',
		"SELECT name, context FROM pg_settings WHERE name IN ('mqtx.database', 'mqtx.relay_enabled') ORDER BY 1"),
	"mqtx.database|sighup\nmqtx.relay_enabled|postmaster",
	'the settings that exist only when preloaded: the launcher follows mqtx.database on reload');

$node->safe_psql('postgres', 'CREATE EXTENSION mqtx');
like($node->safe_psql('postgres', "SELECT mqtx.publish('', 'harness.q', '{}')"),
	qr/^[0-9a-f-]{36}$/, 'publish returns a message id');

# The relay is running, serving the database.
wait_workers($node, 1, 'one relay worker runs', kind => 'relay');

# The URL is for superusers only.
$node->safe_psql('postgres', 'CREATE ROLE app LOGIN');
my ($rc, $out, $err) = $node->psql('postgres', 'SHOW mqtx.broker_url',
	extra_params => [ '-U', 'app' ]);
isnt($rc, 0, 'a non-superuser cannot SHOW the broker URL');
like($err, qr/must be superuser or have privileges of pg_read_all_settings/,
	'and is told why');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM pg_settings WHERE name = 'mqtx.broker_url'",
		extra_params => [ '-U', 'app' ]),
	'0',
	'pg_settings hides it from a non-superuser');
(my $masked = $url) =~ s/:pw-4f7c1e-secret\@/:********\@/;
is($node->safe_psql('postgres', 'SHOW mqtx.broker_url'),
	$masked, 'even a superuser sees it with the password masked');
$node->safe_psql('postgres', 'GRANT pg_read_all_settings TO app');
is($node->safe_psql('postgres', "SELECT current_setting('mqtx.broker_url')",
		extra_params => [ '-U', 'app' ]),
	$masked, 'and so does a member of pg_read_all_settings');

# Changing it by ALTER SYSTEM and reload: PostgreSQL logs the statement and
# the "changed to" line; neither may carry the password.
my $new_url = $mq->url(user => 'mqtx', password => 'pw-99aa-rotated');
$node->safe_psql('postgres', "ALTER SYSTEM SET mqtx.broker_url = '$new_url'");
$node->reload;
(my $new_masked = $new_url) =~ s/:pw-99aa-rotated\@/:********\@/;
wait_for($node, 'postgres', 'SHOW mqtx.broker_url', $new_masked,
	'the new URL is in effect after reload');
# a rejected value is logged too
$node->psql('postgres',
	"ALTER SYSTEM SET mqtx.broker_url = 'amqp://mqtx:pw-bad-3c3c\@:1/x'");

$node->stop;
my $log = slurp_file($node->logfile);
unlike($log, qr/pw-4f7c1e-secret|pw-99aa-rotated|pw-bad-3c3c/,
	'no broker password in the server log');
like($log, qr/parameter "mqtx\.broker_url" changed to "amqp:\/\/mqtx:\*{8}\@/,
	'the change is logged with the password masked');
like($log, qr/invalid value for parameter "mqtx\.broker_url"/,
	'the rejected value is logged, masked');

$mq->stop;
done_testing();
