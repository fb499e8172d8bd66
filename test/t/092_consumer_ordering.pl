# The consumer's side of ordering keys (issue 17): a key's messages are
# applied in their committed order, through failures of every kind.
#  - 200 keys x 50 events, committed interleaved from 4 sessions of the
#    order service, applied by the dispatch service's consumer through
#    transient handler failures (about one attempt in 20), a broker
#    restart and a SIGKILL of the consumer: every key's applied sequence
#    is its committed one, nothing missing, nothing twice;
#  - a key whose message is dead-lettered holds its later messages
#    (parked, acknowledged) and only those, under after_dead_letter =
#    wait, until the letter is redriven (it is applied first) or
#    discarded; under proceed they go on.
use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $mq = MqtxTest::RabbitMQ->new(name => 'cordering');
$mq->start;
my $url = $mq->url;
my ($KEYS, $EVENTS, $SESSIONS) = (200, 50, 4);

my $orders = mqtx_node('co_orders',
	'mqtx.broker_url' => "'$url'",
	'mqtx.consumer_enabled' => 'off');
$orders->safe_psql('postgres', q{
	CREATE EXTENSION mqtx;
	SELECT mqtx.declare_queue('events');
});
create_keyed_emitter($orders, $KEYS, $EVENTS, '', 'events');

my $dispatch = mqtx_node('co_dispatch',
	'mqtx.broker_url' => "'$url'",
	'mqtx.relay_enabled' => 'off',
	'mqtx.retry_base' => "'20ms'",
	'mqtx.retry_max' => "'200ms'");
