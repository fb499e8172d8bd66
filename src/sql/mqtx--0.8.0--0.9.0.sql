/*
 * mqtx 0.8.0 -> 0.9.0: parallel apply.  A subscription names how many
 * apply workers apply its queue (mqtx.subscribe's workers, the column
 * mqtx.subscriptions.workers); with more than one, the consumer parks
 * every delivery of the queue in mqtx.parked, whose ordering_key may now
 * be NULL, and the apply workers apply them from there.  mqtx.held_keys
 * leaves out the keys merely on their way to the apply workers, and
 * mqtx.unsubscribe warns of the messages a queue leaves parked.
 *
 * The idempotency toolkit: idempotency keys (mqtx.idempotency_keys,
 * mqtx.claim_idempotency_key, mqtx.complete_idempotency_key), one-use
 * tokens (mqtx.tokens, mqtx.issue_token, mqtx.consume_token), business
 * key locks (mqtx.lock_key, mqtx.try_lock_key), mqtx.purge_expired, and
 * mqtx.grant_idempotency / mqtx.revoke_idempotency.
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
			MESSAGE = format(CASE WHEN parked = 1 THEN '%s message of queue %s stays in mqtx.parked'
							 ELSE '%s messages of queue %s stay in mqtx.parked' END,
							 parked, quote_literal(queue)),
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

--
-- The idempotency toolkit: what a service needs to apply a request once
-- however often it comes (README, "Idempotency").  Every object is the
-- application's: its rows are dumped, and mqtx.grant_idempotency lets a
-- role use them.  Times are the statement's, not the transaction's: a long
-- transaction must not see a token as valid after it expired.
--

-- Idempotency keys.  A request that may come twice (a client's retry, a
-- double submit) carries a key; its first claim does the work and stores
-- the result in the same transaction, and a later claim of the key gets
-- that result instead of doing the work again.  A claim made while the
-- first one's transaction is open waits for it, on the key's unique
-- index: its commit makes the result visible, its rollback hands the key
-- to the waiting claim.
CREATE TABLE mqtx.idempotency_keys (
	scope			text NOT NULL,
	key				text NOT NULL,
	request			jsonb,
	result			jsonb,
	claimed_at		timestamptz NOT NULL DEFAULT statement_timestamp(),
	completed_at	timestamptz,
	expires_at		timestamptz NOT NULL,
	PRIMARY KEY (scope, key)
);

CREATE INDEX idempotency_keys_expires_at_idx ON mqtx.idempotency_keys (expires_at);

COMMENT ON TABLE mqtx.idempotency_keys IS
	'Idempotency keys of incoming requests and their stored results (mqtx.claim_idempotency_key, mqtx.complete_idempotency_key)';
COMMENT ON COLUMN mqtx.idempotency_keys.scope IS
	'What the key belongs to (an endpoint, a client): keys of two scopes never meet';
COMMENT ON COLUMN mqtx.idempotency_keys.key IS
	'The key the request carries (an Idempotency-Key header)';
COMMENT ON COLUMN mqtx.idempotency_keys.request IS
	'What the first claim said the request was, or NULL: a later claim with another request is refused';
COMMENT ON COLUMN mqtx.idempotency_keys.result IS
	'The result the first request stored, which later claims get';
COMMENT ON COLUMN mqtx.idempotency_keys.claimed_at IS
	'When the key was claimed';
COMMENT ON COLUMN mqtx.idempotency_keys.completed_at IS
	'When the result was stored; NULL: the request that claimed it has not completed';
COMMENT ON COLUMN mqtx.idempotency_keys.expires_at IS
	'After this the key is forgotten, and a new claim of it does the work again';

SELECT pg_catalog.pg_extension_config_dump('mqtx.idempotency_keys', '');

CREATE FUNCTION mqtx.claim_idempotency_key(scope text, key text,
										   ttl interval DEFAULT '24 hours',
										   request jsonb DEFAULT NULL,
										   OUT claimed boolean, OUT result jsonb)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	found_key mqtx.idempotency_keys;
BEGIN
	IF scope IS NULL OR key IS NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
			MESSAGE = 'mqtx.claim_idempotency_key needs a scope and a key';
	END IF;
	IF ttl IS NULL OR ttl <= interval '0' THEN
		RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
			MESSAGE = format('ttl of mqtx.claim_idempotency_key must be positive, not %s',
							 coalesce(ttl::text, 'NULL')),
			HINT = 'Keep a key at least as long as a client may retry its request.';
	END IF;
	PERFORM mqtx.purge_some_expired();
	LOOP
		-- an expired key is free again
		DELETE FROM mqtx.idempotency_keys k
		 WHERE k.scope = claim_idempotency_key.scope AND k.key = claim_idempotency_key.key
		   AND k.expires_at <= statement_timestamp();
		-- waits for a claim of the key in a transaction still open
		INSERT INTO mqtx.idempotency_keys AS k (scope, key, request, expires_at)
		VALUES (claim_idempotency_key.scope, claim_idempotency_key.key,
				claim_idempotency_key.request, statement_timestamp() + ttl)
		ON CONFLICT DO NOTHING;
		IF FOUND THEN
			claimed := true;
			RETURN;
		END IF;
		SELECT * INTO found_key FROM mqtx.idempotency_keys k
		 WHERE k.scope = claim_idempotency_key.scope AND k.key = claim_idempotency_key.key;
		-- gone since (expired and taken away by another claim): again
		EXIT WHEN FOUND;
	END LOOP;
	IF found_key.request IS DISTINCT FROM request AND found_key.request IS NOT NULL
	   AND request IS NOT NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'unique_violation',
			MESSAGE = format('idempotency key %s of scope %s was used for another request',
							 quote_literal(key), quote_literal(scope)),
			DETAIL = format('It was claimed at %s for %s.', found_key.claimed_at, found_key.request),
			HINT = 'A client must send a new key with a new request.';
	END IF;
	IF found_key.completed_at IS NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'lock_not_available',
			MESSAGE = format('idempotency key %s of scope %s is claimed by a request that has not completed',
							 quote_literal(key), quote_literal(scope)),
			DETAIL = format('It was claimed at %s, in this transaction or in one that committed without storing a result.',
							found_key.claimed_at),
			HINT = 'Store the result with mqtx.complete_idempotency_key in the transaction that claims the key; until then the client should retry later.';
	END IF;
	claimed := false;
	result := found_key.result;
END
$$;

COMMENT ON FUNCTION mqtx.claim_idempotency_key(text, text, interval, jsonb) IS
	'Claim an idempotency key in the current transaction: claimed true, do the work and store its result (mqtx.complete_idempotency_key); false: the key was used, here is its stored result; waits while another transaction holds a claim of the key';

CREATE FUNCTION mqtx.complete_idempotency_key(scope text, key text, result jsonb)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	UPDATE mqtx.idempotency_keys k
	   SET result = complete_idempotency_key.result, completed_at = statement_timestamp()
	 WHERE k.scope = complete_idempotency_key.scope AND k.key = complete_idempotency_key.key
	   AND k.completed_at IS NULL;
	IF NOT FOUND THEN
		RAISE EXCEPTION USING ERRCODE = 'no_data_found',
			MESSAGE = format('idempotency key %s of scope %s is not claimed, or is completed already',
							 quote_literal(key), quote_literal(scope)),
			HINT = 'Claim it first with mqtx.claim_idempotency_key, in the same transaction.';
	END IF;
END
$$;

COMMENT ON FUNCTION mqtx.complete_idempotency_key(text, text, jsonb) IS
	'Store the result of the request that claimed an idempotency key: later claims of the key get it';

-- Tokens: the two-phase form of the same guarantee.  A client fetches a
-- token before it sends a request (a form, a payment page), and the
-- request consumes it: once only, whatever the retries.
CREATE TABLE mqtx.tokens (
	token			uuid PRIMARY KEY DEFAULT gen_random_uuid(),
	purpose			text NOT NULL,
	issued_at		timestamptz NOT NULL DEFAULT statement_timestamp(),
	expires_at		timestamptz NOT NULL,
	consumed_at		timestamptz
);

CREATE INDEX tokens_expires_at_idx ON mqtx.tokens (expires_at);

COMMENT ON TABLE mqtx.tokens IS
	'One-use tokens: issued before a request (mqtx.issue_token), consumed by it once (mqtx.consume_token)';
COMMENT ON COLUMN mqtx.tokens.token IS
	'The token, random';
COMMENT ON COLUMN mqtx.tokens.purpose IS
	'What it may be consumed for: a token of another purpose is refused';
COMMENT ON COLUMN mqtx.tokens.issued_at IS
	'When it was issued';
COMMENT ON COLUMN mqtx.tokens.expires_at IS
	'After this it can no longer be consumed, and it is removed';
COMMENT ON COLUMN mqtx.tokens.consumed_at IS
	'When it was consumed; NULL: not yet';

SELECT pg_catalog.pg_extension_config_dump('mqtx.tokens', '');

-- expired keys and tokens go: a few with each claim and issue, or all
CREATE FUNCTION mqtx.purge_expired(max_rows integer DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	keys bigint;
	tokens bigint;
BEGIN
	-- rows another transaction is removing are skipped, not waited for
	DELETE FROM mqtx.idempotency_keys k WHERE k.ctid = ANY (ARRAY(
		SELECT e.ctid FROM mqtx.idempotency_keys e WHERE e.expires_at <= statement_timestamp()
		 LIMIT max_rows FOR UPDATE SKIP LOCKED));
	GET DIAGNOSTICS keys = ROW_COUNT;
	DELETE FROM mqtx.tokens t WHERE t.ctid = ANY (ARRAY(
		SELECT e.ctid FROM mqtx.tokens e WHERE e.expires_at <= statement_timestamp()
		 LIMIT max_rows FOR UPDATE SKIP LOCKED));
	GET DIAGNOSTICS tokens = ROW_COUNT;
	RETURN keys + tokens;
END
$$;


CREATE FUNCTION mqtx.issue_token(purpose text, ttl interval DEFAULT '1 hour')
RETURNS uuid
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	issued uuid;
BEGIN
	IF purpose IS NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
			MESSAGE = 'mqtx.issue_token needs a purpose';
	END IF;
	IF ttl IS NULL OR ttl <= interval '0' THEN
		RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
			MESSAGE = format('ttl of mqtx.issue_token must be positive, not %s',
							 coalesce(ttl::text, 'NULL'));
	END IF;
	PERFORM mqtx.purge_some_expired();
	INSERT INTO mqtx.tokens (purpose, expires_at)
	VALUES (issue_token.purpose, statement_timestamp() + ttl)
	RETURNING token INTO issued;
	RETURN issued;
END
$$;

COMMENT ON FUNCTION mqtx.issue_token(text, interval) IS
	'Issue a one-use token for a purpose, valid for ttl';

CREATE FUNCTION mqtx.consume_token(token uuid, purpose text)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	known mqtx.tokens;
BEGIN
	-- a second use waits here for the first one's transaction
	UPDATE mqtx.tokens t SET consumed_at = statement_timestamp()
	 WHERE t.token = consume_token.token AND t.purpose = consume_token.purpose
	   AND t.consumed_at IS NULL AND t.expires_at > statement_timestamp();
	IF FOUND THEN
		RETURN;
	END IF;
	SELECT * INTO known FROM mqtx.tokens t WHERE t.token = consume_token.token;
	IF NOT FOUND THEN
		RAISE EXCEPTION USING ERRCODE = 'no_data_found',
			MESSAGE = format('mqtx token %s was not issued, or has expired and is gone',
							 coalesce(token::text, 'NULL'));
	ELSIF known.purpose IS DISTINCT FROM purpose THEN
		RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
			MESSAGE = format('mqtx token %s was issued for %s, not %s', token,
							 quote_literal(known.purpose), coalesce(quote_literal(purpose), 'NULL'));
	ELSIF known.consumed_at IS NOT NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'unique_violation',
			MESSAGE = format('mqtx token %s was consumed already', token),
			DETAIL = format('It was consumed at %s.', known.consumed_at),
			HINT = 'The request it was issued for was made: answer with its outcome, or issue a new token.';
	ELSE
		RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
			MESSAGE = format('mqtx token %s has expired', token),
			DETAIL = format('It expired at %s.', known.expires_at),
			HINT = 'Issue a new token.';
	END IF;
END
$$;

COMMENT ON FUNCTION mqtx.consume_token(uuid, text) IS
	'Consume a token in the current transaction, once: a second use, an expired token, one of another purpose or one never issued raise an error';

-- what each claim and issue removes on the way: a few rows, skipping
-- those a concurrent transaction holds, and nothing rather than an error
-- when a snapshot older than a concurrent removal (REPEATABLE READ) cannot
-- lock them
CREATE FUNCTION mqtx.purge_some_expired()
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	PERFORM mqtx.purge_expired(10);
EXCEPTION WHEN serialization_failure THEN
	NULL;
END
$$;

COMMENT ON FUNCTION mqtx.purge_some_expired() IS
	'Remove a few expired idempotency keys and tokens, as each claim and issue does';

COMMENT ON FUNCTION mqtx.purge_expired(integer) IS
	'Remove expired idempotency keys and tokens (at most max_rows of each; NULL: all); each claim and issue removes a few';

CREATE FUNCTION mqtx.lock_key(key text)
RETURNS void
AS 'MODULE_PATHNAME', 'mqtx_lock_key'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION mqtx.lock_key(text) IS
	'Lock a business key (an order number) until the end of the transaction, waiting for another transaction that holds it: an advisory lock of mqtx''s own on a stable 64-bit hash of the key';

CREATE FUNCTION mqtx.try_lock_key(key text)
RETURNS boolean
AS 'MODULE_PATHNAME', 'mqtx_try_lock_key'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION mqtx.try_lock_key(text) IS
	'Lock a business key until the end of the transaction if no other transaction holds it; false when one does';

-- The toolkit runs with the caller's rights: a role needs them on its two
-- tables, which these give and take back.
CREATE FUNCTION mqtx.grant_idempotency(role regrole)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF role IS NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
			MESSAGE = 'mqtx.grant_idempotency needs a role';
	END IF;
	EXECUTE format('GRANT USAGE ON SCHEMA mqtx TO %s', role);
	EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON mqtx.idempotency_keys, mqtx.tokens TO %s',
				   role);
	EXECUTE format('GRANT EXECUTE ON FUNCTION '
				   'mqtx.claim_idempotency_key(text, text, interval, jsonb), '
				   'mqtx.complete_idempotency_key(text, text, jsonb), '
				   'mqtx.issue_token(text, interval), mqtx.consume_token(uuid, text), '
				   'mqtx.purge_expired(integer), mqtx.purge_some_expired(), '
				   'mqtx.lock_key(text), mqtx.try_lock_key(text) TO %s',
				   role);
END
$$;

COMMENT ON FUNCTION mqtx.grant_idempotency(regrole) IS
	'Let a role use the idempotency toolkit in this database: idempotency keys, tokens and business key locks';

CREATE FUNCTION mqtx.revoke_idempotency(role regrole)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
	IF role IS NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
			MESSAGE = 'mqtx.revoke_idempotency needs a role';
	END IF;
	EXECUTE format('REVOKE SELECT, INSERT, UPDATE, DELETE ON mqtx.idempotency_keys, mqtx.tokens FROM %s',
				   role);
	EXECUTE format('REVOKE EXECUTE ON FUNCTION '
				   'mqtx.claim_idempotency_key(text, text, interval, jsonb), '
				   'mqtx.complete_idempotency_key(text, text, jsonb), '
				   'mqtx.issue_token(text, interval), mqtx.consume_token(uuid, text), '
				   'mqtx.purge_expired(integer), mqtx.purge_some_expired(), '
				   'mqtx.lock_key(text), mqtx.try_lock_key(text) FROM %s',
				   role);
END
$$;

COMMENT ON FUNCTION mqtx.revoke_idempotency(regrole) IS
	'Take back the idempotency toolkit from a role; its rows stay';

REVOKE ALL ON FUNCTION mqtx.claim_idempotency_key(text, text, interval, jsonb),
	mqtx.complete_idempotency_key(text, text, jsonb), mqtx.issue_token(text, interval),
	mqtx.consume_token(uuid, text), mqtx.purge_expired(integer), mqtx.purge_some_expired(),
	mqtx.lock_key(text),
	mqtx.try_lock_key(text), mqtx.grant_idempotency(regrole), mqtx.revoke_idempotency(regrole)
	FROM PUBLIC;
REVOKE ALL ON mqtx.idempotency_keys, mqtx.tokens FROM PUBLIC;
