/*-------------------------------------------------------------------------
 *
 * consumer.c
 *	  The consumer worker: applies messages from subscribed queues exactly
 *	  once in effect, retries failures with backoff and dead-letters what
 *	  cannot be applied.
 *
 * One consumer runs per database in mqtx.database and consumes every queue
 * in mqtx.subscriptions, with manual acks and a prefetch per queue.
 * Deliveries are applied in batches, one transaction per batch: for each,
 * the message id is recorded in mqtx.inbox (a unique key: a duplicate is
 * recognised there and acked without calling the handler) and the
 * subscription's handler runs.  The batch is tried in one subtransaction;
 * when anything in it fails, it is applied again with one subtransaction
 * per delivery.  Acks are sent only after the batch commits, so a crash at
 * any point means redelivery, and the inbox makes redelivery harmless.
 *
 * A handler error rolls back that delivery's subtransaction only.  The
 * attempt is recorded (mqtx.consumer_attempts, committed with the batch)
 * and the delivery is held, unacknowledged, until its backoff has passed:
 * no hot redelivery loop, and a crash while it waits hands it back to the
 * broker.  After max_attempts it is written to mqtx.dead_letter and acked.
 * A body that can never be applied (not UTF-8, not JSON, too large) is
 * dead-lettered at once.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <malloc.h>
#include <math.h>

#include "access/xact.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "common/cryptohash.h"
#include "common/pg_prng.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/interrupt.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "mqtx.h"

/* How long one wait for a delivery may block the loop. */
#define DELIVERY_WAIT_MS 100

static const char *const subscriptions_sql =
"SELECT queue, handler::oid, prefetch, max_attempts FROM mqtx.subscriptions ORDER BY queue";

static const char *const inbox_sql =
"INSERT INTO mqtx.inbox (queue, message_id) VALUES ($1, $2) "
"ON CONFLICT DO NOTHING";

static const char *const forget_attempts_sql =
"DELETE FROM mqtx.consumer_attempts WHERE queue = $1 AND message_id = $2";

static const char *const record_attempt_sql =
"INSERT INTO mqtx.consumer_attempts AS a (queue, message_id, attempts, last_error) "
"VALUES ($1, $2, 1, $3) "
"ON CONFLICT (queue, message_id) DO UPDATE "
"   SET attempts = a.attempts + 1, last_error = excluded.last_error, last_failed_at = pg_catalog.now() "
"RETURNING attempts";

/*
 * The alert names the dead letter and its queue, nothing of the message:
 * anyone who can connect may LISTEN, and the error text often quotes the
 * payload.  The rest is in mqtx.dead_letter, for whoever may read it.
 */
static const char *const dead_letter_sql =
"WITH attempt AS ("
"  DELETE FROM mqtx.consumer_attempts WHERE queue = $1 AND message_id = $2"
"  RETURNING first_failed_at"
"), letter AS ("
"  INSERT INTO mqtx.dead_letter (queue, message_id, exchange, routing_key, headers,"
"      body, body_text, body_json, error_message, error_detail, error_context,"
"      attempts, first_failed_at, last_failed_at)"
"  SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
"      coalesce((SELECT first_failed_at FROM attempt), pg_catalog.now()), pg_catalog.now()"
"  RETURNING id, queue"
") "
"SELECT id, pg_catalog.pg_notify('mqtx_dead_letter', pg_catalog.json_build_object("
"    'event', 'dead_letter', 'database', pg_catalog.current_database(),"
"    'id', id, 'queue', queue)::text) "
"FROM letter";

static const char *const retention_sql =
"DELETE FROM mqtx.inbox WHERE ctid = ANY (ARRAY("
"  SELECT ctid FROM mqtx.inbox"
"   WHERE applied_at < pg_catalog.now() - pg_catalog.make_interval(secs => $1) LIMIT $2))";

typedef struct Subscription
{
	char	   *queue;
	Oid			handler;
	int			prefetch;
	int			max_attempts;
	bool		consuming;		/* basic.consume issued on this connection */
} Subscription;

/* A delivery waiting for its retry time, unacknowledged. */
typedef struct HeldDelivery
{
	BrokerDelivery delivery;
	TimestampTz retry_at;
} HeldDelivery;

typedef enum ApplyResult
{
	APPLIED,
	DUPLICATE,
	HANDLER_FAILED,
	POISON
} ApplyResult;

