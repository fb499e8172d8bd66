# Sourced by the benchmark scripts: a RabbitMQ node and a PostgreSQL cluster
# with mqtx preloaded, on 127.0.0.1 in a temporary directory that is removed,
# servers stopped, when the script exits.
#
#   start_servers [NAME=VALUE ...]   extra postgresql.conf settings
#
# Sets here, harness, work, pgbench, amqp_port, url; defines psql_, median,
# outbox_wait_drained, pgbench_tps and bench_record.

here=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)
harness=$here/../harness
work=$(mktemp -d /tmp/mqtx-bench.XXXXXX)
# pgbench from the same installation as pg_config, PostgreSQL 15's otherwise
pgbench=/usr/lib/postgresql/15/bin/pgbench
if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/pgbench" ]; then
	pgbench=$(pg_config --bindir)/pgbench
fi
chmod 755 "$work"
cleanup() {
	"$harness/pgcluster.sh" stop "$work/pg" >/dev/null 2>&1 || true
	"$harness/rabbitmq.sh" stop "$work/mq" >/dev/null 2>&1 || true
	rm -rf "$work"
}
trap cleanup EXIT INT TERM

start_servers() {
	amqp_port=$("$harness/rabbitmq.sh" start "$work/mq" | sed -n 's/^AMQP_PORT=//p')
	url="amqp://guest:guest@127.0.0.1:$amqp_port/%2f"
	"$harness/pgcluster.sh" start "$work/pg" $((20000 + RANDOM % 20000)) \
		shared_preload_libraries=mqtx mqtx.database=postgres \
		mqtx.broker_url="$url" "$@" >/dev/null
}

psql_() { "$harness/pgcluster.sh" psql "$work/pg" -X -q -At -v ON_ERROR_STOP=1 "$@"; }

median() { sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

# outbox_wait_drained [psql options]: returns once no outbox row is pending.
# It waits inside one server session, on the pending-rows index: polling
# from the shell (runuser, psql, a backend per poll) takes CPU from the
# workers being measured.  It commits between polls: one transaction for
# the whole wait would hold back the xmin horizon, and the relay's claim
# would then walk every entry published since, which is not what is
# being measured.
outbox_wait_drained() {
	psql_ "$@" -c "SET statement_timeout = '10min'" -c "SET enable_seqscan = off" -c "
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
	"$pgbench" -h "$work/pg" -p "$(<"$work/pg/port")" -U postgres -n -M prepared "$@" \
		-f "$script" postgres >"$work/pgbench.out" 2>&1 || { cat "$work/pgbench.out" >&2; exit 1; }
	sed -n 's/^tps = \([0-9]*\)[.0-9]* .*without initial connection time.*/\1/p' \
		"$work/pgbench.out"
}

# bench_record BENCHMARK METRIC VALUE UNIT: one row for test/bench/run.sh,
# appended to $BENCH_CSV when it is set.
bench_record() {
	[ -z "${BENCH_CSV:-}" ] || printf '%s,%s,%s,%s\n' "$@" >>"$BENCH_CSV"
}
