/*
 * mqtx 0.7.0 -> 0.8.0: ordering keys and scheduled delivery.  The outbox
 * gains ordering_key and deliver_at; mqtx.publish takes them (its
 * signature changes: the old function goes, and whoever could run it can
 * run the new one); mqtx.cancel withdraws a message not yet sent;
 * mqtx.blocked_keys shows the keys held back, and mqtx.outbox_stats the
 * messages scheduled for later.  On the consumer's side, a key's later
 * messages wait in mqtx.parked while an earlier one is retried or
 * dead-lettered (mqtx.subscribe's after_dead_letter), and mqtx.held_keys
 * shows the keys held.
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
-- mqtx.publish gets three parameters with defaults, mqtx.subscribe one.
-- Added next to the old ones, the new functions would make every call of
-- the old ones ambiguous, so the old ones are dropped; the roles that
-- could run them can run the new ones (and mqtx.cancel, those that could
-- publish).  Objects that depend on an old function (an SQL function with
-- a BEGIN ATOMIC body, a view, a default that calls it) would stop the
-- DROP with a message about dependencies: they are named first, with
-- what to do.
--
DO $$
DECLARE
	dependents text;
BEGIN
	SELECT string_agg(pg_describe_object(d.classid, d.objid, d.objsubid), ', ')
	  INTO dependents
	  FROM pg_depend d
	 WHERE d.refclassid = 'pg_proc'::regclass AND d.deptype = 'n'
	   AND d.refobjid IN ('mqtx.publish(text, text, jsonb, jsonb)'::regprocedure,
						  'mqtx.subscribe(text, regprocedure, integer, integer, interval)'::regprocedure);
	IF dependents IS NOT NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'dependent_objects_still_exist',
			MESSAGE = 'cannot update mqtx to 0.8.0: objects depend on mqtx.publish or mqtx.subscribe',
			DETAIL = format('Depending on them: %s.', dependents),
			HINT = 'mqtx.publish and mqtx.subscribe get new parameters in 0.8.0, which replaces the functions. Drop these objects, update, and create them again: calls with the old arguments work unchanged.';
	END IF;
END
$$;

-- kept in a table of the script's own, gone at its end
CREATE TABLE mqtx.grants_before_0_8_0 AS
SELECT p.proname::text AS function,
	   CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END AS grantee,
	   CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END AS grant_option
  FROM pg_proc p, aclexplode(p.proacl) a
 WHERE p.oid IN ('mqtx.publish(text, text, jsonb, jsonb)'::regprocedure,
				 'mqtx.subscribe(text, regprocedure, integer, integer, interval)'::regprocedure)
   AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner;

DROP FUNCTION mqtx.publish(text, text, jsonb, jsonb);
DROP FUNCTION mqtx.subscribe(text, regprocedure, integer, integer, interval);

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

CREATE FUNCTION mqtx.subscribe(queue text, handler regprocedure,
							   prefetch integer DEFAULT 100,
							   max_attempts integer DEFAULT 5,
							   handler_timeout interval DEFAULT '30 seconds',
							   after_dead_letter text DEFAULT 'wait')
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF queue IS NULL OR handler IS NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
			MESSAGE = 'mqtx.subscribe needs a queue and a handler';
	END IF;
	IF after_dead_letter IS DISTINCT FROM 'wait' AND after_dead_letter IS DISTINCT FROM 'proceed' THEN
		RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
			MESSAGE = format('after_dead_letter of mqtx.subscribe must be wait or proceed, not %s',
							 coalesce(quote_literal(after_dead_letter), 'NULL')),
			HINT = 'wait: a key''s later messages wait while one of the key is dead-lettered; proceed: they go on.';
	END IF;
	IF NOT EXISTS (SELECT FROM mqtx.queues q WHERE q.name = subscribe.queue) THEN
		PERFORM mqtx.declare_queue(queue);
	END IF;
	-- the table's trigger checks the signature, and the caller's right to
	-- run the handler's owner's code
	INSERT INTO mqtx.subscriptions AS s (queue, handler, prefetch, max_attempts, handler_timeout,
										 after_dead_letter)
		VALUES (subscribe.queue, subscribe.handler, subscribe.prefetch, subscribe.max_attempts,
				subscribe.handler_timeout, subscribe.after_dead_letter)
	ON CONFLICT ON CONSTRAINT subscriptions_pkey DO UPDATE
		SET handler = excluded.handler, prefetch = excluded.prefetch,
			max_attempts = excluded.max_attempts, handler_timeout = excluded.handler_timeout,
			after_dead_letter = excluded.after_dead_letter;
END
$$;

COMMENT ON FUNCTION mqtx.subscribe(text, regprocedure, integer, integer, interval, text) IS
	'Apply the messages of a queue with handler(payload jsonb, headers jsonb), run as the handler''s owner; declares the queue if needed; after_dead_letter: wait or proceed';

REVOKE ALL ON FUNCTION mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval),
	mqtx.cancel(uuid), mqtx.subscribe(text, regprocedure, integer, integer, interval, text)
	FROM PUBLIC;

-- Privileges granted in an extension script are taken for the extension's
-- own (pg_init_privs), which pg_dump leaves out and CREATE EXTENSION would
-- not give back on restore: these grants are the database's, as
-- grant_publish or an administrator made them, so the initial privileges
-- are put back as the script left them before granting.
DO $$
DECLARE
	old record;
	functions oid[] := ARRAY['mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval)'::regprocedure,
							 'mqtx.cancel(uuid)'::regprocedure,
							 'mqtx.subscribe(text, regprocedure, integer, integer, interval, text)'::regprocedure];
	-- the three have the extension's owner, and the same initial rights
	initial aclitem[] := (SELECT i.initprivs FROM pg_init_privs i
						  WHERE i.classoid = 'pg_proc'::regclass AND i.objoid = functions[1]);
BEGIN
	FOR old IN SELECT function, grantee, grant_option FROM mqtx.grants_before_0_8_0 LOOP
		IF old.function = 'publish' THEN
			EXECUTE format('GRANT EXECUTE ON FUNCTION '
						   'mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval), '
						   'mqtx.cancel(uuid) TO %s%s', old.grantee, old.grant_option);
		ELSE
			EXECUTE format('GRANT EXECUTE ON FUNCTION '
						   'mqtx.subscribe(text, regprocedure, integer, integer, interval, text) TO %s%s',
						   old.grantee, old.grant_option);
		END IF;
	END LOOP;
	UPDATE pg_init_privs i SET initprivs = initial
	 WHERE i.classoid = 'pg_proc'::regclass AND i.objoid = ANY (functions);
END
$$;

DROP TABLE mqtx.grants_before_0_8_0;

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

--
-- The consumer's side of ordering keys: a subscription's after_dead_letter,
-- the dead letters' keys and places, the parked messages, mqtx.held_keys;
-- mqtx.subscribe takes after_dead_letter, and mqtx.redrive parks a keyed
-- letter at its place.
--
ALTER TABLE mqtx.subscriptions
	ADD COLUMN after_dead_letter text NOT NULL DEFAULT 'wait',
	ADD CONSTRAINT subscriptions_after_dead_letter_check
		CHECK (after_dead_letter IN ('wait', 'proceed'));
COMMENT ON COLUMN mqtx.subscriptions.after_dead_letter IS
	'What the later messages of an ordering key do once one of the key is dead-lettered: wait (parked, until an operator redrives or discards it) or proceed';

ALTER TABLE mqtx.dead_letter
	ADD COLUMN ordering_key text,
	ADD COLUMN parked_position bigint;
COMMENT ON COLUMN mqtx.dead_letter.ordering_key IS
	'The message''s ordering key (header x-mqtx-ordering-key), or NULL; under after_dead_letter = wait the key''s later messages are parked while the letter is here';
COMMENT ON COLUMN mqtx.dead_letter.parked_position IS
	'Its place among its key''s messages: mqtx.redrive puts it back into mqtx.parked there, ahead of the later ones';

-- Is a key held by a dead letter?  Asked for every message of a key.
CREATE INDEX dead_letter_ordering_key_idx ON mqtx.dead_letter (queue, ordering_key)
	WHERE ordering_key IS NOT NULL;

--
-- Parked messages: the later messages of an ordering key whose earlier one
-- is retried or dead-lettered, and a keyed message whose attempt failed.
-- They are acknowledged to the broker once parked (durably, here), so a
-- held key never fills the prefetch window, and the consumer applies them
-- from here, in their order, once nothing earlier of their key is held.
--
CREATE SEQUENCE mqtx.parked_position_seq;

CREATE TABLE mqtx.parked (
	position		bigint PRIMARY KEY DEFAULT nextval('mqtx.parked_position_seq'),
	queue			text NOT NULL,
	ordering_key	text NOT NULL,
	message_id		text NOT NULL,
	exchange		text,
	routing_key		text,
	headers			jsonb,
	body			bytea NOT NULL,
	parked_at		timestamptz NOT NULL DEFAULT now(),
	next_attempt_at timestamptz,
	CONSTRAINT parked_queue_message_id_key UNIQUE (queue, message_id)
);

CREATE INDEX parked_ordering_key_idx ON mqtx.parked (queue, ordering_key, position);

COMMENT ON TABLE mqtx.parked IS
	'Messages of ordering keys that wait for an earlier message of their key, or for their own next attempt; the consumer applies them from here, in order';
COMMENT ON COLUMN mqtx.parked.position IS
	'Their order: a key''s messages are applied by ascending position';
COMMENT ON COLUMN mqtx.parked.queue IS
	'The queue the message came from';
COMMENT ON COLUMN mqtx.parked.ordering_key IS
	'Its ordering key (header x-mqtx-ordering-key)';
COMMENT ON COLUMN mqtx.parked.message_id IS
	'The message''s dedupe key, as in mqtx.inbox';
COMMENT ON COLUMN mqtx.parked.exchange IS
	'The exchange the message was published to';
COMMENT ON COLUMN mqtx.parked.routing_key IS
	'The routing key the message was published with';
COMMENT ON COLUMN mqtx.parked.headers IS
	'The message''s AMQP headers, as a JSON object, or NULL for none';
COMMENT ON COLUMN mqtx.parked.body IS
	'The message''s body, as it was received';
COMMENT ON COLUMN mqtx.parked.parked_at IS
	'When it was parked';
COMMENT ON COLUMN mqtx.parked.next_attempt_at IS
	'When it is tried next, after an attempt failed; NULL: as soon as its key lets it';
COMMENT ON SEQUENCE mqtx.parked_position_seq IS
	'Positions of mqtx.parked rows, and of the dead letters of ordering keys';

-- acknowledged to the broker: the database holds the only copy
SELECT pg_catalog.pg_extension_config_dump('mqtx.parked', '');
SELECT pg_catalog.pg_extension_config_dump('mqtx.parked_position_seq', '');

-- The keys the consumer holds back, and why: a dead letter (under
-- after_dead_letter = wait), or a first message that waits for its retry.
CREATE VIEW mqtx.held_keys AS
WITH keys AS (
	SELECT p.queue, p.ordering_key FROM mqtx.parked p
	UNION
	SELECT d.queue, d.ordering_key
	FROM mqtx.dead_letter d JOIN mqtx.subscriptions s ON s.queue = d.queue
	WHERE d.ordering_key IS NOT NULL AND s.after_dead_letter = 'wait'
)
SELECT k.queue, k.ordering_key,
	   CASE WHEN l.id IS NOT NULL THEN 'dead letter'
			WHEN f.next_attempt_at > now() THEN 'retrying'
			ELSE 'applying'
	   END AS reason,
	   l.id AS dead_letter_id,
	   f.message_id AS first_parked_message_id,
	   f.next_attempt_at,
	   coalesce(n.parked, 0) AS parked,
	   n.parked_since
FROM keys k
	 LEFT JOIN LATERAL (
		SELECT d.id FROM mqtx.dead_letter d JOIN mqtx.subscriptions s ON s.queue = d.queue
		WHERE d.queue = k.queue AND d.ordering_key = k.ordering_key AND s.after_dead_letter = 'wait'
		ORDER BY d.parked_position LIMIT 1) l ON true
	 LEFT JOIN LATERAL (
		SELECT p.message_id, p.next_attempt_at FROM mqtx.parked p
		WHERE p.queue = k.queue AND p.ordering_key = k.ordering_key
		ORDER BY p.position LIMIT 1) f ON true
	 LEFT JOIN LATERAL (
		SELECT count(*) AS parked, min(p.parked_at) AS parked_since FROM mqtx.parked p
		WHERE p.queue = k.queue AND p.ordering_key = k.ordering_key) n ON true;

COMMENT ON VIEW mqtx.held_keys IS
	'Ordering keys whose messages the consumer holds back, why, and how many are parked';
COMMENT ON COLUMN mqtx.held_keys.queue IS
	'The queue';
COMMENT ON COLUMN mqtx.held_keys.ordering_key IS
	'The key';
COMMENT ON COLUMN mqtx.held_keys.reason IS
	'dead letter: a message of the key is dead-lettered (redrive or discard it); retrying: the first parked message waits for its next attempt; applying: the consumer is applying the parked messages';
COMMENT ON COLUMN mqtx.held_keys.dead_letter_id IS
	'The first dead letter that holds the key, or NULL';
COMMENT ON COLUMN mqtx.held_keys.first_parked_message_id IS
	'The key''s first parked message, or NULL';
COMMENT ON COLUMN mqtx.held_keys.next_attempt_at IS
	'When that message is tried next; NULL: as soon as the key lets it';
COMMENT ON COLUMN mqtx.held_keys.parked IS
	'How many of the key''s messages are parked';
COMMENT ON COLUMN mqtx.held_keys.parked_since IS
	'When the oldest of them was parked';

REVOKE ALL ON mqtx.parked, mqtx.parked_position_seq, mqtx.held_keys FROM PUBLIC;

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
								 routing_key, headers, body)
		VALUES (coalesce(letter.parked_position, nextval('mqtx.parked_position_seq')),
				letter.queue, letter.ordering_key, letter.message_id, letter.exchange,
				letter.routing_key, letter.headers, letter.body);
		RETURN NULL;
	END IF;
	-- through the outbox, so it takes the whole way again
	RETURN mqtx.publish('', letter.queue, letter.body_json,
						coalesce(letter.headers, '{}')
						|| jsonb_build_object('x-mqtx-redriven-from', letter.message_id));
END
$$;

COMMENT ON FUNCTION mqtx.redrive(bigint) IS
	'Send a dead letter to its queue again, through the outbox, under its original identity, and return the new AMQP message id; one of an ordering key goes back into mqtx.parked at its place (returns NULL)';

CREATE OR REPLACE FUNCTION mqtx.redrive_all(queue text)
RETURNS integer
LANGUAGE sql
BEGIN ATOMIC
	-- count(*): a keyed letter's redrive returns NULL
	SELECT count(*)::integer
	FROM (SELECT mqtx.redrive(d.id)
		  FROM mqtx.dead_letter d
		  WHERE d.queue = redrive_all.queue AND d.body_json IS NOT NULL
		  ORDER BY d.id) r;
END;