typedef struct ConsumerState
{
	MqtxWorker	worker;
	MemoryContext long_context; /* subscriptions and held deliveries */
	List	   *subscriptions;
	uint32		subscriptions_generation;
	bool		subscriptions_loaded;
	List	   *held;			/* of HeldDelivery, in long_context */
	TimestampTz next_retention_at;
} ConsumerState;

static ConsumerState consumer;

/*
 * Deliveries held on a connection die with it: the broker hands them out
 * again, and their attempts are on record.
 */
/*
 * A deep copy of a delivery in the current memory context: held deliveries
 * move between the long-lived context and a pass's.
 */
static void
copy_delivery(BrokerDelivery *dst, const BrokerDelivery *src)
{
	*dst = *src;
	dst->queue = pstrdup(src->queue);
	dst->exchange = pstrdup(src->exchange);
	dst->routing_key = pstrdup(src->routing_key);
	dst->message_id = src->message_id ? pstrdup(src->message_id) : NULL;
	dst->headers_json = src->headers_json ? pstrdup(src->headers_json) : NULL;
	dst->body = palloc(src->body_len + 1);
	memcpy(dst->body, src->body, src->body_len + 1);
}

static void
free_delivery_copy(BrokerDelivery *d)
{
	pfree(d->queue);
	pfree(d->exchange);
	pfree(d->routing_key);
	if (d->message_id)
		pfree(d->message_id);
	if (d->headers_json)
		pfree(d->headers_json);
	pfree(d->body);
}

static void
forget_connection_state(const char *error)
{
	ListCell   *lc;

	foreach(lc, consumer.held)
	{
		HeldDelivery *held = lfirst(lc);

		free_delivery_copy(&held->delivery);
		pfree(held);
	}
	list_free(consumer.held);
	consumer.held = NIL;
	foreach(lc, consumer.subscriptions)
		((Subscription *) lfirst(lc))->consuming = false;
}

static Subscription *
find_subscription(const char *queue)
{
	ListCell   *lc;

	foreach(lc, consumer.subscriptions)
	{
		Subscription *sub = lfirst(lc);

		if (strcmp(sub->queue, queue) == 0)
			return sub;
	}
	return NULL;
}

/*
 * Re-read mqtx.subscriptions when it (or the topology) changed, cancel the
 * consumers of queues no longer subscribed.
 */
static void
load_subscriptions(void)
{
	uint32		generation = pg_atomic_read_u32(&consumer.worker.slot->topology_generation);
	List	   *loaded = NIL;
	ListCell   *lc;
	MemoryContext old;

	if (consumer.subscriptions_loaded && generation == consumer.subscriptions_generation)
		return;

	mqtx_worker_begin_step("mqtx consumer: reading subscriptions");
	if (SPI_execute(subscriptions_sql, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "reading mqtx.subscriptions failed");
	old = MemoryContextSwitchTo(consumer.long_context);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		Subscription *sub = palloc0(sizeof(Subscription));
		Subscription *previous;
		bool		isnull;

		sub->queue = SPI_getvalue(tuple, desc, 1);
		sub->handler = DatumGetObjectId(SPI_getbinval(tuple, desc, 2, &isnull));
		sub->prefetch = DatumGetInt32(SPI_getbinval(tuple, desc, 3, &isnull));
		sub->max_attempts = DatumGetInt32(SPI_getbinval(tuple, desc, 4, &isnull));
		previous = find_subscription(sub->queue);
		sub->consuming = previous != NULL && previous->consuming;
		loaded = lappend(loaded, sub);
	}
	MemoryContextSwitchTo(old);
	mqtx_worker_end_step(&consumer.worker);

	foreach(lc, consumer.subscriptions)
	{
		Subscription *sub = lfirst(lc);
		char	   *error = NULL;
		ListCell   *lc2;
		bool		kept = false;

		foreach(lc2, loaded)
			kept |= strcmp(((Subscription *) lfirst(lc2))->queue, sub->queue) == 0;
		if (!kept && sub->consuming && consumer.worker.conn != NULL &&
			!broker_cancel(consumer.worker.conn, sub->queue, &error))
			ereport(WARNING,
					(errmsg("mqtx consumer: could not stop consuming queue \"%s\"", sub->queue),
					 errdetail_internal("%s", error)));
	}
	foreach(lc, consumer.subscriptions)
	{
		Subscription *sub = lfirst(lc);

		pfree(sub->queue);
		pfree(sub);
	}
	list_free(consumer.subscriptions);
	consumer.subscriptions = loaded;
	consumer.subscriptions_generation = generation;
	consumer.subscriptions_loaded = true;
}

