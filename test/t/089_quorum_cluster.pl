# 20,000 orders through a quorum queue of a 3-node RabbitMQ cluster, while
# the node the relay is connected to is SIGKILLed, and then the node the
# consumer is connected to: every order is dispatched exactly once (an
# effect table without a unique constraint), nothing fails, nothing is
# dead-lettered, and each worker is on another node within seconds, in the
# same process.
use strict;
use warnings FATAL => 'all';

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $ORDERS = 20_000;

my @mq = MqtxTest::RabbitMQ->new_cluster(name => 'qc', size => 3);
is(scalar($mq[0]->running_nodes), 3, 'the cluster has three running nodes');
my %mq_by_port = map { ($_->port => $_) } @mq;
my @urls = map { $_->url } @mq;

my $queue_args = '{"x-queue-type": "quorum"}';

# --- the order service prefers node 1, the dispatch service node 2
my $orders = mqtx_node('qc_orders',
	'mqtx.broker_url' => "'" . join(', ', @urls) . "'",
	'mqtx.consumer_enabled' => 'off');
$orders->safe_psql('postgres', qq{
	CREATE EXTENSION mqtx;
	SELECT mqtx.declare_queue('dispatch', true, '$queue_args');
	CREATE TABLE orders (id int PRIMARY KEY);
	CREATE PROCEDURE add_orders(first int, last int) LANGUAGE plpgsql AS \$\$
	BEGIN
		FOR i IN first .. last LOOP
			INSERT INTO orders VALUES (i);
			PERFORM mqtx.publish('', 'dispatch', jsonb_build_object('order_id', i));
			IF i % 20 = 0 THEN
				COMMIT;
				PERFORM pg_sleep(0.01);
			END IF;
		END LOOP;
	END \$\$;
});

my $dispatch = mqtx_node('qc_dispatch',
	'mqtx.broker_url' => "'" . join(', ', @urls[ 1, 2, 0 ]) . "'",
	'mqtx.relay_enabled' => 'off');
