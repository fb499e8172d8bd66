# The relay publishes the outbox to a real RabbitMQ node: message
# properties, the outbox trigger, wake-up at commit, unroutable messages,
# an unknown exchange, and several databases served at once.
use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $mq = MqtxTest::RabbitMQ->new(name => 'relay');
$mq->start;
my $url = $mq->url;

my $node = mqtx_node('relay',
	'mqtx.broker_url' => "'$url'",
	'mqtx.database' => "'postgres,second'",
	'mqtx.max_attempts' => '3');

$node->safe_psql('postgres', q{
	CREATE EXTENSION mqtx;
	SELECT mqtx.declare_exchange('orders', 'direct');
	SELECT mqtx.declare_queue('dispatch');
	SELECT mqtx.bind('dispatch', 'orders', 'order.created');
});

# --- properties of a published message
$node->safe_psql('postgres', q{
	CREATE TABLE sent AS
	SELECT mqtx.publish('orders', 'order.created', '{"order_id": 1, "note": "caf\u00e9"}',
		'{"tenant": "acme", "priority": 5, "ratio": 0.5, "vip": true, "tags": ["a", "b"]}') AS id;
});
wait_for($node, 'postgres',
	"SELECT status FROM mqtx.outbox o JOIN sent ON o.message_id = sent.id",
	'published', 'a published message is marked published');

my $msgs = amqp_messages($url, 'dispatch');
is(scalar @$msgs, 1, 'exactly one message reached the queue');
my $m = $msgs->[0];
is($m->{message_id}, $node->safe_psql('postgres', 'SELECT id FROM sent'),
	'message_id property is the outbox message_id');
is($m->{delivery_mode}, 2, 'persistent');
is($m->{content_type}, 'application/json', 'content type is JSON');
is($m->{app_id}, 'mqtx', 'app_id names mqtx');
is($m->{exchange}, 'orders', 'sent to the row\'s exchange');
is($m->{routing_key}, 'order.created', 'with the row\'s routing key');
is_deeply(
	$m->{headers},
	{ tenant => 'acme', priority => 5, ratio => 0.5, vip => JSON::PP::true(), tags => [ 'a', 'b' ] },
	'headers arrive as an AMQP table');
is_deeply(message_body($m),
	{ order_id => 1, note => "caf\x{e9}" }, 'the body is the payload as JSON');
ok(abs($m->{timestamp} - time) < 120, 'timestamp is the enqueue time');
is( $node->safe_psql('postgres',
		"SELECT attempts, last_error IS NULL, published_at IS NOT NULL FROM mqtx.outbox o JOIN sent ON o.message_id = sent.id"),
	'0|t|t',
	'no failed attempts, publish time recorded');

# --- the outbox trigger, many rows in one transaction
$node->safe_psql('postgres', q{
	CREATE TABLE orders (order_id bigint PRIMARY KEY, user_id bigint, content text);
	CREATE TRIGGER orders_outbox AFTER INSERT ON orders
		FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('orders', 'order.created');
	INSERT INTO orders SELECT g, g % 7, 'order ' || g FROM generate_series(1, 300) g;
});
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.outbox WHERE routing_key = 'order.created' AND status = 'published'",
	'301', 'all 300 trigger-enqueued orders are published');
$msgs = amqp_messages($url, 'dispatch');
my %order_ids = map { message_body($_)->{order_id} => 1 } @$msgs;
is(scalar @$msgs, 300, '300 messages in the queue');
is(scalar keys %order_ids, 300, 'one per order, no duplicates, none missing');
my %ids_in_queue = map { $_->{message_id} => 1 } @$msgs;
my @outbox_ids = split /\n/, $node->safe_psql('postgres',
	"SELECT message_id FROM mqtx.outbox WHERE payload ? 'content'");
is(scalar(grep { $ids_in_queue{$_} } @outbox_ids), 300,
	'every outbox message_id is in the queue');

# --- wake-up at commit: with a one-minute poll, a commit still goes out at once
$node->safe_psql('postgres', q{
	ALTER SYSTEM SET mqtx.poll_interval = '60s';
	SELECT pg_reload_conf();
});
# Time, not a condition: a worker's settings cannot be seen from outside.
# The second lets the relay take the reload and start a 60 s nap, the half
# second puts the commit well inside that nap.  A relay slower to reload
# would publish within its old 200 ms poll: the check would show less, not
# fail.
sleep 1;
$node->safe_psql('postgres', q{
	SELECT pg_sleep(0.5);
	CREATE TABLE wake AS SELECT mqtx.publish('orders', 'order.created', '{"wake": 1}') AS id, clock_timestamp() AS at;
});
wait_for($node, 'postgres',
	"SELECT status FROM mqtx.outbox o JOIN wake ON o.message_id = wake.id",
	'published', 'a committed message is published without waiting for the poll');
