--
-- Upgrading 0.1.0 to 0.2.0: every row kept, the shared role's rights taken
-- away (and its members named), the new checks in force, and the result
-- the same as a fresh 0.2.0 install
--
DROP EXTENSION mqtx CASCADE;
-- as in a database that never had mqtx: CREATE EXTENSION makes the schema
DROP SCHEMA mqtx;
-- 0.1.0 makes mqtx_publisher unless the cluster has it already; the role
-- is dropped at the end only if this test made it
SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mqtx_publisher') AS publisher_existed \gset
CREATE EXTENSION mqtx VERSION '0.1.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';

--
-- A 0.1.0 database in use
--
-- (Its times are yesterday's: while the test runs, the workers delete
-- published and inbox rows older than mqtx.retention and
-- mqtx.inbox_retention, 7 days.)
SELECT date_trunc('day', now()) - interval '1 day' AS yesterday \gset
CREATE ROLE mqtx_regress_legacy;
CREATE ROLE "mqtx_regress Legacy Two";
GRANT mqtx_publisher TO mqtx_regress_legacy, "mqtx_regress Legacy Two";
GRANT CREATE ON SCHEMA public TO mqtx_regress_legacy;

-- the member publishes, directly and through its table's trigger
SET ROLE mqtx_regress_legacy;
SELECT mqtx.publish('orders', 'legacy.direct', '{"n": 1}') IS NOT NULL AS enqueued;
CREATE TABLE legacy_events (id int PRIMARY KEY);
CREATE TRIGGER legacy_events_outbox AFTER INSERT ON legacy_events
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('orders', 'legacy.row');
INSERT INTO legacy_events VALUES (1);
CREATE FUNCTION legacy_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE sql AS 'SELECT';
RESET ROLE;

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

-- topology and a subscription
SELECT mqtx.declare_exchange('orders', 'topic');
SELECT mqtx.declare_exchange('audit', 'fanout', false);
SELECT mqtx.declare_queue('dispatch');
SELECT mqtx.declare_queue('dispatch.retry', true, '{"x-message-ttl": 5000}');
SELECT mqtx.bind('dispatch', 'orders', 'order.*');
SELECT mqtx.bind('dispatch', 'audit');
CREATE FUNCTION upgrade_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE sql AS 'SELECT';
SELECT mqtx.subscribe('dispatch', 'upgrade_handler(jsonb,jsonb)', 10, 3);

-- what the consumer leaves: inbox, failed attempts, dead letters
INSERT INTO mqtx.inbox (queue, message_id, applied_at) VALUES
	('dispatch', 'm-1', (:'yesterday'::timestamptz + interval '11:00:00')),
	('dispatch', 'sha256:' || encode(sha256('{"order_id": 9}'), 'hex'), (:'yesterday'::timestamptz + interval '11:00:01'));
-- attempts of a message not applied (m-5, and m-1 on another queue), and
-- stale ones 0.1.0 kept: of a message applied since (m-1) and of one
-- dead-lettered (m-8)
INSERT INTO mqtx.consumer_attempts (queue, message_id, attempts, last_error,
	first_failed_at, last_failed_at)
VALUES ('dispatch', 'm-5', 2, 'no depot serves city "Atlantis"',
	(:'yesterday'::timestamptz + interval '11:01:00'), (:'yesterday'::timestamptz + interval '11:02:00')),
	('dispatch.retry', 'm-1', 1, 'lock timeout',
	(:'yesterday'::timestamptz + interval '11:03:00'), (:'yesterday'::timestamptz + interval '11:03:00')),
	('dispatch', 'm-1', 1, 'deadlock detected',
	(:'yesterday'::timestamptz + interval '10:59:00'), (:'yesterday'::timestamptz + interval '10:59:00')),
	('dispatch', 'm-8', 2, 'dispatch refused',
	(:'yesterday'::timestamptz + interval '12:03:00'), (:'yesterday'::timestamptz + interval '12:03:30'));
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
	 (:'yesterday'::timestamptz + interval '12:02:00'), (:'yesterday'::timestamptz + interval '12:02:00')),
	('dispatch', 'm-8', 'orders', 'order.created', NULL,
	 '{"order_id": 8}', '{"order_id": 8}', '{"order_id": 8}', 'dispatch refused',
	 NULL, NULL, 3, (:'yesterday'::timestamptz + interval '12:03:00'), (:'yesterday'::timestamptz + interval '12:04:00'));
