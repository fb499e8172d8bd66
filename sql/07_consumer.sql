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

-- subscribing declares the queue (durable) when it is not declared yet;
-- a handler's call is bounded by 30 seconds unless told otherwise
SELECT mqtx.subscribe('dispatch.q', 'apply_order(jsonb,jsonb)');
SELECT queue, handler, prefetch, max_attempts, handler_timeout FROM mqtx.subscriptions;
SELECT name, durable, arguments FROM mqtx.queues WHERE name = 'dispatch.q';

-- again: updated in place, the handler's bound too
SELECT mqtx.subscribe('dispatch.q', 'apply_order(jsonb,jsonb)', prefetch => 10, max_attempts => 2,
	handler_timeout => '2 minutes');
SELECT queue, handler, prefetch, max_attempts, handler_timeout FROM mqtx.subscriptions;
SELECT mqtx.subscribe('dispatch.q', 'apply_order(jsonb,jsonb)', 10, 2, '250 milliseconds');
SELECT queue, handler, prefetch, max_attempts, handler_timeout FROM mqtx.subscriptions;
-- the bounds themselves are allowed
SELECT mqtx.subscribe('dispatch.q', 'apply_order(jsonb,jsonb)', 10, 2, '1 millisecond');
SELECT handler_timeout FROM mqtx.subscriptions;
SELECT mqtx.subscribe('dispatch.q', 'apply_order(jsonb,jsonb)', 10, 2, '1 day');
SELECT handler_timeout FROM mqtx.subscriptions;
\set VERBOSITY terse
SELECT mqtx.subscribe('dispatch.q', 'apply_order(jsonb,jsonb)', prefetch => 0);
SELECT mqtx.subscribe('dispatch.q', 'apply_order(jsonb,jsonb)', max_attempts => 0);
-- a bound out of range is refused, through mqtx.subscribe or not
SELECT mqtx.subscribe('dispatch.q', 'apply_order(jsonb,jsonb)', handler_timeout => '0');
SELECT mqtx.subscribe('dispatch.q', 'apply_order(jsonb,jsonb)', handler_timeout => '999 microseconds');
SELECT mqtx.subscribe('dispatch.q', 'apply_order(jsonb,jsonb)', handler_timeout => '-5 seconds');
SELECT mqtx.subscribe('dispatch.q', 'apply_order(jsonb,jsonb)', handler_timeout => '1 day 1 millisecond');
SELECT mqtx.subscribe('dispatch.q', 'apply_order(jsonb,jsonb)', handler_timeout => '25 hours');
SELECT mqtx.subscribe('dispatch.q', 'apply_order(jsonb,jsonb)', handler_timeout => NULL);
UPDATE mqtx.subscriptions SET handler_timeout = '2 days';
\set VERBOSITY default
-- and none of them changed the subscription
SELECT queue, handler, prefetch, max_attempts, handler_timeout FROM mqtx.subscriptions;
-- called without one, mqtx.subscribe sets the default again, as it does
-- for prefetch and max_attempts
SELECT mqtx.subscribe('dispatch.q', 'apply_order(jsonb,jsonb)', prefetch => 10, max_attempts => 2);
SELECT queue, handler, prefetch, max_attempts, handler_timeout FROM mqtx.subscriptions;

-- the inbox dedupes on (queue, message_id)
INSERT INTO mqtx.inbox (queue, message_id) VALUES ('dispatch.q', 'm-1');
INSERT INTO mqtx.inbox (queue, message_id) VALUES ('dispatch.q', 'm-1');
INSERT INTO mqtx.inbox (queue, message_id) VALUES ('other.q', 'm-1');

SELECT obj_description('mqtx.inbox'::regclass, 'pg_class') AS inbox_comment;

-- dead letters: redrive goes through the outbox, to the same queue (m-5
-- was redriven once already and failed again)
TRUNCATE mqtx.outbox;
INSERT INTO mqtx.dead_letter (queue, message_id, exchange, routing_key, headers, body,
	body_text, body_json, error_message, attempts, first_failed_at, last_failed_at)
