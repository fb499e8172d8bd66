/*
 * mqtx 0.9.0 -> 0.10.0: correlation, causation and trace context.  A
 * message published while a handler runs carries the handled message's
 * correlation id and names it as its cause; mqtx.publish takes
 * correlation_id and causation_id to set them; mqtx.inbox, mqtx.parked
 * and mqtx.dead_letter keep a received message's correlation id (the
 * inbox its causation id too), mqtx.redrive hands it on, and
 * mqtx.message_trail and mqtx.message_chain show conversations.
 */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION mqtx UPDATE TO '0.10.0'" to load this file. \quit

ALTER TABLE mqtx.inbox
	ADD COLUMN correlation_id text,
	ADD COLUMN causation_id text;
COMMENT ON COLUMN mqtx.inbox.correlation_id IS
	'The message''s AMQP correlation_id, or NULL when it has none (it started its conversation)';
COMMENT ON COLUMN mqtx.inbox.causation_id IS
	'The id of the message whose handler published this one (header x-mqtx-causation-id), or NULL';

ALTER TABLE mqtx.dead_letter ADD COLUMN correlation_id text;
COMMENT ON COLUMN mqtx.dead_letter.correlation_id IS
	'The message''s AMQP correlation_id, or NULL; a redriven message keeps it';

ALTER TABLE mqtx.parked ADD COLUMN correlation_id text;
COMMENT ON COLUMN mqtx.parked.correlation_id IS
	'The message''s AMQP correlation_id, or NULL';

COMMENT ON COLUMN mqtx.outbox.headers IS
	'The AMQP headers, as a JSON object, or NULL for none; mqtx adds x-mqtx-correlation-id (sent as the AMQP correlation_id too), x-mqtx-causation-id, traceparent and tracestate';

--
-- mqtx.publish gets the parameters correlation_id and causation_id.  As
-- in the updates to 0.8.0 and 0.9.0: a new function next to the old one
-- would make every call of the old one ambiguous, so the old one is
-- dropped, and the roles that could run it can run the new one.  Objects
-- that depend on the old function are named first, with what to do.
--
DO $$
DECLARE
	dependents text;
BEGIN
	SELECT string_agg(pg_describe_object(d.classid, d.objid, d.objsubid), ', ')
	  INTO dependents
	  FROM pg_depend d
	 WHERE d.refclassid = 'pg_proc'::regclass AND d.deptype = 'n'
	   AND d.refobjid = 'mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval)'::regprocedure;
	IF dependents IS NOT NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'dependent_objects_still_exist',
			MESSAGE = 'cannot update mqtx to 0.10.0: objects depend on mqtx.publish',
			DETAIL = format('Depending on it: %s.', dependents),
			HINT = 'mqtx.publish gets new parameters in 0.10.0, which replaces the function. Drop these objects, update, and create them again: calls with the old arguments work unchanged.';
	END IF;
END
$$;

-- kept in a table of the script's own, gone at its end
CREATE TABLE mqtx.grants_before_0_10_0 AS
SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END AS grantee,
	   CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END AS grant_option
  FROM pg_proc p, aclexplode(p.proacl) a
 WHERE p.oid = 'mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval)'::regprocedure
   AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner;

DROP FUNCTION mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval);

CREATE FUNCTION mqtx.publish(exchange text, routing_key text, payload jsonb,
							 headers jsonb DEFAULT NULL,
							 ordering_key text DEFAULT NULL,
							 deliver_at timestamptz DEFAULT NULL,
							 delay interval DEFAULT NULL,
							 correlation_id text DEFAULT NULL,
							 causation_id text DEFAULT NULL)
RETURNS uuid
AS 'MODULE_PATHNAME', 'mqtx_publish'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval, text, text) IS
	'Enqueue a message in the current transaction, optionally in the order of its key, at a later time (deliver_at, or delay after now()), and with a correlation and causation id other than the handled message''s; returns its message id';

REVOKE ALL ON FUNCTION mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval, text, text) FROM PUBLIC;

-- the grants are the database's, not the extension's: its initial
-- privileges are put back as the script left them before granting
DO $$
DECLARE
	old record;
	publish oid := 'mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval, text, text)'::regprocedure;
	initial aclitem[] := (SELECT i.initprivs FROM pg_init_privs i
						  WHERE i.classoid = 'pg_proc'::regclass AND i.objoid = publish);
