#!/usr/bin/env bash
# Consumer throughput against its ceiling, in one run on this machine:
#   (a) ceiling: a plain rabbitmq-c consumer (raw_consumer) draining N
#       pre-filled persistent messages from a durable queue, manual acks;
#   (b) mqtx: the consumer worker applying N pre-filled messages through a
#       one-INSERT handler, timed from the commit of mqtx.subscribe() until
#       all N rows are committed in the handler's table.
# Both runs alternate ROUNDS times against one broker; the medians and their
# ratio are printed.  A benchmark, not a test: it asserts nothing.
#
#   sudo test/bench/consumer_throughput.sh [N=50000] [ROUNDS=3] [PREFETCH=1000] [BATCH=1000] [ACK_EVERY=1]
#
#   PREFETCH   basic.qos prefetch of both consumers (mqtx: the subscription's)
#   BATCH      mqtx.batch_size: deliveries applied per transaction
#   ACK_EVERY  raw_consumer's acks: 1 = one per message, K = multiple every K
#
# Environment knobs:
#   HANDLER_LANG=sql|plpgsql   language of the handler (default sql)
#   PERF_DIR=DIR               perf record -g the consumer worker during each
#                              mqtx run into DIR/consumer.roundR.data (skews
#                              the mqtx figures; for profiles only)
#   INBOX_ROWS=K               also run mqtx, every round, with K rows already
#                              in mqtx.inbox (applied earlier, random message
#                              ids, vacuumed and analyzed: a week of retained
#                              dedupe records), and print its rate over the
#                              empty inbox's, measured side by side
#
# Messages are ~200-byte JSON bodies {"order_id": i, "pad": "xxx..."} with
# distinct message_ids, published by ceiling_publisher.  mqtx dedupes on
# (queue, message_id); ceiling_publisher's ids carry a random per-run prefix,
# and mqtx.inbox and the handler's table are truncated before every mqtx run
# anyway, so each run starts from the same empty tables.
#
# Needs mqtx built and installed (make && sudo make install).
set -euo pipefail

N=${1:-50000}
ROUNDS=${2:-3}
PREFETCH=${3:-1000}
BATCH=${4:-1000}
ACK_EVERY=${5:-1}
HANDLER_LANG=${HANDLER_LANG:-sql}
PERF_DIR=${PERF_DIR:-}
INBOX_ROWS=${INBOX_ROWS:-0}
BODY_SIZE=200
WINDOW=1000
TIMEOUT=120 # seconds a run may take before the benchmark gives up

case $HANDLER_LANG in sql | plpgsql) ;; *)
	echo "HANDLER_LANG must be sql or plpgsql" >&2
	exit 2
	;;
esac

# shellcheck source=servers.sh
. "$(dirname "$0")/servers.sh"

make -s -C "$here" ceiling_publisher raw_consumer >/dev/null
start_servers mqtx.batch_size="$BATCH" mqtx.relay_enabled=off

if [ "$HANDLER_LANG" = sql ]; then
	handler_body="BEGIN ATOMIC
		INSERT INTO dispatch (order_id, content)
		VALUES ((payload->>'order_id')::bigint, payload->>'pad');
	END"
else
	handler_body="AS \$\$
	BEGIN
		INSERT INTO dispatch (order_id, content)
		VALUES ((payload->>'order_id')::bigint, payload->>'pad');
	END
	\$\$"
fi

# bench_wait: wait (server side, polling shared memory every 5 ms) until the
# consumer has counted TARGET applied deliveries, then until all N rows are
# committed in dispatch (applied is counted before the batch commits), and
# return that moment as epoch seconds.
psql_ >/dev/null <<-SQL
	CREATE EXTENSION mqtx;
	SELECT mqtx.declare_exchange('bench.ex', 'direct');
	SELECT mqtx.declare_queue('bench.in');
	SELECT mqtx.bind('bench.in', 'bench.ex', 'bench.in');
	CREATE TABLE dispatch (order_id bigint PRIMARY KEY, content text);
	CREATE FUNCTION bench_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE $HANDLER_LANG
	$handler_body;
	CREATE FUNCTION bench_wait(target bigint, n bigint, timeout_s float8)
	RETURNS float8 LANGUAGE plpgsql AS \$\$
	DECLARE
		deadline timestamptz := clock_timestamp() + make_interval(secs => timeout_s);
	BEGIN
		WHILE (SELECT applied FROM mqtx.consumer_stats
		       WHERE database = current_database()) < target LOOP
			IF clock_timestamp() > deadline THEN
				RAISE EXCEPTION 'consumer applied fewer than % in % s', target, timeout_s;
			END IF;
			PERFORM pg_sleep(0.005);
		END LOOP;
		WHILE (SELECT count(*) FROM dispatch) < n LOOP
			IF clock_timestamp() > deadline THEN
				RAISE EXCEPTION 'fewer than % rows committed in % s', n, timeout_s;
			END IF;
			PERFORM pg_sleep(0.002);
		END LOOP;
		RETURN extract(epoch FROM clock_timestamp());
	END
	\$\$;
SQL

applied() { psql_ -c "SELECT coalesce(sum(applied), 0) FROM mqtx.consumer_stats"; }
consumer_pid() { psql_ -c "SELECT pid FROM mqtx.consumer_stats WHERE pid IS NOT NULL"; }

# prefill QUEUE: N persistent messages, queue purged first.
prefill() {
	"$here/ceiling_publisher" --url "$url" --exchange bench.ex --routing-key "$1" \
		--declare "$1" --purge --count "$N" --window "$WINDOW" \
		--body-size "$BODY_SIZE" >/dev/null
}

