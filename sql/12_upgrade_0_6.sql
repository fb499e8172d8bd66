--
-- Upgrading 0.5.0 to 0.6.0: every row kept, mqtx.broker_connections added
-- with its comments, and the result the same as a fresh 0.6.0 install; and
-- so is 0.1.0 upgraded to 0.6.0 in one step.  The fingerprints are
-- 08_upgrade's mqtx_regress_fingerprint() and
-- mqtx_regress_fingerprint_differences().
--
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
CREATE EXTENSION mqtx VERSION '0.5.0';
SELECT mqtx.declare_exchange('orders', 'direct');
SELECT mqtx.declare_queue('dispatch');
SELECT mqtx.bind('dispatch', 'orders', 'order.created');
SELECT count(*) AS enqueued
FROM (SELECT mqtx.publish('orders', 'order.created', jsonb_build_object('order_id', i))
	  FROM generate_series(1, 5) i) p;
CREATE TABLE mqtx_regress_fingerprint (install text, aspect text, object text, detail text);
INSERT INTO mqtx_regress_fingerprint SELECT '0.5.0', * FROM mqtx_regress_fingerprint();

ALTER EXTENSION mqtx UPDATE TO '0.6.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
SELECT (SELECT count(*) FROM mqtx.outbox WHERE status = 'pending') AS pending,
	   (SELECT count(*) FROM mqtx.exchanges) AS exchanges,
	   (SELECT count(*) FROM mqtx.queues) AS queues,
	   (SELECT count(*) FROM mqtx.bindings) AS bindings;
INSERT INTO mqtx_regress_fingerprint SELECT 'upgraded', * FROM mqtx_regress_fingerprint();

-- one row per worker of each served database; no broker is configured
-- here, so neither is connected to a node
SELECT database, worker, broker, connected_since FROM mqtx.broker_connections
ORDER BY 1, 2;

-- 0.1.0 to 0.6.0 in one step, with data in it
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
-- 0.1.0 makes mqtx_publisher unless the cluster has it already; the role
-- is dropped at the end only if this test made it
SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mqtx_publisher') AS publisher_existed \gset
CREATE EXTENSION mqtx VERSION '0.1.0';
SELECT mqtx.publish('orders', 'order.created', '{"order_id": 1}') IS NOT NULL AS enqueued;
ALTER EXTENSION mqtx UPDATE TO '0.6.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
SELECT count(*) AS outbox FROM mqtx.outbox;
INSERT INTO mqtx_regress_fingerprint SELECT 'upgraded from 0.1.0', * FROM mqtx_regress_fingerprint();

-- and a fresh install of 0.6.0, in a new schema
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
CREATE EXTENSION mqtx VERSION '0.6.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
INSERT INTO mqtx_regress_fingerprint SELECT 'fresh', * FROM mqtx_regress_fingerprint();

-- the fingerprints see what 0.6.0 added: 0.5.0's differs from the fresh
-- install's by the version, the function, the view and their comments
SELECT difference, aspect, count(*)
FROM mqtx_regress_fingerprint_differences('0.5.0')
GROUP BY 1, 2 ORDER BY 1, 2;

-- the differences of the upgrades, both ways: none
SELECT * FROM mqtx_regress_fingerprint_differences('upgraded', 'upgraded from 0.1.0');

-- every member of the extension, and every column of its views, has a
-- comment
SELECT uncommented FROM mqtx_regress_uncommented();

-- tidy up: 0.6.0 stays installed; what this test made goes (13_upgrade_0_7
-- still needs 08_upgrade's fingerprints)
DROP TABLE mqtx_regress_fingerprint;
\if :publisher_existed
\else
DROP ROLE mqtx_publisher;
\endif
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
