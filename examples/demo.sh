#!/usr/bin/env bash
# The order -> dispatch demo: two services, each with its own PostgreSQL
# cluster, and RabbitMQ between them, with mqtx doing all of the messaging.
#
#   sudo examples/demo.sh [--orders N] [--clients C] [--rate R] [--poison P]
#                         [--faults] [--no-build] [--timeout S]
#
#   --orders N    orders to place (default 4000)
#   --clients C   concurrent clients placing them (default 4)
#   --rate R      orders per second offered, all clients together (default 200)
#   --poison P    orders for a city no depot serves: their handler fails
#                 until the city is added (default 5)
#   --faults      while orders flow, kill the broker (and start it again),
#                 stop the relay, and SIGKILL the consumer and the relay
#   --no-build    do not install packages, build or install mqtx (the test
#                 suite uses this: it has just done all three)
#   --timeout S   give up waiting for the flow to settle after S seconds
#                 (default 240)
#
# It installs what is missing (Debian packages), builds and installs mqtx,
# starts a RabbitMQ node and two PostgreSQL clusters on 127.0.0.1 in a
# temporary directory, places orders with plain SQL inserts from several
# clients, shows the flow once a second, then reconciles the two databases
# (examples/reconcile.sh).  Everything it started is stopped when it ends,
# also on Ctrl-C or failure.  Exit status 0 only if every order was
# dispatched exactly once.
set -euo pipefail

ORDERS=4000
CLIENTS=4
RATE=200
POISON=5
FAULTS=0
BUILD=1
TIMEOUT=240

usage() {
	sed -n 's/^#   //p' "$0" >&2
	exit 2
}
while [ $# -gt 0 ]; do
	case $1 in
	--orders) ORDERS=$2; shift ;;
	--clients) CLIENTS=$2; shift ;;
	--rate) RATE=$2; shift ;;
	--poison) POISON=$2; shift ;;
	--faults) FAULTS=1 ;;
	--no-build) BUILD=0 ;;
	--timeout) TIMEOUT=$2; shift ;;
	*) usage ;;
	esac
	shift
done
for n in "$ORDERS" "$CLIENTS" "$RATE" "$POISON" "$TIMEOUT"; do
	[[ $n =~ ^[0-9]+$ ]] || usage
done
if [ "$CLIENTS" -lt 1 ] || [ "$RATE" -lt 1 ] || [ "$ORDERS" -lt "$CLIENTS" ]; then
	usage
fi

examples=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$examples/.." && pwd)
harness=$top/test/harness
QUEUE=dispatch.orders

say() { printf '\n== %s\n' "$*"; }
die() {
	echo "demo: $*" >&2
	exit 1
}

if [ $BUILD -eq 1 ]; then
	[ "$(id -u)" -eq 0 ] || die "run it as root (sudo $0): it installs packages and mqtx"
	say "installing what is missing, building and installing mqtx"
	"$top/test/install_deps.sh"
	make -s -C "$top"
	make -s -C "$top" install
fi

# Where PostgreSQL's programs are, and free ports: as the harness finds them.
# shellcheck source=../test/harness/lib.sh disable=SC1091 # followed with shellcheck -x
. "$harness/lib.sh"
PGBIN=$(pg_bindir)

work=$(mktemp -d /tmp/mqtx-demo.XXXXXX)
chmod 755 "$work"
pgbench_pid=
cleanup() {
	local status=$?
	trap - EXIT INT TERM
	local pid
	for pid in $pgbench_pid ${broker_start_pid:-}; do
		[ "$pid" = "done" ] || kill "$pid" 2>/dev/null || true
	done
	"$harness/pgcluster.sh" stop "$work/order" >/dev/null 2>&1 || true
	"$harness/pgcluster.sh" stop "$work/dispatch" >/dev/null 2>&1 || true
	"$harness/rabbitmq.sh" stop "$work/mq" >/dev/null 2>&1 || true
	if [ $status -ne 0 ] && [ $status -ne 130 ] && [ -d "$work" ]; then
		local log
		for log in "$work"/order/postgres.log "$work"/dispatch/postgres.log; do
			[ -s "$log" ] || continue
			echo "---- last lines of $log ----" >&2
			tail -n 15 "$log" >&2
		done
	fi
	rm -rf "$work"
	exit $status
}
trap cleanup EXIT
trap 'echo; echo "demo: interrupted" >&2; exit 130' INT TERM

