# Correlation, causation and trace context through the whole way (issue
# 18): a message enqueued with a trace context goes relay -> broker ->
# consumer -> handler; what the handler publishes goes relay -> broker ->
# consumer again, and arrives with the first message's correlation id (as
# the AMQP property), naming it as its cause, in the same trace.  Both
# apply paths hand it down: the consumer's own, and an apply worker's from
# mqtx.parked.  One delivery's trace context does not leak into the next
# of its batch; a handler that starts a span of its own passes that on; a
# foreign message's correlation_id property is honoured and its invalid
# traceparent ignored; a dead letter redriven keeps its conversation; and
# mqtx.message_chain shows a conversation as the database saw it.
use strict;
use warnings FATAL => 'all';

use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $mq = MqtxTest::RabbitMQ->new(name => 'context');
$mq->start;
my $url = $mq->url;

my $node = mqtx_node('context', 'mqtx.broker_url' => "'$url'");

my $T1 = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
my $S1 = 'congo=t61rcWkgMzE';
my $T2 = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01';
my $T4 = '00-11111111111111111111111111111111-2222222222222222-01';
my $T4_OWN = '00-11111111111111111111111111111111-3333333333333333-01';

$node->safe_psql('postgres', qq{
	CREATE EXTENSION mqtx;
	-- what each handler saw: its message, headers and current trace context
	CREATE TABLE seen (stage text, n int, own boolean, headers jsonb,
		traceparent text, tracestate text, backend text, xid bigint);
	CREATE FUNCTION note(stage text, payload jsonb, headers jsonb) RETURNS void
	LANGUAGE sql AS \$\$
		INSERT INTO seen VALUES (stage, (payload->>'n')::int, (payload->>'own')::boolean,
			headers, current_setting('mqtx.traceparent'), current_setting('mqtx.tracestate'),
			(SELECT backend_type FROM pg_stat_activity WHERE pid = pg_backend_pid()),
			txid_current())
	\$\$;
	-- the first stage publishes the next, and a copy to a queue nobody
	-- consumes, to look at on the wire; one asked to starts a span of its own
	CREATE FUNCTION pass_on(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS \$\$
	BEGIN
		PERFORM note('first', payload, headers);
		PERFORM pg_sleep((payload->>'sleep')::float8);
		PERFORM mqtx.publish('', 'ctx.sink', payload);
		PERFORM mqtx.publish('', 'ctx.watch', payload);
		IF payload ? 'own_trace' THEN
			PERFORM set_config('mqtx.traceparent', payload->>'own_trace', true);
			PERFORM mqtx.publish('', 'ctx.sink', payload || '{"own": true}');
		END IF;
	END \$\$;
	CREATE FUNCTION sink(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE sql AS \$\$ SELECT note('sink', payload, headers) \$\$;
	-- refuses until allowed: a dead letter, redriven
	CREATE TABLE allowed (ok boolean);
	INSERT INTO allowed VALUES (false);
	CREATE FUNCTION picky(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS \$\$
	BEGIN
		IF NOT (SELECT ok FROM allowed) THEN
			RAISE EXCEPTION 'not allowed yet';
		END IF;
		PERFORM pass_on(payload, headers);
	END \$\$;
	SELECT mqtx.declare_queue('ctx.watch');
	SELECT mqtx.subscribe('ctx.direct', 'pass_on(jsonb, jsonb)');
	SELECT mqtx.subscribe('ctx.parallel', 'pass_on(jsonb, jsonb)', workers => 2);
	SELECT mqtx.subscribe('ctx.picky', 'picky(jsonb, jsonb)', max_attempts => 1);
	SELECT mqtx.subscribe('ctx.sink', 'sink(jsonb, jsonb)');
});
wait_queue_exists($url, $_) for qw(ctx.direct ctx.parallel ctx.picky ctx.sink ctx.watch);
my $relay_pid = worker_pid($node, 'relay');
my $consumer_pid = worker_pid($node, 'consumer');

sub one
{
	my ($sql) = @_;
	return $node->safe_psql('postgres', $sql);
}

# The sink's row for message n (and own copy), as a hash.
sub sink_row
{
	my ($n, $own) = @_;
	my $json = one("SELECT row_to_json(s) FROM seen s WHERE stage = 'sink' AND n = $n
		AND own IS " . ($own ? 'true' : 'NOT true'));
	return $json eq '' ? {} : decode_json($json);
}

# ------------------------------------------------------------------
# 1 and 3: one transaction, two messages to the consumer's own path: the
# first in a trace and without a correlation id (it starts one), the
# second in no trace.  They are sent while the consumer sleeps in the
# handler of message 0, so that they arrive together, for one batch.
one(q{SELECT mqtx.publish('', 'ctx.direct', '{"n": 0, "sleep": 2}')});
wait_for($node, 'postgres',
	"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'mqtx consumer' AND wait_event = 'PgSleep'",
	'1', 'the consumer is busy with message 0');
my ($id1, $id3) = split /\n/, one(qq{
	BEGIN;
	SET LOCAL mqtx.traceparent = '$T1';
	SET LOCAL mqtx.tracestate = '$S1';
	SELECT mqtx.publish('', 'ctx.direct', '{"n": 1}');
	RESET mqtx.traceparent;
	SELECT mqtx.publish('', 'ctx.direct', '{"n": 3}');
	COMMIT;
});
# 2: an explicit correlation id, through an apply worker (parked first)
my $id2 = one(qq{
	BEGIN;
	SET LOCAL mqtx.traceparent = '$T2';
	SELECT mqtx.publish('', 'ctx.parallel', '{"n": 2}', correlation_id => 'checkout-2');
	COMMIT;
});
# 4: the handler starts a span of its own for one of its messages
my $id4 = one(qq{
	BEGIN;
	SET LOCAL mqtx.traceparent = '$T4';
	SELECT mqtx.publish('', 'ctx.direct', '{"n": 4, "own_trace": "$T4_OWN"}');
	COMMIT;
});
# 5: a foreign publisher's message, with its own correlation_id property and
# a traceparent that is not one
amqp_publish($url, 'ctx.direct', id => 'foreign-5', correlation_id => 'foreign-corr',
	headers => ['traceparent=not-a-trace'], body => '{"n": 5}');

wait_for($node, 'postgres', "SELECT count(*) FROM seen WHERE stage = 'sink'", '7',
	'every message of the first stage led to its sink message (6 + the own-span copy)');

my $r1 = sink_row(1);
is($r1->{headers}{'x-mqtx-correlation-id'}, $id1,
	'a message that started a conversation: its id is the correlation id of what its handler published');
is($r1->{headers}{'x-mqtx-causation-id'}, $id1, '... and its cause');
is($r1->{traceparent}, $T1, 'the sink handler ran in the first message\'s trace');
is($r1->{tracestate}, $S1, '... with its tracestate');
is($r1->{headers}{traceparent}, $T1, 'the message the handler published carried it');
is(one("SELECT correlation_id || ' ' || causation_id FROM mqtx.inbox
		WHERE queue = 'ctx.sink' AND causation_id = '$id1'"),
	"$id1 $id1", 'the consumer read the correlation_id property and the causation header off the wire');
is(one("SELECT traceparent FROM seen WHERE stage = 'first' AND n = 1"), $T1,
	'the first handler ran in the trace its publisher set');

my $r3 = sink_row(3);
is(one("SELECT count(DISTINCT xid) FROM seen WHERE stage = 'first' AND n IN (1, 3)"), '1',
	'messages 1 and 3 were applied in one batch, one transaction');
is(one("SELECT traceparent || '|' || tracestate FROM seen WHERE stage = 'first' AND n = 3"), '|',
	'the next delivery of the batch, in no trace, did not inherit the one before it');
ok(!exists $r3->{headers}{traceparent}, '... nor did what its handler published');
is($r3->{headers}{'x-mqtx-correlation-id'}, $id3, '... which is its own conversation');

my $r2 = sink_row(2);
is(one("SELECT backend FROM seen WHERE stage = 'first' AND n = 2"), 'mqtx apply worker',
	'the parallel queue\'s message was applied by an apply worker, from mqtx.parked');
is($r2->{headers}{'x-mqtx-correlation-id'}, 'checkout-2',
	'a correlation id set by the publisher is handed down through parking');
is($r2->{headers}{'x-mqtx-causation-id'}, $id2, '... with the cause');
is($r2->{traceparent}, $T2, '... and the trace');

my $r4 = sink_row(4);
my $r4own = sink_row(4, 1);
is($r4->{headers}{traceparent}, $T4, 'without a span of its own, the handler passes its trace on');
is($r4own->{headers}{traceparent}, $T4_OWN, 'a handler that sets its own span passes that on');
is($r4own->{headers}{'x-mqtx-causation-id'}, $id4, '... still caused by the message it handles');

my $r5 = sink_row(5);
is(one("SELECT traceparent FROM seen WHERE stage = 'first' AND n = 5"), '',
	'a foreign message with an invalid traceparent is applied, in no trace');
is($r5->{headers}{'x-mqtx-correlation-id'}, 'foreign-corr',
	'a foreign message\'s correlation_id property is handed down');
is($r5->{headers}{'x-mqtx-causation-id'}, 'foreign-5', '... and its message id is the cause');
ok(!exists $r5->{headers}{traceparent}, '... and the invalid traceparent is not');

# On the wire: the copies in the queue nobody consumes.
wait_until('the watched copies are on the broker', sub { (queue_count($url, 'ctx.watch') // 0) >= 5 });
my %wire;
for my $m (@{ amqp_messages($url, 'ctx.watch') })
{
	$wire{ message_body($m)->{n} } = $m;
}
is($wire{1}{correlation_id}, $id1, 'the relay sent the correlation id as the AMQP property');
is($wire{2}{correlation_id}, 'checkout-2', '... the publisher\'s one too');
is($wire{5}{correlation_id}, 'foreign-corr', '... and the foreign one');
is($wire{2}{headers}{'x-mqtx-causation-id'}, $id2, 'the cause is the header x-mqtx-causation-id');
is($wire{2}{headers}{traceparent}, $T2, 'the trace context is the header traceparent');

# ------------------------------------------------------------------
# A dead letter redriven keeps its conversation: what its handler
# publishes when it is finally applied has its correlation id, and names
# it, by its original id, as the cause.
my $id6 = one(q{SELECT mqtx.publish('', 'ctx.picky', '{"n": 6}', correlation_id => 'checkout-6')});
wait_for($node, 'postgres',
	"SELECT correlation_id FROM mqtx.dead_letter WHERE queue = 'ctx.picky'",
	'checkout-6', 'the refused message is dead-lettered with its correlation id');
one(q{UPDATE allowed SET ok = true});
one(q{SELECT mqtx.redrive_all('ctx.picky')});
wait_for($node, 'postgres', "SELECT count(*) FROM seen WHERE stage = 'sink' AND n = 6", '1',
	'the redriven message was applied, and what it published arrived');
my $r6 = sink_row(6);
is($r6->{headers}{'x-mqtx-correlation-id'}, 'checkout-6', 'a redriven message keeps its correlation id');
is($r6->{headers}{'x-mqtx-causation-id'}, $id6,
	'... and names the original message as the cause of what it caused');

# A correlation header too long for the property, written by hand (a
# superuser may): that message is refused, with why, and nothing else.
my $long = one(q{SELECT mqtx.publish('', 'ctx.sink', '{"n": 7}',
	jsonb_build_object('x-mqtx-correlation-id', repeat('c', 300)))});
one(q{SELECT mqtx.publish('', 'ctx.sink', '{"n": 8}')});
wait_for($node, 'postgres',
	"SELECT last_error LIKE '%correlation id (header x-mqtx-correlation-id) is 300 bytes%' FROM mqtx.outbox WHERE message_id = '$long'",
	't', 'a correlation id too long for AMQP is refused for its message, saying why');
wait_for($node, 'postgres', "SELECT count(*) FROM seen WHERE stage = 'sink' AND n = 8", '1',
	'... and the next message goes out');

# ------------------------------------------------------------------
# The chain of message 1, as this database saw it: sent and received,
# then what its handler sent (two) and what of that came back (one).
is( one("SELECT string_agg(depth || ' ' || direction || ' ' || coalesce(queue, routing_key), ', '
		ORDER BY depth, direction DESC, coalesce(queue, routing_key))
		FROM mqtx.message_chain('$id1')"),
	'0 sent ctx.direct, 0 received ctx.direct, 1 sent ctx.sink, 1 sent ctx.watch, 1 received ctx.sink',
	'mqtx.message_chain shows the message, what caused it and what it caused');
is(one("SELECT count(DISTINCT correlation_id) FROM mqtx.message_chain('$id1')"), '1',
	'... all in one conversation');
is(one("SELECT count(*) FROM mqtx.message_trail WHERE correlation_id = 'checkout-2'"), '5',
	'mqtx.message_trail finds a conversation by its correlation id');

is(worker_pid($node, 'relay'), $relay_pid, 'the relay kept running');
is(worker_pid($node, 'consumer'), $consumer_pid, 'the consumer kept running');

$node->stop;
$mq->stop;
done_testing();
