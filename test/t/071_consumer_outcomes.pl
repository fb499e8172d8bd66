# What the reworked consumer promises, each against a real RabbitMQ node:
#
#  1. redrive never applies a message twice (copies, the redriven copy and
#     later copies are all deduplicated on the original message id);
#  2. the inbox and the failed attempts survive pg_dump / pg_restore, and a
#     restored database keeps recognising duplicates;
#  3. acks follow a durable commit, even with synchronous_commit = off;
#  4. a handler that runs past its handler_timeout fails like any handler
#     error and does not hold up other queues;
#  5. heartbeats go out during a long batch, so the broker keeps the
#     connection;
#  6. subscribing again changes a running consumer's prefetch;
#  7. after the last unsubscribe, deliveries in hand go back to the broker;
#  8. mqtx.consumer_attempts rows do not outlive their message.
#
# The main node runs with synchronous_commit = off and the longest
# wal_writer_delay throughout (item 3 needs it, and everything else must
# hold under it too), and a 2 s AMQP heartbeat (item 5).
use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $mq = MqtxTest::RabbitMQ->new(name => 'outcomes');
$mq->start;
my $url = $mq->url;

my $node = mqtx_node('outcomes',
	'mqtx.broker_url' => "'$url'",
	'mqtx.heartbeat' => "'2s'",
	synchronous_commit => 'off',
	wal_writer_delay => "'10s'");

# ------------------------------------------------------------------
# helpers

