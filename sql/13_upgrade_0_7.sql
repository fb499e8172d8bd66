--
-- Upgrading 0.6.0 to 0.7.0: every row kept, mqtx.served_databases and the
-- queue check added with their comments, and the result the same as a
-- fresh 0.7.0 install; and so is 0.1.0 upgraded to 0.7.0 in one step.  The
-- fingerprints are 08_upgrade's mqtx_regress_fingerprint() and
-- mqtx_regress_fingerprint_differences(), which 14_upgrade_0_8 uses too.
--
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
CREATE EXTENSION mqtx VERSION '0.6.0';
SELECT mqtx.declare_exchange('orders', 'direct');
SELECT mqtx.declare_queue('dispatch');
-- 0.6.0 took a non-durable quorum queue, which RabbitMQ refuses
SELECT mqtx.declare_queue('loose', false, '{"x-queue-type": "quorum"}');
SELECT mqtx.bind('dispatch', 'orders', 'order.created');
SELECT count(*) AS enqueued
FROM (SELECT mqtx.publish('orders', 'order.created', jsonb_build_object('order_id', i))
	  FROM generate_series(1, 5) i) p;
CREATE TABLE mqtx_regress_fingerprint (install text, aspect text, object text, detail text);
INSERT INTO mqtx_regress_fingerprint SELECT '0.6.0', * FROM mqtx_regress_fingerprint();

ALTER EXTENSION mqtx UPDATE TO '0.7.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
SELECT (SELECT count(*) FROM mqtx.outbox WHERE status = 'pending') AS pending,
	   (SELECT count(*) FROM mqtx.exchanges) AS exchanges,
	   (SELECT count(*) FROM mqtx.queues) AS queues,
	   (SELECT count(*) FROM mqtx.bindings) AS bindings;
INSERT INTO mqtx_regress_fingerprint SELECT 'upgraded', * FROM mqtx_regress_fingerprint();

-- the row 0.6.0 took is kept, but changing it is checked
SELECT name, durable, arguments FROM mqtx.queues WHERE name = 'loose';
UPDATE mqtx.queues SET arguments = arguments WHERE name = 'loose';
SELECT mqtx.declare_queue('loose', true, '{"x-queue-type": "quorum"}');

-- quorum-queue settings that would lose messages, or that RabbitMQ would
-- refuse, are refused when they are written
SELECT mqtx.declare_queue('q1', true,
	'{"x-queue-type": "quorum", "x-delivery-limit": 5}');
SELECT mqtx.declare_queue('q2', true,
	'{"x-delivery-limit": 5, "x-dead-letter-exchange": "dlx"}');
SELECT mqtx.declare_queue('q3', true,
	'{"x-queue-type": "quorum", "x-delivery-limit": 0, "x-dead-letter-exchange": "dlx"}');
SELECT mqtx.declare_queue('q4', true,
	'{"x-queue-type": "quorum", "x-delivery-limit": 2.5, "x-dead-letter-exchange": "dlx"}');
SELECT mqtx.declare_queue('q5', true,
	'{"x-queue-type": "quorum", "x-delivery-limit": "20", "x-dead-letter-exchange": "dlx"}');
-- a limit with somewhere to send what it stops is taken, and so is none
SELECT mqtx.declare_queue('q6', true,
	'{"x-queue-type": "quorum", "x-delivery-limit": 20, "x-dead-letter-exchange": "dlx"}');
SELECT mqtx.declare_queue('q7', true, '{"x-queue-type": "quorum"}');
-- a whole number however it is written
SELECT mqtx.declare_queue('q8', true,
	'{"x-queue-type": "quorum", "x-delivery-limit": 1e1, "x-dead-letter-exchange": "dlx"}');
SELECT name, arguments FROM mqtx.queues WHERE name ~ '^q[0-9]' ORDER BY name;

-- one row per served database (the workers' states depend on timing)
SELECT database FROM mqtx.served_databases;
SELECT attname FROM pg_attribute
WHERE attrelid = 'mqtx.served_databases'::regclass AND attnum > 0 ORDER BY attnum;
SELECT has_table_privilege('public', 'mqtx.served_databases', 'SELECT') AS public_may_read;

-- 0.1.0 to 0.7.0 in one step, with data in it
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
-- 0.1.0 makes mqtx_publisher unless the cluster has it already; the role
-- is dropped at the end only if this test made it
SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mqtx_publisher') AS publisher_existed \gset
CREATE EXTENSION mqtx VERSION '0.1.0';
SELECT mqtx.publish('orders', 'order.created', '{"order_id": 1}') IS NOT NULL AS enqueued;
ALTER EXTENSION mqtx UPDATE TO '0.7.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
SELECT count(*) AS outbox FROM mqtx.outbox;
INSERT INTO mqtx_regress_fingerprint SELECT 'upgraded from 0.1.0', * FROM mqtx_regress_fingerprint();

-- and a fresh install of 0.7.0, in a new schema
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
CREATE EXTENSION mqtx VERSION '0.7.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
INSERT INTO mqtx_regress_fingerprint SELECT 'fresh', * FROM mqtx_regress_fingerprint();

-- the fingerprints see what 0.7.0 added: 0.6.0's differs from the fresh
-- install's by the version, the functions, the trigger, the view and
-- their comments
SELECT difference, aspect, count(*)
FROM mqtx_regress_fingerprint_differences('0.6.0')
GROUP BY 1, 2 ORDER BY 1, 2;

-- the differences of the upgrades, both ways: none
SELECT * FROM mqtx_regress_fingerprint_differences('upgraded', 'upgraded from 0.1.0');

-- every member of the extension, and every column of its views, has a
-- comment
SELECT uncommented FROM mqtx_regress_uncommented();

-- tidy up: 0.7.0 stays installed; what this test made goes
DROP TABLE mqtx_regress_fingerprint;
\if :publisher_existed
\else
DROP ROLE mqtx_publisher;
\endif
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
