--
-- Upgrading 0.4.0 to 0.5.0: every row and grant kept, every object the
-- extension has (and every column of its tables and views) commented, the
-- errors of the subscription check and of redrive written whole, and the
-- result the same as a fresh 0.5.0 install; and so is 0.1.0 upgraded to
-- 0.5.0 in one step.  The fingerprints are 08_upgrade's
-- mqtx_regress_fingerprint() and mqtx_regress_fingerprint_differences(),
-- dropped at the end.
--
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
CREATE EXTENSION mqtx VERSION '0.4.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';

-- What has no comment: the schema, every member of the extension, and
-- every column of its tables and views
CREATE TEMP VIEW mqtx_regress_uncommented AS
WITH ext AS (
	SELECT e.oid, e.extnamespace FROM pg_extension e WHERE e.extname = 'mqtx'
), member AS (
	SELECT d.classid, d.objid, 0 AS objsubid
	FROM pg_depend d, ext
	WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'
	UNION ALL
	SELECT 'pg_namespace'::regclass, ext.extnamespace, 0 FROM ext
), part AS (
	SELECT * FROM member
	UNION ALL
	SELECT m.classid, a.attrelid, a.attnum
	FROM member m
	JOIN pg_class c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid AND c.relkind IN ('r', 'v')
	JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
)
SELECT pg_describe_object(p.classid, p.objid, p.objsubid) AS object,
	   NOT EXISTS (SELECT FROM pg_description de
				   WHERE de.classoid = p.classid AND de.objoid = p.objid
					 AND de.objsubid = p.objsubid) AS uncommented
FROM part p;

-- 0.4.0 left most of them without
SELECT split_part(object, ' ', 1) AS kind, count(*) AS objects,
	   count(*) FILTER (WHERE uncommented) AS uncommented
FROM mqtx_regress_uncommented GROUP BY 1 ORDER BY 1;

-- 0.4.0 as installed, to compare with 0.5.0's below
CREATE TABLE mqtx_regress_fingerprint (install text, aspect text, object text, detail text);
INSERT INTO mqtx_regress_fingerprint SELECT '0.4.0', * FROM mqtx_regress_fingerprint();

-- What has been granted on the extension's objects, but to their owner
CREATE TEMP VIEW mqtx_regress_grants AS
SELECT 'schema ' || n.nspname AS object, a.grantee::regrole::text AS grantee, a.privilege_type
FROM pg_namespace n, aclexplode(n.nspacl) a
WHERE n.nspname = 'mqtx' AND a.grantee <> n.nspowner
UNION ALL
SELECT 'function ' || p.oid::regprocedure, a.grantee::regrole::text, a.privilege_type
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace, aclexplode(p.proacl) a
WHERE n.nspname = 'mqtx' AND a.grantee <> p.proowner
UNION ALL
SELECT 'relation ' || c.oid::regclass, a.grantee::regrole::text, a.privilege_type
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) a
WHERE n.nspname = 'mqtx' AND a.grantee <> c.relowner;

--
-- A 0.4.0 database in use
--
-- (Its times are yesterday's: while the test runs, the workers delete
-- published and inbox rows older than mqtx.retention and
-- mqtx.inbox_retention, 7 days.)
SELECT date_trunc('day', now()) - interval '1 day' AS yesterday \gset
CREATE ROLE mqtx_regress_publisher;
SELECT mqtx.grant_publish('mqtx_regress_publisher');
CREATE ROLE "mqtx_regress Owner";
CREATE ROLE mqtx_regress_sub;
GRANT USAGE ON SCHEMA mqtx TO mqtx_regress_sub;
GRANT SELECT, INSERT ON mqtx.subscriptions TO mqtx_regress_sub;

-- outbox rows of every status, and one through a table's trigger
INSERT INTO mqtx.outbox (exchange, routing_key, payload, headers, status, attempts,
	next_attempt_at, last_error, created_at, published_at)