/*
 * Issue basic.consume for every subscription not yet consumed on this
 * connection.  Returns false when the connection failed.
 */
static bool
start_consuming(void)
{
	ListCell   *lc;

	foreach(lc, consumer.subscriptions)
	{
		Subscription *sub = lfirst(lc);
		char	   *error = NULL;

		if (sub->consuming)
			continue;
		if (broker_consume(consumer.worker.conn, sub->queue, sub->prefetch, &error))
		{
			sub->consuming = true;
			consumer.worker.receiving = true;
			continue;
		}
		ereport(WARNING,
				(errmsg("mqtx consumer: cannot consume queue \"%s\"", sub->queue),
				 errdetail_internal("%s", error)));
		mqtx_worker_drop_broker(&consumer.worker, error);
		return false;
	}
	return true;
}

/*
 * Message id for deduplication: the AMQP message_id, or for a message
 * without one a hash of its body (the same body is then the same message).
 */
static char *
dedupe_key(BrokerDelivery *d)
{
	pg_cryptohash_ctx *ctx;
	uint8		digest[32];
	char		hex[65];

	if (d->message_id != NULL)
		return d->message_id;

	ctx = pg_cryptohash_create(PG_SHA256);
	if (ctx == NULL || pg_cryptohash_init(ctx) < 0 ||
		pg_cryptohash_update(ctx, (uint8 *) d->body, d->body_len) < 0 ||
		pg_cryptohash_final(ctx, digest, sizeof(digest)) < 0)
		elog(ERROR, "could not compute a SHA-256 digest");
	pg_cryptohash_free(ctx);
	hex_encode((char *) digest, sizeof(digest), hex);
	hex[64] = '\0';
	return psprintf("sha256:%s", hex);
}

/*
 * The message as the handler sees it; ERROR when it is poison.
 */
static Jsonb *
parse_body(BrokerDelivery *d)
{
	char	   *text;

	if (d->body_len > mqtx_max_payload)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("body is %d bytes, more than mqtx.max_payload (%d bytes)",
						d->body_len, mqtx_max_payload)));
	if (!pg_verify_mbstr(PG_UTF8, d->body, d->body_len, true))
		ereport(ERROR,
				(errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
				 errmsg("body is not valid UTF-8")));
	text = pg_any_to_server(d->body, d->body_len, PG_UTF8);
	return DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(text)));
}

static Jsonb *
parse_headers(BrokerDelivery *d)
{
	return DatumGetJsonbP(DirectFunctionCall1(jsonb_in,
											  CStringGetDatum(d->headers_json ?
															  d->headers_json : "{}")));
}

/* Plans of the statements above, prepared on first use */
static SPIPlanPtr inbox_plan = NULL;
static SPIPlanPtr forget_attempts_plan = NULL;
static SPIPlanPtr record_attempt_plan = NULL;
static SPIPlanPtr dead_letter_plan = NULL;

static uint64
execute(SPIPlanPtr *plan, const char *sql, int nargs, Oid *types, Datum *values,
		const char *nulls, int expected)
{
	int			rc = mqtx_execute_prepared(plan, sql, nargs, types, values, nulls);

	if (rc != expected)
		elog(ERROR, "mqtx consumer query failed (%s): %s",
			 SPI_result_code_string(rc), sql);
	return SPI_processed;
}

/*
 * A handler as the batch calls it: the function, and who it runs as.
 */
typedef struct Handler
{
	FmgrInfo	info;
	Oid			owner;
	char	   *search_path;	/* what a new session of the owner would get */
} Handler;

/*
 * The handler, looked up once per batch: a function keeps what it caches
 * (a SQL function its parsed and planned body) in its FmgrInfo, for as
 * long as the transaction, and subtransaction, it was built in.  Its owner
 * is looked up with it, so a handler given to another role runs as that
 * role from the next batch on.
 */
