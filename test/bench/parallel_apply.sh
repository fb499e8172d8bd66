#!/usr/bin/env bash
# Parallel apply: the consumer's apply rate with a handler that sleeps 5 ms
# (a handler that waits on something: a lock, a remote call), applied by
# one process (workers => 1) against four apply workers (workers => 4),
# side by side in one run.  N messages over KEYS ordering keys are
# published into the queue first; then the queue is subscribed, and the
# time from the subscription to the last message applied gives the rate.
# The two alternate for ROUNDS rounds; the medians and the ratio are
# printed.  A benchmark, not a test: it asserts nothing about speed, only
# that every message was applied once and every key in order.
#
#   test/bench/parallel_apply.sh [N=2000] [ROUNDS=3] [KEYS=200]
#
# Environment knobs:
#   BENCH_CSV=FILE   also append "benchmark,metric,value,unit" rows to FILE
#
# Needs mqtx built and installed (make && make install).
set -euo pipefail

N=${1:-2000}
ROUNDS=${2:-3}
KEYS=${3:-200}
SLEEP_MS=5

# shellcheck source=servers.sh
. "$(dirname "$0")/servers.sh"

start_servers mqtx.retention=-1 mqtx.inbox_retention=-1

psql_ <<-SQL >/dev/null
	CREATE EXTENSION mqtx;
	SELECT mqtx.declare_queue('bench.apply');
	CREATE TABLE effects (seq bigserial PRIMARY KEY, k int NOT NULL, n int NOT NULL);
	CREATE FUNCTION apply_event(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS \$\$
	BEGIN
		PERFORM pg_sleep($SLEEP_MS / 1000.0);
		INSERT INTO effects (k, n) VALUES ((payload->>'k')::int, (payload->>'n')::int);
	END \$\$;
SQL

# fill the queue with N messages, KEYS keys, each key's events in order
fill_queue() {
	purge_queue bench.apply
	psql_ -c "TRUNCATE mqtx.outbox" >/dev/null
	psql_ <<-SQL >/dev/null
		SELECT count(mqtx.publish('', 'bench.apply', jsonb_build_object('k', g % $KEYS, 'n', g / $KEYS),
		                          ordering_key => (g % $KEYS)::text))
		FROM generate_series(0, $N - 1) g;
	SQL
	outbox_wait_drained
}

# apply_run WORKERS: msg/s from subscribing to the last message applied
apply_run() {
	local workers=$1 t0 rate
	psql_ -c "TRUNCATE effects, mqtx.inbox" >/dev/null
	t0=$(psql_ -c "SELECT extract(epoch FROM clock_timestamp())")
	psql_ -c "SELECT mqtx.subscribe('bench.apply', 'apply_event(jsonb,jsonb)', workers => $workers)" >/dev/null
	psql_ -c "SET statement_timeout = '10min'" -c "
		DO \$\$ BEGIN
			WHILE (SELECT count(*) FROM mqtx.inbox) < $N LOOP
				COMMIT;
				PERFORM pg_sleep(0.02);
			END LOOP;
		END \$\$" >/dev/null
	rate=$(psql_ -c "SELECT round($N / (extract(epoch FROM max(applied_at)) - $t0)::numeric, 0) FROM mqtx.inbox")
	psql_ -c "SELECT mqtx.unsubscribe('bench.apply')" >/dev/null
	[ "$(psql_ -c "SELECT count(*) FROM effects")" = "$N" ] ||
		{ echo "workers $workers: not every message was applied exactly once" >&2; exit 1; }
	[ "$(psql_ -c "SELECT count(*) FROM (SELECT k, array_agg(n ORDER BY seq) a FROM effects GROUP BY k) e
	               WHERE a <> ARRAY(SELECT generate_series(0, count(*)::int - 1) FROM effects f WHERE f.k = e.k)")" = 0 ] ||
		{ echo "workers $workers: a key was applied out of order" >&2; exit 1; }
	echo "$rate"
}

declare -A rates
for round in $(seq 1 "$ROUNDS"); do
	for workers in 1 4; do
		fill_queue
		r=$(apply_run "$workers")
		echo "round $round: workers $workers: $r msg/s" >&2
		rates[$workers]+="$r "
	done
done

# shellcheck disable=SC2086 # the lists are plain numbers
{
	one=$(median_of ${rates[1]})
	four=$(median_of ${rates[4]})
}
echo
echo "handler sleeping $SLEEP_MS ms, $N messages over $KEYS ordering keys," \
	"$ROUNDS rounds (medians), $(nproc) cores"
printf '%-40s %10s msg/s\n' "workers => 1" "$one"
printf '%-40s %10s msg/s\n' "workers => 4" "$four"
printf '%-40s %10s\n' "speed-up, 4 workers / 1" "$(ratio "$four" "$one")"
bench_record parallel_apply workers1_msgs "$one" msg/s
bench_record parallel_apply workers4_msgs "$four" msg/s
