/*
 * mqtx.sql: transactional outbox for RabbitMQ, the current version
 *
 * make copies this file to mqtx--<version>.sql, the install script of the
 * version mqtx.control names; the Makefile says how a version is released.
 */

-- complain if script is sourced in psql, rather than via CREATE EXTENSION
\echo Use "CREATE EXTENSION mqtx" to load this file. \quit

-- CREATE EXTENSION makes the schema (mqtx.control names it); it is not a
-- member of the extension, and stays when the extension is dropped.
COMMENT ON SCHEMA mqtx IS
	'mqtx: transactional outbox and idempotent inbox over RabbitMQ';

-- Message ids are UUIDs of version 7: time first, so that ids made later
-- sort later and the unique index on them grows at its right edge.
CREATE FUNCTION mqtx.new_message_id()
RETURNS uuid
AS 'MODULE_PATHNAME', 'mqtx_new_message_id_sql'
LANGUAGE C VOLATILE PARALLEL SAFE;

COMMENT ON FUNCTION mqtx.new_message_id() IS
	'A new message id: a time-ordered UUID (version 7)';

--
-- The outbox: one row per message, written in the sender's transaction and
-- relayed to RabbitMQ by the relay worker.
--
CREATE TABLE mqtx.outbox (
	id				bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	message_id		uuid NOT NULL DEFAULT mqtx.new_message_id(),
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
	ordering_key	text,
	deliver_at		timestamptz,
	CONSTRAINT outbox_message_id_key UNIQUE (message_id),
	CONSTRAINT outbox_status_check
		CHECK (status IN ('pending', 'published', 'failed')),
	CONSTRAINT outbox_published_at_check
		CHECK ((status = 'published') = (published_at IS NOT NULL)),
	CONSTRAINT outbox_attempts_check CHECK (attempts >= 0),
	CONSTRAINT outbox_exchange_check CHECK (octet_length(exchange) <= 255),
	CONSTRAINT outbox_routing_key_check CHECK (octet_length(routing_key) <= 255),
	CONSTRAINT outbox_ordering_key_check CHECK (octet_length(ordering_key) <= 255),
	CONSTRAINT outbox_headers_check
		CHECK (headers IS NULL OR jsonb_typeof(headers) = 'object')
);

COMMENT ON TABLE mqtx.outbox IS
	'Messages waiting to be published to RabbitMQ, and their delivery status';
COMMENT ON COLUMN mqtx.outbox.id IS
	'Insertion order: the relay publishes due rows oldest first, and a key''s messages in this order; the id in NOTIFY mqtx_alert';
COMMENT ON COLUMN mqtx.outbox.message_id IS
	'The AMQP message_id property, which consumers dedupe on; time-ordered (mqtx.new_message_id())';
COMMENT ON COLUMN mqtx.outbox.exchange IS
	'The exchange to publish to; the empty string is the default exchange, which routes to the queue named by the routing key';
COMMENT ON COLUMN mqtx.outbox.routing_key IS
	'The routing key to publish with';
COMMENT ON COLUMN mqtx.outbox.payload IS
	'The message body, sent as JSON text (content type application/json)';
COMMENT ON COLUMN mqtx.outbox.headers IS
	'The AMQP headers, as a JSON object, or NULL for none; mqtx adds x-mqtx-correlation-id (sent as the AMQP correlation_id too), x-mqtx-causation-id, traceparent and tracestate';
COMMENT ON COLUMN mqtx.outbox.status IS
	'pending: waiting for (re)delivery; published: confirmed by the broker; failed: gave up after mqtx.max_attempts';
COMMENT ON COLUMN mqtx.outbox.attempts IS
	'Publish attempts the broker refused so far; a lost connection or a late confirm is not one';
COMMENT ON COLUMN mqtx.outbox.next_attempt_at IS
	'When a pending message is next due for publishing: its deliver_at, then the time of its next retry';
COMMENT ON COLUMN mqtx.outbox.last_error IS
	'Why the last attempt failed';
COMMENT ON COLUMN mqtx.outbox.created_at IS
	'When the message was enqueued';
COMMENT ON COLUMN mqtx.outbox.published_at IS
	'When the broker confirmed the message; set exactly when the status is published, and retention deletes by it';
