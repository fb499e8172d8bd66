--
-- Upgrading 0.2.0 to 0.3.0: every row and every grant kept but those on
-- mqtx.relay_stats, which is made again with broker_blocked (and whose
-- grantees are named), mqtx.broker_errors there and working, and the
-- result the same as a fresh 0.3.0 install; and so is 0.1.0 upgraded to
-- 0.3.0 in one step.  The fingerprints are 08_upgrade's
-- mqtx_regress_fingerprint() and mqtx_regress_fingerprint_differences(),
-- which 10_upgrade_0_4 drops.
--
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
CREATE EXTENSION mqtx VERSION '0.2.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';

--
-- A 0.2.0 database in use
--
-- (Its times are yesterday's: while the test runs, the workers delete
-- published and inbox rows older than mqtx.retention and
-- mqtx.inbox_retention, 7 days.)
SELECT date_trunc('day', now()) - interval '1 day' AS yesterday \gset
CREATE ROLE mqtx_regress_publisher;
CREATE ROLE mqtx_regress_monitor;
CREATE ROLE "mqtx_regress Monitor Two";
GRANT CREATE ON SCHEMA public TO mqtx_regress_publisher;

-- a publisher, granted in this database, publishes directly and through
-- its table's trigger
SELECT mqtx.grant_publish('mqtx_regress_publisher');
SET ROLE mqtx_regress_publisher;
SELECT mqtx.publish('orders', 'app.direct', '{"n": 1}') IS NOT NULL AS enqueued;
CREATE TABLE app_events (id int PRIMARY KEY);
CREATE TRIGGER app_events_outbox AFTER INSERT ON app_events
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('orders', 'app.row');
INSERT INTO app_events VALUES (1);
RESET ROLE;

-- monitoring roles read the stats: the relay's, a column of them, and
-- the outbox's
GRANT USAGE ON SCHEMA mqtx TO mqtx_regress_monitor, "mqtx_regress Monitor Two";
GRANT SELECT ON mqtx.relay_stats, mqtx.outbox_stats TO mqtx_regress_monitor;
GRANT EXECUTE ON FUNCTION mqtx.relay_stats() TO mqtx_regress_monitor, "mqtx_regress Monitor Two";
GRANT SELECT (broker_connected) ON mqtx.relay_stats TO "mqtx_regress Monitor Two";

-- outbox rows of every status
SELECT mqtx.publish('orders', 'order.created', '{"order_id": 1}', '{"tenant": "acme"}') IS NOT NULL AS enqueued;
SELECT mqtx.publish('orders', 'order.retried', '{"order_id": 2}') IS NOT NULL AS enqueued;
SELECT mqtx.publish('orders', 'order.published', '{"order_id": 3}') IS NOT NULL AS enqueued;
SELECT mqtx.publish('orders', 'order.failed', '{"order_id": 4}') IS NOT NULL AS enqueued;
UPDATE mqtx.outbox SET created_at = (:'yesterday'::timestamptz + interval '10:00:00'), next_attempt_at = (:'yesterday'::timestamptz + interval '10:00:00');
UPDATE mqtx.outbox SET attempts = 2, last_error = 'connection refused',
	next_attempt_at = (:'yesterday'::timestamptz + interval '10:05:00')
WHERE routing_key = 'order.retried';
UPDATE mqtx.outbox SET status = 'published', attempts = 1, published_at = (:'yesterday'::timestamptz + interval '10:00:01')
WHERE routing_key = 'order.published';
UPDATE mqtx.outbox SET status = 'failed', attempts = 10, last_error = 'NOT_FOUND - no exchange ''orders'''
WHERE routing_key = 'order.failed';
SELECT routing_key, status, attempts, last_error, published_at IS NOT NULL AS has_published_at
FROM mqtx.outbox ORDER BY id;

