# The relay's side of ordering keys and scheduled delivery (issue 17):
#  - 200 keys x 50 events, committed interleaved from 4 sessions while the
#    broker is restarted: in the queue, every key's events are in their
#    committed order, none missing;
#  - a key whose first message is refused holds back its later ones only,
#    mqtx.blocked_keys says why, and they follow it in order once it goes;
#    a failed first message holds them until it is cancelled;
#  - 1,000 messages scheduled for the same second go out within a second
#    of it and not before; while they wait, the claim reads none of them;
#    cancelled ones never arrive, those of a rolled-back cancel do;
#  - a message on its way cannot be cancelled;
#  - a scheduled message survives an immediate restart and is sent once.
use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use File::Basename qw(dirname);

use MqtxTest::RabbitMQ;
use MqtxTest::DelayProxy;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $mq = MqtxTest::RabbitMQ->new(name => 'ordering');
$mq->start;
my $url = $mq->url;

my $node = mqtx_node('ordering',
	'mqtx.broker_url' => "'$url'",
	'mqtx.batch_size' => '100',
	'mqtx.max_attempts' => '1000',
	'mqtx.poll_interval' => "'1s'");

$node->safe_psql('postgres', q{
	CREATE EXTENSION mqtx;
	SELECT mqtx.declare_exchange('orders', 'direct');
	SELECT mqtx.declare_queue('events');
	SELECT mqtx.bind('events', 'orders', 'order.event');
	SELECT mqtx.declare_queue('scheduled');
	SELECT mqtx.bind('scheduled', 'orders', 'order.reminder');
});
wait_for($node, 'postgres', 'SELECT bool_and(broker_connected) FROM mqtx.relay_stats',
	't', 'the relay connects');
my $relay_pid = worker_pid($node, 'relay');

# --- 200 keys x 50 events from 4 sessions, through a broker restart ------
#
# Each session walks the keys in its own random order, 13 rounds; an
# event's number is the key's counter, taken under the counter's row lock
# (as an application numbers an aggregate's events), so the numbers of a
# key are its commit order.
my ($KEYS, $EVENTS, $SESSIONS) = (200, 50, 4);
create_keyed_emitter($node, $KEYS, $EVENTS, 'orders', 'order.event');
my $sessions = start_keyed_sessions($node, $KEYS, $EVENTS, $SESSIONS);
wait_for($node, 'postgres',
	"SELECT count(*) >= 2000 FROM mqtx.outbox WHERE status = 'published' AND ordering_key IS NOT NULL",
	't', 'keyed events are published while they stream in');
$mq->stop;
usleep(500_000);
$mq->start;
is(finish_sessions($sessions), '', 'the 4 sessions committed without an error');
is($node->safe_psql('postgres', 'SELECT sum(n) FROM counters'), $KEYS * $EVENTS,
	"$KEYS x $EVENTS events committed");
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.outbox WHERE status = 'published' AND ordering_key IS NOT NULL",
	$KEYS * $EVENTS, 'every event is published');

