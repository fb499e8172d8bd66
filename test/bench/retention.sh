#!/usr/bin/env bash
# Retention, in one run on this machine:
#   1. what one retention pass costs with KEEP published rows that it keeps
#      (none past retention: an idle pass) and when it deletes a batch of
#      1,000 of them: the relay's retention statement (src/relay.c's
#      retention_sql, read from the source) against 0.3.0's, which walked
#      the primary key, side by side on the same table, in a session with
#      the relay's planner settings (EXPLAIN ANALYZE execution times,
#      median of 5);
#   2. a soak: orders placed at RATE per second for SECONDS (pgbench -R,
#      examples/place_order.sql, outbox trigger), relayed to RabbitMQ and
#      consumed back into the same database by a subscription, with
#      mqtx.retention and mqtx.inbox_retention at RETENTION seconds.  Every
#      10 s the on-disk size of mqtx.outbox and mqtx.inbox (with indexes
#      and TOAST) and their live rows are sampled; the curve goes to
#      $BENCH_DIR/retention_soak.csv and, with gnuplot, retention_soak.png.
#      Levelled off means the last third of the run grew the tables by
#      less than a tenth of their size at two thirds.
# A benchmark, not a test: it asserts only that nothing was lost.
#
#   sudo test/bench/retention.sh [SECONDS=600] [RATE=2000] [RETENTION=60] [KEEP=1000000]
#
# Environment knobs:
#   BENCH_CSV=FILE   also append "benchmark,metric,value,unit" rows to FILE
#   BENCH_DIR=DIR    where the curve goes (default: the temporary directory,
#                    removed at the end, so nothing is kept)
#
# Needs mqtx built and installed (make && sudo make install).
set -euo pipefail

SECONDS_=${1:-600}
RATE=${2:-2000}
RETENTION=${3:-60}
KEEP=${4:-1000000}

# shellcheck source=servers.sh
. "$(dirname "$0")/servers.sh"

examples=$here/../../examples
out=${BENCH_DIR:-$work}

# ---- 1. one pass, kept history ---------------------------------------------

# retention off until the soak: the workers' own passes stay out of part 1
start_servers mqtx.retention=-1 mqtx.inbox_retention=-1
psql_ -f "$examples/order_service.sql" >/dev/null

# the relay's statement, as the C source has it ($1 and $2 are its
# parameters, replaced by this pass's values)
# shellcheck disable=SC2016 # $1 and $2 are the statement's, not the shell's
new_sql=$(sed -n '/^static const char \*const retention_sql =/,/;$/p' "$here/../../src/relay.c" |
	sed '1d; s/^"//; s/"[;]*$//' | tr -d '\n' | sed 's/\$1/60/; s/\$2/1000/')
old_sql="DELETE FROM mqtx.outbox WHERE id IN (SELECT id FROM mqtx.outbox WHERE status = 'published' AND published_at < pg_catalog.now() - pg_catalog.make_interval(secs => 60) ORDER BY id LIMIT 1000)"
case $new_sql in DELETE*) ;; *) echo "could not read retention_sql from src/relay.c" >&2; exit 1 ;; esac

psql_ -c "INSERT INTO mqtx.outbox (exchange, routing_key, payload, status, published_at)
	SELECT 'orders', 'order.created', jsonb_build_object('order_id', g), 'published', now()
	FROM generate_series(1, $KEEP) g" -c "VACUUM ANALYZE mqtx.outbox" >/dev/null

# pass_ms SQL: median execution time of 5 EXPLAIN ANALYZE runs of SQL, each
# rolled back, with the relay's planner settings.
pass_ms() {
	for _ in 1 2 3 4 5; do
		psql_ -c "SET enable_seqscan = off" -c "SET enable_bitmapscan = off" \
			-c "SET enable_sort = off" -c "SET jit = off" -c "BEGIN" \
			-c "EXPLAIN (ANALYZE, COSTS OFF) $1" -c "ROLLBACK" |
			sed -n 's/^Execution Time: \([0-9.]*\) ms/\1/p'
	done | median
}

idle_new=$(pass_ms "$new_sql")
idle_old=$(pass_ms "$old_sql")
# 1,000 of the rows past retention: the oldest, as retention leaves them
psql_ -c "UPDATE mqtx.outbox SET published_at = now() - interval '1 hour' WHERE id <= 1000" \
	-c "VACUUM ANALYZE mqtx.outbox" >/dev/null
batch_new=$(pass_ms "$new_sql")
batch_old=$(pass_ms "$old_sql")
psql_ -c "TRUNCATE mqtx.outbox" >/dev/null

echo "retention pass with $KEEP published rows kept (EXPLAIN ANALYZE, median of 5):"
printf '  %-40s %10s ms  (0.3.0: %s ms, %sx)\n' "idle (nothing past retention)" \
	"$idle_new" "$idle_old" "$(ratio "$idle_old" "$idle_new" 1)"
printf '  %-40s %10s ms  (0.3.0: %s ms, %sx)\n' "deleting 1,000 rows" \
	"$batch_new" "$batch_old" "$(ratio "$batch_old" "$batch_new" 1)"
