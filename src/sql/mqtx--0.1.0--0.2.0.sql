/* mqtx--0.1.0--0.2.0.sql: least privilege */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION mqtx UPDATE TO '0.2.0'" to load this file. \quit

--
-- Publishing rights are per database.  0.1.0 granted them to the role
-- mqtx_publisher, which is cluster-wide: a member granted it for one
-- database could enqueue in every other database with mqtx, and a role of
-- that name made by someone else was adopted.  From 0.2.0 nothing is
-- granted to a shared role; mqtx.grant_publish(role) grants in the
-- database it runs in.  The upgrade takes away what mqtx_publisher had
-- here and names the members who publish no more, rather than re-granting
-- to them: whether each of them should publish in this database is
-- exactly the question 0.1.0 never asked.  The role itself is left; it
-- may still serve databases not yet upgraded.
--
DO $$
DECLARE
	members text;
BEGIN
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'mqtx_publisher') THEN
		RETURN;
	END IF;
	REVOKE ALL ON FUNCTION mqtx.publish(text, text, jsonb, jsonb) FROM mqtx_publisher;
	REVOKE ALL ON FUNCTION mqtx.outbox_trigger() FROM mqtx_publisher;
	REVOKE ALL ON SCHEMA mqtx FROM mqtx_publisher;

	SELECT pg_catalog.string_agg(pg_catalog.quote_ident(r.rolname), ', ' ORDER BY r.rolname)
	  INTO members
	  FROM pg_catalog.pg_auth_members m
	  JOIN pg_catalog.pg_roles r ON r.oid = m.member
	 WHERE m.roleid = 'mqtx_publisher'::pg_catalog.regrole;
	IF members IS NOT NULL THEN
		RAISE WARNING USING
			MESSAGE = pg_catalog.format('mqtx: members of mqtx_publisher can no longer call mqtx.publish or create outbox triggers in database %I: %s',
										pg_catalog.current_database(), members),
			DETAIL = 'Publishing rights are granted per database since mqtx 0.2.0; mqtx_publisher is cluster-wide and grants nothing any more. Outbox triggers created earlier keep enqueueing.',
			HINT = 'For each role that publishes in this database, run SELECT mqtx.grant_publish(''role'') here.';
	END IF;
END
$$;

CREATE FUNCTION mqtx.grant_publish(role regrole)
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
	EXECUTE format('GRANT EXECUTE ON FUNCTION mqtx.publish(text, text, jsonb, jsonb), '
				   'mqtx.outbox_trigger() TO %s', role);
END
$$;

COMMENT ON FUNCTION mqtx.grant_publish(regrole) IS
	'Let a role enqueue messages in this database (mqtx.publish and mqtx.outbox_trigger)';

CREATE FUNCTION mqtx.revoke_publish(role regrole)
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
	EXECUTE format('REVOKE EXECUTE ON FUNCTION mqtx.publish(text, text, jsonb, jsonb), '
				   'mqtx.outbox_trigger() FROM %s', role);
END
$$;

COMMENT ON FUNCTION mqtx.revoke_publish(regrole) IS
	'Take back the right to call mqtx.publish and to create outbox triggers in this database; existing triggers keep enqueueing';

REVOKE ALL ON FUNCTION mqtx.grant_publish(regrole), mqtx.revoke_publish(regrole) FROM PUBLIC;

--
-- Subscriptions.  The consumer runs a handler as the handler function's
-- owner, so writing a subscription means "run this role's function on
-- every message of the queue".  Whoever writes one must therefore hold
-- that role's privileges already (be it, be a member of it, or be a
-- superuser); the check is on the table, so it holds for direct writes
-- too, and so does the signature check that mqtx.subscribe made alone.
--
CREATE FUNCTION mqtx.check_subscription()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	fn pg_proc%ROWTYPE;
BEGIN
	SELECT * INTO fn FROM pg_proc WHERE oid = NEW.handler;
	IF NOT FOUND THEN
		RAISE EXCEPTION USING ERRCODE = 'undefined_function',
			MESSAGE = format('mqtx handler function %s does not exist', NEW.handler::oid);
	END IF;
	IF fn.pronargs <> 2 OR fn.proargtypes[0] <> 'jsonb'::regtype
	   OR fn.proargtypes[1] <> 'jsonb'::regtype OR fn.prorettype <> 'void'::regtype
	   OR fn.proretset OR fn.prokind <> 'f' THEN
		RAISE EXCEPTION USING ERRCODE = 'invalid_function_definition',
			MESSAGE = format('mqtx handler %s has the wrong signature', NEW.handler),
			DETAIL = format('It takes (%s) and returns %s%s.',
							pg_get_function_identity_arguments(NEW.handler),
							CASE WHEN fn.proretset THEN 'SETOF ' ELSE '' END,
							fn.prorettype::regtype),
			HINT = 'A handler is a function (payload jsonb, headers jsonb) RETURNS void.';
	END IF;
	IF NOT pg_has_role(fn.proowner, 'USAGE') THEN
		RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
			MESSAGE = format('permission denied to subscribe handler %s', NEW.handler),
			DETAIL = format('The consumer runs a handler as its owner, %s; role %s does not have the privileges of that role.',
							fn.proowner::regrole, quote_ident(current_user)),
			HINT = 'Subscribe a function you own, or have its owner subscribe it.';
	END IF;
	RETURN NEW;
END
$$;

CREATE TRIGGER subscriptions_check BEFORE INSERT OR UPDATE OF handler
	ON mqtx.subscriptions FOR EACH ROW EXECUTE FUNCTION mqtx.check_subscription();

REVOKE ALL ON FUNCTION mqtx.check_subscription() FROM PUBLIC;

