#!/usr/bin/env bash
# Reconcile the order service with the dispatch service.  Every order placed
# must have reached a final state that agrees with the dispatch side:
# "dispatched" exactly when it was dispatched (once), "dispatch_failed" when
# the dispatch service gave it up; nothing may be dispatched that was not
# ordered, and no message may be left behind on either side.  Then it
# follows a few orders' messages across both services (mqtx.message_trail:
# one correlation id per order).  Prints what it finds and exits 1 if any
# of it is wrong, 0 if all is well.
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

placed=$(mktemp /tmp/mqtx-reconcile.XXXXXX)
trap 'rm -f "$placed"' EXIT
chmod 644 "$placed"
q "$order_db" -c "COPY (SELECT order_id, status FROM orders) TO STDOUT" >"$placed"

# Orders side: every event must have left the outbox, every answer applied.
order_report=$(q "$order_db" <<SQL
SELECT 'outbox_pending', count(*) FROM mqtx.outbox WHERE status = 'pending';
SELECT 'outbox_failed', count(*) FROM mqtx.outbox WHERE status = 'failed';
SELECT 'unanswered', count(*) FROM orders WHERE status = 'placed';
SELECT 'given_up', count(*) FROM orders WHERE status = 'dispatch_failed';
SELECT 'answers_dead', count(*) FROM mqtx.dead_letter;
SELECT 'answers_retrying', count(*) FROM mqtx.consumer_attempts;
SQL
)

# Dispatch side, against the list of orders placed and their states.  A
# duplicate can only show up as an error: the unique index refuses a second
# dispatch of the same order, so a message applied twice would fail with
# that index's name and be retried, then dead-lettered.
dispatch_report=$(q "$dispatch_db" <<SQL
CREATE TEMP TABLE placed (order_id bigint PRIMARY KEY, status text);
\copy placed FROM '$placed'
SELECT 'placed', count(*) FROM placed;
SELECT 'dispatched', count(*) FROM dispatch;
SELECT 'missing', count(*) FROM placed p
	WHERE p.status <> 'dispatch_failed'
	  AND NOT EXISTS (SELECT FROM dispatch d WHERE d.order_id = p.order_id);
SELECT 'unconfirmed', count(*) FROM dispatch d JOIN placed p USING (order_id)
	WHERE p.status <> 'dispatched';
SELECT 'unexpected', count(*) FROM dispatch d
	WHERE NOT EXISTS (SELECT FROM placed p WHERE p.order_id = d.order_id);
SELECT 'duplicates',
	(SELECT count(*) - count(DISTINCT order_id) FROM dispatch)
	+ (SELECT count(*) FROM mqtx.dead_letter WHERE error_message LIKE '%dispatch_order_id_key%')
	+ (SELECT count(*) FROM mqtx.consumer_attempts WHERE last_error LIKE '%dispatch_order_id_key%');
SELECT 'dead_letters', count(*) FROM mqtx.dead_letter;
SELECT 'retrying', count(*) FROM mqtx.consumer_attempts;
SELECT 'events_pending', count(*) FROM mqtx.outbox WHERE status <> 'published';
SELECT 'missing_ids', coalesce(string_agg(order_id::text, ',' ORDER BY order_id), '-')
	FROM (SELECT order_id FROM placed p
	      WHERE p.status <> 'dispatch_failed'
	        AND NOT EXISTS (SELECT FROM dispatch d WHERE d.order_id = p.order_id)
	      ORDER BY order_id LIMIT 20) m;
SELECT 'unconfirmed_ids', coalesce(string_agg(order_id::text || ':' || status, ',' ORDER BY order_id), '-')
	FROM (SELECT order_id, p.status FROM dispatch d JOIN placed p USING (order_id)
	      WHERE p.status <> 'dispatched' ORDER BY order_id LIMIT 20) u;
SELECT 'unexpected_ids', coalesce(string_agg(order_id::text, ',' ORDER BY order_id), '-')
	FROM (SELECT order_id FROM dispatch d
	      WHERE NOT EXISTS (SELECT FROM placed p WHERE p.order_id = d.order_id)
	      ORDER BY order_id LIMIT 20) u;
SQL
)
report="$order_report"$'\n'"$dispatch_report"
value() { awk -v k="$1" '$1 == k {print $2}' <<<"$report"; }

printf '%-50s %8s\n' "orders placed (order cluster)" "$(value placed)"
printf '%-50s %8s\n' "orders dispatched (dispatch cluster)" "$(value dispatched)"
printf '%-50s %8s\n' "orders given up, compensated (dispatch_failed)" "$(value given_up)"
printf '%-50s %8s\n' "orders still waiting for an answer" "$(value unanswered)"
printf '%-50s %8s\n' "placed, not given up, but not dispatched" "$(value missing)"
printf '%-50s %8s\n' "dispatched, but the order does not say so" "$(value unconfirmed)"
printf '%-50s %8s\n' "dispatched but never placed" "$(value unexpected)"
printf '%-50s %8s\n' "duplicate dispatches" "$(value duplicates)"
printf '%-50s %8s\n' "dead letters (dispatch / order side)" "$(value dead_letters) / $(value answers_dead)"
printf '%-50s %8s\n' "messages being retried (dispatch / order side)" "$(value retrying) / $(value answers_retrying)"
printf '%-50s %8s\n' "order events not yet published / failed" "$(value outbox_pending) / $(value outbox_failed)"
printf '%-50s %8s\n' "dispatch events not yet published" "$(value events_pending)"

