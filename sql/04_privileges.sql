--
-- Privileges: publishing is granted, the outbox itself is not
--
CREATE ROLE mqtx_regress_app;
CREATE ROLE mqtx_regress_other;
GRANT mqtx_publisher TO mqtx_regress_app;
GRANT CREATE ON SCHEMA public TO mqtx_regress_app, mqtx_regress_other;

TRUNCATE mqtx.outbox;
SELECT mqtx.publish('orders', 'someone.else', '{"secret": true}') IS NOT NULL AS enqueued;

SET ROLE mqtx_regress_app;

-- a publisher can enqueue, directly or through its own table's trigger
SELECT mqtx.publish('orders', 'app.event', '{"n": 1}') IS NOT NULL AS enqueued;
CREATE TABLE app_orders (id int PRIMARY KEY, what text);
CREATE TRIGGER app_orders_outbox AFTER INSERT ON app_orders
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('orders', 'app.order');
INSERT INTO app_orders VALUES (1, 'tea');

-- but cannot read, change or remove messages
SELECT count(*) FROM mqtx.outbox;
UPDATE mqtx.outbox SET status = 'published', published_at = now();
DELETE FROM mqtx.outbox;
INSERT INTO mqtx.outbox (exchange, routing_key, payload) VALUES ('x', 'y', '{}');
TRUNCATE mqtx.outbox;

-- nor see the broker URL, nor lift the payload limit
SHOW mqtx.broker_url;
SELECT current_setting('mqtx.broker_url');
SELECT count(*) FROM pg_settings WHERE name = 'mqtx.broker_url';
SET mqtx.max_payload = '100MB';

RESET ROLE;

-- a role that was not granted publishing can do neither
SET ROLE mqtx_regress_other;
SELECT mqtx.publish('orders', 'other.event', '{}');
CREATE TABLE other_orders (id int);
CREATE TRIGGER other_outbox AFTER INSERT ON other_orders
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('orders', 'other.order');
SELECT count(*) FROM mqtx.outbox;
RESET ROLE;

-- the app's messages are there, unchanged, and nothing else was written
SELECT routing_key, payload, status FROM mqtx.outbox ORDER BY id;

-- a trigger owned by the app still enqueues when someone else inserts
GRANT INSERT ON app_orders TO mqtx_regress_other;
SET ROLE mqtx_regress_other;
INSERT INTO app_orders VALUES (2, 'coffee');
RESET ROLE;
SELECT routing_key, payload FROM mqtx.outbox WHERE routing_key = 'app.order' ORDER BY id;

DROP TABLE app_orders, other_orders;
REVOKE CREATE ON SCHEMA public FROM mqtx_regress_app, mqtx_regress_other;
DROP ROLE mqtx_regress_app, mqtx_regress_other;