VALUES
	('dispatch.q', 'm-2', 'orders', 'order.created', '{"tenant": "acme"}',
	 '{"order_id": 2}', '{"order_id": 2}', '{"order_id": 2}', 'dispatch refused', 5, now(), now()),
	('dispatch.q', 'm-3', '', 'dispatch.q', NULL,
	 '\xfffe', NULL, NULL, 'body is not valid UTF-8', 1, now(), now()),
	('dispatch.q', 'm-4', '', 'dispatch.q', NULL,
	 '{"order_id": 4}', '{"order_id": 4}', '{"order_id": 4}', 'dispatch refused', 5, now(), now()),
	('dispatch.q', 'm-5', '', 'dispatch.q', '{"x-mqtx-redriven-from": "m-5", "tenant": "acme"}',
	 '{"order_id": 5}', '{"order_id": 5}', '{"order_id": 5}', 'dispatch refused', 5, now(), now()),
	('dispatch.q', 'm-6', '', 'dispatch.q', NULL,
	 '[6]', '[6]', '[6]', 'dispatch refused', 5, now(), now());
-- and the inbox rows the consumer writes with them
INSERT INTO mqtx.inbox (queue, message_id)
	SELECT queue, message_id FROM mqtx.dead_letter;
-- the same message id on another queue is another message
INSERT INTO mqtx.inbox (queue, message_id) VALUES ('other.q', 'm-2');

-- one dead letter per message and queue
INSERT INTO mqtx.dead_letter (queue, message_id, body, error_message, attempts,
	first_failed_at, last_failed_at)
VALUES ('dispatch.q', 'm-3', '\xfffe', 'a second copy', 1, now(), now());
INSERT INTO mqtx.dead_letter (queue, message_id, body, error_message, attempts,
	first_failed_at, last_failed_at)
VALUES ('other.q', 'm-3', '\xfffe', 'body is not valid UTF-8', 1, now(), now());
SELECT queue, message_id, error_message FROM mqtx.dead_letter WHERE message_id = 'm-3' ORDER BY queue;

SELECT mqtx.redrive(id) AS redriven_id FROM mqtx.dead_letter WHERE message_id = 'm-2' \gset
SELECT exchange, routing_key, payload, headers, status FROM mqtx.outbox;
SELECT count(*) FROM mqtx.outbox WHERE message_id = :'redriven_id';
SELECT count(*) FROM mqtx.dead_letter WHERE message_id = 'm-2';
-- it keeps its identity: its inbox row goes, so that the consumer applies
-- it (once) under its original id; every other row stays
SELECT queue, message_id FROM mqtx.inbox ORDER BY queue, message_id;
-- and it can be dead-lettered again under that id
BEGIN;
INSERT INTO mqtx.dead_letter (queue, message_id, body, error_message, attempts,
	first_failed_at, last_failed_at)
VALUES ('dispatch.q', 'm-2', '{"order_id": 2}', 'dispatch refused again', 5, now(), now());
SELECT queue, message_id, error_message FROM mqtx.dead_letter WHERE message_id = 'm-2';
ROLLBACK;

-- a body that is not JSON cannot be redriven, and stays, and so does its
-- inbox row
SELECT mqtx.redrive(id) FROM mqtx.dead_letter WHERE queue = 'dispatch.q' AND message_id = 'm-3';
SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'dispatch.q' AND message_id = 'm-3';
SELECT count(*) FROM mqtx.inbox WHERE queue = 'dispatch.q' AND message_id = 'm-3';
SELECT mqtx.redrive(123456);
SELECT count(*) FROM mqtx.inbox;

