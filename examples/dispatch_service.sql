-- The dispatch service's database.  mqtx's consumer worker takes
-- "order.created" messages from the dispatch.orders queue and calls
-- dispatch_order() for each, in a transaction that also records the message
-- in mqtx.inbox: a redelivered message is acknowledged without running the
-- handler again.  A message whose handler keeps failing ends up in
-- mqtx.dead_letter with the error.
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
				  HINT = 'Add the city to service_areas, then SELECT mqtx.redrive_all(''dispatch.orders'').';
	END IF;
	INSERT INTO dispatch (order_id, user_id, depot)
	VALUES ((payload ->> 'order_id')::bigint, (payload ->> 'user_id')::bigint, area.depot);
END
$$;

-- The same exchange the order service publishes to, the queue, and the
-- binding between them; the consumer declares all three on the broker.
SELECT mqtx.declare_exchange('orders', 'topic');
SELECT mqtx.subscribe('dispatch.orders', 'dispatch_order(jsonb, jsonb)',
					  prefetch => 500, max_attempts => 3);
SELECT mqtx.bind('dispatch.orders', 'orders', 'order.created');
