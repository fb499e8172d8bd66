--
-- Upgrading 0.3.0 to 0.4.0: every row kept, message ids made from then on
-- time-ordered (by mqtx.publish, the trigger and the column's default),
-- retention's index there and used, and the result the same as a fresh
-- 0.4.0 install; and so is 0.1.0 upgraded to 0.4.0 in one step.  The
-- fingerprints are 08_upgrade's mqtx_regress_fingerprint() and
-- mqtx_regress_fingerprint_differences(), which 11_upgrade_0_5 drops.  Also
-- here: an outbox its owner has changed (a trigger, a rule, a CHECK
-- constraint, an index, NOT NULL, a column, a default) still gets every
-- message, and what the owner added runs.
--
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';

--
-- A 0.3.0 database in use: rows of every status, with the message ids
-- 0.3.0 made (random, version 4)
--
-- (Its times are yesterday's: while the test runs, the workers delete
-- published and inbox rows older than mqtx.retention and
-- mqtx.inbox_retention, 7 days.)
SELECT date_trunc('day', now()) - interval '1 day' AS yesterday \gset
INSERT INTO mqtx.outbox (exchange, routing_key, payload, status, attempts,
	next_attempt_at, last_error, created_at, published_at)
VALUES ('orders', 'order.pending', '{"order_id": 1}', 'pending', 0,
		(:'yesterday'::timestamptz + interval '10:00:00'), NULL, (:'yesterday'::timestamptz + interval '10:00:00'), NULL),
	   ('orders', 'order.retried', '{"order_id": 2}', 'pending', 2,
		(:'yesterday'::timestamptz + interval '10:05:00'), 'connection refused', (:'yesterday'::timestamptz + interval '10:00:00'), NULL),
	   ('orders', 'order.published', '{"order_id": 3}', 'published', 1,
		(:'yesterday'::timestamptz + interval '10:00:00'), NULL, (:'yesterday'::timestamptz + interval '10:00:00'), (:'yesterday'::timestamptz + interval '10:00:01')),
	   ('orders', 'order.failed', '{"order_id": 4}', 'failed', 10,
		(:'yesterday'::timestamptz + interval '10:00:00'), 'NOT_FOUND', (:'yesterday'::timestamptz + interval '10:00:00'), NULL);
SELECT routing_key, status, substr(message_id::text, 15, 1) AS uuid_version
FROM mqtx.outbox ORDER BY id;
INSERT INTO mqtx.inbox (queue, message_id, applied_at)
VALUES ('dispatch', 'm-1', (:'yesterday'::timestamptz + interval '11:00:00'));
CREATE TEMP TABLE before_outbox AS SELECT * FROM mqtx.outbox;
CREATE TEMP TABLE before_inbox AS SELECT * FROM mqtx.inbox;

CREATE TABLE mqtx_regress_fingerprint (install text, aspect text, object text, detail text);

--
-- The upgrade
--
ALTER EXTENSION mqtx UPDATE TO '0.4.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';

-- every row is there, unchanged, and nothing else
SELECT (SELECT count(*) FROM (TABLE before_outbox EXCEPT ALL TABLE mqtx.outbox) d) AS outbox_missing,
       (SELECT count(*) FROM (TABLE mqtx.outbox EXCEPT ALL TABLE before_outbox) d) AS outbox_appeared,
       (SELECT count(*) FROM (TABLE before_inbox EXCEPT ALL TABLE mqtx.inbox) d) AS inbox_missing,
       (SELECT count(*) FROM (TABLE mqtx.inbox EXCEPT ALL TABLE before_inbox) d) AS inbox_appeared;

INSERT INTO mqtx_regress_fingerprint SELECT 'upgraded', * FROM mqtx_regress_fingerprint();

-- the column's default and retention's index
SELECT pg_get_expr(adbin, adrelid) AS message_id_default
FROM pg_attrdef WHERE adrelid = 'mqtx.outbox'::regclass
  AND adnum = (SELECT attnum FROM pg_attribute
               WHERE attrelid = 'mqtx.outbox'::regclass AND attname = 'message_id');
SELECT pg_get_indexdef('mqtx.outbox_published_at_idx'::regclass);
-- the new function is not PUBLIC's
SELECT has_function_privilege('public', 'mqtx.new_message_id()', 'EXECUTE') AS public_may_call;

--
-- Message ids from now on: version 7, RFC 9562's variant, and made later
-- means sorted later, whichever way the row came in
--
SELECT mqtx.publish('orders', 'order.v7', '{"n": 1}') AS first_id \gset
SELECT pg_sleep(0.002);
CREATE TABLE app_events (id int PRIMARY KEY);
CREATE TRIGGER app_events_outbox AFTER INSERT ON app_events
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('orders', 'app.row');
INSERT INTO app_events VALUES (1);
SELECT pg_sleep(0.002);
INSERT INTO mqtx.outbox (exchange, routing_key, payload) VALUES ('orders', 'order.default', '{}');
SELECT routing_key, substr(message_id::text, 15, 1) AS uuid_version,
       substr(message_id::text, 20, 1) IN ('8', '9', 'a', 'b') AS rfc_variant,
       message_id > :'first_id' OR routing_key = 'order.v7' AS sorts_after_first,
       abs(extract(epoch FROM now()) * 1000 -
           ('x' || replace(substr(message_id::text, 1, 13), '-', ''))::bit(48)::bigint) < 60000
           AS carries_the_time
FROM mqtx.outbox WHERE id > (SELECT max(id) FROM before_outbox) ORDER BY id;
SELECT count(DISTINCT mqtx.new_message_id()) AS distinct_ids FROM generate_series(1, 10000);

--
-- Retention reads the published rows past retention through its index
--
SET enable_seqscan = off;
SET enable_bitmapscan = off;
SET enable_sort = off;
EXPLAIN (COSTS OFF)
DELETE FROM mqtx.outbox WHERE id IN (
  SELECT id FROM mqtx.outbox
   WHERE status = 'published' AND published_at < now() - make_interval(secs => 60)
   ORDER BY published_at LIMIT 1000);
RESET enable_seqscan;
RESET enable_bitmapscan;
RESET enable_sort;

--
-- An outbox its owner changed: what an INSERT would run still runs, and
-- nothing is lost either way.  Each change makes the backend look at the
-- table again, and say (DEBUG1) how it inserts rows: directly, with the
-- table's defaults and constraints compiled once, or through SQL when an
-- INSERT would run something the direct insert does not.
--
-- publishes, showing the DEBUG1 message and nothing else
CREATE FUNCTION publish_saying_how(routing_key text, payload jsonb, headers jsonb DEFAULT NULL)
RETURNS boolean LANGUAGE plpgsql SET client_min_messages = debug1 AS $$
BEGIN
	RETURN mqtx.publish('orders', routing_key, payload, headers) IS NOT NULL;
END
$$;
SELECT publish_saying_how('order.plain', '{"n": 2}');
-- a trigger: SQL, and the trigger fires
CREATE TABLE outbox_audit (message_id uuid, routing_key text);
CREATE FUNCTION audit_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO public.outbox_audit VALUES (NEW.message_id, NEW.routing_key);
	RETURN NULL;
END
$$;
CREATE TRIGGER outbox_audited AFTER INSERT ON mqtx.outbox
	FOR EACH ROW EXECUTE FUNCTION audit_outbox();
SELECT publish_saying_how('order.audited', '{"n": 3}');
INSERT INTO app_events VALUES (2);
DROP TRIGGER outbox_audited ON mqtx.outbox;
-- a rule: SQL, and the rule runs
CREATE RULE outbox_ruled AS ON INSERT TO mqtx.outbox
	DO ALSO INSERT INTO public.outbox_audit VALUES (NEW.message_id, 'rule:' || NEW.routing_key);
SELECT publish_saying_how('order.ruled', '{"n": 4}');
DROP RULE outbox_ruled ON mqtx.outbox;
SELECT a.routing_key, a.message_id = o.message_id AS same_message
FROM outbox_audit a JOIN mqtx.outbox o USING (message_id) ORDER BY o.id, a.routing_key;
-- a CHECK constraint of built-in code: direct, and enforced
ALTER TABLE mqtx.outbox ADD CONSTRAINT outbox_no_secrets
	CHECK (NOT payload ? 'password');
\set VERBOSITY terse
SELECT publish_saying_how('order.secret', '{"password": "x"}');
\set VERBOSITY default
ALTER TABLE mqtx.outbox DROP CONSTRAINT outbox_no_secrets;
-- one that calls a function someone created: SQL, and enforced
CREATE FUNCTION no_secrets(payload jsonb) RETURNS boolean IMMUTABLE
	LANGUAGE plpgsql AS $$BEGIN RETURN NOT payload ? 'password'; END$$;
ALTER TABLE mqtx.outbox ADD CONSTRAINT outbox_no_secrets CHECK (public.no_secrets(payload));
\set VERBOSITY terse
SELECT publish_saying_how('order.secret', '{"password": "x"}');
\set VERBOSITY default
ALTER TABLE mqtx.outbox DROP CONSTRAINT outbox_no_secrets;
-- likewise an index on such a function
CREATE INDEX outbox_secret_idx ON mqtx.outbox (public.no_secrets(payload));
SELECT publish_saying_how('order.indexed', '{"n": 5}');
DROP INDEX mqtx.outbox_secret_idx;
-- a new column with a default, and a changed default: direct, and both
-- defaults apply
ALTER TABLE mqtx.outbox ADD COLUMN tenant text NOT NULL DEFAULT 'acme';
ALTER TABLE mqtx.outbox ALTER COLUMN next_attempt_at SET DEFAULT now() + interval '1 hour';
SELECT publish_saying_how('order.tenant', '{"n": 6}');
SELECT routing_key, tenant, next_attempt_at - created_at AS due_after
FROM mqtx.outbox WHERE routing_key = 'order.tenant';
ALTER TABLE mqtx.outbox ALTER COLUMN next_attempt_at SET DEFAULT now();
-- NOT NULL with no default left: direct, and enforced
ALTER TABLE mqtx.outbox ALTER COLUMN tenant DROP DEFAULT;
\set VERBOSITY terse
SELECT publish_saying_how('order.no_tenant', '{"n": 7}');
\set VERBOSITY default
-- a dropped column: direct
ALTER TABLE mqtx.outbox DROP COLUMN tenant;
SELECT publish_saying_how('order.after', '{"n": 8}', '{"h": 1}');
SELECT routing_key, status, attempts, payload, headers FROM mqtx.outbox
WHERE id > (SELECT max(id) FROM before_outbox) ORDER BY id;
DROP TABLE outbox_audit;
DROP FUNCTION audit_outbox();
DROP FUNCTION no_secrets(jsonb);
DROP FUNCTION publish_saying_how(text, jsonb, jsonb);

--
-- 0.1.0 to 0.4.0 in one step, with data in it
--
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mqtx_publisher') AS publisher_existed \gset
CREATE EXTENSION mqtx VERSION '0.1.0';
SELECT source, target, path FROM pg_extension_update_paths('mqtx')
WHERE source = '0.1.0' AND target = '0.4.0';
SELECT mqtx.publish('orders', 'order.created', '{"order_id": 1}') IS NOT NULL AS enqueued;
ALTER EXTENSION mqtx UPDATE TO '0.4.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
INSERT INTO mqtx_regress_fingerprint SELECT 'upgraded from 0.1.0', * FROM mqtx_regress_fingerprint();
SELECT count(*) AS outbox FROM mqtx.outbox;

-- and a fresh install, in a new schema
DROP EXTENSION mqtx CASCADE;
DROP SCHEMA mqtx;
CREATE EXTENSION mqtx VERSION '0.4.0';
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
INSERT INTO mqtx_regress_fingerprint SELECT 'fresh', * FROM mqtx_regress_fingerprint();

SELECT count(*) > 300 AS fingerprint_is_detailed
FROM mqtx_regress_fingerprint WHERE install = 'fresh';
-- the new objects are in it
SELECT aspect, object, detail FROM mqtx_regress_fingerprint
WHERE install = 'fresh' AND (object LIKE '%new_message_id%' OR detail LIKE '%published_at_idx%'
                             OR object LIKE '%published_at_idx%')
ORDER BY 1, 2, 3;

-- the differences, both ways: none
SELECT * FROM mqtx_regress_fingerprint_differences('upgraded', 'upgraded from 0.1.0');

-- tidy up: 0.4.0 stays installed, the tables and functions made here go;
-- 11_upgrade_0_5 takes the fingerprints again
DROP TABLE mqtx_regress_fingerprint;
DROP TABLE app_events;
\if :publisher_existed
\else
DROP ROLE mqtx_publisher;
\endif
SELECT extversion FROM pg_extension WHERE extname = 'mqtx';