-- 0.1.0 wrote a dead letter per copy of a message: a second one of m-6;
-- m-6 on another queue is another message
INSERT INTO mqtx.dead_letter (queue, message_id, exchange, routing_key, headers, body,
	body_text, body_json, error_message, error_detail, error_context, attempts,
	first_failed_at, last_failed_at)
VALUES
	('dispatch', 'm-6', 'orders', 'order.created', '{"tenant": "acme"}',
	 '{"order_id": 6}', '{"order_id": 6}', '{"order_id": 6}', 'dispatch refused (copy)',
	 NULL, NULL, 3, (:'yesterday'::timestamptz + interval '12:05:00'), (:'yesterday'::timestamptz + interval '12:06:00')),
	('dispatch.retry', 'm-6', '', 'dispatch.retry', NULL,
	 '{"order_id": 6}', '{"order_id": 6}', '{"order_id": 6}', 'retry refused',
	 NULL, NULL, 1, (:'yesterday'::timestamptz + interval '12:07:00'), (:'yesterday'::timestamptz + interval '12:07:00'));
-- and a dead letter of a message that a later copy applied (m-1 is in the
-- inbox): a redrive would apply it twice
INSERT INTO mqtx.dead_letter (queue, message_id, exchange, routing_key, headers, body,
	body_text, body_json, error_message, error_detail, error_context, attempts,
	first_failed_at, last_failed_at)
VALUES
	('dispatch', 'm-1', '', 'dispatch', NULL,
	 '{"order_id": 1}', '{"order_id": 1}', '{"order_id": 1}', 'dispatch refused (then applied)',
	 NULL, NULL, 5, (:'yesterday'::timestamptz + interval '10:00:00'), (:'yesterday'::timestamptz + interval '10:30:00'));
SELECT id, queue, message_id, error_message FROM mqtx.dead_letter ORDER BY id;

-- copies of every row, to compare with after the upgrade
CREATE TEMP TABLE before_outbox AS SELECT * FROM mqtx.outbox;
CREATE TEMP TABLE before_exchanges AS SELECT * FROM mqtx.exchanges;
CREATE TEMP TABLE before_queues AS SELECT * FROM mqtx.queues;
CREATE TEMP TABLE before_bindings AS SELECT * FROM mqtx.bindings;
CREATE TEMP TABLE before_subscriptions AS SELECT * FROM mqtx.subscriptions;
CREATE TEMP TABLE before_inbox AS SELECT * FROM mqtx.inbox;
CREATE TEMP TABLE before_consumer_attempts AS SELECT * FROM mqtx.consumer_attempts;
CREATE TEMP TABLE before_dead_letter AS SELECT * FROM mqtx.dead_letter;

