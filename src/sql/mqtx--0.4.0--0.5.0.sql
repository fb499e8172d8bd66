/* mqtx--0.4.0--0.5.0.sql: every object commented, messages in PostgreSQL's style */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION mqtx UPDATE TO '0.5.0'" to load this file. \quit

COMMENT ON SCHEMA mqtx IS
	'mqtx: transactional outbox and idempotent inbox over RabbitMQ';

COMMENT ON COLUMN mqtx.outbox.id IS
	'Insertion order: the relay publishes due rows oldest first; the id in NOTIFY mqtx_alert';
COMMENT ON COLUMN mqtx.outbox.message_id IS
	'The AMQP message_id property, which consumers dedupe on; time-ordered (mqtx.new_message_id())';
COMMENT ON COLUMN mqtx.outbox.exchange IS
	'The exchange to publish to; the empty string is the default exchange, which routes to the queue named by the routing key';
COMMENT ON COLUMN mqtx.outbox.routing_key IS
	'The routing key to publish with';
COMMENT ON COLUMN mqtx.outbox.payload IS
	'The message body, sent as JSON text (content type application/json)';
COMMENT ON COLUMN mqtx.outbox.headers IS
	'The AMQP headers, as a JSON object, or NULL for none';
COMMENT ON COLUMN mqtx.outbox.attempts IS
	'Publish attempts the broker refused so far; a lost connection or a late confirm is not one';
COMMENT ON COLUMN mqtx.outbox.last_error IS
	'Why the last attempt failed';
COMMENT ON COLUMN mqtx.outbox.created_at IS
	'When the message was enqueued';
COMMENT ON COLUMN mqtx.outbox.published_at IS
	'When the broker confirmed the message; set exactly when the status is published, and retention deletes by it';
COMMENT ON SEQUENCE mqtx.outbox_id_seq IS
	'Ids of mqtx.outbox rows (its identity column)';

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

COMMENT ON FUNCTION mqtx.topology_trigger() IS
	'Statement trigger on the topology and subscription tables: once the change commits, the workers declare the topology and read the subscriptions again';

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

COMMENT ON COLUMN mqtx.inbox.queue IS
	'The queue the message came from';
COMMENT ON COLUMN mqtx.inbox.message_id IS
	'The message''s dedupe key: the original id of a redriven message (header x-mqtx-redriven-from), else its AMQP message_id, else sha256: and the hex SHA-256 of its body';
COMMENT ON COLUMN mqtx.inbox.applied_at IS
	'When the message was applied or dead-lettered; rows older than mqtx.inbox_retention are deleted';

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
COMMENT ON SEQUENCE mqtx.dead_letter_id_seq IS
	'Ids of mqtx.dead_letter rows (its identity column)';

COMMENT ON FUNCTION mqtx.check_subscription() IS
	'Row trigger on mqtx.subscriptions: refuses a handler that is not a function (payload jsonb, headers jsonb) RETURNS void, or whose owner''s privileges the writer does not have';

COMMENT ON COLUMN mqtx.outbox_stats.pending IS
	'Messages waiting to be published';
COMMENT ON COLUMN mqtx.outbox_stats.published IS
	'Published messages still kept (see mqtx.retention)';
COMMENT ON COLUMN mqtx.outbox_stats.failed IS
	'Messages given up on';
COMMENT ON COLUMN mqtx.outbox_stats.oldest_pending_age IS
	'How long the oldest pending message has waited; NULL when none is pending';

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

COMMENT ON COLUMN mqtx.broker_errors.first_failed_at IS
	'When the broker first refused the object, of the refusals counted in failures';
COMMENT ON COLUMN mqtx.broker_errors.last_failed_at IS
	'When the broker last refused the object';

-- The errors of the subscription check and of redrive, written whole: the
-- wrong signature's detail no longer pieces "SETOF " into its sentence,
-- role names are quoted, and the reason a dead letter cannot be redriven
-- is a detail.  Replacing the functions keeps their owner, privileges,
-- comments and triggers.
CREATE OR REPLACE FUNCTION mqtx.check_subscription()
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
	-- through the outbox, so it takes the whole way again
	RETURN mqtx.publish('', letter.queue, letter.body_json,
						coalesce(letter.headers, '{}')
						|| jsonb_build_object('x-mqtx-redriven-from', letter.message_id));
END
$$;