--
-- The consumer (poison-proof, exactly one outcome per message).
--

-- A handler's call is bounded; mqtx.subscribe takes the bound.
ALTER TABLE mqtx.subscriptions
	ADD COLUMN handler_timeout interval NOT NULL DEFAULT '30 seconds',
	ADD CONSTRAINT subscriptions_handler_timeout_check
		CHECK (handler_timeout BETWEEN '1 millisecond' AND '1 day');

COMMENT ON COLUMN mqtx.subscriptions.handler_timeout IS
	'How long one call of the handler may run; one that takes longer fails like any handler error';

DROP FUNCTION mqtx.subscribe(text, regprocedure, integer, integer);

CREATE FUNCTION mqtx.subscribe(queue text, handler regprocedure,
							   prefetch integer DEFAULT 100,
							   max_attempts integer DEFAULT 5,
							   handler_timeout interval DEFAULT '30 seconds')
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF queue IS NULL OR handler IS NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
			MESSAGE = 'mqtx.subscribe needs a queue and a handler';
	END IF;
	IF NOT EXISTS (SELECT FROM mqtx.queues q WHERE q.name = subscribe.queue) THEN
		PERFORM mqtx.declare_queue(queue);
	END IF;
	-- the table's trigger checks the signature, and the caller's right to
	-- run the handler's owner's code
	INSERT INTO mqtx.subscriptions AS s (queue, handler, prefetch, max_attempts, handler_timeout)
		VALUES (subscribe.queue, subscribe.handler, subscribe.prefetch, subscribe.max_attempts,
				subscribe.handler_timeout)
	ON CONFLICT ON CONSTRAINT subscriptions_pkey DO UPDATE
		SET handler = excluded.handler, prefetch = excluded.prefetch,
			max_attempts = excluded.max_attempts, handler_timeout = excluded.handler_timeout;
END
$$;

COMMENT ON FUNCTION mqtx.subscribe(text, regprocedure, integer, integer, interval) IS
	'Apply the messages of a queue with handler(payload jsonb, headers jsonb), run as the handler''s owner; declares the queue if needed';

REVOKE ALL ON FUNCTION mqtx.subscribe(text, regprocedure, integer, integer, interval) FROM PUBLIC;

-- One dead letter per message and queue: 0.1.0 wrote one per copy, so
-- the copies beyond the first (the same message, by its dedupe key) go;
-- and so do the letters of messages that a later copy applied (their
-- inbox row says so), which a redrive would apply a second time.
DO $$
DECLARE
	copies bigint;
	applied bigint;
BEGIN
	DELETE FROM mqtx.dead_letter d
	 USING mqtx.dead_letter first
	 WHERE first.queue = d.queue AND first.message_id = d.message_id AND first.id < d.id;
	GET DIAGNOSTICS copies = ROW_COUNT;
	DELETE FROM mqtx.dead_letter d
	 USING mqtx.inbox i
	 WHERE i.queue = d.queue AND i.message_id = d.message_id;
	GET DIAGNOSTICS applied = ROW_COUNT;
	-- a NOTICE would not be seen: extension scripts run with
	-- client_min_messages at WARNING or above
	IF copies > 0 OR applied > 0 THEN
		RAISE WARNING USING
			MESSAGE = pg_catalog.format('mqtx: removed %s dead letters: %s further copies of a message dead-lettered on the same queue, %s of messages applied since',
										copies + applied, copies, applied),
			DETAIL = 'A message has at most one dead letter per queue since mqtx 0.2.0, and none once it is applied.';
	END IF;
END
$$;

DROP INDEX mqtx.dead_letter_queue_idx;
ALTER TABLE mqtx.dead_letter
	ADD CONSTRAINT dead_letter_queue_message_id_key UNIQUE (queue, message_id);

-- A dead-lettered message is in the inbox, so its later copies are
-- duplicates; mqtx.redrive takes the row out again.
INSERT INTO mqtx.inbox (queue, message_id)
	SELECT DISTINCT queue, message_id FROM mqtx.dead_letter
	ON CONFLICT DO NOTHING;

COMMENT ON TABLE mqtx.inbox IS
	'Messages applied or dead-lettered, by queue and message_id (or sha256:<hex> of the body when a message has no message_id)';

-- Attempts of messages applied since (0.1.0 kept them).
DELETE FROM mqtx.consumer_attempts a
 USING mqtx.inbox i
 WHERE i.queue = a.queue AND i.message_id = a.message_id;

-- What was applied is the application's state as much as what it did:
-- restored without it, every redelivery would be applied again.
SELECT pg_catalog.pg_extension_config_dump('mqtx.inbox', '');
SELECT pg_catalog.pg_extension_config_dump('mqtx.consumer_attempts', '');

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
			MESSAGE = format('mqtx dead letter %s cannot be redriven: its body is not JSON', id),
			HINT = 'Inspect body and body_text, then remove it with mqtx.discard().';
	END IF;
	-- The message keeps its identity: the consumer dedupes it on the
	-- original id carried in the header, and its inbox row, written when
	-- it was dead-lettered, goes, so that exactly one copy is applied.
	DELETE FROM mqtx.inbox i
	 WHERE i.queue = letter.queue AND i.message_id = letter.message_id;
	-- through the outbox, so it takes the whole way again
	RETURN mqtx.publish('', letter.queue, letter.body_json,
						coalesce(letter.headers, '{}')
						|| jsonb_build_object('x-mqtx-redriven-from', letter.message_id));
END
$$;

COMMENT ON FUNCTION mqtx.redrive(bigint) IS
	'Send a dead letter to its queue again, through the outbox, under its original identity; returns the new AMQP message id';
