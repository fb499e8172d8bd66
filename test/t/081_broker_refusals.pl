# What the broker refuses affects only the object it refuses:
#
# 1. A subscription the broker user may not consume (basic.consume refused
#    with 403): the other subscription is applied, the consumer neither
#    restarts nor reconnects in a loop, and mqtx.broker_errors says what
#    was refused.  Once the permission is granted the refused queue is
#    applied and its error row goes.
# 2. An exchange of a type the broker does not know (x-delayed-message
#    without its plugin: RabbitMQ closes the whole connection with 503
#    when it is declared): the rest of the topology is declared, messages
#    to the other exchanges flow, the messages to the bad one carry an
#    error, the relay does not restart, and mqtx.broker_errors says why.
use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $mq = MqtxTest::RabbitMQ->new(name => 'refusals');
$mq->start;
my $guest_url = $mq->url;

# The workers' broker user may read (consume) every queue but "forbidden".
my $password = 'pw-3c1f-limited';
$mq->ctl('add_user', 'limited', $password);
$mq->ctl('set_permissions', '-p', '/', 'limited', '.*', '.*', '^(?!forbidden$).*');
my $url = $mq->url(user => 'limited', password => $password);

my $node = mqtx_node('refusals', 'mqtx.broker_url' => "'$url'");

sub sql { return $node->safe_psql('postgres', $_[0]) }

sub consumer_pid { return worker_pid($node, 'consumer', db => 'postgres') }

sub consumer_reconnects
{
	return sql("SELECT reconnects FROM mqtx.consumer_stats WHERE database = 'postgres'");
}

sub relay_pid_now { return worker_pid($node, 'relay', db => 'postgres') }

sub broker_error_rows
{
	return sql_result($node,
		'SELECT worker, object_type, object_name, failures, error FROM mqtx.broker_errors ORDER BY 1, 2, 3');
}

