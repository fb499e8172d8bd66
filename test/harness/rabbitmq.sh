#!/usr/bin/env bash
# Throwaway RabbitMQ nodes for the mqtx tests.  Each node keeps all of its
# state (mnesia, logs, config, cookie, HOME, pid file) in one directory and
# gets its own epmd, so several nodes can run side by side; the nodes of a
# cluster share their seed's epmd instead (see "Clusters" below).
#
#   rabbitmq.sh start DIR [PORT] [--join SEED_DIR]
#                                  start (or restart) the node; prints AMQP_PORT=N
#                                  (and AMQPS_PORT=N per TLS listener)
#   rabbitmq.sh stop DIR           stop the node, and its epmd if no other node
#                                  uses it any more (idempotent)
#   rabbitmq.sh kill DIR           SIGKILL the node (fault tests); epmd stays
#   rabbitmq.sh ctl DIR ARGS...    rabbitmqctl -n NODE ARGS... with the node's env
#   rabbitmq.sh env DIR            print DIR/env
#   rabbitmq.sh pid DIR            print the node's OS pid; exit 1 if it is down
#   rabbitmq.sh check              exit 0 if RabbitMQ is installed where this
#                                  script runs it from, else say what is missing
#
# Knob: MQTX_RABBITMQ_START_TIMEOUT (seconds, default 60; for a cluster
# member it covers waiting for the seed and joining too).
#
# Clusters: `start DIR --join SEED_DIR` makes DIR's node a member of the
# cluster whose first node (the seed) lives in SEED_DIR.  The seed is an
# ordinary node (started without --join); a member cannot be a seed.  The
# first start records the seed in DIR/cluster, and later starts honour it
# with or without --join (a different seed is refused).  Several members and
# their seed may be started at the same time (that is what makes a cluster
# quick to bring up): a member waits for SEED_DIR/env to appear, boots on its
# own, waits for the seed to be running, then does stop_app, join_cluster
# SEED, start_app -- once: DIR/cluster then says JOINED, and from then on the
# member's mnesia knows the cluster and every start (after stop or kill)
# rejoins by itself.  Joins into one seed take turns (SEED_DIR/join.lock),
# one node at a time as in RabbitMQ's clustering guide, rather than count
# on concurrent join_cluster calls being safe.
#   Erlang nodes on one host find each other through the epmd at their
# ERL_EPMD_PORT, so a member takes its seed's port (and so do its CLI
# commands, which run with DIR/env).  That epmd belongs to no single node:
# `stop` of any node takes it down only when no beam (node or rabbitmqctl)
# using its port is left, i.e. the last node of the cluster to stop does,
# whichever that is; a `start` holds the same lock (SEED_DIR/epmd.lock, or
# DIR/epmd.lock for a standalone node) from launching until its beam exists,
# so a stop cannot find "no users" in between and pull epmd from under a
# booting node.
#   A member that was stopped or killed boots only once another node of its
# cluster runs (mnesia waits for its peers); a whole cluster that was
# stopped should be started again all at once.
#
# Extra configuration: if DIR/extra.conf exists, its lines are appended to the
# generated rabbitmq.conf at every start (so edit it between stop and start).
# That is how a test adds a TLS listener, e.g.
#   listeners.ssl.1 = 127.0.0.1:PORT
#   ssl_options.cacertfile = /abs/ca.crt
#   ssl_options.certfile = /abs/server.crt
#   ssl_options.keyfile = /abs/server.key
#   ssl_options.verify = verify_peer
#   ssl_options.fail_if_no_peer_cert = false
# The test picks PORT (a free loopback port).  start refuses a TLS port that is
# already taken, checks that the node user can read every ssl_options.*file,
# waits until each TLS listener accepts connections too, and prints its port.
#
# Why the detours:
#  * /usr/sbin/rabbitmq-server insists on su'ing to rabbitmq and on
#    /var/lib/rabbitmq, so we call /usr/lib/rabbitmq/bin/* directly.
#  * runuser resets HOME/USER/... and we do not want the caller's RABBITMQ_*
#    or ERL_* variables to leak in either, so every node/CLI command runs under
#    `env -i` with exactly the variables recorded in DIR/env.
#  * The node and rabbitmqctl must share a cookie; if none exists both race to
#    create one, so a fixed cookie is written before the first start.
#  * Ports are recorded in DIR/env so a restart reuses them (clients and
#    tests keep working across stop/start and kill/start).
#  * Lock files are held on fds 8 (join) and 9 (epmd), which every node and
#    CLI command is started with closed: a detached node that inherited one
#    would hold the lock for its whole life.
set -euo pipefail

# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

RMQ_BIN=/usr/lib/rabbitmq/bin
COOKIE=MQTXTESTHARNESSCOOKIE
START_TIMEOUT=${MQTX_RABBITMQ_START_TIMEOUT:-60}
ENV_VARS="RABBITMQ_NODENAME RABBITMQ_NODE_IP_ADDRESS RABBITMQ_NODE_PORT
RABBITMQ_DIST_PORT RABBITMQ_MNESIA_BASE RABBITMQ_LOG_BASE RABBITMQ_CONFIG_FILE
RABBITMQ_ADVANCED_CONFIG_FILE RABBITMQ_CONF_ENV_FILE
RABBITMQ_ENABLED_PLUGINS_FILE RABBITMQ_PID_FILE RABBITMQ_CTL_ERL_ARGS HOME
ERL_EPMD_PORT ERL_EPMD_ADDRESS AMQP_PORT"

me=$(basename "$0")
die() { echo "$me: $*" >&2; exit 1; }
usage() {
	sed -n 's/^#   \(rabbitmq\.sh \)/\1/p' "$0" >&2
	exit 2
}

is_root() { [ "$(id -u)" -eq 0 ]; }

# Resolve DIR to an absolute path; the node's cwd and every path in env must
# not depend on where the caller happens to be.
abs_dir() {
	local d=$1
	[ -d "$d" ] || die "no such directory: $d"
	(cd "$d" && pwd -P)
}

load_env() {
	[ -f "$DIR/env" ] || return 1
	# shellcheck disable=SC1091
	. "$DIR/env"
	NODE=$RABBITMQ_NODENAME
}

# User the node runs as: root hands it to `rabbitmq`; afterwards whoever
# owns DIR is the one whose cookie and processes we deal with.
node_user() {
	if is_root; then stat -c %U "$DIR"; else id -un; fi
}

# Run a command as the node user with exactly the node's environment.
run_node_env() {
	local user=$1; shift
	local -a envv=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
		LANG=C.UTF-8 LC_ALL=C.UTF-8 USER="$user" LOGNAME="$user")
	local v
	for v in $ENV_VARS; do envv+=("$v=${!v}"); done
	# 8>&- 9>&-: see the lock files above.
	if is_root && [ "$user" != root ]; then
		(cd "$DIR" && runuser -u "$user" -- env -i "${envv[@]}" "$@" 8>&- 9>&-)
	else
		(cd "$DIR" && env -i "${envv[@]}" "$@" 8>&- 9>&-)
	fi
}

ctl() {
	run_node_env "$(node_user)" "$RMQ_BIN/rabbitmqctl" -n "$NODE" "$@"
}

# ctl_bounded SECONDS ARGS...: rabbitmqctl that cannot hang the harness.
ctl_bounded() {
	local secs=$1; shift
	ctl_node_bounded "$NODE" "$secs" "$@"
}

# ctl_node_bounded NODE SECONDS ARGS...: the same, aimed at another node of
# the cluster (same epmd, same cookie, so our own env reaches it).
ctl_node_bounded() {
	local node=$1 secs=$2; shift 2
	run_node_env "$(node_user)" timeout -k 5 "$secs" "$RMQ_BIN/rabbitmqctl" -n "$node" "$@"
}

# Those of the given pids that are still alive (zombies count as gone).
# Needed because an exiting process stops matching pids_with_env (its
# environ becomes unreadable) before it has released its sockets.
alive() {
	local p st
	for p in "$@"; do
		st=""
		read -r st 2>/dev/null <"/proc/$p/stat" || continue
		st=${st##*) }
		case ${st%% *} in Z | X | x) ;; *) echo "$p" ;; esac
	done
}