-- redrive_all takes the JSON ones of that queue, each to the outbox with
-- its original id, and takes their inbox rows out
SELECT mqtx.redrive_all('dispatch.q');
SELECT queue, message_id FROM mqtx.dead_letter ORDER BY queue, message_id;
SELECT routing_key, payload, headers, status FROM mqtx.outbox
ORDER BY headers->>'x-mqtx-redriven-from';
SELECT count(DISTINCT message_id) AS outbox_message_ids FROM mqtx.outbox;
SELECT queue, message_id FROM mqtx.inbox ORDER BY queue, message_id;
SELECT mqtx.redrive_all('dispatch.q');
SELECT mqtx.redrive_all('no.such.q');

-- discard removes the dead letter; its message stays done: the inbox row
-- stays, so later copies are duplicates
SELECT mqtx.discard(id) FROM mqtx.dead_letter WHERE message_id = 'm-3' ORDER BY queue;
SELECT mqtx.discard(123456);
SELECT count(*) FROM mqtx.dead_letter;
SELECT queue, message_id FROM mqtx.inbox ORDER BY queue, message_id;

-- after_dead_letter: wait (the default) or proceed
SELECT mqtx.subscribe('keyed.q', 'apply_order(jsonb,jsonb)', after_dead_letter => 'proceed');
SELECT queue, after_dead_letter FROM mqtx.subscriptions WHERE queue IN ('dispatch.q', 'keyed.q')
ORDER BY queue;
SELECT mqtx.subscribe('keyed.q', 'apply_order(jsonb,jsonb)', after_dead_letter => 'skip');
SELECT mqtx.subscribe('keyed.q', 'apply_order(jsonb,jsonb)');
SELECT after_dead_letter FROM mqtx.subscriptions WHERE queue = 'keyed.q';

-- a dead letter of an ordering key is redriven into mqtx.parked, at its
-- place among its key's parked messages, ahead of the later ones
TRUNCATE mqtx.dead_letter, mqtx.inbox;
INSERT INTO mqtx.parked (position, queue, ordering_key, message_id, body)
VALUES (nextval('mqtx.parked_position_seq') + 10, 'keyed.q', 'order-7', 'k-2', '\x7b7d'),
	   (nextval('mqtx.parked_position_seq') + 11, 'keyed.q', 'order-7', 'k-3', '\x7b7d');
INSERT INTO mqtx.dead_letter (queue, message_id, exchange, routing_key, body, body_json,
							  error_message, attempts, first_failed_at, last_failed_at,
							  ordering_key, parked_position)
VALUES ('keyed.q', 'k-1', '', 'keyed.q', '\x7b7d', '{}', 'handler failed', 5, now(), now(),
		'order-7', currval('mqtx.parked_position_seq'));
INSERT INTO mqtx.inbox (queue, message_id) VALUES ('keyed.q', 'k-1');
SELECT queue, ordering_key, reason, dead_letter_id IS NOT NULL AS by_letter, parked
FROM mqtx.held_keys;
SELECT mqtx.redrive(id) IS NULL AS parked_not_published FROM mqtx.dead_letter WHERE message_id = 'k-1';
SELECT message_id FROM mqtx.parked WHERE ordering_key = 'order-7' ORDER BY position;
SELECT count(*) AS letters, (SELECT count(*) FROM mqtx.inbox) AS inbox FROM mqtx.dead_letter;
SELECT queue, ordering_key, reason, parked FROM mqtx.held_keys;
-- redrive_all counts keyed letters too, whose redrive returns NULL
INSERT INTO mqtx.dead_letter (queue, message_id, exchange, routing_key, body, body_json,
							  error_message, attempts, first_failed_at, last_failed_at,
							  ordering_key, parked_position)
VALUES ('keyed.q', 'k-4', '', 'keyed.q', '\x7b7d', '{}', 'handler failed', 5, now(), now(),
		'order-8', nextval('mqtx.parked_position_seq'));
SELECT mqtx.redrive_all('keyed.q');
SELECT message_id FROM mqtx.parked WHERE ordering_key = 'order-8';
TRUNCATE mqtx.parked;
SELECT mqtx.unsubscribe('keyed.q');

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
