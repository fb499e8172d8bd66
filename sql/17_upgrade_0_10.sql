--
-- Upgrading 0.9.0 to 0.10.0: every outbox, inbox, dead-letter and parked
-- row kept, received messages without a correlation id as before, the new
-- mqtx.publish (the roles that could run the old one can run it, with
-- their grant option; calls with the old arguments work), a dead letter
-- of 0.9.0 redriven, and the conversation view; the result the same as a
-- fresh 0.10.0 install, and so is 0.1.0 upgraded to 0.10.0 in one step.
-- (18_message_context tests correlation and trace context.)  The
-- fingerprints are 08_upgrade's, dropped at the end.
--
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
CREATE EXTENSION mqtx VERSION '0.9.0';
CREATE TABLE mqtx_regress_fingerprint (install text, aspect text, object text, detail text);
INSERT INTO mqtx_regress_fingerprint SELECT '0.9.0', * FROM mqtx_regress_fingerprint();
CREATE ROLE mqtx_regress_publisher;
GRANT USAGE ON SCHEMA mqtx TO mqtx_regress_publisher;
GRANT EXECUTE ON FUNCTION mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval)
	TO mqtx_regress_publisher WITH GRANT OPTION;
SELECT mqtx.publish('orders', 'order.created', '{"order_id": 1}', ordering_key => 'order-1')
	IS NOT NULL AS enqueued;
INSERT INTO mqtx.inbox (queue, message_id) VALUES ('orders.apply', 'm-1'), ('orders.apply', 'm-2');
INSERT INTO mqtx.dead_letter (queue, message_id, body, body_json, error_message, attempts,
							  first_failed_at, last_failed_at)
VALUES ('orders.apply', 'm-2', '\x7b7d', '{}', 'no depot', 3, now(), now());
INSERT INTO mqtx.parked (queue, ordering_key, message_id, body)
VALUES ('orders.apply', 'order-3', 'm-3', '\x7b7d');

-- an object that depends on the old mqtx.publish stops the update, named
CREATE FUNCTION publish_order() RETURNS uuid LANGUAGE sql
BEGIN ATOMIC
	SELECT mqtx.publish('orders', 'order.created', '{}');
END;
ALTER EXTENSION mqtx UPDATE TO '0.10.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
DROP FUNCTION publish_order();

ALTER EXTENSION mqtx UPDATE TO '0.10.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
SELECT exchange, routing_key, payload, headers, status, ordering_key FROM mqtx.outbox;
SELECT queue, message_id, correlation_id, causation_id FROM mqtx.inbox ORDER BY message_id;
SELECT queue, message_id, error_message, correlation_id FROM mqtx.dead_letter;
SELECT queue, ordering_key, message_id, correlation_id FROM mqtx.parked;

-- the publisher keeps its right, and its grant option; the grant is the
-- database's, not the extension's: pg_dump keeps it
SELECT p.oid::regprocedure AS function, a.grantee::regrole, a.is_grantable
FROM pg_proc p, aclexplode(p.proacl) a
WHERE p.proname = 'publish' AND p.pronamespace = 'mqtx'::regnamespace
  AND a.grantee <> p.proowner;
SELECT p.oid::regprocedure AS function, i.initprivs
FROM pg_proc p JOIN pg_init_privs i ON i.objoid = p.oid AND i.classoid = 'pg_proc'::regclass
WHERE p.proname = 'publish' AND p.pronamespace = 'mqtx'::regnamespace;
REVOKE ALL ON FUNCTION mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval, text, text)
	FROM mqtx_regress_publisher CASCADE;
REVOKE USAGE ON SCHEMA mqtx FROM mqtx_regress_publisher;
INSERT INTO mqtx_regress_fingerprint SELECT 'upgraded', * FROM mqtx_regress_fingerprint();

-- calls with the old arguments work, the new ones too
SELECT mqtx.publish('orders', 'order.created', '{"order_id": 2}', '{"tenant": "t1"}', 'order-2')
	IS NOT NULL AS enqueued;
SELECT mqtx.publish('orders', 'order.created', '{"order_id": 3}', correlation_id => 'checkout-3')
	IS NOT NULL AS enqueued;
SELECT payload, headers FROM mqtx.outbox WHERE payload ->> 'order_id' IN ('2', '3') ORDER BY id;

-- a dead letter of 0.9.0 is redriven as before; one that has a
-- correlation id keeps it
UPDATE mqtx.dead_letter SET correlation_id = 'checkout-2';
SELECT mqtx.redrive(id) IS NOT NULL AS redriven FROM mqtx.dead_letter;
SELECT routing_key, headers FROM mqtx.outbox WHERE exchange = '';

-- what this database sent and received
SELECT direction, message_id, correlation_id, causation_id, queue, status
FROM mqtx.message_trail WHERE direction = 'received' ORDER BY message_id;
SELECT direction,
	   CASE WHEN correlation_id = message_id THEN '(its own id)' ELSE correlation_id END
		   AS correlation_id,
	   routing_key, status
FROM mqtx.message_trail WHERE direction = 'sent' ORDER BY at, message_id;

-- 0.1.0 to 0.10.0 in one step, with data in it
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mqtx_publisher') AS publisher_existed \gset
CREATE EXTENSION mqtx VERSION '0.1.0';
SELECT mqtx.publish('orders', 'order.created', '{"order_id": 1}') IS NOT NULL AS enqueued;
ALTER EXTENSION mqtx UPDATE TO '0.10.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
SELECT count(*) AS outbox FROM mqtx.outbox;
INSERT INTO mqtx_regress_fingerprint SELECT 'upgraded from 0.1.0', * FROM mqtx_regress_fingerprint();

-- and a fresh install, in a new schema: the control file's version
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
CREATE EXTENSION mqtx;
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
INSERT INTO mqtx_regress_fingerprint SELECT 'fresh', * FROM mqtx_regress_fingerprint();

-- the fingerprints see what 0.10.0 changed
SELECT difference, aspect, count(*)
FROM mqtx_regress_fingerprint_differences('0.9.0')
GROUP BY 1, 2 ORDER BY 1, 2;

-- the differences of the upgrades, both ways: none
SELECT * FROM mqtx_regress_fingerprint_differences('upgraded', 'upgraded from 0.1.0');

-- every member of the extension, and every column of its views, has a
-- comment
SELECT uncommented FROM mqtx_regress_uncommented();

-- tidy up: 0.10.0 stays installed; what 08_upgrade and this test made goes
DROP TABLE mqtx_regress_fingerprint;
DROP FUNCTION mqtx_regress_fingerprint_differences(text[]);
DROP FUNCTION mqtx_regress_fingerprint();
DROP FUNCTION mqtx_regress_uncommented();
DROP ROLE mqtx_regress_publisher;
\if :publisher_existed
\else
DROP ROLE mqtx_publisher;
\endif
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