COMMENT ON COLUMN mqtx.outbox.ordering_key IS
	'Messages of one key are published one at a time, in commit order, each once the previous one is confirmed; NULL: no order (mqtx.publish(ordering_key =>))';
COMMENT ON COLUMN mqtx.outbox.deliver_at IS
	'When a scheduled message is to be published (mqtx.publish(deliver_at =>, delay =>)); NULL: as soon as it is committed';
COMMENT ON SEQUENCE mqtx.outbox_id_seq IS
	'Ids of mqtx.outbox rows (its identity column)';

-- The relay claims due pending rows oldest first; published rows leave
-- this index, so it stays as small as the backlog however large the
-- history grows.
CREATE INDEX outbox_due_idx ON mqtx.outbox (next_attempt_at, id)
	WHERE status = 'pending';

-- A message with an ordering key waits while an earlier one of its key is
-- pending or failed: the relay looks for one here, among the rows not yet
-- published, however long the history.
CREATE INDEX outbox_ordering_key_idx ON mqtx.outbox (ordering_key, id)
	WHERE status IN ('pending', 'failed') AND ordering_key IS NOT NULL;

-- Retention deletes published rows oldest first: with this index a pass
-- reads what it deletes, not the history it keeps.
CREATE INDEX outbox_published_at_idx ON mqtx.outbox (published_at)
	WHERE status = 'published';

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

CREATE FUNCTION mqtx.outbox_trigger()
RETURNS trigger
AS 'MODULE_PATHNAME', 'mqtx_outbox_trigger'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION mqtx.outbox_trigger() IS
	'AFTER INSERT FOR EACH ROW trigger: enqueue the new row as JSON; arguments are the exchange, the routing key, and optionally the columns whose values make the ordering key';

CREATE FUNCTION mqtx.cancel(message_id uuid)
RETURNS boolean
AS 'MODULE_PATHNAME', 'mqtx_cancel'
LANGUAGE C VOLATILE PARALLEL UNSAFE;

COMMENT ON FUNCTION mqtx.cancel(uuid) IS
	'Withdraw a message not yet sent, in the current transaction: true when it is withdrawn, false when it is published, may be on its way, or is not in the outbox';

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

COMMENT ON TABLE mqtx.exchanges IS
	'Exchanges the workers declare on the broker each time they connect (mqtx.declare_exchange)';
COMMENT ON COLUMN mqtx.exchanges.name IS
	'The exchange''s name; amq.* names are the broker''s own';
COMMENT ON COLUMN mqtx.exchanges.type IS
	'The exchange type: direct, fanout, topic, headers, or one a broker plugin adds';
COMMENT ON COLUMN mqtx.exchanges.durable IS
	'Whether the exchange survives a broker restart';

COMMENT ON TABLE mqtx.queues IS
	'Queues the workers declare on the broker each time they connect (mqtx.declare_queue, mqtx.subscribe)';
COMMENT ON COLUMN mqtx.queues.name IS
	'The queue''s name; amq.* names are the broker''s own';
COMMENT ON COLUMN mqtx.queues.durable IS
	'Whether the queue survives a broker restart';
COMMENT ON COLUMN mqtx.queues.arguments IS
	'The queue''s x-arguments as a JSON object, such as {"x-queue-type": "quorum"}, or NULL for none';

COMMENT ON TABLE mqtx.bindings IS
	'Bindings of queues to exchanges, which the workers declare with them (mqtx.bind)';
COMMENT ON COLUMN mqtx.bindings.queue IS
	'The bound queue, one of mqtx.queues';
COMMENT ON COLUMN mqtx.bindings.exchange IS
	'The exchange it is bound to, one of mqtx.exchanges';
COMMENT ON COLUMN mqtx.bindings.routing_key IS
	'The binding key: the routing key to match, or a pattern for a topic exchange';

SELECT pg_catalog.pg_extension_config_dump('mqtx.exchanges', '');
SELECT pg_catalog.pg_extension_config_dump('mqtx.queues', '');
SELECT pg_catalog.pg_extension_config_dump('mqtx.bindings', '');

CREATE FUNCTION mqtx.topology_trigger()
RETURNS trigger
AS 'MODULE_PATHNAME', 'mqtx_topology_trigger'
LANGUAGE C;

