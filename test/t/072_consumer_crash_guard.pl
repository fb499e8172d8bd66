# A message that kills the consumer process (here: SIGKILL while its
# handler runs, as a crash or the OOM killer would) is found and
# quarantined: after two deaths while it was applied alone it is
# dead-lettered without being applied, and the other messages of the
# queue are applied.  A clean shutdown while a handler runs counts no
# death.
use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $mq = MqtxTest::RabbitMQ->new(name => 'crashguard');
$mq->start;
my $url = $mq->url;

my $node = mqtx_node('crashguard', 'mqtx.broker_url' => "'$url'");

sub consumer_pid { return worker_pid($node, 'consumer') }

# The consumer, sleeping in the handler of the message "killer".
sub consumer_in_handler
{
	return worker_pid($node, 'consumer', where => "wait_event = 'PgSleep'");
}

sub publish
{
	my ($id, $body) = @_;
	amqp_tool('publish', '--url', $url, '--routing-key', 'crash.q',
		'--persistent', '--message-id', $id, '--body', $body);
}

$node->safe_psql('postgres', q{
	CREATE EXTENSION mqtx;
	CREATE TABLE applied (id text NOT NULL);
	CREATE FUNCTION apply(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		IF payload->>'kind' = 'killer' THEN
			PERFORM pg_sleep(300);
		END IF;
		INSERT INTO applied VALUES (payload->>'id');
	END $$;
	SELECT mqtx.subscribe('crash.q', 'apply(jsonb,jsonb)', prefetch => 10,
		max_attempts => 100, handler_timeout => '10 min');
});
wait_queue_exists($url, 'crash.q');

publish('good-1', '{"id": "good-1"}');
wait_for($node, 'postgres', 'SELECT count(*) FROM applied', '1',
	'a good message is applied');

# --- a clean shutdown while the handler runs is not a death
publish('killer', '{"id": "killer", "kind": "killer"}');
wait_until('the consumer is in the killer\'s handler', sub { consumer_in_handler() ne '' });
$node->restart(mode => 'fast');
wait_until('the consumer is back after a fast restart', sub { consumer_pid() ne '' });
ok(!$node->log_contains(qr/a consumer died while applying/),
	'a fast shutdown while a handler runs counts no death');

# --- two deaths while applying it alone
for my $death (1 .. 2)
{
	wait_until("the consumer is in the killer's handler (death $death)",
		sub { consumer_in_handler() ne '' });
	my $pid = consumer_in_handler();
	kill 'KILL', $pid;
	wait_until("the server restarted after killing the consumer (PID $pid)",
		sub { $node->log_contains(qr/\(PID $pid\) was terminated by signal 9/) });
	wait_until('a new consumer runs', sub {
			my $now = eval { consumer_pid() } // '';
			$now ne '' && $now ne $pid });
	wait_until("the new consumer knows: died $death time(s)", sub {
			$node->log_contains(
				qr/a consumer died while applying message killer from queue "crash\.q" alone \($death time/)
	});
}

# the third consumer quarantines it
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.dead_letter WHERE message_id = 'killer'",
	'1', 'the message that killed the consumer twice is dead-lettered');
like( $node->safe_psql('postgres',
		"SELECT error_message FROM mqtx.dead_letter WHERE message_id = 'killer'"),
	qr/^quarantined: the consumer process died 2 times while applying this message alone/,
	'with the reason');
is($node->safe_psql('postgres', "SELECT count(*) FROM applied WHERE id = 'killer'"),
	'0', 'it was not applied');
my $survivor = consumer_pid();

# the queue flows again, on the same consumer
publish("good-$_", qq({"id": "good-$_"})) for 2 .. 20;
wait_for($node, 'postgres', 'SELECT count(*), count(DISTINCT id) FROM applied',
	'20|20', 'the other messages are applied, each once');
wait_queue_drained($mq, 'crash.q');
is(consumer_pid(), $survivor, 'by the same consumer process');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM mqtx.inbox WHERE queue = 'crash.q'"),
	'21', 'the inbox holds the 20 applied and the quarantined one');

# a copy of it that arrives later is a duplicate, not a new death
my $duplicates = $node->safe_psql('postgres',
	'SELECT duplicates FROM mqtx.consumer_stats');
publish('killer', '{"id": "killer", "kind": "killer"}');
wait_for($node, 'postgres', 'SELECT duplicates FROM mqtx.consumer_stats',
	$duplicates + 1, 'a later copy of the quarantined message is a duplicate');
is(consumer_pid(), $survivor, 'and the consumer lives on');

$node->stop;
$mq->stop;
done_testing();
