# Parallel apply (issue 17): a subscription with workers => 4 is applied
# by four apply workers, one key's messages by one of them in order.
#  - 200 keys x 50 events, committed interleaved from 4 sessions, plus
#    1,000 messages without a key, through transient handler failures, a
#    broker restart, the SIGKILL of an apply worker and of the consumer:
#    every key's applied sequence is its committed one, nothing missing,
#    nothing twice, everything applied by the apply workers, by all four;
#  - a dead letter holds back its own key only, and a redrive applies it
#    first;
#  - an apply worker that exits is started again, by the same consumer;
#  - while the workers are behind, the backlog stays in the queue: no more
#    than the staging limit is parked for them; back to workers => 1 then,
#    the consumer applies the rest, and stops them;
#  - across that change, each key stays in order;
#  - with the broker down, a consumer that starts still starts its
#    workers, and they apply what is parked.
# The handler takes a transaction lock on its key, and says so when
# another transaction holds it: one key is never applied by two at once.
use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $mq = MqtxTest::RabbitMQ->new(name => 'parallel');
$mq->start;
my $url = $mq->url;
my ($KEYS, $EVENTS, $SESSIONS, $UNKEYED) = (200, 50, 4, 1000);
my ($WORKERS, $BATCH) = (4, 50);

my $orders = mqtx_node('pa_orders',
	'mqtx.broker_url' => "'$url'",
	'mqtx.consumer_enabled' => 'off');
$orders->safe_psql('postgres', q{
	CREATE EXTENSION mqtx;
	SELECT mqtx.declare_queue('events');
});
create_keyed_emitter($orders, $KEYS, $EVENTS, '', 'events');

my $dispatch = mqtx_node('pa_dispatch',
	'mqtx.broker_url' => "'$url'",
	'mqtx.relay_enabled' => 'off',
	'mqtx.batch_size' => $BATCH,
	'mqtx.retry_base' => "'20ms'",
	'mqtx.retry_max' => "'200ms'");
