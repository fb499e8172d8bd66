--
-- The idempotency toolkit: idempotency keys, one-use tokens, business key
-- locks, and the rights to use them.  (Two sessions at once: TAP,
-- test/t/094_idempotency.pl.)
--
-- an idempotency key: the first claim does the work and stores the result
BEGIN;
SELECT * FROM mqtx.claim_idempotency_key('payments', 'key-1', request => '{"amount": 10}');
SELECT mqtx.complete_idempotency_key('payments', 'key-1', '{"payment_id": 7}');
COMMIT;
-- a later claim gets that result, and does nothing
SELECT * FROM mqtx.claim_idempotency_key('payments', 'key-1', request => '{"amount": 10}');
SELECT * FROM mqtx.claim_idempotency_key('payments', 'key-1');
-- another scope is another key
SELECT claimed FROM mqtx.claim_idempotency_key('refunds', 'key-1');
-- the same key for another request is refused (terse: the details have
-- the time of the claim)
\set VERBOSITY terse
SELECT * FROM mqtx.claim_idempotency_key('payments', 'key-1', request => '{"amount": 99}');
-- a claim rolled back leaves the key free
BEGIN;
SELECT claimed FROM mqtx.claim_idempotency_key('payments', 'key-2');
ROLLBACK;
SELECT claimed FROM mqtx.claim_idempotency_key('payments', 'key-2');
-- ... and one committed without its result says so (key-2 just now)
SELECT * FROM mqtx.claim_idempotency_key('payments', 'key-2');
\set VERBOSITY default
-- an expired key is claimed afresh
UPDATE mqtx.idempotency_keys SET expires_at = now() - interval '1 second'
 WHERE scope = 'payments' AND key = 'key-1';
SELECT * FROM mqtx.claim_idempotency_key('payments', 'key-1', interval '1 hour', '{"amount": 99}');
SELECT key, request, result IS NULL AS no_result, expires_at > now() + interval '59 minutes' AS one_hour
FROM mqtx.idempotency_keys WHERE scope = 'payments' ORDER BY key;
-- bad input
SELECT * FROM mqtx.claim_idempotency_key(NULL, 'k');
SELECT * FROM mqtx.claim_idempotency_key('payments', 'k', interval '0');
SELECT mqtx.complete_idempotency_key('payments', 'never-claimed', '{}');
SELECT mqtx.complete_idempotency_key('refunds', 'key-1', '{}');
SELECT mqtx.complete_idempotency_key('refunds', 'key-1', '{}');

-- a token is issued for an hour, or for its ttl
SELECT mqtx.issue_token('checkout') AS issued \gset
SELECT purpose, expires_at - issued_at AS valid_for, consumed_at FROM mqtx.tokens WHERE token = :'issued';
SELECT mqtx.consume_token(:'issued', 'checkout');
-- (the tokens of the errors below are known, for their messages)
INSERT INTO mqtx.tokens (token, purpose, expires_at) VALUES
	('00000000-0000-0000-0000-000000000001', 'checkout', now() + interval '1 hour'),
	('00000000-0000-0000-0000-000000000003', 'checkout', now() + interval '1 hour');
SELECT '00000000-0000-0000-0000-000000000001' AS token \gset
-- and consumed once
SELECT mqtx.consume_token(:'token', 'checkout');
\set VERBOSITY terse
SELECT mqtx.consume_token(:'token', 'checkout');
\set VERBOSITY default
SELECT consumed_at IS NOT NULL AS consumed FROM mqtx.tokens WHERE token = :'token';
-- a consume rolled back leaves it usable
SELECT mqtx.issue_token('checkout', interval '10 minutes') AS token2 \gset
BEGIN;
SELECT mqtx.consume_token(:'token2', 'checkout');
ROLLBACK;
SELECT mqtx.consume_token(:'token2', 'checkout');
-- of another purpose, expired, never issued
SELECT '00000000-0000-0000-0000-000000000003' AS token3 \gset
SELECT mqtx.consume_token(:'token3', 'refund') IS NULL AS refused;
UPDATE mqtx.tokens SET expires_at = now() - interval '1 second' WHERE token = :'token3';
\set VERBOSITY terse
SELECT mqtx.consume_token(:'token3', 'checkout');
\set VERBOSITY default
SELECT mqtx.consume_token('00000000-0000-0000-0000-000000000009', 'checkout');
SELECT mqtx.issue_token(NULL);
SELECT mqtx.issue_token('checkout', interval '-1 hour');
-- expired rows go: a few with each claim and issue, or all at once
INSERT INTO mqtx.tokens (purpose, expires_at)
SELECT 'old', now() - interval '1 minute' FROM generate_series(1, 5);
INSERT INTO mqtx.idempotency_keys (scope, key, expires_at)
SELECT 'old', g::text, now() - interval '1 minute' FROM generate_series(1, 5) g;
SELECT mqtx.purge_expired(2) AS purged_at_most_2_of_each;
SELECT mqtx.purge_expired();
SELECT (SELECT count(*) FROM mqtx.tokens WHERE expires_at <= now())
	 + (SELECT count(*) FROM mqtx.idempotency_keys WHERE expires_at <= now()) AS expired_left;

-- a business key lock, until the end of the transaction, of mqtx's own
-- advisory class
BEGIN;
SELECT mqtx.lock_key('order-42');
SELECT mqtx.try_lock_key('order-42') AS again_in_the_same_transaction;
SELECT locktype, objsubid, mode, granted FROM pg_locks
 WHERE locktype = 'advisory' AND pid = pg_backend_pid();
COMMIT;
SELECT count(*) AS held_after_commit FROM pg_locks
 WHERE locktype = 'advisory' AND pid = pg_backend_pid();
SELECT mqtx.lock_key(NULL);
SELECT mqtx.try_lock_key(NULL);

-- the rights: nobody has them until granted, and they can be taken back
CREATE ROLE mqtx_regress_api;
SET ROLE mqtx_regress_api;
SELECT * FROM mqtx.claim_idempotency_key('payments', 'key-3');
RESET ROLE;
SELECT mqtx.grant_idempotency('mqtx_regress_api');
SET ROLE mqtx_regress_api;
SELECT claimed FROM mqtx.claim_idempotency_key('payments', 'key-3');
SELECT mqtx.complete_idempotency_key('payments', 'key-3', '"done"');
SELECT mqtx.consume_token(mqtx.issue_token('checkout'), 'checkout');
SELECT mqtx.try_lock_key('order-43');
-- and nothing else of mqtx
SELECT count(*) FROM mqtx.outbox;
RESET ROLE;
SELECT mqtx.revoke_idempotency('mqtx_regress_api');
SET ROLE mqtx_regress_api;
SELECT * FROM mqtx.claim_idempotency_key('payments', 'key-3');
RESET ROLE;
REVOKE USAGE ON SCHEMA mqtx FROM mqtx_regress_api;
DROP ROLE mqtx_regress_api;
TRUNCATE mqtx.idempotency_keys, mqtx.tokens;
