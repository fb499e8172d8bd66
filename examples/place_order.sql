-- One order, as the application would place it (a pgbench script: the
-- demo runs it from several concurrent clients).  Each order is a request
-- in a trace of its own: the W3C traceparent, made up here as a tracing
-- library would, goes with the order's message and with every message
-- that follows from it, in both services.  (The benchmarks measure the
-- bare INSERT: they drop the lines marked "-- trace".)
\set user_id random(1, 100000)
\set city random(1, 5)
\set sku random(1, 500)
BEGIN; -- trace
SELECT set_config('mqtx.traceparent', '00-' || md5(random()::text) || '-' || left(md5(random()::text), 16) || '-01', true); -- trace
INSERT INTO orders (user_id, content)
VALUES (:user_id,
		jsonb_build_object(
			'city', (ARRAY['Berlin', 'Paris', 'Madrid', 'Rome', 'Vienna'])[:city],
			'items', jsonb_build_array(
				jsonb_build_object('sku', 'SKU-' || :sku, 'qty', 1 + :user_id % 3))));
COMMIT; -- trace
