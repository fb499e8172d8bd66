--
-- mqtx.publish(): enqueueing in the caller's transaction
--
SELECT mqtx.publish('orders', 'order.created', '{"order_id": 1}') IS NOT NULL AS enqueued;

-- the returned id is the row's message_id
BEGIN;
CREATE TEMP TABLE published_ids ON COMMIT DROP AS
	SELECT mqtx.publish('orders', 'order.paid', '{"order_id": 2}',
						'{"tenant": "acme", "priority": 5}') AS message_id;
SELECT o.exchange, o.routing_key, o.payload, o.headers
FROM mqtx.outbox o JOIN published_ids USING (message_id);
COMMIT;

-- a new row is pending and due now, with nothing attempted yet
SELECT exchange, routing_key, payload, headers, status, attempts,
       last_error, published_at,
       next_attempt_at <= now() AS due, created_at <= now() AS created
FROM mqtx.outbox ORDER BY id;

-- message ids are unique and not caller-provided
SELECT count(DISTINCT message_id) = count(*) AS unique_ids FROM mqtx.outbox;

-- rolled back with the caller's transaction
BEGIN;
SELECT mqtx.publish('orders', 'order.cancelled', '{"order_id": 3}') IS NOT NULL AS enqueued;
ROLLBACK;
SELECT count(*) FROM mqtx.outbox WHERE routing_key = 'order.cancelled';

-- the default exchange ('') is valid: it routes by queue name
SELECT mqtx.publish('', 'dispatch_queue', '"a JSON string is a payload too"') IS NOT NULL AS enqueued;
SELECT mqtx.publish('orders', '', 'null') IS NOT NULL AS enqueued;

-- bad input: clear errors, nothing written
SELECT count(*) AS before FROM mqtx.outbox \gset
SELECT mqtx.publish(NULL, 'rk', '{}');
SELECT mqtx.publish('ex', NULL, '{}');
SELECT mqtx.publish('ex', 'rk', NULL);

-- 255 bytes is the AMQP limit, counted in bytes, not characters
SELECT mqtx.publish(repeat('e', 255), repeat('k', 255), '{}') IS NOT NULL AS enqueued;
SELECT mqtx.publish(repeat('e', 256), 'rk', '{}');
SELECT mqtx.publish('ex', repeat('k', 256), '{}');
SELECT mqtx.publish(repeat('é', 128), 'rk', '{}');

-- headers must become an AMQP field table
SELECT mqtx.publish('ex', 'rk', '{}', '[1, 2]');
SELECT mqtx.publish('ex', 'rk', '{}', '"text"');
SELECT mqtx.publish('ex', 'rk', '{}', '42');
SELECT mqtx.publish('ex', 'rk', '{}', jsonb_build_object(repeat('h', 256), 1));
SELECT mqtx.publish('ex', 'rk', '{}', '{"big": 9223372036854775808}');
SELECT mqtx.publish('ex', 'rk', '{}', '{"huge": 1e400}');
SELECT mqtx.publish('ex', 'rk', '{}', '{"nested": {"deep": [1, {"big": -9223372036854775809}]}}');
-- every JSON type that has an AMQP counterpart is accepted
SELECT mqtx.publish('ex', 'rk', '{}',
	'{"s": "x", "i": -9223372036854775808, "f": 1.5, "b": true, "n": null,
	  "a": [1, "two", [3]], "t": {"k": {"k": "v"}}, "": "empty key"}') IS NOT NULL AS enqueued;
SELECT mqtx.publish('ex', 'rk', '{}', '{}') IS NOT NULL AS enqueued;

-- payload size is measured on the JSON text that goes on the wire
SET mqtx.max_payload = '1kB';
SELECT mqtx.publish('ex', 'rk', jsonb_build_object('data', repeat('x', 1012))) IS NOT NULL AS at_limit;
SELECT length(payload::text) FROM mqtx.outbox WHERE payload ? 'data';
SELECT mqtx.publish('ex', 'rk', jsonb_build_object('data', repeat('x', 1013)));
RESET mqtx.max_payload;

