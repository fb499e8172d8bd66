/*
 * mqtx 0.7.0 -> 0.8.0: ordering keys and scheduled delivery.  The outbox
 * gains ordering_key and deliver_at; mqtx.publish takes them (its
 * signature changes: the old function goes, and whoever could run it can
 * run the new one); mqtx.cancel withdraws a message not yet sent;
 * mqtx.blocked_keys shows the keys held back, and mqtx.outbox_stats the
 * messages scheduled for later.
 */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION mqtx UPDATE TO '0.8.0'" to load this file. \quit

ALTER TABLE mqtx.outbox
	ADD COLUMN ordering_key text,
	ADD COLUMN deliver_at timestamptz,
	ADD CONSTRAINT outbox_ordering_key_check CHECK (octet_length(ordering_key) <= 255);

COMMENT ON COLUMN mqtx.outbox.ordering_key IS
	'Messages of one key are published one at a time, in commit order, each once the previous one is confirmed; NULL: no order (mqtx.publish(ordering_key =>))';
COMMENT ON COLUMN mqtx.outbox.deliver_at IS
	'When a scheduled message is to be published (mqtx.publish(deliver_at =>, delay =>)); NULL: as soon as it is committed';
COMMENT ON COLUMN mqtx.outbox.id IS
	'Insertion order: the relay publishes due rows oldest first, and a key''s messages in this order; the id in NOTIFY mqtx_alert';
COMMENT ON COLUMN mqtx.outbox.next_attempt_at IS
	'When a pending message is next due for publishing: its deliver_at, then the time of its next retry';

-- A message with an ordering key waits while an earlier one of its key is
-- pending or failed: the relay looks for one here, among the rows not yet
-- published, however long the history.
CREATE INDEX outbox_ordering_key_idx ON mqtx.outbox (ordering_key, id)
	WHERE status IN ('pending', 'failed') AND ordering_key IS NOT NULL;

--
-- mqtx.publish gets three parameters with defaults.  Added next to the old
-- one, the new function would make every call of the old one ambiguous,
-- so the old one is dropped; the roles that could run it can run the new
-- one, and mqtx.cancel.  Objects that depend on the old function (an SQL
-- function with a BEGIN ATOMIC body, a view, a default that calls it)
-- would stop the DROP with a message about dependencies: they are named
-- first, with what to do.
--
DO $$
DECLARE
	old_publish regprocedure := 'mqtx.publish(text, text, jsonb, jsonb)'::regprocedure;
	dependents text;
BEGIN
	SELECT string_agg(pg_describe_object(d.classid, d.objid, d.objsubid), ', ')
	  INTO dependents
	  FROM pg_depend d
	 WHERE d.refclassid = 'pg_proc'::regclass AND d.refobjid = old_publish
	   AND d.deptype = 'n';
	IF dependents IS NOT NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'dependent_objects_still_exist',
			MESSAGE = 'cannot update mqtx to 0.8.0: objects depend on mqtx.publish(text, text, jsonb, jsonb)',
			DETAIL = format('Depending on it: %s.', dependents),
			HINT = 'mqtx.publish gets new parameters in 0.8.0, which replaces the function. Drop these objects, update, and create them again: calls with the old arguments work unchanged.';
	END IF;
END
$$;

-- kept in a table of the script's own, gone at its end
CREATE TABLE mqtx.publishers_before_0_8_0 AS
SELECT a.grantee::regrole::text AS grantee
  FROM pg_proc p, aclexplode(p.proacl) a
 WHERE p.oid = 'mqtx.publish(text, text, jsonb, jsonb)'::regprocedure
   AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner AND a.grantee <> 0;

DROP FUNCTION mqtx.publish(text, text, jsonb, jsonb);

CREATE FUNCTION mqtx.publish(exchange text, routing_key text, payload jsonb,
							 headers jsonb DEFAULT NULL,
							 ordering_key text DEFAULT NULL,
							 deliver_at timestamptz DEFAULT NULL,
							 delay interval DEFAULT NULL)
RETURNS uuid
AS 'MODULE_PATHNAME', 'mqtx_publish'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval) IS
	'Enqueue a message in the current transaction, optionally in the order of its key and at a later time (deliver_at, or delay after now()); returns its message id';

CREATE FUNCTION mqtx.cancel(message_id uuid)
RETURNS boolean
AS 'MODULE_PATHNAME', 'mqtx_cancel'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION mqtx.cancel(uuid) IS
	'Withdraw a message not yet sent, in the current transaction: true when it is withdrawn, false when it is published, may be on its way, or is not in the outbox';

REVOKE ALL ON FUNCTION mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval),
	mqtx.cancel(uuid) FROM PUBLIC;

-- Privileges granted in an extension script are taken for the extension's
-- own (pg_init_privs), which pg_dump leaves out and CREATE EXTENSION would
-- not give back on restore: the publishers' grants are the database's,
-- as grant_publish made them, so the initial privileges are put back as
-- the script left them before granting.
DO $$
DECLARE
	publisher text;
	functions oid[] := ARRAY['mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval)'::regprocedure,
							 'mqtx.cancel(uuid)'::regprocedure];
	initial aclitem[] := (SELECT i.initprivs FROM pg_init_privs i
						  WHERE i.classoid = 'pg_proc'::regclass AND i.objoid = functions[1]);
BEGIN
	FOR publisher IN SELECT grantee FROM mqtx.publishers_before_0_8_0 LOOP
		EXECUTE format('GRANT EXECUTE ON FUNCTION '
					   'mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval), '
					   'mqtx.cancel(uuid) TO %s', publisher);
	END LOOP;
	UPDATE pg_init_privs i SET initprivs = initial
	 WHERE i.classoid = 'pg_proc'::regclass AND i.objoid = ANY (functions);