static Handler *
handler_info(List **handlers, Oid function)
{
	ListCell   *lc;
	Handler    *handler;
	HeapTuple	proc;

	foreach(lc, *handlers)
	{
		handler = lfirst(lc);
		if (handler->info.fn_oid == function)
			return handler;
	}
	handler = palloc(sizeof(Handler));
	fmgr_info(function, &handler->info);
	proc = SearchSysCache1(PROCOID, ObjectIdGetDatum(function));
	if (!HeapTupleIsValid(proc))
		elog(ERROR, "cache lookup failed for function %u", function);
	handler->owner = ((Form_pg_proc) GETSTRUCT(proc))->proowner;
	ReleaseSysCache(proc);
	handler->search_path = mqtx_session_search_path(handler->owner);
	*handlers = lappend(*handlers, handler);
	return handler;
}

/*
 * Call a handler with its owner's privileges and search_path, never the
 * worker's: the owner may replace the function's body at any time, and it
 * must not gain anything by that.  Like a SECURITY DEFINER function's own
 * SET clauses, the handler's are honoured (fmgr applies them inside).
 */
static void
call_handler(Handler *handler, Jsonb *payload, Jsonb *headers)
{
	LOCAL_FCINFO(fcinfo, 2);
	MqtxIdentity saved;

	InitFunctionCallInfoData(*fcinfo, &handler->info, 2, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = JsonbPGetDatum(payload);
	fcinfo->args[0].isnull = false;
	fcinfo->args[1].value = JsonbPGetDatum(headers);
	fcinfo->args[1].isnull = false;
	mqtx_become(&saved, handler->owner, handler->search_path);
	(void) FunctionCallInvoke(fcinfo);
	mqtx_restore_identity(&saved);
}

/*
 * Apply one parsed delivery: record its key in the inbox and, unless it was
 * there already, run the handler.  Errors propagate: the caller's
 * subtransaction holds its effects.
 */
static ApplyResult
apply_one(BrokerDelivery *d, Subscription *sub, const char *key, Jsonb *payload,
		  Jsonb *headers, List **handlers)
{
	Oid			types[2] = {TEXTOID, TEXTOID};
	Datum		values[2] = {CStringGetTextDatum(sub->queue), CStringGetTextDatum(key)};

	if (execute(&inbox_plan, inbox_sql, 2, types, values, NULL, SPI_OK_INSERT) == 0)
		return DUPLICATE;
	call_handler(handler_info(handlers, sub->handler), payload, headers);
	if (d->redelivered)
		execute(&forget_attempts_plan, forget_attempts_sql, 2, types, values,
				NULL, SPI_OK_DELETE);
	return APPLIED;
}

/*
 * Apply one delivery in a subtransaction of its own.  On failure *edata
 * describes the error (a poison body or the handler's).
 */
static ApplyResult
apply_delivery(BrokerDelivery *d, Subscription *sub, const char *key,
			   List **handlers, ErrorData **edata)
{
	MemoryContext context = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	volatile ApplyResult result = POISON;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(context);
	PG_TRY();
	{
		Jsonb	   *payload = parse_body(d);
		Jsonb	   *headers = parse_headers(d);

		result = HANDLER_FAILED;	/* an error from here on is not the body's */
		result = apply_one(d, sub, key, payload, headers, handlers);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(context);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(context);
		*edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(context);
		CurrentResourceOwner = owner;
	}
	PG_END_TRY();

	/* jsonb_in's own words are about "input syntax"; say what was parsed */
	if (result == POISON && (*edata)->sqlerrcode == ERRCODE_INVALID_TEXT_REPRESENTATION)
		(*edata)->message = psprintf("body is not valid JSON: %s", (*edata)->message);
	return result;
}

/*
 * Apply the whole batch in one subtransaction, on the bet that nothing in
 * it fails: a subtransaction per delivery costs as much as a small
 * handler, and a SQL-language handler is parsed and planned again in each
 * new one.  Returns false, with nothing applied, when a delivery failed
 * (or had no subscription); the caller then applies them one by one, each
 * failure on its own.
 */
static bool
apply_all_at_once(BrokerDelivery *batch, Subscription **subs, char **keys,
				  int count, List **handlers, ApplyResult *results)
{
	MemoryContext context = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	volatile bool applied = false;

	for (int i = 0; i < count; i++)
		if (subs[i] == NULL)
			return false;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(context);
	PG_TRY();
	{
		for (int i = 0; i < count; i++)
			results[i] = apply_one(&batch[i], subs[i], keys[i], parse_body(&batch[i]),
								   parse_headers(&batch[i]), handlers);
		ReleaseCurrentSubTransaction();
		applied = true;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(context);
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(context);
	CurrentResourceOwner = owner;
	return applied;
}

static void
dead_letter(BrokerDelivery *d, const char *key, ErrorData *edata, int attempts)
{
	Oid			types[12] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, JSONBOID, BYTEAOID,
	TEXTOID, JSONBOID, TEXTOID, TEXTOID, TEXTOID, INT4OID};
	Datum		values[12];
	char		nulls[12];
	bytea	   *body = palloc(VARHDRSZ + d->body_len);
	bool		utf8 = pg_verify_mbstr(PG_UTF8, d->body, d->body_len, true);
	Datum		body_json = (Datum) 0;

	memcpy(VARDATA(body), d->body, d->body_len);
	SET_VARSIZE(body, VARHDRSZ + d->body_len);
	memset(nulls, ' ', sizeof(nulls));

	/* the body as JSON, where it is JSON */
	if (utf8 && d->body_len <= mqtx_max_payload)
	{
		MemoryContext context = CurrentMemoryContext;
		ResourceOwner owner = CurrentResourceOwner;

		BeginInternalSubTransaction(NULL);
		MemoryContextSwitchTo(context);
		PG_TRY();
		{
			body_json = JsonbPGetDatum(parse_body(d));
			ReleaseCurrentSubTransaction();
		}
		PG_CATCH();
		{
			MemoryContextSwitchTo(context);
			FlushErrorState();
			RollbackAndReleaseCurrentSubTransaction();
			body_json = (Datum) 0;
		}
		PG_END_TRY();
		MemoryContextSwitchTo(context);
		CurrentResourceOwner = owner;
	}

	values[0] = CStringGetTextDatum(d->queue);
	values[1] = CStringGetTextDatum(key);
	values[2] = CStringGetTextDatum(d->exchange);
	values[3] = CStringGetTextDatum(d->routing_key);
	values[4] = (Datum) 0;
	nulls[4] = 'n';
	if (d->headers_json != NULL)
	{
		values[4] = DirectFunctionCall1(jsonb_in, CStringGetDatum(d->headers_json));
		nulls[4] = ' ';
	}
	values[5] = PointerGetDatum(body);
	values[6] = utf8 ? CStringGetTextDatum(pg_any_to_server(d->body, d->body_len, PG_UTF8)) : (Datum) 0;
	nulls[6] = utf8 ? ' ' : 'n';
	values[7] = body_json;
	nulls[7] = body_json ? ' ' : 'n';
	values[8] = CStringGetTextDatum(edata->message ? edata->message : "unknown error");
	values[9] = edata->detail ? CStringGetTextDatum(edata->detail) : (Datum) 0;
	nulls[9] = edata->detail ? ' ' : 'n';
	values[10] = edata->context ? CStringGetTextDatum(edata->context) : (Datum) 0;
	nulls[10] = edata->context ? ' ' : 'n';
	values[11] = Int32GetDatum(attempts);

	execute(&dead_letter_plan, dead_letter_sql, 12, types, values, nulls,
			SPI_OK_SELECT);
	ereport(WARNING,
			(errmsg("mqtx consumer: dead-lettered message %s from queue \"%s\" after %d attempt%s (mqtx.dead_letter id %s)",
					key, d->queue, attempts, attempts == 1 ? "" : "s",
					SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1)),
			 errdetail_internal("%s", edata->message),
			 errhint("Fix the cause, then SELECT mqtx.redrive(id) or mqtx.discard(id).")));
	mqtx_count(consumer.worker.slot, MQTX_CONSUMER_DEAD_LETTERED, 1);
}