# pids of processes with the given comm whose environment contains the given
# exact VAR=value entry.  Matching on the environment (not the command line,
# which holds neither the node name nor the epmd port) keeps us from touching
# any other node or epmd on the machine.
pids_with_env() {
	local comm=$1 entry=$2 p c e
	local -a envs
	# Builtins only: forking per /proc entry makes a scan take seconds here.
	for p in /proc/[0-9]*; do
		c=""
		read -r c 2>/dev/null <"$p/comm" || continue
		[ "$c" = "$comm" ] || continue
		envs=()
		mapfile -d '' envs 2>/dev/null <"$p/environ" || continue
		for e in "${envs[@]}"; do
			if [ "$e" = "$entry" ]; then
				echo "${p#/proc/}"
				break
			fi
		done
	done
}

node_pids() {
	local p="" c=""
	{
		# The node writes its pid without a trailing newline.
		read -r p 2>/dev/null <"$RABBITMQ_PID_FILE" || true
		if [[ $p =~ ^[0-9]+$ ]] && read -r c 2>/dev/null <"/proc/$p/comm" &&
			[ "$c" = beam.smp ]; then
			echo "$p"
		fi
		pids_with_env beam.smp "RABBITMQ_NODENAME=$NODE"
	} | sort -u | only_alive
}

epmd_pids() {
	pids_with_env epmd "ERL_EPMD_PORT=$ERL_EPMD_PORT" | only_alive
}

# Every beam (a node of the cluster, or a rabbitmqctl talking to one) that
# uses our epmd: while there is one, epmd must stay.
epmd_users() {
	pids_with_env beam.smp "ERL_EPMD_PORT=$ERL_EPMD_PORT" | only_alive
}

only_alive() {
	local -a pids
	mapfile -t pids
	alive "${pids[@]}"
}

