# The order -> dispatch demo (examples/demo.sh) is the project's main job
# and doubles as a test: run it small, with faults, and check what it
# reports: every order answered (dispatched, or given up and compensated)
# and a few orders' messages followed across both services, in one
# conversation and one trace.  Then check that its reconciliation
# (examples/reconcile.sh) fails when the two databases disagree, so a
# passing demo means something.
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
		'--rate', '150', '--poison', '3', '--unservable', '2', '--faults', '--timeout', '180'
	],
	'<', \undef, '>', \$out, '2>', \$err,
	IPC::Run::timeout(400));
ok($ok, 'demo exits 0') or diag("stdout:\n$out\nstderr:\n$err");

like($out, qr/FAULT: RabbitMQ killed/, 'the broker was killed');
like($out, qr/FAULT: relay \(pid \d+\) terminated/, 'the relay was terminated');
like($out, qr/FAULT: consumer \(pid \d+\) SIGKILLed/, 'the consumer was SIGKILLed');
like($out, qr/FAULT: relay \(pid \d+\) SIGKILLed/, 'the relay was SIGKILLed');
for my $city (qw(Atlantis Lemuria))
{
	my @dead = ($out =~ /^\s*\d+ \| \d+\s+\| $city\s+\|\s+3 \| no depot serves city "$city"$/mg);
	is(scalar(@dead), $city eq 'Atlantis' ? 3 : 2,
		"the $city orders were dead-lettered after 3 attempts");
}
like($out, qr/-> 3 redriven/, 'the Atlantis ones were redriven once the city was added');
like($out, qr/-> 2 given up \(dispatch.failed sent\)/, 'the Lemuria ones were given up');
like($out, qr/^ dispatch_failed \|\s+2$/m, 'the order service compensated the two given up');
like($out, qr/^ dispatched\s+\|\s+603$/m, '... and confirmed the 603 others');
like($out, qr/^placed, not given up, but not dispatched\s+0$/m, 'reconciliation: none missing');
like($out, qr/^orders still waiting for an answer\s+0$/m, 'reconciliation: all answered');
like($out, qr/^duplicate dispatches\s+0$/m, 'reconciliation: no duplicates');
like($out, qr/^OK: all 605 orders answered: 603 dispatched exactly once, 2 given up and compensated$/m,
	'reconciliation: 605 orders, every one in a final state');