SELECT count(*) - :before AS written_by_good_calls FROM mqtx.outbox;

-- statuses are enforced
\set VERBOSITY terse
UPDATE mqtx.outbox SET status = 'sent' WHERE id = 1;
UPDATE mqtx.outbox SET status = 'published' WHERE id = 1;
UPDATE mqtx.outbox SET status = 'published', published_at = now() WHERE id = 1;
UPDATE mqtx.outbox SET attempts = -1 WHERE id = 1;
SELECT status FROM mqtx.outbox WHERE id = 1;
\set VERBOSITY default

--
-- Ordering keys and scheduled delivery (0.8.0)
--
TRUNCATE mqtx.outbox;
SELECT mqtx.publish('ex', 'rk', '{"n": 1}', ordering_key => 'order-42') IS NOT NULL AS keyed;
SELECT mqtx.publish('ex', 'rk', '{"n": 2}', '{"h": 1}', 'order-42') IS NOT NULL AS keyed;
-- a key is held by the transaction that enqueues for it, to its end, with
-- the database's key lock in share mode (taken exclusively past 64 keys)
BEGIN;
SELECT mqtx.publish('ex', 'rk', '{"n": 3}', ordering_key => 'order-7') IS NOT NULL AS keyed;
SELECT locktype, objsubid, mode, granted FROM pg_locks
WHERE locktype = 'advisory' AND pid = pg_backend_pid();
COMMIT;
SELECT count(*) AS locks_left FROM pg_locks
WHERE locktype = 'advisory' AND pid = pg_backend_pid();
-- past 64 keys, one exclusive lock for all of them, not a lock each
BEGIN;
SELECT count(mqtx.publish('ex', 'rk', '{}', ordering_key => 'bulk-' || g)) FROM generate_series(1, 70) g;
SELECT mode, count(*) FROM pg_locks
WHERE locktype = 'advisory' AND objsubid = 28017 AND pid = pg_backend_pid()
GROUP BY mode ORDER BY mode;
ROLLBACK;
SELECT payload, ordering_key, deliver_at IS NULL AS unscheduled, next_attempt_at = created_at AS due_at_once
FROM mqtx.outbox ORDER BY id;

-- deliver_at, or delay after now(); a time past is due at once
BEGIN;
SELECT mqtx.publish('ex', 'rk', '{"n": 4}', deliver_at => now() + interval '30 minutes') IS NOT NULL AS scheduled;
SELECT mqtx.publish('ex', 'rk', '{"n": 5}', delay => interval '1 hour') IS NOT NULL AS scheduled;
SELECT mqtx.publish('ex', 'rk', '{"n": 6}', deliver_at => now() - interval '1 day') IS NOT NULL AS scheduled;
SELECT payload, deliver_at - now() AS after, next_attempt_at = deliver_at AS due_then
FROM mqtx.outbox WHERE deliver_at IS NOT NULL ORDER BY id;
COMMIT;
SELECT pending, scheduled, oldest_pending_age IS NOT NULL AS some_due FROM mqtx.outbox_stats;

-- mistakes
SELECT mqtx.publish('ex', 'rk', '{}', deliver_at => now(), delay => '1 minute');
SELECT mqtx.publish('ex', 'rk', '{}', delay => '-1 second');
SELECT mqtx.publish('ex', 'rk', '{}', deliver_at => 'infinity');
SELECT mqtx.publish('ex', 'rk', '{}', deliver_at => '-infinity');
SELECT mqtx.publish('ex', 'rk', '{}', ordering_key => repeat('k', 256));
SELECT mqtx.publish('ex', 'rk', '{}', ordering_key => repeat('k', 255)) IS NOT NULL AS longest_key;
SELECT count(*) AS outbox FROM mqtx.outbox;

