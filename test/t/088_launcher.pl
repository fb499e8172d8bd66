# The launcher: the databases of mqtx.database are served within seconds of
# a reload; one that does not exist or has no extension costs no worker; one
# that cannot get a worker slot is reported loudly (a WARNING, and
# mqtx.served_databases); one removed from the setting, or dropped, lets its
# workers go; and a launcher that restarts takes over the running workers
# without starting them twice.
use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $mq = MqtxTest::RabbitMQ->new(name => 'launcher');
$mq->start;

# Six worker slots: PostgreSQL's logical replication launcher, mqtx's
# launcher, and two workers for each of two databases.  A third database
# finds none.
my $node = mqtx_node('launcher',
	'mqtx.broker_url' => "'" . $mq->url . "'",
	'mqtx.database' => "'postgres, app1'",
	max_worker_processes => 6);

sub state_of
{
	my ($db) = @_;
	return sql_result($node,
		"SELECT state || coalesce(': ' || detail, '') FROM mqtx.served_databases WHERE database = '$db'");
}

sub launcher_pid
{
	return $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'mqtx launcher'");
}

sub log_count
{
	my ($re) = @_;
	my $log = slurp_file($node->logfile);
	my @hits = $log =~ /$re/g;
	return scalar @hits;
}

sub setup_topology
{
	my ($db, $queue) = @_;
	$node->safe_psql($db, qq{
		CREATE EXTENSION mqtx;
		SELECT mqtx.declare_exchange('orders', 'direct');
		SELECT mqtx.declare_queue('$queue');
		SELECT mqtx.bind('$queue', 'orders', '$queue');
	});
	return;
}

my $launcher = launcher_pid();
like($launcher, qr/^\d+$/, 'one launcher runs');

# Nothing to serve yet: postgres has no extension, app1 does not exist.
# Neither costs a worker, and each is said once.
wait_within(10, 'a database without the extension costs no worker',
	sub { log_count(qr/database "postgres" has no extension mqtx/) == 1 });
is(worker_count($node), 0, 'no relay or consumer runs');
like(log_count(qr/database "app1" of mqtx\.database does not exist/), qr/^1$/,
	'a listed database that does not exist is logged once');

# The extension arrives: the workers start within a second or so, woken
# by the commit, not by a poll.
my $t0 = time();
setup_topology('postgres', 'q_postgres');
wait_within(5, 'CREATE EXTENSION gets the database its workers',
	sub { worker_count($node, db => 'postgres') == 2 });
my $served_after = time() - $t0;
diag(sprintf('workers running %.2f s after CREATE EXTENSION', $served_after));
wait_within(5, 'mqtx.served_databases says so once they have found it',
	sub { state_of('postgres') eq 'serving' });
my $relay = worker_pid($node, 'relay', db => 'postgres');

# The listed database is created, then given the extension: served, and
# its relay publishes.
$node->safe_psql('postgres', 'CREATE DATABASE app1');
wait_within(5, 'a created database is looked at again',
	sub { state_of('app1') eq 'no extension' });
is(worker_count($node, db => 'app1'), 0, 'and costs no worker without the extension');
setup_topology('app1', 'q_app1');
wait_within(5, 'app1 is served once it has the extension',
	sub { worker_count($node, db => 'app1') == 2 });
$node->safe_psql('app1',
	"SELECT mqtx.publish('orders', 'q_app1', '{\"from\": \"app1\"}')");
wait_within(10, "app1's relay publishes", sub { $mq->queue_depth('q_app1') == 1 });

# A third database, added on reload, finds no worker slot: a WARNING, the
# view says which worker lacks one, and the retries do not repeat it.
$node->safe_psql('postgres', 'CREATE DATABASE app2');
setup_topology('app2', 'q_app2');
$node->safe_psql('postgres', "ALTER SYSTEM SET mqtx.database = 'postgres, app1, app2'");
$node->reload;
wait_within(10, 'a database without a worker slot is shown',
	sub { state_of('app2') eq 'no worker slot: no background worker slot for the relay' });
