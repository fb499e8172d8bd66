# The relay under pressure from the broker and from its own load:
#
# 1. A backlog meets RabbitMQ's memory alarm, which blocks the relay's
#    connection.  While it holds, the relay keeps no transaction open for
#    long, says it is blocked (mqtx.relay_stats.broker_blocked), and waits
#    on the broker as a reported wait event ('Extension'); a fast shutdown
#    is quick; once the alarm clears every row is published.
# 2. Messages of 4 MB each: the relay's memory stays bounded by
#    mqtx.batch_max_bytes, not by how many rows a batch may hold; one
#    message larger than the cap goes out alone.
# 3. The postmaster dies of SIGKILL while the relay waits on the blocked
#    broker and the consumer sleeps in a handler: both workers exit at
#    once, and after a restart nothing is lost.
use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(gettimeofday tv_interval usleep);

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $mq = MqtxTest::RabbitMQ->new(name => 'pressure');
$mq->start;
my $url = $mq->url;

# A long confirm timeout: the old relay, blocked in the library, waits as
# long as that, so a relay that only "eventually" gives up shows.
my $node = mqtx_node('pressure',
	'mqtx.broker_url' => "'$url'",
	'mqtx.confirm_timeout' => "'30s'",
	'mqtx.max_payload' => "'8MB'",
	'mqtx.batch_max_bytes' => "'16MB'",
	# small, so that the relay's peak resident memory is mostly its own
	shared_buffers => "'32MB'");

sub sql { return $node->safe_psql('postgres', $_[0]) }

sub current_relay_pid { return worker_pid($node, 'relay', db => 'postgres') }

sub consumer_pid { return worker_pid($node, 'consumer') }

sub broker_blocks_a_connection
{
	return scalar grep { $_ eq 'blocked' } $mq->connection_states;
}

sql(q{
	CREATE EXTENSION mqtx;
	SELECT mqtx.declare_exchange('pressure', 'direct');
	SELECT mqtx.declare_queue('pressure.q');
	SELECT mqtx.bind('pressure.q', 'pressure', 'k');
});
wait_for($node, 'postgres', 'SELECT bool_and(broker_connected) FROM mqtx.relay_stats',
	't', 'the relay connects');
wait_queue_exists($url, 'pressure.q');
wait_until('the relay binds pressure.q to the exchange pressure',
	sub {
		$mq->ctl('list_bindings', '-q', '--no-table-headers',
			'source_name', 'destination_name') =~ /^pressure\tpressure\.q$/m;
	});
is(sql_result($node, "SELECT count(*) FROM mqtx.relay_stats WHERE NOT broker_blocked"), '1',
	'relay_stats.broker_blocked is false while the broker accepts messages');

# ------------------------------------------------------------------
# 1. a backlog behind the memory alarm

my $relay = current_relay_pid();
like($relay, qr/^\d+$/, "the relay runs (pid $relay)");

# The alarm first: the relay's first publish of the backlog makes the
# broker block its connection (RabbitMQ blocks a connection when it
# publishes), so the whole backlog is pending while the alarm holds.
$mq->set_memory_alarm(1);
my $N = 20000;
for my $part (0 .. 3)
{
	my ($from, $to) = ($part * 5000 + 1, ($part + 1) * 5000);
	sql("SELECT count(mqtx.publish('pressure', 'k', "
		  . "jsonb_build_object('n', g, 'pad', repeat('p', 100)))) "
		  . "FROM generate_series($from, $to) g");
}
wait_within(30, 'the broker blocks the relay\'s connection (memory alarm)',
	\&broker_blocks_a_connection);

