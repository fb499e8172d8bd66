#!/usr/bin/env bash
# What enqueueing costs the application's transaction, with the workers off
# (only the write path is measured), in one run on this machine: pgbench
# places orders (examples/place_order.sql, one INSERT per transaction) into
#   (a) plain:    orders_plain, the table without a trigger;
#   (b) plpgsql:  orders_hand, whose AFTER INSERT trigger is the outbox
#                 trigger people write by hand: a plpgsql function that
#                 checks the payload's size as JSON text and inserts
#                 to_jsonb(NEW) into hand_outbox, a table made LIKE
#                 mqtx.outbox INCLUDING ALL (the same columns, defaults,
#                 constraints and indexes);
#   (c) mqtx:     orders, with mqtx.outbox_trigger() (examples/order_service.sql).
# The three alternate ROUNDS times; each run starts from empty tables and a
# checkpoint, so all pay the same full-page writes.  The medians and the
# ratios are printed.  PostgreSQL keeps its default durability (fsync = on,
# synchronous_commit = on).  A benchmark, not a test: it asserts only that
# every order produced its outbox row.
#
#   sudo test/bench/write_path.sh [SECONDS=15] [CLIENTS=4] [ROUNDS=3]
#
# Environment knobs:
#   BENCH_CSV=FILE   also append "benchmark,metric,value,unit" rows to FILE
#   HISTORY=N        keep N published rows in both outboxes (default 0): the
#                    write path with a week of history behind it
#
# Needs mqtx built and installed (make && sudo make install).
set -euo pipefail

DURATION=${1:-15}
CLIENTS=${2:-4}
ROUNDS=${3:-3}
HISTORY=${HISTORY:-0}

# shellcheck source=servers.sh
. "$(dirname "$0")/servers.sh"

examples=$here/../../examples

start_servers mqtx.relay_enabled=off mqtx.consumer_enabled=off

psql_ -f "$examples/order_service.sql" >/dev/null
psql_ >/dev/null <<'SQL'
CREATE TABLE orders_plain (LIKE orders INCLUDING ALL);
CREATE TABLE orders_hand (LIKE orders INCLUDING ALL);
CREATE TABLE hand_outbox (LIKE mqtx.outbox INCLUDING ALL);
CREATE FUNCTION hand_outbox_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
	payload jsonb := to_jsonb(NEW);
BEGIN
	IF octet_length(payload::text) > 1048576 THEN
		RAISE EXCEPTION 'outbox payload is too large';
	END IF;
	INSERT INTO hand_outbox (exchange, routing_key, payload)
		VALUES (TG_ARGV[0], TG_ARGV[1], payload);
	RETURN NULL;
END
$$;
CREATE TRIGGER orders_hand_outbox AFTER INSERT ON orders_hand
	FOR EACH ROW EXECUTE FUNCTION hand_outbox_trigger('orders', 'order.created');
SQL
[ "$(psql_ -c "SELECT count(*) FROM hand_outbox")" = 0 ]

for t in plain hand; do
	sed "s/^INSERT INTO orders /INSERT INTO orders_$t /" "$examples/place_order.sql" \
		>"$work/place_order_$t.sql"
	grep -q "^INSERT INTO orders_$t " "$work/place_order_$t.sql"
done
cp "$examples/place_order.sql" "$work/place_order_mqtx.sql"
chmod 644 "$work"/place_order_*.sql

# Published history, as the relay and retention leave it: HISTORY rows
# marked published, then vacuumed, in both outboxes.
fill_history() {
	[ "$HISTORY" -gt 0 ] || return 0
	local t
	for t in mqtx.outbox hand_outbox; do
		psql_ -c "INSERT INTO $t (exchange, routing_key, payload, status, published_at)
			SELECT 'orders', 'order.created', jsonb_build_object('order_id', g, 'user_id', g % 1000,
				   'content', jsonb_build_object('city', 'Berlin')), 'published', now()
			FROM generate_series(1, $HISTORY) g" >/dev/null
	done
	psql_ -c "VACUUM ANALYZE mqtx.outbox" -c "VACUUM ANALYZE hand_outbox" >/dev/null
}

# run VARIANT: prints the tps (without initial connection time).
run() {
	psql_ -c "TRUNCATE orders, orders_plain, orders_hand, mqtx.outbox, hand_outbox" >/dev/null
	fill_history
	psql_ -c "CHECKPOINT" >/dev/null
	pgbench_tps "$work/place_order_$1.sql" -c "$CLIENTS" -j "$CLIENTS" -T "$DURATION"
}

# check ORDERS OUTBOX: every order has its message, and nothing else is new
check() {
	local orders messages
	orders=$(psql_ -c "SELECT count(*) FROM $1")
	messages=$(psql_ -c "SELECT count(*) FROM $2 WHERE status = 'pending'")
	[ "$orders" = "$messages" ] ||
		{ echo "$1: $orders orders but $messages pending messages in $2" >&2; exit 1; }
}

plains=() hands=() mqtxs=()
for round in $(seq 1 "$ROUNDS"); do
	p=$(run plain)
	h=$(run hand)
	check orders_hand hand_outbox
	m=$(run mqtx)
	check orders mqtx.outbox
	echo "round $round: plain $p tps, plpgsql trigger $h tps, mqtx trigger $m tps" >&2
	plains+=("$p") hands+=("$h") mqtxs+=("$m")
done

plain=$(median_of "${plains[@]}")
hand=$(median_of "${hands[@]}")
mq=$(median_of "${mqtxs[@]}")

echo
echo "write path, workers off, pgbench -M prepared -c $CLIENTS -j $CLIENTS -T $DURATION," \
	"$ROUNDS rounds (medians), $(nproc) cores, $HISTORY rows of history"
printf '%-44s %10s tps\n' "plain table (no trigger)" "$plain"
printf '%-44s %10s tps\n' "hand-written plpgsql outbox trigger" "$hand"
printf '%-44s %10s tps\n' "mqtx.outbox_trigger" "$mq"
printf '%-44s %10s\n' "mqtx / plpgsql" "$(ratio "$mq" "$hand")"
printf '%-44s %10s\n' "mqtx / plain" "$(ratio "$mq" "$plain")"
printf '%-44s %10s\n' "plpgsql / plain" "$(ratio "$hand" "$plain")"
bench_record write_path plain_tps "$plain" tps
bench_record write_path plpgsql_tps "$hand" tps
bench_record write_path mqtx_tps "$mq" tps
bench_record write_path mqtx_vs_plpgsql "$(ratio "$mq" "$hand")" ratio
bench_record write_path mqtx_vs_plain "$(ratio "$mq" "$plain")" ratio
