--
-- Upgrading 0.7.0 to 0.8.0: every row kept, the outbox's ordering and
-- schedule columns, the new mqtx.publish (the roles that could run the old
-- one can run it), mqtx.cancel and mqtx.blocked_keys; the result the same
-- as a fresh 0.8.0 install, and so is 0.1.0 upgraded to 0.8.0 in one
-- step.  The fingerprints are 08_upgrade's, and the later upgrade tests
-- use them too.
--
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
CREATE EXTENSION mqtx VERSION '0.7.0';
CREATE TABLE mqtx_regress_fingerprint (install text, aspect text, object text, detail text);
INSERT INTO mqtx_regress_fingerprint SELECT '0.7.0', * FROM mqtx_regress_fingerprint();
CREATE ROLE mqtx_regress_publisher;
SELECT mqtx.grant_publish('mqtx_regress_publisher');
SELECT mqtx.declare_exchange('orders', 'direct');
SELECT count(*) AS enqueued
FROM (SELECT mqtx.publish('orders', 'order.created', jsonb_build_object('order_id', i))
	  FROM generate_series(1, 5) i) p;
UPDATE mqtx.outbox SET status = 'failed', attempts = 10, last_error = 'refused' WHERE id = 5;

-- an object that depends on the old mqtx.publish stops the update, named
CREATE FUNCTION publish_order(id int) RETURNS uuid LANGUAGE sql
BEGIN ATOMIC
	SELECT mqtx.publish('orders', 'order.created', jsonb_build_object('order_id', id));
END;
ALTER EXTENSION mqtx UPDATE TO '0.8.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
DROP FUNCTION publish_order(int);

ALTER EXTENSION mqtx UPDATE TO '0.8.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
SELECT id, payload, status, attempts, ordering_key, deliver_at FROM mqtx.outbox ORDER BY id;

-- the publisher keeps its right, to the new function and to cancel
SELECT p.oid::regprocedure AS function, has_function_privilege('mqtx_regress_publisher', p.oid, 'EXECUTE') AS may_run
FROM pg_proc p WHERE p.proname IN ('publish', 'cancel') AND p.pronamespace = 'mqtx'::regnamespace
ORDER BY 1;
SET ROLE mqtx_regress_publisher;
SELECT mqtx.publish('orders', 'order.paid', '{"order_id": 1}', ordering_key => '1') IS NOT NULL AS keyed;
SELECT mqtx.publish('orders', 'order.reminder', '{"order_id": 2}', delay => '1 day') AS later \gset
SELECT mqtx.cancel(:'later') AS withdrawn;
-- and still nothing else
SELECT count(*) FROM mqtx.outbox;
RESET ROLE;
SELECT routing_key, ordering_key FROM mqtx.outbox WHERE id > 5 ORDER BY id;
-- calls with the old arguments work as before
SELECT mqtx.publish('orders', 'order.created', '{"order_id": 6}', '{"h": 1}') IS NOT NULL AS enqueued;
-- the grants are the database's, not the extension's: pg_dump keeps them
SELECT p.oid::regprocedure AS function, i.initprivs
FROM pg_proc p JOIN pg_init_privs i ON i.objoid = p.oid AND i.classoid = 'pg_proc'::regclass
WHERE p.proname IN ('publish', 'cancel') AND p.pronamespace = 'mqtx'::regnamespace
ORDER BY 1;
SELECT mqtx.revoke_publish('mqtx_regress_publisher');
SELECT p.oid::regprocedure AS function, has_function_privilege('mqtx_regress_publisher', p.oid, 'EXECUTE') AS may_run
FROM pg_proc p WHERE p.proname IN ('publish', 'cancel') AND p.pronamespace = 'mqtx'::regnamespace
ORDER BY 1;
REVOKE USAGE ON SCHEMA mqtx FROM mqtx_regress_publisher;
INSERT INTO mqtx_regress_fingerprint SELECT 'upgraded', * FROM mqtx_regress_fingerprint();

-- the failed row of 0.7.0 blocks nothing: it has no key
SELECT count(*) AS blocked FROM mqtx.blocked_keys;
SELECT pending, failed, scheduled FROM mqtx.outbox_stats;

-- 0.1.0 to 0.8.0 in one step, with data in it
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mqtx_publisher') AS publisher_existed \gset
CREATE EXTENSION mqtx VERSION '0.1.0';
SELECT mqtx.publish('orders', 'order.created', '{"order_id": 1}') IS NOT NULL AS enqueued;
ALTER EXTENSION mqtx UPDATE TO '0.8.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
SELECT count(*) AS outbox FROM mqtx.outbox;
INSERT INTO mqtx_regress_fingerprint SELECT 'upgraded from 0.1.0', * FROM mqtx_regress_fingerprint();

-- and a fresh install of 0.8.0, in a new schema
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
CREATE EXTENSION mqtx VERSION '0.8.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
INSERT INTO mqtx_regress_fingerprint SELECT 'fresh', * FROM mqtx_regress_fingerprint();

-- the fingerprints see what 0.8.0 changed
SELECT difference, aspect, count(*)
FROM mqtx_regress_fingerprint_differences('0.7.0')
GROUP BY 1, 2 ORDER BY 1, 2;

-- the differences of the upgrades, both ways: none
SELECT * FROM mqtx_regress_fingerprint_differences('upgraded', 'upgraded from 0.1.0');

-- every member of the extension, and every column of its views, has a
-- comment
SELECT uncommented FROM mqtx_regress_uncommented();

-- tidy up: 0.8.0 stays installed; what this test made goes
DROP TABLE mqtx_regress_fingerprint;
DROP ROLE mqtx_regress_publisher;
\if :publisher_existed
\else
DROP ROLE mqtx_publisher;
\endif
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
