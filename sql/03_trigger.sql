--
-- mqtx.outbox_trigger(): enqueue inserted rows in the inserting transaction
--
CREATE TABLE orders (
	order_id	bigint PRIMARY KEY,
	user_id		bigint NOT NULL,
	content		text NOT NULL,
	created_at	timestamptz NOT NULL DEFAULT '2026-01-01 00:00:00+00'
);

CREATE TRIGGER orders_outbox AFTER INSERT ON orders
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('order.exchange', 'order.created');

TRUNCATE mqtx.outbox;

INSERT INTO orders (order_id, user_id, content) VALUES (1, 10, 'one book');
INSERT INTO orders (order_id, user_id, content)
	SELECT g, g * 10, 'item ' || g FROM generate_series(2, 4) g;

-- one message per row, the row as a JSON object
SELECT exchange, routing_key, payload, headers, status
FROM mqtx.outbox ORDER BY id;

SELECT count(*) = 4 AS one_message_per_order,
       bool_and(payload = to_jsonb(o)) AS payload_is_the_row
FROM mqtx.outbox JOIN orders o ON (payload ->> 'order_id')::bigint = o.order_id;

-- rolled back with the order
BEGIN;
INSERT INTO orders (order_id, user_id, content) VALUES (5, 50, 'never happened');
ROLLBACK;
SELECT count(*) FROM mqtx.outbox WHERE payload ->> 'order_id' = '5';

-- an order the outbox rejects is not written either
SET mqtx.max_payload = '1kB';
INSERT INTO orders (order_id, user_id, content) VALUES (6, 60, repeat('x', 2000));
RESET mqtx.max_payload;
SELECT count(*) FROM orders WHERE order_id = 6;

-- misuse gets an error naming the fix
CREATE TABLE misuse (id int);
CREATE TRIGGER t BEFORE INSERT ON misuse
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('ex', 'rk');
INSERT INTO misuse VALUES (1);
DROP TRIGGER t ON misuse;

CREATE TRIGGER t AFTER INSERT ON misuse
	FOR EACH STATEMENT EXECUTE FUNCTION mqtx.outbox_trigger('ex', 'rk');
INSERT INTO misuse VALUES (1);
DROP TRIGGER t ON misuse;

CREATE TRIGGER t AFTER UPDATE ON misuse
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('ex', 'rk');
INSERT INTO misuse VALUES (1);
UPDATE misuse SET id = 2;
DROP TRIGGER t ON misuse;

CREATE TRIGGER t AFTER DELETE ON misuse
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('ex', 'rk');
DELETE FROM misuse;
DROP TRIGGER t ON misuse;

CREATE TRIGGER t AFTER INSERT ON misuse
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger();
INSERT INTO misuse VALUES (1);
DROP TRIGGER t ON misuse;

CREATE TRIGGER t AFTER INSERT ON misuse
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('ex');
INSERT INTO misuse VALUES (1);
DROP TRIGGER t ON misuse;

CREATE TRIGGER t AFTER INSERT ON misuse
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('ex', 'rk', 'extra');
INSERT INTO misuse VALUES (1);
DROP TRIGGER t ON misuse;

CREATE VIEW misuse_view AS SELECT id FROM misuse;
CREATE TRIGGER t INSTEAD OF INSERT ON misuse_view
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('ex', 'rk');
INSERT INTO misuse_view VALUES (1);
DROP VIEW misuse_view;

-- the trigger's arguments are checked like publish()'s
CREATE TRIGGER t AFTER INSERT ON misuse
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('ex', 'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk');
INSERT INTO misuse VALUES (1);
DROP TRIGGER t ON misuse;

-- not callable as a plain function
SELECT mqtx.outbox_trigger();

-- none of the misuse above enqueued anything, and every failed insert was
-- rolled back (the one row is the insert made under the UPDATE trigger)
SELECT count(*) FROM mqtx.outbox WHERE exchange = 'ex';
SELECT count(*) FROM misuse;

-- the arguments after the routing key name the columns that make the
-- ordering key: one column's value, or several joined by '/'; NULL
-- values make no key
TRUNCATE mqtx.outbox;
CREATE TABLE order_events (order_id int, region text, event text);
CREATE TRIGGER by_order AFTER INSERT ON order_events
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('orders', 'order.event', 'order_id');
INSERT INTO order_events VALUES (42, 'eu', 'created'), (42, 'eu', 'paid'), (NULL, 'eu', 'lost');
DROP TRIGGER by_order ON order_events;
CREATE TRIGGER by_region_order AFTER INSERT ON order_events
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('orders', 'order.event', 'region', 'order_id');
INSERT INTO order_events VALUES (7, 'us', 'created'), (NULL, 'us', 'odd'), (NULL, NULL, 'none');
SELECT payload->>'event' AS event, ordering_key FROM mqtx.outbox ORDER BY id;
DROP TABLE order_events;
TRUNCATE mqtx.outbox;
