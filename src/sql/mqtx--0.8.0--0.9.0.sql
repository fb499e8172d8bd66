/*
 * mqtx 0.8.0 -> 0.9.0: parallel apply.  A subscription names how many
 * apply workers apply its queue (mqtx.subscribe's workers, the column
 * mqtx.subscriptions.workers); with more than one, the consumer parks
 * every delivery of the queue in mqtx.parked, whose ordering_key may now
 * be NULL, and the apply workers apply them from there.  mqtx.held_keys
 * leaves out the keys merely on their way to the apply workers, and
 * mqtx.unsubscribe warns of the messages a queue leaves parked.
 */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION mqtx UPDATE TO '0.9.0'" to load this file. \quit

ALTER TABLE mqtx.subscriptions
	ADD COLUMN workers integer NOT NULL DEFAULT 1,
	ADD CONSTRAINT subscriptions_workers_check CHECK (workers BETWEEN 1 AND 64);
COMMENT ON COLUMN mqtx.subscriptions.workers IS
	'How many apply workers apply the queue''s messages: one key''s messages always by the same worker, in order; more than 1: the consumer parks every delivery and the workers apply them from mqtx.parked';

ALTER TABLE mqtx.parked ALTER COLUMN ordering_key DROP NOT NULL;

-- the parked messages of a queue unsubscribed stay: mqtx.unsubscribe says so
CREATE OR REPLACE FUNCTION mqtx.unsubscribe(queue text)
RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	parked bigint;
BEGIN
	DELETE FROM mqtx.subscriptions s WHERE s.queue = unsubscribe.queue;
	IF NOT FOUND THEN
		RETURN false;
	END IF;
	-- acknowledged already: say that they stay, and where
	SELECT count(*) INTO parked FROM mqtx.parked p WHERE p.queue = unsubscribe.queue;
	IF parked > 0 THEN
		RAISE WARNING USING
			MESSAGE = format('%s messages of queue %s stay in mqtx.parked', parked, quote_literal(queue)),
			DETAIL = 'They were acknowledged to the broker when they were parked: the database holds the only copy.',
			HINT = 'They are applied when the queue is subscribed again; delete them from mqtx.parked to drop them.';
	END IF;
	RETURN true;
END
$$;

COMMENT ON FUNCTION mqtx.unsubscribe(text) IS
	'Stop consuming a queue; its messages stay on the broker, and those parked stay in mqtx.parked (a warning says how many)';

COMMENT ON TABLE mqtx.parked IS
	'Messages of ordering keys that wait for an earlier message of their key, or for their own next attempt, and the messages of queues applied by several workers; the consumer and its apply workers apply them from here, a key''s in order';
COMMENT ON COLUMN mqtx.parked.ordering_key IS
	'Its ordering key (header x-mqtx-ordering-key), or NULL for a message without one, parked for an apply worker';

-- a message without a key, parked for an apply worker, holds no key, nor
-- does a key on its way to the apply workers
CREATE OR REPLACE VIEW mqtx.held_keys AS
WITH keys AS (
	SELECT p.queue, p.ordering_key FROM mqtx.parked p WHERE p.ordering_key IS NOT NULL
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
		WHERE p.queue = k.queue AND p.ordering_key = k.ordering_key) n ON true
	 LEFT JOIN mqtx.subscriptions s ON s.queue = k.queue
-- a key of a queue with apply workers is parked on its way to them: held
-- only by a dead letter or a retry
WHERE l.id IS NOT NULL OR f.next_attempt_at > now() OR coalesce(s.workers, 1) = 1;

--
-- mqtx.subscribe gets the parameter workers.  Added next to the old one,
-- the new function would make every call of the old one ambiguous, so
-- the old one is dropped, and the roles that could run it can run the
-- new one.  Objects that depend on the old function are named first,
-- with what to do.
--
DO $$
DECLARE
	dependents text;
