#!/usr/bin/env bash
# The relay's drain rate in steady state, against the raw rabbitmq-c
# ceiling measured side by side in the same run, on this machine (issue 14).
# relay_throughput.sh measures one backlog on a fresh, empty outbox; real
# outboxes keep published history, see bursts, and live next to long
# snapshots.  Scenarios, each a drain of rows enqueued in one transaction
# (mqtx.publish), timed from that transaction's commit (commit timestamp) to
# the last published_at:
#   1.  fresh: N rows on an empty outbox;
#   1b. the same, but waited for with servers.sh's outbox_wait_drained, the
#       waiter relay_throughput.sh uses: one DO loop, which holds the xmin
#       horizon of its start for the whole drain (a method check);
#   2.  after bursts: 20 transactions of 1,000 rows relayed one by one
#       (each drained before the next), then one of BURST rows: its drain;
#   2b. the same with an ANALYZE between the two (what autovacuum does
#       within a minute: the statistics then say nothing is pending);
#   3a. history: H rows already published (inserted directly, a few
#       INSERT ... SELECT, autovacuum off on the outbox so that it is never
#       analyzed: statistics as stale as they get), then N pending rows;
#   3b. the same after VACUUM ANALYZE (statistics that say nothing is
#       pending: the state of an analyzed outbox when a burst arrives);
#   4a. fresh, with a REPEATABLE READ transaction holding its snapshot
#       (BEGIN; SELECT 1;, from before the enqueue to the end of the drain);
#   4b. history as in 3b, with the snapshot held the same way;
#   4c. the same, one snapshot held over 3 drains of N rows: the last one
#       (its claims walk the 2N rows published before it, and its own).
# Every drain is preceded by a ceiling run (ceiling_publisher, as many
# messages, window 1000) against the same broker, the queue purged before
# each.  A scenario's ratio is its median drain rate over the median of
# all the run's ceiling runs (the broker's pace varies by some 20% from one
# ceiling run to the next; the median of 9 to 27 runs is steadier); its
# ratio to the median of the ceilings paired with it is shown too.
# ROUNDS rounds of 1, 1b, 2, 2b and 4a alternate; then the history is
# loaded once and 3a, 3b, 4b and 4c run ROUNDS times each.
#
# For each drain the relay's claim is explained: EXPLAIN (ANALYZE, BUFFERS)
# of src/relay.c's claim_sql (read from the source, so it follows changes),
# PREPAREd and EXECUTEd with $1 = 1000 and $2 = '{}', in a session with the
# relay's planner settings (src/worker.c's index_order_settings, which
# mqtx_relay_main turns off for its session: enable_seqscan,
# enable_bitmapscan, enable_sort, jit), at two points:
#   first  inside the enqueuing transaction, just before its commit (the
#          state the relay's first claim meets: same statistics, same
#          table; the rows are this session's own);
#   mid    from another session, once row N/2 of the drain is published
#          (the relay's claims then walk what it has already published).
# Each point shows the custom plan ($1 known), the generic plan
# (plan_cache_mode = force_generic_plan: what the relay's prepared plan can
# become after five executions) and, at the first point, the plan a
# session with default settings gets.  Round 1's plans are printed; every
# round's go to $BENCH_DIR/steady_state_plans.txt when BENCH_DIR is set.
# Per drain it also prints the CPU used over the drain, in % of one core
# (2 cores = 200%): by the relay process, the rest of the cluster (the
# waiters, the mid-drain EXPLAIN, WAL writer, autovacuum...), the broker,
# and everything outside them (other work on the machine: a drain with a
# high "outside" figure was disturbed); and per ceiling run, the broker's
# and the rest's (the publisher's, mostly).
#
# The script's own waits hold no snapshot for more than one 50 ms sleep
# (a DO loop that COMMITs between polls): a waiter that holds one is
# scenario 4 by accident (see 1b).
#
#   sudo test/bench/relay_steady_state.sh [--quick] [--rows N] [--history H]
#        [--burst B] [--rounds R]
#
#   defaults    N 50000, H 1000000, B 50000, R 3   (~9 minutes on 2 cores)
#   --quick     N 50000, H 200000,  B 50000, R 1   (~3 minutes)
#
# Environment knobs:
#   BENCH_CSV=FILE   also append "benchmark,metric,value,unit" rows to FILE
#   BENCH_DIR=DIR    also write every round's full plans to DIR
#
# A benchmark, not a test: it asserts nothing but that every row was
# published.  Needs mqtx built and installed (make && sudo make install)
# and test/bench built (make -C test/bench).
set -euo pipefail

