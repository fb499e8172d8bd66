#!/usr/bin/env bash
# Throughput through a 3-node RabbitMQ cluster: a quorum queue (replicated
# on all three nodes; a publisher confirm waits for a majority) against a
# classic durable queue (one node), side by side in one run on this
# machine, for both halves of mqtx:
#   (a) relay: the mqtx relay draining N pre-filled outbox rows into the
#       queue, from the commit to the last row published (confirmed);
#   (b) consumer: the mqtx consumer applying the N messages now in the
#       queue (a handler that inserts a row), from the subscription to the
#       last one applied.
# The two queue types alternate for ROUNDS rounds; the medians and the
# ratios quorum/classic are printed.  A benchmark, not a test: it asserts
# nothing.
#
#   sudo test/bench/cluster_queues.sh [N=20000] [ROUNDS=3]
#
# The relay and the consumer are connected to the first node; the classic
# queue lives there too (it is declared through that node).
#
# Environment knobs:
#   BENCH_CSV=FILE   also append "benchmark,metric,value,unit" rows to FILE
#
# Needs mqtx built and installed (make && sudo make install).
set -euo pipefail

N=${1:-20000}
ROUNDS=${2:-3}
BODY_SIZE=200

# shellcheck source=servers.sh
. "$(dirname "$0")/servers.sh"

# servers.sh stops one node; this script runs three
cluster_cleanup() {
	local i
	for i in 3 2 1; do
		"$harness/rabbitmq.sh" stop "$work/mq$i" >/dev/null 2>&1 &
	done
	wait
	cleanup
}
trap cluster_cleanup EXIT INT TERM

node_port() { "$harness/rabbitmq.sh" start "$@" | sed -n 's/^AMQP_PORT=//p'; }

port1=$(node_port "$work/mq1")
# the joins take turns (rabbitmq.sh locks the seed), the boots need not
node_port "$work/mq2" --join "$work/mq1" >"$work/port2" &
joining=$!
port3=$(node_port "$work/mq3" --join "$work/mq1")
wait "$joining"
port2=$(<"$work/port2")
urls=""
for p in "$port1" "$port2" "$port3"; do
	urls+="${urls:+, }amqp://guest:guest@127.0.0.1:$p/%2f"
done
running=$("$harness/rabbitmq.sh" ctl "$work/mq1" -q cluster_status --formatter json |
	/usr/bin/python3 -c 'import json,sys; print(len(json.load(sys.stdin)["running_nodes"]))')
[ "$running" = 3 ] || { echo "the cluster has $running running nodes, not 3" >&2; exit 1; }

"$harness/pgcluster.sh" start "$work/pg" "$(free_ports 1)" \
	shared_preload_libraries=mqtx mqtx.database=postgres \
	mqtx.broker_url="$urls" mqtx.retention=-1 mqtx.inbox_retention=-1 >/dev/null

psql_ <<-'SQL' >/dev/null
	CREATE EXTENSION mqtx;
	SELECT mqtx.declare_queue('bench.classic');
	SELECT mqtx.declare_queue('bench.quorum', true, '{"x-queue-type": "quorum"}');
	CREATE TABLE effects (order_id int NOT NULL);
	CREATE FUNCTION apply_order(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE sql AS $$ INSERT INTO effects VALUES ((payload->>'order_id')::int) $$;
SQL

queue_purge() { "$harness/rabbitmq.sh" ctl "$work/mq1" purge_queue "$1" >/dev/null; }

# relay_run QUEUE: msg/s from the commit of N rows to the last published.
relay_run() {
	local queue=$1 t0
	queue_purge "$queue"
	psql_ -c "TRUNCATE mqtx.outbox" >/dev/null
	psql_ <<-SQL >/dev/null
		BEGIN;
		SELECT count(mqtx.publish('', '$queue',
		       jsonb_build_object('order_id', g, 'pad', repeat('x', $BODY_SIZE - 40))))
		FROM generate_series(1, $N) g;
		COMMIT;
	SQL
	t0=$(psql_ -c "SELECT extract(epoch FROM clock_timestamp())")
	outbox_wait_drained
	[ "$(psql_ -c "SELECT count(*) FROM mqtx.outbox WHERE status <> 'published'")" = 0 ] ||
		{ echo "the relay left rows unpublished" >&2; exit 1; }
	psql_ -c "SELECT round($N / (extract(epoch FROM max(published_at)) - $t0)::numeric, 0) FROM mqtx.outbox"
}

# consumer_run QUEUE: msg/s from subscribing to the N messages relay_run
# left in QUEUE until the last is applied.
consumer_run() {
	local queue=$1 t0
	psql_ -c "TRUNCATE effects, mqtx.inbox" >/dev/null
	t0=$(psql_ -c "SELECT extract(epoch FROM clock_timestamp())")
	psql_ -c "SELECT mqtx.subscribe('$queue', 'apply_order(jsonb,jsonb)')" >/dev/null
	psql_ -c "SET statement_timeout = '10min'" -c "
		DO \$\$ BEGIN
			WHILE (SELECT count(*) FROM mqtx.inbox) < $N LOOP
				COMMIT;
				PERFORM pg_sleep(0.05);
			END LOOP;
		END \$\$" >/dev/null
	local rate
	rate=$(psql_ -c "SELECT round($N / (extract(epoch FROM max(applied_at)) - $t0)::numeric, 0) FROM mqtx.inbox")
	psql_ -c "SELECT mqtx.unsubscribe('$queue')" >/dev/null
	[ "$(psql_ -c "SELECT count(DISTINCT order_id) FROM effects")" = "$N" ] ||
		{ echo "the consumer did not apply all $N messages of $queue" >&2; exit 1; }
	echo "$rate"
}

declare -A relay consumer
for round in $(seq 1 "$ROUNDS"); do
	for type in classic quorum; do
		r=$(relay_run "bench.$type")
		c=$(consumer_run "bench.$type")
		echo "round $round: $type queue: relay $r msg/s, consumer $c msg/s" >&2
		relay[$type]+="$r "
		consumer[$type]+="$c "
	done
done

# shellcheck disable=SC2086 # the lists are plain numbers
{
	relay_classic=$(median_of ${relay[classic]})
	relay_quorum=$(median_of ${relay[quorum]})
	consumer_classic=$(median_of ${consumer[classic]})
	consumer_quorum=$(median_of ${consumer[quorum]})
}
echo
echo "3-node RabbitMQ cluster, ~$BODY_SIZE-byte persistent messages, N $N," \
	"$ROUNDS rounds (medians), $(nproc) cores"
printf '%-40s %10s msg/s\n' "relay -> classic queue" "$relay_classic"
printf '%-40s %10s msg/s\n' "relay -> quorum queue (3 replicas)" "$relay_quorum"
printf '%-40s %10s\n' "relay: quorum / classic" "$(ratio "$relay_quorum" "$relay_classic")"
printf '%-40s %10s msg/s\n' "consumer <- classic queue" "$consumer_classic"
printf '%-40s %10s msg/s\n' "consumer <- quorum queue" "$consumer_quorum"
printf '%-40s %10s\n' "consumer: quorum / classic" "$(ratio "$consumer_quorum" "$consumer_classic")"
bench_record cluster relay_classic_msgs "$relay_classic" msg/s
bench_record cluster relay_quorum_msgs "$relay_quorum" msg/s
bench_record cluster consumer_classic_msgs "$consumer_classic" msg/s
bench_record cluster consumer_quorum_msgs "$consumer_quorum" msg/s