static int
record_attempt(BrokerDelivery *d, const char *key, ErrorData *edata)
{
	Oid			types[3] = {TEXTOID, TEXTOID, TEXTOID};
	Datum		values[3] = {CStringGetTextDatum(d->queue), CStringGetTextDatum(key),
	CStringGetTextDatum(edata->message ? edata->message : "unknown error")};
	bool		isnull;

	execute(&record_attempt_plan, record_attempt_sql, 3, types, values, NULL,
			SPI_OK_INSERT_RETURNING);
	return DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc,
									   1, &isnull));
}

static void
hold_for_retry(BrokerDelivery *d, int attempts)
{
	double		delay = Min((double) mqtx_retry_max,
							mqtx_retry_base * pow(2.0, attempts - 1));
	MemoryContext old = MemoryContextSwitchTo(consumer.long_context);
	HeldDelivery *held = palloc(sizeof(HeldDelivery));

	delay *= 0.5 + 0.5 * pg_prng_double(&pg_global_prng_state);
	copy_delivery(&held->delivery, d);
	held->delivery.redelivered = true;	/* it has an attempt on record now */
	held->retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), (int64) delay);
	consumer.held = lappend(consumer.held, held);
	MemoryContextSwitchTo(old);
}

/*
 * Apply a batch in one transaction.  Returns the delivery tags to ack (in
 * *ack, count returned) and those to put back on their queue (deliveries
 * of a queue no longer subscribed).
 */