COMMENT ON FUNCTION mqtx.topology_trigger() IS
	'Statement trigger on the topology and subscription tables: once the change commits, the workers declare the topology and read the subscriptions again';

CREATE TRIGGER exchanges_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
	ON mqtx.exchanges FOR EACH STATEMENT EXECUTE FUNCTION mqtx.topology_trigger();
CREATE TRIGGER queues_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
	ON mqtx.queues FOR EACH STATEMENT EXECUTE FUNCTION mqtx.topology_trigger();
CREATE TRIGGER bindings_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
	ON mqtx.bindings FOR EACH STATEMENT EXECUTE FUNCTION mqtx.topology_trigger();

-- A quorum queue's settings that RabbitMQ would take but that would lose
-- messages or fail later are refused here, where the mistake is made.
CREATE FUNCTION mqtx.check_queue()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
	queue_type text := NEW.arguments->>'x-queue-type';
	delivery_limit jsonb := NEW.arguments->'x-delivery-limit';
BEGIN
	IF queue_type = 'quorum' AND NOT NEW.durable THEN
		RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
			MESSAGE = format('mqtx queue "%s" is a quorum queue and cannot be non-durable', NEW.name),
			HINT = 'Quorum queues are always durable: declare it with durable => true.';
	END IF;
	IF delivery_limit IS NOT NULL THEN
		IF queue_type IS DISTINCT FROM 'quorum' THEN
			RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
				MESSAGE = format('mqtx queue "%s" has x-delivery-limit but is not a quorum queue', NEW.name),
				HINT = 'Only quorum queues count deliveries: add "x-queue-type": "quorum", or leave x-delivery-limit out.';
		END IF;
		-- CASE: the cast only once the value is known to be a number
		IF (CASE WHEN jsonb_typeof(delivery_limit) <> 'number' THEN true
				 ELSE delivery_limit::numeric NOT BETWEEN 1 AND 2147483647
					  OR delivery_limit::numeric % 1 <> 0
			END) THEN
			RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
				MESSAGE = format('x-delivery-limit of mqtx queue "%s" must be a whole number from 1 to 2147483647, not %s',
								 NEW.name, delivery_limit),
				HINT = 'Leave it out for no limit.';
		END IF;
		IF NOT NEW.arguments ? 'x-dead-letter-exchange' THEN
			RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
				MESSAGE = format('mqtx queue "%s" has x-delivery-limit but no x-dead-letter-exchange', NEW.name),
				DETAIL = 'RabbitMQ drops a message delivered more often than the limit when the queue has no dead-letter exchange.',
				HINT = 'Add "x-dead-letter-exchange", or leave x-delivery-limit out: the consumer retries failed messages itself, and the broker counts a delivery only when one is handed back (a lost connection, a crash).';
		END IF;
	END IF;
	RETURN NEW;
END
$$;

COMMENT ON FUNCTION mqtx.check_queue() IS
	'Row trigger on mqtx.queues: refuses a non-durable quorum queue, and an x-delivery-limit that is not a positive whole number, is not on a quorum queue, or has no x-dead-letter-exchange to send what it stops';

CREATE TRIGGER queues_check BEFORE INSERT OR UPDATE
	ON mqtx.queues FOR EACH ROW EXECUTE FUNCTION mqtx.check_queue();

REVOKE ALL ON FUNCTION mqtx.check_queue() FROM PUBLIC;

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
	after_dead_letter text NOT NULL DEFAULT 'wait',
	workers			integer NOT NULL DEFAULT 1,
	CONSTRAINT subscriptions_prefetch_check CHECK (prefetch BETWEEN 1 AND 65535),
	CONSTRAINT subscriptions_max_attempts_check CHECK (max_attempts BETWEEN 1 AND 1000),
	CONSTRAINT subscriptions_handler_timeout_check
		CHECK (handler_timeout BETWEEN '1 millisecond' AND '1 day'),
	CONSTRAINT subscriptions_after_dead_letter_check
		CHECK (after_dead_letter IN ('wait', 'proceed')),
	CONSTRAINT subscriptions_workers_check CHECK (workers BETWEEN 1 AND 64)
);

