/* mqtx--0.3.0--0.4.0.sql: time-ordered message ids, retention by index */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION mqtx UPDATE TO '0.4.0'" to load this file. \quit

-- Message ids are UUIDs of version 7: time first, so that ids made later
-- sort later and the unique index on them grows at its right edge.
CREATE FUNCTION mqtx.new_message_id()
RETURNS uuid
AS 'MODULE_PATHNAME', 'mqtx_new_message_id_sql'
LANGUAGE C VOLATILE PARALLEL SAFE;

COMMENT ON FUNCTION mqtx.new_message_id() IS
	'A new message id: a time-ordered UUID (version 7)';

ALTER TABLE mqtx.outbox ALTER COLUMN message_id SET DEFAULT mqtx.new_message_id();

-- Retention deletes published rows oldest first: with this index a pass
-- reads what it deletes, not the history it keeps.  Building it reads the
-- outbox once and blocks writes to it meanwhile (a few seconds for a
-- million published rows).
CREATE INDEX outbox_published_at_idx ON mqtx.outbox (published_at)
	WHERE status = 'published';

REVOKE ALL ON FUNCTION mqtx.new_message_id() FROM PUBLIC;
