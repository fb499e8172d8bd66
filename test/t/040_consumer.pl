# The consumer worker against a real RabbitMQ node: handler checks,
# exactly-once apply through the inbox, duplicates, retries, dead letters
# (alert, redrive, discard), poison messages, messages without a
# message_id, and unsubscribe.
use strict;
use warnings FATAL => 'all';

use Digest::SHA qw(sha256_hex);
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $mq = MqtxTest::RabbitMQ->new(name => 'consumer');
$mq->start;
my $url = $mq->url;

my $node = mqtx_node('consumer', 'mqtx.broker_url' => "'$url'");

# ------------------------------------------------------------------
# helpers

sub stat_value
{
	my ($column) = @_;
	return $node->safe_psql('postgres',
		"SELECT $column FROM mqtx.consumer_stats WHERE database = 'postgres'");
}

# ------------------------------------------------------------------
# schema of the "dispatch service"

$node->safe_psql('postgres', q{
	CREATE EXTENSION mqtx;

	CREATE TABLE dispatch (order_id bigint PRIMARY KEY,
		applied_at timestamptz NOT NULL DEFAULT clock_timestamp());
	-- the handler's own log of its calls (not unique: shows double applies)
	CREATE TABLE handler_calls (order_id bigint NOT NULL, headers jsonb);
	CREATE FUNCTION dispatch_order(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO handler_calls VALUES ((payload->>'order_id')::bigint, headers);
		INSERT INTO dispatch (order_id) VALUES ((payload->>'order_id')::bigint);
	END $$;

	CREATE TABLE flaky_flag (failing boolean NOT NULL);
	INSERT INTO flaky_flag VALUES (true);
	CREATE TABLE flaky_applied (order_id bigint NOT NULL);
	CREATE FUNCTION flaky(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		IF (SELECT failing FROM flaky_flag) THEN
			RAISE EXCEPTION 'flaky: not yet';
		END IF;
		INSERT INTO flaky_applied VALUES ((payload->>'order_id')::bigint);
	END $$;

	CREATE TABLE refused_applied (order_id bigint NOT NULL, headers jsonb);
	CREATE FUNCTION refuse(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		RAISE EXCEPTION 'dispatch refused: %', payload->>'order_id';
	END $$;

	CREATE TABLE poison_calls (payload jsonb);
	CREATE FUNCTION poison_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO poison_calls VALUES (payload);
	END $$;

	CREATE TABLE mixed_applied (order_id bigint NOT NULL CHECK (order_id <> 13));
	CREATE FUNCTION mixed(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE sql BEGIN ATOMIC
		INSERT INTO mixed_applied VALUES ((payload->>'order_id')::bigint);
	END;

	CREATE FUNCTION bad_args(int) RETURNS void
	LANGUAGE plpgsql AS $$ BEGIN END $$;
	CREATE FUNCTION bad_return(payload jsonb, headers jsonb) RETURNS int
	LANGUAGE sql AS 'SELECT 1';
});

# ------------------------------------------------------------------
# a. handlers with the wrong signature are refused

for my $case ([ 'bad_args(int)', '(int) RETURNS void' ],
	[ 'bad_return(jsonb,jsonb)', '(jsonb, jsonb) RETURNS int' ])
{
	my ($handler, $what) = @$case;
	my ($ret, $stdout, $stderr) = $node->psql('postgres',
		"\\set VERBOSITY verbose\nSELECT mqtx.subscribe('bad.q', '$handler')");
	isnt($ret, 0, "subscribe with a $what handler fails");
	like($stderr, qr/ERROR:  (?:[0-9A-Z]{5}: )?mqtx handler /,
		"the error for a $what handler starts with 'mqtx handler '");
	like($stderr, qr/ERROR:  42P13: /, "with SQLSTATE 42P13 ($what)");
}
is( $node->safe_psql('postgres',
		"SELECT (SELECT count(*) FROM mqtx.subscriptions WHERE queue = 'bad.q'), "
		  . "(SELECT count(*) FROM mqtx.queues WHERE name = 'bad.q')"),
	'0|0', 'a refused subscription leaves no subscription and no queue');

# ------------------------------------------------------------------
# b. 500 distinct messages: applied exactly once, inbox filled, drained

my $N = 500;
$node->safe_psql('postgres',
	"SELECT mqtx.subscribe('orders.q', 'dispatch_order(jsonb,jsonb)')");
is( $node->safe_psql('postgres',
		"SELECT handler::text, prefetch, max_attempts FROM mqtx.subscriptions WHERE queue = 'orders.q'"),
	'dispatch_order(jsonb,jsonb)|100|5',
	'subscription recorded with the default prefetch and max_attempts');
is( $node->safe_psql('postgres',
		"SELECT durable FROM mqtx.queues WHERE name = 'orders.q'"),
	't', 'subscribe records the queue as durable in mqtx.queues');
wait_workers($node, 1, 'one consumer worker runs', kind => 'consumer');
my $consumer_pid = worker_pid($node, 'consumer');
wait_for($node, 'postgres',
	"SELECT broker_connected FROM mqtx.consumer_stats WHERE database = 'postgres'",
	't', 'the consumer connects to the broker');
wait_queue_exists($url, 'orders.q');

amqp_publish_many($url, 'orders.q',
	map { [ "order-$_", qq({"order_id": $_}) ] } 1 .. $N);
wait_for($node, 'postgres', 'SELECT count(*) FROM dispatch',
	$N, "all $N messages are applied");
is( $node->safe_psql('postgres',
		"SELECT count(*), count(DISTINCT message_id), count(*) FILTER (WHERE message_id LIKE 'order-%') "
		  . "FROM mqtx.inbox WHERE queue = 'orders.q'"),
	"$N|$N|$N", "the inbox holds the $N message ids");
is( $node->safe_psql('postgres',
		'SELECT count(*), count(DISTINCT order_id), min(order_id), max(order_id) FROM handler_calls'),
	"$N|$N|1|$N", 'the handler ran once per message');
wait_queue_drained($mq, 'orders.q');
is(queue_count($url, 'orders.q'), 0, 'amqp count: nothing left in orders.q');

# ------------------------------------------------------------------
# c. every message delivered again: duplicates are acked, not applied

my $dup_before = stat_value('duplicates');
amqp_publish_many($url, 'orders.q',
	map { [ "order-$_", qq({"order_id": $_}) ] } 1 .. $N);
amqp_publish($url, 'orders.q', id => 'order-1', body => '{"order_id": 1}', repeat => 3);
my $dup_expected = $N + 3;
wait_for($node, 'postgres',
	"SELECT duplicates - $dup_before >= $dup_expected FROM mqtx.consumer_stats WHERE database = 'postgres'",
	't', "consumer_stats.duplicates grows by at least $dup_expected");
wait_queue_drained($mq, 'orders.q', 'the duplicates are acked');
is($node->safe_psql('postgres', 'SELECT count(*) FROM dispatch'),
	$N, "still exactly $N rows in dispatch");
is($node->safe_psql('postgres', 'SELECT count(*) FROM handler_calls'),
	$N, 'the handler was not called for duplicates');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM mqtx.inbox WHERE queue = 'orders.q'"),
	$N, 'the inbox did not grow');
is( $node->safe_psql('postgres',
		"SELECT (SELECT count(*) FROM mqtx.consumer_attempts WHERE queue = 'orders.q'), "
		  . "(SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'orders.q')"),
	'0|0', 'duplicates cause no failed attempts and no dead letters');

# ------------------------------------------------------------------
# d. a handler that fails, then recovers: applied once after retries

$node->safe_psql('postgres',
	"SELECT mqtx.subscribe('flaky.q', 'flaky(jsonb,jsonb)', max_attempts => 10)");
wait_queue_exists($url, 'flaky.q');
amqp_publish($url, 'flaky.q', id => 'flaky-1', body => '{"order_id": 1}');
wait_for($node, 'postgres',
	"SELECT attempts >= 2 FROM mqtx.consumer_attempts WHERE queue = 'flaky.q' AND message_id = 'flaky-1'",
	't', 'failed attempts are recorded in mqtx.consumer_attempts');
is( $node->safe_psql('postgres',
		"SELECT last_error LIKE '%flaky: not yet%', first_failed_at <= last_failed_at "
		  . "FROM mqtx.consumer_attempts WHERE message_id = 'flaky-1'"),
	't|t', 'with the handler\'s error and the failure times');
is($node->safe_psql('postgres', 'SELECT count(*) FROM flaky_applied'),
	'0', 'nothing is applied while the handler fails');
$node->safe_psql('postgres', 'UPDATE flaky_flag SET failing = false');
wait_for($node, 'postgres', 'SELECT count(*) FROM flaky_applied',
	'1', 'once the handler recovers, the message is applied');
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.consumer_attempts WHERE queue = 'flaky.q'",
	'0', 'its consumer_attempts row is gone');
wait_queue_drained($mq, 'flaky.q');
is( $node->safe_psql('postgres',
		"SELECT (SELECT count(*) FROM flaky_applied), "
		  . "(SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'flaky.q'), "
		  . "(SELECT count(*) FROM mqtx.inbox WHERE queue = 'flaky.q' AND message_id = 'flaky-1')"),
	'1|0|1', 'applied exactly once, not dead-lettered, in the inbox');

# ------------------------------------------------------------------
# e. a handler that always fails: dead letter, alert, redrive

my $listener = $node->background_psql('postgres');
$listener->query_safe('LISTEN mqtx_dead_letter');
$node->safe_psql('postgres',
	"SELECT mqtx.subscribe('refuse.q', 'refuse(jsonb,jsonb)', max_attempts => 3)");
is( $node->safe_psql('postgres',
		"SELECT handler::text, prefetch, max_attempts FROM mqtx.subscriptions WHERE queue = 'refuse.q'"),
	'refuse(jsonb,jsonb)|100|3', 'max_attempts given by name is recorded');
wait_queue_exists($url, 'refuse.q');
amqp_publish($url, 'refuse.q', id => 'refuse-7', body => '{"order_id": 7}',
	headers => ['tenant=acme']);
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.dead_letter WHERE message_id = 'refuse-7'",
	'1', 'a message that always fails ends in mqtx.dead_letter');
is( $node->safe_psql('postgres', q{
		SELECT queue, attempts, error_message, exchange, routing_key,
			headers->>'tenant', body_json = '{"order_id": 7}', body_text,
			convert_from(body, 'UTF8'), first_failed_at <= last_failed_at
		FROM mqtx.dead_letter WHERE message_id = 'refuse-7'}),
	'refuse.q|3|dispatch refused: 7||refuse.q|acme|t|{"order_id": 7}|{"order_id": 7}|t',
	'after max_attempts = 3, with the handler\'s error, the headers and the body');
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.consumer_attempts WHERE message_id = 'refuse-7'",
	'0', 'no consumer_attempts row is left for the dead letter');