VALUES ('orders', 'order.pending', '{"order_id": 1}', '{"tenant": "acme"}', 'pending', 0,
		(:'yesterday'::timestamptz + interval '10:00:00'), NULL, (:'yesterday'::timestamptz + interval '10:00:00'), NULL),
	   ('orders', 'order.retried', '{"order_id": 2}', NULL, 'pending', 2,
		(:'yesterday'::timestamptz + interval '10:05:00'), 'connection refused', (:'yesterday'::timestamptz + interval '10:00:00'), NULL),
	   ('orders', 'order.published', '{"order_id": 3}', NULL, 'published', 1,
		(:'yesterday'::timestamptz + interval '10:00:00'), NULL, (:'yesterday'::timestamptz + interval '10:00:00'), (:'yesterday'::timestamptz + interval '10:00:01')),
	   ('orders', 'order.failed', '{"order_id": 4}', NULL, 'failed', 10,
		(:'yesterday'::timestamptz + interval '10:00:00'), 'NOT_FOUND', (:'yesterday'::timestamptz + interval '10:00:00'), NULL);
SET ROLE mqtx_regress_publisher;
SELECT mqtx.publish('orders', 'order.by_publisher', '{"order_id": 5}') IS NOT NULL AS enqueued;
RESET ROLE;
CREATE TABLE app_events (id int PRIMARY KEY);
CREATE TRIGGER app_events_outbox AFTER INSERT ON app_events
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('orders', 'app.row');
INSERT INTO app_events VALUES (1);
SELECT routing_key, status, attempts FROM mqtx.outbox ORDER BY id;

-- topology, a subscription, and what the broker refused
SELECT mqtx.declare_exchange('orders', 'topic');
SELECT mqtx.declare_queue('dispatch');
SELECT mqtx.declare_queue('dispatch.retry', true, '{"x-message-ttl": 5000}');
SELECT mqtx.bind('dispatch', 'orders', 'order.*');
CREATE FUNCTION upgrade_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE sql AS 'SELECT';
SELECT mqtx.subscribe('dispatch', 'upgrade_handler(jsonb,jsonb)', 10, 3, '5 seconds');
INSERT INTO mqtx.broker_errors (worker, object_type, object_name, error, failures,
	first_failed_at, last_failed_at, next_try_at)
VALUES ('relay', 'exchange', 'delayed', '503 COMMAND_INVALID - unknown exchange type', 2,
		(:'yesterday'::timestamptz + interval '10:00:00'), (:'yesterday'::timestamptz + interval '10:01:00'), (:'yesterday'::timestamptz + interval '10:02:00'));

-- what the consumer leaves: inbox, failed attempts, dead letters (one of
-- them JSON, and one not)
INSERT INTO mqtx.inbox (queue, message_id, applied_at) VALUES
	('dispatch', 'm-1', (:'yesterday'::timestamptz + interval '11:00:00')),
	('dispatch', 'm-6', (:'yesterday'::timestamptz + interval '12:01:00')),
	('dispatch', 'm-7', (:'yesterday'::timestamptz + interval '12:02:00'));
INSERT INTO mqtx.consumer_attempts (queue, message_id, attempts, last_error,
	first_failed_at, last_failed_at)
VALUES ('dispatch', 'm-5', 2, 'no depot serves city "Atlantis"',
		(:'yesterday'::timestamptz + interval '11:01:00'), (:'yesterday'::timestamptz + interval '11:02:00'));
INSERT INTO mqtx.dead_letter (queue, message_id, exchange, routing_key, headers, body,
	body_text, body_json, error_message, error_detail, error_context, attempts,
	first_failed_at, last_failed_at)
VALUES
	('dispatch', 'm-6', 'orders', 'order.created', '{"tenant": "acme"}',
	 '{"order_id": 6}', '{"order_id": 6}', '{"order_id": 6}', 'dispatch refused',
	 'Key (order_id)=(6) already exists.', 'SQL function "upgrade_handler"', 3,
	 (:'yesterday'::timestamptz + interval '12:00:00'), (:'yesterday'::timestamptz + interval '12:01:00')),
	('dispatch', 'm-7', '', 'dispatch', NULL, '\xfffe', NULL, NULL,
	 'body is not valid UTF-8', NULL, NULL, 1,
	 (:'yesterday'::timestamptz + interval '12:02:00'), (:'yesterday'::timestamptz + interval '12:02:00'));