$dispatch->safe_psql('postgres', q{
	CREATE EXTENSION mqtx;
	-- applied in this order (no unique constraint: a second apply shows)
	CREATE TABLE applied (seq bigserial PRIMARY KEY, k text, n int);
	CREATE TABLE settings (flaky boolean, broken text[]);
	INSERT INTO settings VALUES (true, '{}');
	CREATE FUNCTION apply_event(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		IF (SELECT flaky FROM settings) AND random() < 0.05 THEN
			RAISE EXCEPTION 'transient failure';
		END IF;
		IF EXISTS (SELECT FROM settings WHERE payload->>'k' || '/' || (payload->>'n') = ANY (broken)) THEN
			RAISE EXCEPTION 'cannot apply %', payload;
		END IF;
		INSERT INTO applied (k, n) VALUES (payload->>'k', (payload->>'n')::int);
	END $$;
	SELECT mqtx.subscribe('events', 'apply_event(jsonb,jsonb)', max_attempts => 1000);
});
wait_for($dispatch, 'postgres', 'SELECT bool_and(broker_connected) FROM mqtx.consumer_stats',
	't', 'the consumer connects');
wait_until('the consumer consumes the queue', sub { ($mq->consumer_count('events') // 0) == 1 });

# --- 200 keys x 50 events through failures, a broker restart, a SIGKILL --
my $sessions = start_keyed_sessions($orders, $KEYS, $EVENTS, $SESSIONS);
wait_for($dispatch, 'postgres', 'SELECT count(*) >= 2000 FROM applied', 't',
	'events are applied while they stream in');
$mq->stop;
usleep(500_000);
$mq->start;
wait_for($dispatch, 'postgres', 'SELECT count(*) >= 5000 FROM applied', 't',
	'and again after the broker restarted');
my $consumer_pid = worker_pid($dispatch, 'consumer');
kill 'KILL', $consumer_pid;
is(finish_sessions($sessions), '', 'the 4 sessions committed without an error');
is($orders->safe_psql('postgres', 'SELECT sum(n) FROM counters'), $KEYS * $EVENTS,
	"$KEYS x $EVENTS events committed");
wait_for($dispatch, 'postgres', 'SELECT count(DISTINCT (k, n)) FROM applied',
	$KEYS * $EVENTS, 'every event is applied, after the consumer was killed');
isnt(worker_pid($dispatch, 'consumer'), $consumer_pid, 'a new consumer took over');
wait_for($dispatch, 'postgres', 'SELECT count(*) FROM mqtx.parked', '0',
	'nothing is left parked');
is($dispatch->safe_psql('postgres', 'SELECT count(*) FROM applied'), $KEYS * $EVENTS,
	'nothing is applied twice');
is($dispatch->safe_psql('postgres', qq{
	SELECT count(*) FROM (
		SELECT k, array_agg(n ORDER BY seq) AS applied_order FROM applied GROUP BY k) a
	WHERE applied_order <> ARRAY(SELECT generate_series(1, $EVENTS))}),
	'0', 'every key\'s events were applied in their committed order');
ok($dispatch->safe_psql('postgres', 'SELECT retried FROM mqtx.consumer_stats') > 0,
	'transient failures were retried on the way');
is($dispatch->safe_psql('postgres', 'SELECT count(*) FROM mqtx.dead_letter'), '0',
	'nothing was dead-lettered');

# --- a dead letter holds its key (wait), or not (proceed) ----------------
$dispatch->safe_psql('postgres', q{
	UPDATE settings SET flaky = false, broken = '{stuck/1,gone/1,loose/1}';
	TRUNCATE applied;
	SELECT mqtx.subscribe('strict', 'apply_event(jsonb,jsonb)', max_attempts => 2);
	SELECT mqtx.subscribe('lenient', 'apply_event(jsonb,jsonb)', max_attempts => 2,
						  after_dead_letter => 'proceed');
});
wait_until('the consumer consumes the new queues',
	sub { ($mq->consumer_count('strict') // 0) == 1 && ($mq->consumer_count('lenient') // 0) == 1 });
$orders->safe_psql('postgres', q{
	SELECT mqtx.declare_queue('strict');
	SELECT mqtx.declare_queue('lenient');
	SELECT mqtx.publish('', q, jsonb_build_object('k', k, 'n', n), ordering_key => k)
	FROM (VALUES ('strict', 'stuck'), ('strict', 'gone'), ('strict', 'free'), ('lenient', 'loose')) v(q, k),
		 generate_series(1, 3) n
	ORDER BY n, k;
});
wait_for($dispatch, 'postgres',
	"SELECT string_agg(n::text, ',' ORDER BY seq) FROM applied WHERE k = 'free'",
	'1,2,3', 'another key of the queue flows');
wait_for($dispatch, 'postgres',
	"SELECT string_agg(n::text, ',' ORDER BY seq) FROM applied WHERE k = 'loose'",
	'2,3', 'under proceed the key goes on past its dead letter, in order');
wait_for($dispatch, 'postgres',
	"SELECT string_agg(queue || ':' || ordering_key || ':' || reason || ':' || parked, ',' ORDER BY queue, ordering_key)
	 FROM mqtx.held_keys",
	'strict:gone:dead letter:2,strict:stuck:dead letter:2',
	'mqtx.held_keys: under wait the two keys are held by their dead letters, 2 parked each');
is($dispatch->safe_psql('postgres', "SELECT count(*) FROM applied WHERE k IN ('stuck', 'gone')"),
	'0', 'nothing of the held keys is applied');
wait_queue_drained($mq, 'strict', 'the parked messages are acknowledged');

# Redriven once the cause is fixed, the letter is applied first, then the
# key's parked messages; discarded, the parked ones go on without it.
$dispatch->safe_psql('postgres', q{
	UPDATE settings SET broken = '{}';
	SELECT mqtx.redrive(id) FROM mqtx.dead_letter WHERE ordering_key = 'stuck';
	SELECT mqtx.discard(id) FROM mqtx.dead_letter WHERE ordering_key = 'gone';
});
wait_for($dispatch, 'postgres',
	"SELECT string_agg(n::text, ',' ORDER BY seq) FROM applied WHERE k = 'stuck'",
	'1,2,3', 'the redriven letter is applied first, then the key\'s others, in order');
wait_for($dispatch, 'postgres',
	"SELECT string_agg(n::text, ',' ORDER BY seq) FROM applied WHERE k = 'gone'",
	'2,3', 'after a discard, the key\'s parked messages are applied');
is($dispatch->safe_psql('postgres', 'SELECT count(*) FROM mqtx.held_keys'), '0',
	'no key is held: the lenient key\'s letter holds nothing')
  or diag($dispatch->safe_psql('postgres', 'SELECT * FROM mqtx.held_keys'));

$orders->stop;
$dispatch->stop;
$mq->stop;
done_testing();
