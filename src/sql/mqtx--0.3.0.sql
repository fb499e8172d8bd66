/* mqtx--0.3.0.sql: transactional outbox for RabbitMQ */

-- complain if script is sourced in psql, rather than via CREATE EXTENSION
\echo Use "CREATE EXTENSION mqtx" to load this file. \quit

--
-- The outbox: one row per message, written in the sender's transaction and
-- relayed to RabbitMQ by the relay worker.
--
CREATE TABLE mqtx.outbox (
	id				bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	message_id		uuid NOT NULL DEFAULT gen_random_uuid(),
	exchange		text NOT NULL,
	routing_key		text NOT NULL,
	payload			jsonb NOT NULL,
	headers			jsonb,
	status			text NOT NULL DEFAULT 'pending',
	attempts		integer NOT NULL DEFAULT 0,
	next_attempt_at timestamptz NOT NULL DEFAULT now(),
	last_error		text,
	created_at		timestamptz NOT NULL DEFAULT now(),
	published_at	timestamptz,
	CONSTRAINT outbox_message_id_key UNIQUE (message_id),
	CONSTRAINT outbox_status_check
		CHECK (status IN ('pending', 'published', 'failed')),
	CONSTRAINT outbox_published_at_check
		CHECK ((status = 'published') = (published_at IS NOT NULL)),
	CONSTRAINT outbox_attempts_check CHECK (attempts >= 0),
	CONSTRAINT outbox_exchange_check CHECK (octet_length(exchange) <= 255),
	CONSTRAINT outbox_routing_key_check CHECK (octet_length(routing_key) <= 255),
	CONSTRAINT outbox_headers_check
		CHECK (headers IS NULL OR jsonb_typeof(headers) = 'object')
);

COMMENT ON TABLE mqtx.outbox IS
	'Messages waiting to be published to RabbitMQ, and their delivery status';
COMMENT ON COLUMN mqtx.outbox.status IS
	'pending: waiting for (re)delivery; published: confirmed by the broker; failed: gave up after mqtx.max_attempts';
COMMENT ON COLUMN mqtx.outbox.next_attempt_at IS
	'When a pending message is next due for publishing';

-- The relay claims due pending rows oldest first; published rows leave
-- this index, so it stays as small as the backlog however large the
-- history grows.
CREATE INDEX outbox_due_idx ON mqtx.outbox (next_attempt_at, id)
	WHERE status = 'pending';

-- Undelivered messages are part of the application's state: keep them in
-- pg_dump output (published ones are history, not state).
SELECT pg_catalog.pg_extension_config_dump('mqtx.outbox', $$WHERE status <> 'published'$$);
SELECT pg_catalog.pg_extension_config_dump(
	pg_catalog.pg_get_serial_sequence('mqtx.outbox', 'id'), '');

--
-- Enqueueing.  Both functions validate the message and insert it as the
-- outbox's owner; callers need EXECUTE, not privileges on the table.
--
CREATE FUNCTION mqtx.publish(exchange text, routing_key text, payload jsonb,
							 headers jsonb DEFAULT NULL)
RETURNS uuid
AS 'MODULE_PATHNAME', 'mqtx_publish'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION mqtx.publish(text, text, jsonb, jsonb) IS
	'Enqueue a message in the current transaction; returns its message id';

CREATE FUNCTION mqtx.outbox_trigger()
RETURNS trigger
AS 'MODULE_PATHNAME', 'mqtx_outbox_trigger'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION mqtx.outbox_trigger() IS
	'AFTER INSERT FOR EACH ROW trigger: enqueue the new row as JSON; arguments are the exchange and the routing key';

--
-- Topology: what the workers declare on the broker (idempotently) each time
-- they connect, so that a fresh broker is usable at once.  Any change is
-- declared again as soon as it commits.
--
CREATE TABLE mqtx.exchanges (
	name	text PRIMARY KEY,
	type	text NOT NULL DEFAULT 'direct',
	durable boolean NOT NULL DEFAULT true,
	CONSTRAINT exchanges_name_check CHECK (octet_length(name) BETWEEN 1 AND 255),
	CONSTRAINT exchanges_name_reserved_check CHECK (name NOT LIKE 'amq.%'),
	CONSTRAINT exchanges_type_check CHECK (type <> '')
);

