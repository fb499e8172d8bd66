# Durable before visible: an outbox row committed with
# synchronous_commit = off is visible at once, before its commit record is
# written out, and a crash then loses it.  If the relay published it, the
# broker holds a message its sender never sent (a phantom).  Here the WAL
# writer is made lazy, orders are enqueued one asynchronous commit each,
# and the server is stopped in immediate mode as soon as the first message
# is on the broker; after recovery every message on the broker must have
# its outbox row.  A control shows that the setup does lose an unwritten
# commit: a plain insert committed asynchronously just before such a stop
# is gone after it.
use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $ROUNDS = $ENV{MQTX_PHANTOM_ROUNDS} // 3;

my $mq = MqtxTest::RabbitMQ->new(name => 'asynccommit');
$mq->start;
my $url = $mq->url;

# Nothing else may write the WAL out: the WAL writer writes completed
# pages only and flushes every 10 s at most (an immediate stop loses what
# is still in wal_buffers), no autovacuum commits, no consumer, no
# checkpoint in between.
my $node = mqtx_node('asynccommit',
	'mqtx.broker_url' => "'$url'",
	'mqtx.consumer_enabled' => 'off',
	wal_writer_delay => "'10s'",
	wal_writer_flush_after => "'1GB'",
	autovacuum => 'off',
	checkpoint_timeout => "'1h'",
	max_wal_size => "'1GB'");

sub sql { return $node->safe_psql('postgres', $_[0]) }

sql(q{
	CREATE EXTENSION mqtx;
	SELECT mqtx.declare_queue('phantom.q');
	CREATE TABLE orders (order_id int PRIMARY KEY);
	CREATE TABLE control (n int);
	-- one transaction per order, each committed asynchronously
	CREATE PROCEDURE add_orders(first int, last int) LANGUAGE plpgsql AS $$
	BEGIN
		PERFORM pg_catalog.set_config('synchronous_commit', 'off', false);
		FOR i IN first .. last LOOP
			INSERT INTO orders VALUES (i);
			PERFORM mqtx.publish('', 'phantom.q', jsonb_build_object('order_id', i));
			COMMIT;
			PERFORM pg_sleep(0.002);
		END LOOP;
	END $$;
});
wait_queue_exists($url, 'phantom.q');


my $total_phantoms = 0;
for my $round (1 .. $ROUNDS)
{
	my ($first, $last) = ($round * 1000 + 1, $round * 1000 + 200);
	query_within($node, 60, 'SELECT broker_connected FROM mqtx.relay_stats', 't',
		"round $round: the relay is connected");
	is(queue_count($url, 'phantom.q'), 0, "round $round: the queue starts empty");

	my ($in, $out, $err) = ('', '', '');
	my $enqueue = IPC::Run::start(
		[ 'psql', '-X', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'),
		  '-c', "CALL add_orders($first, $last)" ],
		\$in, \$out, \$err);
	# as soon as the first message is on the broker: crash
	my $deadline = time + 30;
	my $count = 0;
	while (time < $deadline)
	{
		$count = queue_count($url, 'phantom.q') // 0;
		last if $count > 0;
		usleep(2_000);
	}
	$node->stop('immediate');
	cmp_ok($count, '>', 0, "round $round: a message reached the broker before the crash");
	$enqueue->finish;    # the connection was cut; its error is expected

	$node->start;
	query_within($node, 60,
		"SELECT count(*) FROM mqtx.outbox WHERE status = 'pending'", '0',
		"round $round: after recovery the relay publishes what survived");
	my $messages = amqp_messages($url, 'phantom.q');
	my %outbox = map { $_ => 1 } split /\n/, sql('SELECT message_id FROM mqtx.outbox');
	my %orders = map { $_ => 1 } split /\n/,
	  sql("SELECT order_id FROM orders WHERE order_id BETWEEN $first AND $last");
	my @phantoms = grep {
		!$outbox{ $_->{message_id} // '' }
		  || !$orders{ message_body($_)->{order_id} // '' }
	} @$messages;
	my %distinct = map { $_->{message_id} // '' => 1 } @$messages;
	note(sprintf('round %d: %d orders survived recovery; %d messages (%d distinct) on the broker; %d phantoms',
			$round, scalar keys %orders, scalar @$messages, scalar keys %distinct,
			scalar @phantoms));
	is(scalar @phantoms, 0,
		"round $round: every message on the broker has its outbox row and order after recovery")
	  or diag('phantom order ids: '
		  . join(' ', sort { $a <=> $b } map { message_body($_)->{order_id} } @phantoms));
	$total_phantoms += @phantoms;
}
note("$total_phantoms phantom messages in $ROUNDS rounds");

# The control: with the same settings and a quiet server, an asynchronous
# commit made just before an immediate stop does not survive it.
query_within($node, 60, 'SELECT broker_connected FROM mqtx.relay_stats', 't',
	'control: the relay is connected (and idle)');
sql(q{
	SET synchronous_commit = off;
	INSERT INTO control VALUES (1);
});
$node->stop('immediate');
$node->start;
is(sql('SELECT count(*) FROM control'), '0',
	'control: an asynchronous commit just before the crash is lost in this setup');

$node->stop;
$mq->stop;
done_testing();
