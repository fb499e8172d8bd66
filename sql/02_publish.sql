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