CREATE TABLE mqtx.queues (
	name		text PRIMARY KEY,
	durable		boolean NOT NULL DEFAULT true,
	arguments	jsonb,
	CONSTRAINT queues_name_check CHECK (octet_length(name) BETWEEN 1 AND 255),
	CONSTRAINT queues_name_reserved_check CHECK (name NOT LIKE 'amq.%'),
	CONSTRAINT queues_arguments_check
		CHECK (arguments IS NULL OR jsonb_typeof(arguments) = 'object')
);

CREATE TABLE mqtx.bindings (
	queue		text NOT NULL REFERENCES mqtx.queues ON DELETE CASCADE,
	exchange	text NOT NULL REFERENCES mqtx.exchanges ON DELETE CASCADE,
	routing_key text NOT NULL DEFAULT '',
	PRIMARY KEY (queue, exchange, routing_key),
	CONSTRAINT bindings_routing_key_check CHECK (octet_length(routing_key) <= 255)
);

SELECT pg_catalog.pg_extension_config_dump('mqtx.exchanges', '');
SELECT pg_catalog.pg_extension_config_dump('mqtx.queues', '');
SELECT pg_catalog.pg_extension_config_dump('mqtx.bindings', '');

CREATE FUNCTION mqtx.topology_trigger()
RETURNS trigger
AS 'MODULE_PATHNAME', 'mqtx_topology_trigger'
LANGUAGE C;

CREATE TRIGGER exchanges_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
	ON mqtx.exchanges FOR EACH STATEMENT EXECUTE FUNCTION mqtx.topology_trigger();
CREATE TRIGGER queues_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
	ON mqtx.queues FOR EACH STATEMENT EXECUTE FUNCTION mqtx.topology_trigger();
CREATE TRIGGER bindings_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
	ON mqtx.bindings FOR EACH STATEMENT EXECUTE FUNCTION mqtx.topology_trigger();

CREATE FUNCTION mqtx.declare_exchange(name text, type text DEFAULT 'direct',
									  durable boolean DEFAULT true)
RETURNS void
LANGUAGE sql
BEGIN ATOMIC
	INSERT INTO mqtx.exchanges (name, type, durable)
		VALUES (declare_exchange.name, declare_exchange.type, declare_exchange.durable)
	ON CONFLICT ON CONSTRAINT exchanges_pkey
		DO UPDATE SET type = excluded.type, durable = excluded.durable;
END;

COMMENT ON FUNCTION mqtx.declare_exchange(text, text, boolean) IS
	'Record an exchange for the workers to declare on the broker';

CREATE FUNCTION mqtx.declare_queue(name text, durable boolean DEFAULT true,
								   arguments jsonb DEFAULT NULL)
RETURNS void
LANGUAGE sql
BEGIN ATOMIC
	INSERT INTO mqtx.queues (name, durable, arguments)
		VALUES (declare_queue.name, declare_queue.durable, declare_queue.arguments)
	ON CONFLICT ON CONSTRAINT queues_pkey
		DO UPDATE SET durable = excluded.durable, arguments = excluded.arguments;
END;

COMMENT ON FUNCTION mqtx.declare_queue(text, boolean, jsonb) IS
	'Record a queue (with optional x-arguments) for the workers to declare on the broker';

CREATE FUNCTION mqtx.bind(queue text, exchange text, routing_key text DEFAULT '')
RETURNS void
LANGUAGE sql
BEGIN ATOMIC
	INSERT INTO mqtx.bindings (queue, exchange, routing_key)
		VALUES (bind.queue, bind.exchange, bind.routing_key)
	ON CONFLICT DO NOTHING;
END;

COMMENT ON FUNCTION mqtx.bind(text, text, text) IS
	'Record a binding of a declared queue to a declared exchange';

--
-- Consuming: subscriptions, the inbox (dedupe record), failed attempts and
-- dead letters.  The consumer worker applies every subscribed queue.
--
CREATE TABLE mqtx.subscriptions (
	queue			text PRIMARY KEY,
	handler			regprocedure NOT NULL,
	prefetch		integer NOT NULL DEFAULT 100,
	max_attempts	integer NOT NULL DEFAULT 5,
	created_at		timestamptz NOT NULL DEFAULT now(),
	handler_timeout interval NOT NULL DEFAULT '30 seconds',
	CONSTRAINT subscriptions_prefetch_check CHECK (prefetch BETWEEN 1 AND 65535),
	CONSTRAINT subscriptions_max_attempts_check CHECK (max_attempts BETWEEN 1 AND 1000),
	CONSTRAINT subscriptions_handler_timeout_check
		CHECK (handler_timeout BETWEEN '1 millisecond' AND '1 day')
);