raw_run() {
	prefill bench.raw
	"$here/raw_consumer" --url "$url" --queue bench.raw --count "$N" \
		--prefetch "$PREFETCH" --ack-every "$ACK_EVERY" | msg_rate
}

# inbox_history ROWS: mqtx.inbox holds ROWS applied messages of the queue
# and nothing else.
inbox_history() {
	psql_ -c "TRUNCATE mqtx.inbox" >/dev/null
	[ "$1" -gt 0 ] || return 0
	psql_ -c "INSERT INTO mqtx.inbox (queue, message_id, applied_at)
		SELECT 'bench.in', gen_random_uuid()::text, now() - interval '1 day'
		FROM generate_series(1, $1)" -c "VACUUM ANALYZE mqtx.inbox" >/dev/null
}

# mqtx_run ROUND [INBOX_ROWS]: pre-fill, subscribe, time from the
# subscription's commit to the last committed row, unsubscribe.
mqtx_run() {
	local round=$1 history=${2:-0} a0 t0 t1 perf_pid=""
	local i=0
	# The previous round's unsubscribe is asynchronous: the worker cancels
	# its consumer when it notices.  Pre-filling before that would let it
	# take messages untimed.
	until [ "$(consumers_on bench.in)" = 0 ] || [ -z "$(consumers_on bench.in)" ]; do
		i=$((i + 1))
		[ $i -lt 30 ] || { echo "the consumer still consumes bench.in" >&2; exit 1; }
		sleep 0.5
	done
	prefill bench.in
	inbox_history "$history"
	psql_ -c "TRUNCATE dispatch" -c "CHECKPOINT" >/dev/null
	if [ -n "$PERF_DIR" ]; then
		perf record -q -g -p "$(consumer_pid)" -o "$PERF_DIR/consumer.round$round.data" \
			>/dev/null 2>&1 &
		perf_pid=$!
		sleep 0.5
	fi
	a0=$(applied)
	t0=$(psql_ -c "SELECT mqtx.subscribe('bench.in', 'bench_handler(jsonb,jsonb)'::regprocedure, $PREFETCH)" \
		-c "SELECT extract(epoch FROM clock_timestamp())" | tail -n 1)
	if ! t1=$(psql_ -c "SELECT bench_wait($a0 + $N, $N, $TIMEOUT)"); then
		psql_ -c "SELECT * FROM mqtx.consumer_stats" >&2
		exit 1
	fi
	if [ -n "$perf_pid" ]; then
		kill -INT "$perf_pid"
		wait "$perf_pid" || true
	fi
	psql_ -c "SELECT mqtx.unsubscribe('bench.in')" >/dev/null
	awk -v n="$N" -v t0="$t0" -v t1="$t1" 'BEGIN {printf "%.0f\n", n / (t1 - t0)}'
}


if [ "$ACK_EVERY" = 1 ]; then
	acks="one ack per message"
else
	acks="ack multiple every $ACK_EVERY"
fi
[ -z "$PERF_DIR" ] || mkdir -p "$PERF_DIR"

raws=()
mqtxs=()
historys=()
for round in $(seq 1 "$ROUNDS"); do
	r=$(raw_run)
	m=$(mqtx_run "$round")
	echo "round $round: raw consumer $r msg/s, mqtx consumer $m msg/s" >&2
	raws+=("$r")
	mqtxs+=("$m")
	if [ "$INBOX_ROWS" -gt 0 ]; then
		h=$(mqtx_run "$round" "$INBOX_ROWS")
		echo "round $round: mqtx consumer with $INBOX_ROWS inbox rows $h msg/s" >&2
		historys+=("$h")
	fi
done

if [ "$(psql_ -c "SELECT duplicates + retried + dead_lettered FROM mqtx.consumer_stats")" != 0 ]; then
	echo "warning: the consumer saw duplicates, retries or dead letters:" >&2
	psql_ -c "SELECT * FROM mqtx.consumer_stats" >&2
fi

raw=$(median_of "${raws[@]}")
mqtx=$(median_of "${mqtxs[@]}")
echo
echo "consumer throughput, $N messages of ~$BODY_SIZE bytes, persistent, durable queue, $(nproc) cores"
printf '%-60s %10s msg/s\n' "ceiling (rabbitmq-c, prefetch $PREFETCH, $acks)" "$raw"
printf '%-60s %10s msg/s\n' "mqtx consumer (prefetch $PREFETCH, batch_size $BATCH, $HANDLER_LANG)" "$mqtx"
printf '%-60s %10s\n' "mqtx / ceiling" "$(ratio "$mqtx" "$raw")"
bench_record consumer raw_msgs "$raw" msg/s
bench_record consumer mqtx_msgs "$mqtx" msg/s
bench_record consumer mqtx_over_raw "$(ratio "$mqtx" "$raw")" ratio
if [ "$INBOX_ROWS" -gt 0 ]; then
	history=$(median_of "${historys[@]}")
	printf '%-60s %10s msg/s\n' "mqtx consumer, $INBOX_ROWS rows in mqtx.inbox" "$history"
	printf '%-60s %10s\n' "with those rows / empty inbox" "$(ratio "$history" "$mqtx")"
	bench_record consumer mqtx_with_inbox_history "$history" msg/s
	bench_record consumer inbox_history_over_empty "$(ratio "$history" "$mqtx")" ratio
fi