wait_within(5, 'and logged as a WARNING',
	sub { log_count(qr/WARNING:  mqtx launcher: database "app2" is not served: no background worker slot for the relay/) == 1 });
like(slurp_file($node->logfile), qr/All 6 background worker slots \(max_worker_processes\) are taken/,
	'the WARNING says why');
sleep 6;    # the launcher tries again every 5 s
is(log_count(qr/database "app2" is not served/), 1, 'the retries are not logged again');
is(worker_count($node, db => 'app2'), 0, 'app2 has no worker');

# app1 leaves the setting: its workers go, and app2 gets their slots.
$node->safe_psql('postgres', "ALTER SYSTEM SET mqtx.database = 'postgres, app2'");
$node->reload;
wait_within(10, "a database removed from mqtx.database loses its workers",
	sub { worker_count($node, db => 'app1') == 0 });
wait_within(10, 'and leaves mqtx.served_databases',
	sub { sql_result($node, "SELECT count(*) FROM mqtx.served_databases WHERE database = 'app1'") eq '0' });
like(log_count(qr/database "app1" is no longer in mqtx\.database/), qr/^1$/,
	'which is logged');
wait_within(10, 'the freed slots serve app2',
	sub { worker_count($node, db => 'app2') == 2 && state_of('app2') eq 'serving' });
is(sql_result($node, 'DROP DATABASE app1'), '',
	'a database no longer served drops without FORCE');

# Removed and listed again at once, before its workers have exited: the
# new workers wait for the old ones, so there are never two relays.
my $app2_relay = worker_pid($node, 'relay', db => 'app2');
$node->safe_psql('postgres', "ALTER SYSTEM SET mqtx.database = 'postgres'");
$node->reload;
$node->safe_psql('postgres', "ALTER SYSTEM SET mqtx.database = 'postgres, app2'");
$node->reload;
my $most = 0;
wait_within(15, 'a database listed again is served again', sub {
	my $n = worker_count($node, db => 'app2', kind => 'relay');
	$most = $n if $n > $most;
	my $pid = worker_pid($node, 'relay', db => 'app2');
	$pid ne '' && $pid ne $app2_relay && state_of('app2') eq 'serving';
});
is($most, 1, 'by one relay at a time');

# A served database dropped WITH (FORCE): no worker, and no error loop.
my $fatal_before = log_count(qr/FATAL:  database "app2" does not exist/);
$node->safe_psql('postgres', 'DROP DATABASE app2 WITH (FORCE)');
wait_within(15, 'a dropped database is shown as such',
	sub { state_of('app2') eq 'no database' });
is(worker_count($node, db => 'app2'), 0, 'and costs no worker');
sleep 6;
is(log_count(qr/FATAL:  database "app2" does not exist/), $fatal_before,
	'no worker fails on the dropped database');

is(launcher_pid(), $launcher, 'one launcher all along');
is(worker_pid($node, 'relay', db => 'postgres'), $relay,
	"the other databases' workers were never disturbed");

# The launcher is stopped and restarted by the postmaster: it takes the
# running workers over instead of starting them twice.
$node->safe_psql('postgres', "SELECT pg_terminate_backend($launcher)");
wait_within(15, 'the postmaster restarts the launcher',
	sub { my $p = launcher_pid(); $p =~ /^\d+$/ && $p ne $launcher });
sleep 2;
is(worker_count($node, db => 'postgres'), 2, 'no worker is started twice');
is(worker_pid($node, 'relay', db => 'postgres'), $relay, 'the relay kept running');
$node->safe_psql('postgres',
	"SELECT mqtx.publish('orders', 'q_postgres', '{\"after\": \"restart\"}')");
wait_within(10, 'and publishing', sub { $mq->queue_depth('q_postgres') == 1 });

$node->stop;
$mq->stop;
done_testing();