# psql against one side: q order|dispatch [psql args...]; show: as a table
show() {
	local side=$1
	shift
	"$PGBIN/psql" -X -q -P footer=off -v ON_ERROR_STOP=1 "${conninfo[$side]}" "$@"
}
q() {
	local side=$1
	shift
	"$PGBIN/psql" -X -q -At -F ' ' -v ON_ERROR_STOP=1 "${conninfo[$side]}" "$@"
}
declare -A conninfo

say "starting RabbitMQ and two PostgreSQL clusters on 127.0.0.1 (in $work)"
amqp_port=$("$harness/rabbitmq.sh" start "$work/mq" | sed -n 's/^AMQP_PORT=//p')
[ -n "$amqp_port" ] || die "RabbitMQ did not start"
broker_url="amqp://guest:guest@127.0.0.1:$amqp_port/%2f"
echo "RabbitMQ         amqp://127.0.0.1:$amqp_port"

start_cluster() {
	local side=$1 db=$2 port
	port=$(free_ports 1)
	"$harness/pgcluster.sh" start "$work/$side" "$port" \
		shared_preload_libraries=mqtx mqtx.database="$db" \
		mqtx.broker_url="$broker_url" track_commit_timestamp=on
	conninfo[$side]="host=127.0.0.1 port=$port user=postgres dbname=$db"
	"$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 "host=127.0.0.1 port=$port user=postgres dbname=postgres" \
		-c "CREATE DATABASE $db"
	printf '%-16s %s\n' "$side cluster" "${conninfo[$side]}"
}
start_cluster order shop
start_cluster dispatch dispatch

say "setting up both services with plain SQL (examples/*.sql)"
q dispatch -f "$examples/dispatch_service.sql" >/dev/null
q order -f "$examples/order_service.sql" >/dev/null
echo "order side:    orders table + mqtx.outbox_trigger('orders', 'order.created')"
echo "dispatch side: dispatch table (unique order_id) + handler dispatch_order()"
echo "               subscribed to queue $QUEUE, bound to exchange orders"

# The consumer declares the queue and its binding when it connects; orders
# published before that would come back unroutable (and be retried).
broker_has_binding() {
	"$harness/rabbitmq.sh" ctl "$work/mq" list_bindings -s source_name destination_name 2>/dev/null |
		grep -q "^orders[[:space:]]*$QUEUE\$"
}
for ((i = 0; i < 200; i++)); do
	broker_has_binding && break
	sleep 0.2
done
broker_has_binding || die "the dispatch consumer did not declare $QUEUE on the broker"

# ---- the flow -------------------------------------------------------------

per_client=$(((ORDERS + CLIENTS - 1) / CLIENTS))
total=$((per_client * CLIENTS + POISON))
say "placing $((per_client * CLIENTS)) orders from $CLIENTS clients at $RATE/s, plus $POISON for a city no depot serves"
"$PGBIN/pgbench" -n -c "$CLIENTS" -j "$CLIENTS" -t "$per_client" --rate "$RATE" \
	-f "$examples/place_order.sql" "${conninfo[order]}" >"$work/pgbench.log" 2>&1 &
pgbench_pid=$!

place_poison() {
	q order -c "INSERT INTO orders (user_id, content)
		SELECT 900000 + g, jsonb_build_object('city', 'Atlantis',
			'items', jsonb_build_array(jsonb_build_object('sku', 'SKU-1', 'qty', 1)))
		FROM generate_series(1, $POISON) g"
}

# One line of numbers from each side; '-' while a side is restarting.
order_numbers() {
	q order -c "SELECT (SELECT count(*) FROM orders),
		count(*) FILTER (WHERE status = 'pending'),
		count(*) FILTER (WHERE status = 'published'),
		count(*) FILTER (WHERE status = 'failed')
		FROM mqtx.outbox" 2>/dev/null || echo "- - - -"
}
dispatch_numbers() {
	q dispatch -c "SELECT (SELECT count(*) FROM dispatch),
		(SELECT count(*) FROM mqtx.consumer_attempts),
		(SELECT count(*) FROM mqtx.dead_letter)" 2>/dev/null || echo "- - -"
}