--
-- mqtx.cancel: withdraws a message not yet sent, in the caller's
-- transaction.  No relay claims here (no broker), so every pending message
-- is still to be sent.
--
SELECT mqtx.publish('ex', 'rk', '{"cancel": 1}', delay => '1 hour') AS scheduled_id \gset
BEGIN;
SELECT mqtx.cancel(:'scheduled_id') AS withdrawn;
SELECT count(*) AS left FROM mqtx.outbox WHERE message_id = :'scheduled_id';
ROLLBACK;
-- rolled back, the message stays
SELECT count(*) AS kept FROM mqtx.outbox WHERE message_id = :'scheduled_id';
SELECT mqtx.cancel(:'scheduled_id') AS withdrawn;
SELECT count(*) AS left FROM mqtx.outbox WHERE message_id = :'scheduled_id';
-- twice, or a message that never was: nothing to withdraw
SELECT mqtx.cancel(:'scheduled_id') AS withdrawn;
SELECT mqtx.cancel(mqtx.new_message_id()) AS withdrawn;
-- a published message is not withdrawn; a failed one is
SELECT mqtx.publish('ex', 'rk', '{"cancel": 2}') AS sent_id \gset
UPDATE mqtx.outbox SET status = 'published', published_at = now() WHERE message_id = :'sent_id';
SELECT mqtx.cancel(:'sent_id') AS withdrawn;
SELECT mqtx.publish('ex', 'rk', '{"cancel": 3}') AS failed_id \gset
UPDATE mqtx.outbox SET status = 'failed' WHERE message_id = :'failed_id';
SELECT mqtx.cancel(:'failed_id') AS withdrawn;
SELECT message_id::text = :'sent_id' AS only_the_published_is_left
FROM mqtx.outbox WHERE payload ? 'cancel';
SELECT mqtx.cancel(NULL);

--
-- mqtx.blocked_keys: the key whose first message failed holds back the
-- later ones; a key scheduled for later holds back its own; a key whose
-- first message is simply due is not blocked
--
TRUNCATE mqtx.outbox;
SELECT mqtx.publish('ex', 'rk', '{"k": "a", "n": 1}', ordering_key => 'a') AS a1 \gset
SELECT count(*) FROM (SELECT mqtx.publish('ex', 'rk', jsonb_build_object('k', 'a', 'n', n), ordering_key => 'a')
					  FROM generate_series(2, 3) n) p;
UPDATE mqtx.outbox SET status = 'failed', attempts = 10, last_error = 'NOT_FOUND - no exchange'
WHERE message_id = :'a1';
SELECT mqtx.publish('ex', 'rk', '{"k": "b", "n": 1}', ordering_key => 'b', delay => '1 hour') IS NOT NULL AS b1;
SELECT mqtx.publish('ex', 'rk', '{"k": "b", "n": 2}', ordering_key => 'b') IS NOT NULL AS b2;
SELECT mqtx.publish('ex', 'rk', '{"k": "c", "n": 1}', ordering_key => 'c') IS NOT NULL AS c1;
SELECT mqtx.publish('ex', 'rk', '{"k": "c", "n": 2}', ordering_key => 'c') IS NOT NULL AS c2;
SELECT mqtx.publish('ex', 'rk', '{"k": "d", "n": 1}', ordering_key => 'd') AS d1 \gset
UPDATE mqtx.outbox SET attempts = 1, last_error = 'nacked', next_attempt_at = now() + interval '1 minute'
WHERE message_id = :'d1';
SELECT ordering_key, reason, blocked_by_message_id = :'a1' AS blocked_by_a1, attempts, last_error,
	   next_attempt_at IS NOT NULL AS retried, waiting, oldest_waiting_since IS NOT NULL AS since
FROM mqtx.blocked_keys ORDER BY 1;
-- a waiting message is withdrawn: it cannot have been sent
SELECT mqtx.cancel(message_id) AS withdrawn FROM mqtx.outbox
WHERE ordering_key = 'a' AND payload->>'n' = '3';
-- withdrawing the failed first message frees its key
SELECT mqtx.cancel(:'a1') AS withdrawn;
SELECT ordering_key FROM mqtx.blocked_keys ORDER BY 1;
TRUNCATE mqtx.outbox;
