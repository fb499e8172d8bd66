# DROP EXTENSION and CREATE EXTENSION, in one transaction, while messages
# are in flight: the new outbox's ids start again at 1, and the confirms of
# the old rows, which come late through a slow link, must never mark the
# new rows published.
# The new rows go to an exchange that does not exist, so a row of theirs
# that ends 'published' can only be the old rows' confirms misapplied.
use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use MqtxTest::DelayProxy;
use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $mq = MqtxTest::RabbitMQ->new(name => 'recreated');
$mq->start;
my $url = $mq->url;
# a fast link to connect; the confirms are delayed later
my $proxy = MqtxTest::DelayProxy->new(target_port => $mq->port, down_delay_ms => 0);

my $node = mqtx_node('recreated',
	'mqtx.broker_url' => "'" . $mq->url(port => $proxy->port) . "'",
	'mqtx.confirm_timeout' => "'30s'",
	'mqtx.connect_timeout' => "'10s'",
	'mqtx.consumer_enabled' => 'off');

sub sql { return $node->safe_psql('postgres', $_[0]) }

sub declare_topology
{
	sql(q{
		SELECT mqtx.declare_exchange('orders', 'direct');
		SELECT mqtx.declare_queue('recreated.q');
		SELECT mqtx.bind('recreated.q', 'orders', 'k');
	});
}

sql('CREATE EXTENSION mqtx');
declare_topology();
query_within($node, 60, 'SELECT broker_connected FROM mqtx.relay_stats', 't',
	'the relay connects through the slow link');
wait_queue_exists($url, 'recreated.q');
my $relay = worker_pid($node, 'relay');

# one message while the link is fast: the relay then knows the exchange,
# and later sends without asking the broker about it first
sql(q{SELECT mqtx.publish('orders', 'k', '{"warm": 1}')});
query_within($node, 60, q{SELECT count(*) FROM mqtx.outbox WHERE status = 'published'}, '1',
	'a first message is published over the fast link');
$mq->purge_queue('recreated.q');

# from now on every byte from the broker, confirms included, arrives 5 s late
$proxy->set_delay(down => 5000);
my $N = 200;
sql("SELECT count(mqtx.publish('orders', 'k', jsonb_build_object('old', g))) "
	  . "FROM generate_series(1, $N) g");
is(sql(q{SELECT min(id) || '..' || max(id) FROM mqtx.outbox WHERE payload ? 'old'}),
	'2..' . ($N + 1), 'the old rows have ids 2..' . ($N + 1));

# the messages reach the broker at once; their confirms are on the way back
wait_until("all $N old messages reached the broker",
	sub { ($mq->queue_depth('recreated.q') // 0) == $N });
is(sql(q{SELECT count(*) FROM mqtx.outbox WHERE status = 'pending'}), $N,
	'their confirms have not come back yet');

my $log_offset = -s $node->logfile;
# in one transaction: the relay never finds the extension missing, so it
# stays, with the old rows' confirms on their way (in two transactions it
# would find none in between and exit, its confirms with it: 088_launcher)
sql('BEGIN; DROP EXTENSION mqtx CASCADE; CREATE EXTENSION mqtx; COMMIT');
declare_topology();
sql("SELECT count(mqtx.publish('nowhere', 'k', jsonb_build_object('new', g))) "
	  . "FROM generate_series(1, $N + 1) g");
is(sql(q{SELECT min(id) || '..' || max(id) FROM mqtx.outbox}), '1..' . ($N + 1),
	'the new rows have the same ids, 1..' . ($N + 1));

# the relay notices, once the old confirms are in, that their rows are gone
ok( $node->wait_for_log(
		qr/mqtx relay: mqtx\.outbox was dropped while messages were in flight/,
		$log_offset),
	'the relay drops the old rows\' outcomes unrecorded');
query_within($node, 60,
	q{SELECT count(*) FILTER (WHERE last_error LIKE '%nowhere%') > 0 FROM mqtx.outbox},
	't', 'the relay goes on to the new rows');
is(sql(q{SELECT count(*) FROM mqtx.outbox WHERE status = 'published'}), '0',
	'no new row is marked published by an old confirm');
is(sql(q{SELECT count(*) FROM mqtx.outbox WHERE payload ? 'old'}), '0',
	'the new outbox holds only the new rows');
is(worker_pid($node, 'relay'), $relay, 'the same relay process throughout');
is($mq->queue_depth('recreated.q'), $N, 'the broker has each old message once');

$node->stop;
$proxy->stop;
$mq->stop;
done_testing();
