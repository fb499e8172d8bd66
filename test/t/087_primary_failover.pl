# The order service on a primary with a synchronous streaming standby.  On
# the standby the workers wait for promotion (none runs while it is in
# recovery).  The primary is killed in immediate mode mid-stream, the
# standby is promoted, its relay starts and the application carries on
# there: every order committed on the promoted server is dispatched exactly
# once by the dispatch service (an effect table with no unique constraint),
# and none that it lacks (no phantom message).
use strict;
use warnings FATAL => 'all';

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $mq = MqtxTest::RabbitMQ->new(name => 'failover');
$mq->start;
my $url = $mq->url;

# --- the dispatch service, on a server of its own
my $dispatch = mqtx_node('failover_dispatch', 'mqtx.broker_url' => "'$url'");
$dispatch->safe_psql('postgres', q{
	CREATE EXTENSION mqtx;
	SELECT mqtx.declare_queue('orders.q');
	CREATE TABLE effects (order_id int NOT NULL);	-- no unique constraint
	CREATE FUNCTION dispatch_order(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE sql AS $$ INSERT INTO effects VALUES ((payload->>'order_id')::int) $$;
	SELECT mqtx.subscribe('orders.q', 'dispatch_order(jsonb,jsonb)');
});

# --- the order service: a primary and its synchronous standby
my $primary = mqtx_node('failover_primary',
	'-init' => { allows_streaming => 1 },
	'mqtx.broker_url' => "'$url'");
$primary->safe_psql('postgres', q{
	CREATE EXTENSION mqtx;
	SELECT mqtx.declare_queue('orders.q');
	CREATE TABLE orders (id int PRIMARY KEY);
	CREATE PROCEDURE add_orders(first int, last int) LANGUAGE plpgsql AS $$
	BEGIN
		FOR i IN first .. last LOOP
			INSERT INTO orders VALUES (i);
			PERFORM mqtx.publish('', 'orders.q', jsonb_build_object('order_id', i));
			COMMIT;
			PERFORM pg_sleep(0.002);
		END LOOP;
	END $$;
});
$primary->backup('base');
my $standby = PostgreSQL::Test::Cluster->new('failover_standby');
$standby->init_from_backup($primary, 'base', has_streaming => 1);
$standby->start;
$primary->safe_psql('postgres', "ALTER SYSTEM SET synchronous_standby_names = '*'");
$primary->reload;
wait_for($primary, 'postgres',
	"SELECT sync_state FROM pg_stat_replication", 'sync',
	'the standby replicates synchronously');

is(worker_count($standby), '0',
	'no mqtx worker runs on the standby while it is in recovery');

# The launcher runs there, says once that the workers wait, and shows it.
sub standby_lines
{
	my @lines = slurp_file($standby->logfile)
	  =~ /mqtx launcher: this server is a standby/g;
	return scalar @lines;
}
wait_within(10, 'the standby says once that the workers wait for promotion',
	sub { standby_lines() == 1 });
is($standby->safe_psql('postgres', 'SELECT database, state FROM mqtx.served_databases'),
	'postgres|standby', 'mqtx.served_databases shows it');

# --- orders stream in; the primary dies in the middle
my ($out, $err) = ('', '');
my $stream = IPC::Run::start(
	[ 'psql', '-X', '-d', $primary->connstr('postgres'), '-c', 'CALL add_orders(1, 100000)' ],
	'>', \$out, '2>', \$err);
wait_for($primary, 'postgres',
	"SELECT published >= 500 FROM mqtx.relay_stats", 't',
	'the relay publishes while orders stream in');
$primary->stop('immediate');
$stream->finish;
like($err, qr/terminat|connection|server closed/i, 'the order stream was cut by the crash');

# --- the standby takes over and the application carries on there
is(worker_count($standby), '0', 'still no mqtx worker before promotion');
$standby->promote;
wait_workers($standby, 2, 'after promotion the relay and the consumer start');
is(standby_lines(), 1, 'the wait was logged once, not in a loop');
like(slurp_file($standby->logfile), qr/mqtx launcher: the server was promoted; starting the workers/,
	'and its end');
my $before = $standby->safe_psql('postgres', 'SELECT max(id) FROM orders');
ok($before >= 500, "the promoted server has the $before orders committed before the crash");
$standby->safe_psql('postgres', "CALL add_orders($before + 1, $before + 200)");
my $orders = $standby->safe_psql('postgres', 'SELECT count(*) FROM orders');
is($orders, $before + 200, 'the application carries on on the promoted server');

wait_for($standby, 'postgres',
	"SELECT count(*) FILTER (WHERE status = 'published') = count(*) FROM mqtx.outbox", 't',
	'every outbox row of the promoted server is published');
wait_for($dispatch, 'postgres', 'SELECT count(DISTINCT order_id) FROM effects', $orders,
	'every committed order is dispatched');
is( $dispatch->safe_psql('postgres', 'SELECT count(*) - count(DISTINCT order_id) FROM effects'),
	'0', 'none twice, though the relay may have sent some again after the failover');
my %committed = map { $_ => 1 }
  split /\n/, $standby->safe_psql('postgres', 'SELECT id FROM orders');
my @phantoms = grep { !$committed{$_} }
  split /\n/, $dispatch->safe_psql('postgres', 'SELECT order_id FROM effects');
is(scalar @phantoms, 0, 'no effect of an order the promoted server does not have')
  or diag("phantoms: @phantoms[0 .. ($#phantoms < 9 ? $#phantoms : 9)]");
note('deliveries the dispatch inbox recognised as duplicates: '
	  . $dispatch->safe_psql('postgres', 'SELECT duplicates FROM mqtx.consumer_stats'));
is( $dispatch->safe_psql('postgres', 'SELECT count(*) FROM mqtx.dead_letter'),
	'0', 'nothing dead-lettered');

$standby->stop;
$dispatch->stop;
$mq->stop;
done_testing();
