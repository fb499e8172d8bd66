--
-- Privileges: publishing is granted per database with mqtx.grant_publish(),
-- the outbox itself never is; a subscription needs the privileges of its
-- handler's owner
--

-- every privilege on the schema and on what is in it, by grantee and kind;
-- a NULL ACL is the default one (the owner's alone)
CREATE VIEW mqtx_regress_acl AS
SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END AS grantee,
       o.kind, o.name, a.privilege_type
FROM (SELECT 'schema' AS kind, nspname::text AS name,
             coalesce(nspacl, acldefault('n', nspowner)) AS acl
      FROM pg_namespace WHERE nspname = 'mqtx'
      UNION ALL
      SELECT 'function', oid::regprocedure::text,
             coalesce(proacl, acldefault('f', proowner))
      FROM pg_proc WHERE pronamespace = 'mqtx'::regnamespace
      UNION ALL
      SELECT CASE WHEN relkind = 'S' THEN 'sequence' ELSE 'relation' END,
             oid::regclass::text,
             coalesce(relacl, acldefault(CASE WHEN relkind = 'S' THEN 's' ELSE 'r' END::"char", relowner))
      FROM pg_class WHERE relnamespace = 'mqtx'::regnamespace
      UNION ALL
      -- what pg_dump takes as the extension's own grants
      SELECT 'initial ' || pg_describe_object(classoid, objoid, objsubid), '', initprivs
      FROM pg_init_privs
      WHERE classoid = 'pg_namespace'::regclass AND objoid = 'mqtx'::regnamespace
         OR classoid = 'pg_proc'::regclass
            AND objoid IN (SELECT oid FROM pg_proc WHERE pronamespace = 'mqtx'::regnamespace)
         OR classoid = 'pg_class'::regclass
            AND objoid IN (SELECT oid FROM pg_class WHERE relnamespace = 'mqtx'::regnamespace)
     ) o, aclexplode(o.acl) a;

-- a fresh install grants nothing to anyone but the owner: no shared role,
-- nothing to PUBLIC (grants the owner made to itself aside)
SELECT count(*) > 50 AS acl_entries_seen FROM mqtx_regress_acl;
SELECT grantee, kind, name, privilege_type FROM mqtx_regress_acl
WHERE grantee <> (SELECT extowner::regrole::text FROM pg_extension WHERE extname = 'mqtx')
ORDER BY 1, 2, 3, 4;

CREATE ROLE mqtx_regress_app;
CREATE ROLE mqtx_regress_other;
GRANT CREATE ON SCHEMA public TO mqtx_regress_app, mqtx_regress_other;

TRUNCATE mqtx.outbox;
SELECT mqtx.publish('orders', 'someone.else', '{"secret": true}') IS NOT NULL AS enqueued;

-- grant_publish: USAGE on the schema, EXECUTE on the two ways to enqueue,
-- and nothing else; granting again changes nothing
SELECT mqtx.grant_publish('mqtx_regress_app');
SELECT mqtx.grant_publish('mqtx_regress_app');
SELECT grantee, kind, name, privilege_type FROM mqtx_regress_acl
WHERE grantee LIKE 'mqtx_regress%' ORDER BY 1, 2, 3, 4;

-- a role is needed, and it must exist
SELECT mqtx.grant_publish(NULL);
SELECT mqtx.revoke_publish(NULL);
SELECT mqtx.grant_publish('mqtx_regress_no_such_role');
-- a name that needs quoting is quoted
CREATE ROLE "mqtx_regress Quoted";
SELECT mqtx.grant_publish('"mqtx_regress Quoted"');
SELECT grantee, kind, name, privilege_type FROM mqtx_regress_acl
WHERE grantee LIKE '%Quoted%' ORDER BY 1, 2, 3, 4;
SELECT mqtx.revoke_publish('"mqtx_regress Quoted"');
SELECT grantee, kind, name, privilege_type FROM mqtx_regress_acl
WHERE grantee LIKE '%Quoted%' ORDER BY 1, 2, 3, 4;
REVOKE USAGE ON SCHEMA mqtx FROM "mqtx_regress Quoted";
DROP ROLE "mqtx_regress Quoted";

SET ROLE mqtx_regress_app;

-- a publisher can enqueue, directly or through its own table's trigger
SELECT mqtx.publish('orders', 'app.event', '{"n": 1}') IS NOT NULL AS enqueued;
CREATE TABLE app_orders (id int PRIMARY KEY, what text);
CREATE TRIGGER app_orders_outbox AFTER INSERT ON app_orders
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('orders', 'app.order');
INSERT INTO app_orders VALUES (1, 'tea');

-- but cannot read, change or remove messages
SELECT count(*) FROM mqtx.outbox;
UPDATE mqtx.outbox SET status = 'published', published_at = now();
DELETE FROM mqtx.outbox;
INSERT INTO mqtx.outbox (exchange, routing_key, payload) VALUES ('x', 'y', '{}');
TRUNCATE mqtx.outbox;

-- nor see the broker URL, nor lift the payload limit
SHOW mqtx.broker_url;
SELECT current_setting('mqtx.broker_url');
SELECT count(*) FROM pg_settings WHERE name = 'mqtx.broker_url';
SET mqtx.max_payload = '100MB';

-- nor pass publishing on, to itself or anyone
SELECT mqtx.grant_publish('mqtx_regress_other');
SELECT mqtx.revoke_publish('mqtx_regress_app');

RESET ROLE;

-- a role that was not granted publishing can do neither
SET ROLE mqtx_regress_other;
SELECT mqtx.publish('orders', 'other.event', '{}');
CREATE TABLE other_orders (id int);
CREATE TRIGGER other_outbox AFTER INSERT ON other_orders
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('orders', 'other.order');
SELECT count(*) FROM mqtx.outbox;
RESET ROLE;

-- the app's messages are there, unchanged, and nothing else was written
SELECT routing_key, payload, status FROM mqtx.outbox ORDER BY id;

-- a trigger owned by the app still enqueues when someone else inserts
GRANT INSERT ON app_orders TO mqtx_regress_other;
SET ROLE mqtx_regress_other;
INSERT INTO app_orders VALUES (2, 'coffee');
RESET ROLE;
SELECT routing_key, payload FROM mqtx.outbox WHERE routing_key = 'app.order' ORDER BY id;

-- the grant is for this database only: another database's mqtx knows
-- nothing of it
CREATE DATABASE mqtx_regress_elsewhere;
\c mqtx_regress_elsewhere
CREATE EXTENSION mqtx;
SET ROLE mqtx_regress_app;
SELECT mqtx.publish('orders', 'app.elsewhere', '{}');
RESET ROLE;
SELECT count(*) FROM mqtx.outbox;
\c contrib_regression
DROP DATABASE mqtx_regress_elsewhere;

-- revoke_publish takes EXECUTE back and leaves USAGE on the schema
SELECT mqtx.revoke_publish('mqtx_regress_app');
SELECT grantee, kind, name, privilege_type FROM mqtx_regress_acl
WHERE grantee LIKE 'mqtx_regress%' ORDER BY 1, 2, 3, 4;
-- revoking what is not granted is harmless
SELECT mqtx.revoke_publish('mqtx_regress_other');

SET ROLE mqtx_regress_app;
SELECT mqtx.publish('orders', 'app.revoked', '{}');
CREATE TABLE app_more (id int);
CREATE TRIGGER app_more_outbox AFTER INSERT ON app_more
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('orders', 'app.more');
-- PostgreSQL checks EXECUTE on a trigger function at CREATE TRIGGER only:
-- a trigger made while publishing was granted keeps enqueueing after the
-- revoke, until it is dropped
INSERT INTO app_orders VALUES (3, 'water');
RESET ROLE;
SELECT routing_key, payload FROM mqtx.outbox
WHERE routing_key IN ('app.order', 'app.revoked', 'app.more') ORDER BY id;

-- granted again, it publishes again
SELECT mqtx.grant_publish('mqtx_regress_app');
SET ROLE mqtx_regress_app;
SELECT mqtx.publish('orders', 'app.regranted', '{}') IS NOT NULL AS enqueued;
RESET ROLE;
SELECT count(*) FROM mqtx.outbox WHERE routing_key = 'app.regranted';

DROP TABLE app_orders, app_more, other_orders;

--
-- Subscriptions: the consumer runs a handler as its owner, so whoever
-- writes a subscription must have that role's privileges
--
CREATE ROLE mqtx_regress_sub;
GRANT USAGE ON SCHEMA mqtx TO mqtx_regress_sub;
GRANT SELECT, INSERT, UPDATE ON mqtx.subscriptions TO mqtx_regress_sub;
GRANT CREATE ON SCHEMA public TO mqtx_regress_sub;

CREATE FUNCTION super_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE sql AS 'SELECT';
CREATE ROLE "mqtx_regress Owner";
CREATE FUNCTION quoted_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE sql AS 'SELECT';
ALTER FUNCTION quoted_handler(jsonb, jsonb) OWNER TO "mqtx_regress Owner";
SET ROLE mqtx_regress_other;
CREATE FUNCTION other_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE sql AS 'SELECT';
SET ROLE mqtx_regress_sub;
CREATE FUNCTION sub_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE sql AS 'SELECT';
CREATE FUNCTION sub_wrong(payload jsonb) RETURNS void
	LANGUAGE sql AS 'SELECT';

-- its own function: yes
INSERT INTO mqtx.subscriptions (queue, handler) VALUES ('sub.own', 'sub_handler(jsonb,jsonb)');
-- another role's, or a superuser's: no
INSERT INTO mqtx.subscriptions (queue, handler) VALUES ('sub.other', 'other_handler(jsonb,jsonb)');
SELECT :'LAST_ERROR_SQLSTATE' AS sqlstate;
INSERT INTO mqtx.subscriptions (queue, handler) VALUES ('sub.super', 'super_handler(jsonb,jsonb)');
SELECT :'LAST_ERROR_SQLSTATE' AS sqlstate;
-- the owner is named as it is, in quotes
INSERT INTO mqtx.subscriptions (queue, handler) VALUES ('sub.quoted', 'quoted_handler(jsonb,jsonb)');
-- nor by changing the handler of a subscription it could write
UPDATE mqtx.subscriptions SET handler = 'other_handler(jsonb,jsonb)' WHERE queue = 'sub.own';
SELECT :'LAST_ERROR_SQLSTATE' AS sqlstate;
-- nor through an upsert, as mqtx.subscribe does
INSERT INTO mqtx.subscriptions (queue, handler) VALUES ('sub.own', 'sub_handler(jsonb,jsonb)')
	ON CONFLICT (queue) DO UPDATE SET handler = 'other_handler(jsonb,jsonb)';
SELECT :'LAST_ERROR_SQLSTATE' AS sqlstate;
-- other columns are its to change
UPDATE mqtx.subscriptions SET prefetch = 7 WHERE queue = 'sub.own';
-- the signature is checked on the table too
INSERT INTO mqtx.subscriptions (queue, handler) VALUES ('sub.wrong', 'sub_wrong(jsonb)');
SELECT :'LAST_ERROR_SQLSTATE' AS sqlstate;
SELECT queue, handler, prefetch FROM mqtx.subscriptions ORDER BY queue;
RESET ROLE;

-- a member that inherits the owner's privileges may subscribe its function
GRANT mqtx_regress_other TO mqtx_regress_sub;
SET ROLE mqtx_regress_sub;
INSERT INTO mqtx.subscriptions (queue, handler) VALUES ('sub.other', 'other_handler(jsonb,jsonb)');
RESET ROLE;
REVOKE mqtx_regress_other FROM mqtx_regress_sub;
-- and the check is made on every write of a handler, not once per row
SET ROLE mqtx_regress_sub;
UPDATE mqtx.subscriptions SET handler = 'other_handler(jsonb,jsonb)' WHERE queue = 'sub.other';
SELECT :'LAST_ERROR_SQLSTATE' AS sqlstate;
RESET ROLE;

-- mqtx.subscribe goes through the same check
GRANT EXECUTE ON FUNCTION mqtx.subscribe(text, regprocedure, integer, integer, interval, text, integer) TO mqtx_regress_sub;
GRANT SELECT ON mqtx.queues TO mqtx_regress_sub;
INSERT INTO mqtx.queues (name) VALUES ('sub.own'), ('sub.super');
SET ROLE mqtx_regress_sub;
SELECT mqtx.subscribe('sub.own', 'sub_handler(jsonb,jsonb)', 5);
SELECT mqtx.subscribe('sub.super', 'super_handler(jsonb,jsonb)');
SELECT :'LAST_ERROR_SQLSTATE' AS sqlstate;
SELECT mqtx.subscribe('sub.own', 'other_handler(jsonb,jsonb)');
SELECT :'LAST_ERROR_SQLSTATE' AS sqlstate;
RESET ROLE;

-- a superuser has every role's privileges
INSERT INTO mqtx.subscriptions (queue, handler) VALUES ('sub.super', 'super_handler(jsonb,jsonb)');
UPDATE mqtx.subscriptions SET handler = 'other_handler(jsonb,jsonb)' WHERE queue = 'sub.super';
INSERT INTO mqtx.subscriptions (queue, handler) VALUES ('sub.theirs', 'sub_handler(jsonb,jsonb)');
-- but not a handler of the wrong shape, however written
CREATE FUNCTION wrong_result(jsonb, jsonb) RETURNS int LANGUAGE sql AS 'SELECT 1';
CREATE PROCEDURE wrong_kind(jsonb, jsonb) LANGUAGE sql AS 'SELECT';
INSERT INTO mqtx.subscriptions (queue, handler) VALUES ('sub.wrong', 'wrong_result(jsonb,jsonb)');
INSERT INTO mqtx.subscriptions (queue, handler) VALUES ('sub.wrong', 'wrong_kind(jsonb,jsonb)');
UPDATE mqtx.subscriptions SET handler = 'wrong_result(jsonb,jsonb)' WHERE queue = 'sub.super';
INSERT INTO mqtx.subscriptions (queue, handler) VALUES ('sub.wrong', 0);
SELECT queue, handler, pg_get_userbyid(p.proowner) AS runs_as, prefetch
FROM mqtx.subscriptions s JOIN pg_proc p ON p.oid = s.handler ORDER BY queue;

DELETE FROM mqtx.subscriptions;
DELETE FROM mqtx.queues;
DROP FUNCTION super_handler(jsonb, jsonb), other_handler(jsonb, jsonb),
	sub_handler(jsonb, jsonb), sub_wrong(jsonb), wrong_result(jsonb, jsonb);
DROP PROCEDURE wrong_kind(jsonb, jsonb);
DROP FUNCTION quoted_handler(jsonb, jsonb);
DROP ROLE "mqtx_regress Owner";
DROP VIEW mqtx_regress_acl;
REVOKE CREATE ON SCHEMA public FROM mqtx_regress_app, mqtx_regress_other, mqtx_regress_sub;
-- what grant_publish and the grants above gave, in this database
DROP OWNED BY mqtx_regress_app, mqtx_regress_sub;
DROP ROLE mqtx_regress_app, mqtx_regress_other, mqtx_regress_sub;