COMMENT ON TABLE mqtx.subscriptions IS
	'The queues the consumer worker applies, each with its handler (mqtx.subscribe, mqtx.unsubscribe)';
COMMENT ON COLUMN mqtx.subscriptions.queue IS
	'The queue to consume';
COMMENT ON COLUMN mqtx.subscriptions.handler IS
	'The function (payload jsonb, headers jsonb) RETURNS void applied to each message, run as its owner';
COMMENT ON COLUMN mqtx.subscriptions.prefetch IS
	'How many unacknowledged deliveries the broker may hand out on the queue at once';
COMMENT ON COLUMN mqtx.subscriptions.max_attempts IS
	'Failed attempts after which a message goes to mqtx.dead_letter';
COMMENT ON COLUMN mqtx.subscriptions.created_at IS
	'When the queue was first subscribed';
COMMENT ON COLUMN mqtx.subscriptions.handler_timeout IS
	'How long one call of the handler may run; one that takes longer fails like any handler error';
COMMENT ON COLUMN mqtx.subscriptions.after_dead_letter IS
	'What the later messages of an ordering key do once one of the key is dead-lettered: wait (parked, until an operator redrives or discards it) or proceed';
COMMENT ON COLUMN mqtx.subscriptions.workers IS
	'How many apply workers apply the queue''s messages: one key''s messages always by the same worker, in order; more than 1: the consumer parks every delivery and the workers apply them from mqtx.parked';

SELECT pg_catalog.pg_extension_config_dump('mqtx.subscriptions', '');

CREATE TRIGGER subscriptions_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
	ON mqtx.subscriptions FOR EACH STATEMENT EXECUTE FUNCTION mqtx.topology_trigger();

-- One row per applied message, written in the transaction that applied it:
-- a redelivery finds its row and is acknowledged without being applied.
CREATE TABLE mqtx.inbox (
	queue		text NOT NULL,
	message_id	text NOT NULL,
	applied_at	timestamptz NOT NULL DEFAULT now(),
	correlation_id text,
	causation_id text,
	PRIMARY KEY (queue, message_id)
);

CREATE INDEX inbox_applied_at_idx ON mqtx.inbox (applied_at);

COMMENT ON TABLE mqtx.inbox IS
	'Messages applied or dead-lettered, by queue and message_id (or sha256:<hex> of the body when a message has no message_id)';
COMMENT ON COLUMN mqtx.inbox.queue IS
	'The queue the message came from';
COMMENT ON COLUMN mqtx.inbox.message_id IS
	'The message''s dedupe key: the original id of a redriven message (header x-mqtx-redriven-from), else its AMQP message_id, else sha256: and the hex SHA-256 of its body';
COMMENT ON COLUMN mqtx.inbox.applied_at IS
	'When the message was applied or dead-lettered; rows older than mqtx.inbox_retention are deleted';
COMMENT ON COLUMN mqtx.inbox.correlation_id IS
	'The message''s AMQP correlation_id, or NULL when it has none (it started its conversation)';
COMMENT ON COLUMN mqtx.inbox.causation_id IS
	'The id of the message whose handler published this one (header x-mqtx-causation-id), or NULL';

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
COMMENT ON COLUMN mqtx.consumer_attempts.queue IS
	'The queue the message came from';
COMMENT ON COLUMN mqtx.consumer_attempts.message_id IS
	'The message''s dedupe key, as in mqtx.inbox';
COMMENT ON COLUMN mqtx.consumer_attempts.attempts IS
	'How many attempts to apply the message have failed';
COMMENT ON COLUMN mqtx.consumer_attempts.last_error IS
	'The error of the last failed attempt';
COMMENT ON COLUMN mqtx.consumer_attempts.first_failed_at IS
	'When the first attempt failed';
COMMENT ON COLUMN mqtx.consumer_attempts.last_failed_at IS
	'When the last attempt failed';

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
	ordering_key	text,
	parked_position bigint,
	correlation_id	text,
	-- one dead letter per message and queue, however many copies came
	CONSTRAINT dead_letter_queue_message_id_key UNIQUE (queue, message_id)
);

COMMENT ON TABLE mqtx.dead_letter IS
	'Messages the consumer could not apply, with the reason; redrive or discard them';