-- copies of every row, to compare with after the upgrade
CREATE TEMP TABLE before_outbox AS SELECT * FROM mqtx.outbox;
CREATE TEMP TABLE before_exchanges AS SELECT * FROM mqtx.exchanges;
CREATE TEMP TABLE before_queues AS SELECT * FROM mqtx.queues;
CREATE TEMP TABLE before_bindings AS SELECT * FROM mqtx.bindings;
CREATE TEMP TABLE before_subscriptions AS SELECT * FROM mqtx.subscriptions;
CREATE TEMP TABLE before_inbox AS SELECT * FROM mqtx.inbox;
CREATE TEMP TABLE before_consumer_attempts AS SELECT * FROM mqtx.consumer_attempts;
CREATE TEMP TABLE before_dead_letter AS SELECT * FROM mqtx.dead_letter;
CREATE TEMP TABLE before_broker_errors AS SELECT * FROM mqtx.broker_errors;
CREATE TEMP TABLE before_grants AS SELECT * FROM mqtx_regress_grants;

--
-- The upgrade
--
SELECT source, target, path FROM pg_extension_update_paths('mqtx')
WHERE source IN ('0.1.0', '0.4.0') AND target = '0.5.0' ORDER BY 1;
ALTER EXTENSION mqtx UPDATE TO '0.5.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';

-- every row is there, unchanged, and nothing else
SELECT 'outbox' AS tbl, (SELECT count(*) FROM before_outbox) AS before,
       (SELECT count(*) FROM (TABLE before_outbox EXCEPT ALL TABLE mqtx.outbox) d) AS missing,
       (SELECT count(*) FROM (TABLE mqtx.outbox EXCEPT ALL TABLE before_outbox) d) AS appeared
UNION ALL
SELECT 'exchanges', (SELECT count(*) FROM before_exchanges),
       (SELECT count(*) FROM (TABLE before_exchanges EXCEPT ALL TABLE mqtx.exchanges) d),
       (SELECT count(*) FROM (TABLE mqtx.exchanges EXCEPT ALL TABLE before_exchanges) d)
UNION ALL
SELECT 'queues', (SELECT count(*) FROM before_queues),
       (SELECT count(*) FROM (TABLE before_queues EXCEPT ALL TABLE mqtx.queues) d),
       (SELECT count(*) FROM (TABLE mqtx.queues EXCEPT ALL TABLE before_queues) d)
UNION ALL
SELECT 'bindings', (SELECT count(*) FROM before_bindings),
       (SELECT count(*) FROM (TABLE before_bindings EXCEPT ALL TABLE mqtx.bindings) d),
       (SELECT count(*) FROM (TABLE mqtx.bindings EXCEPT ALL TABLE before_bindings) d)
UNION ALL
SELECT 'subscriptions', (SELECT count(*) FROM before_subscriptions),
       (SELECT count(*) FROM (TABLE before_subscriptions EXCEPT ALL TABLE mqtx.subscriptions) d),
       (SELECT count(*) FROM (TABLE mqtx.subscriptions EXCEPT ALL TABLE before_subscriptions) d)
UNION ALL
SELECT 'inbox', (SELECT count(*) FROM before_inbox),
       (SELECT count(*) FROM (TABLE before_inbox EXCEPT ALL TABLE mqtx.inbox) d),
       (SELECT count(*) FROM (TABLE mqtx.inbox EXCEPT ALL TABLE before_inbox) d)
