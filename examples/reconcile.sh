#!/usr/bin/env bash
# Reconcile the order service with the dispatch service: every order placed
# must be dispatched exactly once, nothing may be dispatched that was not
# ordered, no message may be left behind on either side.  Prints what it
# finds and exits 1 if any of it is wrong, 0 if all is well.
#
#   examples/reconcile.sh ORDER_CONNINFO DISPATCH_CONNINFO
#
# e.g. examples/reconcile.sh 'host=127.0.0.1 port=5432 dbname=shop' \
#                            'host=127.0.0.1 port=5433 dbname=dispatch'
set -euo pipefail

[ $# -eq 2 ] || {
	sed -n 's/^#   //p' "$0" >&2
	exit 2
}
order_db=$1
dispatch_db=$2

if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/psql" ]; then
	psql_bin=$(pg_config --bindir)/psql
else
	psql_bin=psql
fi
q() {
	local db=$1
	shift
	"$psql_bin" -X -q -At -F ' ' -v ON_ERROR_STOP=1 "$db" "$@"
}

placed_ids=$(mktemp /tmp/mqtx-reconcile.XXXXXX)
trap 'rm -f "$placed_ids"' EXIT
q "$order_db" -c "COPY (SELECT order_id FROM orders) TO STDOUT" >"$placed_ids"

# Orders side: every message the orders produced must have left the outbox.
read -r outbox_pending outbox_failed < <(q "$order_db" -c "
	SELECT count(*) FILTER (WHERE status = 'pending'),
	       count(*) FILTER (WHERE status = 'failed')
	FROM mqtx.outbox")

# Dispatch side, against the list of orders placed.  A duplicate can only
# show up as an error: the unique index refuses a second dispatch of the
# same order, so a message applied twice would fail with that index's name
# and be retried, then dead-lettered.
report=$(q "$dispatch_db" <<SQL
CREATE TEMP TABLE placed (order_id bigint PRIMARY KEY);
\copy placed FROM '$placed_ids'
SELECT 'placed', count(*) FROM placed;
SELECT 'dispatched', count(*) FROM dispatch;
SELECT 'missing', count(*) FROM placed p
	WHERE NOT EXISTS (SELECT FROM dispatch d WHERE d.order_id = p.order_id);
SELECT 'unexpected', count(*) FROM dispatch d
	WHERE NOT EXISTS (SELECT FROM placed p WHERE p.order_id = d.order_id);
SELECT 'duplicates',
	(SELECT count(*) - count(DISTINCT order_id) FROM dispatch)
	+ (SELECT count(*) FROM mqtx.dead_letter WHERE error_message LIKE '%dispatch_order_id_key%')
	+ (SELECT count(*) FROM mqtx.consumer_attempts WHERE last_error LIKE '%dispatch_order_id_key%');
SELECT 'dead_letters', count(*) FROM mqtx.dead_letter;
SELECT 'retrying', count(*) FROM mqtx.consumer_attempts;
SELECT 'redrive_pending', count(*) FROM mqtx.outbox WHERE status <> 'published';
SELECT 'missing_ids', coalesce(string_agg(order_id::text, ',' ORDER BY order_id), '-')
	FROM (SELECT order_id FROM placed p
	      WHERE NOT EXISTS (SELECT FROM dispatch d WHERE d.order_id = p.order_id)
	      ORDER BY order_id LIMIT 20) m;
SELECT 'unexpected_ids', coalesce(string_agg(order_id::text, ',' ORDER BY order_id), '-')
	FROM (SELECT order_id FROM dispatch d
	      WHERE NOT EXISTS (SELECT FROM placed p WHERE p.order_id = d.order_id)
	      ORDER BY order_id LIMIT 20) u;
SQL
)
value() { awk -v k="$1" '$1 == k {print $2}' <<<"$report"; }

printf '%-44s %8s\n' "orders placed (order cluster)" "$(value placed)"
printf '%-44s %8s\n' "orders dispatched (dispatch cluster)" "$(value dispatched)"
printf '%-44s %8s\n' "placed but not dispatched" "$(value missing)"
printf '%-44s %8s\n' "dispatched but never placed" "$(value unexpected)"
printf '%-44s %8s\n' "duplicate dispatches" "$(value duplicates)"
printf '%-44s %8s\n' "dead letters" "$(value dead_letters)"
printf '%-44s %8s\n' "messages still being retried" "$(value retrying)"
printf '%-44s %8s\n' "order events not yet published" "$outbox_pending"
printf '%-44s %8s\n' "order events failed (gave up)" "$outbox_failed"
printf '%-44s %8s\n' "redriven messages not yet published" "$(value redrive_pending)"

failed=0
check() {
	local what=$1 got=$2
	if [ "$got" != 0 ]; then
		echo "FAIL: $what: $got" >&2
		failed=1
	fi
}
check "orders placed but not dispatched (first ids: $(value missing_ids))" "$(value missing)"
check "dispatches without an order (first ids: $(value unexpected_ids))" "$(value unexpected)"
check "duplicate dispatches" "$(value duplicates)"
check "dead letters left" "$(value dead_letters)"
check "messages still being retried" "$(value retrying)"
check "order events not published" "$outbox_pending"
check "order events failed" "$outbox_failed"
check "redriven messages not published" "$(value redrive_pending)"
if [ "$(value placed)" = 0 ]; then
	echo "FAIL: no orders were placed" >&2
	failed=1
fi

if [ $failed -eq 0 ]; then
	echo "OK: all $(value placed) orders dispatched exactly once"
fi
exit $failed
