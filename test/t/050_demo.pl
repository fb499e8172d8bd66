# The order -> dispatch demo (examples/demo.sh) is the project's main job
# and doubles as a test: run it small, with faults, and check what it
# reports.  Then check that its reconciliation (examples/reconcile.sh)
# fails when the two databases disagree, so a passing demo means something.
use strict;
use warnings FATAL => 'all';

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

# the demo starts a RabbitMQ node of its own (test/harness/rabbitmq.sh)
MqtxTest::RabbitMQ->skip_all_unless_installed;

my $examples = abs_path(dirname(__FILE__) . '/../../examples');

# ------------------------------------------------------------------
# the demo, small, with every fault
# ------------------------------------------------------------------
my ($out, $err) = ('', '');
my $ok = IPC::Run::run(
	[
		"$examples/demo.sh", '--no-build', '--orders', '600', '--clients', '3',
		'--rate', '150', '--poison', '3', '--faults', '--timeout', '180'
	],
	'<', \undef, '>', \$out, '2>', \$err,
	IPC::Run::timeout(400));
ok($ok, 'demo exits 0') or diag("stdout:\n$out\nstderr:\n$err");

like($out, qr/FAULT: RabbitMQ killed/, 'the broker was killed');
like($out, qr/FAULT: relay \(pid \d+\) terminated/, 'the relay was terminated');
like($out, qr/FAULT: consumer \(pid \d+\) SIGKILLed/, 'the consumer was SIGKILLed');
like($out, qr/FAULT: relay \(pid \d+\) SIGKILLed/, 'the relay was SIGKILLed');
my @dead = ($out =~ /^\s*\d+ \| \d+\s+\|\s+3 \| no depot serves city "Atlantis"$/mg);
is(scalar(@dead), 3, 'the three poison orders were dead-lettered after 3 attempts');
like($out, qr/-> 3 redriven/, 'they were redriven once the city was added');
like($out, qr/^placed but not dispatched\s+0$/m, 'reconciliation: none missing');
like($out, qr/^duplicate dispatches\s+0$/m, 'reconciliation: no duplicates');
like($out, qr/^OK: all 603 orders dispatched exactly once$/m,
	'reconciliation: 603 orders dispatched exactly once');
unlike($out . $err, qr/^FAIL/m, 'no reconciliation check failed');
my ($workdir) = $out =~ /\(in (\S+)\)/;
ok(defined $workdir && !-e $workdir, 'the demo removed its servers and files')
  or diag('work directory: ' . ($workdir // 'not reported'));

# ------------------------------------------------------------------
# reconcile.sh catches each kind of disagreement
# ------------------------------------------------------------------
# Workers are idle without a broker URL; these databases are filled by hand.
my $shop = mqtx_node('shop');
my $dispatch = mqtx_node('dispatch');
$shop->safe_psql('postgres', slurp_file("$examples/order_service.sql"));
$dispatch->safe_psql('postgres', slurp_file("$examples/dispatch_service.sql"));
$shop->safe_psql('postgres',
	q{INSERT INTO orders (user_id, content)
	  SELECT g, '{"city": "Rome"}' FROM generate_series(1, 3) g;
	  UPDATE mqtx.outbox SET status = 'published', published_at = now();});

sub reconcile
{
	my ($stdout, $stderr) = ('', '');
	IPC::Run::run(
		[
			"$examples/reconcile.sh", $shop->connstr('postgres'),
			$dispatch->connstr('postgres')
		],
		'<', \undef, '>', \$stdout, '2>', \$stderr);
	return ($? >> 8, $stdout, $stderr);
}

sub dispatch_sql { $dispatch->safe_psql('postgres', $_[0]); }

dispatch_sql(q{INSERT INTO dispatch (order_id, user_id, depot) VALUES (1, 1, 'ROM-3'), (2, 2, 'ROM-3')});
my ($rc, $stdout, $stderr) = reconcile();
is($rc, 1, 'an order not dispatched fails the reconciliation');
like($stderr, qr/FAIL: orders placed but not dispatched \(first ids: 3\): 1/,
	'and names it');

dispatch_sql(q{INSERT INTO dispatch (order_id, user_id, depot) VALUES (3, 3, 'ROM-3')});
($rc, $stdout, $stderr) = reconcile();
is($rc, 0, 'all orders dispatched once: reconciliation passes');
like($stdout, qr/^OK: all 3 orders dispatched exactly once$/m, 'and says so');

dispatch_sql(q{INSERT INTO dispatch (order_id, user_id, depot) VALUES (99, 9, 'ROM-3')});
($rc, $stdout, $stderr) = reconcile();
is($rc, 1, 'a dispatch without an order fails');
like($stderr, qr/FAIL: dispatches without an order \(first ids: 99\): 1/, 'and names it');
dispatch_sql('DELETE FROM dispatch WHERE order_id = 99');

# What a second application of a message would look like: the unique index
# refuses it and the message ends up dead-lettered with the index's name.
dispatch_sql(
	q{INSERT INTO mqtx.dead_letter (queue, message_id, body, error_message, attempts,
	                                first_failed_at, last_failed_at)
	  VALUES ('dispatch.orders', 'm1', '\x7b7d',
	          'duplicate key value violates unique constraint "dispatch_order_id_key"',
	          3, now(), now())});
($rc, $stdout, $stderr) = reconcile();
is($rc, 1, 'a refused duplicate fails');
like($stderr, qr/FAIL: duplicate dispatches: 1/, 'as a duplicate');
like($stderr, qr/FAIL: dead letters left: 1/, 'and as a dead letter');
dispatch_sql('TRUNCATE mqtx.dead_letter');

$shop->safe_psql('postgres',
	q{UPDATE mqtx.outbox SET status = 'pending', published_at = NULL WHERE id = 2});
($rc, $stdout, $stderr) = reconcile();
is($rc, 1, 'an order event still in the outbox fails');
like($stderr, qr/FAIL: order events not published: 1/, 'and is reported');

$shop->stop;
$dispatch->stop;
done_testing();
