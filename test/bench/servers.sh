# shellcheck shell=bash
# Sourced by the benchmark scripts: a RabbitMQ node and a PostgreSQL cluster
# with mqtx preloaded, on 127.0.0.1 in a temporary directory that is removed,
# servers stopped, when the script exits.
#
#   start_servers [NAME=VALUE ...]   extra postgresql.conf settings
#
# Sets here, harness, work, PGBIN, amqp_port, url; defines psql_, median,
# median_of, ratio, msg_rate, consumers_on, purge_queue, outbox_wait_drained,
# pgbench_tps and bench_record.  Every cluster a script starts in a
# directory of $work ("$harness/pgcluster.sh" start "$work/NAME" ...) is
# stopped at exit too.

here=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)
harness=$here/../harness
# shellcheck source=../harness/lib.sh
. "$harness/lib.sh"
PGBIN=$(pg_bindir)
work=$(mktemp -d /tmp/mqtx-bench.XXXXXX)
chmod 755 "$work"
cleanup() {
	local dir
	for dir in "$work"/*/; do
		if [ -f "$dir/data/PG_VERSION" ]; then
			"$harness/pgcluster.sh" stop "$dir" >/dev/null 2>&1 || true
		fi
	done
	"$harness/rabbitmq.sh" stop "$work/mq" >/dev/null 2>&1 || true
	rm -rf "$work"
}
trap cleanup EXIT INT TERM

start_servers() {
	amqp_port=$("$harness/rabbitmq.sh" start "$work/mq" | sed -n 's/^AMQP_PORT=//p')
	url="amqp://guest:guest@127.0.0.1:$amqp_port/%2f"
	"$harness/pgcluster.sh" start "$work/pg" "$(free_ports 1)" \
		shared_preload_libraries=mqtx mqtx.database=postgres \
		mqtx.broker_url="$url" "$@" >/dev/null
}

psql_() { "$harness/pgcluster.sh" psql "$work/pg" -X -q -At -v ON_ERROR_STOP=1 "$@"; }

median() { sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
median_of() { printf '%s\n' "$@" | median; }

# ratio A B [DECIMALS]: A / B, with 2 decimals unless told
ratio() { awk -v a="$1" -v b="$2" -v d="${3:-2}" 'BEGIN {printf "%." d "f", a / b}'; }

# The rate of a line "... = N msg/s ..." (what ceiling_publisher,
# raw_consumer and perrow_relay print), read from stdin.
msg_rate() { sed -n 's/.* = \([0-9.]*\) msg\/s.*/\1/p'; }

# consumers_on QUEUE: how many consumers the broker has on QUEUE (nothing
# when there is no such queue).
consumers_on() {
	"$harness/rabbitmq.sh" ctl "$work/mq" -q list_queues name consumers |
		awk -v q="$1" '$1 == q {print $2}'
}

purge_queue() { "$harness/rabbitmq.sh" ctl "$work/mq" purge_queue "$1" >/dev/null; }

# outbox_wait_drained: returns once no outbox row is pending.
# It waits inside one server session, on the pending-rows index: polling
# from the shell (runuser, psql, a backend per poll) takes CPU from the
# workers being measured.  It commits between polls: one transaction for
# the whole wait would hold back the xmin horizon, and the relay's claim
# would then walk every entry published since, which is not what is
# being measured.
outbox_wait_drained() {
	psql_ -c "SET statement_timeout = '10min'" -c "SET enable_seqscan = off" -c "
		DO \$\$ BEGIN
			WHILE EXISTS (SELECT FROM mqtx.outbox WHERE status = 'pending') LOOP
				COMMIT;
				PERFORM pg_sleep(0.05);
			END LOOP;
		END \$\$" >/dev/null
}

# pgbench_tps SCRIPT [PGBENCH OPTIONS]: runs SCRIPT with pgbench (-n -M
# prepared) against the cluster and prints its tps, without initial
# connection time; when pgbench fails, shows its output and exits.
pgbench_tps() {
	local script=$1
	shift
	"$PGBIN/pgbench" -h "$work/pg" -p "$(<"$work/pg/port")" -U postgres -n -M prepared "$@" \
		-f "$script" postgres >"$work/pgbench.out" 2>&1 || { cat "$work/pgbench.out" >&2; exit 1; }
	sed -n 's/^tps = \([0-9]*\)[.0-9]* .*without initial connection time.*/\1/p' \
		"$work/pgbench.out"
}

# bench_record BENCHMARK METRIC VALUE UNIT: one row for test/bench/run.sh,
# appended to $BENCH_CSV when it is set.
bench_record() {
	[ -z "${BENCH_CSV:-}" ] || printf '%s,%s,%s,%s\n' "$@" >>"$BENCH_CSV"
}