BEGIN
	FOR old IN SELECT grantee, grant_option FROM mqtx.grants_before_0_10_0 LOOP
		EXECUTE format('GRANT EXECUTE ON FUNCTION '
					   'mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval, text, text) TO %s%s',
					   old.grantee, old.grant_option);
	END LOOP;
	UPDATE pg_init_privs i SET initprivs = initial
	 WHERE i.classoid = 'pg_proc'::regclass AND i.objoid = publish;
END
$$;

DROP TABLE mqtx.grants_before_0_10_0;

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
				   'mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval, text, text), '
				   'mqtx.cancel(uuid), mqtx.outbox_trigger() TO %s', role);
END
$$;

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
				   'mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval, text, text), '
				   'mqtx.cancel(uuid), mqtx.outbox_trigger() FROM %s', role);
END
$$;

-- a redriven message keeps its correlation id
CREATE OR REPLACE FUNCTION mqtx.redrive(id bigint)
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	letter mqtx.dead_letter;
BEGIN
	DELETE FROM mqtx.dead_letter d WHERE d.id = redrive.id RETURNING * INTO letter;
	IF NOT FOUND THEN
		RAISE EXCEPTION USING ERRCODE = 'no_data_found',
			MESSAGE = format('mqtx dead letter %s does not exist', id);
	END IF;
	IF letter.body_json IS NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
			MESSAGE = format('mqtx dead letter %s cannot be redriven', id),
			DETAIL = 'Its body is not valid JSON.',
			HINT = 'Inspect body and body_text, then remove it with mqtx.discard().';
	END IF;
	-- The message keeps its identity: the consumer dedupes it on the
	-- original id carried in the header, and its inbox row, written when
	-- it was dead-lettered, goes, so that exactly one copy is applied.
	DELETE FROM mqtx.inbox i
	 WHERE i.queue = letter.queue AND i.message_id = letter.message_id;
	-- A message of an ordering key goes back to its place among its key's
	-- parked messages, ahead of the later ones: sent through the outbox it
	-- could arrive after a later message of its key.
	IF letter.ordering_key IS NOT NULL THEN
		INSERT INTO mqtx.parked (position, queue, ordering_key, message_id, exchange,
								 routing_key, headers, body, correlation_id)
		VALUES (coalesce(letter.parked_position, nextval('mqtx.parked_position_seq')),
				letter.queue, letter.ordering_key, letter.message_id, letter.exchange,
				letter.routing_key, letter.headers, letter.body, letter.correlation_id);
		RETURN NULL;
	END IF;
	-- through the outbox, so it takes the whole way again, in its
	-- conversation: a message that started one is its correlation id (its
	-- causation and trace context are in its headers); an id too long for
	-- the AMQP property (a foreign "hex:" one) is left out
	RETURN mqtx.publish('', letter.queue, letter.body_json,
						coalesce(letter.headers, '{}')
						|| jsonb_build_object('x-mqtx-redriven-from', letter.message_id),
						correlation_id => (SELECT c FROM unnest(ARRAY[letter.correlation_id,
																		 letter.message_id]) c
										   WHERE octet_length(convert_to(c, 'UTF8')) <= 255
										   LIMIT 1));
END
$$;

-- Conversations: the messages this database sent and received, with the
-- ids that tie them together.  A message published while a handler ran
-- has the handled message's correlation id and names it as its cause; a
-- message that started a conversation is its own correlation id.  What
-- retention deleted is gone from here too.
CREATE VIEW mqtx.message_trail AS
SELECT 'sent'::text AS direction,
	   o.message_id::text AS message_id,
	   coalesce(o.headers ->> 'x-mqtx-correlation-id', o.message_id::text) AS correlation_id,
	   o.headers ->> 'x-mqtx-causation-id' AS causation_id,
	   o.exchange, o.routing_key, NULL::text AS queue, o.status,
	   o.created_at AS at,
	   o.headers ->> 'traceparent' AS traceparent
FROM mqtx.outbox o
UNION ALL
SELECT 'received', i.message_id, coalesce(i.correlation_id, i.message_id), i.causation_id,
	   NULL, NULL, i.queue,
	   CASE WHEN EXISTS (SELECT FROM mqtx.dead_letter d
						 WHERE d.queue = i.queue AND d.message_id = i.message_id)
			THEN 'dead_letter' ELSE 'settled' END,
	   i.applied_at, NULL
