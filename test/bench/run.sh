#!/usr/bin/env bash
# The benchmark suite, in one run on this machine, against real servers each
# benchmark starts on 127.0.0.1 (and stops):
#   1. application overhead: pgbench inserts into orders, without and with
#      the outbox trigger                               (pgbench_overhead.sh)
#   2. relay throughput vs a rabbitmq-c pipelined-confirm publisher and a
#      per-row synchronous relay in C                   (relay_throughput.sh)
#   3. consumer apply rate vs raw rabbitmq-c consume+ack (consumer_throughput.sh)
#   4. end to end across two clusters: order commit -> dispatch commit
#      latency at fixed offered rates, and the maximum sustained rate
#                                                       (end_to_end.sh)
#   5. the relay's drain rate in steady state (after bursts, with history,
#      with a snapshot held) vs the same ceiling   (relay_steady_state.sh)
#   6. the write path alone, workers off: plain inserts, a hand-written
#      plpgsql outbox trigger, mqtx's trigger          (write_path.sh)
#   7. retention: one pass with a history kept, vs 0.3.0's statement, and
#      a soak at a fixed rate with a short retention, sizes sampled
#                                                       (retention.sh)
# The consumer benchmark also runs with 1,000,000 rows in mqtx.inbox
# (200,000 with --quick) against an empty inbox.
# Prints a table with the targets, and writes results.csv, e2e_rates.csv
# and bench.png (gnuplot) into the output directory.  A benchmark, not a
# test: its exit status says whether it ran, not whether targets were met.
#
#   sudo test/bench/run.sh [--quick] [--out DIR] [--report]
#
#   --quick     smaller sizes, at least 3 rounds (~15 minutes instead of ~40)
#   --out DIR   where to write the results (default test/bench/results)
#   --report    run nothing: print the table and plot again from DIR's
#               results.csv (after a benchmark run on its own appended to it
#               with BENCH_CSV=DIR/results.csv: the last value of a metric
#               counts)
set -euo pipefail

bench=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$bench/../.." && pwd)
out=$bench/results
QUICK=0
REPORT=0
while [ $# -gt 0 ]; do
	case $1 in
	--quick) QUICK=1 ;;
	--report) REPORT=1 ;;
	--out) out=$2; shift ;;
	*) sed -n 's/^#   //p' "$0" >&2; exit 2 ;;
	esac
	shift
done

mkdir -p "$out"
out=$(cd "$out" && pwd)
export BENCH_CSV=$out/results.csv BENCH_DIR=$out

if [ $REPORT -eq 0 ]; then
	[ "$(id -u)" -eq 0 ] || { echo "run it as root (sudo $0)" >&2; exit 1; }
	"$top/test/install_deps.sh" gnuplot-nox libpq-dev
	make -s -C "$top"
	make -s -C "$top" install
	make -s -C "$bench"

	echo "benchmark,metric,value,unit" >"$BENCH_CSV"
	: >"$out/bench.log"

	if [ $QUICK -eq 1 ]; then
		# Fewer rows, never fewer rounds than 3: one round's ratio is one
		# ceiling run's, and this broker's pace varies by a fifth from one run
		# to the next (a --quick relay/ceiling of 0.35 was one slow round).
		overhead_args=(10 4 3)
		relay_args=(20000 3)
		consumer_args=(10000 3)
		e2e_args=(--seconds 10)
		steady_args=(--quick)
		write_args=(10 4 3)
		retention_args=(180 1000 30 200000)
		inbox_rows=200000
	else
		overhead_args=(20 4 3)
		relay_args=(40000 3)
		consumer_args=(20000 3)
		e2e_args=(--seconds 20)
		steady_args=()
		write_args=(15 4 5)
		retention_args=(600 2000 60 1000000)
		inbox_rows=1000000
	fi

	run() {
		echo
		echo "######## $*"
		"$@" 2>&1 | tee -a "$out/bench.log"
	}
	run "$bench/pgbench_overhead.sh" "${overhead_args[@]}"
	run "$bench/relay_throughput.sh" "${relay_args[@]}"
	INBOX_ROWS=$inbox_rows run "$bench/consumer_throughput.sh" "${consumer_args[@]}"
	run "$bench/end_to_end.sh" "${e2e_args[@]}"
	run "$bench/relay_steady_state.sh" ${steady_args[@]+"${steady_args[@]}"}
	run "$bench/write_path.sh" "${write_args[@]}"
	run "$bench/retention.sh" "${retention_args[@]}"
