-- The order service's database.  Orders are written with plain SQL; the
-- outbox trigger turns every new row into an "order.created" message in the
-- same transaction, and mqtx's relay worker delivers it to RabbitMQ.  The
-- dispatch service answers each order with "dispatch.created" or, when it
-- gives up on one, "dispatch.failed"; mqtx's consumer applies the answers
-- here, and each order ends "dispatched" or "dispatch_failed".
--
-- postgresql.conf of this cluster:
--   shared_preload_libraries = 'mqtx'
--   mqtx.database = 'shop'
--   mqtx.broker_url = 'amqp://user:password@broker:5672/%2f'

CREATE EXTENSION IF NOT EXISTS mqtx;

-- Where order events go.  The relay declares it on the broker whenever it
-- connects, so a fresh broker needs no manual setup.
SELECT mqtx.declare_exchange('orders', 'topic');

CREATE TABLE orders (
	order_id	bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	user_id		bigint NOT NULL,
	content		jsonb NOT NULL,
	created_at	timestamptz NOT NULL DEFAULT now(),
	-- placed, until the dispatch service answers; then final
	status		text NOT NULL DEFAULT 'placed'
		CHECK (status IN ('placed', 'dispatched', 'dispatch_failed')),
	depot		text,
	failure_reason text,
	answered_at timestamptz
);

-- Each inserted row becomes the message body, as JSON:
--   {"order_id": 1, "user_id": 42, "content": {...}, "created_at": "...", ...}
-- It is committed with the order or not at all.
CREATE TRIGGER orders_outbox
	AFTER INSERT ON orders
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('orders', 'order.created');

-- The answers.  An order is answered once: a second, different answer is an
-- inconsistency between the services, and the handler refuses it (it ends
-- in mqtx.dead_letter, for someone to look at).  A repeated answer cannot
-- arrive: mqtx's inbox drops redeliveries before the handler runs.
CREATE FUNCTION answer_order(payload jsonb, new_status text) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
	id bigint := (payload ->> 'order_id')::bigint;
	current_status text;
BEGIN
	SELECT status INTO current_status FROM orders WHERE order_id = id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'no order %', coalesce(id::text, '(none)');
	ELSIF current_status <> 'placed' THEN
		RAISE EXCEPTION 'order % is % already, cannot become %', id, current_status, new_status;
	END IF;
	UPDATE orders
	   SET status = new_status, depot = payload ->> 'depot',
		   failure_reason = payload ->> 'reason', answered_at = clock_timestamp()
	 WHERE order_id = id;
END
$$;

CREATE FUNCTION order_dispatched(payload jsonb, headers jsonb) RETURNS void
LANGUAGE sql AS $$ SELECT answer_order(payload, 'dispatched') $$;

-- The compensation: the order is not going to be delivered.  (A real shop
-- would refund the payment and tell the customer here, in this transaction.)
CREATE FUNCTION order_dispatch_failed(payload jsonb, headers jsonb) RETURNS void
LANGUAGE sql AS $$ SELECT answer_order(payload, 'dispatch_failed') $$;

SELECT mqtx.declare_exchange('dispatch', 'topic');
SELECT mqtx.subscribe('orders.dispatched', 'order_dispatched(jsonb, jsonb)', prefetch => 500);
SELECT mqtx.bind('orders.dispatched', 'dispatch', 'dispatch.created');
SELECT mqtx.subscribe('orders.dispatch_failed', 'order_dispatch_failed(jsonb, jsonb)');
SELECT mqtx.bind('orders.dispatch_failed', 'dispatch', 'dispatch.failed');