-- topology, one exchange of a type the broker may not have, and a
-- subscription with its own handler timeout
SELECT mqtx.declare_exchange('orders', 'topic');
SELECT mqtx.declare_exchange('audit', 'fanout', false);
SELECT mqtx.declare_exchange('delayed', 'x-delayed-message');
SELECT mqtx.declare_queue('dispatch');
SELECT mqtx.declare_queue('dispatch.retry', true, '{"x-message-ttl": 5000}');
SELECT mqtx.bind('dispatch', 'orders', 'order.*');
SELECT mqtx.bind('dispatch', 'audit');
SELECT mqtx.bind('dispatch.retry', 'delayed', 'order.*');
CREATE FUNCTION upgrade_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE sql AS 'SELECT';
SELECT mqtx.subscribe('dispatch', 'upgrade_handler(jsonb,jsonb)', 10, 3, '45 seconds');

-- what the consumer leaves: inbox (applied and dead-lettered messages),
-- failed attempts, dead letters
INSERT INTO mqtx.inbox (queue, message_id, applied_at) VALUES
	('dispatch', 'm-1', (:'yesterday'::timestamptz + interval '11:00:00')),
	('dispatch', 'sha256:' || encode(sha256('{"order_id": 9}'), 'hex'), (:'yesterday'::timestamptz + interval '11:00:01')),
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

-- copies of every row, the tables pg_dump keeps, and the objects the
-- upgrade leaves alone, to compare with after it
CREATE TEMP TABLE before_outbox AS SELECT * FROM mqtx.outbox;
CREATE TEMP TABLE before_exchanges AS SELECT * FROM mqtx.exchanges;
CREATE TEMP TABLE before_queues AS SELECT * FROM mqtx.queues;
CREATE TEMP TABLE before_bindings AS SELECT * FROM mqtx.bindings;
CREATE TEMP TABLE before_subscriptions AS SELECT * FROM mqtx.subscriptions;
CREATE TEMP TABLE before_inbox AS SELECT * FROM mqtx.inbox;
CREATE TEMP TABLE before_consumer_attempts AS SELECT * FROM mqtx.consumer_attempts;
CREATE TEMP TABLE before_dead_letter AS SELECT * FROM mqtx.dead_letter;
CREATE TEMP TABLE before_dumped AS
	SELECT cfg::regclass::text AS dumped_table, cond
	FROM pg_extension, unnest(extconfig, extcondition) AS u(cfg, cond)
	WHERE extname = 'mqtx';
CREATE TEMP TABLE before_objects AS
	SELECT 'pg_proc'::regclass AS classid, oid AS objid, oid::regprocedure::text AS name
	FROM pg_proc WHERE pronamespace = 'mqtx'::regnamespace
	UNION ALL
	SELECT 'pg_class'::regclass, oid, oid::regclass::text
	FROM pg_class WHERE relnamespace = 'mqtx'::regnamespace;

CREATE TABLE mqtx_regress_fingerprint (install text, aspect text, object text, detail text);


--
-- The upgrade
--
-- it names the grantees of mqtx.relay_stats, whose grants go with it
ALTER EXTENSION mqtx UPDATE TO '0.3.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';

-- every row is there, unchanged, and nothing else: per table the rows
-- before and after, those missing after and those that appeared
SELECT 'outbox' AS tbl, (SELECT count(*) FROM before_outbox) AS before,
       (SELECT count(*) FROM mqtx.outbox) AS after,
       (SELECT count(*) FROM (TABLE before_outbox EXCEPT ALL TABLE mqtx.outbox) d) AS missing,
       (SELECT count(*) FROM (TABLE mqtx.outbox EXCEPT ALL TABLE before_outbox) d) AS appeared
UNION ALL
SELECT 'exchanges', (SELECT count(*) FROM before_exchanges), (SELECT count(*) FROM mqtx.exchanges),
       (SELECT count(*) FROM (TABLE before_exchanges EXCEPT ALL TABLE mqtx.exchanges) d),
       (SELECT count(*) FROM (TABLE mqtx.exchanges EXCEPT ALL TABLE before_exchanges) d)
UNION ALL
SELECT 'queues', (SELECT count(*) FROM before_queues), (SELECT count(*) FROM mqtx.queues),
       (SELECT count(*) FROM (TABLE before_queues EXCEPT ALL TABLE mqtx.queues) d),
       (SELECT count(*) FROM (TABLE mqtx.queues EXCEPT ALL TABLE before_queues) d)