# The chains: an ordinary order goes order.created -> dispatch.orders ->
# dispatch.created -> orders.dispatched, each caused by the one before it,
# and both messages it sent in the trace its client started; one given up
# ends with dispatch.failed, caused by the order's message.
my @chains = split /\n(?=order \d+ \()/, ($out =~ /(order \d+ \(.*?)\n\nOK:/s)[0] // '';
is(scalar(@chains), 3, 'three orders followed across the services');
my %steps;
for my $chain (@chains)
{
	my ($status) = $chain =~ /^order \d+ \(\w+, (\w+)\)/;
	my @rows = map { [split] } grep { /^\s+[\d.]+ ms/ } split /\n/, $chain;
	# at ms service direction what status message cause trace
	$steps{$status} //= \@rows;
	$steps{redriven} = \@rows if $chain =~ /^order \d+ \(Atlantis/;
}
my $plain = $steps{dispatched};
is(join(' ', map { "$_->[2]/$_->[3]/$_->[4]" } @$plain),
	'shop/sent/order.created dispatch/received/dispatch.orders dispatch/sent/dispatch.created shop/received/orders.dispatched',
	'an order\'s messages, in order, across both services');
is($plain->[1][6], $plain->[0][6], 'the dispatch side received the order\'s message');
is($plain->[2][7], $plain->[0][6], 'dispatch.created names it as its cause');
is($plain->[3][6], $plain->[2][6], 'the order side applied that dispatch.created');
like($plain->[0][8], qr/^[0-9a-f]{12}$/, 'the order was placed in a trace');
is($plain->[2][8], $plain->[0][8], 'dispatch.created continued the same trace');
ok((grep { $_->[4] eq 'dispatch.orders' && $_->[3] eq 'sent' } @{ $steps{redriven} }),
	'the redriven order\'s chain shows its redrive');
is(join(' ', map { "$_->[2]/$_->[3]/$_->[4]" } @{ $steps{dispatch_failed} }),
	'shop/sent/order.created dispatch/received/dispatch.orders dispatch/sent/dispatch.failed shop/received/orders.dispatch_failed',
	'a given-up order: dispatch.failed, and its compensation');
is($steps{dispatch_failed}[2][7], $steps{dispatch_failed}[0][6],
	'dispatch.failed names the order\'s message as its cause');
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
# dispatches written by hand announce nothing
$dispatch->safe_psql('postgres', 'ALTER TABLE dispatch DISABLE TRIGGER dispatch_outbox');
$shop->safe_psql('postgres',
	q{INSERT INTO orders (user_id, content)
	  SELECT g, '{"city": "Rome"}' FROM generate_series(1, 3) g;
	  UPDATE orders SET status = 'dispatched' WHERE order_id < 3;
	  UPDATE mqtx.outbox SET status = 'published', published_at = now();});
sub shop_sql { $shop->safe_psql('postgres', $_[0]); }

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
like($stderr, qr/FAIL: orders without a final state: 1/, 'an order not answered fails too');

dispatch_sql(q{INSERT INTO dispatch (order_id, user_id, depot) VALUES (3, 3, 'ROM-3')});
($rc, $stdout, $stderr) = reconcile();
is($rc, 1, 'a dispatch the order does not show fails');
like($stderr, qr/FAIL: dispatches the order does not show \(first: 3:placed\): 1/, 'and names it');

shop_sql(q{UPDATE orders SET status = 'dispatched' WHERE order_id = 3});
($rc, $stdout, $stderr) = reconcile();
is($rc, 0, 'all orders dispatched once and answered: reconciliation passes');
like($stdout, qr/^OK: all 3 orders answered: 3 dispatched exactly once, 0 given up and compensated$/m,
	'and says so');

shop_sql(q{UPDATE orders SET status = 'dispatch_failed' WHERE order_id = 2});
($rc, $stdout, $stderr) = reconcile();
is($rc, 1, 'an order compensated although it was dispatched fails');
like($stderr, qr/FAIL: dispatches the order does not show \(first: 2:dispatch_failed\): 1/,
	'and names it');
dispatch_sql('DELETE FROM dispatch WHERE order_id = 2');
($rc, $stdout, $stderr) = reconcile();
is($rc, 0, 'an order given up and not dispatched passes');
like($stdout, qr/^OK: all 3 orders answered: 2 dispatched exactly once, 1 given up and compensated$/m,
	'and is counted as given up');

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
like($stderr, qr/FAIL: dead letters left on the dispatch side: 1/, 'and as a dead letter');
dispatch_sql('TRUNCATE mqtx.dead_letter');

$shop->safe_psql('postgres',
	q{UPDATE mqtx.outbox SET status = 'pending', published_at = NULL WHERE id = 2});
($rc, $stdout, $stderr) = reconcile();
is($rc, 1, 'an order event still in the outbox fails');
like($stderr, qr/FAIL: order events not published: 1/, 'and is reported');
shop_sql(q{UPDATE mqtx.outbox SET status = 'published', published_at = now()});

# an answer the order side could not apply
shop_sql(
	q{INSERT INTO mqtx.dead_letter (queue, message_id, body, error_message, attempts,
	                                first_failed_at, last_failed_at)
	  VALUES ('orders.dispatched', 'a1', '\x7b7d', 'no order 7', 5, now(), now())});
($rc, $stdout, $stderr) = reconcile();
is($rc, 1, 'an answer dead-lettered on the order side fails');
like($stderr, qr/FAIL: dead letters on the order side: 1/, 'and is reported');

$shop->stop;
$dispatch->stop;
done_testing();