$dispatch->safe_psql('postgres', q{
	CREATE EXTENSION mqtx;
	-- applied in this order (no unique constraint: a second apply shows),
	-- and by which kind of process
	CREATE TABLE applied (seq bigserial PRIMARY KEY, k text, n int, pid int, applier text);
	CREATE TABLE settings (flaky boolean, broken text[], pause float8, hold boolean);
	INSERT INTO settings VALUES (true, '{}', 0, false);
	CREATE FUNCTION apply_event(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		IF (SELECT flaky FROM settings) AND random() < 0.05 THEN
			RAISE EXCEPTION 'transient failure';
		END IF;
		IF (SELECT hold FROM settings) THEN
			RAISE EXCEPTION 'held';
		END IF;
		IF EXISTS (SELECT FROM settings WHERE payload->>'k' || '/' || (payload->>'n') = ANY (broken)) THEN
			RAISE EXCEPTION 'cannot apply %', payload;
		END IF;
		PERFORM pg_sleep(pause) FROM settings WHERE pause > 0;
		INSERT INTO applied (k, n, pid, applier)
		SELECT payload->>'k', (payload->>'n')::int, pg_backend_pid(),
			   CASE WHEN payload->>'k' LIKE 'u%' OR pg_try_advisory_xact_lock(hashtext(payload->>'k'))
					THEN a.backend_type ELSE 'concurrent' END
		  FROM pg_stat_activity a WHERE a.pid = pg_backend_pid();
	END $$;
});
$dispatch->safe_psql('postgres',
	"SELECT mqtx.subscribe('events', 'apply_event(jsonb,jsonb)', max_attempts => 1000, workers => $WORKERS)");
my $apply_workers = q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'mqtx apply worker'};
wait_for($dispatch, 'postgres', $apply_workers, $WORKERS, "the consumer starts $WORKERS apply workers");
wait_until('the consumer consumes the queue', sub { ($mq->consumer_count('events') // 0) == 1 });

# --- 200 keys x 50 events and 1,000 without a key, through failures ------
my $sessions = start_keyed_sessions($orders, $KEYS, $EVENTS, $SESSIONS);
$orders->safe_psql('postgres', qq{
	SELECT count(mqtx.publish('', 'events', jsonb_build_object('k', 'unkeyed', 'n', i)))
	FROM generate_series(1, $UNKEYED) i});
wait_for($dispatch, 'postgres', 'SELECT count(*) >= 2000 FROM applied', 't',
	'events are applied while they stream in');
$mq->stop;
usleep(500_000);
$mq->start;
wait_for($dispatch, 'postgres', 'SELECT count(*) >= 4000 FROM applied', 't',
	'and again after the broker restarted');
my ($worker_pid) = split /\n/, $dispatch->safe_psql('postgres',
	q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'mqtx apply worker' LIMIT 1});
kill 'KILL', $worker_pid;
wait_for($dispatch, 'postgres', 'SELECT count(*) >= 6000 FROM applied', 't',
	'and again after an apply worker was killed (the server restarted)');
my $consumer_pid = worker_pid($dispatch, 'consumer');
kill 'KILL', $consumer_pid;
is(finish_sessions($sessions), '', 'the 4 sessions committed without an error');
is($orders->safe_psql('postgres', 'SELECT sum(n) FROM counters'), $KEYS * $EVENTS,
	"$KEYS x $EVENTS events committed");
my $total = $KEYS * $EVENTS + $UNKEYED;
wait_for($dispatch, 'postgres', 'SELECT count(DISTINCT (k, n)) FROM applied',
	$total, 'every message is applied, after the apply worker and the consumer were killed');
isnt(worker_pid($dispatch, 'consumer'), $consumer_pid, 'a new consumer took over');
wait_for($dispatch, 'postgres', $apply_workers, $WORKERS, "with $WORKERS apply workers");
wait_for($dispatch, 'postgres', 'SELECT count(*) FROM mqtx.parked', '0',
	'nothing is left parked');
is($dispatch->safe_psql('postgres', 'SELECT count(*) FROM applied'), $total,
	'nothing is applied twice');
is($dispatch->safe_psql('postgres', qq{
	SELECT count(*) FROM (
		SELECT k, array_agg(n ORDER BY seq) AS applied_order FROM applied
		 WHERE k <> 'unkeyed' GROUP BY k) a
	WHERE applied_order <> ARRAY(SELECT generate_series(1, $EVENTS))}),
	'0', 'every key\'s events were applied in their committed order');
is($dispatch->safe_psql('postgres',
	q{SELECT string_agg(DISTINCT applier, ',') FROM applied}),
	'mqtx apply worker', 'every message was applied by an apply worker, no key by two at once');
ok($dispatch->safe_psql('postgres',
	q{SELECT count(DISTINCT pid) FROM applied}) >= $WORKERS,
	'by several of them');
ok($dispatch->safe_psql('postgres', 'SELECT retried FROM mqtx.consumer_stats') > 0,
	'transient failures were retried on the way');
is($dispatch->safe_psql('postgres', 'SELECT count(*) FROM mqtx.dead_letter'), '0',
	'nothing was dead-lettered');

# --- a dead letter holds its own key only --------------------------------
$dispatch->safe_psql('postgres', qq{
	UPDATE settings SET flaky = false, broken = '{stuck/1}';
	TRUNCATE applied;
	SELECT mqtx.subscribe('strict', 'apply_event(jsonb,jsonb)', max_attempts => 2,
						  workers => $WORKERS);
});
wait_until('the consumer consumes the new queue',
	sub { ($mq->consumer_count('strict') // 0) == 1 });
$orders->safe_psql('postgres', q{
	SELECT mqtx.declare_queue('strict');
	SELECT mqtx.publish('', 'strict', jsonb_build_object('k', k, 'n', n), ordering_key => k)
	FROM unnest(ARRAY['stuck', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h']) k, generate_series(1, 3) n
	ORDER BY n, k;
});
wait_for($dispatch, 'postgres',
	q{SELECT count(*) FROM (SELECT k, string_agg(n::text, ',' ORDER BY seq) s FROM applied
	   WHERE k <> 'stuck' GROUP BY k) a WHERE s = '1,2,3'},
	'8', 'the 8 other keys flow, each in order, on all the workers');
wait_for($dispatch, 'postgres',
	q{SELECT string_agg(ordering_key || ':' || reason || ':' || parked, ',') FROM mqtx.held_keys},
	'stuck:dead letter:2', 'the dead letter holds its key, 2 messages parked behind it');
is($dispatch->safe_psql('postgres', "SELECT count(*) FROM applied WHERE k = 'stuck'"),
	'0', 'nothing of the held key is applied');
$dispatch->safe_psql('postgres', q{
	UPDATE settings SET broken = '{}';
	SELECT mqtx.redrive(id) FROM mqtx.dead_letter;
});
wait_for($dispatch, 'postgres',
	"SELECT string_agg(n::text, ',' ORDER BY seq) FROM applied WHERE k = 'stuck'",
	'1,2,3', 'the redriven letter is applied first, then the key\'s others');
is($dispatch->safe_psql('postgres', q{SELECT count(*) FROM applied WHERE applier = 'concurrent'}),
	'0', 'no key by two at once there either');

# --- an apply worker that exits is started again --------------------------
$consumer_pid = worker_pid($dispatch, 'consumer');
my $apply_pids = q{SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity
				   WHERE backend_type = 'mqtx apply worker'};
my $before = $dispatch->safe_psql('postgres', $apply_pids);
($worker_pid) = split /,/, $before;
$dispatch->safe_psql('postgres', "SELECT pg_terminate_backend($worker_pid)");
wait_until('a new apply worker takes its place', sub {
	my $now = $dispatch->safe_psql('postgres', $apply_pids);
	my @pids = split /,/, $now;
	return @pids == $WORKERS && !grep { $_ == $worker_pid } @pids;
});
is(worker_pid($dispatch, 'consumer'), $consumer_pid, 'started by the same consumer');

# --- while the workers are behind, the broker keeps the backlog ----------
# A slow handler, and 3,000 messages at once: no more than the staging
# limit (2 batches a worker), with what the prefetch window and a batch
# add, is parked at any time (sampled); the rest waits in the queue.
# Then back to one worker while acknowledgements are held back: the
# consumer applies the rest, and what was parked for the workers.
my $BURST = 3000;
my $limit = 2 * $BATCH * $WORKERS;
$dispatch->safe_psql('postgres', q{
	SELECT mqtx.unsubscribe('strict');
	UPDATE settings SET pause = 0.005;
	TRUNCATE applied});
$orders->safe_psql('postgres', qq{
	SELECT count(mqtx.publish('', 'events', jsonb_build_object('k', 'u-burst', 'n', i)))
	FROM generate_series(1, $BURST) i});
my ($max_parked, $max_ready) = (0, 0);
wait_until('half of the burst is applied', sub {
	my ($parked, $done) = split /\|/, $dispatch->safe_psql('postgres',
		'SELECT (SELECT count(*) FROM mqtx.parked), (SELECT count(*) FROM applied)');
	my $ready = $mq->queue_depth('events') // 0;
	$max_parked = $parked if $parked > $max_parked;
	$max_ready = $ready if $ready > $max_ready;
	return $done >= $BURST / 2;
});
ok($max_parked <= $limit + 100 + $BATCH,
	"at most the staging limit ($limit) and the prefetch window and a batch was parked (saw $max_parked)");
ok($max_ready > $BURST / 3, "the backlog waited in the queue (saw $max_ready ready)");
$dispatch->safe_psql('postgres', q{
	UPDATE settings SET pause = 0;
	SELECT mqtx.subscribe('events', 'apply_event(jsonb,jsonb)', max_attempts => 1000)});
wait_for($dispatch, 'postgres', 'SELECT count(*) FROM applied', $BURST,
	'back to one worker, the consumer applies the rest of the burst');
wait_for($dispatch, 'postgres', $apply_workers, '0', 'and the apply workers stop');
is($dispatch->safe_psql('postgres', 'SELECT count(DISTINCT n) FROM applied'), $BURST,
	'every message of the burst once');
is($dispatch->safe_psql('postgres',
	q{SELECT count(DISTINCT pid) FROM applied WHERE applier = 'mqtx apply worker'}),
	$WORKERS, 'the messages without a key were applied by all the workers');

# --- keys across a change of workers ---------------------------------------
# Messages parked for the workers, with and without a key, are applied by
# the consumer once the subscription has one worker, each key in order.
$dispatch->safe_psql('postgres', qq{
	UPDATE settings SET pause = 0.05;
	TRUNCATE applied;
	SELECT mqtx.subscribe('events', 'apply_event(jsonb,jsonb)', max_attempts => 1000, workers => $WORKERS)});
wait_for($dispatch, 'postgres', $apply_workers, $WORKERS, "$WORKERS apply workers again");
$orders->safe_psql('postgres', q{
	SELECT count(mqtx.publish('', 'events', jsonb_build_object('k', k, 'n', n),
							  ordering_key => nullif(k, 'u-last')))
	FROM unnest(ARRAY['x', 'y', 'u-last']) k, generate_series(1, 20) n});
wait_for($dispatch, 'postgres', 'SELECT count(*) > 0 FROM mqtx.parked', 't',
	'messages wait, parked for the workers');
$dispatch->safe_psql('postgres', q{
	UPDATE settings SET pause = 0;
	SELECT mqtx.subscribe('events', 'apply_event(jsonb,jsonb)', max_attempts => 1000)});
wait_for($dispatch, 'postgres', 'SELECT count(*) FROM applied', '60',
	'after workers => 1, the consumer applies them all');
is($dispatch->safe_psql('postgres', q{
	SELECT string_agg(k || ':' || ok::text, ',' ORDER BY k) FROM (
		SELECT k, array_agg(n ORDER BY seq) = ARRAY(SELECT generate_series(1, 20)) AS ok
		  FROM applied WHERE k IN ('x', 'y') GROUP BY k) a}),
	'x:true,y:true', 'each key in order, across the change');
is($dispatch->safe_psql('postgres', q{SELECT count(DISTINCT (k, n)) FROM applied}), '60',
	'each message once');
is($dispatch->safe_psql('postgres', q{SELECT count(*) FROM applied WHERE applier = 'concurrent'}),
	'0', 'no key by two at once');

# --- with the broker down, a consumer that starts starts its workers -----
# The handler refuses the messages (they are retried, parked) until the
# server has restarted with the broker down; then the new workers apply
# them.
$dispatch->safe_psql('postgres', qq{
	UPDATE settings SET hold = true;
	TRUNCATE applied;
	SELECT mqtx.subscribe('events', 'apply_event(jsonb,jsonb)', max_attempts => 1000, workers => $WORKERS)});
wait_for($dispatch, 'postgres', $apply_workers, $WORKERS, "$WORKERS apply workers again");
$orders->safe_psql('postgres', q{
	SELECT count(mqtx.publish('', 'events', jsonb_build_object('k', 'u-down', 'n', i)))
	FROM generate_series(1, 300) i});
wait_for($dispatch, 'postgres', 'SELECT count(*) FROM mqtx.parked', '300',
	'300 messages are parked for the workers, retried');
$mq->stop;
$dispatch->restart;
wait_for($dispatch, 'postgres', $apply_workers, $WORKERS,
	"with the broker down, the new consumer starts its $WORKERS apply workers");
is($dispatch->safe_psql('postgres', 'SELECT count(*) FROM mqtx.parked'), '300',
	'the messages are still parked');
$dispatch->safe_psql('postgres', 'UPDATE settings SET hold = false');
wait_for($dispatch, 'postgres', 'SELECT count(*) FROM mqtx.parked', '0',
	'and the workers apply them, the broker still down');
is($dispatch->safe_psql('postgres',
	q{SELECT count(*) || ':' || count(DISTINCT n) FROM applied WHERE k = 'u-down'}),
	'300:300', 'each of them once');

$orders->stop;
$dispatch->stop;
done_testing();