wait_queue_drained($mq, 'refuse.q', 'the dead-lettered message is acked');

my $notified = $listener->query_safe('SELECT 1');
$listener->quit;
my $dead_id = $node->safe_psql('postgres',
	"SELECT id FROM mqtx.dead_letter WHERE message_id = 'refuse-7'");
if (ok( $notified =~ /Asynchronous notification "mqtx_dead_letter" with payload "(.*)" received/,
		'a LISTENing session received the mqtx_dead_letter notification'))
{
	my $note = eval { decode_json($1) };
	ok($note, 'its payload is JSON') or diag("payload: $1");
	$note //= {};
	is_deeply($note,
		{ event => 'dead_letter', database => 'postgres', id => $dead_id, queue => 'refuse.q' },
		'the payload names the event, database, dead letter and queue, nothing of the message');
}
else
{
	diag("listener output: $notified");
}
ok( $node->log_contains(qr/WARNING:  [^\n]*(?:refuse-7|dispatch refused: 7)/),
	'a WARNING about the dead letter is logged');

# fix the handler, redrive: the relay republishes it and it is applied
$node->safe_psql('postgres', q{
	CREATE OR REPLACE FUNCTION refuse(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO refused_applied VALUES ((payload->>'order_id')::bigint, headers);
	END $$;
});
my $redriven = $node->safe_psql('postgres', "SELECT mqtx.redrive($dead_id)");
like($redriven, qr/^[0-9a-f]{8}-[0-9a-f-]{27}$/, 'redrive returns the new message id');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM mqtx.dead_letter WHERE id = $dead_id"),
	'0', 'redrive removes the dead_letter row');