COMMENT ON COLUMN mqtx.dead_letter.id IS
	'The dead letter''s id, which mqtx.redrive and mqtx.discard take and NOTIFY mqtx_dead_letter carries';
COMMENT ON COLUMN mqtx.dead_letter.queue IS
	'The queue the message came from, and which mqtx.redrive sends it to';
COMMENT ON COLUMN mqtx.dead_letter.message_id IS
	'The message''s dedupe key, as in mqtx.inbox';
COMMENT ON COLUMN mqtx.dead_letter.exchange IS
	'The exchange the message was published to';
COMMENT ON COLUMN mqtx.dead_letter.routing_key IS
	'The routing key the message was published with';
COMMENT ON COLUMN mqtx.dead_letter.headers IS
	'The message''s AMQP headers, as a JSON object, or NULL for none';
COMMENT ON COLUMN mqtx.dead_letter.body IS
	'The message''s body, as it was received';
COMMENT ON COLUMN mqtx.dead_letter.body_text IS
	'The body as text, when it is valid UTF-8 without NUL bytes';
COMMENT ON COLUMN mqtx.dead_letter.body_json IS
	'The body as JSON, when it is valid JSON within mqtx.max_payload; only such a dead letter can be redriven';
COMMENT ON COLUMN mqtx.dead_letter.error_message IS
	'Why the message was dead-lettered: the handler''s last error, or what made the message unusable';
COMMENT ON COLUMN mqtx.dead_letter.error_detail IS
	'The detail of the handler''s last error';
COMMENT ON COLUMN mqtx.dead_letter.error_context IS
	'The context of the handler''s last error';
COMMENT ON COLUMN mqtx.dead_letter.attempts IS
	'How many attempts failed; 1 for a message dead-lettered at once';
COMMENT ON COLUMN mqtx.dead_letter.first_failed_at IS
	'When the first attempt failed';
COMMENT ON COLUMN mqtx.dead_letter.last_failed_at IS
	'When the last attempt failed';
COMMENT ON COLUMN mqtx.dead_letter.ordering_key IS
	'The message''s ordering key (header x-mqtx-ordering-key), or NULL; under after_dead_letter = wait the key''s later messages are parked while the letter is here';
COMMENT ON COLUMN mqtx.dead_letter.parked_position IS
	'Its place among its key''s messages: mqtx.redrive puts it back into mqtx.parked there, ahead of the later ones';
COMMENT ON COLUMN mqtx.dead_letter.correlation_id IS
	'The message''s AMQP correlation_id, or NULL; a redriven message keeps it';
COMMENT ON SEQUENCE mqtx.dead_letter_id_seq IS
	'Ids of mqtx.dead_letter rows (its identity column)';

-- Is a key held by a dead letter?  Asked for every message of a key.
CREATE INDEX dead_letter_ordering_key_idx ON mqtx.dead_letter (queue, ordering_key)
	WHERE ordering_key IS NOT NULL;

SELECT pg_catalog.pg_extension_config_dump('mqtx.dead_letter', '');
SELECT pg_catalog.pg_extension_config_dump(
	pg_catalog.pg_get_serial_sequence('mqtx.dead_letter', 'id'), '');

--
-- Parked messages: the later messages of an ordering key whose earlier one
-- is retried or dead-lettered, a keyed message whose attempt failed, and
-- every message of a queue applied by several workers (workers > 1), for
-- them to apply.  They are acknowledged to the broker once parked (durably, here), so a
-- held key never fills the prefetch window, and the consumer applies them
-- from here, in their order, once nothing earlier of their key is held.
--
CREATE SEQUENCE mqtx.parked_position_seq;

CREATE TABLE mqtx.parked (
	position		bigint PRIMARY KEY DEFAULT nextval('mqtx.parked_position_seq'),
	queue			text NOT NULL,
	ordering_key	text,
	message_id		text NOT NULL,
	exchange		text,
	routing_key		text,
	headers			jsonb,
	body			bytea NOT NULL,
	parked_at		timestamptz NOT NULL DEFAULT now(),
	next_attempt_at timestamptz,
	correlation_id	text,
	CONSTRAINT parked_queue_message_id_key UNIQUE (queue, message_id)
);