-- The upgraded extension must be the one a fresh install makes: compared
-- below by their fingerprints, taken as each install is made.  Every member
-- object, with what defines it (functions' definitions, relations' columns,
-- constraints, indexes, triggers, views, sequences), owners, privileges
-- (and the initial ones pg_dump starts from), comments, dependencies, and
-- the tables pg_dump keeps.  The schema is not a member: for it a NULL ACL
-- is the default, and so is no initial one.  Some servers record a
-- per-relation pg_attver column option; it defines nothing and is left out.
-- (09_upgrade_0_3 and 10_upgrade_0_4 compare their upgrades by the same
-- functions.)
CREATE TABLE mqtx_regress_fingerprint (install text, aspect text, object text, detail text);
CREATE FUNCTION mqtx_regress_fingerprint()
RETURNS TABLE (aspect text, object text, detail text)
LANGUAGE sql
AS $fp$
WITH ext AS (
	SELECT e.* FROM pg_extension e WHERE e.extname = 'mqtx'
), member AS (
	SELECT d.classid, d.objid, pg_describe_object(d.classid, d.objid, d.objsubid) AS name
	FROM pg_depend d, ext
	WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'
), fn AS (
	SELECT m.name, p.oid, p.proowner, p.proacl
	FROM member m JOIN pg_proc p ON m.classid = 'pg_proc'::regclass AND p.oid = m.objid
), rel AS (
	SELECT m.name, c.oid, c.relkind, c.relowner, c.relacl, c.relpersistence, c.reloptions,
	       c.relrowsecurity, c.relforcerowsecurity, c.relreplident
	FROM member m JOIN pg_class c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid
), part AS (
	-- the members and what belongs to them, as (class, oid, sub-id, name)
	SELECT m.classid, m.objid, 0 AS objsubid, m.name FROM member m
	UNION ALL
	SELECT 'pg_class'::regclass, a.attrelid, a.attnum, rel.name || ' column ' || a.attname
	FROM rel JOIN pg_attribute a ON a.attrelid = rel.oid AND a.attnum > 0 AND NOT a.attisdropped
	UNION ALL
	SELECT 'pg_constraint'::regclass, co.oid, 0, rel.name || ' constraint ' || co.conname
	FROM rel JOIN pg_constraint co ON co.conrelid = rel.oid
	UNION ALL
	SELECT 'pg_trigger'::regclass, t.oid, 0, rel.name || ' trigger ' || t.tgname
	FROM rel JOIN pg_trigger t ON t.tgrelid = rel.oid AND NOT t.tgisinternal
	UNION ALL
	SELECT 'pg_class'::regclass, i.indexrelid, 0, rel.name || ' index ' || i.indexrelid::regclass
	FROM rel JOIN pg_index i ON i.indrelid = rel.oid
	UNION ALL
	SELECT 'pg_attrdef'::regclass, ad.oid, 0, rel.name || ' default ' || ad.adnum
	FROM rel JOIN pg_attrdef ad ON ad.adrelid = rel.oid
	UNION ALL
	SELECT 'pg_rewrite'::regclass, r.oid, 0, rel.name || ' rule ' || r.rulename
	FROM rel JOIN pg_rewrite r ON r.ev_class = rel.oid
	UNION ALL
	SELECT 'pg_type'::regclass, ty.oid, 0, rel.name || ' row type'
	FROM rel JOIN pg_type ty ON ty.typrelid = rel.oid
)
SELECT 'member', name, NULL FROM member
UNION ALL
SELECT 'extension', extname::text,
       format('version %s, owner %s, schema %s, relocatable %s',
              extversion, extowner::regrole, extnamespace::regnamespace, extrelocatable)
FROM ext
UNION ALL
SELECT 'dumped table', cfg::regclass::text, cond
FROM ext, unnest(ext.extconfig, ext.extcondition) AS u(cfg, cond)
UNION ALL
SELECT 'schema', n.nspname::text,
       format('owner %s, acl %s', n.nspowner::regrole, coalesce(n.nspacl, acldefault('n', n.nspowner)))
FROM ext JOIN pg_namespace n ON n.oid = ext.extnamespace
UNION ALL
SELECT 'function', name, pg_get_functiondef(oid) FROM fn
UNION ALL
SELECT 'function privileges', name, format('owner %s, acl %s', proowner::regrole, proacl) FROM fn
UNION ALL
SELECT 'relation', name,
       format('kind %s, owner %s, acl %s, persistence %s, options %s, row security %s/%s, replica identity %s',
              relkind, relowner::regrole, relacl, relpersistence, reloptions,
              relrowsecurity, relforcerowsecurity, relreplident)
FROM rel
UNION ALL
SELECT 'column', rel.name || '.' || a.attname,
       format('#%s %s, not null %s, default %s, identity %s, generated %s, collation %s, acl %s, options %s',
              a.attnum, format_type(a.atttypid, a.atttypmod), a.attnotnull,
              pg_get_expr(ad.adbin, ad.adrelid), a.attidentity, a.attgenerated,
              a.attcollation::regcollation, a.attacl,
              array(SELECT o FROM unnest(a.attoptions) o WHERE o NOT LIKE 'pg_attver=%'))