my %seen;
my %sequence;
my $key_header_wrong = 0;
for my $m (@{ amqp_messages($url, 'events') })
{
	next if $seen{ $m->{message_id} }++;    # a copy sent again after the restart
	my $body = message_body($m);
	push @{ $sequence{ $body->{k} } }, $body->{n};
	$key_header_wrong++
	  unless ($m->{headers}{'x-mqtx-ordering-key'} // '') eq "order-$body->{k}";
}
my @out_of_order = grep {
	join(',', @{ $sequence{$_} // [] }) ne join(',', 1 .. $EVENTS)
} 1 .. $KEYS;
is(scalar @out_of_order, 0, 'every key\'s events arrived in their committed order, none missing')
  or diag("key $out_of_order[0]: " . join(',', @{ $sequence{ $out_of_order[0] } // [] }));
is($key_header_wrong, 0, 'every message carries its key in x-mqtx-ordering-key');
is($node->safe_psql('postgres',
		"SELECT count(*) FROM mqtx.outbox WHERE status <> 'published'"),
	'0', 'nothing failed or left pending');
is(worker_pid($node, 'relay'), $relay_pid, 'the relay process kept running through it all');

# --- a refused first message holds back its key only ---------------------
#
# Its routing key has no binding yet: the broker returns it, and it is
# retried.  Key "free" goes on meanwhile.
$node->safe_psql('postgres', q{
	CREATE TABLE stuck AS
	SELECT mqtx.publish('orders', 'order.unbound', '{"k": "stuck", "n": 1}', ordering_key => 'stuck') AS id;
	SELECT mqtx.publish('orders', 'order.event', jsonb_build_object('k', 'stuck', 'n', n), ordering_key => 'stuck')
	FROM generate_series(2, 3) n;
	SELECT mqtx.publish('orders', 'order.event', jsonb_build_object('k', 'free', 'n', n), ordering_key => 'free')
	FROM generate_series(1, 3) n;
});
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.outbox WHERE ordering_key = 'free' AND status = 'published'",
	'3', 'another key\'s messages flow');
wait_for($node, 'postgres',
	"SELECT reason, blocked_by_message_id = (SELECT id FROM stuck), waiting, attempts >= 2, last_error ~ 'NO_ROUTE'
	 FROM mqtx.blocked_keys WHERE ordering_key = 'stuck'",
	'retrying|t|2|t|t', 'mqtx.blocked_keys: the key waits for its first message, retried');
my @free = map { message_body($_) } @{ amqp_messages($url, 'events') };
is(join(',', map { "$_->{k}$_->{n}" } @free), 'free1,free2,free3',
	'only the free key\'s messages reached the queue, in order');

# Bound, the first goes, and the others after it, in order.
$node->safe_psql('postgres', q{SELECT mqtx.bind('events', 'orders', 'order.unbound')});
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.outbox WHERE ordering_key = 'stuck' AND status = 'published'",
	'3', 'once the first is published, the key\'s others follow');
is(join(',', map { message_body($_)->{n} } @{ amqp_messages($url, 'events') }), '1,2,3',
	'in their order');
is($node->safe_psql('postgres', 'SELECT count(*) FROM mqtx.blocked_keys'), '0',
	'no key is blocked any more');

# A failed first message holds its key until an operator acts: here it is
# withdrawn, and the key's later message goes.
$node->safe_psql('postgres', q{
	SELECT mqtx.publish('orders', 'order.nowhere', '{"k": "dead", "n": 1}', ordering_key => 'dead');
});
wait_for($node, 'postgres',
	"SELECT attempts > 0 FROM mqtx.outbox WHERE ordering_key = 'dead'", 't',
	'the first message of key "dead" is refused');
$node->safe_psql('postgres', q{
	UPDATE mqtx.outbox SET status = 'failed' WHERE ordering_key = 'dead';
	SELECT mqtx.publish('orders', 'order.event', '{"k": "dead", "n": 2}', ordering_key => 'dead');
});
usleep(1_500_000);
is($node->safe_psql('postgres',
		"SELECT reason || ' ' || waiting FROM mqtx.blocked_keys WHERE ordering_key = 'dead'"),
	'failed 1', 'a failed first message holds its key');
is(queue_count($url, 'events'), 0, 'and nothing of it is sent');
is($node->safe_psql('postgres',
		"SELECT mqtx.cancel(message_id) FROM mqtx.outbox WHERE ordering_key = 'dead' AND status = 'failed'"),
	't', 'the failed message is withdrawn');
wait_for($node, 'postgres',
	"SELECT status FROM mqtx.outbox WHERE ordering_key = 'dead'", 'published',
	'and the key\'s next message goes');

# --- 1,000 messages scheduled for the same second ------------------------
#
# 10 s ahead: the setup below (enqueue, cancels, VACUUM, EXPLAIN) must be
# done before they are due.
my $due = $node->safe_psql('postgres',
	"SELECT date_trunc('second', clock_timestamp()) + interval '10 seconds'");
$node->safe_psql('postgres', qq{
	CREATE TABLE reminders AS
	SELECT g, mqtx.publish('orders', 'order.reminder', jsonb_build_object('n', g),
						   deliver_at => '$due') AS id
	FROM generate_series(1, 1100) g;
});
# 50 withdrawn for good, 10 in a transaction that rolls back
is($node->safe_psql('postgres', q{
	SELECT count(*) FILTER (WHERE mqtx.cancel(id)) FROM reminders WHERE g > 1050
}), '50', '50 scheduled messages are withdrawn');
is($node->safe_psql('postgres', q{
	BEGIN;
	SELECT count(*) FILTER (WHERE mqtx.cancel(id)) FROM reminders WHERE g BETWEEN 1041 AND 1050;
	ROLLBACK;
}), '10', 'and 10 in a transaction rolled back');
is($node->safe_psql('postgres', 'SELECT scheduled FROM mqtx.outbox_stats'), '1050',
	'mqtx.outbox_stats counts 1,050 scheduled');

# While they wait, the relay's claim reads none of them: its statement, as
# the relay runs it, touches a handful of index pages.
my $claim = relay_claim_sql();
$node->safe_psql('postgres', 'VACUUM mqtx.outbox');
my $plan = $node->safe_psql('postgres', qq{
	SET enable_seqscan = off; SET enable_bitmapscan = off; SET enable_sort = off;
	PREPARE claim(int, bigint[]) AS $claim;
	EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) EXECUTE claim(1000, '{}');
});
like($plan, qr/Index Scan using outbox_due_idx/, 'the claim walks the due index');
my ($hits) = $plan =~ /Buffers: shared hit=(\d+)/;
ok(defined $hits && $hits < 20, 'and reads almost nothing while 1,050 messages wait')
  or diag($plan);
ok($node->safe_psql('postgres', "SELECT count(*) FROM mqtx.outbox WHERE routing_key = 'order.reminder' AND status = 'published'") == 0,
	'nothing is sent before its time');

wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.outbox WHERE routing_key = 'order.reminder' AND status = 'published'",
	'1050', 'all 1,050 are published');
my ($early, $late, $spread) = split /\|/, $node->safe_psql('postgres', qq{
	SELECT count(*) FILTER (WHERE published_at < '$due'),
		   round(extract(epoch FROM max(published_at) - '$due')::numeric, 3),
		   round(extract(epoch FROM max(published_at) - min(published_at))::numeric, 3)
	FROM mqtx.outbox WHERE routing_key = 'order.reminder'});
is($early, 0, 'none before its time');
ok($late < 1.0, "the last within a second of it ($late s after; all in $spread s)");
diag("1,050 scheduled messages: the last published $late s after their time, all within $spread s");
my @reminders = @{ amqp_messages($url, 'scheduled') };
my %arrived = map { $_->{message_id} => 1 } @reminders;
is(scalar @reminders, 1050, '1,050 in the queue, once each') or diag(scalar @reminders);
my @cancelled = split /\n/, $node->safe_psql('postgres', 'SELECT id FROM reminders WHERE g > 1050');
is(scalar(@cancelled), 50, '50 cancelled ids');
is(scalar(grep { $arrived{$_} } @cancelled), 0, 'no cancelled message arrived');
my @kept = split /\n/, $node->safe_psql('postgres', 'SELECT id FROM reminders WHERE g BETWEEN 1041 AND 1050');
is(scalar(grep { $arrived{$_} } @kept), 10, 'those of the rolled-back cancel did');

# --- a message on its way cannot be withdrawn ----------------------------
#
# Through a proxy that holds the broker's replies for 1.5 s (less than
# mqtx.connect_timeout and mqtx.confirm_timeout), the relay sends the
# message and waits for its confirm: cancel says no, and it arrives.  A
# first message through the proxy, without delay, has the relay check the
# exchange on this connection beforehand.
my $proxy = MqtxTest::DelayProxy->new(target_port => $mq->port, down_delay_ms => 0);
$node->safe_psql('postgres',
	"ALTER SYSTEM SET mqtx.broker_url = '" . $mq->url(port => $proxy->port) . "'; SELECT pg_reload_conf()");
wait_for($node, 'postgres',
	"SELECT broker FROM mqtx.broker_connections WHERE worker = 'relay'",
	'amqp://127.0.0.1:' . $proxy->port, 'the relay goes through the proxy');
my $warm_up = $node->safe_psql('postgres',
	q{SELECT mqtx.publish('orders', 'order.reminder', '{"n": "warm-up"}')});
wait_for($node, 'postgres', "SELECT status FROM mqtx.outbox WHERE message_id = '$warm_up'",
	'published', 'a message goes through the proxy');
amqp_messages($url, 'scheduled');
$proxy->set_delay(down => 1500);
my $in_flight = $node->safe_psql('postgres',
	q{SELECT mqtx.publish('orders', 'order.reminder', '{"n": "in flight"}')});
wait_for($node, 'postgres',
	"SELECT count(*) > 0 FROM pg_stat_activity WHERE query = 'mqtx relay: waiting for publisher confirms'",
	't', 'the relay waits for its confirm');
is($node->safe_psql('postgres', qq{
	SELECT status FROM mqtx.outbox WHERE message_id = '$in_flight';
	SELECT mqtx.cancel('$in_flight');
	SELECT status FROM mqtx.outbox WHERE message_id = '$in_flight';}),
	"pending\nf\npending", 'a message on its way, still pending, is not withdrawn');
wait_for($node, 'postgres', "SELECT status FROM mqtx.outbox WHERE message_id = '$in_flight'",
	'published', 'it is published');
$proxy->set_delay(down => 0);
is(join(',', map { $_->{message_id} } @{ amqp_messages($url, 'scheduled') }), $in_flight,
	'and arrives');
$node->safe_psql('postgres', "ALTER SYSTEM RESET mqtx.broker_url; SELECT pg_reload_conf()");
$proxy->stop;

# --- a scheduled message survives a restart, and is sent once ------------
my $after_restart = $node->safe_psql('postgres',
	q{SELECT mqtx.publish('orders', 'order.reminder', '{"n": "after restart"}', delay => '3 seconds')});
$node->stop('immediate');
$node->start;
wait_for($node, 'postgres', "SELECT status FROM mqtx.outbox WHERE message_id = '$after_restart'",
	'published', 'the scheduled message is published after the restart');
usleep(1_000_000);
is(join(',', map { $_->{message_id} } @{ amqp_messages($url, 'scheduled') }), $after_restart,
	'once');

$node->stop;
$mq->stop;
done_testing();

# The relay's claim statement, read from src/relay.c (so that the test
# follows it), as one line.
sub relay_claim_sql
{
	my $source = slurp_file(dirname(__FILE__) . '/../../src/relay.c');
	my ($literal) = $source =~ /claim_sql =\s*\n(.*?";)\s*\n/s;
	die 'claim_sql not found in src/relay.c' unless defined $literal;
	my $sql = join('', map { /^\s*"(.*)"\s*;?\s*$/ ? $1 : '' } split /\n/, $literal);
	$sql =~ s/\\"/"/g;
	return $sql;
}
