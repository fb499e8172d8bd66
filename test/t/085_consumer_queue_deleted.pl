# A consumed queue deleted on the broker: RabbitMQ cancels its consumer
# (basic.cancel, which mqtx asks for as consumer_cancel_notify).  Only that
# queue's channel goes: the other queue keeps being applied on the same
# connection, and the deleted queue is declared again from mqtx.queues and
# consumed again, by the same process.
use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $mq = MqtxTest::RabbitMQ->new(name => 'qdeleted');
$mq->start;
my $url = $mq->url;

my $node = mqtx_node('qdeleted',
	'mqtx.broker_url' => "'$url'",
	'mqtx.relay_enabled' => 'off');

sub sql { return $node->safe_psql('postgres', $_[0]) }

sql(q{
	CREATE EXTENSION mqtx;
	CREATE TABLE applied (queue text, n int, PRIMARY KEY (queue, n));
	CREATE FUNCTION apply_a(payload jsonb, headers jsonb) RETURNS void
		LANGUAGE sql AS $$INSERT INTO applied VALUES ('a', (payload->>'n')::int)$$;
	CREATE FUNCTION apply_b(payload jsonb, headers jsonb) RETURNS void
		LANGUAGE sql AS $$INSERT INTO applied VALUES ('b', (payload->>'n')::int)$$;
	SELECT mqtx.declare_queue('a.q');
	SELECT mqtx.declare_queue('b.q');
	SELECT mqtx.subscribe('a.q', 'apply_a(jsonb,jsonb)');
	SELECT mqtx.subscribe('b.q', 'apply_b(jsonb,jsonb)');
});
wait_until('the consumer consumes both queues',
	sub { ($mq->consumer_count('a.q') // 0) == 1 && ($mq->consumer_count('b.q') // 0) == 1 });
my $consumer = worker_pid($node, 'consumer');
like($consumer, qr/^\d+$/, "the consumer runs (pid $consumer)");

amqp_publish($url, 'a.q', id => 'a-1', body => '{"n": 1}');
amqp_publish($url, 'b.q', id => 'b-1', body => '{"n": 1}');
wait_for($node, 'postgres', 'SELECT count(*) FROM applied', '2', 'both queues are applied');

my $log_offset = -s $node->logfile;
$mq->ctl('delete_queue', 'a.q');
ok($node->wait_for_log(qr/the broker refused subscription "a\.q"/, $log_offset),
	'the consumer learns that a.q went, and says so');

# the other queue flows on the same connection meanwhile
amqp_publish($url, 'b.q', id => 'b-2', body => '{"n": 2}');
wait_for($node, 'postgres', q{SELECT count(*) FROM applied WHERE queue = 'b'}, '2',
	'b.q is applied while a.q is gone');

# a.q is declared again from mqtx.queues and consumed again
wait_until('a.q is declared again and consumed',
	sub { ($mq->consumer_count('a.q') // 0) == 1 });
amqp_publish($url, 'a.q', id => 'a-2', body => '{"n": 2}');
wait_for($node, 'postgres', q{SELECT count(*) FROM applied WHERE queue = 'a'}, '2',
	'a.q is applied again');
wait_for($node, 'postgres', 'SELECT count(*) FROM mqtx.broker_errors', '0',
	'nothing is listed as refused any more');

is(worker_pid($node, 'consumer'), $consumer,
	'the same consumer process throughout');
is(sql(q{SELECT reconnects FROM mqtx.consumer_stats}), '0',
	'on the same connection: no reconnect');
is(sql(q{SELECT count(*) FROM mqtx.dead_letter}), '0', 'nothing is dead-lettered');

$node->stop;
$mq->stop;
done_testing();