worker_pid() {
	local side=$1 kind=$2
	q "$side" -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'mqtx $kind'" 2>/dev/null
}

# Faults, in order, each once its condition holds.  The broker is started
# again in the background so that the flow stays visible while it boots.
fault_step=0
event=
broker_start_pid=
inject_fault() {
	local pid
	case $fault_step in
	0)	[ "$placed" -ge $((total / 10)) ] || return 0
		"$harness/rabbitmq.sh" kill "$work/mq" >/dev/null
		event="FAULT: RabbitMQ killed (SIGKILL); orders keep coming and wait in the outbox"
		;;
	1)	[ "$placed" -ge $((total / 5)) ] || return 0
		pid=$(worker_pid order relay)
		[ -n "$pid" ] || return 0
		q order -c "SELECT pg_terminate_backend($pid)" >/dev/null
		event="FAULT: relay (pid $pid) terminated; the launcher starts it again"
		;;
	2)	[ "$placed" -ge $((total / 4)) ] || return 0
		"$harness/rabbitmq.sh" start "$work/mq" >"$work/mq-start.log" 2>&1 &
		broker_start_pid=$!
		event="starting RabbitMQ again (it takes about 10 s to boot)"
		;;
	3)	! kill -0 "$broker_start_pid" 2>/dev/null || return 0
		wait "$broker_start_pid" || { cat "$work/mq-start.log" >&2; die "RabbitMQ did not start again"; }
		broker_start_pid=
		dispatched_before=${dispatched/-/0}
		event="RabbitMQ is back; the relay and the consumer reconnect by themselves"
		;;
	4)	[ "$dispatched" != - ] && [ "$dispatched" -gt "$dispatched_before" ] || return 0
		pid=$(worker_pid dispatch consumer)
		[ -n "$pid" ] || return 0
		kill -KILL "$pid"
		event="FAULT: consumer (pid $pid) SIGKILLed while applying ($dispatched dispatched so far): the dispatch cluster restarts"
		;;
	5)	[ "$pgbench_pid" = "done" ] || return 0
		pid=$(worker_pid order relay)
		[ -n "$pid" ] || return 0
		kill -KILL "$pid"
		event="FAULT: relay (pid $pid) SIGKILLed with $pending orders pending: the order cluster restarts"
		;;
	*)	return 0 ;;
	esac
	fault_step=$((fault_step + 1))
}
FAULT_STEPS=6

header() {
	printf '%6s %7s %8s %10s %7s %11s %9s %13s\n' \
		time placed pending published failed dispatched retrying dead-lettered
}
echo
header
poison_placed=0
dispatched_before=0
started=$(date +%s%N)
printed=-1
# Four looks a second (a fault may need a quick reaction), a line a second.
while :; do
	elapsed=$((($(date +%s%N) - started) / 1000000000))
	[ $elapsed -le "$TIMEOUT" ] || die "the flow did not settle within $TIMEOUT s"
	if [ "$pgbench_pid" != "done" ] && ! kill -0 "$pgbench_pid" 2>/dev/null; then
		wait "$pgbench_pid" || { cat "$work/pgbench.log" >&2; die "pgbench failed"; }
		pgbench_pid="done"
	fi
	# dispatch side first: then it can never seem ahead of the order side
	read -r dispatched retrying dead < <(dispatch_numbers)
	read -r placed pending published failed < <(order_numbers)
	if [ $poison_placed -eq 0 ] && [ "$placed" != - ] && [ "$placed" -ge $((total / 2)) ]; then
		place_poison && poison_placed=1
	fi
	if [ $FAULTS -eq 1 ] && [ "$placed" != - ]; then
		inject_fault
	fi
	if [ "$elapsed" != "$printed" ] || [ -n "$event" ]; then
		printed=$elapsed
		printf '%5ss %7s %8s %10s %7s %11s %9s %13s\n' \
			"$elapsed" "$placed" "$pending" "$published" "$failed" "$dispatched" "$retrying" "$dead"
	fi
	if [ -n "$event" ]; then
		echo "       -- $event"
		event=
	fi
	if [ "$pgbench_pid" = "done" ] && [ $poison_placed -eq 1 ] &&
		{ [ $FAULTS -eq 0 ] || [ $fault_step -ge $FAULT_STEPS ]; } &&
		[ "$placed" = "$total" ] && [ "$pending" = 0 ] && [ "$retrying" = 0 ] &&
		[ "$dispatched" != - ] && [ $((dispatched + dead)) -ge "$total" ]; then
		printf '%5ss %7s %8s %10s %7s %11s %9s %13s\n' \
			"$elapsed" "$placed" "$pending" "$published" "$failed" "$dispatched" "$retrying" "$dead"
		break
	fi
	sleep 0.25
