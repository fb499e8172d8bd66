--
-- The consumer's SQL surface: subscriptions, dead letters, redrive
--
CREATE TABLE dispatch (order_id bigint PRIMARY KEY);
CREATE FUNCTION apply_order(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE sql AS $$ INSERT INTO dispatch VALUES ((payload->>'order_id')::bigint) $$;
CREATE FUNCTION wrong_args(int) RETURNS void LANGUAGE sql AS 'SELECT';
CREATE FUNCTION wrong_result(jsonb, jsonb) RETURNS int LANGUAGE sql AS 'SELECT 1';
CREATE FUNCTION wrong_set(jsonb, jsonb) RETURNS SETOF void LANGUAGE sql AS 'SELECT';

-- a handler is (payload jsonb, headers jsonb) RETURNS void
SELECT mqtx.subscribe('dispatch.q', 'wrong_args(int)');
SELECT mqtx.subscribe('dispatch.q', 'wrong_result(jsonb,jsonb)');
SELECT mqtx.subscribe('dispatch.q', 'wrong_set(jsonb,jsonb)');
SELECT mqtx.subscribe('dispatch.q', 'no_such_function(jsonb,jsonb)');
SELECT mqtx.subscribe(NULL, 'apply_order(jsonb,jsonb)');
SELECT count(*) FROM mqtx.subscriptions;

-- subscribing declares the queue (durable) when it is not declared yet
SELECT mqtx.subscribe('dispatch.q', 'apply_order(jsonb,jsonb)');
SELECT queue, handler, prefetch, max_attempts FROM mqtx.subscriptions;
SELECT name, durable, arguments FROM mqtx.queues WHERE name = 'dispatch.q';

-- again: updated in place
SELECT mqtx.subscribe('dispatch.q', 'apply_order(jsonb,jsonb)', prefetch => 10, max_attempts => 2);
SELECT queue, handler, prefetch, max_attempts FROM mqtx.subscriptions;
\set VERBOSITY terse
SELECT mqtx.subscribe('dispatch.q', 'apply_order(jsonb,jsonb)', prefetch => 0);
SELECT mqtx.subscribe('dispatch.q', 'apply_order(jsonb,jsonb)', max_attempts => 0);
\set VERBOSITY default

-- the inbox dedupes on (queue, message_id)
INSERT INTO mqtx.inbox (queue, message_id) VALUES ('dispatch.q', 'm-1');
INSERT INTO mqtx.inbox (queue, message_id) VALUES ('dispatch.q', 'm-1');
INSERT INTO mqtx.inbox (queue, message_id) VALUES ('other.q', 'm-1');

-- dead letters: redrive goes through the outbox, to the same queue
TRUNCATE mqtx.outbox;
INSERT INTO mqtx.dead_letter (queue, message_id, exchange, routing_key, headers, body,
	body_text, body_json, error_message, attempts, first_failed_at, last_failed_at)
VALUES
	('dispatch.q', 'm-2', 'orders', 'order.created', '{"tenant": "acme"}',
	 '{"order_id": 2}', '{"order_id": 2}', '{"order_id": 2}', 'dispatch refused', 5, now(), now()),
	('dispatch.q', 'm-3', '', 'dispatch.q', NULL,
	 '\xfffe', NULL, NULL, 'body is not valid UTF-8', 1, now(), now()),
	('dispatch.q', 'm-4', '', 'dispatch.q', NULL,
	 '{"order_id": 4}', '{"order_id": 4}', '{"order_id": 4}', 'dispatch refused', 5, now(), now());

SELECT mqtx.redrive(id) IS NOT NULL AS redriven FROM mqtx.dead_letter WHERE message_id = 'm-2';
SELECT exchange, routing_key, payload, headers, status FROM mqtx.outbox;
SELECT count(*) FROM mqtx.dead_letter WHERE message_id = 'm-2';

-- a body that is not JSON cannot be redriven, and stays
SELECT mqtx.redrive(id) FROM mqtx.dead_letter WHERE message_id = 'm-3';
SELECT count(*) FROM mqtx.dead_letter WHERE message_id = 'm-3';
SELECT mqtx.redrive(123456);

-- redrive_all takes the JSON ones; discard removes
SELECT mqtx.redrive_all('dispatch.q');
SELECT message_id FROM mqtx.dead_letter;
SELECT mqtx.discard(id) FROM mqtx.dead_letter WHERE message_id = 'm-3';
SELECT mqtx.discard(123456);
SELECT count(*) FROM mqtx.dead_letter;

-- unsubscribe
SELECT mqtx.unsubscribe('dispatch.q');
SELECT mqtx.unsubscribe('dispatch.q');
SELECT count(*) FROM mqtx.subscriptions;

-- one consumer row per served database (no broker here)
SELECT database, broker_connected, consumed, applied, duplicates, retried, dead_lettered
FROM mqtx.consumer_stats;

-- all of it is for the extension's owner, not for publishers
CREATE ROLE mqtx_regress_app;
SELECT mqtx.grant_publish('mqtx_regress_app');
SET ROLE mqtx_regress_app;
SELECT mqtx.subscribe('sneaky', 'apply_order(jsonb,jsonb)');
SELECT count(*) FROM mqtx.dead_letter;
SELECT count(*) FROM mqtx.inbox;
RESET ROLE;
DROP OWNED BY mqtx_regress_app;
DROP ROLE mqtx_regress_app;
