-- The order service's database.  Orders are written with plain SQL; the
-- outbox trigger turns every new row into an "order.created" message in the
-- same transaction, and mqtx's relay worker delivers it to RabbitMQ.
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
	created_at	timestamptz NOT NULL DEFAULT now()
);

-- Each inserted row becomes the message body, as JSON:
--   {"order_id": 1, "user_id": 42, "content": {...}, "created_at": "..."}
-- It is committed with the order or not at all.
CREATE TRIGGER orders_outbox
	AFTER INSERT ON orders
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('orders', 'order.created');