failed=0
check() {
	local what=$1 got=$2
	if [ "$got" != 0 ]; then
		echo "FAIL: $what: $got" >&2
		failed=1
	fi
}
check "orders without a final state" "$(value unanswered)"
check "orders placed but not dispatched (first ids: $(value missing_ids))" "$(value missing)"
check "dispatches the order does not show (first: $(value unconfirmed_ids))" "$(value unconfirmed)"
check "dispatches without an order (first ids: $(value unexpected_ids))" "$(value unexpected)"
check "duplicate dispatches" "$(value duplicates)"
check "dead letters left on the dispatch side" "$(value dead_letters)"
check "dead letters on the order side" "$(value answers_dead)"
check "messages still being retried (dispatch side)" "$(value retrying)"
check "messages still being retried (order side)" "$(value answers_retrying)"
check "order events not published" "$(value outbox_pending)"
check "order events failed" "$(value outbox_failed)"
check "dispatch events not published" "$(value events_pending)"
if [ "$(value placed)" = 0 ]; then
	echo "FAIL: no orders were placed" >&2
	failed=1
fi

# ---- a few orders, followed across both services --------------------------
#
# An order's conversation is the id of its order.created message: the
# dispatch service's answer carries it as its correlation id, whether the
# handler sent it (dispatch.created, from the trigger) or an operator gave
# the order up (dispatch.failed).  Each service's mqtx.message_trail shows
# its half; merged by time, they are the whole story.

# trail SIDE CORRELATION: "epoch side direction what status id cause trace"
trail() {
	local side=$1 db=$2 correlation=$3
	q "$db" -c "SELECT extract(epoch FROM at), '$side', direction,
			coalesce(queue, routing_key), status, right(message_id, 12),
			coalesce(right(causation_id, 12), '-'), coalesce(substr(traceparent, 4, 12), '-')
		FROM mqtx.message_trail WHERE correlation_id = '$correlation'"
}

show_chain() {
	local order_id=$1 status city correlation lines start
	read -r status city correlation < <(q "$order_db" -c "
		SELECT o.status, o.content ->> 'city', m.message_id
		FROM orders o LEFT JOIN LATERAL (
			SELECT message_id FROM mqtx.outbox x
			WHERE x.routing_key = 'order.created' AND (x.payload ->> 'order_id')::bigint = o.order_id
			LIMIT 1) m ON true
		WHERE o.order_id = $order_id")
	echo
	if [ -z "$correlation" ]; then
		echo "order $order_id ($city, $status): its messages are no longer kept (mqtx.retention)"
		return
	fi
	echo "order $order_id ($city, $status), conversation $correlation:"
	lines=$( { trail shop "$order_db" "$correlation"; trail dispatch "$dispatch_db" "$correlation"; } |
		sort -k1,1n -k3,3)
	start=$(head -n 1 <<<"$lines" | cut -d' ' -f1)
	printf '  %10s  %-8s %-8s  %-22s %-11s %-12s  %-12s  %s\n' \
		"at" "service" "" "exchange key / queue" "status" "message" "caused by" "trace"
	awk -v start="$start" '{
		printf "  %7.1f ms  %-8s %-8s  %-22s %-11s %-12s  %-12s  %s\n",
			($1 - start) * 1000, $2, $3, $4, $5, $6, $7, $8
	}' <<<"$lines"
}

say_chains() {
	local ids
	# the first ordinary order, the first one redriven, the first given up
	ids=$(q "$order_db" -c "
		(SELECT order_id FROM orders WHERE status = 'dispatched'
		  AND content ->> 'city' NOT IN ('Atlantis', 'Lemuria') ORDER BY order_id LIMIT 1)
		UNION ALL
		(SELECT order_id FROM orders WHERE content ->> 'city' = 'Atlantis' ORDER BY order_id LIMIT 1)
		UNION ALL
		(SELECT order_id FROM orders WHERE status = 'dispatch_failed' ORDER BY order_id LIMIT 1)")
	[ -n "$ids" ] || return 0
	echo
	echo "how some orders went (sent: enqueued; received: applied here; times from the first message):"
	for id in $ids; do
		show_chain "$id"
	done
}
say_chains

echo
if [ $failed -eq 0 ]; then
	echo "OK: all $(value placed) orders answered: $(value dispatched) dispatched exactly once, $(value given_up) given up and compensated"
fi
exit $failed