# ~10 s of samples, 100 ms apart, of the relay's row in pg_stat_activity
my $samples = sample_activity($node, $relay, 100, 100);
my @seen = grep { $_->{state} ne 'gone' } @$samples;
is(scalar @seen, 100, 'the relay was there in all 100 samples (no restart)');
my ($oldest) = sort { $b <=> $a } map { $_->{xact_age} // 0 } @seen;
$oldest //= 0;
cmp_ok($oldest, '<', 3,
	"while blocked, the relay never had a transaction open for 3 s (longest seen: ${oldest}s)");
my $blocked_samples = grep { ($_->{broker_blocked} // '') eq 'true' } @seen;
ok($blocked_samples > 0,
	"relay_stats.broker_blocked became true ($blocked_samples of 100 samples)");
my $extension_samples = grep { $_->{wait_event_type} eq 'Extension' } @seen;
ok($extension_samples > 0,
	"the relay waited on the broker as wait_event_type Extension ($extension_samples of 100 samples)");
my %kinds;
$kinds{ join('/', $_->{state}, $_->{wait_event_type} || '-', $_->{wait_event} || '-') }++
  for @seen;
note("relay activity while blocked: "
	  . join(', ', map { "$_ x$kinds{$_}" } sort keys %kinds));
ok(broker_blocks_a_connection(), 'the broker still blocks the relay after the samples');
my $pending = sql("SELECT count(*) FROM mqtx.outbox WHERE status = 'pending'");
cmp_ok($pending, '>', $N / 2, "the backlog stayed pending behind the alarm ($pending of $N)");
is(current_relay_pid(), $relay, 'the same relay process throughout');

# a fast shutdown must not wait for the broker
my $t0 = [gettimeofday];
my $stopped;
{
	# pg_ctl's own wait is 60 s by default; a hung relay fails sooner
	local $ENV{PGCTLTIMEOUT} = 30;
	$stopped = $node->stop('fast', fail_ok => 1);
}
my $stop_secs = tv_interval($t0);
ok($stopped, 'pg_ctl stop -m fast succeeds while the broker blocks the relay');
cmp_ok($stop_secs, '<', 10, sprintf('and takes under 10 s (%.1f s)', $stop_secs));
$node->stop('immediate', fail_ok => 1) unless $stopped;

$node->start;
$mq->set_memory_alarm(0);
query_within($node, 120, "SELECT count(*) FROM mqtx.outbox WHERE status = 'published'",
	$N, "after the alarm clears, all $N rows are published");
is(sql("SELECT count(*) FROM mqtx.outbox WHERE status = 'failed'"), '0',
	'none of the backlog failed');
my %in_queue = map { $_->{message_id} => 1 } @{ amqp_messages($url, 'pressure.q') };
my @missing = grep { !$in_queue{$_} } split /\n/, sql('SELECT message_id FROM mqtx.outbox');
is(scalar @missing, 0, "the queue holds every message_id of the backlog at least once")
  or diag("missing, e.g.: @missing[0 .. ($#missing < 4 ? $#missing : 4)]");
query_within($node, 30, 'SELECT broker_blocked FROM mqtx.relay_stats', 'f',
	'relay_stats.broker_blocked is false again');

# ------------------------------------------------------------------
# 2. large messages, bounded memory

my $MB = 1024 * 1024;
sql(q{
	-- lazy: the broker keeps 600 MB of bodies on disk, not in memory
	SELECT mqtx.declare_queue('big.q', arguments => '{"x-queue-mode": "lazy"}');
	CREATE PROCEDURE enqueue_big(first int, last int, per_tx int)
	LANGUAGE plpgsql AS $$
	BEGIN
		FOR i IN first .. last LOOP
			PERFORM mqtx.publish('', 'big.q',
				jsonb_build_object('n', i, 'blob', repeat('x', 4 * 1024 * 1024)));
			IF i % per_tx = 0 THEN
				COMMIT;
			END IF;
		END LOOP;
	END $$;
});
is(sql_result($node, 'SHOW mqtx.batch_max_bytes'), '16MB', 'mqtx.batch_max_bytes is 16MB');
wait_queue_exists($url, 'big.q');
$relay = current_relay_pid();

# Enqueue in one transaction, in the background, and sample the relay's
# memory every 50 ms until the last message is published.  One commit
# makes every message due at once: the relay could claim them all in one
# batch (mqtx.batch_size is 1000), so only a cap in bytes bounds it.
# Returns the peaks in kB.
sub drain_big
{
	my ($first, $last, $what) = @_;
	my $count = $last - $first + 1;
	my ($in, $out, $err) = ('', '', '');
	my $enqueue = IPC::Run::start(
		[ 'psql', '-X', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'),
		  '-c', "CALL enqueue_big($first, $last, $last)" ],
		\$in, \$out, \$err);
	# the relay's own peak from here on: "5" resets VmHWM (proc(5), clear_refs)
	if (open(my $fh, '>', "/proc/$relay/clear_refs"))
	{
		print $fh "5\n";
		close $fh;
	}
	my %peak = (VmHWM => 0, RssAnon => 0);
	my $deadline = time + 120;
	my $next_check = 0;
	my $done = 0;
	while (time < $deadline)
	{
		my $m = proc_memory($relay);
		for (keys %peak)
		{
			$peak{$_} = $m->{$_} if ($m->{$_} // 0) > $peak{$_};
		}
		if (time >= $next_check)
		{
			$next_check = time + 1;
			$enqueue->pump_nb if $enqueue->pumpable;
			$done = !$enqueue->pumpable && sql(
				"SELECT count(*) FROM mqtx.outbox WHERE routing_key = 'big.q' "
				  . "AND (payload->>'n')::int BETWEEN $first AND $last "
				  . "AND status <> 'pending'") == $count;
			last if $done;
		}
		usleep(50_000);
	}
	ok($enqueue->finish, "$what: the $count messages were enqueued") or diag($err);
	ok($done, "$what: the relay dealt with all $count within 120 s");
	is( sql("SELECT status, count(*) FROM mqtx.outbox WHERE routing_key = 'big.q' "
			  . "AND (payload->>'n')::int BETWEEN $first AND $last GROUP BY 1"),
		"published|$count", "$what: all $count are published");
	note(sprintf('%s: relay peak VmHWM %.1f MB, peak RssAnon %.1f MB',
			$what, $peak{VmHWM} / 1024, $peak{RssAnon} / 1024));
	return \%peak;
}

note('relay before the large messages: ' . join(', ',
		map { "$_ " . (proc_memory($relay)->{$_} // '?') . ' kB' } qw(VmHWM RssAnon)));
my $peak = drain_big(1, 150, '150 messages of 4 MB');
cmp_ok($peak->{VmHWM}, '<', 256 * 1024,
	sprintf('the relay\'s peak resident memory (VmHWM) stays under 256 MB (%.1f MB)',
		$peak->{VmHWM} / 1024));
cmp_ok($peak->{RssAnon}, '<', 256 * 1024,
	sprintf('its peak anonymous memory (RssAnon) too (%.1f MB)', $peak->{RssAnon} / 1024));
wait_until('the queue holds the 150 messages',
	sub { ($mq->queue_depth('big.q') // -1) == 150 })
  or diag('big.q holds ' . ($mq->queue_depth('big.q') // 'nothing'));
$mq->purge_queue('big.q');

# a message larger than the cap is sent alone, not stuck
is(sql_result($node, "ALTER SYSTEM SET mqtx.batch_max_bytes = '1MB'"), '',
	'mqtx.batch_max_bytes can be set to 1MB');
$node->reload;
query_within($node, 10, 'SHOW mqtx.batch_max_bytes', '1MB',
	'mqtx.batch_max_bytes takes 1MB on reload');
# (40 of them: claimed together, as the old relay did, they took 330 MB)
$peak = drain_big(151, 190, 'messages over the 1MB cap');
cmp_ok($peak->{VmHWM}, '<', 128 * 1024,
	sprintf('sent one at a time, they keep the relay\'s peak resident memory under 128 MB (%.1f MB)',
		$peak->{VmHWM} / 1024));
wait_until('the queue holds the 40 messages over the cap',
	sub { ($mq->queue_depth('big.q') // -1) == 40 });
is(current_relay_pid(), $relay, 'the same relay process through the large messages');
$mq->purge_queue('big.q');
sql_result($node, 'ALTER SYSTEM RESET mqtx.batch_max_bytes');
$node->reload;

# ------------------------------------------------------------------
# 3. the postmaster SIGKILLed while both workers are busy

sql(q{
	CREATE TABLE slow_switch (sleep boolean);
	INSERT INTO slow_switch VALUES (true);
	CREATE TABLE slow_applied (n int NOT NULL);
	-- sleeps while slow_switch has a row: the copy redelivered after the
	-- restart is applied at once
	CREATE FUNCTION slow_apply(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		IF EXISTS (SELECT FROM slow_switch) THEN
			PERFORM pg_sleep(30);
		END IF;
		INSERT INTO slow_applied VALUES ((payload->>'n')::int);
	END $$;
	SELECT mqtx.subscribe('slow.q', 'slow_apply(jsonb,jsonb)',
		handler_timeout => '1 minute');
});
wait_for($node, 'postgres',
	"SELECT broker_connected FROM mqtx.consumer_stats WHERE database = 'postgres'",
	't', 'the consumer connects');
wait_queue_exists($url, 'slow.q');
amqp_publish($url, 'slow.q', id => 'slow-1', body => '{"n": 1}');
my $consumer = consumer_pid();
query_within($node, 30, "SELECT wait_event FROM pg_stat_activity WHERE pid = $consumer",
	'PgSleep', "the consumer (pid $consumer) sleeps in the handler");
sql('DELETE FROM slow_switch');

$mq->set_memory_alarm(1);
sql("SELECT count(mqtx.publish('pressure', 'k', jsonb_build_object('n', g))) "
	  . "FROM generate_series(100001, 105000) g");
wait_within(30, 'the broker blocks the relay again', \&broker_blocks_a_connection);
$relay = current_relay_pid();
cmp_ok(sql("SELECT count(*) FROM mqtx.outbox WHERE status = 'pending'"), '>', 0,
	"the relay (pid $relay) has rows pending behind the blocked broker");

# every process of the cluster, so that survivors can be cleaned up
my @cluster_pids = split /\n/,
  sql('SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()');
my $postmaster = $node->{_pid};
ok(kill('KILL', $postmaster), "SIGKILL to the postmaster (pid $postmaster)");
$t0 = [gettimeofday];
wait_within(10, 'the relay and the consumer exit within 10 s of the postmaster\'s death',
	sub { !pid_alive($relay) && !pid_alive($consumer) })
  or diag('still alive: '
	  . join(' ', map { "$_->[0] ($_->[1])" } grep { pid_alive($_->[1]) }
		  ([ relay => $relay ], [ consumer => $consumer ])));
note(sprintf('workers gone %.1f s after the kill', tv_interval($t0)));

# Clean up after an orphaned cluster: whatever of it is still alive goes,
# and a restart (crash recovery) must find everything intact.
my @survivors = grep { pid_alive($_) } @cluster_pids;
if (@survivors)
{
	note("SIGKILL to the cluster's survivors: @survivors");
	kill 'KILL', @survivors;
}
# Until whoever adopted the orphans reaps them, their zombies still
# answer kill 0, and so the postmaster's keeps its lock file (and
# PostgreSQL::Test::Cluster's idea of it) alive.
my $until = time + 60;
usleep(100_000)
  while time < $until && grep { kill(0, $_) } $postmaster, @cluster_pids;
$node->_update_pid(-1);    # postmaster.pid is stale: forget it
$node->start;
$mq->set_memory_alarm(0);
query_within($node, 120, "SELECT count(*) FROM mqtx.outbox WHERE status <> 'published'",
	'0', 'after the restart every row is published');
query_within($node, 60, 'SELECT count(*) FROM slow_applied', '1',
	'the message the consumer was applying is applied once, after the restart');

$node->stop;
$mq->stop;
done_testing();