UNION ALL
SELECT 'consumer_attempts', (SELECT count(*) FROM before_consumer_attempts),
       (SELECT count(*) FROM (TABLE before_consumer_attempts EXCEPT ALL TABLE mqtx.consumer_attempts) d),
       (SELECT count(*) FROM (TABLE mqtx.consumer_attempts EXCEPT ALL TABLE before_consumer_attempts) d)
UNION ALL
SELECT 'dead_letter', (SELECT count(*) FROM before_dead_letter),
       (SELECT count(*) FROM (TABLE before_dead_letter EXCEPT ALL TABLE mqtx.dead_letter) d),
       (SELECT count(*) FROM (TABLE mqtx.dead_letter EXCEPT ALL TABLE before_dead_letter) d)
UNION ALL
SELECT 'broker_errors', (SELECT count(*) FROM before_broker_errors),
       (SELECT count(*) FROM (TABLE before_broker_errors EXCEPT ALL TABLE mqtx.broker_errors) d),
       (SELECT count(*) FROM (TABLE mqtx.broker_errors EXCEPT ALL TABLE before_broker_errors) d);

-- and every grant
SELECT * FROM mqtx_regress_grants ORDER BY 1, 2, 3;
SELECT (SELECT count(*) FROM (TABLE before_grants EXCEPT ALL TABLE mqtx_regress_grants) d) AS missing,
       (SELECT count(*) FROM (TABLE mqtx_regress_grants EXCEPT ALL TABLE before_grants) d) AS appeared;

-- everything is commented now; the comments 0.4.0 had are as they were
SELECT object FROM mqtx_regress_uncommented WHERE uncommented ORDER BY 1;
SELECT obj_description('mqtx'::regnamespace, 'pg_namespace') AS schema_comment;
SELECT col_description('mqtx.dead_letter'::regclass, attnum) AS body_json_comment
FROM pg_attribute WHERE attrelid = 'mqtx.dead_letter'::regclass AND attname = 'body_json';
SELECT count(*) AS comments_kept, count(*) FILTER (WHERE n.detail = o.detail) AS unchanged
FROM mqtx_regress_fingerprint o
JOIN mqtx_regress_fingerprint n ON n.aspect = o.aspect AND n.object = o.object
WHERE o.install = '0.4.0' AND n.install = 'upgraded' AND o.aspect = 'comment';

--
-- Publishing goes on: by the granted role, by the table's trigger, and
-- with time-ordered ids
--
SET ROLE mqtx_regress_publisher;
SELECT mqtx.publish('orders', 'order.after', '{"order_id": 8}') IS NOT NULL AS enqueued;
RESET ROLE;
INSERT INTO app_events VALUES (2);
SELECT routing_key, status, payload, substr(message_id::text, 15, 1) AS uuid_version
FROM mqtx.outbox WHERE id > (SELECT max(id) FROM before_outbox) ORDER BY id;

--
-- The errors of the subscription check and of redrive, as 0.5.0 writes them
--
CREATE FUNCTION set_handler(payload jsonb, headers jsonb) RETURNS SETOF void
	LANGUAGE sql AS 'SELECT';
CREATE PROCEDURE procedure_handler(payload jsonb, headers jsonb) LANGUAGE sql AS 'SELECT';
CREATE FUNCTION owned_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE sql AS 'SELECT';
ALTER FUNCTION owned_handler(jsonb, jsonb) OWNER TO "mqtx_regress Owner";
SELECT mqtx.subscribe('dispatch.retry', 'set_handler(jsonb,jsonb)');
SELECT mqtx.subscribe('dispatch.retry', 'procedure_handler(jsonb,jsonb)');
INSERT INTO mqtx.subscriptions (queue, handler) VALUES ('dispatch.retry', 0);
SET ROLE mqtx_regress_sub;
INSERT INTO mqtx.subscriptions (queue, handler) VALUES ('dispatch.retry', 'owned_handler(jsonb,jsonb)');
RESET ROLE;
SELECT queue, handler FROM mqtx.subscriptions ORDER BY queue;

