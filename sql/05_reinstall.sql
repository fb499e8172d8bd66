--
-- Dropping and recreating the extension within one session
--
DROP EXTENSION mqtx CASCADE;
-- the schema CREATE EXTENSION made is left behind, empty
SELECT count(*) FROM pg_class WHERE relnamespace = 'mqtx'::regnamespace;
SELECT count(*) FROM pg_proc WHERE pronamespace = 'mqtx'::regnamespace;
-- and it grants nothing to anyone but its owner (04 took back what it gave)
SELECT count(*) FROM pg_namespace n, aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a
WHERE n.nspname = 'mqtx' AND a.grantee <> n.nspowner;

CREATE EXTENSION mqtx;
-- the cached insert plan follows the new table
SELECT mqtx.publish('orders', 'after.reinstall', '{}') IS NOT NULL AS enqueued;
SELECT routing_key, status FROM mqtx.outbox;
-- and so does the orders trigger, recreated on the new function
CREATE TRIGGER orders_outbox AFTER INSERT ON orders
	FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('order.exchange', 'order.created');
INSERT INTO orders (order_id, user_id, content) VALUES (7, 70, 'after reinstall');
SELECT routing_key, payload ->> 'order_id' AS order_id FROM mqtx.outbox ORDER BY id;