END
$$;

DROP TABLE mqtx.publishers_before_0_8_0;

COMMENT ON FUNCTION mqtx.outbox_trigger() IS
	'AFTER INSERT FOR EACH ROW trigger: enqueue the new row as JSON; arguments are the exchange, the routing key, and optionally the columns whose values make the ordering key';

CREATE OR REPLACE FUNCTION mqtx.grant_publish(role regrole)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF role IS NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
			MESSAGE = 'mqtx.grant_publish needs a role';
	END IF;
	EXECUTE format('GRANT USAGE ON SCHEMA mqtx TO %s', role);
	EXECUTE format('GRANT EXECUTE ON FUNCTION '
				   'mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval), '
				   'mqtx.cancel(uuid), mqtx.outbox_trigger() TO %s', role);
END
$$;

COMMENT ON FUNCTION mqtx.grant_publish(regrole) IS
	'Let a role enqueue and cancel messages in this database (mqtx.publish, mqtx.cancel and mqtx.outbox_trigger)';

CREATE OR REPLACE FUNCTION mqtx.revoke_publish(role regrole)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF role IS NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
			MESSAGE = 'mqtx.revoke_publish needs a role';
	END IF;
	-- USAGE on the schema stays: by itself it grants nothing, and the
	-- role may have been given other rights in it
	EXECUTE format('REVOKE EXECUTE ON FUNCTION '
				   'mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval), '
				   'mqtx.cancel(uuid), mqtx.outbox_trigger() FROM %s', role);
END
$$;

COMMENT ON FUNCTION mqtx.revoke_publish(regrole) IS
	'Take back the right to call mqtx.publish and mqtx.cancel and to create outbox triggers in this database; existing triggers keep enqueueing';

CREATE OR REPLACE VIEW mqtx.outbox_stats AS
SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
	   count(*) FILTER (WHERE status = 'published') AS published,
	   count(*) FILTER (WHERE status = 'failed') AS failed,
	   now() - min(coalesce(deliver_at, created_at))
		   FILTER (WHERE status = 'pending' AND (deliver_at IS NULL OR deliver_at <= now()))
		   AS oldest_pending_age,
	   count(*) FILTER (WHERE status = 'pending' AND deliver_at > now()) AS scheduled
FROM mqtx.outbox;

COMMENT ON VIEW mqtx.outbox_stats IS
	'Outbox rows per status, how many are scheduled for later, and how long the oldest due one has waited';
COMMENT ON COLUMN mqtx.outbox_stats.pending IS
	'Messages waiting to be published, scheduled ones included';
COMMENT ON COLUMN mqtx.outbox_stats.oldest_pending_age IS
	'How long the oldest due pending message has waited, since it was enqueued or, if scheduled, since its deliver_at; NULL when none is due';
COMMENT ON COLUMN mqtx.outbox_stats.scheduled IS
	'Pending messages whose deliver_at has not come yet';

-- The keys whose messages wait: the first unpublished message of each key
-- holds back the later ones until it is confirmed.  Keys whose first one
-- is simply on its way are left out: they wait a round trip.
CREATE VIEW mqtx.blocked_keys AS
SELECT h.ordering_key,
	   CASE WHEN h.status = 'failed' THEN 'failed'
			WHEN h.attempts > 0 THEN 'retrying'
			ELSE 'scheduled'
	   END AS reason,
	   h.id AS blocked_by_id,
	   h.message_id AS blocked_by_message_id,
	   h.attempts,
	   h.last_error,
	   CASE WHEN h.status = 'pending' THEN h.next_attempt_at END AS next_attempt_at,
	   w.waiting,
	   w.oldest_waiting_since
FROM (SELECT DISTINCT ON (o.ordering_key) o.*
	  FROM mqtx.outbox o
	  WHERE o.status IN ('pending', 'failed') AND o.ordering_key IS NOT NULL
	  ORDER BY o.ordering_key, o.id) h
	 CROSS JOIN LATERAL (
		SELECT count(*) AS waiting, min(l.created_at) AS oldest_waiting_since
		FROM mqtx.outbox l
		WHERE l.ordering_key = h.ordering_key AND l.id > h.id
		  AND l.status IN ('pending', 'failed')) w
WHERE h.status = 'failed' OR h.attempts > 0
   OR (h.next_attempt_at > now() AND w.waiting > 0);

COMMENT ON VIEW mqtx.blocked_keys IS
	'Ordering keys whose messages are held back, and the message that holds them: failed, retrying, or scheduled later';
COMMENT ON COLUMN mqtx.blocked_keys.ordering_key IS
	'The key';
COMMENT ON COLUMN mqtx.blocked_keys.reason IS
	'failed: its first unpublished message gave up (reset it to pending, or mqtx.cancel it); retrying: the broker refused it and it is tried again; scheduled: its deliver_at has not come';
COMMENT ON COLUMN mqtx.blocked_keys.blocked_by_id IS
	'The outbox id of the message that holds the key';
COMMENT ON COLUMN mqtx.blocked_keys.blocked_by_message_id IS
	'Its message id';
COMMENT ON COLUMN mqtx.blocked_keys.attempts IS
	'Its failed publish attempts';
COMMENT ON COLUMN mqtx.blocked_keys.last_error IS
	'Why its last attempt failed';
COMMENT ON COLUMN mqtx.blocked_keys.next_attempt_at IS
	'When it is tried next; NULL when it is failed';
COMMENT ON COLUMN mqtx.blocked_keys.waiting IS
	'Later messages of the key that wait for it';
COMMENT ON COLUMN mqtx.blocked_keys.oldest_waiting_since IS
	'When the oldest of them was enqueued; NULL when none waits';

REVOKE ALL ON mqtx.blocked_keys FROM PUBLIC;
