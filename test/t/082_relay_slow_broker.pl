# The relay behind a slow link (test/tools/delay_proxy.py delays every
# byte from the broker), with mqtx.confirm_timeout at its minimum of 100 ms.
#
# A steady 300 ms: the relay learns the broker's pace (its RPCs, then its
# confirms) and does not send everything twice; every row ends published,
# none failed.  Then the link turns slow at once (20 ms, then 1500 ms):
# confirms come later than three times the recent latency, so they are
# late, the messages' fate is unknown, and they are sent again, without a
# failed attempt; the late confirms still count.  The relay does not
# restart.  While it waits on the broker, pg_stat_activity shows it
# waiting (wait_event_type 'Extension').
use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use MqtxTest::DelayProxy;
use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $mq = MqtxTest::RabbitMQ->new(name => 'slowlink');
$mq->start;
my $url = $mq->url;
my $proxy = MqtxTest::DelayProxy->new(target_port => $mq->port, down_delay_ms => 300);
my $slow_url = $mq->url(port => $proxy->port);

my $node = mqtx_node('slowlink',
	'mqtx.broker_url' => "'$slow_url'",
	'mqtx.confirm_timeout' => "'100ms'",
	# each broker RPC takes 300 ms; the default bound is fine, this one
	# (the harness's 2 s) leaves room for a busy machine
	'mqtx.connect_timeout' => "'5s'",
	'mqtx.consumer_enabled' => 'off');

sub sql { return $node->safe_psql('postgres', $_[0]) }

# the default, which a failed attempt per timeout would exhaust quickly
is(sql('SHOW mqtx.max_attempts'), '10', 'mqtx.max_attempts is its default, 10');
is(sql('SHOW mqtx.confirm_timeout'), '100ms', 'mqtx.confirm_timeout is 100ms');

sql(q{
	CREATE EXTENSION mqtx;
	SELECT mqtx.declare_exchange('slow', 'direct');
	SELECT mqtx.declare_queue('slow.q');
	SELECT mqtx.bind('slow.q', 'slow', 'k');
});
query_within($node, 60, 'SELECT broker_connected FROM mqtx.relay_stats', 't',
	'the relay connects through the delay proxy');
wait_queue_exists($url, 'slow.q');
my $relay = worker_pid($node, 'relay');
like($relay, qr/^\d+$/, "the relay runs (pid $relay)");

# the link is slow: a round trip through the proxy takes the delay
{
	my $t0 = time;
	amqp_tool('count', '--url', $slow_url, '--queue', 'slow.q');
	note('a passive declare through the proxy took about ' . (time - $t0) . ' s');
}

my $N = 2000;
sql("SELECT count(mqtx.publish('slow', 'k', jsonb_build_object('n', g))) "
	  . "FROM generate_series(1, " . ($N / 2) . ") g");
sql("SELECT count(mqtx.publish('slow', 'k', jsonb_build_object('n', g))) "
	  . "FROM generate_series(" . ($N / 2 + 1) . ", $N) g");

# 3 s of the relay's activity while it drains behind the slow link
my $samples = sample_activity($node, $relay, 30, 100);
my $extension = grep { $_->{wait_event_type} eq 'Extension' } @$samples;
my %kinds;
$kinds{ join('/', $_->{state}, $_->{wait_event_type} || '-', $_->{wait_event} || '-') }++
  for @$samples;
note('relay activity behind the slow link: '
	  . join(', ', map { "$_ x$kinds{$_}" } sort keys %kinds));
ok($extension > 0,
	"the relay waits on the broker as wait_event_type Extension ($extension of 30 samples)");

# Wait for every row to be settled one way or the other; a row that
# failed is already the answer.
query_within($node, 120, q{
	SELECT count(*) FILTER (WHERE status = 'pending') = 0
	    OR count(*) FILTER (WHERE status = 'failed') > 0
	FROM mqtx.outbox}, 't', 'the relay settles the backlog');
is( sql('SELECT status, count(*), max(attempts) FROM mqtx.outbox GROUP BY 1 ORDER BY 1'),
	"published|$N|0",
	"all $N rows are published, with no failed attempt");
note('the last errors recorded: '
	  . sql('SELECT last_error, count(*) FROM mqtx.outbox WHERE last_error IS NOT NULL GROUP BY 1'));
is(worker_pid($node, 'relay'), $relay, 'the same relay process throughout');
note('relay_stats: ' . sql('SELECT * FROM mqtx.relay_stats'));

my $messages = amqp_messages($url, 'slow.q');
my %in_queue = map { $_->{message_id} => 1 } @$messages;
note(sprintf('%d messages on the queue, %d distinct', scalar @$messages,
		scalar keys %in_queue));
my @missing = grep { !$in_queue{$_} } split /\n/, sql('SELECT message_id FROM mqtx.outbox');
is(scalar @missing, 0, 'the queue holds every message_id at least once');
my $proxy_errors = $proxy->errors;
is($proxy_errors, '', 'the proxy reached the broker every time');

cmp_ok(scalar @{ amqp_messages($url, 'slow.q') } + 0, '<', 1.5 * $N,
	'at a steady pace, the relay does not send everything twice');

# The link turns slower than the pace the relay has learnt.
$mq->purge_queue('slow.q');
$proxy->set_delay(down => 20);
sql("SELECT count(mqtx.publish('slow', 'k', jsonb_build_object('n', g))) FROM generate_series(1, 200) g");
query_within($node, 60, q{SELECT count(*) FROM mqtx.outbox WHERE status = 'pending'}, '0',
	'at 20 ms the relay publishes a first batch');
my $log_offset = -s $node->logfile;
$proxy->set_delay(down => 1500);
my $M = 1000;
sql("SELECT count(mqtx.publish('slow', 'k', jsonb_build_object('late', g))) "
	  . "FROM generate_series(1, $M) g");
ok($node->wait_for_log(qr/did not confirm messages within \d+ ms; sending them again/,
		$log_offset),
	'the confirms turn late, and the relay sends the messages again');
query_within($node, 120,
	q{SELECT count(*) FILTER (WHERE status <> 'published') FROM mqtx.outbox WHERE payload ? 'late'},
	'0', 'every row whose confirm was late ends published');
is(sql(q{SELECT count(*) FILTER (WHERE attempts > 0 OR last_error IS NOT NULL) FROM mqtx.outbox}),
	'0', 'a late confirm is no failed attempt');
is(worker_pid($node, 'relay'), $relay, 'the same relay process after the late confirms');

$node->stop;
$proxy->stop;
$mq->stop;
done_testing();