N=50000
H=1000000
BURST=50000
ROUNDS=3
while [ $# -gt 0 ]; do
	case $1 in
	--quick) N=50000 H=200000 BURST=50000 ROUNDS=1 ;;
	--rows) N=$2; shift ;;
	--history) H=$2; shift ;;
	--burst) BURST=$2; shift ;;
	--rounds) ROUNDS=$2; shift ;;
	*) sed -n 's/^#   //p' "$0" >&2; exit 2 ;;
	esac
	shift
done
for v in "$N" "$H" "$BURST" "$ROUNDS"; do
	[[ $v =~ ^[1-9][0-9]*$ ]] || { echo "not a positive integer: $v" >&2; exit 2; }
done
BODY_SIZE=200
WINDOW=1000
SMALL_TXNS=20
SMALL_ROWS=1000
HELD_DRAINS=3
CLAIM_LIMIT=1000
started=$SECONDS

# shellcheck source=servers.sh
. "$(dirname "$0")/servers.sh"

make -s -C "$here" ceiling_publisher >/dev/null
start_servers mqtx.retention=-1 track_commit_timestamp=on
psql_ -c "CREATE EXTENSION mqtx" \
	-c "SELECT mqtx.declare_exchange('bench.ex', 'direct')" \
	-c "SELECT mqtx.declare_queue('bench.q')" \
	-c "SELECT mqtx.bind('bench.q', 'bench.ex', 'bench')" >/dev/null

plans_file=
if [ -n "${BENCH_DIR:-}" ]; then
	plans_file=$BENCH_DIR/steady_state_plans.txt
	: >"$plans_file"
fi

# ---- the claim, as the relay runs it ----------------------------------------

