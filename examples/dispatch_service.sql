-- The dispatch service's database.  mqtx's consumer worker takes
-- "order.created" messages from the dispatch.orders queue and calls
-- dispatch_order() for each, in a transaction that also records the message
-- in mqtx.inbox: a redelivered message is acknowledged without running the
-- handler again.  A message whose handler keeps failing ends up in
-- mqtx.dead_letter with the error.  Every dispatch is answered to the order
-- service with "dispatch.created"; an order the service gives up on (an
-- operator decides: reject_order below) with "dispatch.failed".  Both
-- answers carry the order message's correlation id, so each order's
-- messages can be followed across the two databases (mqtx.message_trail).
--
-- postgresql.conf of this cluster:
--   shared_preload_libraries = 'mqtx'
--   mqtx.database = 'dispatch'
--   mqtx.broker_url = 'amqp://user:password@broker:5672/%2f'

CREATE EXTENSION IF NOT EXISTS mqtx;

-- The cities a courier depot serves.  An order for any other city cannot be
-- dispatched: its handler fails and, after a few attempts, it is
-- dead-lettered until someone adds the city and redrives it.
CREATE TABLE service_areas (
	city	text PRIMARY KEY,
	depot	text NOT NULL
);

INSERT INTO service_areas VALUES
	('Berlin', 'BER-1'), ('Paris', 'PAR-2'), ('Madrid', 'MAD-1'),
	('Rome', 'ROM-3'), ('Vienna', 'VIE-1');

-- One dispatch per order: the unique index is the last line of defence
-- against applying an order twice (mqtx's inbox is the first).
CREATE TABLE dispatch (
	dispatch_id		bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	order_id		bigint NOT NULL,
	user_id			bigint NOT NULL,
	depot			text NOT NULL,
	dispatched_at	timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE UNIQUE INDEX dispatch_order_id_key ON dispatch (order_id);

-- Every dispatch is announced, in the transaction that writes it: the
-- handler's.  mqtx gives the message the correlation id of the order
-- message being handled, names that message as its cause, and carries its
-- trace context on: nothing here has to say so.
SELECT mqtx.declare_exchange('dispatch', 'topic');
CREATE TRIGGER dispatch_outbox
	AFTER INSERT ON dispatch
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('dispatch', 'dispatch.created');

-- The handler: (payload jsonb, headers jsonb) RETURNS void.  Raising an
-- error rolls back this message only; mqtx retries it with backoff.
CREATE FUNCTION dispatch_order(payload jsonb, headers jsonb)
RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
	order_city text := payload #>> '{content,city}';
	area service_areas;
BEGIN
	SELECT * INTO area FROM service_areas WHERE city = order_city;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'no depot serves city "%"', coalesce(order_city, '(none)')
			USING DETAIL = format('order %s', payload ->> 'order_id'),
				  HINT = 'Add the city to service_areas and redrive the order (mqtx.redrive), or give it up: SELECT reject_order(<dead letter id>, <reason>).';
	END IF;
	INSERT INTO dispatch (order_id, user_id, depot)
	VALUES ((payload ->> 'order_id')::bigint, (payload ->> 'user_id')::bigint, area.depot);
END
$$;

-- Giving up on an order that cannot be dispatched (a city no depot will
-- ever serve): the operator's decision, once the order is a dead letter.
-- The letter goes, and the order service hears why, in one transaction;
-- outside a handler, the answer names its conversation and cause itself,
-- and continues the order's trace.
CREATE FUNCTION reject_order(dead_letter_id bigint, reason text) RETURNS bigint
LANGUAGE plpgsql
AS $$
DECLARE
	letter mqtx.dead_letter;
BEGIN
	SELECT * INTO letter FROM mqtx.dead_letter WHERE id = dead_letter_id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'no dead letter %', dead_letter_id;
	END IF;
	PERFORM mqtx.discard(dead_letter_id);
	BEGIN
		PERFORM set_config('mqtx.traceparent', coalesce(letter.headers ->> 'traceparent', ''), true);
		PERFORM set_config('mqtx.tracestate', coalesce(letter.headers ->> 'tracestate', ''), true);
	EXCEPTION WHEN invalid_parameter_value THEN
		NULL;					-- not W3C trace context: the answer goes without
	END;
	PERFORM mqtx.publish('dispatch', 'dispatch.failed',
		jsonb_build_object('order_id', letter.body_json -> 'order_id',
						   'reason', reason, 'error', letter.error_message),
		correlation_id => coalesce(letter.correlation_id, letter.message_id),
		causation_id => letter.message_id);
	RETURN (letter.body_json ->> 'order_id')::bigint;
END
$$;

-- The same exchange the order service publishes to, the queue, and the
-- binding between them; the consumer declares all three on the broker.
SELECT mqtx.declare_exchange('orders', 'topic');
SELECT mqtx.subscribe('dispatch.orders', 'dispatch_order(jsonb, jsonb)',
					  prefetch => 500, max_attempts => 3);
SELECT mqtx.bind('dispatch.orders', 'orders', 'order.created');
