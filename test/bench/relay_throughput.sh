#!/usr/bin/env bash
# Relay throughput against its ceiling, in one run on this machine:
#   (a) ceiling: a plain rabbitmq-c publisher, persistent messages, sliding
#       window of pipelined confirms, to the same durable queue;
#   (b) relay: the mqtx relay draining N pre-filled outbox rows.
# Both runs alternate ROUNDS times against one broker; the medians and their
# ratio are printed.  A benchmark, not a test: it asserts nothing.
#
#   sudo test/bench/relay_throughput.sh [N=50000] [ROUNDS=3] [BATCH=1000] [WINDOW=1000]
#
# Needs mqtx built and installed (make && sudo make install).
set -euo pipefail

N=${1:-50000}
ROUNDS=${2:-3}
BATCH=${3:-1000}
WINDOW=${4:-1000}
BODY_SIZE=200

. "$(dirname "$0")/servers.sh"

make -s -C "$here" ceiling_publisher >/dev/null
start_servers mqtx.batch_size="$BATCH" mqtx.retention=-1

psql_ -c "CREATE EXTENSION mqtx" \
	-c "SELECT mqtx.declare_exchange('bench.ex', 'direct')" \
	-c "SELECT mqtx.declare_queue('bench.q')" \
	-c "SELECT mqtx.bind('bench.q', 'bench.ex', 'bench')" >/dev/null

purge() { "$harness/rabbitmq.sh" ctl "$work/mq" purge_queue bench.q >/dev/null; }

ceiling_run() {
	purge
	"$here/ceiling_publisher" --url "$url" --exchange bench.ex --routing-key bench \
		--count "$N" --window "$WINDOW" --body-size "$BODY_SIZE" |
		sed -n 's/.* = \([0-9.]*\) msg\/s.*/\1/p'
}

# Fill the outbox in one transaction, through mqtx.publish as an
# application would (the relay sees nothing until the commit wakes it), then
# time from the commit to the last row published.
relay_run() {
	purge
	psql_ -c "TRUNCATE mqtx.outbox" >/dev/null
	psql_ <<-SQL >/dev/null
		BEGIN;
		SELECT count(mqtx.publish('bench.ex', 'bench',
		       jsonb_build_object('order_id', g, 'pad', repeat('x', $BODY_SIZE - 40))))
		FROM generate_series(1, $N) g;
		COMMIT;
	SQL
	local t0
	t0=$(psql_ -c "SELECT extract(epoch FROM clock_timestamp())")
	until [ "$(psql_ -c "SELECT count(*) FROM mqtx.outbox WHERE status <> 'published'")" = 0 ]; do
		sleep 0.2
	done
	psql_ -c "SELECT round($N / (extract(epoch FROM max(published_at)) - $t0)::numeric, 0) FROM mqtx.outbox"
}


ceilings=()
relays=()
for round in $(seq 1 "$ROUNDS"); do
	c=$(ceiling_run)
	r=$(relay_run)
	echo "round $round: ceiling $c msg/s, relay $r msg/s" >&2
	ceilings+=("$c")
	relays+=("$r")
done

ceiling=$(printf '%s\n' "${ceilings[@]}" | median)
relay=$(printf '%s\n' "${relays[@]}" | median)
echo
echo "relay throughput, $N messages of ~$BODY_SIZE bytes, persistent, durable queue, $(nproc) cores"
printf '%-44s %10s msg/s\n' "ceiling (rabbitmq-c, window $WINDOW)" "$ceiling"
printf '%-44s %10s msg/s\n' "mqtx relay (batch_size $BATCH)" "$relay"
printf '%-44s %10s\n' "relay / ceiling" "$(awk -v r="$relay" -v c="$ceiling" 'BEGIN {printf "%.2f", r / c}')"
