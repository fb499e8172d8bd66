#!/usr/bin/env bash
# End-to-end latency of the order -> dispatch demo, and the highest rate it
# sustains, on this machine: one RabbitMQ node and two PostgreSQL clusters,
#   order cluster     database shop, examples/order_service.sql (orders +
#                     outbox trigger), the relay worker;
#   dispatch cluster  database dispatch, examples/dispatch_service.sql
#                     (dispatch_order handler on queue dispatch.orders,
#                     prefetch 500), the consumer worker.
# pgbench offers orders at a fixed rate (examples/place_order.sql, --rate R,
# -T SECONDS, CLIENTS clients).  A benchmark, not a test: it asserts nothing.
#
#   sudo test/bench/end_to_end.sh [RATES=1000,2000,4000,8000,16000] [SECONDS=20]
#   sudo test/bench/end_to_end.sh [--rates RATES] [--seconds SECONDS]
#
#   RATES     offered rates (orders/s), comma- or space-separated in one
#             argument, tried in increasing order; the step-up stops after
#             the first rate that is not sustained.  The first is the
#             reference rate reported on its own (targets: p50 < 10 ms,
#             p99 < 50 ms at 1000/s)
#   SECONDS   how long pgbench offers each rate
#
# Latency of an order: from the commit of its row on the order cluster,
# pg_xact_commit_timestamp(orders.xmin), to the commit of its dispatch row
# on the dispatch cluster, pg_xact_commit_timestamp(dispatch.xmin); both
# clusters run with track_commit_timestamp = on, on one machine clock.
# Orders committed in the first WARMUP seconds of a run are left out of
# every figure (connections, caches, the first batches).
#
# Per run, over the orders after the warm-up (the "window"):
#   achieved   orders in the window / time from their first to last commit
#   dispatch   the same orders / time from their first to last dispatch
#              commit: the rate at which the consumer kept up
#   p50, p95, p99, max   order commit -> dispatch commit, ms
# Each rate runs ROUNDS times; the figures printed are the medians.
#
# A rate R is SUSTAINED when, in the medians,
#   achieved >= 95% of R              (pgbench managed to offer it),
#   dispatch >= 95% of achieved       (no backlog building up), and
#   p99 <= P99_BOUND_MS               (latency stays bounded).
# The step-up stops at the first rate not sustained and then tries once
# halfway between it and the last sustained rate; the maximum sustained rate
# is the highest sustained rate tried (a lower bound, to within that step).
# Where pgbench cannot offer a rate (the order side is the limit, not the
# pipeline), "kept up" still reports the highest achieved order rate whose
# dispatch rate was >= 95% of it with p99 <= P99_BOUND_MS.
#
# Environment knobs:
#   ROUNDS=3          runs per rate
#   CLIENTS=8         pgbench clients (-c), over JOBS=2 threads (-j)
#   WARMUP=2          seconds left out at the start of each run
#   P99_BOUND_MS=500  p99 bound of a sustained rate
#   BENCH_CSV=FILE    append rows "benchmark,metric,value,unit" to FILE:
#                     e2e,rate / p50_ms / p95_ms / p99_ms / max_ms at the
#                     reference rate, e2e,max_sustained,
#                     e2e,max_kept_up, and per offered
#                     rate R e2e,{achieved,dispatch}_rate_at_R,
#                     e2e,{p50,p95,p99,max}_ms_at_R, e2e,sustained_at_R
#   BENCH_DIR=DIR     write DIR/e2e_rates.csv, one row per offered rate
#                     after a header: offered,achieved,p50_ms,p95_ms,p99_ms,
#                     dispatch,max_ms,sustained (for gnuplot: skip 1)
#   BREAKDOWN=1       print, per run, where the time goes (see breakdown())
#
# Needs mqtx built and installed (make && sudo make install).
set -euo pipefail

RATES=1000,2000,4000,8000,16000
SECONDS_=20
positional=()
while [ $# -gt 0 ]; do
	case $1 in
	--rates) RATES=$2; shift ;;
	--seconds) SECONDS_=$2; shift ;;
	-*) sed -n 's/^#   sudo /usage: /p' "$0" >&2; exit 2 ;;
	*) positional+=("$1") ;;
	esac
	shift
