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