FROM mqtx.inbox i
UNION ALL
SELECT 'received', p.message_id, coalesce(p.correlation_id, p.message_id),
	   p.headers ->> 'x-mqtx-causation-id', p.exchange, p.routing_key, p.queue, 'parked',
	   p.parked_at, p.headers ->> 'traceparent'
FROM mqtx.parked p;

COMMENT ON VIEW mqtx.message_trail IS
	'Every message this database sent (mqtx.outbox) or received (mqtx.inbox, mqtx.parked) and still keeps, with its correlation and causation ids';
COMMENT ON COLUMN mqtx.message_trail.direction IS
	'sent: enqueued here; received: applied, dead-lettered or parked here';
COMMENT ON COLUMN mqtx.message_trail.message_id IS
	'The message''s id (for a received one, its dedupe key, as in mqtx.inbox)';
COMMENT ON COLUMN mqtx.message_trail.correlation_id IS
	'The conversation it belongs to: its AMQP correlation_id, or its own id when it started one';
COMMENT ON COLUMN mqtx.message_trail.causation_id IS
	'The id of the message whose handler published it, or NULL';
COMMENT ON COLUMN mqtx.message_trail.exchange IS
	'The exchange it was published to (not kept for applied messages)';
COMMENT ON COLUMN mqtx.message_trail.routing_key IS
	'Its routing key (not kept for applied messages)';
COMMENT ON COLUMN mqtx.message_trail.queue IS
	'The queue it was received from; NULL for a sent message';
COMMENT ON COLUMN mqtx.message_trail.status IS
	'A sent message''s outbox status (pending, published, failed); a received one''s: parked, dead_letter, or settled (applied, or dead-lettered and discarded)';
COMMENT ON COLUMN mqtx.message_trail.at IS
	'When it was enqueued, applied (or dead-lettered) or parked';
COMMENT ON COLUMN mqtx.message_trail.traceparent IS
	'Its W3C traceparent, for sent and parked messages (not kept for applied ones)';

-- The chain of one message: what caused it, as far back as this
-- database knows, and everything it caused here, depth first.  It reads
-- the trail's tables whole, for an operator's question, not a hot path.
CREATE FUNCTION mqtx.message_chain(message_id text)
RETURNS TABLE (depth integer, direction text, message_id text, correlation_id text,
			   causation_id text, exchange text, routing_key text, queue text,
			   status text, at timestamptz)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
	-- each id once: a message that names itself, or a loop of causes a
	-- foreign publisher made, ends the walk
	WITH RECURSIVE causes(depth, id, seen) AS (
		SELECT 0, $1, ARRAY[$1]
		UNION
		SELECT c.depth - 1, t.causation_id, c.seen || t.causation_id
		FROM causes c JOIN mqtx.message_trail t ON t.message_id = c.id
		WHERE t.causation_id IS NOT NULL AND t.causation_id <> ALL (c.seen)
	), effects(depth, id, seen) AS (
		SELECT 0, $1, ARRAY[$1]
		UNION
		SELECT e.depth + 1, t.message_id, e.seen || t.message_id
		FROM effects e JOIN mqtx.message_trail t ON t.causation_id = e.id
		WHERE t.message_id <> ALL (e.seen)
	), chain AS (
		SELECT DISTINCT ON (id) depth, id
		FROM (SELECT depth, id FROM causes UNION SELECT depth, id FROM effects) w
		ORDER BY id, abs(depth)
	)
	SELECT c.depth, t.direction, t.message_id, t.correlation_id, t.causation_id,
		   t.exchange, t.routing_key, t.queue, t.status, t.at
	FROM chain c JOIN mqtx.message_trail t ON t.message_id = c.id
	ORDER BY c.depth, t.at, t.direction DESC
$$;

COMMENT ON FUNCTION mqtx.message_chain(text) IS
	'A message''s chain as this database knows it: its causes (depth < 0), itself (0) and what it caused (depth > 0), sent and received';

REVOKE ALL ON mqtx.message_trail FROM PUBLIC;
REVOKE ALL ON FUNCTION mqtx.message_chain(text) FROM PUBLIC;
