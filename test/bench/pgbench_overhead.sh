#!/usr/bin/env bash
# What the outbox trigger costs an application, in one run on this machine:
# pgbench places orders (examples/place_order.sql, one INSERT per
# transaction) into
#   (a) plain: orders_plain, the same table without the trigger;
#   (b) trigger: orders from examples/order_service.sql, whose AFTER INSERT
#       trigger mqtx.outbox_trigger() enqueues every order in the same
#       transaction, while the relay worker drains the outbox to RabbitMQ
#       (a durable queue is bound, so every message is routed and confirmed).
#   (c) trigger alone: (b) again after RabbitMQ is stopped, so the relay
#       only waits to reconnect: the trigger's own cost, without the relay
#       and the broker sharing the cores.
# (a) and (b) alternate ROUNDS times, then (a) and (c) do; the median tps
# of each and the ratios of (b) and (c) to the (a) runs they alternated
# with are printed.  PostgreSQL keeps its default durability (fsync = on,
# synchronous_commit = on): what users run.  A benchmark, not a test: it
# asserts nothing.
#
#   sudo test/bench/pgbench_overhead.sh [SECONDS=20] [CLIENTS=4] [ROUNDS=3]
#
# Every run starts from empty tables (orders, orders_plain, mqtx.outbox) and
# a checkpoint, so both pay the same full-page writes.  After each trigger run
# the script waits for the relay to drain what is left and reports that
# backlog: a relay that falls behind shows up there, not in the tps.
#
# Environment knobs:
#   BENCH_CSV=FILE   also append "benchmark,metric,value,unit" rows to FILE
#
# Needs mqtx built and installed (make && sudo make install).
set -euo pipefail

DURATION=${1:-20}
CLIENTS=${2:-4}
ROUNDS=${3:-3}

# shellcheck source=servers.sh
. "$(dirname "$0")/servers.sh"

examples=$here/../../examples

# shellcheck disable=SC2119 # no extra settings: PostgreSQL's defaults are measured
start_servers

# The order service exactly as the example sets it up, plus a queue so the
# relay's mandatory publishes are routed, plus the same table untriggered.
psql_ -f "$examples/order_service.sql" >/dev/null
psql_ -c "SELECT mqtx.declare_queue('bench.orders')" \
	-c "SELECT mqtx.bind('bench.orders', 'orders', 'order.#')" \
	-c "CREATE TABLE orders_plain (LIKE orders INCLUDING ALL)" >/dev/null
[ "$(psql_ -c "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'orders_plain'::regclass")" = 0 ]

# one INSERT per transaction: without the demo's trace context
sed -e '/-- trace$/d' -e 's/^INSERT INTO orders /INSERT INTO orders_plain /' \
	"$examples/place_order.sql" >"$work/place_order_plain.sql"
grep -q '^INSERT INTO orders_plain ' "$work/place_order_plain.sql"
sed '/-- trace$/d' "$examples/place_order.sql" >"$work/place_order.sql"
if grep -q 'set_config\|^BEGIN' "$work"/place_order*.sql; then exit 1; fi
chmod 644 "$work"/place_order*.sql

broker_up=1
purge() {
	[ "$broker_up" = 0 ] || purge_queue bench.orders
}

pending() { psql_ -c "SELECT count(*) FROM mqtx.outbox WHERE status <> 'published'"; }

# run SCRIPT: prints the tps (without initial connection time).
run() {
	psql_ -c "TRUNCATE orders, orders_plain, mqtx.outbox" -c "CHECKPOINT" >/dev/null
	purge
	pgbench_tps "$work/$1" -c "$CLIENTS" -j "$CLIENTS" -T "$DURATION"
}

# After a trigger run: how far behind the relay was, and that it catches up.
drain() {
	local left t0 i
	left=$(pending)
	t0=$(date +%s.%N)
	for ((i = 0; i < 600; i++)); do
		[ "$(pending)" = 0 ] && break
		sleep 0.1
	done
	[ "$(pending)" = 0 ] || { echo "relay did not drain the outbox in 60 s" >&2; exit 1; }
	echo "$left $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')"
}

plains=()
triggers=()
for round in $(seq 1 "$ROUNDS"); do
	p=$(run place_order_plain.sql)
	t=$(run place_order.sql)
	read -r backlog drain_s <<<"$(drain)"
	orders=$(psql_ -c "SELECT count(*) FROM orders")
	messages=$(psql_ -c "SELECT count(*) FROM mqtx.outbox WHERE status = 'published'")
	[ "$orders" = "$messages" ] ||
		{ echo "round $round: $orders orders but $messages published messages" >&2; exit 1; }
	echo "round $round: plain $p tps, trigger $t tps" \
		"(relay backlog at the end $backlog rows, drained in ${drain_s} s)" >&2
	plains+=("$p")
	triggers+=("$t")
done

# The same trigger runs with the broker stopped: the relay only waits to
# reconnect, so what is left is the trigger's own cost inside the
# application's transaction, without the relay and RabbitMQ competing for
# the same cores.
# They alternate with plain runs of their own: this VM's fsync latency
# drifts over minutes, and a ratio to the plain runs of the first phase
# would measure the drift.
"$harness/rabbitmq.sh" stop "$work/mq" >/dev/null
broker_up=0
alones=()
plains_alone=()
for round in $(seq 1 "$ROUNDS"); do
	p=$(run place_order_plain.sql)
	a=$(run place_order.sql)
	echo "round $round: plain $p tps, trigger with the broker stopped $a tps" >&2
	plains_alone+=("$p")
	alones+=("$a")
done

plain=$(median_of "${plains[@]}")
trigger=$(median_of "${triggers[@]}")
plain_alone=$(median_of "${plains_alone[@]}")
alone=$(median_of "${alones[@]}")
trigger_ratio=$(ratio "$trigger" "$plain")
ratio_alone=$(ratio "$alone" "$plain_alone")
durability=$(psql_ -c "SELECT 'fsync = ' || current_setting('fsync') ||
	', synchronous_commit = ' || current_setting('synchronous_commit')")

echo
echo "outbox trigger overhead, pgbench -M prepared -c $CLIENTS -j $CLIENTS -T $DURATION," \
	"$ROUNDS rounds (medians), $(nproc) cores"
echo "one INSERT INTO orders per transaction; $durability; relay running"
printf '%-44s %10s tps\n' "plain table (no trigger)" "$plain"
printf '%-44s %10s tps\n' "with mqtx.outbox_trigger" "$trigger"
printf '%-44s %10s\n' "trigger / plain" "$trigger_ratio"
printf '%-44s %10s tps\n' "plain, alternating with the next" "$plain_alone"
printf '%-44s %10s tps\n' "with the trigger, broker stopped" "$alone"
printf '%-44s %10s\n' "trigger without relaying / plain" "$ratio_alone"
bench_record overhead plain_tps "$plain" tps
bench_record overhead trigger_tps "$trigger" tps
bench_record overhead ratio "$trigger_ratio" ratio
bench_record overhead trigger_alone_tps "$alone" tps
bench_record overhead ratio_alone "$ratio_alone" ratio
