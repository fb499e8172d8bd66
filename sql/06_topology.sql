--
-- Topology stored for the workers, and the observability views
--
SELECT mqtx.declare_exchange('order.exchange', 'topic');
SELECT mqtx.declare_exchange('audit', 'fanout', false);
SELECT mqtx.declare_queue('dispatch');
SELECT mqtx.declare_queue('dispatch.retry', true, '{"x-message-ttl": 5000, "x-dead-letter-exchange": "order.exchange"}');
SELECT mqtx.bind('dispatch', 'order.exchange', 'order.*');
SELECT mqtx.bind('dispatch', 'order.exchange', 'order.*');	-- idempotent
SELECT mqtx.bind('dispatch', 'audit');

-- declaring again updates in place
SELECT mqtx.declare_exchange('audit', 'fanout', true);

SELECT name, type, durable FROM mqtx.exchanges ORDER BY name;
SELECT name, durable, arguments FROM mqtx.queues ORDER BY name;
SELECT queue, exchange, routing_key FROM mqtx.bindings ORDER BY 1, 2, 3;

-- what the broker would refuse is refused here
SELECT mqtx.bind('nowhere', 'order.exchange', 'x');
SELECT mqtx.bind('dispatch', 'nowhere', 'x');
SELECT mqtx.declare_exchange('amq.topic', 'topic');
SELECT mqtx.declare_exchange('', 'direct');
SELECT mqtx.declare_queue(repeat('q', 256));
SELECT mqtx.declare_queue('q', true, '[1]');

-- dropping a queue drops its bindings
DELETE FROM mqtx.queues WHERE name = 'dispatch';
SELECT count(*) FROM mqtx.bindings;

-- outbox_stats counts by status
TRUNCATE mqtx.outbox;
SELECT * FROM mqtx.outbox_stats;
SELECT mqtx.publish('order.exchange', 'order.created', '{}') IS NOT NULL AS enqueued;
SELECT mqtx.publish('order.exchange', 'order.created', '{}') IS NOT NULL AS enqueued;
SELECT mqtx.publish('order.exchange', 'order.created', '{}') IS NOT NULL AS enqueued;
UPDATE mqtx.outbox SET status = 'published', published_at = now()
	WHERE id = (SELECT min(id) FROM mqtx.outbox);
UPDATE mqtx.outbox SET status = 'failed'
	WHERE id = (SELECT max(id) FROM mqtx.outbox);
SELECT pending, published, failed, oldest_pending_age >= '0'::interval AS has_age
FROM mqtx.outbox_stats;

-- one relay row per served database (no broker is configured here)
SELECT database, broker_connected, broker_blocked, published, nacked, returned, retried, failed, reconnects
FROM mqtx.relay_stats;

-- topology and stats are for the extension's owner, not for publishers
CREATE ROLE mqtx_regress_app;
SELECT mqtx.grant_publish('mqtx_regress_app');
SET ROLE mqtx_regress_app;
SELECT mqtx.declare_queue('sneaky');
SELECT * FROM mqtx.outbox_stats;
RESET ROLE;
DROP OWNED BY mqtx_regress_app;
DROP ROLE mqtx_regress_app;

-- two-phase commit: a topology change cannot be prepared (COMMIT PREPARED
-- would never tell the workers), an enqueue can
BEGIN;
SELECT mqtx.declare_exchange('two_phase');
PREPARE TRANSACTION 'mqtx_topology';
SELECT count(*) AS declared FROM mqtx.exchanges WHERE name = 'two_phase';
SELECT count(*) AS prepared FROM pg_prepared_xacts WHERE gid = 'mqtx_topology';
BEGIN;
SELECT mqtx.publish('orders', 'two.phase', '{"n": 1}') IS NOT NULL AS enqueued;
PREPARE TRANSACTION 'mqtx_enqueue';
COMMIT PREPARED 'mqtx_enqueue';
SELECT count(*) AS enqueued FROM mqtx.outbox WHERE routing_key = 'two.phase';
-- a change rolled back with its savepoint is no change; one released is
BEGIN;
SAVEPOINT change;
SELECT mqtx.declare_exchange('two_phase_rolled_back');
ROLLBACK TO SAVEPOINT change;
SELECT mqtx.publish('orders', 'two.phase', '{"n": 2}') IS NOT NULL AS enqueued;
PREPARE TRANSACTION 'mqtx_savepoint';
COMMIT PREPARED 'mqtx_savepoint';
SELECT count(*) AS enqueued FROM mqtx.outbox WHERE routing_key = 'two.phase';
BEGIN;
SAVEPOINT change;
SELECT mqtx.declare_exchange('two_phase_released');
RELEASE SAVEPOINT change;
PREPARE TRANSACTION 'mqtx_released';
SELECT count(*) AS declared FROM mqtx.exchanges WHERE name LIKE 'two_phase%';
