# The idempotency toolkit with two sessions at once (issue 18): the
# second claim of an idempotency key waits for the first one's
# transaction, and gets its result when it commits or does the work when
# it rolls back; claims of other keys do not wait; a token consumed by two
# sessions at once is consumed once; a business key lock makes the second
# session wait, or tells it the key is taken.  One server, no broker: the toolkit is plain SQL.
use strict;
use warnings FATAL => 'all';

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

use MqtxTest::Util;

my $node = mqtx_node('idempotency', 'mqtx.relay_enabled' => 'off',
	'mqtx.consumer_enabled' => 'off');
$node->safe_psql('postgres', q{
	CREATE EXTENSION mqtx;
	CREATE TABLE work (k text, by_session text);
	-- the pattern of the README: claim, do the work, store the result
	CREATE FUNCTION handle(k text, pause float8, fail boolean) RETURNS jsonb
	LANGUAGE plpgsql AS $$
	DECLARE
		c record;
	BEGIN
		SELECT * INTO c FROM mqtx.claim_idempotency_key('payments', k);
		IF NOT c.claimed THEN
			RETURN c.result;
		END IF;
		INSERT INTO work VALUES (k, current_setting('application_name'));
		PERFORM pg_sleep(pause);
		IF fail THEN
			RAISE EXCEPTION 'the payment provider is down';
		END IF;
		PERFORM mqtx.complete_idempotency_key('payments', k,
			jsonb_build_object('paid_by', current_setting('application_name')));
		RETURN jsonb_build_object('paid_by', current_setting('application_name'));
	END $$;
});

# Start a psql session running $sql, as application $name.
sub start_session
{
	my ($name, $sql) = @_;
	my %s = (out => '', err => '');
	$s{h} = IPC::Run::start(
		[ 'psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-d',
			$node->connstr('postgres') . " application_name=$name", '-c', $sql ],
		'>', \$s{out}, '2>', \$s{err});
	return \%s;
}

sub finish_session
{
	my ($s) = @_;
	$s->{h}->finish;
	chomp $s->{out};
	return $s;
}

# Wait until session $name sleeps in its pg_sleep, holding what it took.
sub wait_sleeping
{
	my ($name) = @_;
	wait_for($node, 'postgres',
		"SELECT count(*) FROM pg_stat_activity WHERE application_name = '$name' AND wait_event = 'PgSleep'",
		'1', "session $name holds it");
}

# Run $sql as application $name; returns its output, error and seconds.
sub timed_psql
{
	my ($name, $sql) = @_;
	my $t0 = time;
	my $s = finish_session(start_session($name, $sql));
	return ($s->{out}, $s->{err}, time - $t0);
}

# --- the second claim waits, then gets the first one's result -------------
my $first = start_session('a', q{SELECT handle('key-1', 1.5, false)});
wait_sleeping('a');
my ($out, $err, $took) = timed_psql('b', q{SELECT handle('key-1', 0, false)});
finish_session($first);
is($first->{out}, '{"paid_by": "a"}', 'the first session claims the key and does the work');
is($out, '{"paid_by": "a"}', 'the second gets the first one\'s result');
ok($took >= 0.5, sprintf('after waiting for its commit (%.1f s)', $took));
is($node->safe_psql('postgres', q{SELECT string_agg(by_session, ',') FROM work WHERE k = 'key-1'}),
	'a', 'the work is done once');

# --- the first one fails: the waiting claim does the work -----------------
$first = start_session('a', q{SELECT handle('key-2', 1.5, true)});
wait_sleeping('a');
($out, $err, $took) = timed_psql('b', q{SELECT handle('key-2', 0, false)});
finish_session($first);
like($first->{err}, qr/the payment provider is down/, 'the first session fails and rolls back');
is($out, '{"paid_by": "b"}', 'the second claims the key then, and does the work');
is($node->safe_psql('postgres', q{SELECT string_agg(by_session, ',') FROM work WHERE k = 'key-2'}),
	'b', 'once: the failed attempt left nothing');
is($node->safe_psql('postgres', q{SELECT * FROM mqtx.claim_idempotency_key('payments', 'key-2')}),
	'f|{"paid_by": "b"}', 'and a third claim gets its result');

# --- claims of other keys never wait for each other -----------------------
# (each claim removes a few expired rows on the way: one a first claim is
# removing is skipped, not waited for)
$node->safe_psql('postgres', q{
	INSERT INTO mqtx.idempotency_keys (scope, key, expires_at)
	VALUES ('payments', 'expired', now() - interval '1 minute')});
$first = start_session('a', q{SELECT handle('key-3', 1.5, false)});
wait_sleeping('a');
($out, $err, $took) = timed_psql('b', q{SELECT handle('key-4', 0, false)});
finish_session($first);
is($out, '{"paid_by": "b"}', 'a claim of another key goes on');
ok($took < 1, sprintf('without waiting for the first one (%.1f s)', $took));
is($node->safe_psql('postgres', q{SELECT count(*) FROM mqtx.idempotency_keys WHERE key = 'expired'}),
	'0', 'and the expired key is gone');

# --- a token consumed by two sessions at once ------------------------------
my $token = $node->safe_psql('postgres', q{SELECT mqtx.issue_token('checkout')});
$first = start_session('a', qq{BEGIN; SELECT mqtx.consume_token('$token', 'checkout'); SELECT pg_sleep(1); COMMIT;});
wait_sleeping('a');
($out, $err, $took) = timed_psql('b', qq{SELECT mqtx.consume_token('$token', 'checkout')});
finish_session($first);
is($first->{err}, '', 'the first use of the token succeeds');
like($err, qr/mqtx token \Q$token\E was consumed already/, 'the second, concurrent one is refused');
ok($took >= 0.3, sprintf('once the first one committed (%.1f s)', $took));

# --- a business key lock -----------------------------------------------------
$first = start_session('a', q{BEGIN; SELECT mqtx.lock_key('order-42'); SELECT pg_sleep(1.5); COMMIT;});
wait_sleeping('a');
is($node->safe_psql('postgres', q{SELECT mqtx.try_lock_key('order-42'), mqtx.try_lock_key('order-43')}),
	'f|t', 'while one transaction holds a key, another cannot take it, and takes another');
($out, $err, $took) = timed_psql('b', q{SELECT mqtx.lock_key('order-42')});
finish_session($first);
is($err, '', 'lock_key waits for it');
ok($took >= 0.5, sprintf('until the holder commits (%.1f s)', $took));
is($node->safe_psql('postgres', q{SELECT mqtx.try_lock_key('order-42')}), 't',
	'and it is free after');

$node->stop;
done_testing();