FROM rel JOIN pg_attribute a ON a.attrelid = rel.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
UNION ALL
SELECT 'constraint', rel.name || ' ' || co.conname,
       format('%s, deferrable %s, deferred %s, validated %s',
              pg_get_constraintdef(co.oid), co.condeferrable, co.condeferred, co.convalidated)
FROM rel JOIN pg_constraint co ON co.conrelid = rel.oid
UNION ALL
SELECT 'index', rel.name || ' ' || i.indexrelid::regclass,
       format('%s, primary %s, valid %s', pg_get_indexdef(i.indexrelid), i.indisprimary, i.indisvalid)
FROM rel JOIN pg_index i ON i.indrelid = rel.oid
UNION ALL
SELECT 'trigger', rel.name || ' ' || t.tgname,
       format('%s, enabled %s', pg_get_triggerdef(t.oid), t.tgenabled)
FROM rel JOIN pg_trigger t ON t.tgrelid = rel.oid AND NOT t.tgisinternal
UNION ALL
SELECT 'view', rel.name, pg_get_viewdef(rel.oid) FROM rel WHERE rel.relkind = 'v'
UNION ALL
SELECT 'sequence', rel.name,
       format('%s start %s increment %s min %s max %s cache %s cycle %s',
              s.seqtypid::regtype, s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle)
FROM rel JOIN pg_sequence s ON s.seqrelid = rel.oid
UNION ALL
SELECT 'policy', rel.name || ' ' || po.polname,
       format('%s %s to %s using %s check %s', po.polcmd, po.polpermissive, po.polroles::regrole[],
              pg_get_expr(po.polqual, po.polrelid), pg_get_expr(po.polwithcheck, po.polrelid))
FROM rel JOIN pg_policy po ON po.polrelid = rel.oid
UNION ALL
SELECT 'comment', part.name, de.description
FROM part JOIN pg_description de
  ON de.classoid = part.classid AND de.objoid = part.objid AND de.objsubid = part.objsubid
UNION ALL
SELECT 'initial privileges', part.name, format('%s %s', ip.privtype, ip.initprivs)
FROM part JOIN pg_init_privs ip
  ON ip.classoid = part.classid AND ip.objoid = part.objid AND ip.objsubid = part.objsubid
UNION ALL
SELECT 'initial privileges', 'schema ' || n.nspname,
       coalesce(ip.initprivs, acldefault('n', n.nspowner))::text
FROM ext JOIN pg_namespace n ON n.oid = ext.extnamespace
LEFT JOIN pg_init_privs ip
  ON ip.classoid = 'pg_namespace'::regclass AND ip.objoid = n.oid AND ip.objsubid = 0
UNION ALL
SELECT 'dependency', part.name,
       format('%s on %s', d.deptype,
              coalesce((SELECT min(p2.name) FROM part p2
                        WHERE p2.classid = d.refclassid AND p2.objid = d.refobjid
                          AND p2.objsubid = d.refobjsubid),
                       pg_describe_object(d.refclassid, d.refobjid, d.refobjsubid)))
FROM part JOIN pg_depend d
  ON d.classid = part.classid AND d.objid = part.objid AND d.objsubid = part.objsubid
$fp$;

-- The rows of the fingerprints of installs that the fresh install's lacks,
-- and the other way round; an upgrade that makes what a fresh install
-- makes has none.
CREATE FUNCTION mqtx_regress_fingerprint_differences(VARIADIC installs text[])
RETURNS TABLE (install text, difference text, aspect text, object text, detail text)
LANGUAGE sql
AS $fp$
SELECT u.install, 'not in fresh install', d.*
FROM unnest(installs) u(install),
LATERAL (SELECT aspect, object, detail FROM mqtx_regress_fingerprint f WHERE f.install = u.install
         EXCEPT ALL
         SELECT aspect, object, detail FROM mqtx_regress_fingerprint WHERE install = 'fresh') d