static int
apply_batch(BrokerDelivery *batch, int count, uint64 *ack, uint64 *requeue,
			int *nrequeue)
{
	int			nack = 0;
	Subscription **subs = palloc(sizeof(Subscription *) * count);
	char	  **keys = palloc(sizeof(char *) * count);
	ApplyResult *results = palloc(sizeof(ApplyResult) * count);
	List	   *handlers = NIL;
	bool		at_once;

	*nrequeue = 0;
	/* in the transaction: hashing a body needs its resource owner */
	mqtx_worker_begin_step("mqtx consumer: applying a batch");
	for (int i = 0; i < count; i++)
	{
		subs[i] = find_subscription(batch[i].queue);
		keys[i] = subs[i] ? dedupe_key(&batch[i]) : NULL;
	}
	at_once = count > 1 &&
		apply_all_at_once(batch, subs, keys, count, &handlers, results);
	for (int i = 0; i < count; i++)
	{
		BrokerDelivery *d = &batch[i];
		Subscription *sub = subs[i];
		char	   *key = keys[i];
		ErrorData  *edata = NULL;
		ApplyResult result;
		int			attempts;

		if (sub == NULL)
		{
			requeue[(*nrequeue)++] = d->delivery_tag;
			continue;
		}
		result = at_once ? results[i] :
			apply_delivery(d, sub, key, &handlers, &edata);
		switch (result)
		{
			case APPLIED:
				mqtx_count(consumer.worker.slot, MQTX_CONSUMER_APPLIED, 1);
				ack[nack++] = d->delivery_tag;
				break;
			case DUPLICATE:
				mqtx_count(consumer.worker.slot, MQTX_CONSUMER_DUPLICATES, 1);
				ack[nack++] = d->delivery_tag;
				break;
			case POISON:
				dead_letter(d, key, edata, 1);
				ack[nack++] = d->delivery_tag;
				break;
			case HANDLER_FAILED:
				attempts = record_attempt(d, key, edata);
				if (attempts >= sub->max_attempts)
				{
					dead_letter(d, key, edata, attempts);
					ack[nack++] = d->delivery_tag;
				}
				else
				{
					mqtx_count(consumer.worker.slot, MQTX_CONSUMER_RETRIED, 1);
					hold_for_retry(d, attempts);
				}
				break;
		}
	}
	mqtx_worker_end_step(&consumer.worker);
	return nack;
}

/*
 * After the commit: acknowledge.  One "multiple" ack covers the batch when
 * no older delivery is still held back for a retry.
 */
static bool
acknowledge(uint64 *ack, int nack, uint64 *requeue, int nrequeue, char **error)
{
	uint64		max_tag = 0;
	uint64		oldest_held = PG_UINT64_MAX;
	ListCell   *lc;

	for (int i = 0; i < nrequeue; i++)
		if (!broker_requeue(consumer.worker.conn, requeue[i], error))
			return false;
	if (nack == 0)
		return true;

	for (int i = 0; i < nack; i++)
		max_tag = Max(max_tag, ack[i]);
	foreach(lc, consumer.held)
		oldest_held = Min(oldest_held, ((HeldDelivery *) lfirst(lc))->delivery.delivery_tag);

	if (nrequeue == 0 && oldest_held > max_tag)
		return broker_ack(consumer.worker.conn, max_tag, true, error);
	for (int i = 0; i < nack; i++)
		if (!broker_ack(consumer.worker.conn, ack[i], false, error))
			return false;
	return true;
}

/*
 * Held deliveries whose retry time has come, moved into the batch.
 */
