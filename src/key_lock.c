/*-------------------------------------------------------------------------
 *
 * key_lock.c
 *	  mqtx.lock_key and mqtx.try_lock_key: a transaction's lock on a
 *	  business key, the in-database stand-in for a distributed lock such
 *	  as Redis SETNX on an order number.
 *
 * The lock is an advisory lock of mqtx's own class (objsubid 28019 in
 * pg_locks), so it never meets the application's pg_advisory_xact_lock()
 * nor mqtx's ordering-key locks, on a 64-bit hash of the key's bytes
 * (hash_bytes_extended, seed 0).  Two keys that share a hash only wait for
 * each other.  It is held to the end of the transaction: the work it
 * guards commits or rolls back before another transaction gets the key,
 * and no crash leaves it held.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "common/hashfn.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/lock.h"
#include "utils/builtins.h"

#define BUSINESS_KEY_LOCK_CLASS 0x6D73

/* looked up by name in a library of hidden symbols (see outbox.c) */
extern PGDLLEXPORT Datum mqtx_lock_key(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum mqtx_try_lock_key(PG_FUNCTION_ARGS);

PG_FUNCTION_INFO_V1(mqtx_lock_key);
PG_FUNCTION_INFO_V1(mqtx_try_lock_key);

static LockAcquireResult
lock_business_key(FunctionCallInfo fcinfo, bool dont_wait)
{
	LOCKTAG		tag;
	text	   *key;
	uint64		hash;

	/* a NULL key would lock nothing, and the caller would believe otherwise */
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s needs a key", dont_wait ? "mqtx.try_lock_key" : "mqtx.lock_key")));
	key = PG_GETARG_TEXT_PP(0);
	hash = hash_bytes_extended((const unsigned char *) VARDATA_ANY(key),
							   VARSIZE_ANY_EXHDR(key), 0);

	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, (uint32) (hash >> 32), (uint32) hash,
						 BUSINESS_KEY_LOCK_CLASS);
	return LockAcquire(&tag, ExclusiveLock, false, dont_wait);
}

Datum
mqtx_lock_key(PG_FUNCTION_ARGS)
{
	(void) lock_business_key(fcinfo, false);
	PG_RETURN_VOID();
}

Datum
mqtx_try_lock_key(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(lock_business_key(fcinfo, true) != LOCKACQUIRE_NOT_AVAIL);
}
