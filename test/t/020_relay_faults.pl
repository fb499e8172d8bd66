# The relay under faults: the broker stopped mid-stream and restarted, the
# relay killed with SIGKILL mid-batch, wrong credentials, the broker URL
# changed on SIGHUP.  Every message arrives; nothing is lost; the log
# neither floods nor shows the password.
use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use JSON::PP;

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $password = 'pw-e8d1-relay-secret';
my $mq = MqtxTest::RabbitMQ->new(name => 'faults');
$mq->start;
$mq->add_user('mqtx', $password);
my $url = $mq->url(user => 'mqtx', password => $password);

my $node = mqtx_node('faults',
	'mqtx.broker_url' => "'$url'",
	'mqtx.batch_size' => '50',
	'mqtx.max_attempts' => '1000');

$node->safe_psql('postgres', q{
	CREATE EXTENSION mqtx;
	SELECT mqtx.declare_exchange('orders', 'direct');
	SELECT mqtx.declare_queue('dispatch');
	SELECT mqtx.bind('dispatch', 'orders', 'order.created');
	CREATE TABLE orders (order_id bigint PRIMARY KEY, content text);
	CREATE TRIGGER orders_outbox AFTER INSERT ON orders
		FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('orders', 'order.created');
});
wait_for($node, 'postgres', 'SELECT bool_and(broker_connected) FROM mqtx.relay_stats',
	't', 'the relay connects');

# Every order's message must be in the queue at least once.
sub check_all_delivered
{
	my ($from, $to, $what) = @_;
	my %seen;
	$seen{ message_body($_)->{order_id} }++
	  for @{ amqp_messages($url, 'dispatch') };
	my @missing = grep { !$seen{$_} } $from .. $to;
	is(scalar @missing, 0, "$what: every order reached the queue")
	  or diag("missing: @missing[0 .. ($#missing < 9 ? $#missing : 9)]");
}

# --- broker stopped mid-stream, then restarted
$node->safe_psql('postgres', q{
	CREATE PROCEDURE add_orders(first int, last int) LANGUAGE plpgsql AS $$
	BEGIN
		FOR i IN first .. last LOOP
			INSERT INTO orders VALUES (i, 'order ' || i);
			COMMIT;
			PERFORM pg_sleep(0.005);
		END LOOP;
	END $$;
});
my ($in, $out, $err) = ('', '', '');
my $stream = IPC::Run::start(
	[ 'psql', '-X', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'),
	  '-c', 'CALL add_orders(1, 1000)' ],
	\$in, \$out, \$err);
wait_for($node, 'postgres',
	"SELECT count(*) >= 100 FROM mqtx.outbox WHERE status = 'published'",
	't', 'the orders are being relayed');
$mq->stop;
wait_for($node, 'postgres', 'SELECT broker_connected FROM mqtx.relay_stats',
	'f', 'the relay notices the broker is gone');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM mqtx.outbox WHERE status = 'failed'"),
	'0', 'while the broker is down, nothing fails');
ok($node->safe_psql('postgres', "SELECT count(*) FROM mqtx.outbox WHERE status = 'pending'") > 0,
	'messages wait as pending');
# Time, on purpose: the relay tries the broker again and again while it is
# down (200 ms, 400 ms, ... apart), and the log must say so once.
sleep 3;
$mq->start;
ok($stream->finish, 'the application kept inserting orders throughout') or diag($err);
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.outbox WHERE status = 'published'",
	'1000', 'after the broker returns, all 1000 are published');
check_all_delivered(1, 1000, 'broker restart');
my $log = slurp_file($node->logfile);
my $down_lines = () = $log =~ /mqtx relay: broker \S+ is unavailable/g;
cmp_ok($down_lines, '<=', 2, "the outage is logged once per state change ($down_lines lines)");
cmp_ok($down_lines, '>=', 1, 'the outage is logged');
my $up_lines = () = $log =~ /mqtx relay: connected to broker amqp:\/\/127\.0\.0\.1:\d+/g;
is($up_lines, 2, 'and the reconnection, once');

# --- relay killed with SIGKILL mid-batch: the postmaster restarts it
$node->safe_psql('postgres', q{
	INSERT INTO orders SELECT g, 'bulk ' || g FROM generate_series(2001, 12000) g;
});
wait_for($node, 'postgres',
	"SELECT count(*) > 0 FROM mqtx.outbox WHERE status = 'published' AND (payload->>'order_id')::int > 2000",
	't', 'the bulk insert is being relayed');
