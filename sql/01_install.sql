--
-- Installing mqtx: objects, settings, broker URL validation
--
CREATE EXTENSION mqtx;

-- the schema comes from the control file and mqtx cannot be moved
SELECT extname, extversion, extrelocatable, extnamespace::regnamespace
FROM pg_extension WHERE extname = 'mqtx';

-- every member object, by kind
SELECT pg_describe_object(classid, objid, objsubid) AS member
FROM pg_depend
WHERE refclassid = 'pg_extension'::regclass
  AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'mqtx')
  AND deptype = 'e'
ORDER BY 1;

-- the outbox's shape and constraints
SELECT attname, format_type(atttypid, atttypmod), attnotnull,
       pg_get_expr(adbin, adrelid) AS default_value, attidentity
FROM pg_attribute LEFT JOIN pg_attrdef ON adrelid = attrelid AND adnum = attnum
WHERE attrelid = 'mqtx.outbox'::regclass AND attnum > 0 AND NOT attisdropped
ORDER BY attnum;

SELECT conname, pg_get_constraintdef(oid)
FROM pg_constraint WHERE conrelid = 'mqtx.outbox'::regclass ORDER BY conname;

SELECT indexrelid::regclass, pg_get_indexdef(indexrelid)
FROM pg_index WHERE indrelid = 'mqtx.outbox'::regclass ORDER BY 1;

-- pending messages survive pg_dump; published history does not
SELECT extconfig::regclass[], extcondition
FROM pg_extension WHERE extname = 'mqtx';

-- settings, with their defaults, units and bounds
SELECT name, boot_val, unit, context, vartype, min_val, max_val
FROM pg_settings WHERE name LIKE 'mqtx.%' ORDER BY name;

-- mqtx.max_payload bounds
SET mqtx.max_payload = '512';
SET mqtx.max_payload = '129MB';
SET mqtx.max_payload = '2kB';
SHOW mqtx.max_payload;
RESET mqtx.max_payload;

-- unknown settings in the mqtx prefix are typos, not placeholders
SET mqtx.no_such_setting = 1;

-- broker URL validation; the password never appears in the error
ALTER SYSTEM SET mqtx.broker_url = 'http://guest:guest@localhost/';
ALTER SYSTEM SET mqtx.broker_url = 'amqp://mqtx:s3cret@localhost:99999/%2f';
ALTER SYSTEM SET mqtx.broker_url = 'amqp://mqtx:s3cret@:5672/%2f';
ALTER SYSTEM SET mqtx.broker_url = 'amqps://mqtx:s3cret@localhost/';
ALTER SYSTEM SET mqtx.broker_url = 'amqp://mqtx:s3cret@localhost/a/b';
ALTER SYSTEM SET mqtx.broker_url = 'amqp://mqtx:s3cret@localhost/%zz';
ALTER SYSTEM SET mqtx.broker_url = 'amqp://mqtx:s3cret@localhost:5672/%2f';
ALTER SYSTEM SET mqtx.broker_url = 'amqps://mqtx:s3cret@[::1]:5671/orders';
ALTER SYSTEM SET mqtx.broker_url = 'amqp://localhost';
-- the nodes of a cluster, as a list (a comma separates URLs only before
-- another amqp[s]:// URL: p,w is a password); a bad URL is named by place
ALTER SYSTEM SET mqtx.broker_url = 'amqp://mqtx:s3cret@node1:5672/%2f, amqp://mqtx:s3cret@node2:5672/%2f,amqps://mqtx:p,w@node3/%2f';
ALTER SYSTEM SET mqtx.broker_url = 'amqp://mqtx:s3cret@node1:5672/%2f, amqp://mqtx:s3cret@node2:5672/';
ALTER SYSTEM SET mqtx.broker_url = '';
ALTER SYSTEM RESET mqtx.broker_url;

-- it is a server setting, not a session one
SET mqtx.broker_url = 'amqp://localhost';
