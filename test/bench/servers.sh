# Sourced by the benchmark scripts: a RabbitMQ node and a PostgreSQL cluster
# with mqtx preloaded, on 127.0.0.1 in a temporary directory that is removed,
# servers stopped, when the script exits.
#
#   start_servers [NAME=VALUE ...]   extra postgresql.conf settings
#
# Sets here, harness, work, amqp_port, url; defines psql_ and median.

here=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)
harness=$here/../harness
work=$(mktemp -d /tmp/mqtx-bench.XXXXXX)
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