my $pid = worker_pid($node, 'relay', db => 'postgres');
ok($pid, "relay pid $pid");
kill 'KILL', $pid;
wait_workers($node, 1, 'a new relay runs after the kill',
	kind => 'relay', except => $pid);
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.outbox WHERE status = 'published' AND (payload->>'order_id')::int > 2000",
	'10000', 'it resumes and publishes all 10000');
check_all_delivered(2001, 12000, 'relay SIGKILL');

# --- broker stopped under a backlog, with batches in flight: each one cut
# off goes back to pending with the error, and everything arrives after
# the restart
$node->safe_psql('postgres', q{
	INSERT INTO orders SELECT g, 'backlog ' || g FROM generate_series(40001, 60000) g;
});
wait_for($node, 'postgres',
	"SELECT count(*) > 0 FROM mqtx.outbox WHERE status = 'published' AND (payload->>'order_id')::int > 40000",
	't', 'the backlog is being relayed');
$mq->stop;
wait_for($node, 'postgres', 'SELECT broker_connected FROM mqtx.relay_stats',
	'f', 'the relay notices the broker is gone under load');
my $left = $node->safe_psql('postgres',
	"SELECT count(*) FROM mqtx.outbox WHERE status = 'pending' AND (payload->>'order_id')::int > 40000");
cmp_ok($left, '>', 0, "the broker went while $left of the backlog were unpublished");
$mq->start;
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.outbox WHERE status = 'published' AND (payload->>'order_id')::int > 40000",
	'20000', 'after the restart the whole backlog is published');
is($node->safe_psql('postgres', "SELECT count(*) FROM mqtx.outbox WHERE status = 'failed'"),
	'0', 'no message of the backlog failed');
check_all_delivered(40001, 60000, 'broker stopped under a backlog');

# --- relay terminated (SIGTERM, pg_terminate_backend): restarted, resumes
$pid = worker_pid($node, 'relay', db => 'postgres');
$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid)");
$node->safe_psql('postgres', "INSERT INTO orders VALUES (20000, 'after terminate')");
wait_workers($node, 1, 'a terminated relay is restarted',
	kind => 'relay', except => $pid);
wait_for($node, 'postgres', "SELECT status FROM mqtx.outbox WHERE payload->>'order_id' = '20000'",
	'published', 'and publishes what was enqueued meanwhile');

# --- wrong credentials: pending, one clear WARNING, no password
$node->safe_psql('postgres', q{
	ALTER SYSTEM SET mqtx.broker_url = '} . $mq->url(user => 'mqtx', password => 'pw-wrong-77') . q{';
	SELECT pg_reload_conf();
});
wait_for($node, 'postgres', 'SELECT broker_connected FROM mqtx.relay_stats',
	'f', 'with a wrong password the relay stays disconnected');
$node->safe_psql('postgres', "INSERT INTO orders VALUES (20001, 'during bad credentials')");
# Time, on purpose: the message must still be pending after 2 s of retries.
sleep 2;
is( $node->safe_psql('postgres', "SELECT status FROM mqtx.outbox WHERE payload->>'order_id' = '20001'"),
	'pending', 'the message waits as pending');
ok($node->log_contains(qr/ACCESS_REFUSED/), 'the log says the login was refused');

# --- SIGHUP to another vhost and user: the relay reconnects there, and
# declares the topology on the fresh vhost
$mq->ctl('add_vhost', 'other');
$mq->ctl('add_user', 'other', 'pw-b2b2-other');
$mq->ctl('set_permissions', '-p', 'other', 'other', '.*', '.*', '.*');
my $other_url = $mq->url(user => 'other', password => 'pw-b2b2-other', vhost => 'other');
$node->safe_psql('postgres', qq{
	ALTER SYSTEM SET mqtx.broker_url = '$other_url';
	SELECT pg_reload_conf();
});
wait_for($node, 'postgres', "SELECT status FROM mqtx.outbox WHERE payload->>'order_id' = '20001'",
	'published', 'after SIGHUP with a new URL the relay publishes to the new broker');
my $other = amqp_messages($other_url, 'dispatch');
is(scalar @$other, 1, 'the message is in the new vhost\'s queue, declared by the relay');
ok($node->log_contains(qr/broker settings changed/), 'the change is logged');

# --- retention deletes published rows
$node->safe_psql('postgres', q{
	ALTER SYSTEM SET mqtx.retention = '1s';
	SELECT pg_reload_conf();
});
wait_for($node, 'postgres', "SELECT count(*) FROM mqtx.outbox WHERE status = 'published'",
	'0', 'published rows past mqtx.retention are deleted');

$node->stop;
$log = slurp_file($node->logfile);
unlike($log, qr/\Q$password\E|pw-wrong-77|pw-b2b2-other/, 'no password in the server log');
$mq->stop;
done_testing();
