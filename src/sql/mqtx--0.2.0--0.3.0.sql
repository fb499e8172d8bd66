/* mqtx--0.2.0--0.3.0.sql: what the broker blocks and refuses, in view */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION mqtx UPDATE TO '0.3.0'" to load this file. \quit

--
-- mqtx.relay_stats says whether the broker has blocked the relay's
-- connection (connection.blocked, under a memory or disk alarm).  The new
-- column comes after broker_connected, so the function and its view are
-- made again, with the extension's own privileges: whatever was granted on
-- them besides goes with the old ones, and the upgrade names the roles that
-- lose it rather than granting it back (a grant made by an extension script
-- becomes one of the extension's initial privileges, which pg_dump leaves
-- out, and which a fresh install does not have).
--
DO $$
DECLARE
	lost text;
BEGIN
	SELECT pg_catalog.string_agg(g.grantee || ' (' || g.privileges || ')', ', '
								 ORDER BY g.grantee)
	  INTO lost
	  FROM (SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC'
					    ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(a.grantee))
				   END AS grantee,
				   pg_catalog.string_agg(a.privilege_type || ' on ' || o.name, ', '
										 ORDER BY o.name, a.privilege_type) AS privileges
			  FROM (SELECT 'view mqtx.relay_stats' AS name, c.relacl AS acl, c.relowner AS owner
					  FROM pg_catalog.pg_class c
					 WHERE c.oid = 'mqtx.relay_stats'::pg_catalog.regclass
					UNION ALL
					SELECT pg_catalog.format('column %I of view mqtx.relay_stats', at.attname),
						   at.attacl, c.relowner
					  FROM pg_catalog.pg_attribute at
					  JOIN pg_catalog.pg_class c ON c.oid = at.attrelid
					 WHERE at.attrelid = 'mqtx.relay_stats'::pg_catalog.regclass
					   AND at.attnum > 0
					UNION ALL
					SELECT 'function mqtx.relay_stats()', p.proacl, p.proowner
					  FROM pg_catalog.pg_proc p
					 WHERE p.oid = 'mqtx.relay_stats()'::pg_catalog.regprocedure) o,
				   pg_catalog.aclexplode(o.acl) a
			 WHERE a.grantee <> o.owner
			 GROUP BY a.grantee) g;
	IF lost IS NOT NULL THEN
		RAISE WARNING USING
			MESSAGE = pg_catalog.format('mqtx: the privileges granted on mqtx.relay_stats in database %I are gone: %s',
										pg_catalog.current_database(), lost),
			DETAIL = 'mqtx 0.3.0 adds the column broker_blocked to mqtx.relay_stats; the view and its function are made again, with the extension''s own privileges only.',
			HINT = 'Grant them again: reading the view needs SELECT on it and EXECUTE on FUNCTION mqtx.relay_stats().';
	END IF;
END
$$;

DROP VIEW mqtx.relay_stats;
DROP FUNCTION mqtx.relay_stats();

CREATE FUNCTION mqtx.relay_stats(
	OUT database text, OUT pid integer, OUT broker_connected boolean,
	OUT broker_blocked boolean,
	OUT published bigint, OUT nacked bigint, OUT returned bigint,
	OUT retried bigint, OUT failed bigint, OUT reconnects bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'mqtx_relay_stats'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION mqtx.relay_stats() IS
	'Per served database: the relay process, whether it is connected, whether the broker has blocked its connection (connection.blocked: a memory or disk alarm), and its counters since server start';

CREATE VIEW mqtx.relay_stats AS SELECT * FROM mqtx.relay_stats();

-- nothing in schema mqtx is public (the install script revokes it at its end)
REVOKE ALL ON FUNCTION mqtx.relay_stats() FROM PUBLIC;
REVOKE ALL ON TABLE mqtx.relay_stats FROM PUBLIC;

-- What the broker refused, one row per object: a worker skips an exchange,
-- queue, binding or subscription the broker will not take, goes on with
-- the rest, and tries it again later.  Only the workers write here, and a
-- row goes when its object is declared or consumed again.  It is the
-- workers' transient state, not the application's: pg_dump leaves it out.
CREATE TABLE mqtx.broker_errors (
	worker			text NOT NULL,
	object_type		text NOT NULL,
	object_name		text NOT NULL,
	error			text NOT NULL,
	failures		integer NOT NULL DEFAULT 1,
	first_failed_at timestamptz NOT NULL DEFAULT now(),
	last_failed_at	timestamptz NOT NULL DEFAULT now(),
	next_try_at		timestamptz,
	PRIMARY KEY (worker, object_type, object_name),
	CONSTRAINT broker_errors_worker_check CHECK (worker IN ('relay', 'consumer')),
	CONSTRAINT broker_errors_object_type_check
		CHECK (object_type IN ('exchange', 'queue', 'binding', 'subscription')),
	CONSTRAINT broker_errors_failures_check CHECK (failures > 0)
);

COMMENT ON TABLE mqtx.broker_errors IS
	'Exchanges, queues, bindings and subscriptions the broker refused, which the workers skip and try again; a row goes when its object is declared or consumed again';
COMMENT ON COLUMN mqtx.broker_errors.worker IS
	'Which worker the broker refused: relay or consumer';
COMMENT ON COLUMN mqtx.broker_errors.object_type IS
	'exchange, queue, binding or subscription';
COMMENT ON COLUMN mqtx.broker_errors.object_name IS
	'The exchange or queue; for a binding, queue <- exchange (routing key); for a subscription, its queue';
COMMENT ON COLUMN mqtx.broker_errors.error IS
	'The broker''s reply, as in 503 COMMAND_INVALID - unknown exchange type ''x-delayed-message''';
COMMENT ON COLUMN mqtx.broker_errors.failures IS
	'How many times in a row the broker refused the object';
COMMENT ON COLUMN mqtx.broker_errors.next_try_at IS
	'When the worker next tries the object';

REVOKE ALL ON TABLE mqtx.broker_errors FROM PUBLIC;