is( $node->safe_psql('postgres',
		"SELECT exchange, routing_key, payload = '{\"order_id\": 7}', headers->>'x-mqtx-redriven-from' "
		  . "FROM mqtx.outbox WHERE message_id = '$redriven'"),
	'|refuse.q|t|refuse-7',
	'it is re-enqueued in the outbox to the default exchange, routed to its queue');
wait_for($node, 'postgres', 'SELECT count(*) FROM refused_applied',
	'1', 'the redriven message is applied by the fixed handler');
is( $node->safe_psql('postgres',
		"SELECT order_id, headers->>'x-mqtx-redriven-from' FROM refused_applied"),
	'7|refuse-7', 'the handler sees the x-mqtx-redriven-from header');
is($node->safe_psql('postgres', "SELECT headers->>'tenant' FROM refused_applied"),
	'acme', 'and the message\'s original headers');
is( $node->safe_psql('postgres',
		"SELECT (SELECT count(*) FROM mqtx.inbox WHERE queue = 'refuse.q' AND message_id = 'refuse-7'), "
		  . "(SELECT count(*) FROM mqtx.inbox WHERE queue = 'refuse.q' AND message_id = '$redriven'), "
		  . "(SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'refuse.q')"),
	'1|0|0', 'it keeps its original id in the inbox, not the new one; no dead letter is left');