-- the dead letter that is not JSON stays; the other is redriven, under its
-- original identity, and its inbox row goes
SELECT mqtx.redrive(id) FROM mqtx.dead_letter WHERE message_id = 'm-7';
SELECT mqtx.redrive(id) AS redriven_id FROM mqtx.dead_letter WHERE message_id = 'm-6' \gset
SELECT exchange, routing_key, payload, headers, status
FROM mqtx.outbox WHERE message_id = :'redriven_id';
SELECT queue, message_id FROM mqtx.dead_letter ORDER BY id;
SELECT queue, message_id FROM mqtx.inbox ORDER BY queue, message_id;

-- The extension's own objects must now be those of a fresh install: the
-- grants made here are taken back first (a fresh install has none), and
-- then the fingerprint is taken.
SELECT mqtx.revoke_publish('mqtx_regress_publisher');
REVOKE USAGE ON SCHEMA mqtx FROM mqtx_regress_publisher, mqtx_regress_sub;
REVOKE SELECT, INSERT ON mqtx.subscriptions FROM mqtx_regress_sub;
SELECT * FROM mqtx_regress_grants;
INSERT INTO mqtx_regress_fingerprint SELECT 'upgraded', * FROM mqtx_regress_fingerprint();

--
-- 0.1.0 to 0.5.0 in one step, with data in it
--
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
-- 0.1.0 makes mqtx_publisher unless the cluster has it already; the role
-- is dropped at the end only if this test made it
SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mqtx_publisher') AS publisher_existed \gset
CREATE EXTENSION mqtx VERSION '0.1.0';
SELECT mqtx.publish('orders', 'order.created', '{"order_id": 1}') IS NOT NULL AS enqueued;
SELECT mqtx.declare_queue('dispatch');
ALTER EXTENSION mqtx UPDATE TO '0.5.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
INSERT INTO mqtx_regress_fingerprint SELECT 'upgraded from 0.1.0', * FROM mqtx_regress_fingerprint();
SELECT (SELECT count(*) FROM mqtx.outbox) AS outbox, (SELECT count(*) FROM mqtx.queues) AS queues;
SELECT object FROM mqtx_regress_uncommented WHERE uncommented ORDER BY 1;

-- and a fresh 0.5.0 install, in a new schema
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
CREATE EXTENSION mqtx VERSION '0.5.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
INSERT INTO mqtx_regress_fingerprint SELECT 'fresh', * FROM mqtx_regress_fingerprint();
SELECT split_part(object, ' ', 1) AS kind, count(*) AS objects,
	   count(*) FILTER (WHERE uncommented) AS uncommented
FROM mqtx_regress_uncommented GROUP BY 1 ORDER BY 1;

-- the fingerprints see what 0.5.0 changed: 0.4.0's differs from the fresh
-- install's by the version, the new comments and the two functions
SELECT difference, aspect, count(*)
FROM mqtx_regress_fingerprint_differences('0.4.0')
GROUP BY 1, 2 ORDER BY 1, 2;
SELECT difference, object FROM mqtx_regress_fingerprint_differences('0.4.0')
WHERE aspect = 'function' ORDER BY 1, 2;

-- the differences of the upgrades, both ways: none
SELECT * FROM mqtx_regress_fingerprint_differences('upgraded', 'upgraded from 0.1.0');

-- tidy up: 0.5.0 stays installed, the roles, tables and functions made
-- here go (08_upgrade's fingerprint functions stay, for 12_upgrade_0_6)
DROP TABLE mqtx_regress_fingerprint;
DROP VIEW mqtx_regress_uncommented, mqtx_regress_grants;
DROP TABLE app_events;
DROP FUNCTION upgrade_handler(jsonb, jsonb), set_handler(jsonb, jsonb),
	owned_handler(jsonb, jsonb);
DROP PROCEDURE procedure_handler(jsonb, jsonb);
DROP ROLE mqtx_regress_publisher, "mqtx_regress Owner", mqtx_regress_sub;
\if :publisher_existed
\else
DROP ROLE mqtx_publisher;
\endif
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