CREATE INDEX parked_ordering_key_idx ON mqtx.parked (queue, ordering_key, position);

COMMENT ON TABLE mqtx.parked IS
	'Messages of ordering keys that wait for an earlier message of their key, or for their own next attempt, and the messages of queues applied by several workers; the consumer and its apply workers apply them from here, a key''s in order';
COMMENT ON COLUMN mqtx.parked.position IS
	'Their order: a key''s messages are applied by ascending position';
COMMENT ON COLUMN mqtx.parked.queue IS
	'The queue the message came from';
COMMENT ON COLUMN mqtx.parked.ordering_key IS
	'Its ordering key (header x-mqtx-ordering-key), or NULL for a message without one, parked for an apply worker';
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
COMMENT ON COLUMN mqtx.parked.correlation_id IS
	'The message''s AMQP correlation_id, or NULL';
COMMENT ON SEQUENCE mqtx.parked_position_seq IS
	'Positions of mqtx.parked rows, and of the dead letters of ordering keys';

-- acknowledged to the broker: the database holds the only copy
SELECT pg_catalog.pg_extension_config_dump('mqtx.parked', '');
SELECT pg_catalog.pg_extension_config_dump('mqtx.parked_position_seq', '');

-- The keys the consumer holds back, and why: a dead letter (under
-- after_dead_letter = wait), or a first message that waits for its retry.
CREATE VIEW mqtx.held_keys AS
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
			MESSAGE = format('mqtx handler function with OID %s does not exist', NEW.handler::oid);
	END IF;
	-- a function is named by its signature, which quotes the identifiers
	-- that need it, as in PostgreSQL's own messages; a role's name is quoted
	IF fn.prokind <> 'f' THEN
		RAISE EXCEPTION USING ERRCODE = 'invalid_function_definition',
			MESSAGE = format('mqtx handler %s has the wrong signature', NEW.handler),
			DETAIL = CASE fn.prokind
						WHEN 'p' THEN 'It is a procedure.'
						WHEN 'a' THEN 'It is an aggregate function.'
						WHEN 'w' THEN 'It is a window function.'
					 END,
			HINT = 'A handler is a function (payload jsonb, headers jsonb) RETURNS void.';
	END IF;
	IF fn.pronargs <> 2 OR fn.proargtypes[0] <> 'jsonb'::regtype
	   OR fn.proargtypes[1] <> 'jsonb'::regtype OR fn.prorettype <> 'void'::regtype
	   OR fn.proretset THEN
		RAISE EXCEPTION USING ERRCODE = 'invalid_function_definition',
			MESSAGE = format('mqtx handler %s has the wrong signature', NEW.handler),
			DETAIL = format('It takes (%s) and returns %s.',
							pg_get_function_identity_arguments(NEW.handler),
							pg_get_function_result(NEW.handler)),
			HINT = 'A handler is a function (payload jsonb, headers jsonb) RETURNS void.';
	END IF;
	IF NOT pg_has_role(fn.proowner, 'USAGE') THEN
		RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
			MESSAGE = format('permission denied to subscribe handler %s', NEW.handler),
			DETAIL = format('The consumer runs a handler as its owner, role "%s", and role "%s" does not have the privileges of that role.',
							pg_get_userbyid(fn.proowner), current_user),
			HINT = 'Subscribe a function you own, or have its owner subscribe it.';
	END IF;
	RETURN NEW;
END
$$;

COMMENT ON FUNCTION mqtx.check_subscription() IS
	'Row trigger on mqtx.subscriptions: refuses a handler that is not a function (payload jsonb, headers jsonb) RETURNS void, or whose owner''s privileges the writer does not have';

CREATE TRIGGER subscriptions_check BEFORE INSERT OR UPDATE OF handler
	ON mqtx.subscriptions FOR EACH ROW EXECUTE FUNCTION mqtx.check_subscription();

REVOKE ALL ON FUNCTION mqtx.check_subscription() FROM PUBLIC;

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

CREATE FUNCTION mqtx.unsubscribe(queue text)
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

COMMENT ON FUNCTION mqtx.redrive(bigint) IS
	'Send a dead letter to its queue again, through the outbox, under its original identity, and return the new AMQP message id; one of an ordering key goes back into mqtx.parked at its place (returns NULL)';