done
pgbench_pid=

# The last fault may have struck after the numbers above were read: let a
# cluster that is still in crash recovery finish it.
for side in order dispatch; do
	for ((i = 0; i < 300; i++)); do
		q "$side" -c "SELECT 1" >/dev/null 2>&1 && break
		sleep 0.2
	done
	q "$side" -c "SELECT 1" >/dev/null || die "the $side cluster did not come back"
done

# ---- the poison orders ----------------------------------------------------

say "dead letters: the orders the dispatch handler refused"
show dispatch -c "SELECT id, body_json ->> 'order_id' AS order_id, attempts, error_message
	FROM mqtx.dead_letter ORDER BY id LIMIT 20"
poison_dead=$(q dispatch -c "SELECT count(*) FROM mqtx.dead_letter
	WHERE error_message = 'no depot serves city \"Atlantis\"'")
if [ "$poison_dead" != "$POISON" ] || [ "$dead" != "$POISON" ]; then
	die "expected exactly the $POISON Atlantis orders in mqtx.dead_letter, found $dead ($poison_dead for Atlantis)"
fi

if [ "$POISON" -gt 0 ]; then
	say "fixing the cause, then redriving"
	echo "INSERT INTO service_areas VALUES ('Atlantis', 'ATL-1');"
	q dispatch -c "INSERT INTO service_areas VALUES ('Atlantis', 'ATL-1')"
	echo "SELECT mqtx.redrive_all('$QUEUE');  -> $(q dispatch -c "SELECT mqtx.redrive_all('$QUEUE')") redriven"
	for ((i = 0; i < 300; i++)); do
		read -r dispatched retrying dead < <(dispatch_numbers)
		[ "$dispatched" = "$total" ] && [ "$dead" = 0 ] && break
		sleep 0.2
	done
	echo "dispatched $dispatched of $total, dead letters $dead"
fi

# ---- the proof -----------------------------------------------------------

say "what the two services did"
show order -c "SELECT 'relay' AS worker, published, retried, reconnects FROM mqtx.relay_stats"
show dispatch -c "SELECT 'consumer' AS worker, applied, duplicates AS redeliveries_ignored,
	retried, dead_lettered, reconnects FROM mqtx.consumer_stats"
echo "(counters since each cluster last started)"
latency=$(
	q order -c "COPY (SELECT order_id, extract(epoch FROM pg_xact_commit_timestamp(xmin))
		FROM orders WHERE (content ->> 'city') <> 'Atlantis') TO STDOUT" >"$work/placed.tsv"
	chmod 644 "$work/placed.tsv"
	q dispatch <<-SQL
		CREATE TEMP TABLE placed (order_id bigint, committed float8);
		\copy placed FROM '$work/placed.tsv'
		SELECT format('order commit -> dispatch commit: p50 %s ms, p99 %s ms, max %s ms',
			round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 1),
			round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 1),
			round(max(ms)::numeric, 1))
		FROM (SELECT 1000 * (extract(epoch FROM pg_xact_commit_timestamp(d.xmin)) - p.committed) AS ms
		      FROM dispatch d JOIN placed p USING (order_id)) l;
	SQL
)
echo "$latency"
[ $FAULTS -eq 0 ] || echo "(with faults: includes the time the broker was down)"

say "reconciliation"
"$examples/reconcile.sh" "${conninfo[order]}" "${conninfo[dispatch]}"