relay_c=$here/../../src/relay.c
# claim_sql's C string literal, concatenated
claim_sql=$(awk '
	/claim_sql =[ \t]*$/ { on = 1; next }
	on {
		line = $0
		last = (line ~ /";[ \t]*$/)
		sub(/^[ \t]*"/, "", line); sub(/";?[ \t]*$/, "", line)
		gsub(/\\"/, "\"", line)
		printf "%s", line
		if (last) exit
	}' "$relay_c" 2>/dev/null || true)
# shellcheck disable=SC2016 # $1 and $2: the statement's parameters, literally
if [[ $claim_sql != *"FROM mqtx.outbox"* || $claim_sql != *'$1'* || $claim_sql != *'$2'* ]]; then
	echo "warning: could not read claim_sql from $relay_c; using the copy of b923a02" >&2
	claim_sql="SELECT id, message_id::text, exchange, routing_key, payload::text, headers, \
extract(epoch FROM created_at)::bigint, xmin FROM mqtx.outbox \
WHERE status = 'pending' AND next_attempt_at <= pg_catalog.now() \
AND id NOT IN (SELECT pg_catalog.unnest(\$2::bigint[])) ORDER BY next_attempt_at, id LIMIT \$1"
fi
# the relay session's planner settings: src/worker.c's index_order_settings,
# each turned off by mqtx_plan_index_order_for_session
relay_settings=$(awk '
	/index_order_settings\[\] = \{/ { on = 1; next }
	on && /^\};/ { exit }
	on {
		while (match($0, /"[a-z_]+"/)) {
			printf "SET LOCAL %s = '\''off'\'';\n", substr($0, RSTART + 1, RLENGTH - 2)
			$0 = substr($0, RSTART + RLENGTH)
		}
	}' "$here/../../src/worker.c" 2>/dev/null || true)
if [ -z "$relay_settings" ]; then
	echo "warning: could not read the relay's settings from src/worker.c; using those of b923a02" >&2
	relay_settings="SET LOCAL enable_seqscan = 'off';
SET LOCAL enable_bitmapscan = 'off';
SET LOCAL enable_sort = 'off';
SET LOCAL jit = 'off';"
fi
relay_resets=$(sed -E -n "s/^SET LOCAL ([a-z_]+) = .*/RESET \1;/p" <<<"$relay_settings")
prepare_claim="PREPARE bench_claim(int, bigint[]) AS $claim_sql;"
explain_claim="EXPLAIN (ANALYZE, BUFFERS) EXECUTE bench_claim($CLAIM_LIMIT, '{}');"
# SQL: the relay's settings, then the custom and the generic plan; in a
# transaction (SET LOCAL), each plan after a marker line for plan_section
explain_as_relay() {
	local tag=$1
	cat <<-SQL
		$relay_settings
		\\echo ==== $tag custom
		$explain_claim
		SET LOCAL plan_cache_mode = force_generic_plan;
		\\echo ==== $tag generic
		$explain_claim
		RESET plan_cache_mode;
	SQL
}

# plan_section FILE TAG: the lines of one EXPLAIN
plan_section() {
	awk -v t="==== $2" '$0 == t { on = 1; next } /^==== / { on = 0 } on' "$1"
}
exec_ms() { sed -n 's/^Execution Time: \([0-9.]*\) ms$/\1/p' | head -1; }
# the top of a plan, and its timing
plan_top() {
	awk 'NR <= 12 && !/^(Planning|Execution)/ { print "    " $0 }
		/^(Planning Time|Execution Time)/ { print "    " $0 }'
}
# node lines only, and the timing
plan_brief() {
	awk 'NR == 1 || /->/ { print "    " $0 } /^Execution Time/ { print "    " $0 }'
}

# ---- measuring ----------------------------------------------------------------

# the id the next row gets is above this one
last_id() {
	psql_ -c "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END
		FROM $(psql_ -c "SELECT pg_get_serial_sequence('mqtx.outbox', 'id')")"
}

relay_pid() { psql_ -c "SELECT pid FROM mqtx.relay_stats"; }
broker_pid() { local p; read -r p <"$work/mq/rabbitmq.pid"; echo "$p"; }
# CPU ticks (utime + stime) of one process
proc_ticks() {
	local s
	read -r s 2>/dev/null <"/proc/$1/stat" || { echo 0; return; }
	s=${s##*) }
	local -a f
	read -r -a f <<<"$s"
	echo $((f[11] + f[12]))
}
# CPU ticks of the whole cluster: the postmaster, the children it has
# reaped (cutime, cstime) and those alive
pg_ticks() {
	local pm s t=0 p
	local -a f
	read -r pm <"$work/pg/data/postmaster.pid"
	read -r s <"/proc/$pm/stat"
	s=${s##*) }
	read -r -a f <<<"$s"
	t=$((f[11] + f[12] + f[13] + f[14]))
	for p in /proc/[0-9]*/stat; do
		read -r s 2>/dev/null <"$p" || continue
		s=${s##*) }
		read -r -a f <<<"$s"
		[ "${f[1]}" = "$pm" ] && t=$((t + f[11] + f[12]))
	done
	echo "$t"
}
# busy and total ticks of the machine
machine_ticks() {
	local cpu u n s i w q sq st
	read -r cpu u n s i w q sq st _ </proc/stat
	echo "$((u + n + s + q + sq + st)) $((u + n + s + i + w + q + sq + st))"
}
# gone PID: waits (up to 2 s) until the process is gone and reaped
gone() {
	local i
	for ((i = 0; i < 200; i++)); do
		[ -e "/proc/$1" ] || return 0
		sleep 0.01
	done
}
# Waits (up to 2 s) until the postmaster has reaped its exited children: a
# zombie's CPU shows in /proc only once it lands in the parent's cutime.
pg_settle() {
	local pm s p i z
	local -a f
	read -r pm <"$work/pg/data/postmaster.pid"
	for ((i = 0; i < 100; i++)); do
		z=0
		for p in /proc/[0-9]*/stat; do
			read -r s 2>/dev/null <"$p" || continue
			s=${s##*) }
			read -r -a f <<<"$s"
			[ "${f[1]}" = "$pm" ] && [ "${f[0]}" = Z ] && z=1 && break
		done
		[ $z = 0 ] && return 0
		sleep 0.02
	done
}
# relay, broker, cluster, machine busy, machine total
cpu_sample() {
	pg_settle
	echo "$(proc_ticks "$rpid") $(proc_ticks "$bpid") $(pg_ticks) $(machine_ticks)"
}

# Waits until rows ]BASE, LAST] are all published, holding no snapshot
# between polls (COMMIT in the loop): first the last row, then the range.
wait_drained() {
	psql_ -c "SET statement_timeout = '15min'" -c "DO \$\$ BEGIN
		LOOP
			IF coalesce((SELECT status FROM mqtx.outbox WHERE id = $2), 'pending') <> 'pending' THEN
				EXIT WHEN NOT EXISTS (SELECT FROM mqtx.outbox
				                      WHERE id > $1 AND id <= $2 AND status = 'pending');
			END IF;
			COMMIT;
			PERFORM pg_sleep(0.05);
		END LOOP;
	END \$\$" >/dev/null
}

# The mid-drain EXPLAIN, run in the background: waits (as above) for row
# MID to be published, then explains the claim.
mid_explain() {
	psql_ <<-SQL
		SET application_name = 'bench_mid_explain';
		SET statement_timeout = '15min';
		DO \$\$ BEGIN
			WHILE coalesce((SELECT status FROM mqtx.outbox WHERE id = $1), 'pending') = 'pending' LOOP
				COMMIT;
				PERFORM pg_sleep(0.02);
			END LOOP;
		END \$\$;
		$prepare_claim
		SELECT 'at=' || extract(epoch FROM clock_timestamp());
		BEGIN;
		$(explain_as_relay mid)
		COMMIT;
	SQL
}

# A REPEATABLE READ transaction holding its snapshot, in the background,
# fed through a fifo; hold_stop commits it.
hold_start() {
	rm -f "$work/hold.fifo"
	mkfifo "$work/hold.fifo"
	psql_ <"$work/hold.fifo" >"$work/hold.out" 2>&1 &
	hold_pid=$!
	exec 3>"$work/hold.fifo"
	printf '%s\n' "SET application_name = 'bench_snapshot_holder';" \
		"BEGIN ISOLATION LEVEL REPEATABLE READ;" "SELECT 1;" >&3
	local i
	for ((i = 0; i < 100; i++)); do
		[ "$(psql_ -c "SELECT count(*) FROM pg_stat_activity
			WHERE application_name = 'bench_snapshot_holder' AND backend_xmin IS NOT NULL")" = 1 ] &&
			return 0
		sleep 0.1
	done
	echo "the snapshot holder did not take its snapshot" >&2
	exit 1
}
hold_age() {
	psql_ -c "SELECT age(backend_xmin) FROM pg_stat_activity
		WHERE application_name = 'bench_snapshot_holder'"
}
hold_stop() {
	echo "COMMIT;" >&3
	exec 3>&-
	wait "$hold_pid"
	rm -f "$work/hold.fifo"
}

stats_sql="SELECT 'stats=' || format('reltuples %s, relpages %s, live %s, dead %s, last analyze %s, outbox_due_idx %s',
	c.reltuples::bigint, c.relpages, s.n_live_tup, s.n_dead_tup,
	coalesce(to_char(greatest(s.last_analyze, s.last_autoanalyze), 'HH24:MI:SS'), 'never'),
	pg_size_pretty(pg_relation_size('mqtx.outbox_due_idx')))
	FROM pg_class c JOIN pg_stat_user_tables s ON s.relid = c.oid
	WHERE c.oid = 'mqtx.outbox'::regclass;"

# drain_run SCENARIO ROUND ROWS [WAITER]: enqueue ROWS rows in one
# transaction (explaining the claim before its commit), time the drain;
# appends "scenario rate first_ms mid_ms relay% broker% other%" to
# $work/results.  WAITER "servers" waits with servers.sh's
# outbox_wait_drained instead of wait_drained.
drain_run() {
	local scen=$1 round=$2 rows=$3 waiter=${4:-own}
	local base last mid fill before after rate unpublished first_ms mid_ms mid_at
	purge_queue bench.q
	base=$(last_id)
	last=$((base + rows))
	mid=$((base + rows / 2))
	mid_explain "$mid" >"$work/mid.out" 2>&1 3>&- &
	local mid_pid=$!
	read -r -a before_stats <<<"$(psql_ -c "SELECT published, retried, reconnects FROM mqtx.relay_stats" | tr '|' ' ')"
	psql_ >"$work/fill.out" <<-SQL
		$stats_sql
		$prepare_claim
		BEGIN;
		SELECT 'xid=' || pg_current_xact_id();
		SELECT 'pid=' || pg_backend_pid();
		SELECT 'count=' || count(mqtx.publish('bench.ex', 'bench',
		       jsonb_build_object('order_id', g, 'pad', repeat('x', $BODY_SIZE - 40))))
		FROM generate_series(1, $rows) g;
		SELECT 'last=' || max(id) FROM mqtx.outbox;
		$(explain_as_relay first)
		$relay_resets
		\\echo ==== first default
		$explain_claim
		COMMIT;
	SQL
	# the window starts once the enqueuing backend is gone: the CPU it
	# spent would otherwise land in the postmaster's cutime inside it
	gone "$(sed -n 's/^pid=//p' "$work/fill.out")"
	before=$(cpu_sample)
	[ "$(sed -n 's/^last=//p' "$work/fill.out")" = "$last" ] ||
		{ echo "ids of the enqueued rows are not $((base + 1))..$last" >&2; exit 1; }
	fill=$(sed -n 's/^xid=//p' "$work/fill.out")
	if [ "$waiter" = servers ]; then outbox_wait_drained; else wait_drained "$base" "$last"; fi
	sleep 0.1 # the waiter's backend exits
	after=$(cpu_sample)
	wait "$mid_pid" || { cat "$work/mid.out" >&2; exit 1; }
	read -r unpublished rate end_at <<<"$(psql_ -F ' ' -c "
		SELECT count(*) FILTER (WHERE status <> 'published'),
		       round($rows / extract(epoch FROM max(published_at)
		                             - pg_xact_commit_timestamp('$fill'::xid))::numeric, 0),
		       extract(epoch FROM max(published_at))
		FROM mqtx.outbox WHERE id > $base AND id <= $last")"
	[ "$unpublished" = 0 ] || { echo "$scen: $unpublished rows left unpublished" >&2; exit 1; }
	read -r -a after_stats <<<"$(psql_ -c "SELECT published, retried, reconnects FROM mqtx.relay_stats" | tr '|' ' ')"
	local note=""
	[ $((after_stats[0] - before_stats[0])) = "$rows" ] ||
		note+=" published-counter +$((after_stats[0] - before_stats[0]))"
	[ $((after_stats[1] - before_stats[1])) = 0 ] || note+=" retried +$((after_stats[1] - before_stats[1]))"
	[ $((after_stats[2] - before_stats[2])) = 0 ] || note+=" reconnects +$((after_stats[2] - before_stats[2]))"

	first_ms=$(plan_section "$work/fill.out" "first custom" | exec_ms)
	mid_ms=$(plan_section "$work/mid.out" "mid custom" | exec_ms)
	mid_at=$(sed -n 's/^at=//p' "$work/mid.out")
	local mid_note=""
	awk -v a="$mid_at" -v e="$end_at" 'BEGIN { exit !(a > e) }' && mid_note=" (mid EXPLAIN came after the drain)"
	# CPU over the drain, in % of one core: the relay, the rest of the
	# cluster, the broker, and everything else on the machine
	local -a b a
	read -r -a b <<<"$before"
	read -r -a a <<<"$after"
	local cpu
	cpu=$(awk -v r=$((a[0] - b[0])) -v k=$((a[1] - b[1])) -v pg=$((a[2] - b[2])) \
		-v busy=$((a[3] - b[3])) -v total=$((a[4] - b[4])) -v cores="$(nproc)" 'BEGIN {
		wall = total / cores            # ticks of one core over the window
		if (wall <= 0) wall = 1
		printf "%.0f %.0f %.0f %.0f", 100 * r / wall, 100 * (pg - r) / wall, 100 * k / wall,
			100 * (busy - pg - k) / wall }')
	echo "$scen $rate $first_ms $mid_ms $cpu" >>"$work/results"
	local -a c
	read -r -a c <<<"$cpu"
	printf '  %-13s round %s: %6s msg/s  claim first %s ms, mid %s ms%s  cpu %%: relay %s, other pg %s, broker %s, outside %s%s\n' \
		"$scen" "$round" "$rate" "$first_ms" "$mid_ms" "$mid_note" "${c[0]}" "${c[1]}" "${c[2]}" "${c[3]}" "$note" >&2

	{
		echo "######## $scen, round $round: $rows rows, $rate msg/s"
		sed -n 's/^stats=/outbox before the enqueue: /p' "$work/fill.out"
		for t in "first custom" "first generic" "first default"; do
			echo "-- claim plan, $t"
			plan_section "$work/fill.out" "$t"
		done
		for t in "mid custom" "mid generic"; do
			echo "-- claim plan, $t$mid_note"
			plan_section "$work/mid.out" "$t"
		done
	} >"$work/plans.$scen.$round"
	[ -z "$plans_file" ] || cat "$work/plans.$scen.$round" >>"$plans_file"
	if [ "$round" = 1 ]; then
		{
			echo
			echo "---- $scen, round 1: $rows rows, $rate msg/s"
			sed -n 's/^stats=/  outbox before the enqueue: /p' "$work/fill.out"
			echo "  first claim (in the enqueuing transaction), relay settings, custom plan:"
			plan_section "$work/fill.out" "first custom" | plan_top
			echo "  first claim, relay settings, generic plan:"
			plan_section "$work/fill.out" "first generic" | plan_brief
			echo "  first claim, default settings (a normal session):"
			plan_section "$work/fill.out" "first default" | plan_brief
			echo "  mid-drain claim (row $((rows / 2)) published)$mid_note, relay settings, custom plan:"
			plan_section "$work/mid.out" "mid custom" | plan_top
			echo "  mid-drain claim, generic plan:"
			plan_section "$work/mid.out" "mid generic" | plan_brief
		} >>"$work/plans_out"
	fi
}

# paired ceiling: "scenario rate" into $work/ceilings
ceiling_for() {
	local scen=$1 rows=$2 c before after
	purge_queue bench.q
	before=$(cpu_sample)
	c=$("$here/ceiling_publisher" --url "$url" --exchange bench.ex --routing-key bench \
		--count "$rows" --window "$WINDOW" --body-size "$BODY_SIZE" | msg_rate)
	after=$(cpu_sample)
	echo "$scen $c" >>"$work/ceilings"
	local -a b a
	read -r -a b <<<"$before"
	read -r -a a <<<"$after"
	echo "  $scen: ceiling $c msg/s  cpu %: broker $(awk -v k=$((a[1] - b[1])) \
		-v total=$((a[4] - b[4])) -v cores="$(nproc)" 'BEGIN {
		wall = total / cores; if (wall <= 0) wall = 1; printf "%.0f", 100 * k / wall }'), publisher and the rest $(awk \
		-v k=$((a[1] - b[1])) -v busy=$((a[3] - b[3])) -v total=$((a[4] - b[4])) -v cores="$(nproc)" 'BEGIN {
		wall = total / cores; if (wall <= 0) wall = 1; printf "%.0f", 100 * (busy - k) / wall }')" >&2
}

fresh_outbox() { psql_ -c "TRUNCATE mqtx.outbox" >/dev/null; }

# ---- the scenarios --------------------------------------------------------------

: >"$work/results"
: >"$work/ceilings"
: >"$work/plans_out"
relay_started=0
for ((i = 0; i < 100; i++)); do
	rpid=$(relay_pid)
	[ -n "$rpid" ] && [ "$rpid" != 0 ] && relay_started=1 && break
	sleep 0.1
done
[ $relay_started = 1 ] || { echo "no relay process" >&2; exit 1; }
bpid=$(broker_pid)

# the small transactions, each drained before the next, in one session
small_bursts() {
	psql_ -c "SET statement_timeout = '15min'" -c "DO \$\$
		DECLARE lo_id bigint; hi_id bigint;
		BEGIN
			FOR t IN 1..$SMALL_TXNS LOOP
				PERFORM mqtx.publish('bench.ex', 'bench',
				        jsonb_build_object('order_id', g, 'pad', repeat('x', $BODY_SIZE - 40)))
				FROM generate_series(1, $SMALL_ROWS) g;
				SELECT max(id) INTO hi_id FROM mqtx.outbox;
				lo_id := hi_id - $SMALL_ROWS;
				COMMIT;
				WHILE EXISTS (SELECT FROM mqtx.outbox
				              WHERE id > lo_id AND id <= hi_id AND status = 'pending') LOOP
					COMMIT;
					PERFORM pg_sleep(0.01);
				END LOOP;
			END LOOP;
		END \$\$" >/dev/null
}

for round in $(seq 1 "$ROUNDS"); do
	echo "round $round of $ROUNDS: fresh, fresh_xmin, bursts, bursts_an, held_fresh" >&2
	fresh_outbox
	ceiling_for fresh "$N"
	drain_run fresh "$round" "$N"

	fresh_outbox
	ceiling_for fresh_xmin "$N"
	drain_run fresh_xmin "$round" "$N" servers

	fresh_outbox
	ceiling_for bursts "$BURST"
	small_bursts
	drain_run bursts "$round" "$BURST"

	# the same, analyzed after the small transactions, as autovacuum
	# would within a minute (their 20,000 updates cross its threshold)
	fresh_outbox
	ceiling_for bursts_an "$BURST"
	small_bursts
	psql_ -c "ANALYZE mqtx.outbox" >/dev/null
	drain_run bursts_an "$round" "$BURST"

	fresh_outbox
	ceiling_for held_fresh "$N"
	hold_start
	drain_run held_fresh "$round" "$N"
	echo "  held_fresh: the held snapshot's xmin was $(hold_age) transactions old" >&2
	hold_stop
done

# History: H published rows, spread over the last six days, in INSERT ...
# SELECT statements of up to 250,000 rows; autovacuum off on the outbox so
# that nothing analyzes it behind our back.
echo "loading $H rows of published history" >&2
t_load=$SECONDS
fresh_outbox
psql_ -c "ALTER TABLE mqtx.outbox SET (autovacuum_enabled = off)" >/dev/null
for ((lo = 1; lo <= H; lo += 250000)); do
	hi=$((lo + 249999 > H ? H : lo + 249999))
	psql_ -c "INSERT INTO mqtx.outbox (exchange, routing_key, payload, status,
	                                   next_attempt_at, created_at, published_at)
		SELECT 'bench.ex', 'bench',
		       jsonb_build_object('order_id', g, 'pad', repeat('x', $BODY_SIZE - 40)),
		       'published', t, t, t + interval '3 ms'
		FROM generate_series($lo, $hi) g,
		     LATERAL (SELECT now() - interval '6 days' + g * (interval '6 days' / $H)) x(t)" >/dev/null
done
psql_ -c "CHECKPOINT" >/dev/null
echo "  loaded in $((SECONDS - t_load)) s" >&2

for round in $(seq 1 "$ROUNDS"); do
	ceiling_for hist_stale "$N"
	drain_run hist_stale "$round" "$N"
done

t_load=$SECONDS
psql_ -c "ALTER TABLE mqtx.outbox RESET (autovacuum_enabled)" -c "VACUUM ANALYZE mqtx.outbox" \
	-c "CHECKPOINT" >/dev/null
echo "  VACUUM ANALYZE in $((SECONDS - t_load)) s" >&2
for round in $(seq 1 "$ROUNDS"); do
	ceiling_for hist_analyzed "$N"
	drain_run hist_analyzed "$round" "$N"
done

for round in $(seq 1 "$ROUNDS"); do
	ceiling_for held_hist "$N"
	hold_start
	drain_run held_hist "$round" "$N"
	echo "  held_hist: the held snapshot's xmin was $(hold_age) transactions old" >&2
	hold_stop
done

# One snapshot held over HELD_DRAINS drains: the last one's claims walk
# everything published since the snapshot was taken.
for round in $(seq 1 "$ROUNDS"); do
	ceiling_for held_long "$N"
	hold_start
	for ((d = 1; d < HELD_DRAINS; d++)); do
		drain_run held_long_warmup "${round}w$d" "$N"
	done
	drain_run held_long "$round" "$N"
	echo "  held_long: the held snapshot's xmin was $(hold_age) transactions old" >&2
	hold_stop
done

# ---- the table ----------------------------------------------------------------

cat "$work/plans_out"

col() { awk -v s="$1" -v c="$2" '$1 == s { print $c }' "$work/results" | median; }
ceil() { awk -v s="$1" '$1 == s { print $2 }' "$work/ceilings" | median; }
label() {
	case $1 in
	fresh) echo "1.  fresh, $N rows" ;;
	fresh_xmin) echo "1b. fresh, waiter holding xmin (outbox_wait_drained)" ;;
	bursts) echo "2.  after ${SMALL_TXNS}x$SMALL_ROWS-row txns: one of $BURST rows" ;;
	bursts_an) echo "2b. the same, ANALYZE after the small txns" ;;
	hist_stale) echo "3a. history $H, never analyzed, $N rows" ;;
	hist_analyzed) echo "3b. history $H, VACUUM ANALYZE, $N rows" ;;
	held_fresh) echo "4a. fresh, RR snapshot held, $N rows" ;;
	held_hist) echo "4b. history $H analyzed, RR snapshot held" ;;
	held_long) echo "4c. the same, snapshot held over $HELD_DRAINS drains: last" ;;
	esac
}