# wait_gone SECONDS FUNC: poll until nothing FUNC listed (now or at the
# start) is alive.
wait_gone() {
	local secs=$1 fn=$2 i
	local -a seen
	read -r -a seen <<<"$($fn | tr '\n' ' ')"
	for ((i = 0; i <= secs * 5; i++)); do
		# shellcheck disable=SC2046 # pids are plain numbers
		read -r -a seen <<<"$(alive "${seen[@]}" $($fn) | sort -u | tr '\n' ' ')"
		[ ${#seen[@]} -eq 0 ] && return 0
		sleep 0.2
	done
	return 1
}

signal_all() {
	local sig=$1 fn=$2 pids
	pids=$($fn)
	[ -n "$pids" ] || return 0
	# shellcheck disable=SC2086
	kill -"$sig" $pids 2>/dev/null || true
}

port_open() {
	(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# TLS listener ports in a config file ("listeners.ssl.N = [ADDR:]PORT").
ssl_ports() {
	[ -f "$1" ] || return 0
	sed -n 's/^[[:space:]]*listeners\.ssl\.[^=[:space:]]*[[:space:]]*=[[:space:]]*\([^[:space:]]*:\)\{0,1\}\([0-9][0-9]*\)[[:space:]]*$/\2/p' "$1"
}

# Files named by ssl_options.*file settings in a config file.
ssl_files() {
	[ -f "$1" ] || return 0
	sed -n 's/^[[:space:]]*ssl_options\.[a-z_]*file[[:space:]]*=[[:space:]]*\(.*[^[:space:]]\)[[:space:]]*$/\1/p' "$1"
}

log_tail() {
	local f
	for f in "$DIR"/log/*.log "$DIR"/log/await_startup.out "$DIR"/log/join.out; do
		[ -s "$f" ] || continue
		echo "---- tail of $f ----"
		tail -n 30 "$f"
	done
}

# DIR/cluster: CLUSTER_SEED_DIR (empty for a standalone node or a seed) and
# CLUSTER_JOINED (yes once join_cluster has succeeded).
read_cluster() {
	CLUSTER_SEED_DIR="" CLUSTER_JOINED=""
	[ -f "$DIR/cluster" ] || return 0
	# shellcheck disable=SC1091
	. "$DIR/cluster"
}

# recorded_seed D: the seed dir in D/cluster of another node (empty: none).
recorded_seed() {
	# shellcheck disable=SC2034 # both are set by the file
	local CLUSTER_SEED_DIR="" CLUSTER_JOINED=""
	if [ -f "$1/cluster" ]; then
		# shellcheck disable=SC1091
		. "$1/cluster"
	fi
	echo "$CLUSTER_SEED_DIR"
}

write_cluster() {
	local tmp="$DIR/cluster.tmp"
	{
		echo "# written by $me; sourceable"
		printf 'CLUSTER_SEED_DIR=%q\n' "$CLUSTER_SEED_DIR"
		printf 'CLUSTER_JOINED=%q\n' "$CLUSTER_JOINED"
	} >"$tmp"
	mv -f "$tmp" "$DIR/cluster"
}

# The directory whose epmd.lock guards our epmd: the seed's for a member.
epmd_lock_dir() {
	echo "${CLUSTER_SEED_DIR:-$DIR}"
}

# take_lock FD FILE: flock FILE on fd FD (8 or 9), waiting at most
# START_TIMEOUT.  A lock file that cannot be created (its directory is gone)
# is done without: there is then nobody left to race with.
take_lock() {
	local fd=$1 file=$2
	if ! { : >>"$file"; } 2>/dev/null; then
		echo "$me: warning: cannot create lock file $file; going on without it" >&2
		return 0
	fi
	case $fd in
	8) exec 8>>"$file" ;;
	9) exec 9>>"$file" ;;
	*) die "take_lock: bad fd $fd" ;;
	esac
	flock -w "$START_TIMEOUT" "$fd" || die "timed out waiting for lock $file"
}

release_lock() {
	case $1 in
	8) exec 8>&- ;;
	9) exec 9>&- ;;
	esac
}

# seed_env SEED_DIR: the seed's node name and epmd port, "NODE PORT" (empty
# until the seed's first start has written its env).
seed_env() {
	[ -f "$1/env" ] || return 0
	# shellcheck disable=SC1091
	(. "$1/env" && echo "$RABBITMQ_NODENAME $ERL_EPMD_PORT")
}

# await_node NODE DEADLINE OUT: wait until NODE runs (rabbitmqctl
# await_startup, which fails fast until NODE has registered with epmd), at
# most until SECONDS reaches DEADLINE; the last attempt's output is in OUT.
await_node() {
	local node=$1 deadline=$2 out=$3 left
	while :; do
		left=$((deadline - SECONDS))
		[ $left -ge 1 ] || return 1
		if ctl_node_bounded "$node" $((left + 5)) -q await_startup -t "$left" \
			>"$out" 2>&1; then
			return 0
		fi
		sleep 1
	done
}

# Make this freshly booted node a member of the seed's cluster.  Only its
# first boot gets here; afterwards its mnesia lists the cluster's nodes and
# the node rejoins by itself at every boot.  On failure JOIN_ERR says why.
join_seed() {
	local seed=$1 deadline=$2 out=$DIR/log/join.out cmd
	JOIN_ERR=""
	take_lock 8 "$CLUSTER_SEED_DIR/join.lock"
	# In a parallel start the seed may still be booting.
	if ! await_node "$seed" "$deadline" "$out"; then
		JOIN_ERR="seed node $seed is not running"
	else
		for cmd in stop_app "join_cluster $seed" start_app; do
			# shellcheck disable=SC2086 # cmd: words without blanks
			if ! ctl_bounded $((deadline - SECONDS + 5)) -q $cmd >"$out" 2>&1; then
				JOIN_ERR="rabbitmqctl $cmd failed"
				break
			fi
		done
	fi
	release_lock 8
	[ -z "$JOIN_ERR" ] || return 1
	CLUSTER_JOINED=yes
	write_cluster
}

write_env() {
	local tmp="$DIR/env.tmp" v
	{
		echo "# written by $me; sourceable"
		for v in $ENV_VARS; do printf 'export %s=%q\n' "$v" "${!v}"; done
	} >"$tmp"
	mv -f "$tmp" "$DIR/env"
}

cmd_start() {
	local want_port="" join=""
	while [ $# -gt 0 ]; do
		case $1 in
		--join)
			[ $# -ge 2 ] || usage
			join=$2
			shift 2
			;;
		--join=*)
			join=${1#--join=}
			shift
			;;
		*)
			[ -z "$want_port" ] || usage
			want_port=$1
			shift
			;;
		esac
	done
	[ -z "$want_port" ] || [[ $want_port =~ ^[0-9]+$ ]] || die "bad port: $want_port"
	mkdir -p "$DIR"
	DIR=$(abs_dir "$DIR")
	# A member's budget covers waiting for its seed and joining it too.
	local deadline=$((SECONDS + START_TIMEOUT))

	local node="" amqp="" dist="" epmd="" had_env=""
	if load_env; then
		had_env=1
		node=$RABBITMQ_NODENAME amqp=$RABBITMQ_NODE_PORT
		dist=$RABBITMQ_DIST_PORT epmd=$ERL_EPMD_PORT
		if [ -n "$(node_pids)" ]; then
			die "node $node in $DIR is already running (AMQP port $amqp); stop it first"
		fi
	fi
	read_cluster
	if [ -n "$join" ]; then
		join=$(abs_dir "$join")
		[ "$join" != "$DIR" ] || die "$DIR cannot join itself"
		if [ -n "$CLUSTER_SEED_DIR" ] && [ "$CLUSTER_SEED_DIR" != "$join" ]; then
			die "$DIR is a member of the cluster of $CLUSTER_SEED_DIR, not of $join"
		fi
		# join_cluster would wipe such a node's data, and its own epmd
		# (kept by a kill) would be left behind: use a new directory.
		[ -n "$CLUSTER_SEED_DIR" ] || [ -z "$had_env" ] ||
			die "$DIR already holds a standalone node; a member needs a fresh directory"
		# One level only: then the seed's epmd.lock is everybody's.
		[ -z "$(recorded_seed "$join")" ] ||
			die "$join is itself a cluster member; join its seed instead"
		if [ -z "$CLUSTER_SEED_DIR" ]; then
			CLUSTER_SEED_DIR=$join
			write_cluster
		fi
	fi
	local seed="" seed_info=""
	if [ -n "$CLUSTER_SEED_DIR" ]; then
		# The seed may be starting at this very moment: its env, with its
		# node name and epmd port, appears early in its start.
		while seed_info=$(seed_env "$CLUSTER_SEED_DIR") && [ -z "$seed_info" ]; do
			[ $SECONDS -lt "$deadline" ] ||
				die "seed $CLUSTER_SEED_DIR has no node (no env) after ${START_TIMEOUT}s"
			sleep 0.1
		done
		[ -n "$seed_info" ] || die "cannot read $CLUSTER_SEED_DIR/env"
		seed=${seed_info% *}
		# Always the seed's current port: all of the cluster must meet in
		# one epmd.
		epmd=${seed_info#* }
	fi
	if [ -z "$node" ]; then
		# Stable per directory (mnesia lives under a node-named subdir), and
		# readable in ps/log output.
		local tag sum
		tag=$(basename "$DIR" | tr -c 'A-Za-z0-9_\n' '_' | cut -c1-20)
		sum=$(printf %s "$DIR" | cksum | cut -d' ' -f1)
		node="mqtx_${tag}_${sum}@localhost"
	fi
	[ -n "$want_port" ] && amqp=$want_port
	# TLS listeners come from DIR/extra.conf, with ports the caller chose;
	# keep the ports we pick away from them.
	local -a tls_ports tls_files
	mapfile -t tls_ports < <(ssl_ports "$DIR/extra.conf")
	mapfile -t tls_files < <(ssl_files "$DIR/extra.conf")
	local -a need=() got=()
	[ -n "$amqp" ] || need+=(amqp)
	[ -n "$dist" ] || need+=(dist)
	[ -n "$epmd" ] || need+=(epmd)
	if [ ${#need[@]} -gt 0 ]; then
		# shellcheck disable=SC2086 # unset ports must vanish
		read -r -a got <<<"$(free_ports ${#need[@]} $amqp $dist $epmd "${tls_ports[@]}")"
		local i
		for i in "${!need[@]}"; do printf -v "${need[$i]}" %s "${got[$i]}"; done
	fi
	local p
	for p in "${tls_ports[@]}"; do
		case " $amqp $dist $epmd " in
		*" $p "*) die "TLS port $p in $DIR/extra.conf clashes with the node's own ports ($amqp $dist $epmd)" ;;
		esac
	done

	export RABBITMQ_NODENAME=$node
	export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
	export RABBITMQ_NODE_PORT=$amqp
	export RABBITMQ_DIST_PORT=$dist
	export RABBITMQ_MNESIA_BASE=$DIR/mnesia
	export RABBITMQ_LOG_BASE=$DIR/log
	export RABBITMQ_CONFIG_FILE=$DIR/rabbitmq.conf
	# Point these at files of our own so /etc/rabbitmq never leaks in.
	export RABBITMQ_ADVANCED_CONFIG_FILE=$DIR/advanced.config
	export RABBITMQ_CONF_ENV_FILE=$DIR/rabbitmq-env.conf
	export RABBITMQ_ENABLED_PLUGINS_FILE=$DIR/enabled_plugins
	export RABBITMQ_PID_FILE=$DIR/rabbitmq.pid
	# The CLI's own distribution listener would otherwise bind 0.0.0.0.
	export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
	export HOME=$DIR/home
	export ERL_EPMD_PORT=$epmd
	export ERL_EPMD_ADDRESS=127.0.0.1
	export AMQP_PORT=$amqp
	NODE=$node

	mkdir -p "$DIR/mnesia" "$DIR/log" "$HOME"
	touch "$DIR/log/startup.log"
	cat >"$RABBITMQ_CONFIG_FILE" <<EOF
listeners.tcp.1 = 127.0.0.1:$amqp
distribution.listener.interface = 127.0.0.1
distribution.listener.port_range.min = $dist
distribution.listener.port_range.max = $dist
# A nearly full test disk must not block publishers.
disk_free_limit.absolute = 50MB
log.file.level = info
log.console = false
EOF
	if [ -f "$DIR/extra.conf" ]; then
		{
			echo "# ---- from $DIR/extra.conf ----"
			cat "$DIR/extra.conf"
			echo
		} >>"$RABBITMQ_CONFIG_FILE"
	fi
	echo '[].' >"$RABBITMQ_ENABLED_PLUGINS_FILE"
	: >"$RABBITMQ_CONF_ENV_FILE"
	[ -e "$RABBITMQ_ADVANCED_CONFIG_FILE" ] || echo '[].' >"$RABBITMQ_ADVANCED_CONFIG_FILE"
	local cookie=$HOME/.erlang.cookie
	if [ "$(cat "$cookie" 2>/dev/null)" != "$COOKIE" ]; then
		rm -f "$cookie"
		(umask 077 && printf %s "$COOKIE" >"$cookie")
	fi
	chmod 0400 "$cookie"
	rm -f "$RABBITMQ_PID_FILE"
	write_env

	local user
	if is_root; then
		user=rabbitmq
		chown -R rabbitmq:rabbitmq "$DIR"
		runuser -u rabbitmq -- test -w "$DIR" ||
			die "user rabbitmq cannot write $DIR (is a parent directory private?)"
	else
		user=$(id -un)
	fi
	local f
	for f in "${tls_files[@]}"; do
		if is_root && [ "$user" != root ]; then
			runuser -u "$user" -- test -r "$f"
		else
			test -r "$f"
		fi || die "user $user cannot read $f (named in the TLS settings)"
	done

	for p in "$amqp" "${tls_ports[@]}"; do
		if port_open "$p"; then
			die "port $p on 127.0.0.1 is already in use by something else"
		fi
	done

	# -detached sends the VM's stdout to /dev/null, so a boot failure that
	# happens before the node's logging is up (e.g. dist port taken) is only
	# visible as the "Slogan" of its crash dump; keep that in the log dir.
	local dump=$DIR/log/erl_crash.dump
	rm -f "$dump" "$DIR/log/await_startup.out" "$DIR/log/join.out"
	# Until our beam exists, a stop of another node sharing our epmd must
	# not conclude that epmd has no users left (see the header).
	take_lock 9 "$(epmd_lock_dir)/epmd.lock"
	if ! run_node_env "$user" env ERL_CRASH_DUMP="$dump" \
		"$RMQ_BIN/rabbitmq-server" -detached \
		</dev/null >>"$DIR/log/startup.log" 2>&1; then
		release_lock 9
		log_tail >&2
		die "rabbitmq-server failed to launch"
	fi

	local missing=0 up="" why=""
	while :; do
		if [ $SECONDS -ge $deadline ]; then
			why="did not come up within ${START_TIMEOUT}s"
			break
		fi
		if [ -e "$dump" ]; then
			why="crashed while booting"
			break
		fi
		if [ -z "$(node_pids)" ]; then
			# erlexec needs a moment to become beam.smp after forking.
			missing=$((missing + 1))
			if [ $missing -ge 15 ]; then
				why="exited while booting"
				break
			fi
			sleep 0.2
			continue
		fi
		release_lock 9
		missing=0
		if [ -z "$up" ]; then
			local left=$((deadline - SECONDS))
			[ $left -lt 1 ] && left=1
			# Fails fast until the node has registered with epmd; keep
			# only the last attempt's output for the failure report.
			if ctl_bounded $((left + 5)) -q await_startup -t "$left" \
				>"$DIR/log/await_startup.out" 2>&1; then
				up=1
			else
				sleep 1
				continue
			fi
		fi
		if [ -n "$seed" ] && [ "$CLUSTER_JOINED" != yes ]; then
			if ! join_seed "$seed" "$deadline"; then
				why="could not join the cluster of $seed: $JOIN_ERR"
				break
			fi
		fi
		local all_open=1
		for p in "$amqp" "${tls_ports[@]}"; do
			port_open "$p" || { all_open=""; break; }
		done
		if [ -n "$all_open" ]; then
			echo "AMQP_PORT=$amqp"
			for p in "${tls_ports[@]}"; do echo "AMQPS_PORT=$p"; done
			return 0
		fi
		sleep 0.2
	done

	release_lock 9
	{
		echo "$me: node $node $why"
		log_tail
		if [ -e "$dump" ]; then
			local i
			for ((i = 0; i < 25; i++)); do
				grep -q '^Slogan:' "$dump" 2>/dev/null && break
				sleep 0.2
			done
			echo "---- crash dump $dump ----"
			grep -m1 '^Slogan:' "$dump" || true
		fi
	} >&2
	cmd_stop >/dev/null 2>&1 || true
	exit 1
}

cmd_stop() {
	DIR=$(abs_dir "$DIR" 2>/dev/null) || return 0
	load_env || return 0
	read_cluster
	if [ -n "$(node_pids)" ]; then
		ctl_bounded 30 -q stop "$RABBITMQ_PID_FILE" >/dev/null 2>&1 || true
		if ! wait_gone 15 node_pids; then
			signal_all TERM node_pids
			wait_gone 10 node_pids || { signal_all KILL node_pids; wait_gone 5 node_pids; } ||
				die "could not stop node $NODE"
		fi
	fi
	# Our node is gone; epmd goes too unless another beam still uses it.
	# Each stop checks only after its own node is gone, so of several
	# stopping at once the last one sees no user left.
	take_lock 9 "$(epmd_lock_dir)/epmd.lock"
	if [ -n "$(epmd_pids)" ] && [ -z "$(epmd_users)" ]; then
		run_node_env "$(node_user)" timeout -k 2 10 epmd -kill >/dev/null 2>&1 || true
		if ! wait_gone 5 epmd_pids; then
			signal_all TERM epmd_pids
			wait_gone 5 epmd_pids || { signal_all KILL epmd_pids; wait_gone 5 epmd_pids; } ||
				die "could not stop epmd on port $ERL_EPMD_PORT"
		fi
	fi
	release_lock 9
	rm -f "$RABBITMQ_PID_FILE"
}

cmd_kill() {
	DIR=$(abs_dir "$DIR")
	load_env || die "no node in $DIR"
	signal_all KILL node_pids
	wait_gone 10 node_pids || die "node $NODE survived SIGKILL"
}

cmd_pid() {
	DIR=$(abs_dir "$DIR")
	load_env || die "no node in $DIR"
	local pids
	pids=$(node_pids)
	[ -n "$pids" ] || return 1
	echo "$pids"
}

# The programs start and ctl run, and what the tests skip without.
cmd_check() {
	local prog
	for prog in rabbitmq-server rabbitmqctl; do
		[ -x "$RMQ_BIN/$prog" ] || {
			echo "no $RMQ_BIN/$prog"
			exit 1
		}
	done
}

[ "${1:-}" != check ] || { [ $# -eq 1 ] || usage; cmd_check; exit 0; }
[ $# -ge 2 ] || usage
cmd=$1 DIR=$2
shift 2
case $cmd in
start)
	cmd_start "$@"
	;;
stop)
	[ $# -eq 0 ] || usage
	cmd_stop
	;;
kill)
	[ $# -eq 0 ] || usage
	cmd_kill
	;;
pid)
	[ $# -eq 0 ] || usage
	cmd_pid
	;;
ctl)
	DIR=$(abs_dir "$DIR")
	load_env || die "no node in $DIR (run start first)"
	ctl "$@"
	;;
env)
	DIR=$(abs_dir "$DIR")
	[ -f "$DIR/env" ] || die "no node in $DIR"
	cat "$DIR/env"
	;;
*) usage ;;
esac
