# Helpers shared by the mqtx TAP tests: PostgreSQL nodes that preload mqtx,
# mqtx's workers, bounded waits, and the AMQP test tool.
package MqtxTest::Util;

use strict;
use warnings FATAL => 'all';

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);
use IPC::Run ();
use List::Util ();

use Exporter qw(import);
our @EXPORT = qw(mqtx_node wait_for wait_until wait_queue_exists wait_queue_drained
  amqp_tool amqp_publish_args amqp_publish amqp_publish_many amqp_messages
  message_body worker_pid_query worker_pid worker_count wait_workers wait_within
  query_within sql_result pid_alive sample_activity proc_memory queue_count
  create_keyed_emitter start_keyed_sessions finish_sessions);

# Servers listen on 127.0.0.1 TCP, like a deployment, not on a socket dir.
$PostgreSQL::Test::Utils::use_unix_sockets = 0;

my $tool = abs_path(dirname(__FILE__) . '/../../tools') . '/amqp_tool';

# A started PostgreSQL node with mqtx preloaded and short worker timings.
# Extra settings are appended verbatim (name => value, value unquoted).
sub mqtx_node
{
	my ($name, %settings) = @_;
	my %conf = (
		shared_preload_libraries => "'mqtx'",
		'mqtx.database' => "'postgres'",
		'mqtx.poll_interval' => "'200ms'",
		'mqtx.retry_base' => "'100ms'",
		'mqtx.retry_max' => "'1s'",
		'mqtx.connect_timeout' => "'2s'",
		'mqtx.confirm_timeout' => "'5s'",
		log_min_messages => 'info',
		# the test framework turns it off; the relay-kill tests need it
		restart_after_crash => 'on',
		%settings);
	# -init: options for init (allows_streaming => 1 for a primary)
	my %init = %{ delete($conf{'-init'}) // {} };
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(%init);
	$node->append_conf('postgresql.conf',
		join('', map { "$_ = $conf{$_}\n" } sort keys %conf));
	$node->start;
	return $node;
}

# Poll until the query returns the expected text; fail the test (and stop
# waiting) after the harness timeout.
sub wait_for
{
	my ($node, $db, $query, $expected, $what) = @_;
	my $ok = $node->poll_query_until($db, $query, $expected);
	ok($ok, $what) or diag("last result: " . $node->safe_psql($db, $query));
	return $ok;
}

# Poll a Perl condition until it holds or the harness timeout passes.
sub wait_until
{
	my ($what, $cond) = @_;
	my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
	while (time < $deadline)
	{
		return ok(1, $what) if $cond->();
		usleep(200_000);
	}
	return ok(0, $what);
}

sub wait_queue_exists
{
	my ($url, $queue) = @_;
	wait_until("queue $queue exists on the broker",
		sub { defined queue_count($url, $queue) });
}

# Ready messages in a queue, through AMQP (a passive declare: much quicker
# than rabbitmqctl); undef if the queue does not exist or the broker
# cannot be reached.
sub queue_count
{
	my ($url, $queue) = @_;
	my $n = eval { amqp_tool('count', '--url', $url, '--queue', $queue) };
	return undef unless defined $n && $n =~ /^(\d+)\s*$/;
	return $1 + 0;
}

# Nothing ready and nothing unacked: every delivery was acked.
sub wait_queue_drained
{
	my ($mq, $queue, $what) = @_;
	my $depth;
	wait_until($what // "queue $queue is drained (all acked)",
		sub { $depth = $mq->queue_depth($queue); defined $depth && $depth == 0 })
	  or diag("queue $queue depth: " . ($depth // 'no queue'));
}

# Run the AMQP test tool; returns stdout, dies on failure.
sub amqp_tool
{
	my @args = @_;
	my ($stdout, $stderr);
	IPC::Run::run([ $tool, @args ], '>', \$stdout, '2>', \$stderr)
	  or die "amqp_tool @args failed: $stderr";
	return $stdout;
}

# Arguments of one confirmed, persistent publish to the default exchange,
# routed to $queue.  %o: id (message_id; none if absent), correlation_id,
# body or body_file, headers (list of "k=v"), repeat.
sub amqp_publish_args
{
	my ($url, $queue, %o) = @_;
	my @args = ('publish', '--url', $url, '--routing-key', $queue,
		'--persistent');
	push @args, '--message-id', $o{id} if defined $o{id};
	push @args, '--correlation-id', $o{correlation_id} if defined $o{correlation_id};
	push @args, '--header', $_ for @{ $o{headers} // [] };
	push @args, '--repeat', $o{repeat} if $o{repeat};
	if (defined $o{body_file})
	{
		push @args, '--body-file', $o{body_file};
	}
	else
	{
		push @args, '--body', $o{body};
	}
	return @args;
}

sub amqp_publish
{
	my ($url, $queue, %o) = @_;
	return amqp_tool(amqp_publish_args($url, $queue, %o));
}

# Publish many [message_id, body] pairs, one confirmed publish each.  One
# process at a time: the broker's connection setup is the cost, and
# parallel connections do not make it cheaper.
sub amqp_publish_many
{
	my ($url, $queue, @messages) = @_;
	for my $m (@messages)
	{
		system($tool, amqp_publish_args($url, $queue, id => $m->[0], body => $m->[1])) == 0
		  or die "amqp_tool publish $m->[0] failed (status $?)";
	}
}

# Every message in a queue, as hashes decoded from the tool's JSON lines.
sub amqp_messages
{
	my ($url, $queue, $max) = @_;
	my $out = amqp_tool('get', '--url', $url, '--queue', $queue,
		'--count', $max // 100000);
	require JSON::PP;
	return [ map { JSON::PP::decode_json($_) } grep { /\S/ } split /\n/, $out ];
}

# A message's body, decoded from JSON (the tool already decoded the line's
# UTF-8, so the body is a character string).
sub message_body
{
	my ($message) = @_;
	return JSON::PP->new->decode($message->{body});
}

# The query for the pids of mqtx's workers, as pg_stat_activity shows them
# (it answers in every database, with or without the extension).  %o: kind,
# 'relay' or 'consumer' (both when absent); db, the database served;
# except, a pid to leave out; where, one more condition.
sub worker_pid_query
{
	my (%o) = @_;
	my $q = 'SELECT pid FROM pg_stat_activity WHERE backend_type '
	  . (defined $o{kind}
		? "= 'mqtx $o{kind}'"
		: "IN ('mqtx relay', 'mqtx consumer')");
	$q .= " AND datname = '$o{db}'" if defined $o{db};
	$q .= " AND pid <> $o{except}" if defined $o{except};
	$q .= " AND $o{where}" if defined $o{where};
	return $q;
}

# The pid of the $kind worker ('relay' or 'consumer'): '' when none runs,
# one a line if several do.  %o as for worker_pid_query.
sub worker_pid
{
	my ($node, $kind, %o) = @_;
	return $node->safe_psql('postgres', worker_pid_query(%o, kind => $kind));
}

# How many workers run that match %o (as for worker_pid_query).
sub worker_count_query
{
	my (%o) = @_;
	return 'SELECT count(*) FROM (' . worker_pid_query(%o) . ') w';
}

sub worker_count
{
	my ($node, %o) = @_;
	return $node->safe_psql('postgres', worker_count_query(%o));
}

# Wait until $n workers run that match %o (as for worker_pid_query).
sub wait_workers
{
	my ($node, $n, $what, %o) = @_;
	return wait_for($node, 'postgres', worker_count_query(%o), $n, $what);
}

# Poll a Perl condition every 100 ms for at most $seconds: for the waits
# whose bound is part of what a test shows (the harness timeout is three
# minutes).  Returns the ok() of the wait.
sub wait_within
{
	my ($seconds, $what, $cond) = @_;
	my $deadline = Time::HiRes::time() + $seconds;
	while (1)
	{
		return ok(1, $what) if $cond->();
		last if Time::HiRes::time() >= $deadline;
		usleep(100_000);
	}
	return ok(0, "$what (not within ${seconds}s)");
}

# The output of a query, or "ERROR: ..." when it fails: a query about
# something missing fails its assertion instead of ending the test file.
sub sql_result
{
	my ($node, $query, $db) = @_;
	my ($ret, $stdout, $stderr) = $node->psql($db // 'postgres', $query,
		on_error_stop => 1);
	return $stdout if $ret == 0;
	my ($first) = $stderr =~ /((?:ERROR|FATAL):[^\n]*)/;
	return $first // "ERROR: psql exited with $ret: $stderr";
}

# Like wait_for, with a bound of its own; an error counts as "not yet".
sub query_within
{
	my ($node, $seconds, $query, $expected, $what) = @_;
	my $last;
	my $ok = wait_within($seconds, $what,
		sub { $last = sql_result($node, $query); $last eq $expected });
	diag("last result: $last") unless $ok;
	return $ok;
}

# Whether a process exists and is not a zombie (an orphan's zombie lingers
# until whoever adopted it reaps it).
sub pid_alive
{
	my ($pid) = @_;
	open(my $fh, '<', "/proc/$pid/stat") or return 0;
	my $stat = <$fh> // '';
	close $fh;
	my ($state) = $stat =~ /\)\s+(\S)/ or return 0;
	return $state !~ /^[ZXx]$/;
}

# $count samples of a backend's row in pg_stat_activity, $interval_ms
# apart, taken by one session: hashes with xact_age (seconds, undef when no
# transaction is open), wait_event_type, wait_event, state ('gone' when the
# pid is not there) and broker_blocked (mqtx.relay_stats of that pid, as
# text; undef when there is no such column).
sub sample_activity
{
	my ($node, $pid, $count, $interval_ms) = @_;
	my $out = $node->safe_psql('postgres', qq{
		CREATE FUNCTION pg_temp.mqtx_sample(p int, n int, step float8)
		RETURNS TABLE (i int, xact_age float8, wait_type text, wait_name text,
					   backend_state text, blocked text)
		LANGUAGE plpgsql AS \$\$
		BEGIN
			FOR k IN 1 .. n LOOP
				-- a new view of the other backends, in this transaction
				PERFORM pg_stat_clear_snapshot();
				i := k;
				xact_age := NULL; wait_type := NULL; wait_name := NULL;
				backend_state := 'gone'; blocked := NULL;
				SELECT extract(epoch FROM clock_timestamp() - a.xact_start),
					   a.wait_event_type, a.wait_event, a.state
				  INTO xact_age, wait_type, wait_name, backend_state
				  FROM pg_stat_activity a WHERE a.pid = p;
				SELECT to_jsonb(s) ->> 'broker_blocked' INTO blocked
				  FROM mqtx.relay_stats s WHERE s.pid = p;
				RETURN NEXT;
				PERFORM pg_sleep(step);
			END LOOP;
		END \$\$;
		SELECT i, coalesce(xact_age::text, ''), coalesce(wait_type, ''),
			   coalesce(wait_name, ''), coalesce(backend_state, ''),
			   coalesce(blocked, '')
		FROM pg_temp.mqtx_sample($pid, $count, $interval_ms / 1000.0);
	});
	my @samples;
	for my $line (split /\n/, $out)
	{
		my @f = split /\|/, $line, -1;
		next unless @f == 6;
		push @samples, {
			i => $f[0],
			xact_age => ($f[1] eq '' ? undef : $f[1] + 0),
			wait_event_type => $f[2],
			wait_event => $f[3],
			state => $f[4],
			broker_blocked => ($f[5] eq '' ? undef : $f[5]) };
	}
	return \@samples;
}

# Memory of a process from /proc/PID/status, in kB: a hash with VmHWM,
# VmRSS, RssAnon, ...; empty when the process is gone.
sub proc_memory
{
	my ($pid) = @_;
	open(my $fh, '<', "/proc/$pid/status") or return {};
	my %m;
	while (my $line = <$fh>)
	{
		$m{$1} = $2 if $line =~ /^(\w+):\s+(\d+) kB$/;
	}
	close $fh;
	return \%m;
}

# Events of ordering keys, as an application numbers an aggregate's: a
# table of $keys counters and a procedure emit(keys int[], rounds int)
# that walks the keys it is given, rounds times, and for each key whose
# counter is below $events takes the next number under the counter's row
# lock, publishes {"k": key, "n": number} to $exchange with $routing_key
# and key 'order-<key>', and commits.  A key's numbers are then its commit
# order.
sub create_keyed_emitter
{
	my ($node, $keys, $events, $exchange, $routing_key) = @_;
	$node->safe_psql('postgres', qq{
		CREATE TABLE counters (k int PRIMARY KEY, n int NOT NULL DEFAULT 0);
		INSERT INTO counters SELECT g FROM generate_series(1, $keys) g;
		CREATE PROCEDURE emit(keys int[], rounds int) LANGUAGE plpgsql AS \$\$
		DECLARE
			key_id int;
			seq int;
		BEGIN
			FOR r IN 1 .. rounds LOOP
				FOREACH key_id IN ARRAY keys LOOP
					UPDATE counters SET n = n + 1 WHERE counters.k = key_id AND n < $events
					RETURNING n INTO seq;
					IF FOUND THEN
						PERFORM mqtx.publish('$exchange', '$routing_key',
							jsonb_build_object('k', key_id, 'n', seq),
							ordering_key => 'order-' || key_id);
					END IF;
					COMMIT;
				END LOOP;
			END LOOP;
		END
		\$\$;
	});
}

# $sessions psql sessions calling emit, each over the keys 1 .. $keys in
# its own random order, enough rounds between them for $events each
# (every session visits every key each round);
# returns them for finish_sessions.
sub start_keyed_sessions
{
	my ($node, $keys, $events, $sessions) = @_;
	my $rounds = int(($events + $sessions - 1) / $sessions);
	my @started;
	for (1 .. $sessions)
	{
		my $order = join(',', List::Util::shuffle(1 .. $keys));
		my ($out, $err) = ('', '');
		push @started, [
			IPC::Run::start(
				[ 'psql', '-X', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'),
				  '-c', "CALL emit('{$order}', $rounds)" ],
				'>', \$out, '2>', \$err),
			\$err ];
	}
	return \@started;
}

# Wait for sessions from start_keyed_sessions; returns what they wrote to
# stderr ('' when every one committed without an error).
sub finish_sessions
{
	my ($started) = @_;
	$_->[0]->finish for @$started;
	return join('', map { ${ $_->[1] } } @$started);
}

1;
