#!/usr/bin/env bash
# The order -> dispatch demo: two services, each with its own PostgreSQL
# cluster, and RabbitMQ between them, with mqtx doing all of the messaging.
#
#   sudo examples/demo.sh [--orders N] [--clients C] [--rate R] [--poison P]
#                         [--unservable U] [--faults] [--no-build] [--timeout S]
#
#   --orders N    orders to place (default 4000)
#   --clients C   concurrent clients placing them (default 4)
#   --rate R      orders per second offered, all clients together (default 200)
#   --poison P    orders for a city no depot serves yet: dead-lettered,
#                 then redriven once the city is added (default 5)
#   --unservable U  orders for a city no depot will ever serve: dead-
#                 lettered, then given up (reject_order), and the order
#                 service compensates (default 3)
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
# (examples/reconcile.sh): every order answered, dispatched exactly once or
# given up, and a few orders' messages followed across both services.
# Everything it started is stopped when it ends, also on Ctrl-C or
# failure.  Exit status 0 only if the reconciliation finds nothing wrong.
set -euo pipefail

ORDERS=4000
CLIENTS=4
RATE=200
POISON=5
UNSERVABLE=3
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
	--unservable) UNSERVABLE=$2; shift ;;
	--faults) FAULTS=1 ;;
	--no-build) BUILD=0 ;;
	--timeout) TIMEOUT=$2; shift ;;
	*) usage ;;
	esac
	shift
done
for n in "$ORDERS" "$CLIENTS" "$RATE" "$POISON" "$UNSERVABLE" "$TIMEOUT"; do
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
echo "               handlers order_dispatched() and order_dispatch_failed(), subscribed"
echo "               to queues orders.dispatched and orders.dispatch_failed (exchange dispatch)"
echo "dispatch side: dispatch table (unique order_id) + handler dispatch_order()"
echo "               subscribed to queue $QUEUE (exchange orders); every dispatch"
echo "               announced by mqtx.outbox_trigger('dispatch', 'dispatch.created')"

# The consumers declare their queues and bindings when they connect;
# messages published before that would come back unroutable (and be
# retried).
BINDINGS=("orders $QUEUE" "dispatch orders.dispatched" "dispatch orders.dispatch_failed")
broker_has_bindings() {
	local have binding
	have=$("$harness/rabbitmq.sh" ctl "$work/mq" list_bindings -s source_name destination_name 2>/dev/null |
		awk '{print $1, $2}')
	for binding in "${BINDINGS[@]}"; do
		grep -qxF "$binding" <<<"$have" || return 1
	done
}
for ((i = 0; i < 200; i++)); do
	broker_has_bindings && break
	sleep 0.2
done
broker_has_bindings || die "the consumers did not declare their queues and bindings on the broker"

# ---- the flow -------------------------------------------------------------

per_client=$(((ORDERS + CLIENTS - 1) / CLIENTS))
total=$((per_client * CLIENTS + POISON + UNSERVABLE))
say "placing $((per_client * CLIENTS)) orders from $CLIENTS clients at $RATE/s, plus $POISON for a city no depot serves yet and $UNSERVABLE for one no depot will serve"
"$PGBIN/pgbench" -n -c "$CLIENTS" -j "$CLIENTS" -t "$per_client" --rate "$RATE" \
	-f "$examples/place_order.sql" "${conninfo[order]}" >"$work/pgbench.log" 2>&1 &
pgbench_pid=$!

place_poison() {
	q order -c "SELECT set_config('mqtx.traceparent',
			'00-' || md5(random()::text) || '-' || left(md5(random()::text), 16) || '-01', false)" -c "INSERT INTO orders (user_id, content)
		SELECT 900000 + g, jsonb_build_object('city', CASE WHEN g <= $POISON THEN 'Atlantis' ELSE 'Lemuria' END,
			'items', jsonb_build_array(jsonb_build_object('sku', 'SKU-1', 'qty', 1)))
		FROM generate_series(1, $POISON + $UNSERVABLE) g" >/dev/null
}

