/* mqtx--0.1.0.sql: transactional outbox for RabbitMQ */

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
	CONSTRAINT subscriptions_prefetch_check CHECK (prefetch BETWEEN 1 AND 65535),
	CONSTRAINT subscriptions_max_attempts_check CHECK (max_attempts BETWEEN 1 AND 1000)
);

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
	'Messages applied, by queue and message_id (or sha256:<hex> of the body when a message has no message_id)';

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
	last_failed_at	timestamptz NOT NULL
);

CREATE INDEX dead_letter_queue_idx ON mqtx.dead_letter (queue);

COMMENT ON TABLE mqtx.dead_letter IS
	'Messages the consumer could not apply, with the reason; redrive or discard them';

SELECT pg_catalog.pg_extension_config_dump('mqtx.dead_letter', '');
SELECT pg_catalog.pg_extension_config_dump(
	pg_catalog.pg_get_serial_sequence('mqtx.dead_letter', 'id'), '');

CREATE FUNCTION mqtx.subscribe(queue text, handler regprocedure,
							   prefetch integer DEFAULT 100,
							   max_attempts integer DEFAULT 5)
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	fn pg_proc%ROWTYPE;
BEGIN
	IF queue IS NULL OR handler IS NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'null_value_not_allowed',
			MESSAGE = 'mqtx.subscribe needs a queue and a handler';
	END IF;
	SELECT * INTO fn FROM pg_proc WHERE oid = handler;
	IF fn.pronargs <> 2 OR fn.proargtypes[0] <> 'jsonb'::regtype
	   OR fn.proargtypes[1] <> 'jsonb'::regtype OR fn.prorettype <> 'void'::regtype
	   OR fn.proretset OR fn.prokind <> 'f' THEN
		RAISE EXCEPTION USING ERRCODE = 'invalid_function_definition',
			MESSAGE = format('mqtx handler %s has the wrong signature', handler),
			DETAIL = format('It takes (%s) and returns %s%s.',
							pg_get_function_identity_arguments(handler),
							CASE WHEN fn.proretset THEN 'SETOF ' ELSE '' END,
							fn.prorettype::regtype),
			HINT = 'A handler is a function (payload jsonb, headers jsonb) RETURNS void.';
	END IF;
	IF NOT EXISTS (SELECT FROM mqtx.queues q WHERE q.name = subscribe.queue) THEN
		PERFORM mqtx.declare_queue(queue);
	END IF;
	INSERT INTO mqtx.subscriptions AS s (queue, handler, prefetch, max_attempts)
		VALUES (subscribe.queue, subscribe.handler, subscribe.prefetch, subscribe.max_attempts)
	ON CONFLICT ON CONSTRAINT subscriptions_pkey DO UPDATE
		SET handler = excluded.handler, prefetch = excluded.prefetch,
			max_attempts = excluded.max_attempts;
END
$$;

COMMENT ON FUNCTION mqtx.subscribe(text, regprocedure, integer, integer) IS
	'Apply the messages of a queue with handler(payload jsonb, headers jsonb); declares the queue if needed';

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
	-- through the outbox, so it takes the whole way again
	RETURN mqtx.publish('', letter.queue, letter.body_json,
						coalesce(letter.headers, '{}')
						|| jsonb_build_object('x-mqtx-redriven-from', letter.message_id));
END
$$;

COMMENT ON FUNCTION mqtx.redrive(bigint) IS
	'Send a dead letter to its queue again, through the outbox; returns the new message id';

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
	OUT published bigint, OUT nacked bigint, OUT returned bigint,
	OUT retried bigint, OUT failed bigint, OUT reconnects bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'mqtx_relay_stats'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION mqtx.relay_stats() IS
	'Per served database: the relay process, whether it is connected, and its counters since server start';

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

--
-- Privileges: nothing in schema mqtx is public.  Applications that publish
-- are granted the mqtx_publisher role (roles are cluster-wide, so another
-- database's CREATE EXTENSION may have made it already).
--
DO $$
BEGIN
	IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'mqtx_publisher') THEN
		CREATE ROLE mqtx_publisher NOLOGIN;
	END IF;
END
$$;

REVOKE ALL ON ALL TABLES IN SCHEMA mqtx FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA mqtx FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA mqtx FROM PUBLIC;

GRANT USAGE ON SCHEMA mqtx TO mqtx_publisher;
GRANT EXECUTE ON FUNCTION mqtx.publish(text, text, jsonb, jsonb) TO mqtx_publisher;
GRANT EXECUTE ON FUNCTION mqtx.outbox_trigger() TO mqtx_publisher;
