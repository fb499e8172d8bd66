--
-- Correlation, causation and trace context as mqtx.publish writes them,
-- and the conversation views.  (What the consumer hands down to the
-- messages a handler publishes: TAP, test/t/095_message_context.pl.)
--
TRUNCATE mqtx.outbox, mqtx.inbox;

-- a correlation and a causation id given, into the headers the relay sends
SELECT mqtx.publish('orders', 'order.created', '{"n": 1}', correlation_id => 'checkout-1',
					causation_id => 'request-7') IS NOT NULL AS enqueued;
-- nothing given, outside a handler: nothing added
SELECT mqtx.publish('orders', 'order.created', '{"n": 2}') IS NOT NULL AS enqueued;
SELECT payload, headers FROM mqtx.outbox ORDER BY id;

-- a correlation id is an AMQP short string, and neither may be empty
\set VERBOSITY terse
SELECT mqtx.publish('orders', 'order.created', '{}', correlation_id => repeat('c', 256));
SELECT mqtx.publish('orders', 'order.created', '{}', correlation_id => '');
SELECT mqtx.publish('orders', 'order.created', '{}', causation_id => '');
\set VERBOSITY default

-- trace context, set for the transaction, goes with every message of it,
-- from mqtx.publish and from an outbox trigger alike
CREATE TABLE regress_orders (order_id integer PRIMARY KEY);
CREATE TRIGGER regress_orders_outbox AFTER INSERT ON regress_orders
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('orders', 'order.created');
BEGIN;
SET LOCAL mqtx.traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
SET LOCAL mqtx.tracestate = 'congo=t61rcWkgMzE, rojo=00f067aa0ba902b7';
SELECT mqtx.publish('orders', 'order.created', '{"n": 3}') IS NOT NULL AS enqueued;
INSERT INTO regress_orders VALUES (4);
-- headers the publisher gives win, a traceparent with its tracestate
SELECT mqtx.publish('orders', 'order.created', '{"n": 5}',
					'{"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}')
	IS NOT NULL AS enqueued;
COMMIT;
-- and ends with it
SELECT mqtx.publish('orders', 'order.created', '{"n": 6}') IS NOT NULL AS enqueued;
-- a tracestate alone is not sent
SET mqtx.tracestate = 'congo=t61rcWkgMzE';
SELECT mqtx.publish('orders', 'order.created', '{"n": 7}') IS NOT NULL AS enqueued;
RESET mqtx.tracestate;
SELECT payload, headers FROM mqtx.outbox WHERE id > 2 ORDER BY id;

-- what is not W3C trace context is refused, with what is wrong
SET mqtx.traceparent = '00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01';
SET mqtx.traceparent = '00-00000000000000000000000000000000-00f067aa0ba902b7-01';
SET mqtx.traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01';
SET mqtx.traceparent = 'ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
SET mqtx.traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra';
SET mqtx.traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7';
SET mqtx.tracestate = 'Congo=t61rcWkgMzE';
SET mqtx.tracestate = 'congo';
SET mqtx.tracestate = '1congo=x';
-- a later version may carry more fields; an empty tracestate member is allowed
SET mqtx.traceparent = '01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future';
SET mqtx.tracestate = 'congo=t61rcWkgMzE,,vendor@tenant=x y, 7tenant@system=1';
SHOW mqtx.traceparent;
RESET mqtx.traceparent;
RESET mqtx.tracestate;

-- a publisher may not write mqtx's own headers
CREATE ROLE regress_context_publisher;
SELECT mqtx.grant_publish('regress_context_publisher');
SET ROLE regress_context_publisher;
SELECT mqtx.publish('orders', 'order.created', '{}', '{"x-mqtx-correlation-id": "forged"}');
SELECT mqtx.publish('orders', 'order.created', '{"n": 8}', correlation_id => 'own')
	IS NOT NULL AS enqueued;
RESET ROLE;
SELECT mqtx.revoke_publish('regress_context_publisher');
REVOKE USAGE ON SCHEMA mqtx FROM regress_context_publisher;
DROP ROLE regress_context_publisher;

-- A redriven dead letter keeps its conversation; a correlation id too
-- long for the AMQP property (a foreign "hex:" one) gives way to the
-- message's own id
TRUNCATE mqtx.outbox;
INSERT INTO mqtx.dead_letter (queue, message_id, body, body_json, error_message, attempts,
							  first_failed_at, last_failed_at, correlation_id)
VALUES ('q', 'm-long', '\x7b7d', '{}', 'boom', 1, now(), now(), 'hex:' || repeat('ab', 200)),
	   ('q', 'm-short', '\x7b7d', '{}', 'boom', 1, now(), now(), 'checkout-9');
SELECT count(mqtx.redrive(id)) AS redriven FROM mqtx.dead_letter;
SELECT headers ->> 'x-mqtx-redriven-from' AS original,
	   headers ->> 'x-mqtx-correlation-id' AS correlation_id
FROM mqtx.outbox ORDER BY 1;

-- A conversation: a request received here (root), the event its handler
-- published, a reply to that event received back, and what the reply's
-- handler published.
TRUNCATE mqtx.outbox;
INSERT INTO mqtx.inbox (queue, message_id) VALUES ('requests', 'request-1');
SELECT mqtx.publish('orders', 'order.created', '{}', correlation_id => 'request-1',
					causation_id => 'request-1') AS event \gset
INSERT INTO mqtx.inbox (queue, message_id, correlation_id, causation_id)
VALUES ('replies', 'reply-1', 'request-1', :'event');
SELECT mqtx.publish('orders', 'order.confirmed', '{}', correlation_id => 'request-1',
					causation_id => 'reply-1') IS NOT NULL AS enqueued;
-- an unrelated message
SELECT mqtx.publish('orders', 'order.created', '{}') IS NOT NULL AS enqueued;

SELECT direction, correlation_id,
	   CASE WHEN causation_id = :'event' THEN '(the event)' ELSE causation_id END AS causation_id,
	   coalesce(routing_key, queue) AS what, status
FROM mqtx.message_trail WHERE correlation_id = 'request-1'
ORDER BY at, direction DESC;
-- the whole chain, from its root and from its last message alike
SELECT depth, direction, message_id = :'event' AS is_event,
	   CASE WHEN message_id ~ '^[0-9a-f-]{36}$' THEN 'uuid' ELSE message_id END AS message_id,
	   coalesce(routing_key, queue) AS what
FROM mqtx.message_chain('request-1');
SELECT depth, direction, coalesce(routing_key, queue) AS what
FROM mqtx.message_chain(:'event');
SELECT count(*) AS messages FROM mqtx.message_chain('nothing-here');
-- a message that names itself as its cause (a foreign publisher's doing)
-- is shown once
INSERT INTO mqtx.inbox (queue, message_id, causation_id) VALUES ('loops', 'self-1', 'self-1');
SELECT depth, direction, message_id FROM mqtx.message_chain('self-1');

TRUNCATE mqtx.outbox, mqtx.inbox;
DROP TABLE regress_orders;