COMMENT ON COLUMN mqtx.subscriptions.handler_timeout IS
	'How long one call of the handler may run; one that takes longer fails like any handler error';

SELECT pg_catalog.pg_extension_config_dump('mqtx.subscriptions', '');

CREATE TRIGGER subscriptions_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
	ON mqtx.subscriptions FOR EACH STATEMENT EXECUTE FUNCTION mqtx.topology_trigger();

-- One row per applied message, written in the transaction that applied it:
-- a redelivery finds its row and is acknowledged without being applied.
CREATE TABLE mqtx.inbox (
	queue		text NOT NULL,
	message_id	text NOT NULL,
	applied_at	timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (queue, message_id)
);

CREATE INDEX inbox_applied_at_idx ON mqtx.inbox (applied_at);

COMMENT ON TABLE mqtx.inbox IS
	'Messages applied or dead-lettered, by queue and message_id (or sha256:<hex> of the body when a message has no message_id)';

-- What was applied is the application's state as much as what it did:
-- restored without it, every redelivery would be applied again.
SELECT pg_catalog.pg_extension_config_dump('mqtx.inbox', '');

CREATE TABLE mqtx.consumer_attempts (
	queue			text NOT NULL,
	message_id		text NOT NULL,
	attempts		integer NOT NULL,
	last_error		text,
	first_failed_at timestamptz NOT NULL DEFAULT now(),
	last_failed_at	timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (queue, message_id)
);

COMMENT ON TABLE mqtx.consumer_attempts IS
	'Failed attempts of messages not yet applied nor dead-lettered';

SELECT pg_catalog.pg_extension_config_dump('mqtx.consumer_attempts', '');

CREATE TABLE mqtx.dead_letter (
	id				bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	queue			text NOT NULL,
	message_id		text NOT NULL,
	exchange		text,
	routing_key		text,
	headers			jsonb,
	body			bytea NOT NULL,
	body_text		text,
	body_json		jsonb,
	error_message	text NOT NULL,
	error_detail	text,
	error_context	text,
	attempts		integer NOT NULL,
	first_failed_at timestamptz NOT NULL,
	last_failed_at	timestamptz NOT NULL,
	-- one dead letter per message and queue, however many copies came
	CONSTRAINT dead_letter_queue_message_id_key UNIQUE (queue, message_id)
);

COMMENT ON TABLE mqtx.dead_letter IS
	'Messages the consumer could not apply, with the reason; redrive or discard them';

SELECT pg_catalog.pg_extension_config_dump('mqtx.dead_letter', '');
SELECT pg_catalog.pg_extension_config_dump(
	pg_catalog.pg_get_serial_sequence('mqtx.dead_letter', 'id'), '');

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

CREATE FUNCTION mqtx.unsubscribe(queue text)
RETURNS boolean
LANGUAGE sql
BEGIN ATOMIC
	WITH gone AS (
		DELETE FROM mqtx.subscriptions s WHERE s.queue = unsubscribe.queue RETURNING 1
	)
	SELECT count(*) > 0 FROM gone;
END;

COMMENT ON FUNCTION mqtx.unsubscribe(text) IS
	'Stop consuming a queue; its messages stay on the broker';

CREATE FUNCTION mqtx.redrive(id bigint)
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

CREATE FUNCTION mqtx.redrive_all(queue text)
RETURNS integer
LANGUAGE sql
BEGIN ATOMIC
	SELECT count(mqtx.redrive(d.id))::integer
	FROM mqtx.dead_letter d
	WHERE d.queue = redrive_all.queue AND d.body_json IS NOT NULL;
END;

COMMENT ON FUNCTION mqtx.redrive_all(text) IS
	'Redrive every dead letter of a queue whose body is JSON; returns how many';

CREATE FUNCTION mqtx.discard(id bigint)
RETURNS boolean
LANGUAGE sql
BEGIN ATOMIC
	WITH gone AS (DELETE FROM mqtx.dead_letter d WHERE d.id = discard.id RETURNING 1)
	SELECT count(*) > 0 FROM gone;