UNION ALL
SELECT u.install, 'only in fresh install', d.*
FROM unnest(installs) u(install),
LATERAL (SELECT aspect, object, detail FROM mqtx_regress_fingerprint WHERE install = 'fresh'
         EXCEPT ALL
         SELECT aspect, object, detail FROM mqtx_regress_fingerprint f WHERE f.install = u.install) d
ORDER BY 1, 2, 3, 4, 5
$fp$;

-- The members of the extension, and the columns of its tables and views,
-- that have no comment (the upgrade tests from 12_upgrade_0_6 on expect
-- none; 17_upgrade_0_10 drops it)
CREATE FUNCTION mqtx_regress_uncommented()
RETURNS TABLE (uncommented text)
LANGUAGE sql
AS $fp$
SELECT pg_describe_object(d.classid, d.objid, 0) AS uncommented
FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid
WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e' AND e.extname = 'mqtx'
  AND obj_description(d.objid, d.classid::regclass::text) IS NULL
UNION ALL
SELECT a.attrelid::regclass || '.' || a.attname
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
WHERE c.relnamespace = 'mqtx'::regnamespace AND c.relkind IN ('r', 'v')
  AND a.attnum > 0 AND NOT a.attisdropped
  AND col_description(a.attrelid, a.attnum) IS NULL
$fp$;

--
-- The upgrade
--
-- it names the members of mqtx_publisher, and says how many dead letters
-- it removed as further copies (one: the second m-6 on dispatch)
SELECT clock_timestamp() AS before_upgrade \gset
ALTER EXTENSION mqtx UPDATE TO '0.2.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
INSERT INTO mqtx_regress_fingerprint SELECT 'upgraded', * FROM mqtx_regress_fingerprint();

-- every row is there, unchanged, and nothing else, but for what the
-- upgrade is for (shown below): per table the rows before and after, those
-- missing after and those that appeared; subscriptions by the columns
-- 0.1.0 had
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
       (SELECT count(*) FROM (TABLE before_subscriptions EXCEPT ALL
                              SELECT queue, handler, prefetch, max_attempts, created_at
                              FROM mqtx.subscriptions) d),
       (SELECT count(*) FROM (SELECT queue, handler, prefetch, max_attempts, created_at
                              FROM mqtx.subscriptions
                              EXCEPT ALL TABLE before_subscriptions) d)
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

-- the subscription has the new column, at its default
SELECT queue, handler_timeout FROM mqtx.subscriptions ORDER BY queue;