$dispatch->safe_psql('postgres', qq{
	CREATE EXTENSION mqtx;
	SELECT mqtx.declare_queue('dispatch', true, '$queue_args');
	CREATE TABLE effects (order_id int NOT NULL);	-- no unique constraint
	CREATE FUNCTION dispatch_order(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE sql AS \$\$ INSERT INTO effects VALUES ((payload->>'order_id')::int) \$\$;
	SELECT mqtx.subscribe('dispatch', 'dispatch_order(jsonb,jsonb)');
});

# The node a worker is on, from mqtx.broker_connections ('' when none).
sub node_of
{
	my ($node, $worker) = @_;
	my $broker = $node->safe_psql('postgres',
		"SELECT broker FROM mqtx.broker_connections WHERE worker = '$worker'");
	my ($port) = $broker =~ /:(\d+)$/;
	return defined $port ? $mq_by_port{$port} : undef;
}

sub worker_on_another_node
{
	my ($node, $worker, $killed) = @_;
	my $now = node_of($node, $worker);
	return defined $now && $now->port != $killed->port;
}

wait_within(30, 'the relay is connected', sub { defined node_of($orders, 'relay') });
wait_within(30, 'the consumer is consuming',
	sub { ($mq[0]->consumer_count('dispatch') // 0) == 1 });
is($mq[0]->queue_columns('type')->{dispatch}[0], 'quorum', 'dispatch is a quorum queue');

my $relay_pid = worker_pid($orders, 'relay');
my $consumer_pid = worker_pid($dispatch, 'consumer');

my ($out, $err) = ('', '');
my $stream = IPC::Run::start(
	[ 'psql', '-X', '-d', $orders->connstr('postgres'), '-c', "CALL add_orders(1, $ORDERS)" ],
	'>', \$out, '2>', \$err);

# Kill the node under a worker once it has done some work; returns how
# long the worker took to be connected to another node.
sub kill_node_under
{
	my ($node, $worker) = @_;
	my $victim = node_of($node, $worker);
	my $t0 = time();
	$victim->kill;
	my $ok = wait_within(30, "the $worker reconnects to another node",
		sub { worker_on_another_node($node, $worker, $victim) });
	my $took = time() - $t0;
	diag(sprintf('%s on another node %.2f s after its node was killed', $worker, $took));
	return ($victim, $took);
}

wait_for($orders, 'postgres', 'SELECT published >= 4000 FROM mqtx.relay_stats', 't',
	'the relay publishes while orders stream in');
my ($relay_victim, $relay_took) = kill_node_under($orders, 'relay');
ok($relay_took < 10, 'within 10 s');

# The killed node comes back and rejoins, so the cluster keeps its majority
# through the second kill.
$relay_victim->start;
wait_within(60, 'the killed node rejoins the cluster',
	sub { (eval { scalar($relay_victim->running_nodes) } // 0) == 3 });

wait_for($dispatch, 'postgres', 'SELECT count(*) >= 10000 FROM effects', 't',
	'the consumer applies while orders stream in');
my ($consumer_victim, $consumer_took) = kill_node_under($dispatch, 'consumer');
ok($consumer_took < 10, 'within 10 s');
$consumer_victim->start;

$stream->finish;
is($?, 0, 'every order was committed') or diag($err);

wait_for($orders, 'postgres',
	"SELECT count(*) FILTER (WHERE status = 'published') FROM mqtx.outbox", $ORDERS,
	'every order is published');
wait_for($dispatch, 'postgres', 'SELECT count(DISTINCT order_id) FROM effects', $ORDERS,
	'every order is dispatched');
is($dispatch->safe_psql('postgres', 'SELECT count(*) - count(DISTINCT order_id) FROM effects'),
	'0', 'none twice');
is($orders->safe_psql('postgres', "SELECT count(*) FROM mqtx.outbox WHERE status <> 'published'"),
	'0', 'no outbox row failed');
is($dispatch->safe_psql('postgres', 'SELECT count(*) FROM mqtx.dead_letter'),
	'0', 'nothing was dead-lettered');
my $dups = $dispatch->safe_psql('postgres', 'SELECT duplicates FROM mqtx.consumer_stats');
diag("the inbox absorbed $dups redelivered messages");
is(worker_pid($orders, 'relay'), $relay_pid, 'the relay process never changed');
is(worker_pid($dispatch, 'consumer'), $consumer_pid, 'nor the consumer process');

# x-delivery-limit: a message that fails on the last delivery the broker
# allows is dead-lettered by the consumer at once, not held for a retry the
# broker would not make.  Its max_attempts is far off: without the limit it
# would be retried for ever.
my $picky_args = '{"x-queue-type": "quorum", "x-delivery-limit": 1, '
  . '"x-dead-letter-exchange": "picky.dlx"}';
$orders->safe_psql('postgres', "SELECT mqtx.declare_queue('picky', true, '$picky_args')");
$dispatch->safe_psql('postgres', qq{
	SELECT mqtx.declare_queue('picky', true, '$picky_args');
	CREATE FUNCTION refuse(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS \$\$ BEGIN RAISE EXCEPTION 'not today'; END \$\$;
	SELECT mqtx.subscribe('picky', 'refuse(jsonb,jsonb)', max_attempts => 1000);
});
wait_within(30, 'the consumer consumes the limited queue',
	sub { ($mq[2]->consumer_count('picky') // 0) == 1 });
$orders->safe_psql('postgres', q{SELECT mqtx.publish('', 'picky', '{"n": 1}')});
wait_for($dispatch, 'postgres', 'SELECT count(*) > 0 FROM mqtx.consumer_attempts', 't',
	'its handler fails, and the consumer holds it for a retry');
# the broker gets it back (a lost consumer) and delivers it the last time
my $log_offset = -s $dispatch->logfile;
$dispatch->safe_psql('postgres',
	'SELECT pg_terminate_backend(pid) FROM mqtx.consumer_stats');
ok($dispatch->wait_for_log(qr/failed on the last delivery the broker allows \(x-delivery-count 1, x-delivery-limit 1\)/,
		$log_offset),
	'the consumer sees the last delivery fail');
wait_for($dispatch, 'postgres',
	q{SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'picky' AND error_message = 'not today'}, '1',
	'and dead-letters it into mqtx.dead_letter');

$orders->stop;
$dispatch->stop;
$_->stop for @mq;
done_testing();