echo
echo "relay steady state, ~$BODY_SIZE-byte persistent messages, durable queue, $ROUNDS round(s)" \
	"(medians), $(nproc) cores, ran $(((SECONDS - started) / 60)) min $(((SECONDS - started) % 60)) s"
ceiling=$(awk '{ print $2 }' "$work/ceilings" | median)
echo "ceiling (rabbitmq-c, window $WINDOW): median of the run's $(wc -l <"$work/ceilings") runs" \
	"$ceiling msg/s (from $(awk '{ print $2 }' "$work/ceilings" | sort -n | head -1)" \
	"to $(awk '{ print $2 }' "$work/ceilings" | sort -n | tail -1))"
bench_record steady ceiling_msgs "$ceiling" msg/s
row() { printf '%-54s %8s %6s %8s %6s %16s %17s\n' "$@"; }
row "scenario" "relay" "ratio" "paired" "ratio" "claim ms" "cpu % of a core"
row "" "msg/s" "" "ceiling" "paired" "first / mid" "rl/pg/mq/outside"
for s in fresh fresh_xmin bursts bursts_an hist_stale hist_analyzed held_fresh held_hist held_long; do
	c=$(ceil "$s")
	r=$(col "$s" 2)
	row "$(label "$s")" "$r" "$(ratio "$r" "$ceiling")" "$c" "$(ratio "$r" "$c")" \
		"$(col "$s" 3) / $(col "$s" 4)" "$(col "$s" 5)/$(col "$s" 6)/$(col "$s" 7)/$(col "$s" 8)"
	bench_record steady "${s}_msgs" "$r" msg/s
	bench_record steady "${s}_over_ceiling" "$(ratio "$r" "$ceiling")" ratio
	bench_record steady "${s}_paired_ceiling_msgs" "$c" msg/s
	bench_record steady "${s}_over_paired_ceiling" "$(ratio "$r" "$c")" ratio
	bench_record steady "${s}_claim_first_ms" "$(col "$s" 3)" ms
	bench_record steady "${s}_claim_mid_ms" "$(col "$s" 4)" ms
done