# ------------------------------------------------------------------
# f. poison messages are dead-lettered at once

$node->safe_psql('postgres',
	"SELECT mqtx.subscribe('poison.q', 'poison_handler(jsonb,jsonb)')");
wait_queue_exists($url, 'poison.q');

amqp_publish($url, 'poison.q', id => 'poison-json', body => 'not json at all');
my $bad_utf8 = PostgreSQL::Test::Utils::tempdir() . '/bad_utf8';
open(my $fh, '>:raw', $bad_utf8) or die "cannot write $bad_utf8: $!";
print $fh "\xff\xfe";
close($fh);
amqp_publish($url, 'poison.q', id => 'poison-utf8', body_file => $bad_utf8);

$node->safe_psql('postgres', q{
	ALTER SYSTEM SET mqtx.max_payload = '1kB';
	SELECT pg_reload_conf();
});
# Time, not a condition: a worker's settings cannot be seen from outside.
# The consumer takes a reload at the top of its loop, which the SIGHUP wakes;
# a second is ample for it to have mqtx.max_payload = 1kB before the oversized
# message arrives.
sleep 1;
my ($big_head, $big_tail) = ('{"order_id": 9, "pad": "', '"}');
my $big = $big_head . ('x' x (2000 - length($big_head . $big_tail))) . $big_tail;
is(length($big), 2000, 'the oversized body is 2000 bytes');
amqp_publish($url, 'poison.q', id => 'poison-size', body => $big);

wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'poison.q'",
	'3', 'the three poison messages are dead-lettered');
my %dl;
for my $id (qw(poison-json poison-utf8 poison-size))
{
	my $row = $node->safe_psql('postgres', qq{
		SELECT attempts, encode(body, 'hex'), body_text IS NULL, body_json IS NULL,
			error_message
		FROM mqtx.dead_letter WHERE message_id = '$id'});
	$dl{$id} = [ split /\|/, $row, 5 ];
}
is_deeply([ @{ $dl{'poison-json'} }[ 0 .. 3 ] ],
	[ 1, unpack('H*', 'not json at all'), 'f', 't' ],
	'non-JSON body: 1 attempt, exact bytes, body_text kept, body_json NULL');
like($dl{'poison-json'}[4], qr/JSON/i, 'non-JSON body: the error says JSON')
  or diag("error_message: $dl{'poison-json'}[4]");
is_deeply([ @{ $dl{'poison-utf8'} }[ 0 .. 3 ] ],
	[ 1, 'fffe', 't', 't' ],
	'non-UTF-8 body: 1 attempt, exact bytes, body_text and body_json NULL');
like($dl{'poison-utf8'}[4], qr/UTF-?8/i, 'non-UTF-8 body: the error says UTF-8')
  or diag("error_message: $dl{'poison-utf8'}[4]");
is_deeply([ @{ $dl{'poison-size'} }[ 0 .. 2 ] ],
	[ 1, unpack('H*', $big), 'f' ],
	'oversized body: 1 attempt, exact bytes, body_text kept');
like($dl{'poison-size'}[4], qr/max_payload|too large|larger|size|exceeds/i,
	'oversized body: the error says it is too large')
  or diag("error_message: $dl{'poison-size'}[4]");
is( $node->safe_psql('postgres',
		"SELECT (SELECT count(*) FROM poison_calls), "
		  . "(SELECT count(*) FROM mqtx.consumer_attempts WHERE queue = 'poison.q')"),
	'0|0', 'the handler never saw a poison message; no retries were scheduled');
wait_queue_drained($mq, 'poison.q', 'poison messages are acked');

$node->safe_psql('postgres', q{
	ALTER SYSTEM RESET mqtx.max_payload;
	SELECT pg_reload_conf();
});

# ------------------------------------------------------------------
# g. no message_id: deduplicated on the body's sha256

