#!/usr/bin/env bash
# Throwaway PostgreSQL 15 clusters for the mqtx tests: data in DIR/data, log
# in DIR/postgres.log, TCP on 127.0.0.1:PORT only, unix socket in DIR.
#
#   pgcluster.sh start DIR PORT [NAME=VALUE ...]   initdb if needed, start, wait
#   pgcluster.sh stop DIR                          fast shutdown (idempotent)
#   pgcluster.sh psql DIR [psql args...]           psql -h DIR -p PORT -U postgres
#
# NAME=VALUE pairs become postgresql.conf settings (quoted for you), e.g.
#   pgcluster.sh start /tmp/pg 54321 shared_preload_libraries=mqtx mqtx.database=orders
# They live in DIR/data/harness.conf, which every start rewrites, so a
# restart with different settings does not inherit stale ones.
#
# As root, everything runs as the postgres user (initdb refuses root) and
# DIR is chown'd to it; otherwise it runs as the caller.
set -euo pipefail

me=$(basename "$0")
die() { echo "$me: $*" >&2; exit 1; }
usage() {
	sed -n 's/^#   pgcluster/pgcluster/p' "$0" >&2
	exit 2
}

# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
PGBIN=$(pg_bindir)

is_root() { [ "$(id -u)" -eq 0 ]; }

# Run as the cluster owner.  cd first: initdb/pg_ctl complain when the
# postgres user cannot access the caller's cwd (e.g. /root).
as_pg() {
	if is_root; then
		(cd "$DIR" && runuser -u postgres -- "$@")
	else
		(cd "$DIR" && "$@")
	fi
}

log_tail() {
	local f
	for f in "$@"; do
		[ -s "$f" ] || continue
		echo "---- tail of $f ----"
		tail -n 30 "$f"
	done
}

# fail MESSAGE [LOG...]: report with the tail of the given logs.
fail() {
	{
		echo "$me: $1"
		shift
		log_tail "$@"
	} >&2
	exit 1
}

running() {
	[ -f "$DIR/data/postmaster.pid" ] &&
		as_pg "$PGBIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1
}

# Single-quote a GUC value unless it already is; any GUC accepts a quoted
# value, and it spares callers from quoting lists, paths and URLs.
quote_guc() {
	local v=$1
	if [[ $v =~ ^\'.*\'$ ]]; then
		printf %s "$v"
	else
		printf "'%s'" "${v//\'/\'\'}"
	fi
}

cmd_start() {
	[ $# -ge 1 ] || usage
	local port=$1; shift
	[[ $port =~ ^[0-9]+$ ]] || die "bad port: $port"
	local kv
	for kv in "$@"; do
		[[ $kv =~ ^[A-Za-z_][A-Za-z0-9_.]*= ]] || die "not NAME=VALUE: $kv"
	done

	mkdir -p "$DIR"
	DIR=$(cd "$DIR" && pwd -P)
	# The socket path must fit in sun_path (107 bytes).
	local sock="$DIR/.s.PGSQL.$port"
	[ ${#sock} -le 107 ] || die "socket path too long (${#sock} > 107): $sock"
	if is_root; then
		chown -R postgres: "$DIR"
		runuser -u postgres -- test -w "$DIR" ||
			die "user postgres cannot write $DIR (is a parent directory private?)"
	fi

	if running; then
		die "cluster in $DIR is already running; stop it first"
	fi

	if [ ! -f "$DIR/data/PG_VERSION" ]; then
		as_pg "$PGBIN/initdb" -D "$DIR/data" --auth=trust -U postgres \
			-E UTF8 --locale=C --no-sync >"$DIR/initdb.log" 2>&1 ||
			fail "initdb failed" "$DIR/initdb.log"
		echo "include_if_exists = 'harness.conf'" >>"$DIR/data/postgresql.conf"
	fi

	{
		echo "# written by $me at every start"
		echo "listen_addresses = '127.0.0.1'"
		echo "port = $port"
		echo "unix_socket_directories = $(quote_guc "$DIR")"
		for kv in "$@"; do
			echo "${kv%%=*} = $(quote_guc "${kv#*=}")"
		done
	} >"$DIR/data/harness.conf"
	echo "$port" >"$DIR/port"
	if is_root; then
		chown postgres: "$DIR/data/harness.conf" "$DIR/port"
		[ ! -e "$DIR/initdb.log" ] || chown postgres: "$DIR/initdb.log"
	fi

	as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -l "$DIR/postgres.log" -w -t 60 \
		start >/dev/null 2>&1 || fail "pg_ctl start failed" "$DIR/postgres.log"

	local i
	for ((i = 0; i < 60; i++)); do
		if "$PGBIN/pg_isready" -q -h "$DIR" -p "$port" -U postgres -d postgres; then
			return 0
		fi
		sleep 0.5
	done
	as_pg "$PGBIN/pg_ctl" -D "$DIR/data" stop -m immediate >/dev/null 2>&1 || true
	fail "server started but is not accepting connections" "$DIR/postgres.log"
}

cmd_stop() {
	[ -d "$DIR" ] || return 0
	DIR=$(cd "$DIR" && pwd -P)
	running || return 0
	if ! as_pg timeout -k 5 70 "$PGBIN/pg_ctl" -D "$DIR/data" stop -m fast -w -t 60 \
		>/dev/null 2>&1; then
		# A wedged backend must not leave the cluster running.
		as_pg "$PGBIN/pg_ctl" -D "$DIR/data" stop -m immediate -w -t 30 \
			>/dev/null 2>&1 || true
	fi
	running && fail "could not stop the cluster in $DIR" "$DIR/postgres.log"
	return 0
}

cmd_psql() {
	DIR=$(cd "$DIR" && pwd -P)
	[ -f "$DIR/port" ] || die "no cluster in $DIR (run start first)"
	local port
	port=$(<"$DIR/port")
	local -a argv=("$PGBIN/psql" -X -h "$DIR" -p "$port" -U postgres)
	# Keep the caller's cwd so relative paths in psql args (-f file) work,
	# unless postgres cannot enter it (psql then warns on every call).
	if is_root; then
		runuser -u postgres -- test -x . 2>/dev/null || cd "$DIR"
		exec runuser -u postgres -- "${argv[@]}" "$@"
	else
		exec "${argv[@]}" "$@"
	fi
}

[ $# -ge 2 ] || usage
cmd=$1 DIR=$2
shift 2
case $cmd in
start) cmd_start "$@" ;;
stop)
	[ $# -eq 0 ] || usage
	cmd_stop
	;;
psql) cmd_psql "$@" ;;
*) usage ;;
esac
