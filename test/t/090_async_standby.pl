# Asynchronous replication with mqtx.wait_for_standby: the relay publishes a
# message only once a standby has flushed its commit.  With no standby, the
# messages wait (one WARNING) and go out when one connects.  The standby
# then lags behind a slow link; the primary dies mid-stream and the standby
# is promoted: the orders it never received are lost, with their messages,
# and no message was published for an order it lacks (no phantom).  The
# application carries on there; every order it has is dispatched once.
use strict;
use warnings FATAL => 'all';

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use MqtxTest::DelayProxy;
use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $mq = MqtxTest::RabbitMQ->new(name => 'async');
$mq->start;
my $url = $mq->url;

# --- the dispatch service
my $dispatch = mqtx_node('async_dispatch', 'mqtx.broker_url' => "'$url'",
	'mqtx.relay_enabled' => 'off');
$dispatch->safe_psql('postgres', q{
	CREATE EXTENSION mqtx;
	SELECT mqtx.declare_queue('orders.q');
	CREATE TABLE effects (order_id int NOT NULL);	-- no unique constraint
	CREATE FUNCTION dispatch_order(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE sql AS $$ INSERT INTO effects VALUES ((payload->>'order_id')::int) $$;
	SELECT mqtx.subscribe('orders.q', 'dispatch_order(jsonb,jsonb)');
});

# --- the order service, publishing only what a standby has
my $primary = mqtx_node('async_primary',
	'-init' => { allows_streaming => 1 },
	'mqtx.broker_url' => "'$url'",
	'mqtx.consumer_enabled' => 'off',
	'mqtx.wait_for_standby' => 'on');
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

# No standby yet: the first order waits, and the relay says why, once.
$primary->safe_psql('postgres', 'CALL add_orders(1, 1)');
ok( $primary->wait_for_log(
		qr/mqtx relay: no standby has the commits of the pending messages; they stay pending/),
	'without a standby the relay holds the message, and says so');
sleep 1;
is($primary->safe_psql('postgres', "SELECT status FROM mqtx.outbox"), 'pending',
	'the message is still pending');

# --- an asynchronous standby behind a link that delays WAL by 300 ms
my $proxy = MqtxTest::DelayProxy->new(target_port => $primary->port, down_delay_ms => 300);
my $standby = PostgreSQL::Test::Cluster->new('async_standby');
$standby->init_from_backup($primary, 'base', has_streaming => 1);
$standby->append_conf('postgresql.conf',
	"primary_conninfo = 'host=127.0.0.1 port=" . $proxy->port
	  . " user=" . ($ENV{USER} // 'postgres') . " application_name=async_standby'\n");
$standby->start;
wait_for($primary, 'postgres',
	"SELECT sync_state FROM pg_stat_replication WHERE application_name = 'async_standby'",
	'async', 'the standby streams asynchronously');
wait_for($primary, 'postgres', "SELECT status FROM mqtx.outbox", 'published',
	'once the standby has its commit, the message is published');
like(slurp_file($primary->logfile),
	qr/mqtx relay: a standby has the pending messages' commits; publishing again/,
	'which is logged');
my @waits = slurp_file($primary->logfile) =~ /no standby has the commits/g;
is(scalar @waits, 1, 'the wait was one WARNING');

# --- orders stream in; the standby lags; the primary dies
my ($out, $err) = ('', '');
my $stream = IPC::Run::start(
	[ 'psql', '-X', '-d', $primary->connstr('postgres'), '-c', 'CALL add_orders(2, 100000)' ],
	'>', \$out, '2>', \$err);
wait_for($primary, 'postgres', "SELECT published >= 300 FROM mqtx.relay_stats", 't',
	'the relay publishes while orders stream in');
# the link goes down with the primary: what it still carried never arrives
$proxy->stop;
$primary->stop('immediate');
$stream->finish;

# what the old primary had committed (its relay stays off)
$primary->append_conf('postgresql.conf', "mqtx.relay_enabled = off\n");
$primary->start;
my $committed = $primary->safe_psql('postgres', 'SELECT count(*) FROM orders');
$primary->stop;

$standby->promote;
$standby->poll_query_until('postgres', 'SELECT NOT pg_is_in_recovery()');
my $kept = $standby->safe_psql('postgres', 'SELECT count(*) FROM orders');
my $lost = $committed - $kept;
diag("$committed orders committed on the primary, $kept on the promoted standby");
ok($lost > 0, "asynchronous replication lost the last $lost orders");

# no message of a lost order went out: nothing the dispatch service applies
# is missing on the promoted server
$standby->safe_psql('postgres', "ALTER SYSTEM SET mqtx.wait_for_standby = off");
$standby->reload;
$standby->safe_psql('postgres', "CALL add_orders($committed + 1, $committed + 100)");
wait_for($standby, 'postgres',
	"SELECT count(*) FROM mqtx.outbox WHERE status <> 'published'", '0',
	'the promoted server publishes its outbox');
my $expected = $kept + 100;
wait_for($dispatch, 'postgres', 'SELECT count(DISTINCT order_id) FROM effects', $expected,
	'every order the promoted server has is dispatched');
my %have = map { $_ => 1 } split /\n/, $standby->safe_psql('postgres', 'SELECT id FROM orders');
my @phantoms = grep { !$have{$_} }
  split /\n/, $dispatch->safe_psql('postgres', 'SELECT DISTINCT order_id FROM effects');
is(scalar @phantoms, 0, 'no effect of an order the promoted server lacks (no phantom)')
  or diag("phantoms: @phantoms[0 .. ($#phantoms < 9 ? $#phantoms : 9)]");
is($dispatch->safe_psql('postgres', 'SELECT count(*) - count(DISTINCT order_id) FROM effects'),
	'0', 'none twice');

$standby->stop;
$dispatch->stop;
$mq->stop;
done_testing();