my $anon = '{"order_id": 1001, "anon": true}';
amqp_publish($url, 'orders.q', body => $anon);
wait_for($node, 'postgres', 'SELECT count(*) FROM dispatch WHERE order_id = 1001',
	'1', 'a message without message_id is applied');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM mqtx.inbox WHERE queue = 'orders.q' AND lower(message_id) = 'sha256:"
		  . sha256_hex($anon) . "'"),
	'1', "its inbox key is 'sha256:' and the body's hash");
$dup_before = stat_value('duplicates');
amqp_publish($url, 'orders.q', body => $anon);
wait_for($node, 'postgres',
	"SELECT duplicates > $dup_before FROM mqtx.consumer_stats WHERE database = 'postgres'",
	't', 'the identical body sent again is a duplicate');
wait_queue_drained($mq, 'orders.q');
is( $node->safe_psql('postgres',
		'SELECT (SELECT count(*) FROM dispatch WHERE order_id = 1001), '
		  . '(SELECT count(*) FROM handler_calls WHERE order_id = 1001), '
		  . "(SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'orders.q')"),
	'1|1|0', 'and is not applied again');

# ------------------------------------------------------------------
# h. unsubscribe stops consumption; subscribing again drains the queue

wait_until('the broker sees a consumer on orders.q',
	sub { ($mq->consumer_count('orders.q') // 0) >= 1 });
is($node->safe_psql('postgres', "SELECT mqtx.unsubscribe('orders.q')"),
	't', 'unsubscribe returns true for a subscribed queue');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM mqtx.subscriptions WHERE queue = 'orders.q'"),
	'0', 'the subscription is gone');
is($node->safe_psql('postgres', "SELECT mqtx.unsubscribe('orders.q')"),
	'f', 'unsubscribe returns false when there is no subscription');
wait_until('the consumer cancels its consumer on orders.q',
	sub { ($mq->consumer_count('orders.q') // -1) == 0 });

amqp_publish_many($url, 'orders.q', map { [ "late-$_", qq({"order_id": $_}) ] } 2001 .. 2005);
my $stable = 1;
for (1 .. 10)
{
	my $n = queue_count($url, 'orders.q');
	$stable = 0, diag('ready in orders.q: ' . ($n // 'no queue'))
	  unless defined $n && $n == 5;
	usleep(200_000);    # time, on purpose: nothing may take them for 2 s
}
ok($stable, 'messages published after unsubscribe stay in the queue (5, for 2 s)');
is( $node->safe_psql('postgres',
		'SELECT (SELECT count(*) FROM dispatch WHERE order_id > 2000), '
		  . '(SELECT count(*) FROM handler_calls WHERE order_id > 2000)'),
	'0|0', 'the handler is not called after unsubscribe');

$node->safe_psql('postgres',
	"SELECT mqtx.subscribe('orders.q', 'dispatch_order(jsonb,jsonb)', prefetch => 50)");
is( $node->safe_psql('postgres',
		"SELECT prefetch, max_attempts FROM mqtx.subscriptions WHERE queue = 'orders.q'"),
	'50|5', 'subscribing again records the new prefetch');
wait_for($node, 'postgres', 'SELECT count(*) FROM dispatch WHERE order_id > 2000',
	'5', 'subscribing again drains the waiting messages');
wait_queue_drained($mq, 'orders.q');

# re-subscribing updates an existing subscription in place
$node->safe_psql('postgres',
	"SELECT mqtx.subscribe('orders.q', 'dispatch_order(jsonb,jsonb)', prefetch => 20, max_attempts => 7)");
is( $node->safe_psql('postgres',
		"SELECT count(*), min(prefetch), min(max_attempts) FROM mqtx.subscriptions WHERE queue = 'orders.q'"),
	'1|20|7', 'subscribe on a subscribed queue updates prefetch and max_attempts');

# ------------------------------------------------------------------
# i. redrive refuses a body that is not JSON; discard removes dead letters

my $json_dl = $node->safe_psql('postgres',
	"SELECT id FROM mqtx.dead_letter WHERE message_id = 'poison-json'");
my $utf8_dl = $node->safe_psql('postgres',
	"SELECT id FROM mqtx.dead_letter WHERE message_id = 'poison-utf8'");
for my $case ([ $json_dl, 'non-JSON' ], [ $utf8_dl, 'non-UTF-8' ])
{
	my ($id, $what) = @$case;
	my ($ret, undef, $stderr) =
	  $node->psql('postgres', "SELECT mqtx.redrive($id)");
	isnt($ret, 0, "redrive of the $what dead letter (body_json NULL) fails");
	like($stderr, qr/ERROR:/, "with an error ($what)");
	is( $node->safe_psql('postgres',
			"SELECT count(*) FROM mqtx.dead_letter WHERE id = $id"),
		'1', "the $what dead letter stays");
}
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM mqtx.outbox WHERE routing_key = 'poison.q'"),
	'0', 'nothing was enqueued by the failed redrives');
is($node->safe_psql('postgres', "SELECT mqtx.discard($json_dl)"),
	't', 'discard returns true for an existing dead letter');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM mqtx.dead_letter WHERE id = $json_dl"),
	'0', 'and removes it');
is($node->safe_psql('postgres', "SELECT mqtx.discard($json_dl)"),
	'f', 'discard of a missing id returns false');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'poison.q'"),
	'2', 'the other dead letters are untouched');

# ------------------------------------------------------------------
# j. one failing delivery among many ready at once (a SQL-language
# handler): the others are applied once each, the failing one alone is
# retried and dead-lettered

$node->safe_psql('postgres', "SELECT mqtx.declare_queue('mixed.q')");
wait_queue_exists($url, 'mixed.q');
amqp_publish_many($url, 'mixed.q', map { [ "mixed-$_", qq({"order_id": $_}) ] } 1 .. 40);
is(queue_count($url, 'mixed.q'), 40, 'forty messages wait in mixed.q');
$node->safe_psql('postgres',
	"SELECT mqtx.subscribe('mixed.q', 'mixed(jsonb,jsonb)', prefetch => 100, max_attempts => 2)");
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.dead_letter WHERE message_id = 'mixed-13'",
	'1', 'the failing message is dead-lettered');
is( $node->safe_psql('postgres',
		'SELECT count(*), count(DISTINCT order_id), bool_and(order_id <> 13) FROM mixed_applied'),
	'39|39|t', 'the 39 others are applied once each');
like( $node->safe_psql('postgres',
		"SELECT attempts || ' ' || error_message FROM mqtx.dead_letter WHERE message_id = 'mixed-13'"),
	qr/^2 .*mixed_applied_order_id_check/,
	'after max_attempts, with the check constraint\'s error');
is( $node->safe_psql('postgres',
		"SELECT count(*), count(*) FILTER (WHERE message_id = 'mixed-13') FROM mqtx.inbox WHERE queue = 'mixed.q'"),
	'40|1', 'the inbox holds the 39 applied ids and the dead-lettered one');
wait_queue_drained($mq, 'mixed.q', 'mixed.q is drained');

# ------------------------------------------------------------------
# inbox retention: ids applied longer ago than mqtx.inbox_retention go,
# recent ones stay

my $inbox_total = $node->safe_psql('postgres', 'SELECT count(*) FROM mqtx.inbox');
$node->safe_psql('postgres', q{
	UPDATE mqtx.inbox SET applied_at = now() - interval '2 hours'
	WHERE message_id IN (SELECT message_id FROM mqtx.inbox WHERE queue = 'orders.q'
	                     ORDER BY message_id LIMIT 300);
	ALTER SYSTEM SET mqtx.inbox_retention = '1h';
	SELECT pg_reload_conf();
});
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.inbox WHERE applied_at < now() - interval '1 hour'",
	'0', 'inbox rows older than mqtx.inbox_retention are deleted');
is($node->safe_psql('postgres', 'SELECT count(*) FROM mqtx.inbox'),
	$inbox_total - 300, 'and only those');
$node->safe_psql('postgres', q{
	ALTER SYSTEM RESET mqtx.inbox_retention;
	SELECT pg_reload_conf();
});

# ------------------------------------------------------------------
# counters, and the worker never restarted

# applied: 500 (b) + 1 (d) + 1 (e, redriven) + 1 (g) + 5 (h) + 39 (j)
is( $node->safe_psql('postgres', q{
		SELECT applied, dead_lettered, duplicates >= 504, retried > 0, consumed >= applied + duplicates
		FROM mqtx.consumer_stats WHERE database = 'postgres'}),
	'547|5|t|t|t', 'consumer_stats counters add up');
is(worker_pid($node, 'consumer'),
	$consumer_pid, 'the same consumer worker ran throughout (no crash)');

# (before stopping the node: shutdown ends the workers with exit code 1)
unlike(slurp_file($node->logfile),
	qr/background worker "[^"]*consumer[^"]*" \(PID \d+\) (?:exited with exit code [1-9]|was terminated)/,
	'the consumer worker never died');

$node->stop;
$mq->stop;
done_testing();