my $latency = $node->safe_psql('postgres',
	"SELECT extract(epoch FROM published_at - created_at) * 1000 FROM mqtx.outbox o JOIN wake ON o.message_id = wake.id");
cmp_ok($latency, '<', 1000, "commit to confirmed publish took ${latency} ms (poll interval is 60 s)");
amqp_messages($url, 'dispatch');	# drain
$node->safe_psql('postgres', q{
	ALTER SYSTEM RESET mqtx.poll_interval;
	SELECT pg_reload_conf();
});

# --- unroutable: returned by the broker, retried with backoff, then failed
my $listener = $node->background_psql('postgres');
$listener->query_safe('LISTEN mqtx_alert');
$node->safe_psql('postgres',
	"CREATE TABLE lost AS SELECT mqtx.publish('orders', 'no.such.route', '{\"x\": 1}') AS id");
wait_for($node, 'postgres',
	"SELECT status FROM mqtx.outbox o JOIN lost ON o.message_id = lost.id",
	'failed', 'an unroutable message ends failed');
is( $node->safe_psql('postgres',
		"SELECT attempts, last_error LIKE 'unroutable:%312 NO_ROUTE%' FROM mqtx.outbox o JOIN lost ON o.message_id = lost.id"),
	'3|t',
	'after mqtx.max_attempts attempts, with the broker\'s reason');
my $notified = $listener->query_safe('SELECT 1');
$listener->quit;
like($notified, qr/outbox_message_failed/,
	'a LISTENing session received the mqtx_alert notification');
unlike($notified, qr/no\.such\.route|NO_ROUTE|"orders"|message_id/,
	'which carries no routing key, exchange, message id or error');
ok( $node->log_contains(qr/WARNING:  mqtx relay: gave up on message [0-9a-f-]{36}/),
	'and a WARNING is logged');

# --- an unknown exchange fails its own rows only
$node->safe_psql('postgres', q{
	SELECT mqtx.publish(CASE WHEN g % 10 = 0 THEN 'no.such.exchange' ELSE 'orders' END,
		'order.created', jsonb_build_object('mixed', g))
	FROM generate_series(1, 100) g;
});
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.outbox WHERE payload ? 'mixed' AND status = 'published'",
	'90', 'the 90 messages for a real exchange are published');
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.outbox WHERE exchange = 'no.such.exchange' AND status = 'failed'"
	  . " AND last_error LIKE '%404 NOT_FOUND - no exchange%'",
	'10', 'the 10 for a missing exchange fail with the broker\'s 404');
is(scalar @{ amqp_messages($url, 'dispatch') }, 90, 'the queue got the 90');

# --- a second database: waited on until the extension exists, then served
$node->safe_psql('postgres', 'CREATE DATABASE second');
$node->safe_psql('second', q{
	CREATE EXTENSION mqtx;
	SELECT mqtx.declare_queue('second.q');
	SELECT mqtx.publish('', 'second.q', '{"db": "second"}');
});
$node->safe_psql('postgres', q{SELECT mqtx.publish('', 'dispatch', '{"db": "postgres"}')});
wait_for($node, 'second', "SELECT status FROM mqtx.outbox", 'published',
	'the second database\'s relay publishes its outbox');
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.relay_stats WHERE pid IS NOT NULL AND broker_connected",
	'2', 'two relays, one per database, both connected');
is(amqp_messages($url, 'second.q')->[0]{body}, '{"db": "second"}',
	'its message is in its queue');
is(amqp_messages($url, 'dispatch')->[0]{body}, '{"db": "postgres"}',
	'and the first database\'s in its own');

# --- counters and the stats view
my $stats = $node->safe_psql('postgres',
	"SELECT published >= 392, returned >= 3, failed = 11, retried > 0 FROM mqtx.relay_stats WHERE database = 'postgres'");
is($stats, 't|t|t|t', 'relay counters add up');
is( $node->safe_psql('postgres', 'SELECT pending, failed FROM mqtx.outbox_stats'),
	'0|11', 'outbox_stats: nothing pending, 11 failed');

$node->stop;
$mq->stop;
done_testing();