sub sql
{
	my ($sql, $n, $db) = @_;
	return ($n // $node)->safe_psql($db // 'postgres', $sql);
}

sub stat_value
{
	my ($column, $n, $db) = @_;
	$db //= 'postgres';
	return sql("SELECT $column FROM mqtx.consumer_stats WHERE database = '$db'", $n, $db);
}

sub consumer_pid { return worker_pid($node, 'consumer') }

# Ready and unacknowledged messages of a queue, as "ready/unacked".
sub ready_unacked
{
	my ($queue) = @_;
	my $c = $mq->queue_columns('messages_ready', 'messages_unacknowledged')->{$queue};
	return defined $c ? "$c->[0]/$c->[1]" : 'no queue';
}

# The prefetch counts of the broker's consumers of $queue, sorted.
sub consumer_prefetch
{
	my ($queue) = @_;
	my $out = $mq->ctl('list_consumers', '-q', '--no-table-headers',
		'queue_name', 'prefetch_count');
	my @p;
	for my $line (split /\n/, $out)
	{
		my ($name, $n) = $line =~ /^(.*)\t(\d+)$/ or next;
		push @p, $n + 0 if $name eq $queue;
	}
	return join(',', sort { $a <=> $b } @p);
}

# Subscribe $queue and wait until the broker has it.  A subscription that
# commits while the consumer is between declaring the topology and reading
# the subscriptions makes it consume a queue nobody declared yet: the broker
# closes the channel (404) and the consumer reconnects.  Subscribing one
# queue at a time, each declared before the next, keeps that race (a
# finding of its own) out of the counts this test checks.
sub subscribe_one
{
	my ($queue, $args) = @_;
	sql("SELECT mqtx.subscribe('$queue', $args)");
	wait_queue_exists($url, $queue);
}

# Poll $cond; returns the seconds it took, or undef after $limit seconds.
sub time_until
{
	my ($limit, $cond) = @_;
	my $start = time;
	while (time - $start < $limit)
	{
		return time - $start if $cond->();
		usleep(50_000);
	}
	return undef;
}

# ------------------------------------------------------------------
# schema

sql(q{
	CREATE EXTENSION mqtx;

	-- 2: a handler that applies, one that always fails
	CREATE TABLE dump_calls (id text NOT NULL);
	CREATE FUNCTION dump_apply(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO dump_calls VALUES (payload->>'id');
	END $$;
	CREATE FUNCTION dump_fail(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		RAISE EXCEPTION 'dump_fail: refused %', payload->>'id';
	END $$;

	-- 1: fails while the flag is set; its effect table has no unique key
	CREATE TABLE redrive_flag (failing boolean NOT NULL);
	INSERT INTO redrive_flag VALUES (true);
	CREATE TABLE redrive_applied (id text NOT NULL, redriven_from text);
	CREATE FUNCTION redrive_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		IF (SELECT failing FROM redrive_flag) THEN
			RAISE EXCEPTION 'redrive_handler: refused %', payload->>'id';
		END IF;
		INSERT INTO redrive_applied VALUES (payload->>'id', headers->>'x-mqtx-redriven-from');
	END $$;

	-- 3: durability
	CREATE TABLE durable_applied (id text NOT NULL);
	CREATE FUNCTION durable_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO durable_applied VALUES (payload->>'id');
	END $$;

	-- 4: a handler that outlives its timeout, and a quick one
	CREATE TABLE slow_calls (id text NOT NULL);
	CREATE FUNCTION slow_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO slow_calls VALUES (payload->>'id');
		PERFORM pg_sleep(2);
	END $$;
	CREATE TABLE fast_applied (id text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
	CREATE FUNCTION fast_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO fast_applied (id) VALUES (payload->>'id');
	END $$;

	-- 5: 0.7 s per message
	CREATE TABLE long_applied (id text NOT NULL);
	CREATE FUNCTION long_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		PERFORM pg_sleep(0.7);
		INSERT INTO long_applied VALUES (payload->>'id');
	END $$;

	-- 6
	CREATE TABLE prefetch_applied (id text NOT NULL);
	CREATE FUNCTION prefetch_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO prefetch_applied VALUES (payload->>'id');
	END $$;

	-- 7: always fails
	CREATE FUNCTION hold_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		RAISE EXCEPTION 'hold_handler: refused %', payload->>'id';
	END $$;

	-- 8: a call fails while the call counter (a sequence: not rolled back
	-- with the failed call) is at most fail_until
	CREATE SEQUENCE leak_calls;
	CREATE TABLE leak_conf (fail_until bigint NOT NULL);
	INSERT INTO leak_conf VALUES (0);
	CREATE TABLE leak_applied (id text NOT NULL);
	CREATE FUNCTION leaky(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		IF nextval('leak_calls') <= (SELECT fail_until FROM leak_conf) THEN
			RAISE EXCEPTION 'leaky: call refused';
		END IF;
		INSERT INTO leak_applied VALUES (payload->>'id');
	END $$;
});

wait_for($node, 'postgres',
	"SELECT broker_connected FROM mqtx.consumer_stats WHERE database = 'postgres'",
	't', 'the consumer connects to the broker');
my $pid = consumer_pid();
ok($pid, "consumer pid $pid");
my $reconnects0 = stat_value('reconnects');

# ==================================================================
# 2. the inbox survives pg_dump / pg_restore
# ==================================================================

# (one subscription at a time, each queue declared before the next: see
# the note on subscribe_one)
subscribe_one('dump.q', q{'dump_apply(jsonb,jsonb)'});
subscribe_one('dumpfail.q', q{'dump_fail(jsonb,jsonb)', max_attempts => 1000});
amqp_publish_many($url, 'dump.q', map { [ "dump-$_", qq({"id": "dump-$_"}) ] } 1 .. 5);
amqp_publish($url, 'dumpfail.q', id => 'df-1', body => '{"id": "df-1"}');
wait_for($node, 'postgres', 'SELECT count(*) FROM dump_calls', '5',
	'2: node A applies five messages');
wait_for($node, 'postgres',
	"SELECT attempts >= 2 FROM mqtx.consumer_attempts WHERE queue = 'dumpfail.q' AND message_id = 'df-1'",
	't', '2: node A has failed attempts of df-1 on record');
wait_queue_drained($mq, 'dump.q', '2: dump.q is drained on node A');

# What A holds, read in the very snapshot pg_dump dumps: A keeps retrying
# df-1 meanwhile.
my $inbox_sql = q{SELECT coalesce(string_agg(format('%s %s %s', queue, message_id,
		extract(epoch FROM applied_at)), ' ; ' ORDER BY queue, message_id), '<none>')
	FROM mqtx.inbox};
my $attempts_sql = q{SELECT coalesce(string_agg(format('%s %s %s %s %s', queue, message_id,
		attempts, extract(epoch FROM first_failed_at), last_error), ' ; ' ORDER BY queue, message_id), '<none>')
	FROM mqtx.consumer_attempts};
my $snap_psql = $node->background_psql('postgres');
$snap_psql->query_safe('BEGIN ISOLATION LEVEL REPEATABLE READ');
my $snapshot = $snap_psql->query_safe('SELECT pg_export_snapshot()');
chomp $snapshot;
my $inbox_a = $snap_psql->query_safe($inbox_sql);
my $attempts_a = $snap_psql->query_safe($attempts_sql);
my $df_attempts = $snap_psql->query_safe(
	"SELECT attempts FROM mqtx.consumer_attempts WHERE queue = 'dumpfail.q' AND message_id = 'df-1'");
chomp($inbox_a, $attempts_a, $df_attempts);
like($inbox_a, qr/dump\.q dump-5 /, '2: A\'s inbox lists the applied messages');
like($attempts_a, qr/dumpfail\.q df-1 \d+ /, '2: A\'s consumer_attempts lists df-1');

my $dump = PostgreSQL::Test::Utils::tempdir() . '/a.dump';
$node->command_ok(
	[ 'pg_dump', '-Fc', "--snapshot=$snapshot", '-f', $dump, '-d', $node->connstr('postgres') ],
	'2: pg_dump -Fc of node A');
$snap_psql->query_safe('COMMIT');
$snap_psql->quit;

my $nodeb = mqtx_node('restored', 'mqtx.broker_url' => "'$url'");
$nodeb->safe_psql('postgres', 'CREATE DATABASE restored');
my ($rout, $rerr) = ('', '');
IPC::Run::run([ 'pg_restore', '-d', $nodeb->connstr('restored'), $dump ],
	'<', \undef, '>', \$rout, '2>', \$rerr);
is($? >> 8, 0, '2: pg_restore into node B\'s database "restored" succeeds')
  or diag("pg_restore stderr:\n$rerr");
is(sql($inbox_sql, $nodeb, 'restored'), $inbox_a,
	'2: B\'s inbox equals A\'s (queue, message_id, applied_at)');
is(sql($attempts_sql, $nodeb, 'restored'), $attempts_a,
	'2: B\'s consumer_attempts equal A\'s');
is( sql("SELECT string_agg(queue || ' ' || handler::text || ' ' || max_attempts, ' ; ' ORDER BY queue) FROM mqtx.subscriptions",
		$nodeb, 'restored'),
	'dump.q dump_apply(jsonb,jsonb) 5 ; dumpfail.q dump_fail(jsonb,jsonb) 1000',
	'2: and the subscriptions came along');
is(sql('SELECT count(*) FROM dump_calls', $nodeb, 'restored'), '5',
	'2: and the handler\'s effects');

# A lets go of both queues before B consumes them.  dumpfail.q first,
# while dump.q still keeps A's consumer busy.
sql("SELECT mqtx.unsubscribe('dumpfail.q')");
wait_until('2: A cancels its consumer of dumpfail.q',
	sub { ($mq->consumer_count('dumpfail.q') // -1) == 0 });
wait_until('2: A gives df-1 back (1 ready, 0 unacked)',
	sub { ready_unacked('dumpfail.q') eq '1/0' })
  or diag('dumpfail.q ready/unacked: ' . ready_unacked('dumpfail.q'));
sql("SELECT mqtx.unsubscribe('dump.q')");
wait_until('2: A cancels its consumer of dump.q',
	sub { ($mq->consumer_count('dump.q') // -1) == 0 });

# B: one more failure of df-1 dead-letters it, if its attempts came along
my $df_max = $df_attempts + 1;
$nodeb->safe_psql('restored',
	"SELECT mqtx.subscribe('dumpfail.q', 'dump_fail(jsonb,jsonb)', max_attempts => $df_max)");
$nodeb->safe_psql('postgres', "ALTER SYSTEM SET mqtx.database = 'restored'");
$nodeb->restart;
wait_for($nodeb, 'restored',
	"SELECT broker_connected FROM mqtx.consumer_stats WHERE database = 'restored'",
	't', '2: B\'s consumer serves "restored" and connects');
wait_until('2: B consumes dump.q',
	sub { ($mq->consumer_count('dump.q') // 0) == 1 });

my $b_dups = stat_value('duplicates', $nodeb, 'restored');
amqp_publish($url, 'dump.q', id => 'dump-3', body => '{"id": "dump-3"}');
wait_for($nodeb, 'restored',
	"SELECT duplicates FROM mqtx.consumer_stats WHERE database = 'restored'",
	$b_dups + 1, '2: B counts a redelivery of a message A applied as a duplicate');
amqp_publish($url, 'dump.q', id => 'dump-6', body => '{"id": "dump-6"}');
wait_for($nodeb, 'restored', "SELECT count(*) FROM dump_calls WHERE id = 'dump-6'",
	'1', '2: B applies a new message');
is( sql(q{SELECT count(*), count(*) FILTER (WHERE id = 'dump-3') FROM dump_calls},
		$nodeb, 'restored'),
	'6|1', '2: B did not call the handler for the duplicate');
is(stat_value('applied', $nodeb, 'restored'), '1', '2: B applied just the new message');
my ($df_first) = $attempts_a =~ /dumpfail\.q df-1 \d+ (\S+) /;
wait_for($nodeb, 'restored',
	"SELECT attempts, extract(epoch FROM first_failed_at)::text = '$df_first' "
	  . "FROM mqtx.dead_letter WHERE queue = 'dumpfail.q' AND message_id = 'df-1'",
	"$df_max|t",
	"2: B dead-letters df-1 after one more failure: attempts $df_max, first failure as restored");
wait_queue_drained($mq, 'dump.q', '2: dump.q is drained by B');
$nodeb->stop;

# ==================================================================
# 1. redrive never applies a message twice
# ==================================================================

sql(q{SELECT mqtx.subscribe('redrive.q', 'redrive_handler(jsonb,jsonb)', max_attempts => 2)});
wait_queue_exists($url, 'redrive.q');
my $dl0 = stat_value('dead_lettered');
my $dup0 = stat_value('duplicates');
amqp_publish($url, 'redrive.q', id => 'rd-1', body => '{"id": "rd-1"}', repeat => 2);
wait_for($node, 'postgres',
	"SELECT count(*), min(attempts) FROM mqtx.dead_letter WHERE queue = 'redrive.q' AND message_id = 'rd-1'",
	'1|2', '1: two copies of rd-1 end as one dead letter, after max_attempts = 2');
wait_queue_drained($mq, 'redrive.q', '1: both copies are acked');
is( sql(q{SELECT (SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'redrive.q'),
		(SELECT count(*) FROM mqtx.consumer_attempts WHERE queue = 'redrive.q'),
		(SELECT count(*) FROM mqtx.inbox WHERE queue = 'redrive.q' AND message_id = 'rd-1'),
		(SELECT count(*) FROM redrive_applied)}),
	'1|0|1|0', '1: one dead letter, no attempts left, the inbox row written, nothing applied');
is(stat_value('dead_lettered') - $dl0, 1, '1: consumer_stats.dead_lettered grew by one');
is(stat_value('duplicates') - $dup0, 1, '1: and the other copy counted as a duplicate');

sql('UPDATE redrive_flag SET failing = false');
my $dups = stat_value('duplicates');
is(sql("SELECT mqtx.redrive_all('redrive.q')"), '1', '1: redrive_all redrives the one dead letter');
my $new_id = sql("SELECT message_id FROM mqtx.outbox WHERE headers->>'x-mqtx-redriven-from' = 'rd-1'");
like($new_id, qr/^[0-9a-f-]{36}$/, '1: it goes through the outbox with x-mqtx-redriven-from = rd-1');
wait_for($node, 'postgres', "SELECT count(*) FROM redrive_applied WHERE id = 'rd-1'",
	'1', '1: the redriven message is applied');
wait_for($node, 'postgres',
	"SELECT status FROM mqtx.outbox WHERE message_id = '$new_id'", 'published',
	'1: the relay published it');
wait_queue_drained($mq, 'redrive.q', '1: the redriven message is acked');
is( sql(qq{SELECT (SELECT count(*) FROM mqtx.inbox WHERE queue = 'redrive.q' AND message_id = 'rd-1'),
		(SELECT count(*) FROM mqtx.inbox WHERE queue = 'redrive.q' AND message_id = '$new_id'),
		(SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'redrive.q'),
		(SELECT count(*) FROM mqtx.consumer_attempts WHERE queue = 'redrive.q'),
		(SELECT redriven_from FROM redrive_applied WHERE id = 'rd-1')}),
	'1|0|0|0|rd-1',
	'1: the inbox has the original id, not the new one; no dead letter, no attempts left');

amqp_publish($url, 'redrive.q', id => 'rd-1', body => '{"id": "rd-1"}');
wait_for($node, 'postgres',
	"SELECT duplicates - $dups >= 1 FROM mqtx.consumer_stats WHERE database = 'postgres'",
	't', '1: a third copy of rd-1 is a duplicate');
wait_queue_drained($mq, 'redrive.q', '1: and is acked');
is(sql("SELECT count(*) FROM redrive_applied WHERE id = 'rd-1'"), '1',
	'1: rd-1 was applied exactly once');
is(sql("SELECT mqtx.redrive_all('redrive.q')"), '0', '1: nothing is left to redrive');

# a copy published right after the redrive races the redriven one: one wins
sql('UPDATE redrive_flag SET failing = true');
amqp_publish($url, 'redrive.q', id => 'rd-2', body => '{"id": "rd-2"}');
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'redrive.q' AND message_id = 'rd-2'",
	'1', '1: rd-2 is dead-lettered');
wait_queue_drained($mq, 'redrive.q');
sql('UPDATE redrive_flag SET failing = false');
$dups = stat_value('duplicates');
is(sql("SELECT mqtx.redrive_all('redrive.q')"), '1', '1: rd-2 redriven');
amqp_publish($url, 'redrive.q', id => 'rd-2', body => '{"id": "rd-2"}');
wait_for($node, 'postgres',
	"SELECT bool_and(status = 'published') FROM mqtx.outbox WHERE headers->>'x-mqtx-redriven-from' = 'rd-2'",
	't', '1: the redriven rd-2 is published');
wait_for($node, 'postgres',
	"SELECT duplicates - $dups >= 1 FROM mqtx.consumer_stats WHERE database = 'postgres'",
	't', '1: of the redriven rd-2 and a copy sent right after it, one is a duplicate');
wait_queue_drained($mq, 'redrive.q');
is( sql("SELECT count(*), min(redriven_from) IS NULL OR min(redriven_from) = 'rd-2' FROM redrive_applied WHERE id = 'rd-2'"),
	'1|t', '1: rd-2 was applied exactly once');
is( sql(q{SELECT (SELECT count(*) FROM mqtx.inbox WHERE queue = 'redrive.q'),
		(SELECT count(*) FROM mqtx.consumer_attempts WHERE queue = 'redrive.q'),
		(SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'redrive.q')}),
	'2|0|0', '1: redrive.q: two inbox rows (rd-1, rd-2), no attempts, no dead letters');

# redriven while the handler still fails: dead-lettered again under its
# original id; redriven once more after the fix: applied once
sql('UPDATE redrive_flag SET failing = true');
amqp_publish($url, 'redrive.q', id => 'rd-3', body => '{"id": "rd-3"}');
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'redrive.q' AND message_id = 'rd-3'",
	'1', '1: rd-3 is dead-lettered');
my $rd3_letter = sql("SELECT id FROM mqtx.dead_letter WHERE message_id = 'rd-3'");
is(sql("SELECT mqtx.redrive_all('redrive.q')"), '1', '1: rd-3 redriven while the handler still fails');
wait_for($node, 'postgres',
	"SELECT id > $rd3_letter, attempts, headers->>'x-mqtx-redriven-from' FROM mqtx.dead_letter "
	  . "WHERE queue = 'redrive.q' AND message_id = 'rd-3'",
	't|2|rd-3', '1: the redriven rd-3 fails again and is dead-lettered under its original id');
wait_queue_drained($mq, 'redrive.q');
is( sql(q{SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'redrive.q'}), '1',
	'1: one dead letter, none under the redriven copy\'s new id');
sql('UPDATE redrive_flag SET failing = false');
is(sql("SELECT mqtx.redrive_all('redrive.q')"), '1', '1: rd-3 redriven again after the fix');
wait_for($node, 'postgres', "SELECT count(*) FROM redrive_applied WHERE id = 'rd-3'",
	'1', '1: rd-3 is applied');
wait_for($node, 'postgres',
	"SELECT count(*), bool_and(status = 'published') FROM mqtx.outbox WHERE headers->>'x-mqtx-redriven-from' = 'rd-3'",
	'2|t', '1: both redriven copies of rd-3 were published, each with x-mqtx-redriven-from = rd-3');
wait_queue_drained($mq, 'redrive.q');
is( sql(q{SELECT (SELECT count(*) FROM redrive_applied WHERE id = 'rd-3'),
		(SELECT count(*) FROM mqtx.inbox WHERE queue = 'redrive.q'),
		(SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'redrive.q'),
		(SELECT count(*) FROM mqtx.consumer_attempts WHERE queue = 'redrive.q')}),
	'1|3|0|0', '1: rd-3 applied once; inbox rd-1, rd-2, rd-3; no dead letters, no attempts');

# ==================================================================
# 4. handler_timeout
# ==================================================================

subscribe_one('slow.q', q{'slow_handler(jsonb,jsonb)', max_attempts => 2, handler_timeout => '300 ms'});
subscribe_one('fast.q', q{'fast_handler(jsonb,jsonb)'});
is(sql("SELECT handler_timeout FROM mqtx.subscriptions WHERE queue = 'slow.q'"),
	'00:00:00.3', '4: handler_timeout recorded');
$pid = consumer_pid();
amqp_publish_many($url, 'slow.q', map { [ "slow-$_", qq({"id": "slow-$_"}) ] } 1 .. 2);
my @latency;
for my $i (1 .. 6)
{
	amqp_publish($url, 'fast.q', id => "fast-$i", body => qq({"id": "fast-$i"}));
	my $t = time_until(30, sub {
		sql("SELECT count(*) FROM fast_applied WHERE id = 'fast-$i'") eq '1' });
	push @latency, $t // 999;
}
my ($max_latency) = sort { $b <=> $a } @latency;
note('4: fast.q latencies: ' . join(', ', map { sprintf('%.2f s', $_) } @latency));
cmp_ok($max_latency, '<', 1.8,
	'4: meanwhile fast.q is applied promptly (each within 1.8 s of its publish, less than the slow handler\'s 2 s sleep)')
  or diag('latencies: ' . join(', ', map { sprintf('%.2f', $_) } @latency));
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'slow.q'",
	'2', '4: both slow messages are dead-lettered');
is( sql(q{SELECT string_agg(format('%s %s %s', message_id, attempts,
			error_message LIKE 'handler ran longer than its timeout of 300 ms%'), ' ; ' ORDER BY message_id)
		FROM mqtx.dead_letter WHERE queue = 'slow.q'}),
	'slow-1 2 t ; slow-2 2 t',
	"4: after 2 attempts, with error 'handler ran longer than its timeout of 300 ms...'")
  or diag(sql("SELECT message_id, error_message FROM mqtx.dead_letter WHERE queue = 'slow.q'"));
is( sql(q{SELECT bool_and(last_failed_at - first_failed_at < interval '2 s') FROM mqtx.dead_letter WHERE queue = 'slow.q'}),
	't', '4: the second attempt started less than 2 s after the first (the 2 s sleep was cut short)');
is( sql(q{SELECT (SELECT count(*) FROM slow_calls), (SELECT count(*) FROM mqtx.inbox WHERE queue = 'slow.q'),
		(SELECT count(*) FROM mqtx.consumer_attempts WHERE queue = 'slow.q')}),
	'0|2|0', '4: no slow call committed; the inbox records both; no attempts left');
is(sql('SELECT count(*), count(DISTINCT id) FROM fast_applied'), '6|6',
	'4: each fast message applied once');
is(consumer_pid(), $pid, '4: the consumer pid is unchanged');
wait_queue_drained($mq, 'slow.q');

# ==================================================================
# 5. heartbeats during a long batch
# ==================================================================

sql("SELECT mqtx.declare_queue('long.q')");
wait_queue_exists($url, 'long.q');
amqp_publish_many($url, 'long.q', map { [ "long-$_", qq({"id": "long-$_"}) ] } 1 .. 10);
is(ready_unacked('long.q'), '10/0', '5: ten messages wait in long.q');
is( join(',', sort split /\s+/, $mq->ctl('list_connections', '-q', '--no-table-headers', 'timeout')),
	'2,2', '5: the broker has A\'s relay and consumer connected with a 2 s heartbeat');
my $reconnects = stat_value('reconnects');
my $applied = stat_value('applied');
my $log_offset = -s $node->logfile;
my $t5 = time;
sql("SELECT mqtx.subscribe('long.q', 'long_handler(jsonb,jsonb)')");
wait_for($node, 'postgres', 'SELECT count(*) FROM long_applied', '10',
	'5: all ten slow (0.7 s) messages are applied');
my $t5_elapsed = time - $t5;
wait_queue_drained($mq, 'long.q', '5: and acked');
cmp_ok($t5_elapsed, '>', 6, sprintf('5: that took more than three heartbeats (%.1f s)', $t5_elapsed));
is(sql('SELECT count(*), count(DISTINCT id) FROM long_applied'), '10|10', '5: each exactly once');
is(stat_value('applied') - $applied, 10, '5: consumer_stats.applied grew by 10 (no duplicates, no retries)');
is(stat_value('reconnects'), $reconnects, '5: consumer_stats.reconnects did not grow');
is(stat_value('broker_connected'), 't', '5: the consumer is connected');
unlike(slurp_file($node->logfile, $log_offset), qr/mqtx consumer: broker .* is unavailable|heartbeat/i,
	'5: no broker outage or heartbeat trouble logged');
is(consumer_pid(), $pid, '5: the consumer pid is unchanged');

# ==================================================================
# 6. subscribing again changes the prefetch of a running consumer
# ==================================================================

sql(q{SELECT mqtx.subscribe('prefetch.q', 'prefetch_handler(jsonb,jsonb)', prefetch => 5)});
wait_queue_exists($url, 'prefetch.q');
my $pf;
wait_until('6: the broker shows prefetch 5 for prefetch.q',
	sub { ($pf = consumer_prefetch('prefetch.q')) eq '5' })
  or diag("prefetch counts: $pf");
amqp_publish($url, 'prefetch.q', id => 'pf-1', body => '{"id": "pf-1"}');
wait_for($node, 'postgres', 'SELECT count(*) FROM prefetch_applied', '1',
	'6: a message flows');
sql(q{SELECT mqtx.subscribe('prefetch.q', 'prefetch_handler(jsonb,jsonb)', prefetch => 17)});
wait_until('6: after subscribing again, the broker shows one consumer with prefetch 17',
	sub { ($pf = consumer_prefetch('prefetch.q')) eq '17' })
  or diag("prefetch counts: $pf");
amqp_publish_many($url, 'prefetch.q', map { [ "pf-$_", qq({"id": "pf-$_"}) ] } 2 .. 4);
wait_for($node, 'postgres', 'SELECT count(*), count(DISTINCT id) FROM prefetch_applied', '4|4',
	'6: messages still flow, each applied once');
wait_queue_drained($mq, 'prefetch.q');
is(consumer_pid(), $pid, '6: the consumer pid is unchanged');

# ==================================================================
# 8. consumer_attempts rows do not leak
# ==================================================================

sql(q{SELECT mqtx.subscribe('leak.q', 'leaky(jsonb,jsonb)', max_attempts => 10)});
wait_queue_exists($url, 'leak.q');

# a: fails once, then succeeds
my $retried = stat_value('retried');
sql(q{UPDATE leak_conf SET fail_until = (SELECT last_value + CASE WHEN is_called THEN 1 ELSE 0 END FROM leak_calls)});
amqp_publish($url, 'leak.q', id => 'leak-a', body => '{"id": "leak-a"}');
wait_for($node, 'postgres', "SELECT count(*) FROM leak_applied WHERE id = 'leak-a'", '1',
	'8a: a message that failed once is applied on its retry');
cmp_ok(stat_value('retried') - $retried, '>=', 1, '8a: it did fail first (consumer_stats.retried grew)');
wait_queue_drained($mq, 'leak.q');
is(sql("SELECT count(*) FROM mqtx.consumer_attempts WHERE queue = 'leak.q'"), '0',
	'8a: it leaves no consumer_attempts row');

# b: two copies, the first two calls fail: one copy gets applied while the
# other has a failed attempt on record; that copy is then a duplicate
$dups = stat_value('duplicates');
sql(q{UPDATE leak_conf SET fail_until = (SELECT last_value + 2 FROM leak_calls)});
amqp_publish($url, 'leak.q', id => 'leak-b', body => '{"id": "leak-b"}', repeat => 2);
wait_for($node, 'postgres', "SELECT count(*) FROM leak_applied WHERE id = 'leak-b'", '1',
	'8b: one of two failing copies is applied');
wait_queue_drained($mq, 'leak.q', '8b: both copies are acked');
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.consumer_attempts WHERE queue = 'leak.q'", '0',
	'8b: no consumer_attempts row is left');
is( sql(qq{SELECT (SELECT count(*) FROM leak_applied WHERE id = 'leak-b'),
		(SELECT duplicates - $dups FROM mqtx.consumer_stats WHERE database = 'postgres'),
		(SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'leak.q')}),
	'1|1|0', '8b: applied once, the other copy a duplicate, no dead letter');

# c: copies of an applied message that would fail now: duplicates, and
# neither calls the handler nor records anything
sql('UPDATE leak_conf SET fail_until = 1000000');
my $calls = sql('SELECT last_value FROM leak_calls');
$dups = stat_value('duplicates');
amqp_publish($url, 'leak.q', id => 'leak-a', body => '{"id": "leak-a"}');
amqp_publish($url, 'leak.q', id => 'leak-a', body => 'not json');
wait_for($node, 'postgres',
	"SELECT duplicates - $dups FROM mqtx.consumer_stats WHERE database = 'postgres'",
	'2', '8c: two late copies of an applied message (one of them poison) are duplicates');
wait_queue_drained($mq, 'leak.q');
is( sql(q{SELECT (SELECT last_value FROM leak_calls),
		(SELECT count(*) FROM mqtx.consumer_attempts WHERE queue = 'leak.q'),
		(SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'leak.q'),
		(SELECT count(*) FROM leak_applied WHERE id = 'leak-a')}),
	"$calls|0|0|1", '8c: the handler was not called; no attempts row, no dead letter');
is(sql('SELECT count(*) FROM mqtx.consumer_attempts'), '1',
	'8: the only consumer_attempts row left is A\'s frozen df-1 (dumpfail.q, unsubscribed)');

is(consumer_pid(), $pid, 'the same consumer ran items 1, 4, 5, 6 and 8');
is(stat_value('reconnects'), $reconnects0, 'and never reconnected');
unlike(slurp_file($node->logfile),
	qr/background worker "[^"]*consumer[^"]*" \(PID \d+\) (?:exited with exit code [1-9]|was terminated)/,
	'the consumer worker never died');

# ==================================================================
# 3. acks follow a durable commit (synchronous_commit = off)
# ==================================================================

is(sql('SHOW synchronous_commit'), 'off', '3: synchronous_commit is off by default');
is(sql('SHOW wal_writer_delay'), '10s', '3: wal_writer_delay is 10s');
sql(q{SELECT mqtx.subscribe('durable.q', 'durable_handler(jsonb,jsonb)')});
wait_queue_exists($url, 'durable.q');
my $N = 20;
for my $round (1 .. 3)
{
	# what the test itself committed must not be what gets lost
	sql('CHECKPOINT');
	amqp_publish_many($url, 'durable.q',
		map { [ "dur-$round-$_", qq({"id": "dur-$round-$_"}) ] } 1 .. $N);
	my $depth;
	wait_until("3.$round: durable.q is drained (all $N acked)",
		sub { $depth = $mq->queue_depth('durable.q'); defined $depth && $depth == 0 });
	$node->stop('immediate');
	$node->start;
	my $expected = $round * $N;
	is( sql(q{SELECT (SELECT count(*) FROM durable_applied),
			(SELECT count(DISTINCT id) FROM durable_applied),
			(SELECT count(*) FROM mqtx.inbox WHERE queue = 'durable.q')}),
		"$expected|$expected|$expected",
		"3.$round: after an immediate stop right after the acks, all $expected effects and inbox rows are there");
	wait_for($node, 'postgres',
		"SELECT broker_connected FROM mqtx.consumer_stats WHERE database = 'postgres'",
		't', "3.$round: the consumer is back");
	wait_until("3.$round: it consumes durable.q again",
		sub { ($mq->consumer_count('durable.q') // 0) == 1 });
}

# ==================================================================
# 7. after the last unsubscribe, deliveries in hand are given back
# ==================================================================

# the only subscription left will be hold.q
sql(q{SELECT count(mqtx.unsubscribe(queue)) FROM mqtx.subscriptions});
sql(q{
	ALTER SYSTEM SET mqtx.retry_base = '60s';
	ALTER SYSTEM SET mqtx.retry_max = '5min';
	SELECT pg_reload_conf();
});
wait_for($node, 'postgres', 'SHOW mqtx.retry_base', '1min', '7: retry_base is 60 s');
sql(q{SELECT mqtx.subscribe('hold.q', 'hold_handler(jsonb,jsonb)', max_attempts => 100)});
wait_queue_exists($url, 'hold.q');
$pid = consumer_pid();
amqp_publish_many($url, 'hold.q', map { [ "hold-$_", qq({"id": "hold-$_"}) ] } 1 .. 3);
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.consumer_attempts WHERE queue = 'hold.q'", '3',
	'7: the three failing messages have attempts on record');
wait_until('7: the broker shows them held: 0 ready, 3 unacked',
	sub { ready_unacked('hold.q') eq '0/3' })
  or diag('hold.q ready/unacked: ' . ready_unacked('hold.q'));
is(sql("SELECT max(attempts) FROM mqtx.consumer_attempts WHERE queue = 'hold.q'"), '1',
	'7: each failed once and waits for its 60 s backoff');
is(sql('SELECT count(*) FROM mqtx.subscriptions'), '1', '7: hold.q is the only subscription');
sql("SELECT mqtx.unsubscribe('hold.q')");
my $given_back = time_until(10, sub { ready_unacked('hold.q') eq '3/0' });
ok(defined $given_back,
	'7: within 10 s of the unsubscribe, hold.q shows 3 ready and 0 unacked'
	  . (defined $given_back ? sprintf(' (%.1f s)', $given_back) : ''))
  or diag('hold.q ready/unacked: ' . ready_unacked('hold.q'));
is($mq->consumer_count('hold.q'), 0, '7: nobody consumes hold.q');
is(consumer_pid(), $pid, '7: the consumer is the same process');
is(sql("SELECT max(attempts) FROM mqtx.consumer_attempts WHERE queue = 'hold.q'"), '1',
	'7: giving them back is not counted as an attempt');

sql(q{
	ALTER SYSTEM RESET mqtx.retry_base;
	ALTER SYSTEM RESET mqtx.retry_max;
	SELECT pg_reload_conf();
});

unlike(slurp_file($node->logfile), qr/PANIC|TRAP:|was terminated by signal/,
	'no PANIC, assertion failure or crash in the log');

$node->stop;
$mq->stop;
done_testing();