bench_record retention idle_pass_ms "$idle_new" ms
bench_record retention idle_pass_0_3_ms "$idle_old" ms
bench_record retention batch_pass_ms "$batch_new" ms
bench_record retention batch_pass_0_3_ms "$batch_old" ms

# ---- 2. the soak -------------------------------------------------------------

psql_ -c "ALTER SYSTEM SET mqtx.retention = $RETENTION" \
	-c "ALTER SYSTEM SET mqtx.inbox_retention = $RETENTION" -c "SELECT pg_reload_conf()" >/dev/null
psql_ >/dev/null <<'SQL'
SELECT mqtx.declare_queue('soak.orders');
SELECT mqtx.bind('soak.orders', 'orders', 'order.#');
CREATE FUNCTION soak_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE sql AS 'SELECT';
SELECT mqtx.subscribe('soak.orders', 'soak_handler(jsonb,jsonb)', 1000);
SQL
cp "$examples/place_order.sql" "$work/place_order.sql"
chmod 644 "$work/place_order.sql"

sample() {
	psql_ -F, -c "SELECT $1,
		round(pg_total_relation_size('mqtx.outbox') / 1048576.0, 1),
		round(pg_total_relation_size('mqtx.inbox') / 1048576.0, 1),
		(SELECT n_live_tup FROM pg_stat_user_tables WHERE relid = 'mqtx.outbox'::regclass),
		(SELECT n_live_tup FROM pg_stat_user_tables WHERE relid = 'mqtx.inbox'::regclass),
		(SELECT count(*) FROM mqtx.outbox WHERE status = 'pending')"
}

csv=$out/retention_soak.csv
echo "seconds,outbox_mb,inbox_mb,outbox_rows,inbox_rows,pending" >"$csv"
pgbench_tps "$work/place_order.sql" -c 4 -j 2 -R "$RATE" -T "$SECONDS_" >"$work/soak_tps" &
pgbench_pid=$!
t0=$(date +%s)
while kill -0 "$pgbench_pid" 2>/dev/null; do
	sample $(($(date +%s) - t0)) >>"$csv"
	sleep 10
done
wait "$pgbench_pid" || exit 1
sample $(($(date +%s) - t0)) >>"$csv"

# nothing lost: every order was relayed, and applied once
orders=$(psql_ -c "SELECT count(*) FROM orders")
outbox_wait_drained
for _ in $(seq 1 600); do
	applied=$(psql_ -c "SELECT coalesce(sum(applied), 0) FROM mqtx.consumer_stats")
	[ "$applied" -ge "$orders" ] && break
	sleep 0.5
done
failed=$(psql_ -c "SELECT count(*) FROM mqtx.outbox WHERE status = 'failed'")
if [ "$applied" != "$orders" ] || [ "$failed" != 0 ]; then
	echo "soak: $orders orders, $applied applied, $failed failed" >&2
	exit 1
fi

tps=$(<"$work/soak_tps")
summary=$(awk -F, -v n="$SECONDS_" 'NR > 1 {
		t = $1; o[NR] = $2; i[NR] = $3; s[NR] = t; last = NR }
	END {
		for (r = 2; r <= last; r++) {
			if (s[r] <= n / 3) a = r
			if (s[r] <= 2 * n / 3) b = r
		}
		printf "%s %s %s %s %s %s", o[a], o[b], o[last], i[a], i[b], i[last]
	}' "$csv")
read -r o1 o2 o3 i1 i2 i3 <<<"$summary"
levelled() { awk -v b="$1" -v c="$2" 'BEGIN {print (c - b < 0.1 * b) ? "yes" : "no"}'; }

echo
echo "retention soak: $tps orders/s for $SECONDS_ s (target $RATE), mqtx.retention ="\
	"mqtx.inbox_retention = $RETENTION s, relay and consumer running, $(nproc) cores"
echo "$orders orders, all relayed and applied once"
printf '%-14s %10s %10s %10s %10s\n' "MB on disk" "at 1/3" "at 2/3" "end" "levelled"
printf '%-14s %10s %10s %10s %10s\n' "mqtx.outbox" "$o1" "$o2" "$o3" "$(levelled "$o2" "$o3")"
printf '%-14s %10s %10s %10s %10s\n' "mqtx.inbox" "$i1" "$i2" "$i3" "$(levelled "$i2" "$i3")"
echo "curve: $csv"
bench_record retention soak_outbox_mb_two_thirds "$o2" MB
bench_record retention soak_outbox_mb_end "$o3" MB
bench_record retention soak_inbox_mb_two_thirds "$i2" MB
bench_record retention soak_inbox_mb_end "$i3" MB

if command -v gnuplot >/dev/null 2>&1; then
	gnuplot <<-GP
		set terminal png size 900,500
		set output "$out/retention_soak.png"
		set datafile separator ","
		set key autotitle columnhead left top
		set xlabel "seconds"
		set ylabel "MB on disk (table, indexes, TOAST)"
		set title "mqtx retention soak: $RATE orders/s, retention $RETENTION s"
		plot "$csv" using 1:2 with lines lw 2 title "mqtx.outbox", \
		     "$csv" using 1:3 with lines lw 2 title "mqtx.inbox"
	GP
	echo "plot: $out/retention_soak.png"
fi