CREATE FUNCTION mqtx.redrive_all(queue text)
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
	   now() - min(coalesce(deliver_at, created_at))
		   FILTER (WHERE status = 'pending' AND (deliver_at IS NULL OR deliver_at <= now()))
		   AS oldest_pending_age,
	   count(*) FILTER (WHERE status = 'pending' AND deliver_at > now()) AS scheduled
FROM mqtx.outbox;

COMMENT ON VIEW mqtx.outbox_stats IS
	'Outbox rows per status, how many are scheduled for later, and how long the oldest due one has waited';
COMMENT ON COLUMN mqtx.outbox_stats.pending IS
	'Messages waiting to be published, scheduled ones included';
COMMENT ON COLUMN mqtx.outbox_stats.published IS
	'Published messages still kept (see mqtx.retention)';
COMMENT ON COLUMN mqtx.outbox_stats.failed IS
	'Messages given up on';
COMMENT ON COLUMN mqtx.outbox_stats.oldest_pending_age IS
	'How long the oldest due pending message has waited, since it was enqueued or, if scheduled, since its deliver_at; NULL when none is due';
COMMENT ON COLUMN mqtx.outbox_stats.scheduled IS
	'Pending messages whose deliver_at has not come yet';

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

COMMENT ON VIEW mqtx.relay_stats IS
	'Per served database: the relay process, its broker connection, and its counters since server start';
COMMENT ON COLUMN mqtx.relay_stats.database IS
	'A database the workers serve (mqtx.database)';
COMMENT ON COLUMN mqtx.relay_stats.pid IS
	'The relay''s process id; NULL while it is not running';
COMMENT ON COLUMN mqtx.relay_stats.broker_connected IS
	'Whether the relay is connected to the broker';
COMMENT ON COLUMN mqtx.relay_stats.broker_blocked IS
	'Whether the broker has blocked the relay''s connection (connection.blocked: a memory or disk alarm)';
COMMENT ON COLUMN mqtx.relay_stats.published IS
	'Messages the broker confirmed';
COMMENT ON COLUMN mqtx.relay_stats.nacked IS
	'Messages the broker refused (basic.nack)';
COMMENT ON COLUMN mqtx.relay_stats.returned IS
	'Messages the broker returned as unroutable (basic.return)';
COMMENT ON COLUMN mqtx.relay_stats.retried IS
	'Failed attempts rescheduled';
COMMENT ON COLUMN mqtx.relay_stats.failed IS
	'Messages given up on after mqtx.max_attempts';
COMMENT ON COLUMN mqtx.relay_stats.reconnects IS
	'Connections to the broker made after the first';

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

COMMENT ON VIEW mqtx.consumer_stats IS
	'Per served database: the consumer process, its broker connection, and its counters since server start';
COMMENT ON COLUMN mqtx.consumer_stats.database IS
	'A database the workers serve (mqtx.database)';
COMMENT ON COLUMN mqtx.consumer_stats.pid IS
	'The consumer''s process id; NULL while it is not running';
COMMENT ON COLUMN mqtx.consumer_stats.broker_connected IS
	'Whether the consumer is connected to the broker';
COMMENT ON COLUMN mqtx.consumer_stats.consumed IS
	'Deliveries received from the broker';
COMMENT ON COLUMN mqtx.consumer_stats.applied IS
	'Messages applied by their handler';
COMMENT ON COLUMN mqtx.consumer_stats.duplicates IS
	'Deliveries of messages already applied or dead-lettered, acknowledged without calling the handler';
COMMENT ON COLUMN mqtx.consumer_stats.retried IS
	'Failed deliveries held for another attempt';
COMMENT ON COLUMN mqtx.consumer_stats.dead_lettered IS
	'Messages written to mqtx.dead_letter';
COMMENT ON COLUMN mqtx.consumer_stats.reconnects IS
	'Connections to the broker made after the first';