UNION ALL
SELECT 'bindings', (SELECT count(*) FROM before_bindings), (SELECT count(*) FROM mqtx.bindings),
       (SELECT count(*) FROM (TABLE before_bindings EXCEPT ALL TABLE mqtx.bindings) d),
       (SELECT count(*) FROM (TABLE mqtx.bindings EXCEPT ALL TABLE before_bindings) d)
UNION ALL
SELECT 'subscriptions', (SELECT count(*) FROM before_subscriptions), (SELECT count(*) FROM mqtx.subscriptions),
       (SELECT count(*) FROM (TABLE before_subscriptions EXCEPT ALL TABLE mqtx.subscriptions) d),
       (SELECT count(*) FROM (TABLE mqtx.subscriptions EXCEPT ALL TABLE before_subscriptions) d)
UNION ALL
SELECT 'inbox', (SELECT count(*) FROM before_inbox), (SELECT count(*) FROM mqtx.inbox),
       (SELECT count(*) FROM (TABLE before_inbox EXCEPT ALL TABLE mqtx.inbox) d),
       (SELECT count(*) FROM (TABLE mqtx.inbox EXCEPT ALL TABLE before_inbox) d)
UNION ALL
SELECT 'consumer_attempts', (SELECT count(*) FROM before_consumer_attempts), (SELECT count(*) FROM mqtx.consumer_attempts),
       (SELECT count(*) FROM (TABLE before_consumer_attempts EXCEPT ALL TABLE mqtx.consumer_attempts) d),
       (SELECT count(*) FROM (TABLE mqtx.consumer_attempts EXCEPT ALL TABLE before_consumer_attempts) d)
UNION ALL
SELECT 'dead_letter', (SELECT count(*) FROM before_dead_letter), (SELECT count(*) FROM mqtx.dead_letter),
       (SELECT count(*) FROM (TABLE before_dead_letter EXCEPT ALL TABLE mqtx.dead_letter) d),
       (SELECT count(*) FROM (TABLE mqtx.dead_letter EXCEPT ALL TABLE before_dead_letter) d);

-- pg_dump keeps the same tables as before, and not the new one
SELECT dumped_table, cond, dumped_table IN (SELECT dumped_table FROM before_dumped) AS dumped_before
FROM (SELECT cfg::regclass::text AS dumped_table, cond
      FROM pg_extension, unnest(extconfig, extcondition) AS u(cfg, cond)
      WHERE extname = 'mqtx') d
ORDER BY 1;
SELECT count(*) AS dumped_before_not_now
FROM (TABLE before_dumped
      EXCEPT ALL
      SELECT cfg::regclass::text, cond
      FROM pg_extension, unnest(extconfig, extcondition) AS u(cfg, cond)
      WHERE extname = 'mqtx') d;

