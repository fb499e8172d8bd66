/*
 * mqtx 0.5.0 -> 0.6.0: mqtx.broker_url may list a cluster's nodes, and
 * mqtx.broker_connections says which node each worker is connected to.
 * Nothing existing changes.
 */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION mqtx UPDATE TO '0.6.0'" to load this file. \quit

-- Which broker node each worker is on: once mqtx.broker_url lists a
-- cluster's nodes, the one a worker reached is worth knowing.
CREATE FUNCTION mqtx.broker_connections(
	OUT database text, OUT worker text, OUT pid integer,
	OUT broker text, OUT connected_since timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'mqtx_broker_connections'
LANGUAGE C VOLATILE;

COMMENT ON FUNCTION mqtx.broker_connections() IS
	'Per served database and worker: its process and the broker node it is connected to, since when';

CREATE VIEW mqtx.broker_connections AS SELECT * FROM mqtx.broker_connections();

COMMENT ON VIEW mqtx.broker_connections IS
	'Per served database and worker (relay, consumer): the broker node it is connected to';
COMMENT ON COLUMN mqtx.broker_connections.database IS
	'A database the workers serve (mqtx.database)';
COMMENT ON COLUMN mqtx.broker_connections.worker IS
	'relay or consumer';
COMMENT ON COLUMN mqtx.broker_connections.pid IS
	'The worker''s process id; NULL while it is not running';
COMMENT ON COLUMN mqtx.broker_connections.broker IS
	'The node it is connected to, as amqp[s]://host:port (one of mqtx.broker_url''s URLs, without credentials); NULL while not connected';
COMMENT ON COLUMN mqtx.broker_connections.connected_since IS
	'When that connection was made; NULL while not connected';

-- as everything in the schema: its owner's until granted
REVOKE ALL ON FUNCTION mqtx.broker_connections() FROM PUBLIC;
REVOKE ALL ON mqtx.broker_connections FROM PUBLIC;