static int
take_due_held(BrokerDelivery *batch, int capacity)
{
	TimestampTz now = GetCurrentTimestamp();
	List	   *still_held = NIL;
	ListCell   *lc;
	MemoryContext old;
	int			count = 0;

	foreach(lc, consumer.held)
	{
		HeldDelivery *held = lfirst(lc);

		if (count < capacity && held->retry_at <= now)
		{
			/* into the pass's memory; the held copy is freed */
			copy_delivery(&batch[count++], &held->delivery);
			free_delivery_copy(&held->delivery);
			pfree(held);
		}
		else
		{
			old = MemoryContextSwitchTo(consumer.long_context);
			still_held = lappend(still_held, held);
			MemoryContextSwitchTo(old);
		}
	}
	list_free(consumer.held);
	consumer.held = still_held;
	return count;
}

/*
 * Gather a batch: due retries, then deliveries, waiting at most
 * DELIVERY_WAIT_MS for the first.  Once one is in hand, only deliveries
 * already received are added, without waiting for more: a trickle is
 * applied as it arrives rather than kept waiting for company, and under
 * load the deliveries that arrive while a batch is applied make the next
 * batch, so batches grow with the load.  Returns -1 when the connection
 * failed.
 */
static int
collect_batch(BrokerDelivery *batch, int capacity, char **error)
{
	int			count = take_due_held(batch, capacity);

	while (count < capacity)
	{
		int			rc;

		rc = broker_next_delivery(consumer.worker.conn,
								  count == 0 ? DELIVERY_WAIT_MS : 0,
								  &batch[count], error);
		if (rc < 0)
			return -1;
		if (rc == 0)
			break;
		count++;
	}
	return count;
}

/*
 * One pass: collect, apply, commit, acknowledge.  Returns whether the
 * batch was full.
 */
static bool
consume_pass(void)
{
	int			capacity = mqtx_batch_size;
	BrokerDelivery *batch = palloc(sizeof(BrokerDelivery) * capacity);
	uint64	   *ack = palloc(sizeof(uint64) * capacity);
	uint64	   *requeue = palloc(sizeof(uint64) * capacity);
	int			nrequeue;
	char	   *error = NULL;
	int			count;
	int			nack;

	count = collect_batch(batch, capacity, &error);
	if (count < 0)
	{
		mqtx_worker_drop_broker(&consumer.worker, error);
		return false;
	}
	if (count == 0)
		return false;
	mqtx_count(consumer.worker.slot, MQTX_CONSUMER_CONSUMED, count);

	nack = apply_batch(batch, count, ack, requeue, &nrequeue);
	if (!acknowledge(ack, nack, requeue, nrequeue, &error))
		mqtx_worker_drop_broker(&consumer.worker, error);
	return count == capacity;
}

void
mqtx_consumer_main(Datum main_arg)
{
	bool		more_work = false;

	memset(&consumer, 0, sizeof(consumer));
	mqtx_worker_start(&consumer.worker, MQTX_CONSUMER, main_arg);

	/*
	 * A batch allocates tens of kilobytes per delivery (handler caches,
	 * parsed bodies) and frees it all at once when the pass ends.  glibc
	 * would hand that memory back to the kernel every time and fault it in
	 * again page by page for the next batch, which measured 3-4 times
	 * slower.  Keep freed memory in the process.
	 */
	mallopt(M_TRIM_THRESHOLD, 256 * 1024 * 1024);
	mallopt(M_MMAP_THRESHOLD, 64 * 1024 * 1024);
	consumer.worker.on_disconnect = forget_connection_state;
	consumer.long_context = AllocSetContextCreate(TopMemoryContext,
												  "mqtx consumer state",
												  ALLOCSET_DEFAULT_SIZES);

	for (;;)
	{
		bool		ready;
		bool		consuming;

		CHECK_FOR_INTERRUPTS();
		MemoryContextReset(consumer.worker.context);
		MemoryContextSwitchTo(consumer.worker.context);
		if (ConfigReloadPending)
			mqtx_worker_reload(&consumer.worker);

		ready = mqtx_worker_extension_ready(&consumer.worker);
		consuming = ready && mqtx_worker_ensure_broker(&consumer.worker);
		if (consuming)
		{
			load_subscriptions();
			consuming = consumer.subscriptions != NIL && start_consuming();
		}
		consumer.worker.receiving = consuming;

		/*
		 * While consuming, the wait for deliveries is the loop's sleep; the
		 * latch is checked on every turn through it.
		 */
		more_work = consuming && consume_pass();
		if (!more_work && ready)
			mqtx_worker_apply_retention(&consumer.worker, retention_sql, mqtx_inbox_retention,
										&consumer.next_retention_at);
		if (!consuming)
			mqtx_worker_wait(&consumer.worker, mqtx_poll_interval);
	}
}