-- Which broker node each worker is on: once mqtx.broker_url lists a
-- cluster's nodes, the one a worker reached is worth knowing.
CREATE FUNCTION mqtx.broker_connections(
	OUT database text, OUT worker text, OUT pid integer,
	OUT broker text, OUT connected_since timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'mqtx_broker_connections'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION mqtx.broker_connections() IS
	'Per served database and worker: its process and the broker node it is connected to, since when';

CREATE VIEW mqtx.broker_connections AS SELECT * FROM mqtx.broker_connections();

COMMENT ON VIEW mqtx.broker_connections IS
	'Per served database and worker (relay, consumer): the broker node it is connected to';
COMMENT ON COLUMN mqtx.broker_connections.database IS
	'A database the workers serve (mqtx.database)';
COMMENT ON COLUMN mqtx.broker_connections.worker IS
	'relay or consumer';
COMMENT ON COLUMN mqtx.broker_connections.pid IS
	'The worker''s process id; NULL while it is not running';
COMMENT ON COLUMN mqtx.broker_connections.broker IS
	'The node it is connected to, as amqp[s]://host:port (one of mqtx.broker_url''s URLs, without credentials); NULL while not connected';
COMMENT ON COLUMN mqtx.broker_connections.connected_since IS
	'When that connection was made; NULL while not connected';

-- What the launcher made of each database of mqtx.database: served, or
-- why not (it does not exist, has no extension, found no worker slot,
-- the server is a standby).
CREATE FUNCTION mqtx.served_databases(
	OUT database text, OUT state text, OUT detail text, OUT since timestamptz,
	OUT relay_pid integer, OUT consumer_pid integer)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'mqtx_served_databases'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION mqtx.served_databases() IS
	'Per database of mqtx.database: whether the launcher serves it or why not, since when, and its workers'' processes';

CREATE VIEW mqtx.served_databases AS SELECT * FROM mqtx.served_databases();

COMMENT ON VIEW mqtx.served_databases IS
	'Per database of mqtx.database: whether the launcher serves it or why not, and its workers';
COMMENT ON COLUMN mqtx.served_databases.database IS
	'A database of mqtx.database (or one just removed from it, while its workers stop)';
COMMENT ON COLUMN mqtx.served_databases.state IS
	'serving, starting, standby (the server is in recovery), no database, no extension, no worker slot (max_worker_processes reached), or stopping';
COMMENT ON COLUMN mqtx.served_databases.detail IS
	'Which worker lacks a slot; NULL otherwise';
COMMENT ON COLUMN mqtx.served_databases.since IS
	'When the database entered this state';
COMMENT ON COLUMN mqtx.served_databases.relay_pid IS
	'The relay''s process id; NULL while it is not running';
COMMENT ON COLUMN mqtx.served_databases.consumer_pid IS
	'The consumer''s process id; NULL while it is not running';

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
COMMENT ON COLUMN mqtx.broker_errors.first_failed_at IS
	'When the broker first refused the object, of the refusals counted in failures';
COMMENT ON COLUMN mqtx.broker_errors.last_failed_at IS
	'When the broker last refused the object';
COMMENT ON COLUMN mqtx.broker_errors.next_try_at IS
	'When the worker next tries the object';

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
	EXECUTE format('GRANT EXECUTE ON FUNCTION '
				   'mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval, text, text), '
				   'mqtx.cancel(uuid), mqtx.outbox_trigger() TO %s', role);
END
$$;

COMMENT ON FUNCTION mqtx.grant_publish(regrole) IS
	'Let a role enqueue and cancel messages in this database (mqtx.publish, mqtx.cancel and mqtx.outbox_trigger)';

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
	EXECUTE format('REVOKE EXECUTE ON FUNCTION '
				   'mqtx.publish(text, text, jsonb, jsonb, text, timestamptz, interval, text, text), '
				   'mqtx.cancel(uuid), mqtx.outbox_trigger() FROM %s', role);
END
$$;

COMMENT ON FUNCTION mqtx.revoke_publish(regrole) IS
	'Take back the right to call mqtx.publish and mqtx.cancel and to create outbox triggers in this database; existing triggers keep enqueueing';

REVOKE ALL ON FUNCTION mqtx.grant_publish(regrole), mqtx.revoke_publish(regrole) FROM PUBLIC;

REVOKE ALL ON ALL TABLES IN SCHEMA mqtx FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA mqtx FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA mqtx FROM PUBLIC;