BEGIN
	SELECT string_agg(pg_describe_object(d.classid, d.objid, d.objsubid), ', ')
	  INTO dependents
	  FROM pg_depend d
	 WHERE d.refclassid = 'pg_proc'::regclass AND d.deptype = 'n'
	   AND d.refobjid = 'mqtx.subscribe(text, regprocedure, integer, integer, interval, text)'::regprocedure;
	IF dependents IS NOT NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'dependent_objects_still_exist',
			MESSAGE = 'cannot update mqtx to 0.9.0: objects depend on mqtx.subscribe',
			DETAIL = format('Depending on it: %s.', dependents),
			HINT = 'mqtx.subscribe gets a new parameter in 0.9.0, which replaces the function. Drop these objects, update, and create them again: calls with the old arguments work unchanged.';
	END IF;
END
$$;

-- kept in a table of the script's own, gone at its end
CREATE TABLE mqtx.grants_before_0_9_0 AS
SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END AS grantee,
	   CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END AS grant_option
  FROM pg_proc p, aclexplode(p.proacl) a
 WHERE p.oid = 'mqtx.subscribe(text, regprocedure, integer, integer, interval, text)'::regprocedure
   AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner;

DROP FUNCTION mqtx.subscribe(text, regprocedure, integer, integer, interval, text);

CREATE FUNCTION mqtx.subscribe(queue text, handler regprocedure,
							   prefetch integer DEFAULT 100,
							   max_attempts integer DEFAULT 5,
							   handler_timeout interval DEFAULT '30 seconds',
							   after_dead_letter text DEFAULT 'wait',
							   workers integer DEFAULT 1)
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
	IF workers IS NULL OR workers NOT BETWEEN 1 AND 64 THEN
		RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
			MESSAGE = format('workers of mqtx.subscribe must be between 1 and 64, not %s',
							 coalesce(workers::text, 'NULL')),
			HINT = 'Each apply worker is a background worker process: max_worker_processes must leave room for them.';
	END IF;
	IF NOT EXISTS (SELECT FROM mqtx.queues q WHERE q.name = subscribe.queue) THEN
		PERFORM mqtx.declare_queue(queue);
	END IF;
	-- the table's trigger checks the signature, and the caller's right to
	-- run the handler's owner's code
	INSERT INTO mqtx.subscriptions AS s (queue, handler, prefetch, max_attempts, handler_timeout,
										 after_dead_letter, workers)
		VALUES (subscribe.queue, subscribe.handler, subscribe.prefetch, subscribe.max_attempts,
				subscribe.handler_timeout, subscribe.after_dead_letter, subscribe.workers)
	ON CONFLICT ON CONSTRAINT subscriptions_pkey DO UPDATE
		SET handler = excluded.handler, prefetch = excluded.prefetch,
			max_attempts = excluded.max_attempts, handler_timeout = excluded.handler_timeout,
			after_dead_letter = excluded.after_dead_letter, workers = excluded.workers;
END
$$;

COMMENT ON FUNCTION mqtx.subscribe(text, regprocedure, integer, integer, interval, text, integer) IS
	'Apply the messages of a queue with handler(payload jsonb, headers jsonb), run as the handler''s owner; declares the queue if needed; after_dead_letter: wait or proceed; workers: how many processes apply it, a key''s messages in order';

REVOKE ALL ON FUNCTION mqtx.subscribe(text, regprocedure, integer, integer, interval, text, integer)
	FROM PUBLIC;

-- as in the update to 0.8.0: the grants are the database's, not the
-- extension's, so its initial privileges are put back as the script left
-- them before granting (pg_dump dumps them then)
DO $$
DECLARE
	old record;
	subscribe oid := 'mqtx.subscribe(text, regprocedure, integer, integer, interval, text, integer)'::regprocedure;
	initial aclitem[] := (SELECT i.initprivs FROM pg_init_privs i
						  WHERE i.classoid = 'pg_proc'::regclass AND i.objoid = subscribe);
BEGIN
	FOR old IN SELECT grantee, grant_option FROM mqtx.grants_before_0_9_0 LOOP
		EXECUTE format('GRANT EXECUTE ON FUNCTION '
					   'mqtx.subscribe(text, regprocedure, integer, integer, interval, text, integer) TO %s%s',
					   old.grantee, old.grant_option);
	END LOOP;
	UPDATE pg_init_privs i SET initprivs = initial
	 WHERE i.classoid = 'pg_proc'::regclass AND i.objoid = subscribe;
END
$$;

DROP TABLE mqtx.grants_before_0_9_0;