sql(q{
	CREATE EXTENSION mqtx;
	CREATE TABLE applied (queue text NOT NULL, n int NOT NULL);
	CREATE FUNCTION apply_message(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE sql AS $$
		INSERT INTO applied VALUES (payload->>'queue', (payload->>'n')::int)
	$$;
});
wait_for($node, 'postgres',
	"SELECT broker_connected FROM mqtx.consumer_stats WHERE database = 'postgres'",
	't', 'the consumer connects as the limited user');

# ------------------------------------------------------------------
# 1. a refused subscription

sql(q{
	SELECT mqtx.subscribe('normal.q', 'apply_message(jsonb,jsonb)');
	SELECT mqtx.subscribe('forbidden', 'apply_message(jsonb,jsonb)');
});
wait_queue_exists($guest_url, $_) for qw(normal.q forbidden);

# the broker does refuse the limited user that queue
my $refused = eval { amqp_tool('get', '--url', $url, '--queue', 'forbidden'); 1 } ? '' : $@;
like($refused, qr/ACCESS_REFUSED/, 'the broker refuses the limited user reading "forbidden"');

my $consumer = consumer_pid();
like($consumer, qr/^\d+$/, "the consumer runs (pid $consumer)");
amqp_publish_many($guest_url, 'normal.q',
	map { [ "normal-$_", qq({"queue": "normal.q", "n": $_}) ] } 1 .. 10);
amqp_publish_many($guest_url, 'forbidden',
	map { [ "forbidden-$_", qq({"queue": "forbidden", "n": $_}) ] } 1 .. 10);
query_within($node, 30, "SELECT count(*) FROM applied WHERE queue = 'normal.q'", '10',
	'the other subscription is applied');

# ~10 s with the refusal in place: no restart, no reconnect loop
my %pids_seen;
my $until = time + 10;
while (time < $until)
{
	$pids_seen{ consumer_pid() }++;
	sleep 1;    # time, on purpose: a look a second at the same process
}
is(join(',', sort keys %pids_seen), $consumer,
	'the same consumer process throughout the refusal');
my $reconnects = consumer_reconnects();
cmp_ok($reconnects, '<', 3,
	"the consumer does not reconnect in a loop ($reconnects reconnects)");
is(sql("SELECT count(*) FROM applied WHERE queue = 'forbidden'"), '0',
	'nothing of the refused queue is applied');
query_within($node, 15, q{
	SELECT count(*) FROM mqtx.broker_errors
	WHERE worker = 'consumer' AND object_type = 'subscription'
	  AND object_name = 'forbidden' AND error ~ '403|ACCESS_REFUSED'},
	'1', 'mqtx.broker_errors holds the refusal of the subscription, with the 403')
  or diag('mqtx.broker_errors: ' . broker_error_rows());
note('mqtx.broker_errors during the refusal: ' . broker_error_rows());

# the permission granted, the refused subscription is retried and applied
$mq->ctl('set_permissions', '-p', '/', 'limited', '.*', '.*', '.*');
query_within($node, 60, "SELECT count(*) FROM applied WHERE queue = 'forbidden'", '10',
	'once the broker allows it, the refused queue is applied');
query_within($node, 20, q{
	SELECT count(*) FROM mqtx.broker_errors
	WHERE worker = 'consumer' AND object_name = 'forbidden'},
	'0', 'and its mqtx.broker_errors row is gone')
  or diag('mqtx.broker_errors: ' . broker_error_rows());
is(consumer_pid(), $consumer, 'the same consumer process after the grant');
is(sql('SELECT count(*), count(DISTINCT (queue, n)) FROM applied'), '20|20',
	'each message applied exactly once');
note('consumer reconnects so far: ' . consumer_reconnects());

# ------------------------------------------------------------------
# 2. an exchange of an unknown type

# One transaction, so that the workers see it all at once: 'delayed'
# sorts before 'orders' and, declared first, takes the connection down
# before the good exchange is declared.
my $relay = relay_pid_now();
like($relay, qr/^\d+$/, "the relay runs (pid $relay)");
sql(q{
	BEGIN;
	SELECT mqtx.declare_exchange('orders', 'direct');
	SELECT mqtx.declare_queue('dispatch');
	SELECT mqtx.bind('dispatch', 'orders', 'order.created');
	SELECT mqtx.declare_exchange('delayed', 'x-delayed-message');
	SELECT mqtx.declare_queue('later');
	SELECT mqtx.bind('later', 'delayed', 'order.later');
	COMMIT;
});
sql(q{
	SELECT count(mqtx.publish('orders', 'order.created', jsonb_build_object('n', g)))
	FROM generate_series(1, 20) g;
	SELECT count(mqtx.publish('delayed', 'order.later', jsonb_build_object('n', g)))
	FROM generate_series(1, 5) g;
});
wait_within(45, 'the messages to the good exchange reach their queue',
	sub { (queue_count($guest_url, 'dispatch') // -1) == 20 });
query_within($node, 15,
	"SELECT count(*) FROM mqtx.outbox WHERE exchange = 'orders' AND status = 'published'",
	'20', 'and their outbox rows are published');
query_within($node, 20,
	"SELECT count(*) FROM mqtx.outbox WHERE exchange = 'delayed' AND last_error IS NOT NULL",
	'5', 'the messages to the unknown exchange type carry a last_error');
is(sql("SELECT count(*) FROM mqtx.outbox WHERE exchange = 'delayed' AND status = 'published'"),
	'0', 'and none of them counts as published');
note('their last_error: '
	  . sql("SELECT DISTINCT last_error FROM mqtx.outbox WHERE exchange = 'delayed'"));
ok(!(grep { $_ eq 'delayed' } $mq->exchange_names),
	'the broker has no exchange "delayed"');
is(scalar(grep { $_ eq 'orders' } $mq->exchange_names), 1,
	'it has the exchange "orders"');
query_within($node, 15, q{
	SELECT count(*) FROM mqtx.broker_errors
	WHERE worker = 'relay' AND object_type = 'exchange' AND object_name = 'delayed'
	  AND error LIKE '%x-delayed-message%'},
	'1', 'mqtx.broker_errors holds the relay\'s failure to declare "delayed", naming its type')
  or diag('mqtx.broker_errors: ' . broker_error_rows());
note('mqtx.broker_errors with the bad exchange: ' . broker_error_rows());
is(relay_pid_now(), $relay, 'the same relay process throughout');
note('relay reconnects: ' . sql('SELECT reconnects FROM mqtx.relay_stats'));

# the consumer, which declares the same topology, goes on applying
amqp_publish_many($guest_url, 'normal.q',
	map { [ "normal-$_", qq({"queue": "normal.q", "n": $_}) ] } 11 .. 15);
query_within($node, 30, "SELECT count(*) FROM applied WHERE queue = 'normal.q'", '15',
	'with the bad exchange declared, the consumer still applies its queues');
is(consumer_pid(), $consumer, 'the same consumer process throughout');

# Trying "delayed" again (its backoff starts at 5 s) must not cost the
# workers their connections a second time: it is tried on a probe
# connection of its own.
my $delayed_failures = q{SELECT failures FROM mqtx.broker_errors
	WHERE worker = 'relay' AND object_type = 'exchange' AND object_name = 'delayed'};
my $relay_reconnects = sql(q{SELECT reconnects FROM mqtx.relay_stats});
my $failures_before = sql($delayed_failures);
query_within($node, 90, "SELECT ($delayed_failures) > $failures_before",
	't', 'the relay tries "delayed" again, and the broker refuses it again');
is(sql(q{SELECT reconnects FROM mqtx.relay_stats}), $relay_reconnects,
	'the retry did not cost the relay its connection');
sql("SELECT count(mqtx.publish('orders', 'order.created', jsonb_build_object('n', 21)))");
wait_within(30, 'and the relay still publishes on it',
	sub { (queue_count($guest_url, 'dispatch') // -1) == 21 });

$node->stop;
my $log = slurp_file($node->logfile);
unlike($log, qr/\Q$password\E/, 'no password in the server log');
$mq->stop;
done_testing();
