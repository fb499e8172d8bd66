# mqtx.broker_url with several URLs (the nodes of a cluster, here two
# independent nodes and a port nothing listens on): the workers connect to
# the first URL that answers, move to another when their node dies without
# restarting or saying the broker is gone, say so once when every URL
# fails, and every password in the list stays masked.
use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $mq_a = MqtxTest::RabbitMQ->new(name => 'addresses_a');
$mq_a->start;
my $mq_b = MqtxTest::RabbitMQ->new(name => 'addresses_b');
$mq_b->start;

my $dead_port = PostgreSQL::Test::Cluster::get_free_port();
my $dead_url = "amqp://guest:guest\@127.0.0.1:$dead_port/%2f";
my ($port_a, $port_b) = ($mq_a->port, $mq_b->port);
my $urls = join(', ', $dead_url, $mq_a->url, $mq_b->url);

my $node = mqtx_node('addresses', 'mqtx.broker_url' => "'$urls'");
$node->safe_psql('postgres', q{
	CREATE EXTENSION mqtx;
	SELECT mqtx.declare_exchange('orders', 'direct');
	SELECT mqtx.declare_queue('dispatch');
	SELECT mqtx.bind('dispatch', 'orders', 'order.created');
});

sub publish_orders
{
	my ($first, $last) = @_;
	$node->safe_psql('postgres',
		"SELECT mqtx.publish('orders', 'order.created', jsonb_build_object('order_id', i)) "
		  . "FROM generate_series($first, $last) i");
	return;
}

sub wait_published
{
	my ($n, $what) = @_;
	return wait_for($node, 'postgres',
		"SELECT count(*) FILTER (WHERE status = 'published') || '/' || count(*) FROM mqtx.outbox",
		"$n/$n", $what);
}

# --- every password of the list is masked
my $shown = $node->safe_psql('postgres', 'SHOW mqtx.broker_url');
is(() = $shown =~ /:\*{8}\@/g, 3, 'SHOW masks the password of each of the three URLs');
unlike($shown, qr/guest\@/, 'and shows none of them');
like($shown, qr/127\.0\.0\.1:$port_a\/.*127\.0\.0\.1:$port_b\//,
	'the hosts and ports stay readable');

# --- the first URL that answers
wait_until('the relay connects to node A, the first URL that answers',
	sub { $node->log_contains(qr/mqtx relay: connected to broker amqp:\/\/127\.0\.0\.1:$port_a\n/) });
publish_orders(1, 100);
wait_published(100, 'the first 100 orders are published');
is($mq_a->queue_depth('dispatch'), 100, 'node A holds them');
is($mq_b->queue_depth('dispatch'), undef, 'node B was never used: it has no queue');
my $workers_nodes =
  "SELECT string_agg(worker || ' ' || broker, ', ' ORDER BY worker) FROM mqtx.broker_connections";
wait_for($node, 'postgres', $workers_nodes,
	"consumer amqp://127.0.0.1:$port_a, relay amqp://127.0.0.1:$port_a",
	'mqtx.broker_connections shows both workers on node A');

# --- node A dies: the relay moves to B, without a restart and without
# --- saying the broker is unavailable
my $relay_pid = worker_pid($node, 'relay');
my $log_offset = -s $node->logfile;
$mq_a->kill;
publish_orders(101, 200);
wait_published(200, 'the next 100 orders are published after node A died');
is($mq_b->queue_depth('dispatch'), 100, 'node B holds exactly those 100');
is(worker_pid($node, 'relay'), $relay_pid, 'the same relay process throughout');
my $log = slurp_file($node->logfile, $log_offset);
like($log, qr/LOG:  mqtx relay: lost broker amqp:\/\/127\.0\.0\.1:$port_a; connecting to another URL of mqtx\.broker_url/,
	'losing node A is logged once, as a LOG line');
like($log, qr/mqtx relay: connected to broker amqp:\/\/127\.0\.0\.1:$port_b\n/,
	'and so is the connection to node B');
unlike($log, qr/mqtx relay: broker .* is unavailable/,
	'no "unavailable" warning while another node answers');
wait_until('the consumer moves to node B too',
	sub { slurp_file($node->logfile, $log_offset) =~ /mqtx consumer: connected to broker amqp:\/\/127\.0\.0\.1:$port_b\n/ });
wait_for($node, 'postgres', $workers_nodes,
	"consumer amqp://127.0.0.1:$port_b, relay amqp://127.0.0.1:$port_b",
	'mqtx.broker_connections shows both on node B');
ok( $node->safe_psql('postgres',
		"SELECT connected_since > now() - interval '1 minute' FROM mqtx.broker_connections WHERE worker = 'relay'"
	) eq 't',
	'with the time of the new connection');

# --- every URL fails: one warning naming them all, then back on a node
# --- that returns
$log_offset = -s $node->logfile;
$mq_b->kill;
wait_until('with every URL down, the relay says so',
	sub {
		slurp_file($node->logfile, $log_offset) =~
		  /WARNING:  mqtx relay: broker amqp:\/\/127\.0\.0\.1:$dead_port, amqp:\/\/127\.0\.0\.1:$port_a, amqp:\/\/127\.0\.0\.1:$port_b is unavailable; messages stay pending/;
	});
publish_orders(201, 210);
$mq_a->start;
wait_published(210, 'once node A is back, the orders enqueued meanwhile are published');
$log = slurp_file($node->logfile, $log_offset);
is(() = $log =~ /mqtx relay: broker .* is unavailable/g, 1,
	'the outage is one warning, however many reconnects it took');
like($log, qr/mqtx relay: connected to broker amqp:\/\/127\.0\.0\.1:$port_a\n/,
	'the relay is back on node A');
is(worker_pid($node, 'relay'), $relay_pid, 'still the same relay process');
unlike($log, qr/guest\@/, 'no password in the log');

# --- a list with one bad URL is refused, saying which
my ($rc, $out, $err) = $node->psql('postgres',
	"ALTER SYSTEM SET mqtx.broker_url = '$dead_url, amqp://guest:guest\@127.0.0.1:$port_b/'");
isnt($rc, 0, 'a list with an empty vhost in it is refused');
like($err, qr/DETAIL:  URL 2 of 2: The URL names an empty vhost/, 'the error says which URL and why');
unlike($err, qr/guest\@/, 'without repeating a password');

$node->stop;
$mq_a->stop;
$mq_b->stop;
done_testing();
