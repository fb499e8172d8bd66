/*
 * mqtx 0.6.0 -> 0.7.0: a launcher starts the workers and follows
 * mqtx.database on reload; mqtx.served_databases says what it made of each
 * database.  mqtx.queues refuses quorum-queue settings that would lose
 * messages (rows already there are not checked again).
 */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION mqtx UPDATE TO '0.7.0'" to load this file. \quit

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

-- as everything in the schema: its owner's until granted
REVOKE ALL ON FUNCTION mqtx.served_databases() FROM PUBLIC;
REVOKE ALL ON mqtx.served_databases FROM PUBLIC;
