--
-- Upgrading 0.8.0 to 0.9.0: every subscription and parked message kept,
-- the subscriptions applied by one worker as before, the new
-- mqtx.subscribe (the roles that could run the old one can run it, with
-- their grant option), mqtx.parked open to messages without a key, and
-- the idempotency toolkit (16_idempotency tests it); the
-- result the same as a fresh 0.9.0 install, and so is 0.1.0 upgraded to
-- 0.9.0 in one step.  The fingerprints are 08_upgrade's.
--
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
CREATE EXTENSION mqtx VERSION '0.8.0';
CREATE TABLE mqtx_regress_fingerprint (install text, aspect text, object text, detail text);
INSERT INTO mqtx_regress_fingerprint SELECT '0.8.0', * FROM mqtx_regress_fingerprint();
CREATE ROLE mqtx_regress_subscriber;
GRANT USAGE ON SCHEMA mqtx TO mqtx_regress_subscriber;
GRANT EXECUTE ON FUNCTION mqtx.subscribe(text, regprocedure, integer, integer, interval, text)
	TO mqtx_regress_subscriber WITH GRANT OPTION;
CREATE FUNCTION regress_apply_0_9(payload jsonb, headers jsonb) RETURNS void
LANGUAGE sql AS $$ SELECT $$;
SELECT mqtx.subscribe('orders.apply', 'regress_apply_0_9(jsonb, jsonb)', prefetch => 50,
					  after_dead_letter => 'proceed');
INSERT INTO mqtx.parked (queue, ordering_key, message_id, body)
VALUES ('orders.apply', 'order-1', 'm-1', '\x7b7d'), ('orders.apply', 'order-1', 'm-2', '\x7b7d');

-- an object that depends on the old mqtx.subscribe stops the update, named
CREATE FUNCTION subscribe_orders() RETURNS void LANGUAGE sql
BEGIN ATOMIC
	SELECT mqtx.subscribe('orders.apply', 'regress_apply_0_9(jsonb, jsonb)');
END;
ALTER EXTENSION mqtx UPDATE TO '0.9.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
DROP FUNCTION subscribe_orders();

ALTER EXTENSION mqtx UPDATE TO '0.9.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
SELECT queue, handler, prefetch, after_dead_letter, workers FROM mqtx.subscriptions;
SELECT queue, ordering_key, message_id FROM mqtx.parked ORDER BY position;

-- the subscriber keeps its right, and its grant option; the grant is the
-- database's, not the extension's: pg_dump keeps it
SELECT p.oid::regprocedure AS function, a.grantee::regrole, a.is_grantable
FROM pg_proc p, aclexplode(p.proacl) a
WHERE p.proname = 'subscribe' AND p.pronamespace = 'mqtx'::regnamespace
  AND a.grantee <> p.proowner;
SELECT p.oid::regprocedure AS function, i.initprivs
FROM pg_proc p JOIN pg_init_privs i ON i.objoid = p.oid AND i.classoid = 'pg_proc'::regclass
WHERE p.proname = 'subscribe' AND p.pronamespace = 'mqtx'::regnamespace;
REVOKE ALL ON FUNCTION mqtx.subscribe(text, regprocedure, integer, integer, interval, text, integer)
	FROM mqtx_regress_subscriber CASCADE;
REVOKE USAGE ON SCHEMA mqtx FROM mqtx_regress_subscriber;
INSERT INTO mqtx_regress_fingerprint SELECT 'upgraded', * FROM mqtx_regress_fingerprint();

-- workers: set, kept by a call without it only as its default, checked
SELECT mqtx.subscribe('orders.apply', 'regress_apply_0_9(jsonb, jsonb)', workers => 4);
SELECT queue, prefetch, after_dead_letter, workers FROM mqtx.subscriptions;
SELECT mqtx.subscribe('orders.apply', 'regress_apply_0_9(jsonb, jsonb)', 50, 5, '30 seconds', 'wait');
SELECT queue, prefetch, after_dead_letter, workers FROM mqtx.subscriptions;
SELECT mqtx.subscribe('orders.apply', 'regress_apply_0_9(jsonb, jsonb)', workers => 0);
SELECT mqtx.subscribe('orders.apply', 'regress_apply_0_9(jsonb, jsonb)', workers => 65);
SELECT mqtx.subscribe('orders.apply', 'regress_apply_0_9(jsonb, jsonb)', workers => NULL);
\set VERBOSITY terse
UPDATE mqtx.subscriptions SET workers = 100;
\set VERBOSITY default
SELECT queue, workers FROM mqtx.subscriptions;

-- a message without a key, parked for an apply worker, holds no key; nor
-- does a key on its way to the apply workers, unless its first message
-- waits for a retry
INSERT INTO mqtx.parked (queue, message_id, body) VALUES ('orders.apply', 'm-3', '\x7b7d');
SELECT queue, ordering_key, reason, parked FROM mqtx.held_keys;
SELECT mqtx.subscribe('orders.apply', 'regress_apply_0_9(jsonb, jsonb)', workers => 2);
SELECT queue, ordering_key, reason, parked FROM mqtx.held_keys;
UPDATE mqtx.parked SET next_attempt_at = now() + interval '1 hour' WHERE message_id = 'm-1';
SELECT queue, ordering_key, reason, parked FROM mqtx.held_keys;

-- unsubscribed, a queue leaves its parked messages, and says so
SELECT mqtx.unsubscribe('orders.apply');
SELECT mqtx.unsubscribe('orders.apply');
SELECT count(*) AS parked FROM mqtx.parked;

-- 0.1.0 to 0.9.0 in one step, with data in it
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mqtx_publisher') AS publisher_existed \gset
CREATE EXTENSION mqtx VERSION '0.1.0';
SELECT mqtx.publish('orders', 'order.created', '{"order_id": 1}') IS NOT NULL AS enqueued;
ALTER EXTENSION mqtx UPDATE TO '0.9.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
SELECT count(*) AS outbox FROM mqtx.outbox;
INSERT INTO mqtx_regress_fingerprint SELECT 'upgraded from 0.1.0', * FROM mqtx_regress_fingerprint();

-- and a fresh install of 0.9.0, in a new schema
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
CREATE EXTENSION mqtx VERSION '0.9.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
INSERT INTO mqtx_regress_fingerprint SELECT 'fresh', * FROM mqtx_regress_fingerprint();

-- the fingerprints see what 0.9.0 changed
SELECT difference, aspect, count(*)
FROM mqtx_regress_fingerprint_differences('0.8.0')
GROUP BY 1, 2 ORDER BY 1, 2;

-- the differences of the upgrades, both ways: none
SELECT * FROM mqtx_regress_fingerprint_differences('upgraded', 'upgraded from 0.1.0');

-- every member of the extension, and every column of its views, has a
-- comment
SELECT uncommented FROM mqtx_regress_uncommented();

-- tidy up: 0.9.0 stays installed; what this test made goes
DROP TABLE mqtx_regress_fingerprint;
DROP FUNCTION regress_apply_0_9(jsonb, jsonb);
DROP ROLE mqtx_regress_subscriber;
\if :publisher_existed
\else
DROP ROLE mqtx_publisher;
\endif
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
