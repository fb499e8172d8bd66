-- One order, as the application would place it (a pgbench script: the
-- demo runs it from several concurrent clients).
\set user_id random(1, 100000)
\set city random(1, 5)
\set sku random(1, 500)
INSERT INTO orders (user_id, content)
VALUES (:user_id,
		jsonb_build_object(
			'city', (ARRAY['Berlin', 'Paris', 'Madrid', 'Rome', 'Vienna'])[:city],
			'items', jsonb_build_array(
				jsonb_build_object('sku', 'SKU-' || :sku, 'qty', 1 + :user_id % 3))));
