# The consumer under faults: the worker SIGKILLed mid-batch (the postmaster
# restarts the cluster) and the broker stopped and restarted mid-stream.
# Every message is applied exactly once.  Then the whole loop in one
# cluster: orders -> outbox trigger -> relay -> RabbitMQ -> consumer ->
# handler.
use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $mq = MqtxTest::RabbitMQ->new(name => 'cfaults');
$mq->start;
my $url = $mq->url;

my $node = mqtx_node('cfaults',
	'mqtx.broker_url' => "'$url'",
	'mqtx.max_attempts' => '1000');

sub count_of
{
	my ($query) = @_;
	return $node->safe_psql('postgres', $query);
}

# ------------------------------------------------------------------
# the dispatch service: a handler that is a little slow, so that a
# batch is in flight when the faults hit

$node->safe_psql('postgres', q{
	CREATE EXTENSION mqtx;
	CREATE TABLE dispatch (order_id bigint PRIMARY KEY,
		applied_by int NOT NULL DEFAULT pg_backend_pid());
	-- the handler's own log of its (committed) calls; not unique
	CREATE TABLE handler_calls (order_id bigint NOT NULL,
		pid int NOT NULL DEFAULT pg_backend_pid());
	CREATE FUNCTION dispatch_order(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO handler_calls (order_id) VALUES ((payload->>'order_id')::bigint);
		INSERT INTO dispatch (order_id) VALUES ((payload->>'order_id')::bigint);
		PERFORM pg_sleep(0.002);
	END $$;
	SELECT mqtx.subscribe('dispatch.q', 'dispatch_order(jsonb,jsonb)');

	CREATE PROCEDURE add_messages(first int, last int) LANGUAGE plpgsql AS $$
	BEGIN
		FOR i IN first .. last LOOP
			PERFORM mqtx.publish('', 'dispatch.q', jsonb_build_object('order_id', i));
			COMMIT;
			PERFORM pg_sleep(0.002);
		END LOOP;
	END $$;
});
wait_for($node, 'postgres',
	"SELECT broker_connected FROM mqtx.consumer_stats WHERE database = 'postgres'",
	't', 'the consumer connects');
wait_queue_exists($url, 'dispatch.q');

my $N = 3000;
my $half = $N / 2;

# ------------------------------------------------------------------
# 1. the consumer SIGKILLed mid-batch

$node->safe_psql('postgres',
	"SELECT count(mqtx.publish('', 'dispatch.q', jsonb_build_object('order_id', g))) "
	  . "FROM generate_series(1, $half) g");
wait_for($node, 'postgres', 'SELECT count(*) >= 150 FROM dispatch',
	't', 'the consumer is applying the first half');
my $pid = worker_pid($node, 'consumer');
ok($pid, "consumer pid $pid");
diag('consumer before the kill: ' . $node->safe_psql('postgres',
	"SELECT state, xact_start IS NOT NULL FROM pg_stat_activity WHERE pid = $pid"));
my $at_kill = count_of('SELECT count(*) FROM dispatch');
kill 'KILL', $pid;
cmp_ok($at_kill, '<', $half, "killed mid-stream ($at_kill of $half applied)");
wait_until('the postmaster saw the consumer die of SIGKILL',
	sub { $node->log_contains(qr/\(PID $pid\) was terminated by signal 9/) });
wait_workers($node, 1, 'a new consumer runs after the crash restart',
	kind => 'consumer', except => $pid);
wait_for($node, 'postgres', 'SELECT count(*) FROM dispatch',
	$half, "it resumes and the first $half are applied");

# ------------------------------------------------------------------
# 2. the broker stopped and restarted while messages stream in

my ($in, $out, $err) = ('', '', '');
my $stream = IPC::Run::start(
	[ 'psql', '-X', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'),
	  '-c', 'CALL add_messages(' . ($half + 1) . ", $N)" ],
	\$in, \$out, \$err);
wait_for($node, 'postgres', 'SELECT count(*) >= ' . ($half + 100) . ' FROM dispatch',
	't', 'the second half is being applied');
my $pid2 = worker_pid($node, 'consumer');
my $log_offset = -s $node->logfile;
my $at_stop = count_of('SELECT count(*) FROM dispatch');
$mq->stop;
cmp_ok($at_stop, '<', $N, "broker stopped mid-stream ($at_stop of $N applied)");
wait_for($node, 'postgres',
	"SELECT broker_connected FROM mqtx.consumer_stats WHERE database = 'postgres'",
	'f', 'the consumer notices the broker is gone');
# Time, on purpose: several reconnect attempts while the broker is down,
# during which nothing may be dead-lettered, and which the log must not
# repeat line by line.
sleep 4;
is( count_of('SELECT count(*) FROM mqtx.dead_letter'),
	'0', 'while the broker is down, nothing is dead-lettered');
$mq->start;
ok($stream->finish, 'the producer kept enqueueing throughout') or diag($err);
wait_for($node, 'postgres',
	"SELECT broker_connected FROM mqtx.consumer_stats WHERE database = 'postgres'",
	't', 'the consumer reconnects');
wait_for($node, 'postgres', 'SELECT count(*) FROM dispatch',
	$N, "after the broker returns, all $N are applied");
is(worker_pid($node, 'consumer'), $pid2, 'the consumer rode out the outage without a restart');

# the outage is logged per state change, not per reconnect attempt
my @outage_lines = grep { /\[$pid2\]/ }
  split /\n/, slurp_file($node->logfile, $log_offset);
cmp_ok(scalar @outage_lines, '>=', 1, 'the consumer logs the outage');
cmp_ok(scalar @outage_lines, '<=', 6,
	'without a line per reconnect attempt (' . scalar(@outage_lines) . ' lines)')
  or diag(join("\n", @outage_lines));

# ------------------------------------------------------------------
# exactly once

is( count_of('SELECT count(*), count(DISTINCT order_id), min(order_id), max(order_id) FROM dispatch'),
	"$N|$N|1|$N", "dispatch has every order exactly once");
is( count_of('SELECT count(*), count(DISTINCT order_id) FROM handler_calls'),
	"$N|$N", 'the handler\'s committed calls: one per order');
is( count_of(q{
		SELECT count(*) FROM dispatch d
		WHERE (SELECT count(*) FROM handler_calls h WHERE h.order_id = d.order_id) <> 1}),
	'0', 'every dispatched order was applied by exactly one committed handler call');
is( count_of(q{
		SELECT count(*), count(DISTINCT i.message_id)
		FROM mqtx.inbox i JOIN mqtx.outbox o ON o.message_id::text = i.message_id
		WHERE i.queue = 'dispatch.q'}),
	"$N|$N", 'the inbox holds each outbox message id once');
is( count_of(
		"SELECT (SELECT count(*) FROM mqtx.inbox WHERE queue = 'dispatch.q'), "
		  . "(SELECT count(*) FROM mqtx.outbox WHERE status = 'published')"),
	"$N|$N", 'nothing else in the inbox; every outbox row published');
is( count_of(
		'SELECT (SELECT count(*) FROM mqtx.dead_letter), '
		  . '(SELECT count(*) FROM mqtx.consumer_attempts)'),
	'0|0', 'no dead letters and no pending failed attempts');
wait_queue_drained($mq, 'dispatch.q');

# ------------------------------------------------------------------
# 3. the whole loop in one cluster

$node->safe_psql('postgres', q{
	CREATE TABLE orders (order_id bigint PRIMARY KEY, content text NOT NULL);
	CREATE TRIGGER orders_outbox AFTER INSERT ON orders
		FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('', 'shipping.q');
	CREATE TABLE shipments (order_id bigint PRIMARY KEY, content text NOT NULL);
	CREATE TABLE ship_calls (order_id bigint NOT NULL);
	CREATE FUNCTION ship(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO ship_calls VALUES ((payload->>'order_id')::bigint);
		INSERT INTO shipments VALUES ((payload->>'order_id')::bigint, payload->>'content');
	END $$;
	SELECT mqtx.subscribe('shipping.q', 'ship(jsonb,jsonb)');
});
wait_queue_exists($url, 'shipping.q');
$node->safe_psql('postgres',
	"INSERT INTO orders SELECT g, 'order ' || g FROM generate_series(1, 1000) g");
wait_for($node, 'postgres', 'SELECT count(*) FROM shipments',
	'1000', 'all 1000 orders are dispatched');
is( count_of(q{
		SELECT count(*) FROM orders o JOIN shipments s USING (order_id)
		WHERE s.content = o.content}),
	'1000', 'each shipment carries its order');
is( count_of('SELECT count(*), count(DISTINCT order_id) FROM ship_calls'),
	'1000|1000', 'each order was handled exactly once');
is( count_of(q{
		SELECT count(*) FROM mqtx.inbox i
		JOIN mqtx.outbox o ON o.message_id::text = i.message_id
		WHERE i.queue = 'shipping.q' AND o.routing_key = 'shipping.q'}),
	'1000', 'the inbox holds the ids the outbox trigger generated');
is( count_of(
		'SELECT (SELECT count(*) FROM mqtx.dead_letter), '
		  . '(SELECT count(*) FROM mqtx.consumer_attempts)'),
	'0|0', 'no dead letters, no failed attempts');
wait_queue_drained($mq, 'shipping.q');

$node->stop;
$mq->stop;
done_testing();