done
[ ${#positional[@]} -lt 1 ] || RATES=${positional[0]}
[ ${#positional[@]} -lt 2 ] || SECONDS_=${positional[1]}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-8}
JOBS=${JOBS:-2}
WARMUP=${WARMUP:-2}
P99_BOUND_MS=${P99_BOUND_MS:-500}
BENCH_DIR=${BENCH_DIR:-}
DRAIN_STALL=${DRAIN_STALL:-30} # seconds without a new dispatch before a run gives up

read -r -a rates <<<"$(tr ',' ' ' <<<"$RATES" | tr ' ' '\n' | grep . | sort -n | tr '\n' ' ')"
for r in "${rates[@]}" "$SECONDS_" "$ROUNDS" "$CLIENTS" "$WARMUP"; do
	if ! [[ $r =~ ^[0-9]+$ ]] || [ "$r" -eq 0 ]; then
		echo "usage: $0 [RATES=1000,2000,...] [SECONDS=20] (positive integers)" >&2
		exit 2
	fi
done
[ "$WARMUP" -lt "$SECONDS_" ] || { echo "WARMUP must be shorter than SECONDS" >&2; exit 2; }

# shellcheck source=servers.sh
. "$(dirname "$0")/servers.sh"
examples=$here/../../examples

order_psql() { "$harness/pgcluster.sh" psql "$work/order" -X -q -At -v ON_ERROR_STOP=1 -d shop "$@"; }
dispatch_psql() { "$harness/pgcluster.sh" psql "$work/dispatch" -X -q -At -v ON_ERROR_STOP=1 -d dispatch "$@"; }

# start_cluster NAME DB PORT SETTINGS...: create DB first (the workers
# connect to it at start), then restart with mqtx preloaded.
start_cluster() {
	local dir=$work/$1 db=$2 port=$3
	shift 3
	"$harness/pgcluster.sh" start "$dir" "$port" >/dev/null
	"$harness/pgcluster.sh" psql "$dir" -X -q -c "CREATE DATABASE $db" >/dev/null
	"$harness/pgcluster.sh" stop "$dir"
	"$harness/pgcluster.sh" start "$dir" "$port" \
		shared_preload_libraries=mqtx mqtx.database="$db" mqtx.broker_url="$url" \
		track_commit_timestamp=on max_connections=$((CLIENTS + 40)) "$@" >/dev/null
}

amqp_port=$("$harness/rabbitmq.sh" start "$work/mq" | sed -n 's/^AMQP_PORT=//p')
url="amqp://guest:guest@127.0.0.1:$amqp_port/%2f"
read -r order_port dispatch_port <<<"$(free_ports 2)"
start_cluster order shop "$order_port" mqtx.consumer_enabled=off
start_cluster dispatch dispatch "$dispatch_port" mqtx.relay_enabled=off

# The example files stay as they are; the postgres user reads copies.
# One way only: one INSERT per order (without the demo's trace
# context), and no answer back (the dispatch cluster has no relay here, so
# its announcements would only pile up in its outbox).
cp "$examples/order_service.sql" "$examples/dispatch_service.sql" "$work/"
sed '/-- trace$/d' "$examples/place_order.sql" >"$work/place_order.sql"
chmod 644 "$work"/*.sql
order_psql -f "$work/order_service.sql" >/dev/null
dispatch_psql -f "$work/dispatch_service.sql" >/dev/null
dispatch_psql -c "ALTER TABLE dispatch DISABLE TRIGGER dispatch_outbox" >/dev/null
dispatch_psql -c "CREATE TABLE e2e_orders (order_id bigint PRIMARY KEY, committed timestamptz NOT NULL)"

# wait_dispatched N: until N dispatch rows exist; fails when none is added
# for DRAIN_STALL seconds.
wait_dispatched() {
	local n=$1 have last=-1 since=$SECONDS
	while :; do
		have=$(dispatch_psql -c "SELECT count(*) FROM dispatch")
		[ "$have" -lt "$n" ] || return 0
		if [ "$have" != "$last" ]; then
			last=$have
			since=$SECONDS
		elif [ $((SECONDS - since)) -ge "$DRAIN_STALL" ]; then
			echo "only $have of $n orders dispatched, none for ${DRAIN_STALL}s:" >&2
			order_psql -c "SELECT status, count(*) FROM mqtx.outbox GROUP BY 1" >&2
			dispatch_psql -c "SELECT * FROM mqtx.consumer_stats" \
				-c "SELECT id, message_id, error_message FROM mqtx.dead_letter LIMIT 5" >&2
			return 1
		fi
		sleep 0.2
	done
}

reset_tables() {
	order_psql -c "TRUNCATE orders, mqtx.outbox" -c "CHECKPOINT" >/dev/null
	dispatch_psql -c "TRUNCATE dispatch, mqtx.inbox, e2e_orders" -c "CHECKPOINT" >/dev/null
}

# The consumer subscribes when it notices the subscription; one order
# through the whole path before any timing.
i=0
until [ "$(consumers_on dispatch.orders)" = 1 ]; do
	i=$((i + 1))
	[ $i -lt 120 ] || { echo "the consumer never subscribed to dispatch.orders" >&2; exit 1; }
	sleep 0.5
done
order_psql -c "INSERT INTO orders (user_id, content) VALUES (1, '{\"city\": \"Berlin\"}')"
DRAIN_STALL=20 wait_dispatched 1

# BREAKDOWN=1: where the time goes, p50/p99 in ms of the orders after the
# warm-up, to stderr.  relay: order commit -> outbox published_at (the
# start of the relay pass after the one that sent it: an upper bound);
# to_consumer: order commit -> inbox applied_at (the start of the consumer's
# batch transaction); apply: applied_at -> dispatch commit.
breakdown() {
	dispatch_psql -c "SET client_min_messages = warning" -c "CREATE TABLE IF NOT EXISTS e2e_outbox (order_id bigint, message_id text, committed timestamptz, published timestamptz)" \
		-c "TRUNCATE e2e_outbox"
	order_psql -c "COPY (SELECT (o.payload->>'order_id')::bigint, o.message_id, pg_xact_commit_timestamp(r.xmin), o.published_at FROM mqtx.outbox o JOIN orders r ON r.order_id = (o.payload->>'order_id')::bigint) TO STDOUT" |
		dispatch_psql -c "COPY e2e_outbox FROM STDIN"
	dispatch_psql -F ' ' >&2 <<-SQL
		WITH w AS (
			SELECT extract(epoch FROM x.published - x.committed) * 1000 AS relay,
			       extract(epoch FROM i.applied_at - x.committed) * 1000 AS to_consumer,
			       extract(epoch FROM pg_xact_commit_timestamp(d.xmin) - i.applied_at) * 1000 AS apply
			FROM e2e_outbox x JOIN mqtx.inbox i ON i.message_id = x.message_id
			JOIN dispatch d ON d.order_id = x.order_id
			WHERE x.committed >= (SELECT min(committed) FROM e2e_outbox) + make_interval(secs => $WARMUP)
		)
		SELECT 'breakdown p50/p99 ms: relay', round(percentile_cont(0.5) WITHIN GROUP (ORDER BY relay)::numeric, 1),
		       round(percentile_cont(0.99) WITHIN GROUP (ORDER BY relay)::numeric, 1),
		       'to_consumer', round(percentile_cont(0.5) WITHIN GROUP (ORDER BY to_consumer)::numeric, 1),
		       round(percentile_cont(0.99) WITHIN GROUP (ORDER BY to_consumer)::numeric, 1),
		       'apply', round(percentile_cont(0.5) WITHIN GROUP (ORDER BY apply)::numeric, 1),
		       round(percentile_cont(0.99) WITHIN GROUP (ORDER BY apply)::numeric, 1),
		       'batch', (SELECT round(avg(n), 1) FROM (SELECT count(*) n FROM mqtx.inbox GROUP BY applied_at) b)
		FROM w
	SQL
}

# run RATE: one run; prints "achieved dispatch p50 p95 p99 max pgbench_tps".
run() {
	local rate=$1 out tps n
	reset_tables
	out=$(cd "$work" && runuser -u postgres -- "$PGBIN/pgbench" -n -h "$work/order" \
		-p "$(<"$work/order/port")" -U postgres -c "$CLIENTS" -j "$JOBS" \
		--rate "$rate" -T "$SECONDS_" -f place_order.sql shop 2>&1) || {
		echo "$out" >&2
		return 1
	}
	tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out" | head -n 1)
	n=$(order_psql -c "SELECT count(*) FROM orders")
	wait_dispatched "$n" || return 1
	order_psql -c "COPY (SELECT order_id, pg_xact_commit_timestamp(xmin) FROM orders) TO STDOUT" |
		dispatch_psql -c "COPY e2e_orders FROM STDIN"
	[ -z "${BREAKDOWN:-}" ] || breakdown
	dispatch_psql -F ' ' <<-SQL
		WITH w AS (
			SELECT o.committed AS oc, pg_xact_commit_timestamp(d.xmin) AS dc
			FROM e2e_orders o JOIN dispatch d USING (order_id)
			WHERE o.committed >= (SELECT min(committed) FROM e2e_orders)
			                     + make_interval(secs => $WARMUP)
		), l AS (
			SELECT oc, dc, extract(epoch FROM dc - oc) * 1000 AS ms FROM w
		)
		SELECT round(count(*) / extract(epoch FROM max(oc) - min(oc))::numeric, 0),
		       round(count(*) / extract(epoch FROM max(dc) - min(dc))::numeric, 0),
		       round(percentile_cont(0.50) WITHIN GROUP (ORDER BY ms)::numeric, 2),
		       round(percentile_cont(0.95) WITHIN GROUP (ORDER BY ms)::numeric, 2),
		       round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 2),
		       round(max(ms)::numeric, 2),
		       round(${tps:-0}::numeric, 0)
		FROM l
	SQL
}

if [ -n "$BENCH_DIR" ]; then
	mkdir -p "$BENCH_DIR"
	echo "offered,achieved,p50_ms,p95_ms,p99_ms,dispatch,max_ms,sustained" >"$BENCH_DIR/e2e_rates.csv"
fi

echo "end to end, order commit -> dispatch commit; $CLIENTS pgbench clients," \
	"${SECONDS_}s per run (first ${WARMUP}s left out), $ROUNDS runs per rate," \
	"medians; $(nproc) cores" >&2
# measure RATE: ROUNDS runs at RATE; their medians go to the table and the
# CSV files, and $sustained says whether RATE was sustained.
table=()
rows=()
measure() {
	local rate=$1 round res cols=() med=() k m name v unit
	local achieved dispatch p50 p95 p99 max
	for round in $(seq 1 "$ROUNDS"); do
		if ! res=$(run "$rate"); then
			res="0 0 0 0 0 0 0"
			echo "rate $rate round $round: did not drain" >&2
		fi
		echo "rate $rate round $round: achieved dispatch p50 p95 p99 max pgbench_tps = $res" >&2
		cols+=("$res")
	done
	for k in 1 2 3 4 5 6; do
		med+=("$(printf '%s\n' "${cols[@]}" | awk -v k=$k '{print $k}' | median)")
	done
	read -r achieved dispatch p50 p95 p99 max <<<"${med[*]}"
	sustained=$(awk -v r="$rate" -v a="$achieved" -v d="$dispatch" -v p="$p99" -v b="$P99_BOUND_MS" \
		'BEGIN {print (a >= 0.95 * r && d >= 0.95 * a && a > 0 && p <= b) ? "yes" : "no"}')
	table+=("$(printf '%8s %9s %9s %9s %9s %9s %9s   %s' "$rate" "$achieved" "$dispatch" \
		"$p50" "$p95" "$p99" "$max" "$sustained")")
	rows+=("$rate,$achieved,$p50,$p95,$p99,$dispatch,$max,$sustained")
	for m in achieved_rate:$achieved:orders/s dispatch_rate:$dispatch:orders/s \
		p50_ms:$p50:ms p95_ms:$p95:ms p99_ms:$p99:ms max_ms:$max:ms; do
		IFS=: read -r name v unit <<<"$m"
		bench_record e2e "${name}_at_$rate" "$v" "$unit"
	done
	bench_record e2e "sustained_at_$rate" "$([ "$sustained" = yes ] && echo 1 || echo 0)" bool
	# what the pipeline kept up with, whatever pgbench managed to offer
	kept_up=$(awk -v a="$achieved" -v d="$dispatch" -v p="$p99" -v b="$P99_BOUND_MS" -v k="$kept_up" \
		'BEGIN {print (d >= 0.95 * a && p <= b && a > k) ? a : k}')
	if [ "$rate" = "${rates[0]}" ]; then
		bench_record e2e rate "$rate" orders/s
		bench_record e2e p50_ms "$p50" ms
		bench_record e2e p95_ms "$p95" ms
		bench_record e2e p99_ms "$p99" ms
		bench_record e2e max_ms "$max" ms
	fi
}

# Step up; past the first rate not sustained, try once halfway between it
# and the last sustained one (rounded to 100/s).
max_sustained=0
kept_up=0
for rate in "${rates[@]}"; do
	measure "$rate"
	if [ "$sustained" != yes ]; then
		# shellcheck disable=SC2017 # rounded down to 100/s on purpose
		mid=$(((max_sustained + rate) / 200 * 100))
		if [ "$max_sustained" -gt 0 ] && [ "$mid" -gt "$max_sustained" ]; then
			measure "$mid"
			[ "$sustained" != yes ] || max_sustained=$mid
		fi
		break
	fi
	max_sustained=$rate
done
bench_record e2e max_sustained "$max_sustained" orders/s
bench_record e2e max_kept_up "$kept_up" orders/s

echo
echo "end to end: order commit -> dispatch commit (ms), medians of $ROUNDS runs of ${SECONDS_}s" \
	"(first ${WARMUP}s left out), $CLIENTS pgbench clients, $(nproc) cores"
printf '%8s %9s %9s %9s %9s %9s %9s   %s\n' offered achieved dispatch p50 p95 p99 max sustained
printf '%s\n' "${table[@]}" | sort -n
echo "sustained: achieved >= 95% of offered, dispatch >= 95% of achieved, p99 <= ${P99_BOUND_MS} ms"
echo "maximum sustained rate: $max_sustained orders/s"
echo "highest achieved order rate dispatched at that pace (p99 <= ${P99_BOUND_MS} ms): $kept_up orders/s"
[ -z "$BENCH_DIR" ] || printf '%s\n' "${rows[@]}" | sort -n -t, -k1,1 >>"$BENCH_DIR/e2e_rates.csv"