-- mqtx.relay_stats is the only object made again, and mqtx.broker_errors
-- the only new one (with its row type and its primary key's index)
SELECT b.name, n.objid IS NULL AS made_again
FROM before_objects b
LEFT JOIN (SELECT 'pg_proc'::regclass AS classid, oid AS objid
           FROM pg_proc WHERE pronamespace = 'mqtx'::regnamespace
           UNION ALL
           SELECT 'pg_class'::regclass, oid
           FROM pg_class WHERE relnamespace = 'mqtx'::regnamespace) n
  ON n.classid = b.classid AND n.objid = b.objid
WHERE n.objid IS NULL ORDER BY 1;
SELECT name FROM (SELECT oid::regprocedure::text AS name
                  FROM pg_proc WHERE pronamespace = 'mqtx'::regnamespace
                  UNION ALL
                  SELECT oid::regclass::text
                  FROM pg_class WHERE relnamespace = 'mqtx'::regnamespace) n
WHERE name NOT IN (SELECT name FROM before_objects) ORDER BY 1;

-- the function's result columns, in order: broker_blocked after
-- broker_connected; still the same C function
SELECT a.n, a.name, a.mode, a.type
FROM pg_proc p, unnest(p.proargnames, p.proargmodes, p.proallargtypes::regtype[])
	WITH ORDINALITY AS a(name, mode, type, n)
WHERE p.oid = 'mqtx.relay_stats()'::regprocedure ORDER BY a.n;
SELECT prosrc, probin, provolatile, proretset, prorettype::regtype
FROM pg_proc WHERE oid = 'mqtx.relay_stats()'::regprocedure;
SELECT obj_description('mqtx.relay_stats()'::regprocedure, 'pg_proc');
-- and the view's
SELECT attnum, attname, format_type(atttypid, atttypmod)
FROM pg_attribute WHERE attrelid = 'mqtx.relay_stats'::regclass AND attnum > 0
ORDER BY attnum;
SELECT pg_get_viewdef('mqtx.relay_stats'::regclass);

-- what anyone but the owner holds in schema mqtx, by grantee: the
-- publisher still publishes, the monitor still reads the outbox's stats,
-- the grants on mqtx.relay_stats are gone (as the upgrade said), nothing
-- is PUBLIC's
SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END AS grantee,
       o.kind, o.name, a.privilege_type
FROM (SELECT 'schema' AS kind, nspname::text AS name,
             coalesce(nspacl, acldefault('n', nspowner)) AS acl, nspowner AS owner
      FROM pg_namespace WHERE nspname = 'mqtx'
      UNION ALL
      SELECT 'function', oid::regprocedure::text, coalesce(proacl, acldefault('f', proowner)), proowner
      FROM pg_proc WHERE pronamespace = 'mqtx'::regnamespace
      UNION ALL
      SELECT CASE WHEN relkind = 'S' THEN 'sequence' ELSE 'relation' END, oid::regclass::text,
             coalesce(relacl, acldefault(CASE WHEN relkind = 'S' THEN 's' ELSE 'r' END::"char", relowner)),
             relowner
      FROM pg_class WHERE relnamespace = 'mqtx'::regnamespace
      UNION ALL
      SELECT 'column', attrelid::regclass::text || '.' || attname, attacl, c.relowner
      FROM pg_attribute JOIN pg_class c ON c.oid = attrelid
      WHERE c.relnamespace = 'mqtx'::regnamespace AND attacl IS NOT NULL
     ) o, aclexplode(o.acl) a
WHERE a.grantee <> o.owner
ORDER BY 1, 2, 3, 4;

SET ROLE mqtx_regress_publisher;
SELECT mqtx.publish('orders', 'app.after', '{"n": 2}') IS NOT NULL AS enqueued;
INSERT INTO app_events VALUES (2);
-- the workers' errors are not a publisher's to read
SELECT count(*) FROM mqtx.broker_errors;
RESET ROLE;
SELECT routing_key, payload, status, id > (SELECT max(id) FROM before_outbox) AS id_after_old_ones
FROM mqtx.outbox WHERE routing_key LIKE 'app.%' ORDER BY id;

SET ROLE mqtx_regress_monitor;
SELECT pending, published, failed FROM mqtx.outbox_stats;
SELECT count(*) FROM mqtx.relay_stats;
RESET ROLE;

-- The extension's own objects must now be those of a fresh install: the
-- grants made here are taken back first (a fresh install has none), and
-- then the fingerprint is taken.
SELECT mqtx.revoke_publish('mqtx_regress_publisher');
REVOKE USAGE ON SCHEMA mqtx FROM mqtx_regress_publisher, mqtx_regress_monitor,
	"mqtx_regress Monitor Two";
REVOKE SELECT ON mqtx.outbox_stats FROM mqtx_regress_monitor;
INSERT INTO mqtx_regress_fingerprint SELECT 'upgraded', * FROM mqtx_regress_fingerprint();

-- mqtx.broker_errors: its shape and constraints
SELECT attname, format_type(atttypid, atttypmod), attnotnull,
       pg_get_expr(adbin, adrelid) AS default_value
FROM pg_attribute LEFT JOIN pg_attrdef ON adrelid = attrelid AND adnum = attnum
WHERE attrelid = 'mqtx.broker_errors'::regclass AND attnum > 0 AND NOT attisdropped
ORDER BY attnum;
SELECT conname, pg_get_constraintdef(oid)
FROM pg_constraint WHERE conrelid = 'mqtx.broker_errors'::regclass ORDER BY conname;
SELECT c.relowner = e.extowner AS owned_by_extension_owner
FROM pg_class c, pg_extension e
WHERE c.oid = 'mqtx.broker_errors'::regclass AND e.extname = 'mqtx';
SELECT obj_description('mqtx.broker_errors'::regclass, 'pg_class') IS NOT NULL AS has_comment,
       count(*) FILTER (WHERE col_description('mqtx.broker_errors'::regclass, attnum) IS NOT NULL)
           AS columns_with_comment
FROM pg_attribute WHERE attrelid = 'mqtx.broker_errors'::regclass AND attnum > 0;

-- a worker records what the broker refused, one row per object and worker
INSERT INTO mqtx.broker_errors (worker, object_type, object_name, error)
VALUES ('relay', 'exchange', 'delayed',
        '503 COMMAND_INVALID - unknown exchange type ''x-delayed-message'''),
       ('relay', 'binding', 'dispatch.retry <- delayed (order.*)',
        '404 NOT_FOUND - no exchange ''delayed'' in vhost ''/'''),
       ('relay', 'queue', 'dispatch.retry',
        '406 PRECONDITION_FAILED - inequivalent arg ''x-message-ttl'' for queue ''dispatch.retry'' in vhost ''/'''),
       ('consumer', 'queue', 'dispatch.retry',
        '406 PRECONDITION_FAILED - inequivalent arg ''x-message-ttl'' for queue ''dispatch.retry'' in vhost ''/'''),
       ('consumer', 'subscription', 'dispatch',
        '403 ACCESS_REFUSED - access to queue ''dispatch'' in vhost ''/'' refused');
SELECT worker, object_type, object_name, failures,
       first_failed_at = last_failed_at AS first_is_last, next_try_at
FROM mqtx.broker_errors ORDER BY 1, 2, 3;
-- and, refused again, counts it
INSERT INTO mqtx.broker_errors AS b (worker, object_type, object_name, error,
	last_failed_at, next_try_at)
VALUES ('relay', 'exchange', 'delayed',
        '503 COMMAND_INVALID - unknown exchange type ''x-delayed-message''',
        now() + '1 second', now() + '1 minute')
ON CONFLICT ON CONSTRAINT broker_errors_pkey DO UPDATE
	SET error = excluded.error, failures = b.failures + 1,
		last_failed_at = excluded.last_failed_at, next_try_at = excluded.next_try_at;
SELECT worker, object_type, object_name, error, failures,
       last_failed_at > first_failed_at AS failed_later, next_try_at > last_failed_at AS retry_later
FROM mqtx.broker_errors WHERE object_type = 'exchange';
-- only the two workers, the four kinds of object, a count, and a reply
\set VERBOSITY terse
INSERT INTO mqtx.broker_errors (worker, object_type, object_name, error)
VALUES ('publisher', 'exchange', 'orders', 'refused');
INSERT INTO mqtx.broker_errors (worker, object_type, object_name, error)
VALUES ('relay', 'policy', 'orders', 'refused');
INSERT INTO mqtx.broker_errors (worker, object_type, object_name, error, failures)
VALUES ('relay', 'exchange', 'orders', 'refused', 0);
INSERT INTO mqtx.broker_errors (worker, object_type, object_name, error)
VALUES ('relay', 'exchange', 'orders', NULL);
INSERT INTO mqtx.broker_errors (worker, object_type, object_name, error)
VALUES ('relay', 'exchange', 'delayed', 'a second row');
\set VERBOSITY default
-- declared again, an object's row goes
DELETE FROM mqtx.broker_errors
WHERE worker = 'relay' AND object_type = 'exchange' AND object_name = 'delayed';
SELECT worker, object_type, object_name FROM mqtx.broker_errors ORDER BY 1, 2, 3;
TRUNCATE mqtx.broker_errors;

-- the dead letters kept redrive as before, and take their inbox rows out
SELECT mqtx.redrive(id) AS redriven_id FROM mqtx.dead_letter WHERE message_id = 'm-6' \gset
SELECT exchange, routing_key, payload, headers, status
FROM mqtx.outbox WHERE message_id = :'redriven_id';
SELECT queue, message_id FROM mqtx.dead_letter ORDER BY id;
SELECT queue, message_id FROM mqtx.inbox ORDER BY queue, message_id;


--
-- 0.1.0 to 0.3.0 in one step, through 0.2.0, with data in it
--
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
-- 0.1.0 makes mqtx_publisher unless the cluster has it already; the role
-- is dropped at the end only if this test made it
SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mqtx_publisher') AS publisher_existed \gset
CREATE EXTENSION mqtx VERSION '0.1.0';
SELECT source, target, path FROM pg_extension_update_paths('mqtx')
WHERE source = '0.1.0' AND target = '0.3.0';
SELECT mqtx.publish('orders', 'order.created', '{"order_id": 1}') IS NOT NULL AS enqueued;
SELECT mqtx.declare_queue('dispatch');
INSERT INTO mqtx.dead_letter (queue, message_id, body, body_text, body_json, error_message,
	attempts, first_failed_at, last_failed_at)
VALUES ('dispatch', 'm-1', '{"order_id": 1}', '{"order_id": 1}', '{"order_id": 1}',
	'dispatch refused', 3, (:'yesterday'::timestamptz + interval '12:00:00'), (:'yesterday'::timestamptz + interval '12:01:00'));
ALTER EXTENSION mqtx UPDATE TO '0.3.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
INSERT INTO mqtx_regress_fingerprint SELECT 'upgraded from 0.1.0', * FROM mqtx_regress_fingerprint();
-- the rows are kept (and the dead letter is in the inbox, as 0.2.0 made it)
SELECT (SELECT count(*) FROM mqtx.outbox) AS outbox, (SELECT count(*) FROM mqtx.queues) AS queues,
       (SELECT count(*) FROM mqtx.dead_letter) AS dead_letter, (SELECT count(*) FROM mqtx.inbox) AS inbox,
       (SELECT count(*) FROM mqtx.broker_errors) AS broker_errors;

-- and a fresh install, in a new schema
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
CREATE EXTENSION mqtx VERSION '0.3.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
INSERT INTO mqtx_regress_fingerprint SELECT 'fresh', * FROM mqtx_regress_fingerprint();

-- what the fingerprints hold, each aspect in each of them
SELECT aspect, count(*) FILTER (WHERE install = 'upgraded') > 0 AS upgraded,
       count(*) FILTER (WHERE install = 'upgraded from 0.1.0') > 0 AS upgraded_from_0_1_0,
       count(*) FILTER (WHERE install = 'fresh') > 0 AS fresh
FROM mqtx_regress_fingerprint GROUP BY aspect ORDER BY aspect;
SELECT count(*) > 300 AS fingerprint_is_detailed
FROM mqtx_regress_fingerprint WHERE install = 'fresh';
-- the new objects are in it
SELECT aspect, object, detail FROM mqtx_regress_fingerprint
WHERE install = 'fresh' AND (object LIKE '%broker_errors%' OR object LIKE '%relay_stats%')
  AND aspect IN ('member', 'relation', 'function privileges', 'initial privileges')
ORDER BY 1, 2, 3;

-- the differences, both ways: none
SELECT * FROM mqtx_regress_fingerprint_differences('upgraded', 'upgraded from 0.1.0');

-- tidy up: 0.3.0 stays installed, the roles, tables and functions made
-- here go; 10_upgrade_0_4 takes the fingerprints again
DROP TABLE mqtx_regress_fingerprint;
DROP TABLE app_events;
DROP FUNCTION upgrade_handler(jsonb, jsonb);
REVOKE CREATE ON SCHEMA public FROM mqtx_regress_publisher;
DROP ROLE mqtx_regress_publisher, mqtx_regress_monitor, "mqtx_regress Monitor Two";
\if :publisher_existed
\else
DROP ROLE mqtx_publisher;
\endif
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