END;

COMMENT ON FUNCTION mqtx.discard(bigint) IS 'Delete a dead letter';

--
-- Observability
--
CREATE VIEW mqtx.outbox_stats AS
SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
	   count(*) FILTER (WHERE status = 'published') AS published,
	   count(*) FILTER (WHERE status = 'failed') AS failed,
	   now() - min(created_at) FILTER (WHERE status = 'pending') AS oldest_pending_age
FROM mqtx.outbox;

COMMENT ON VIEW mqtx.outbox_stats IS
	'Outbox rows per status, and how long the oldest pending one has waited';

CREATE FUNCTION mqtx.relay_stats(
	OUT database text, OUT pid integer, OUT broker_connected boolean,
	OUT broker_blocked boolean,
	OUT published bigint, OUT nacked bigint, OUT returned bigint,
	OUT retried bigint, OUT failed bigint, OUT reconnects bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'mqtx_relay_stats'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION mqtx.relay_stats() IS
	'Per served database: the relay process, whether it is connected, whether the broker has blocked its connection (connection.blocked: a memory or disk alarm), and its counters since server start';

CREATE VIEW mqtx.relay_stats AS SELECT * FROM mqtx.relay_stats();

CREATE FUNCTION mqtx.consumer_stats(
	OUT database text, OUT pid integer, OUT broker_connected boolean,
	OUT consumed bigint, OUT applied bigint, OUT duplicates bigint,
	OUT retried bigint, OUT dead_lettered bigint, OUT reconnects bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'mqtx_consumer_stats'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION mqtx.consumer_stats() IS
	'Per served database: the consumer process, whether it is connected, and its counters since server start';

CREATE VIEW mqtx.consumer_stats AS SELECT * FROM mqtx.consumer_stats();

-- What the broker refused, one row per object: a worker skips an exchange,
-- queue, binding or subscription the broker will not take, goes on with
-- the rest, and tries it again later.  Only the workers write here, and a
-- row goes when its object is declared or consumed again.  It is the
-- workers' transient state, not the application's: pg_dump leaves it out.
CREATE TABLE mqtx.broker_errors (
	worker			text NOT NULL,
	object_type		text NOT NULL,
	object_name		text NOT NULL,
	error			text NOT NULL,
	failures		integer NOT NULL DEFAULT 1,
	first_failed_at timestamptz NOT NULL DEFAULT now(),
	last_failed_at	timestamptz NOT NULL DEFAULT now(),
	next_try_at		timestamptz,
	PRIMARY KEY (worker, object_type, object_name),
	CONSTRAINT broker_errors_worker_check CHECK (worker IN ('relay', 'consumer')),
	CONSTRAINT broker_errors_object_type_check
		CHECK (object_type IN ('exchange', 'queue', 'binding', 'subscription')),
	CONSTRAINT broker_errors_failures_check CHECK (failures > 0)
);

COMMENT ON TABLE mqtx.broker_errors IS
	'Exchanges, queues, bindings and subscriptions the broker refused, which the workers skip and try again; a row goes when its object is declared or consumed again';
COMMENT ON COLUMN mqtx.broker_errors.worker IS
	'Which worker the broker refused: relay or consumer';
COMMENT ON COLUMN mqtx.broker_errors.object_type IS
	'exchange, queue, binding or subscription';
COMMENT ON COLUMN mqtx.broker_errors.object_name IS
	'The exchange or queue; for a binding, queue <- exchange (routing key); for a subscription, its queue';
COMMENT ON COLUMN mqtx.broker_errors.error IS
	'The broker''s reply, as in 503 COMMAND_INVALID - unknown exchange type ''x-delayed-message''';
COMMENT ON COLUMN mqtx.broker_errors.failures IS
	'How many times in a row the broker refused the object';
COMMENT ON COLUMN mqtx.broker_errors.next_try_at IS
	'When the worker next tries the object';

--
-- Privileges: nothing in schema mqtx is public.  Publishing is granted per
-- database, to roles the installer names with mqtx.grant_publish(); no
-- shared role is created or adopted.
--
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

REVOKE ALL ON ALL TABLES IN SCHEMA mqtx FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA mqtx FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA mqtx FROM PUBLIC;
