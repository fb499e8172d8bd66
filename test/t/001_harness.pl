# The test harness itself: mqtx loads through shared_preload_libraries, a
# real RabbitMQ node starts and carries a message, and the broker URL (with
# its password) stays hidden from non-superusers and out of the server log.
# Then a 3-node RabbitMQ cluster forms and its quorum queue survives the
# SIGKILL of a node, which rejoins when restarted.
use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IO::Socket::INET;

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

# A 3-node cluster: a quorum queue on it keeps working while the node a
# client is connected to (its leader too) is SIGKILLed, and that node comes
# back into the cluster.
my @qc = MqtxTest::RabbitMQ->new_cluster(name => 'qc', size => 3);
my @names = sort map { $_->node_name } @qc;
is(scalar(keys %{ { map { $_ => 1 } @names } }), 3, 'the cluster nodes have distinct names');
is_deeply([ $qc[2]->running_nodes ], \@names, 'they form one cluster of 3 running nodes');
like($qc[0]->cluster_urls,
	qr{^amqp://guest:guest\@127\.0\.0\.1:\d+/%2f(?:,amqp://guest:guest\@127\.0\.0\.1:\d+/%2f){2}$},
	'cluster_urls lists every node');

$qc[0]->declare_queue('harness.qq', quorum => 1);
my $info = $qc[1]->queue_info('harness.qq');
is($info->{type}, 'quorum', 'a quorum queue is declared');
is_deeply($info->{members}, \@names, 'with a member on each node');

amqp_publish($qc[0]->url, 'harness.qq', body => 'via one');
is(amqp_messages($qc[1]->url, 'harness.qq')->[0]{body},
	'via one', 'a message published through one node is read through another');

# Kill the leader (the node the queue was declared through, normally).
my $victim = $qc[0]->node_by_name($qc[0]->queue_leader('harness.qq'));
my ($s1, $s2) = grep { $_ != $victim } @qc;
my $old_pid = $victim->os_pid;
$victim->kill;
ok(!defined $victim->os_pid, 'the leader node is SIGKILLed');
# Until the survivors have elected a new leader (well under a second), a
# publish is nacked.
wait_until('the two survivors take publishes',
	sub { eval { amqp_publish($s1->url, 'harness.qq', body => 'after kill'); 1 } });
is(amqp_messages($s2->url, 'harness.qq')->[0]{body},
	'after kill', 'and deliver them');
isnt($s1->queue_leader('harness.qq'), $victim->node_name, 'under a new leader');

$victim->start;
is_deeply([ $victim->running_nodes ], \@names,
	'the killed node, restarted, is back in the cluster of 3');
my $new_pid = $victim->os_pid;
ok(defined $new_pid && $new_pid != $old_pid, 'as a new process');
amqp_publish($s2->url, 'harness.qq', body => 'after restart');
is(amqp_messages($victim->url, 'harness.qq')->[0]{body},
	'after restart', 'and serves the queue again');

my $epmd_port = $qc[0]->env_value('ERL_EPMD_PORT');
MqtxTest::RabbitMQ->stop_nodes(@qc);
ok(!(grep { defined $_->os_pid } @qc), 'the cluster stops');
ok(!IO::Socket::INET->new(PeerAddr => "127.0.0.1:$epmd_port", Proto => 'tcp'),
	'and so does its shared epmd');
done_testing();
