#!/usr/bin/env bash
# Relay throughput against its ceiling and against the classic design, in
# one run on this machine:
#   (a) ceiling: a plain rabbitmq-c publisher, persistent messages, sliding
#       window of pipelined confirms, to the same durable queue;
#   (b) relay: the mqtx relay draining N pre-filled outbox rows;
#   (c) per-row: perrow_relay, the hand-written relay most outboxes start
#       as (one row per transaction, one synchronous confirm per message, C,
#       prepared statements), draining N/10 pre-filled rows of another
#       database's outbox: slow, and msg/s is what is compared.
# The three alternate ROUNDS times against one broker; the medians and the
# ratios relay/ceiling and relay/per-row are printed.  A benchmark, not a
# test: it asserts nothing.
#
#   sudo test/bench/relay_throughput.sh [N=50000] [ROUNDS=3] [BATCH=1000] [WINDOW=1000]
#
# The per-row relay works in database "perrow", which is not in
# mqtx.database, so the mqtx relay never sees its rows (mqtx.relay_enabled
# can only change with a restart) and sits idle while it runs.  It commits
# with synchronous_commit = off, as the mqtx relay does; PERROW_SYNC_COMMIT=1
# keeps it on instead.
#
# Environment knobs:
#   BENCH_CSV=FILE        also append "benchmark,metric,value,unit" rows to FILE
#   PERROW_SYNC_COMMIT=1  the per-row relay commits synchronously
#
# Needs mqtx built and installed (make && sudo make install).
set -euo pipefail

N=${1:-50000}
ROUNDS=${2:-3}
BATCH=${3:-1000}
WINDOW=${4:-1000}
BODY_SIZE=200
PERROW_N=$(((N + 9) / 10))
PERROW_SYNC_COMMIT=${PERROW_SYNC_COMMIT:-0}

# shellcheck source=servers.sh
. "$(dirname "$0")/servers.sh"

make -s -C "$here" ceiling_publisher perrow_relay >/dev/null
start_servers mqtx.batch_size="$BATCH" mqtx.retention=-1

psql_ -c "CREATE EXTENSION mqtx" \
	-c "SELECT mqtx.declare_exchange('bench.ex', 'direct')" \
	-c "SELECT mqtx.declare_queue('bench.q')" \
	-c "SELECT mqtx.bind('bench.q', 'bench.ex', 'bench')" >/dev/null
psql_ -c "CREATE DATABASE perrow" >/dev/null
psql_ -d perrow -c "CREATE EXTENSION mqtx" >/dev/null
perrow_dsn="host=$work/pg port=$(<"$work/pg/port") user=postgres dbname=perrow"
perrow_flags=()
[ "$PERROW_SYNC_COMMIT" = 0 ] || perrow_flags=(--sync-commit)

ceiling_run() {
	purge_queue bench.q
	"$here/ceiling_publisher" --url "$url" --exchange bench.ex --routing-key bench \
		--count "$N" --window "$WINDOW" --body-size "$BODY_SIZE" | msg_rate
}

# Fill the outbox in one transaction, through mqtx.publish as an
# application would (the relay sees nothing until the commit wakes it), then
# time from the commit to the last row published.
relay_run() {
	purge_queue bench.q
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
	outbox_wait_drained
	[ "$(psql_ -c "SELECT count(*) FROM mqtx.outbox WHERE status <> 'published'")" = 0 ] ||
		{ echo "the relay left rows unpublished" >&2; exit 1; }
	psql_ -c "SELECT round($N / (extract(epoch FROM max(published_at)) - $t0)::numeric, 0) FROM mqtx.outbox"
}

# The same fill in database perrow, then perrow_relay drains it.
perrow_run() {
	purge_queue bench.q
	psql_ -d perrow <<-SQL >/dev/null
		TRUNCATE mqtx.outbox;
		SELECT count(mqtx.publish('bench.ex', 'bench',
		       jsonb_build_object('order_id', g, 'pad', repeat('x', $BODY_SIZE - 40))))
		FROM generate_series(1, $PERROW_N) g;
	SQL
	local out
	out=$("$here/perrow_relay" --dsn "$perrow_dsn" --url "$url" ${perrow_flags[@]+"${perrow_flags[@]}"})
	[ "$(psql_ -d perrow -c "SELECT count(*) FROM mqtx.outbox WHERE status <> 'published'")" = 0 ] ||
		{ echo "perrow_relay left rows unpublished: $out" >&2; exit 1; }
	msg_rate <<<"$out"
}


ceilings=()
relays=()
perrows=()
for round in $(seq 1 "$ROUNDS"); do
	c=$(ceiling_run)
	r=$(relay_run)
	p=$(perrow_run)
	echo "round $round: ceiling $c msg/s, relay $r msg/s, per-row $p msg/s" >&2
	ceilings+=("$c")
	relays+=("$r")
	perrows+=("$p")
done

ceiling=$(median_of "${ceilings[@]}")
relay=$(median_of "${relays[@]}")
perrow=$(median_of "${perrows[@]}")
[ "$PERROW_SYNC_COMMIT" = 0 ] && perrow_commit=off || perrow_commit=on
echo
echo "relay throughput, ~$BODY_SIZE-byte messages, persistent, durable queue," \
	"$ROUNDS rounds (medians), $(nproc) cores"
printf '%-52s %10s msg/s\n' "ceiling (rabbitmq-c, window $WINDOW, N $N)" "$ceiling"
printf '%-52s %10s msg/s\n' "mqtx relay (batch_size $BATCH, N $N)" "$relay"
printf '%-52s %10s msg/s\n' "per-row relay (synchronous_commit $perrow_commit, N $PERROW_N)" "$perrow"
printf '%-52s %10s\n' "relay / ceiling" "$(ratio "$relay" "$ceiling")"
printf '%-52s %10s\n' "relay / per-row" "$(ratio "$relay" "$perrow")"
bench_record relay ceiling_msgs "$ceiling" msg/s
bench_record relay relay_msgs "$relay" msg/s
bench_record relay perrow_msgs "$perrow" msg/s
bench_record relay relay_over_ceiling "$(ratio "$relay" "$ceiling")" ratio
bench_record relay relay_over_perrow "$(ratio "$relay" "$perrow")" ratio