# One line of numbers from each side; '-' while a side is restarting.
order_numbers() {
	q order -c "SELECT (SELECT count(*) FROM orders),
		count(*) FILTER (WHERE status = 'pending'),
		count(*) FILTER (WHERE status = 'published'),
		count(*) FILTER (WHERE status = 'failed'),
		(SELECT count(*) FROM orders WHERE status <> 'placed')
		FROM mqtx.outbox" 2>/dev/null || echo "- - - - -"
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
	printf '%6s %7s %8s %10s %7s %11s %9s %13s %9s\n' \
		time placed pending published failed dispatched retrying dead-lettered answered
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
	read -r placed pending published failed answered < <(order_numbers)
	if [ $poison_placed -eq 0 ] && [ "$placed" != - ] && [ "$placed" -ge $((total / 2)) ]; then
		place_poison && poison_placed=1
	fi
	if [ $FAULTS -eq 1 ] && [ "$placed" != - ]; then
		inject_fault
	fi
	if [ "$elapsed" != "$printed" ] || [ -n "$event" ]; then
		printed=$elapsed
		printf '%5ss %7s %8s %10s %7s %11s %9s %13s %9s\n' \
			"$elapsed" "$placed" "$pending" "$published" "$failed" "$dispatched" "$retrying" "$dead" "$answered"
	fi
	if [ -n "$event" ]; then
		echo "       -- $event"
		event=
	fi
	if [ "$pgbench_pid" = "done" ] && [ $poison_placed -eq 1 ] &&
		{ [ $FAULTS -eq 0 ] || [ $fault_step -ge $FAULT_STEPS ]; } &&
		[ "$placed" = "$total" ] && [ "$pending" = 0 ] && [ "$retrying" = 0 ] &&
		[ "$dispatched" != - ] && [ $((dispatched + dead)) -ge "$total" ]; then
		printf '%5ss %7s %8s %10s %7s %11s %9s %13s %9s\n' \
			"$elapsed" "$placed" "$pending" "$published" "$failed" "$dispatched" "$retrying" "$dead" "$answered"
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

city_of_letter="body_json #>> '{content,city}'"
say "dead letters: the orders the dispatch handler refused"
show dispatch -c "SELECT id, body_json ->> 'order_id' AS order_id, $city_of_letter AS city, attempts, error_message
	FROM mqtx.dead_letter ORDER BY id LIMIT 20"
read -r atlantis_dead lemuria_dead < <(q dispatch -c "SELECT
	count(*) FILTER (WHERE $city_of_letter = 'Atlantis' AND error_message = 'no depot serves city \"Atlantis\"'),
	count(*) FILTER (WHERE $city_of_letter = 'Lemuria' AND error_message = 'no depot serves city \"Lemuria\"')
	FROM mqtx.dead_letter")
if [ "$atlantis_dead" != "$POISON" ] || [ "$lemuria_dead" != "$UNSERVABLE" ] ||
	[ "$dead" != $((POISON + UNSERVABLE)) ]; then
	die "expected the $POISON Atlantis and $UNSERVABLE Lemuria orders in mqtx.dead_letter, found $dead ($atlantis_dead for Atlantis, $lemuria_dead for Lemuria)"
fi

if [ "$POISON" -gt 0 ]; then
	say "Atlantis gets a depot: its orders are redriven"
	echo "INSERT INTO service_areas VALUES ('Atlantis', 'ATL-1');"
	q dispatch -c "INSERT INTO service_areas VALUES ('Atlantis', 'ATL-1')"
	redrive="SELECT mqtx.redrive(id) FROM mqtx.dead_letter WHERE $city_of_letter = 'Atlantis'"
	echo "$redrive;  -> $(q dispatch -c "SELECT count(*) FROM ($redrive) r") redriven"
fi
if [ "$UNSERVABLE" -gt 0 ]; then
	say "no depot will ever serve Lemuria: its orders are given up, and the order service compensates"
	reject="SELECT reject_order(id, 'no depot serves Lemuria') FROM mqtx.dead_letter WHERE $city_of_letter = 'Lemuria'"
	echo "$reject;  -> $(q dispatch -c "SELECT count(*) FROM ($reject) r") given up (dispatch.failed sent)"
fi
for ((i = 0; i < 300; i++)); do
	read -r dispatched retrying dead < <(dispatch_numbers)
	read -r placed pending published failed answered < <(order_numbers)
	[ "$dispatched" = $((total - UNSERVABLE)) ] && [ "$dead" = 0 ] && [ "$answered" = "$total" ] && break
	sleep 0.2
done
echo "dispatched $dispatched of $total, given up $UNSERVABLE, dead letters $dead; answered on the order side: $answered"
show order -c "SELECT status AS order_status, count(*) AS orders FROM orders GROUP BY 1 ORDER BY 1"

# ---- the proof -----------------------------------------------------------

say "what the two services did"
relay_line() {
	local published retried reconnects
	read -r published retried reconnects < <(q "$1" -c "SELECT published, retried, reconnects FROM mqtx.relay_stats")
	printf '%-18s published %6s, retried %s, reconnects %s\n' "$1 relay" "$published" "$retried" "$reconnects"
}
consumer_line() {
	local applied duplicates retried dead_lettered reconnects
	read -r applied duplicates retried dead_lettered reconnects < <(q "$1" -c "SELECT applied, duplicates, retried,
		dead_lettered, reconnects FROM mqtx.consumer_stats")
	printf '%-18s applied %8s, redeliveries ignored %s, retried %s, dead-lettered %s, reconnects %s\n' \
		"$1 consumer" "$applied" "$duplicates" "$retried" "$dead_lettered" "$reconnects"
}
relay_line order
consumer_line dispatch
relay_line dispatch
consumer_line order
echo "(counters since each cluster last started)"
latency=$(
	q dispatch -c "COPY (SELECT order_id, extract(epoch FROM dispatched_at) FROM dispatch) TO STDOUT" >"$work/dispatched.tsv"
	chmod 644 "$work/dispatched.tsv"
	q order <<-SQL
		CREATE TEMP TABLE dispatched (order_id bigint, at float8);
		\copy dispatched FROM '$work/dispatched.tsv'
		WITH l AS (
			SELECT 1000 * (d.at - extract(epoch FROM o.created_at)) AS one_way,
				   1000 * extract(epoch FROM o.answered_at - o.created_at) AS round_trip
			FROM orders o JOIN dispatched d USING (order_id)
			WHERE o.content ->> 'city' <> 'Atlantis'),
		p AS (
			SELECT 1 AS n, 'order placed -> dispatched:          ' AS what,
				   percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY one_way) AS q, max(one_way) AS m FROM l
			UNION ALL
			SELECT 2, 'order placed -> its answer applied: ',
				   percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY round_trip), max(round_trip) FROM l)
		SELECT format('%s p50 %s ms, p99 %s ms, max %s ms', what, round(q[1]::numeric, 1),
			round(q[2]::numeric, 1), round(m::numeric, 1))
		FROM p ORDER BY n;
	SQL
)
echo "$latency"
[ $FAULTS -eq 0 ] || echo "(with faults: includes the time the broker was down)"

say "reconciliation"
"$examples/reconcile.sh" "${conninfo[order]}" "${conninfo[dispatch]}"