-- one dead letter per message and queue: the later copy of m-6 is gone
-- (the one the upgrade's message counts), the first one is kept as it was
SELECT id, queue, message_id, error_message
FROM (TABLE before_dead_letter EXCEPT ALL TABLE mqtx.dead_letter) d ORDER BY id;
SELECT d.id, d.queue, d.message_id, d.error_message,
       d.id = (SELECT min(b.id) FROM before_dead_letter b
               WHERE b.queue = d.queue AND b.message_id = d.message_id) AS lowest_id
FROM mqtx.dead_letter d ORDER BY d.id;
-- and the key is in force
INSERT INTO mqtx.dead_letter (queue, message_id, body, error_message, attempts,
	first_failed_at, last_failed_at)
VALUES ('dispatch', 'm-7', '\xfffe', 'a copy', 1, now(), now());
SELECT to_regclass('mqtx.dead_letter_queue_idx') AS old_index;

-- every dead-lettered message is in the inbox now, so that its later copies
-- are duplicates; the rows of applied messages are as they were
SELECT i.queue, i.message_id, b.queue IS NULL AS added,
       CASE WHEN b.queue IS NULL THEN i.applied_at >= :'before_upgrade'::timestamptz
            ELSE i.applied_at = b.applied_at END AS applied_at_ok
FROM mqtx.inbox i LEFT JOIN before_inbox b USING (queue, message_id)
ORDER BY i.queue, i.message_id;
SELECT count(*) AS dead_letters_not_in_inbox
FROM mqtx.dead_letter d
WHERE NOT EXISTS (SELECT FROM mqtx.inbox i WHERE i.queue = d.queue AND i.message_id = d.message_id);

-- the attempts of messages in the inbox are gone, the others are kept
SELECT queue, message_id, last_error
FROM (TABLE before_consumer_attempts EXCEPT ALL TABLE mqtx.consumer_attempts) d
ORDER BY queue, message_id;
SELECT queue, message_id, attempts, last_error FROM mqtx.consumer_attempts
ORDER BY queue, message_id;

-- the inbox and the attempts are kept by pg_dump now, like the dead letters
SELECT cfg::regclass AS dumped_table, cond
FROM pg_extension, unnest(extconfig, extcondition) AS u(cfg, cond)
WHERE extname = 'mqtx' ORDER BY cfg::regclass::text;

-- mqtx_publisher holds nothing in this database any more
SELECT pg_describe_object(o.classid, o.objid, 0) AS object, a.privilege_type
FROM (SELECT 'pg_namespace'::regclass AS classid, oid AS objid, nspacl AS acl
      FROM pg_namespace WHERE nspname = 'mqtx'
      UNION ALL
      SELECT 'pg_proc'::regclass, oid, proacl FROM pg_proc WHERE pronamespace = 'mqtx'::regnamespace
      UNION ALL
      SELECT 'pg_class'::regclass, oid, relacl FROM pg_class WHERE relnamespace = 'mqtx'::regnamespace
     ) o, aclexplode(o.acl) a
WHERE a.grantee = 'mqtx_publisher'::regrole;
-- the role itself is left, for databases not yet upgraded
SELECT count(*) FROM pg_roles WHERE rolname = 'mqtx_publisher';

-- so its member can no longer publish, nor make a new outbox trigger
SET ROLE mqtx_regress_legacy;
SELECT mqtx.publish('orders', 'legacy.after', '{"n": 2}');
CREATE TABLE legacy_more (id int);
CREATE TRIGGER legacy_more_outbox AFTER INSERT ON legacy_more
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('orders', 'legacy.more');
-- (a trigger it made under 0.1.0 still enqueues: PostgreSQL checks EXECUTE
-- on a trigger function at CREATE TRIGGER only)
INSERT INTO legacy_events VALUES (2);
RESET ROLE;
SELECT routing_key, payload FROM mqtx.outbox WHERE routing_key LIKE 'legacy.%' ORDER BY id;

-- until it is granted publishing in this database
SELECT mqtx.grant_publish('mqtx_regress_legacy');
SET ROLE mqtx_regress_legacy;
SELECT mqtx.publish('orders', 'legacy.granted', '{"n": 3}') AS legacy_message_id \gset
RESET ROLE;
-- the outbox's identity goes on from where it was
SELECT routing_key, payload, status, id > (SELECT max(id) FROM before_outbox) AS id_after_old_ones
FROM mqtx.outbox WHERE message_id = :'legacy_message_id';

-- the subscription check is in force on the upgraded table
GRANT SELECT, INSERT, UPDATE ON mqtx.subscriptions TO mqtx_regress_legacy;
SET ROLE mqtx_regress_legacy;
INSERT INTO mqtx.subscriptions (queue, handler) VALUES ('legacy', 'legacy_handler(jsonb,jsonb)');
INSERT INTO mqtx.subscriptions (queue, handler) VALUES ('legacy.theirs', 'upgrade_handler(jsonb,jsonb)');
SELECT :'LAST_ERROR_SQLSTATE' AS sqlstate;
UPDATE mqtx.subscriptions SET handler = 'upgrade_handler(jsonb,jsonb)' WHERE queue = 'legacy';
SELECT :'LAST_ERROR_SQLSTATE' AS sqlstate;
INSERT INTO mqtx.subscriptions (queue, handler) VALUES ('legacy.wrong', 'mqtx.publish(text,text,jsonb,jsonb)');
SELECT :'LAST_ERROR_SQLSTATE' AS sqlstate;
RESET ROLE;
-- and mqtx.subscribe, replaced, still updates in place, the handler's bound
-- too, within the bounds
SELECT mqtx.subscribe('dispatch', 'upgrade_handler(jsonb,jsonb)', 20, 3, '45 seconds');
SELECT queue, handler, prefetch, max_attempts, handler_timeout FROM mqtx.subscriptions ORDER BY queue;
\set VERBOSITY terse
SELECT mqtx.subscribe('dispatch', 'upgrade_handler(jsonb,jsonb)', 20, 3, '2 days');
UPDATE mqtx.subscriptions SET handler_timeout = '0' WHERE queue = 'legacy';
\set VERBOSITY default
SELECT queue, handler_timeout FROM mqtx.subscriptions ORDER BY queue;

-- redrive works on the dead letters kept, and takes their inbox rows out
SELECT mqtx.redrive(id) AS redriven_id FROM mqtx.dead_letter
WHERE queue = 'dispatch' AND message_id = 'm-6' \gset
SELECT exchange, routing_key, payload, headers, status
FROM mqtx.outbox WHERE message_id = :'redriven_id';
SELECT mqtx.redrive(id) FROM mqtx.dead_letter WHERE message_id = 'm-7';
SELECT mqtx.redrive_all('dispatch');
SELECT queue, message_id FROM mqtx.dead_letter ORDER BY id;
SELECT queue, message_id FROM mqtx.inbox ORDER BY queue, message_id;
-- and the dead letters' identity goes on from where it was too
INSERT INTO mqtx.dead_letter (queue, message_id, body, error_message, attempts,
	first_failed_at, last_failed_at)
VALUES ('dispatch', 'm-9', '\x00', 'new', 1, now(), now());
SELECT queue, message_id, id > (SELECT max(id) FROM before_dead_letter) AS id_after_old_ones
FROM mqtx.dead_letter ORDER BY id;


--
-- The upgrade again, with a mqtx_publisher that has no members: no warning
--
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
REVOKE mqtx_publisher FROM mqtx_regress_legacy, "mqtx_regress Legacy Two";
CREATE EXTENSION mqtx VERSION '0.1.0';
ALTER EXTENSION mqtx UPDATE TO '0.2.0';
INSERT INTO mqtx_regress_fingerprint SELECT 'upgraded empty', * FROM mqtx_regress_fingerprint();

-- and a fresh install, in a new schema
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
CREATE EXTENSION mqtx VERSION '0.2.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
INSERT INTO mqtx_regress_fingerprint SELECT 'fresh', * FROM mqtx_regress_fingerprint();

-- what the fingerprints hold, each aspect in each of them
SELECT aspect, count(*) FILTER (WHERE install = 'upgraded') > 0 AS upgraded,
       count(*) FILTER (WHERE install = 'upgraded empty') > 0 AS upgraded_empty,
       count(*) FILTER (WHERE install = 'fresh') > 0 AS fresh
FROM mqtx_regress_fingerprint GROUP BY aspect ORDER BY aspect;
SELECT count(*) > 300 AS fingerprint_is_detailed
FROM mqtx_regress_fingerprint WHERE install = 'fresh';

-- the differences, both ways: none
SELECT * FROM mqtx_regress_fingerprint_differences('upgraded', 'upgraded empty');

-- tidy up: 0.2.0 stays installed, the roles and tables made here go (the
-- fingerprint functions stay, for 09_upgrade_0_3 and 10_upgrade_0_4)
DROP TABLE mqtx_regress_fingerprint;
DROP TABLE legacy_events, legacy_more;
DROP FUNCTION legacy_handler(jsonb, jsonb), upgrade_handler(jsonb, jsonb);
REVOKE CREATE ON SCHEMA public FROM mqtx_regress_legacy;
DROP ROLE mqtx_regress_legacy, "mqtx_regress Legacy Two";
\if :publisher_existed
\else
DROP ROLE mqtx_publisher;
\endif
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