fi

# ---- the table -------------------------------------------------------------

value() { awk -F, -v b="$1" -v m="$2" '$1 == b && $2 == m {v = $3} END {print (v == "" ? "n/a" : v)}' "$BENCH_CSV"; }
# verdict VALUE OP TARGET: "met" or "missed"
verdict() {
	awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN {
		if (v == "n/a") { print "n/a"; exit }
		ok = (op == ">=") ? (v + 0 >= t + 0) : (v + 0 < t + 0)
		print ok ? "met" : "MISSED" }'
}
lowest() { awk 'BEGIN { m = "" } { for (i = 1; i <= NF; i++) if ($i != "n/a" && (m == "" || $i + 0 < m + 0)) m = $i }
	END { print (m == "" ? "n/a" : m) }' <<<"$*"; }
row() { printf '%-52s %-26s %-12s %s\n' "$@"; }

machine="$(nproc) cores ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), $(. /etc/os-release && echo "$PRETTY_NAME"), PostgreSQL $(pg_config --version | awk '{print $2}'), RabbitMQ $(dpkg-query -W -f='${Version}' rabbitmq-server | cut -d- -f1)"
e2e_rate=$(value e2e rate)
{
	echo
	echo "mqtx benchmarks, $(date -u '+%Y-%m-%d %H:%M UTC'), $machine"
	echo
	row "benchmark" "measured" "target" ""
	row "1. pgbench tps, plain / with outbox trigger" "$(value overhead plain_tps) / $(value overhead trigger_tps)" "" ""
	row "   ratio" "$(value overhead ratio)" ">= 0.85" "$(verdict "$(value overhead ratio)" '>=' 0.85)"
	row "   with the broker stopped: tps / ratio" "$(value overhead trigger_alone_tps) / $(value overhead ratio_alone)" "" ""
	row "2. msg/s: ceiling / relay / per-row relay" "$(value relay ceiling_msgs) / $(value relay relay_msgs) / $(value relay perrow_msgs)" "" ""
	row "   relay / ceiling" "$(value relay relay_over_ceiling)" ">= 0.8" "$(verdict "$(value relay relay_over_ceiling)" '>=' 0.8)"
	row "   relay / per-row relay" "$(value relay relay_over_perrow)" ">= 15" "$(verdict "$(value relay relay_over_perrow)" '>=' 15)"
	row "3. msg/s: raw consume+ack / mqtx consumer" "$(value consumer raw_msgs) / $(value consumer mqtx_msgs)" "" ""
	row "   mqtx / raw" "$(value consumer mqtx_over_raw)" ">= 0.5" "$(verdict "$(value consumer mqtx_over_raw)" '>=' 0.5)"
	row "4. end to end at $e2e_rate orders/s: p50 ms" "$(value e2e p50_ms)" "< 10" "$(verdict "$(value e2e p50_ms)" '<' 10)"
	row "   p95 ms" "$(value e2e p95_ms)" "" ""
	row "   p99 ms" "$(value e2e p99_ms)" "< 50" "$(verdict "$(value e2e p99_ms)" '<' 50)"
	row "   maximum sustained rate, orders/s" "$(value e2e max_sustained)" "" ""
	steady_min=$(lowest "$(value steady bursts_an_over_ceiling)" "$(value steady hist_analyzed_over_ceiling)")
	row "5. relay/ceiling after bursts / with history" "$(value steady bursts_an_over_ceiling) / $(value steady hist_analyzed_over_ceiling)" ">= 0.9" "$(verdict "$steady_min" '>=' 0.9)"
	held_min=$(lowest "$(value steady held_hist_over_ceiling)" "$(value steady held_long_over_ceiling)")
	row "   snapshot held over 1 / 3 drains (history)" "$(value steady held_hist_over_ceiling) / $(value steady held_long_over_ceiling)" ">= 0.6" "$(verdict "$held_min" '>=' 0.6)"
	row "6. tps, workers off: plain / plpgsql / mqtx" "$(value write_path plain_tps) / $(value write_path plpgsql_tps) / $(value write_path mqtx_tps)" "" ""
	row "   mqtx / hand-written plpgsql trigger" "$(value write_path mqtx_vs_plpgsql)" ">= 1.1" "$(verdict "$(value write_path mqtx_vs_plpgsql)" '>=' 1.1)"
	row "   mqtx / plain" "$(value write_path mqtx_vs_plain)" ">= 0.85" "$(verdict "$(value write_path mqtx_vs_plain)" '>=' 0.85)"
	row "   consumer with inbox history / empty" "$(value consumer inbox_history_over_empty)" ">= 0.9" "$(verdict "$(value consumer inbox_history_over_empty)" '>=' 0.9)"
	row "7. retention pass ms, idle / 1000 rows" "$(value retention idle_pass_ms) / $(value retention batch_pass_ms)" "" ""
	row "   0.3.0's statement, idle / 1000 rows" "$(value retention idle_pass_0_3_ms) / $(value retention batch_pass_0_3_ms)" "" ""
	row "   soak MB outbox / inbox at 2/3 and end" "$(value retention soak_outbox_mb_two_thirds)-$(value retention soak_outbox_mb_end) / $(value retention soak_inbox_mb_two_thirds)-$(value retention soak_inbox_mb_end)" "" ""
} | tee "$out/summary.txt"

# ---- the plot --------------------------------------------------------------

plot_data=$out/throughput.dat
{
	echo "ceiling $(value relay ceiling_msgs)"
	echo "relay $(value relay relay_msgs)"
	echo "per-row $(value relay perrow_msgs)"
	echo "raw-consume $(value consumer raw_msgs)"
	echo "consumer $(value consumer mqtx_msgs)"
} | sed 's/n\/a/0/' >"$plot_data"

if [ -s "$out/e2e_rates.csv" ]; then
	gnuplot <<-GP
		set terminal pngcairo size 1200,500 font ",10"
		set output "$out/bench.png"
		set multiplot layout 1,2 title "mqtx, $machine" font ",9"
		set title "throughput (msg/s)"
		set style fill solid 0.6
		set boxwidth 0.6
		set yrange [0:*]
		set grid ytics
		unset key
		plot "$plot_data" using 0:2:xtic(1) with boxes lc rgb "#4477aa", \
		     "" using 0:2:(sprintf("%d", \$2)) with labels offset 0,0.7
		set title "end to end: order commit -> dispatch commit"
		set datafile separator ","
		set bmargin 5
		set xlabel "orders/s offered (achieved by pgbench)" offset 0,-1
		set ylabel "latency (ms)"
		set logscale y
		set yrange [*:*]
		set key top left
		plot "$out/e2e_rates.csv" using 1:3:xtic(sprintf("%d\\n(%d)", \$1, \$2)) skip 1 \
		         with linespoints title "p50", \
		     "" using 1:4 skip 1 with linespoints title "p95", \
		     "" using 1:5 skip 1 with linespoints title "p99"
		unset multiplot
	GP
	echo
	echo "written: $out/results.csv, $out/e2e_rates.csv, $out/summary.txt, $out/bench.png"
else
	echo "no end-to-end rates to plot ($out/e2e_rates.csv missing)" >&2
fi
