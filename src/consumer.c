/*-------------------------------------------------------------------------
 *
 * consumer.c
 *	  The consumer worker: applies messages from subscribed queues exactly
 *	  once in effect, retries failures with backoff and dead-letters what
 *	  cannot be applied.
 *
 * One consumer runs per database in mqtx.database and consumes every queue
 * in mqtx.subscriptions, each on a channel of its own, with manual acks
 * and a prefetch per queue: a queue the broker refuses, or deletes, loses
 * only its own channel and is tried again with a backoff (worker.c keeps
 * the refusals), while the others go on.
 * Deliveries are applied in batches, one transaction per batch: for each,
 * the message's dedupe key is recorded in mqtx.inbox (a unique key: a
 * duplicate is recognised there and acked without calling the handler)
 * and the subscription's handler runs, as its owner.  The batch is tried
 * in one subtransaction; when anything in it fails, it is applied again
 * with one subtransaction per delivery.  Acks are sent only after the
 * batch's commit is flushed to disk, so a crash at any point means
 * redelivery, and the inbox makes redelivery harmless.
 *
 * Every delivery ends in exactly one outcome, and no message can stop the
 * worker:
 *
 * - A handler error rolls back that delivery's subtransaction only.  The
 *   attempt is recorded (mqtx.consumer_attempts) and the delivery is held,
 *   unacknowledged, until its backoff has passed: no hot redelivery loop,
 *   and a crash while it waits hands it back to the broker.  After
 *   max_attempts it is dead-lettered and acked.
 * - A message that can never be applied (a body that is not UTF-8 or not
 *   JSON or too large, headers nested too deep) is dead-lettered at once.
 * - A dead letter also writes the message's inbox row, so any later copy
 *   of it is a duplicate, and a message has at most one dead letter per
 *   queue.  Writing a dead letter parses nothing that already failed to
 *   parse; when even that fails, a minimal one is written, and when that
 *   fails the delivery is held and tried again.
 * - An error at commit (a deferred constraint, a serialization failure),
 *   or any other error while a batch is applied, aborts the batch; its
 *   deliveries are then applied one transaction each, so that the error
 *   falls on the delivery that caused it, which fails like a handler.
 * - An error anywhere else in a pass (the broker connection, reading the
 *   subscriptions) is logged, the connection is dropped, and the broker
 *   hands the unacknowledged deliveries out again.
 *
 * The consumer talks to the broker only outside its transactions: it
 * collects a batch, applies and commits it, and then acknowledges; the
 * heartbeats it sends during a long batch go out only if the socket takes
 * them at once.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <math.h>

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "common/pg_prng.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/syscache.h"
#include "utils/timeout.h"
#include "utils/timestamp.h"
#include "utils/guc.h"

#include "apply_workers.h"
#include "broker.h"
#include "consumer.h"
#include "crash_guard.h"
#include "digest.h"
#include "identity.h"
#include "message_context.h"
#include "outbox.h"
#include "statements.h"
#include "worker.h"

static int	inbox_retention = 7 * 24 * 3600;

/* How long one wait for a delivery may block the loop. */
#define DELIVERY_WAIT_MS 100

/* The pause after an error escaped a pass, doubling while they repeat. */
#define ERROR_PAUSE_MIN_MS 1000
#define ERROR_PAUSE_MAX_MS 60000

static const char *const subscriptions_sql =
"SELECT s.queue, s.handler::oid, s.prefetch, s.max_attempts,"
"       (extract(epoch FROM s.handler_timeout) * 1000)::int4,"
"       CASE WHEN q.arguments->>'x-queue-type' = 'quorum'"
"             AND jsonb_typeof(q.arguments->'x-delivery-limit') = 'number'"
"            THEN least(greatest(floor((q.arguments->>'x-delivery-limit')::numeric), 0),"
"                       2147483647)::int4"
"       END,"
"       s.after_dead_letter = 'wait', s.workers "
"FROM mqtx.subscriptions s LEFT JOIN mqtx.queues q ON q.name = s.queue "
"ORDER BY s.queue";

/*
 * Attempts of a message that is applied now, or turns out a duplicate,
 * are history: removed in the same statement, which costs an index probe
 * of a table that is nearly always empty.
 */
static const char *const inbox_sql =
"WITH applied AS ("
"  DELETE FROM mqtx.consumer_attempts WHERE queue = $1 AND message_id = $2"
") "
"INSERT INTO mqtx.inbox (queue, message_id, correlation_id, causation_id) "
"VALUES ($1, $2, $3, $4) "
"ON CONFLICT DO NOTHING";

static const char *const record_attempt_sql =
"INSERT INTO mqtx.consumer_attempts AS a (queue, message_id, attempts, last_error) "
"VALUES ($1, $2, 1, $3) "
"ON CONFLICT (queue, message_id) DO UPDATE "
"   SET attempts = a.attempts + 1, last_error = excluded.last_error, last_failed_at = pg_catalog.now() "
"RETURNING attempts";

/*
 * A dead letter, and the message's inbox row: a later copy of the message
 * is then a duplicate, and redrive removes the row again.  A message that
 * is in the inbox already (applied, or dead-lettered by an earlier copy in
 * the same batch) gets no letter: it is a duplicate.
 *
 * The alert names the dead letter and its queue, nothing of the message:
 * anyone who can connect may LISTEN, and the error text often quotes the
 * payload.  The rest is in mqtx.dead_letter, for whoever may read it.  It
 * is skipped while the NOTIFY queue is more than half full: a full queue
 * fails the commit, and an alert is not worth a dead letter.
 */
static const char *const dead_letter_sql =
"WITH attempt AS ("
"  DELETE FROM mqtx.consumer_attempts WHERE queue = $1 AND message_id = $2"
"  RETURNING first_failed_at"
"), seen AS ("
"  INSERT INTO mqtx.inbox (queue, message_id, correlation_id, causation_id)"
"  VALUES ($1, $2, $15, $16) ON CONFLICT DO NOTHING"
"  RETURNING 1"
"), letter AS ("
"  INSERT INTO mqtx.dead_letter (queue, message_id, exchange, routing_key, headers,"
"      body, body_text, body_json, error_message, error_detail, error_context,"
"      attempts, first_failed_at, last_failed_at, ordering_key, parked_position,"
"      correlation_id)"
"  SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
"      coalesce((SELECT first_failed_at FROM attempt), pg_catalog.now()), pg_catalog.now(),"
"      $13, CASE WHEN $13 IS NOT NULL THEN coalesce($14,"
"          pg_catalog.nextval('mqtx.parked_position_seq'::pg_catalog.regclass)) END, $15"
"  WHERE EXISTS (SELECT FROM seen)"
"  ON CONFLICT ON CONSTRAINT dead_letter_queue_message_id_key DO NOTHING"
"  RETURNING id, queue"
") "
"SELECT l.id, n.notified IS NOT NULL FROM letter l LEFT JOIN LATERAL ("
"  SELECT true AS notified, pg_catalog.pg_notify('mqtx_dead_letter',"
"      pg_catalog.json_build_object('event', 'dead_letter',"
"          'database', pg_catalog.current_database(), 'id', l.id, 'queue', l.queue)::text)"
"  WHERE pg_catalog.pg_notification_queue_usage() < 0.5"
") n ON true";

/*
 * The inbox row of a dead letter stays while the letter does: a late copy
 * applied meanwhile would make a redrive apply the message twice.
 */
static const char *const retention_sql =
"DELETE FROM mqtx.inbox WHERE ctid = ANY (ARRAY("
"  SELECT i.ctid FROM mqtx.inbox i"
"   WHERE i.applied_at < pg_catalog.now() - pg_catalog.make_interval(secs => $1)"
"     AND NOT EXISTS (SELECT FROM mqtx.dead_letter d"
"                      WHERE d.queue = i.queue AND d.message_id = i.message_id)"
"   LIMIT $2))";

/*
 * Ordering keys.  A message of a key is applied only when nothing earlier
 * of its key is held: no parked message of the key, and under
 * after_dead_letter = wait no dead letter of it.  Otherwise it is parked
 * (and acknowledged): the database keeps it, in order, and the consumer
 * applies it from there once its key lets it.  A keyed message whose
 * attempt fails is parked too, with its next attempt's time, rather than
 * held unacknowledged as other failures are: so a key's later messages
 * never wait in the prefetch window, the other keys flow, and a crash
 * cannot hand the earlier one back behind later ones already parked.
 */
static const char *const key_held_sql =
"SELECT EXISTS (SELECT FROM mqtx.parked WHERE queue = $1 AND ordering_key = $2)"
"    OR ($3 AND EXISTS (SELECT FROM mqtx.dead_letter"
"                        WHERE queue = $1 AND ordering_key = $2))";

/*
 * A copy already applied, or parked, is a duplicate: nothing is written.
 * A parked copy is looked for before the insert: one that an apply worker
 * is applying is still there in the statement's snapshot, and is skipped
 * (applied or not, it is the worker's), where the insert's unique check
 * would wait for the end of the worker's whole batch.
 */
static const char *const park_sql =
"INSERT INTO mqtx.parked (queue, ordering_key, message_id, exchange, routing_key,"
"                         headers, body, next_attempt_at, correlation_id) "
"SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 "
" WHERE NOT EXISTS (SELECT FROM mqtx.inbox WHERE queue = $1 AND message_id = $3)"
"   AND NOT EXISTS (SELECT FROM mqtx.parked WHERE queue = $1 AND message_id = $3) "
"ON CONFLICT ON CONSTRAINT parked_queue_message_id_key DO NOTHING";

static const char *const unpark_sql =
"DELETE FROM mqtx.parked WHERE position = $1";

static const char *const park_retry_sql =
"UPDATE mqtx.parked SET next_attempt_at = $2 WHERE position = $1";

/*
 * The first parked message of every key whose key lets it go, and every
 * parked message without a key, oldest first: its time has come, and no
 * earlier dead letter holds its key.  $2 says whose: -1 the consumer's
 * (its subscriptions with one worker), or an apply worker's number: of
 * the subscriptions with more, the keys that hash to that number, and
 * the messages without a key whose position does.
 */
static const char *const parked_heads_sql =
"SELECT p.position, p.queue, p.ordering_key, p.message_id, p.exchange, p.routing_key,"
"       p.headers::text, p.body, p.correlation_id,"
"       CASE WHEN pg_catalog.jsonb_typeof(p.headers -> 'x-mqtx-causation-id') = 'string'"
"            THEN NULLIF(p.headers ->> 'x-mqtx-causation-id', '') END "
"FROM (SELECT DISTINCT ON (k.queue, k.ordering_key) k.*, s.after_dead_letter"
"       FROM mqtx.parked k JOIN mqtx.subscriptions s ON s.queue = k.queue"
"       WHERE k.ordering_key IS NOT NULL"
"         AND CASE WHEN $2 < 0 THEN s.workers = 1"
"             ELSE s.workers > 1"
"              AND (pg_catalog.hashtext(k.ordering_key) & 2147483647) % s.workers = $2 END"
"       ORDER BY k.queue, k.ordering_key, k.position) p "
"WHERE (p.next_attempt_at IS NULL OR p.next_attempt_at <= pg_catalog.now())"
"  AND NOT (p.after_dead_letter = 'wait' AND EXISTS ("
"        SELECT FROM mqtx.dead_letter d"
"         WHERE d.queue = p.queue AND d.ordering_key = p.ordering_key"
"           AND d.parked_position < p.position)) "
"UNION ALL "
"SELECT p.position, p.queue, p.ordering_key, p.message_id, p.exchange, p.routing_key,"
"       p.headers::text, p.body, p.correlation_id,"
"       CASE WHEN pg_catalog.jsonb_typeof(p.headers -> 'x-mqtx-causation-id') = 'string'"
"            THEN NULLIF(p.headers ->> 'x-mqtx-causation-id', '') END "
"FROM mqtx.parked p JOIN mqtx.subscriptions s ON s.queue = p.queue "
"WHERE p.ordering_key IS NULL"
"  AND (p.next_attempt_at IS NULL OR p.next_attempt_at <= pg_catalog.now())"
"  AND CASE WHEN $2 < 0 THEN s.workers = 1"
"      ELSE s.workers > 1 AND p.position % s.workers = $2 END "
"ORDER BY 1 "
"LIMIT $1";

/*
 * How many messages of a subscription ($1) with apply workers ($4 of
 * them) are parked for the workers that run ($5), counting up to $2 (see
 * staging_limit).  What waits for something other than those workers
 * does not count, so that it cannot stop the other keys: a retry not due
 * yet (a key's first message, or one without a key), the rest of its key,
 * the keys a dead letter holds under wait ($3), and the messages of a
 * worker that does not run (no background worker slot).
 */
static const char *const staged_sql =
"SELECT count(*)::int4 FROM ("
"  SELECT FROM mqtx.parked p WHERE p.queue = $1"
"     AND (p.next_attempt_at IS NULL OR p.next_attempt_at <= pg_catalog.now())"
"     AND CASE WHEN p.ordering_key IS NULL THEN p.position % $4 = ANY ($5)"
"         ELSE (pg_catalog.hashtext(p.ordering_key) & 2147483647) % $4 = ANY ($5)"
"          AND NOT ($3 AND EXISTS ("
"              SELECT FROM mqtx.dead_letter d"
"               WHERE d.queue = p.queue AND d.ordering_key = p.ordering_key))"
"          AND NOT EXISTS ("
"              SELECT FROM (SELECT h.next_attempt_at FROM mqtx.parked h"
"                            WHERE h.queue = p.queue AND h.ordering_key = p.ordering_key"
"                            ORDER BY h.position LIMIT 1) h"
"               WHERE h.next_attempt_at > pg_catalog.now()) END"
"   LIMIT $2) s";

/* of the subscriptions, how many apply workers the consumer must run */
static const char *const apply_workers_sql =
"SELECT coalesce(max(workers) FILTER (WHERE workers > 1), 0) FROM mqtx.subscriptions";

typedef struct Subscription
{
	char	   *queue;
	Oid			handler;
	int			prefetch;
	int			max_attempts;
	int			handler_timeout_ms;
	int			delivery_limit; /* the quorum queue's x-delivery-limit, or 0 */
	bool		wait_after_dead_letter; /* a key's dead letter holds its later
										 * messages */
	int			workers;		/* apply workers; more than 1: park every
								 * delivery for them */
	bool		staging_full;	/* as many are parked for them as they may
								 * have: acknowledge no more */
	int			channel;		/* consumed on this channel; 0: not consumed */
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

/*
 * One delivery of a batch and what became of it.  The outcome is decided
 * in the transaction and acted on (counted, acked, held) only once that
 * transaction has committed.
 */
typedef struct Work
{
	BrokerDelivery *d;
	Subscription *sub;			/* NULL: the queue is no longer subscribed */
	char	   *key;			/* dedupe key, in the transaction's memory */
	ApplyResult result;
	ErrorData  *edata;			/* why it failed, for HANDLER_FAILED and
								 * POISON */
	int			attempts;		/* failed attempts on record */
	bool		settled;		/* applied, a duplicate or dead-lettered: ack
								 * it */
	bool		dead_lettered;	/* a new dead letter was written */
	bool		failed;			/* failed already, in the batch's first try */
	bool		suspect;		/* the delivery earlier consumers died on */
	bool		quarantined;	/* dead-letter it without applying it */
	bool		behind;			/* an earlier delivery of its key in the batch
								 * was not applied */
	bool		held;			/* its key is held: park it, unapplied */
	bool		staged;			/* held for the apply workers */
	bool		parked;			/* it was parked (acknowledge it) */
} Work;

/* A delivery as the broker knows it: its channel and its tag there */
typedef struct DeliveryTag
{
	int			channel;
	uint64		tag;
} DeliveryTag;

typedef struct ConsumerState
{
	MqtxWorker	worker;
	int			apply_number;	/* an apply worker's number; -1: the consumer */
	pid_t		consumer_pid;	/* an apply worker's consumer */
	MemoryContext long_context; /* subscriptions and held deliveries */
	List	   *subscriptions;
	uint32		subscriptions_generation;
	bool		subscriptions_loaded;
	List	   *held;			/* of HeldDelivery, in long_context */
	List	   *deferred;		/* of DeliveryTag, in long_context: parked for
								 * the apply workers, to acknowledge once they
								 * have caught up */
	int			apply_workers_needed;	/* by the subscriptions */
	bool		apply_workers_known;	/* as of apply_workers_generation */
	uint32		apply_workers_generation;
	int			error_pause_ms; /* after the next escaped error */
	int			one_at_a_time;	/* deliveries to apply one per transaction */
	MqtxCrashRecord suspect;	/* a delivery earlier consumers died on */
	TimestampTz started_at;
	TimestampTz next_retention_at;
	TimestampTz next_parked_check_at;	/* look for parked messages to apply */
} ConsumerState;

static ConsumerState consumer;

static Datum wire_text_datum(const char *utf8);
static void optional_wire_text(const char *utf8, Datum *value, char *null);
static void consumer_loop(void) pg_attribute_noreturn();

/* Plans of the statements above, prepared on first use */
static SPIPlanPtr inbox_plan = NULL;
static SPIPlanPtr record_attempt_plan = NULL;
static SPIPlanPtr dead_letter_plan = NULL;
static SPIPlanPtr key_held_plan = NULL;
static SPIPlanPtr park_plan = NULL;
static SPIPlanPtr unpark_plan = NULL;
static SPIPlanPtr park_retry_plan = NULL;
static SPIPlanPtr parked_heads_plan = NULL;
static SPIPlanPtr staged_plan = NULL;

/*
 * Error texts are kept (attempts, dead letters) and logged; one that quotes
 * a whole payload must not make every later line as large.
 */
#define ERROR_TEXT_MAX 8000

static char *
clip_text(char *str)
{
	int			len;

	if (str == NULL || (len = strlen(str)) <= ERROR_TEXT_MAX)
		return str;
	len = pg_mbcliplen(str, len, ERROR_TEXT_MAX);
	return psprintf("%.*s... (%d bytes cut)", len, str, (int) strlen(str) - len);
}

static void
clip_error(ErrorData *edata)
{
	edata->message = clip_text(edata->message);
	edata->detail = clip_text(edata->detail);
	edata->context = clip_text(edata->context);
}

/*
 * Run fn(arg) in a subtransaction of its own.  Returns NULL when it
 * succeeded; else its error, copied into the caller's memory context,
 * with everything it did rolled back (the identity and settings of a
 * handler included).
 */
static ErrorData *
in_subtransaction(void (*fn) (void *), void *arg)
{
	MemoryContext context = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	ErrorData  *volatile edata = NULL;
	int			level;

	BeginInternalSubTransaction(NULL);
	level = GetCurrentTransactionNestLevel();
	MemoryContextSwitchTo(context);
	PG_TRY();
	{
		fn(arg);

		/*
		 * C code may leave a subtransaction of its own open; releasing ours
		 * would then release that one, and the batch's commit would commit
		 * nothing while its acks went out.
		 */
		if (GetCurrentTransactionNestLevel() != level)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_TRANSACTION_STATE),
					 errmsg("a subtransaction was left open")));
		ReleaseCurrentSubTransaction();
	}
	PG_CATCH();
	{
		disable_timeout(STATEMENT_TIMEOUT, false);
		/* a handler that failed has no successor in it */
		mqtx_leave_handled_message();
		MemoryContextSwitchTo(context);
		edata = CopyErrorData();
		FlushErrorState();
		while (GetCurrentTransactionNestLevel() > level)
			RollbackAndReleaseCurrentSubTransaction();
		RollbackAndReleaseCurrentSubTransaction();
		clip_error(edata);
	}
	PG_END_TRY();
	MemoryContextSwitchTo(context);
	CurrentResourceOwner = owner;
	return edata;
}

/*
 * A deep copy of a delivery in the current memory context: held deliveries
 * move between the long-lived context and a pass's.
 */
static char *
copy_string(const char *s)
{
	return s ? pstrdup(s) : NULL;
}

static void
copy_delivery(BrokerDelivery *dst, const BrokerDelivery *src)
{
	*dst = *src;
	dst->queue = pstrdup(src->queue);
	dst->exchange = pstrdup(src->exchange);
	dst->routing_key = pstrdup(src->routing_key);
	dst->message_id = copy_string(src->message_id);
	dst->correlation_id = copy_string(src->correlation_id);
	dst->causation_id = copy_string(src->causation_id);
	dst->redriven_from = copy_string(src->redriven_from);
	dst->ordering_key = copy_string(src->ordering_key);
	dst->headers_json = copy_string(src->headers_json);
	dst->headers_error = copy_string(src->headers_error);
	dst->body = palloc(src->body_len + 1);
	memcpy(dst->body, src->body, src->body_len + 1);
}

static void
free_string(char *s)
{
	if (s)
		pfree(s);
}

static void
free_delivery_copy(BrokerDelivery *d)
{
	pfree(d->queue);
	pfree(d->exchange);
	pfree(d->routing_key);
	free_string(d->message_id);
	free_string(d->correlation_id);
	free_string(d->causation_id);
	free_string(d->redriven_from);
	free_string(d->ordering_key);
	free_string(d->headers_json);
	free_string(d->headers_error);
	pfree(d->body);
}

/*
 * Deliveries held on a connection die with it: the broker hands them out
 * again, and their attempts are on record.
 */
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
	list_free_deep(consumer.deferred);
	consumer.deferred = NIL;
	foreach(lc, consumer.subscriptions)
		((Subscription *) lfirst(lc))->channel = 0;
}

/*
 * A queue's channel is gone (cancelled, or closed by the broker): the
 * deliveries held from it are the broker's again.
 */
static void
forget_channel(int channel)
{
	List	   *kept = NIL;
	ListCell   *lc;
	MemoryContext old = MemoryContextSwitchTo(consumer.long_context);

	foreach(lc, consumer.held)
	{
		HeldDelivery *held = lfirst(lc);

		if (held->delivery.channel == channel)
		{
			free_delivery_copy(&held->delivery);
			pfree(held);
		}
		else
			kept = lappend(kept, held);
	}
	list_free(consumer.held);
	consumer.held = kept;
	kept = NIL;
	foreach(lc, consumer.deferred)
	{
		DeliveryTag *tag = lfirst(lc);

		if (tag->channel == channel)
			pfree(tag);
		else
			kept = lappend(kept, tag);
	}
	list_free(consumer.deferred);
	consumer.deferred = kept;
	MemoryContextSwitchTo(old);
}

static Subscription *
find_subscription(List *subscriptions, const char *queue)
{
	ListCell   *lc;

	foreach(lc, subscriptions)
	{
		Subscription *sub = lfirst(lc);

		if (strcmp(sub->queue, queue) == 0)
			return sub;
	}
	return NULL;
}

/*
 * The queue a delivery came from, in the server encoding: its consumer tag
 * is the queue name mqtx sent, in UTF-8.  In a transaction.
 */
static const char *
server_queue_name(BrokerDelivery *d)
{
	if (GetDatabaseEncoding() == PG_UTF8)
		return d->queue;
	return pg_any_to_server(d->queue, strlen(d->queue), PG_UTF8);
}

/*
 * A string read from the database (palloc'd, as SPI_getvalue gives it), as
 * the wire's UTF-8 that a delivery holds; NULL stays NULL.  In a
 * transaction.
 */
static char *
server_to_wire(char *str)
{
	if (str == NULL)
		return NULL;
	return pg_server_to_any(str, strlen(str), PG_UTF8);
}

static List *
read_subscriptions(void)
{
	List	   *loaded = NIL;
	MemoryContext old;

	mqtx_worker_begin_step("mqtx consumer: reading subscriptions");
	if (SPI_execute(subscriptions_sql, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "reading mqtx.subscriptions failed");
	old = MemoryContextSwitchTo(consumer.long_context);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		Subscription *sub = palloc0(sizeof(Subscription));
		bool		isnull;

		sub->queue = SPI_getvalue(tuple, desc, 1);
		sub->handler = DatumGetObjectId(SPI_getbinval(tuple, desc, 2, &isnull));
		sub->prefetch = DatumGetInt32(SPI_getbinval(tuple, desc, 3, &isnull));
		sub->max_attempts = DatumGetInt32(SPI_getbinval(tuple, desc, 4, &isnull));
		sub->handler_timeout_ms = DatumGetInt32(SPI_getbinval(tuple, desc, 5, &isnull));
		sub->delivery_limit = DatumGetInt32(SPI_getbinval(tuple, desc, 6, &isnull));
		if (isnull)
			sub->delivery_limit = 0;
		sub->wait_after_dead_letter = DatumGetBool(SPI_getbinval(tuple, desc, 7, &isnull));
		sub->workers = DatumGetInt32(SPI_getbinval(tuple, desc, 8, &isnull));
		loaded = lappend(loaded, sub);
	}
	MemoryContextSwitchTo(old);
	mqtx_worker_end_step(&consumer.worker);
	return loaded;
}

static void
replace_subscriptions(List *loaded, uint32 generation)
{
	ListCell   *lc;

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
 * Re-read mqtx.subscriptions when it (or the topology) changed.  Queues no
 * longer subscribed, or subscribed with another prefetch, have their
 * channels closed (the broker takes back what was in flight on them);
 * start_consuming starts the new ones.  Returns false when the connection
 * failed.
 */
static bool
load_subscriptions(void)
{
	uint32		generation = mqtx_slot_topology_generation(consumer.worker.slot);
	List	   *loaded;
	ListCell   *lc;

	if (consumer.subscriptions_loaded && generation == consumer.subscriptions_generation)
		return true;

	loaded = read_subscriptions();

	/*
	 * A subscription's queue is declared by the topology, which the
	 * connection declared as of an earlier generation; consumed before it is
	 * declared, the queue may not exist yet, and the broker refuses.
	 * Declaring now, after the read, covers every queue read.
	 */
	if (consumer.worker.declared_generation !=
		mqtx_slot_topology_generation(consumer.worker.slot))
		(void) mqtx_worker_ensure_broker(&consumer.worker);

	foreach(lc, consumer.subscriptions)
	{
		Subscription *sub = lfirst(lc);
		Subscription *now = find_subscription(loaded, sub->queue);
		char	   *error = NULL;

		if (now != NULL && now->prefetch == sub->prefetch)
		{
			now->channel = sub->channel;
			/* with one worker, nothing is staged: its deferred acks go */
			now->staging_full = now->workers > 1 && sub->staging_full;
		}
		else if (sub->channel != 0 && consumer.worker.conn != NULL)
		{
			forget_channel(sub->channel);
			if (!mqtx_broker_cancel(consumer.worker.conn, sub->channel, sub->queue, &error))
			{
				mqtx_worker_drop_broker(&consumer.worker, error);
				break;
			}
		}
	}
	replace_subscriptions(loaded, generation);

	if (consumer.worker.conn == NULL)
	{
		foreach(lc, loaded)
			((Subscription *) lfirst(lc))->channel = 0;
		return false;
	}
	return true;
}

static const char *const subscription_type[] = {"subscription"};

/*
 * Consume every subscribed queue not yet consumed on this connection.  A
 * queue the broker will not let us consume (no such queue, no read
 * permission) is refused on its own channel: it is reported, tried again
 * with a backoff, and the other queues go on.  Returns false when the
 * connection failed.
 */
static bool
start_consuming(void)
{
	ListCell   *lc;

	mqtx_worker_begin_round(&consumer.worker, subscription_type, 1);
	foreach(lc, consumer.subscriptions)
	{
		Subscription *sub = lfirst(lc);
		char	   *error = NULL;

		/* a channel the broker closed without our hearing why */
		if (sub->channel != 0 && !mqtx_broker_channel_is_open(consumer.worker.conn, sub->channel))
		{
			forget_channel(sub->channel);
			sub->channel = 0;
		}
		if (!mqtx_worker_may_try(&consumer.worker, subscription_type[0], sub->queue) ||
			sub->channel != 0)
			continue;
		sub->channel = mqtx_broker_consume(consumer.worker.conn, sub->queue, sub->prefetch,
										   &error);
		if (sub->channel != 0)
			mqtx_worker_accepted(&consumer.worker, subscription_type[0], sub->queue);
		else if (mqtx_broker_is_open(consumer.worker.conn))
			mqtx_worker_refused(&consumer.worker, subscription_type[0], sub->queue, error);
		else
		{
			mqtx_worker_drop_broker(&consumer.worker, error);
			return false;
		}
	}
	mqtx_worker_end_round(&consumer.worker);
	mqtx_worker_save_refusals(&consumer.worker);
	return true;
}

/*
 * The broker closed a queue's channel or cancelled its consumer: that
 * queue is refused until it is consumed again, the others go on.  A queue
 * deleted under its consumer is in mqtx.queues still: the topology is
 * declared again, and the queue with it, before the next try.
 */
static void
lose_subscription_channel(int channel, const char *error)
{
	ListCell   *lc;

	forget_channel(channel);
	consumer.worker.topology_declared = false;
	foreach(lc, consumer.subscriptions)
	{
		Subscription *sub = lfirst(lc);

		if (sub->channel == channel)
		{
			sub->channel = 0;
			mqtx_worker_refused(&consumer.worker, subscription_type[0], sub->queue, error);
		}
	}
	mqtx_worker_save_refusals(&consumer.worker);
}

/*
 * The key a message is deduplicated on: the original id of a redriven
 * message, its AMQP message_id, or for a message without one a hash of its
 * body (the same body is then the same message).
 */
static char *
dedupe_key(BrokerDelivery *d)
{
	if (d->redriven_from != NULL)
		return d->redriven_from;
	if (d->message_id != NULL)
		return d->message_id;
	return psprintf("sha256:%s", mqtx_sha256_hex(d->body, d->body_len));
}

/*
 * The message as the handler sees it; ERROR when it is poison.
 */
static Jsonb *
parse_body(BrokerDelivery *d)
{
	char	   *str;

	if (d->body_len > mqtx_max_payload)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("body is %d bytes, more than mqtx.max_payload (%d bytes)",
						d->body_len, mqtx_max_payload)));
	if (memchr(d->body, '\0', d->body_len) != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNTRANSLATABLE_CHARACTER),
				 errmsg("body contains a NUL byte")));
	if (!pg_verify_mbstr(PG_UTF8, d->body, d->body_len, true))
		ereport(ERROR,
				(errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
				 errmsg("body is not valid UTF-8")));
	str = pg_any_to_server(d->body, d->body_len, PG_UTF8);
	return DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(str)));
}

static Jsonb *
parse_headers(BrokerDelivery *d)
{
	if (d->headers_error != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("message headers cannot be read: %s", d->headers_error)));
	if (d->headers_json == NULL)
		return DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum("{}")));
	return DatumGetJsonbP(DirectFunctionCall1(jsonb_in,
											  CStringGetDatum(pg_any_to_server(d->headers_json,
																			   strlen(d->headers_json),
																			   PG_UTF8))));
}

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
 * Keep the broker connection alive while the database works.  A failed
 * send is noticed, and the connection dropped, when the batch is acked.
 */
static void
keep_alive(void)
{
	char	   *error = NULL;

	if (consumer.worker.conn != NULL)
		(void) mqtx_broker_keep_alive(consumer.worker.conn, &error);
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
 * SET CONSTRAINTS ALL DEFERRED (true) or ALL IMMEDIATE (false).  A handler
 * runs between the two, so that its deferrable constraints are checked,
 * and its deferred triggers fired, when it returns and as its owner:
 * fired at the batch's commit, they would run as the worker, a
 * superuser, and one handler's checks would fall on the whole batch.
 * (PostgreSQL forbids deferred triggers in a security-restricted operation
 * for the same reason; handlers use them too much to forbid them.)
 */
static void
set_constraints(bool deferred)
{
	ConstraintsSetStmt stmt;

	memset(&stmt, 0, sizeof(stmt));
	stmt.type = T_ConstraintsSetStmt;
	stmt.constraints = NIL;
	stmt.deferred = deferred;
	AfterTriggerSetState(&stmt);
}

/*
 * Call a handler with its owner's privileges and search_path, never the
 * worker's: the owner may replace the function's body at any time, and it
 * must not gain anything by that.  Like a SECURITY DEFINER function's own
 * SET clauses, the handler's are honoured (fmgr applies them inside).
 *
 * The subscription's handler_timeout bounds the call (statement_timeout
 * is only armed for client statements), so a handler waiting on a lock
 * or a remote call cannot stop every queue; on an error, the caller's
 * subtransaction catches it and disarms the timer.
 */
static void
call_handler(Handler *handler, Subscription *sub, Jsonb *payload, Jsonb *headers)
{
	LOCAL_FCINFO(fcinfo, 2);
	MqtxIdentity saved;

	InitFunctionCallInfoData(*fcinfo, &handler->info, 2, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = JsonbPGetDatum(payload);
	fcinfo->args[0].isnull = false;
	fcinfo->args[1].value = JsonbPGetDatum(headers);
	fcinfo->args[1].isnull = false;
	mqtx_become(&saved, handler->owner, handler->search_path, false);
	set_constraints(true);
	enable_timeout_after(STATEMENT_TIMEOUT, sub->handler_timeout_ms);
	(void) FunctionCallInvoke(fcinfo);
	disable_timeout(STATEMENT_TIMEOUT, false);
	/* the timer may have gone off after the call returned */
	if (get_timeout_indicator(STATEMENT_TIMEOUT, true))
		QueryCancelPending = false;
	set_constraints(false);
	mqtx_restore_identity(&saved);
	mqtx_forget_session_state();
}

/*
 * Whether a delivery's key is held by what the database keeps: a parked
 * message of the key, or under after_dead_letter = wait a dead letter.
 */
static bool
key_is_held(Work *w)
{
	Oid			types[3] = {TEXTOID, TEXTOID, BOOLOID};
	Datum		values[3] = {CStringGetTextDatum(w->sub->queue),
		wire_text_datum(w->d->ordering_key),
	BoolGetDatum(w->sub->wait_after_dead_letter)};
	bool		isnull;

	execute(&key_held_plan, key_held_sql, 3, types, values, NULL, SPI_OK_SELECT);
	return DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
									  &isnull));
}

/*
 * A parked message being applied leaves mqtx.parked with its outcome.
 * False when its row is gone already (deleted since it was read).
 */
static bool
unpark(Work *w)
{
	Oid			type = INT8OID;
	Datum		value = Int64GetDatum(w->d->parked_position);

	return execute(&unpark_plan, unpark_sql, 1, &type, &value, NULL, SPI_OK_DELETE) == 1;
}

/*
 * Is an earlier delivery of the batch, of the same queue and key, not
 * applied (held, failed, parked, about to be dead-lettered)?  Then this
 * one must not be applied before it.
 */
static bool
is_behind(Work *work, int i)
{
	Work	   *w = &work[i];

	if (w->sub == NULL || w->d->ordering_key == NULL)
		return false;
	for (int j = 0; j < i; j++)
	{
		Work	   *e = &work[j];

		if (e->sub == w->sub && e->d->ordering_key != NULL &&
			strcmp(e->d->ordering_key, w->d->ordering_key) == 0 &&
			(e->held || e->failed || e->quarantined || e->parked ||
			 (e->result != APPLIED && e->result != DUPLICATE)))
			return true;
	}
	return false;
}

/*
 * Apply one delivery: record its key in the inbox and, unless it was there
 * already, parse it and run the handler.  Errors propagate: the caller's
 * subtransaction holds its effects.  *stage says what an error means: the
 * inbox first, so that a copy of a message already applied or dead-
 * lettered is a duplicate whatever its body.
 */
typedef struct ApplyArgs
{
	Work	   *work;
	List	  **handlers;
	ApplyResult stage;
} ApplyArgs;

static void
apply_one(void *arg)
{
	ApplyArgs  *args = arg;
	Work	   *w = args->work;
	Oid			types[4] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID};
	Datum		values[4] = {CStringGetTextDatum(w->sub->queue), wire_text_datum(w->key)};
	char		nulls[4] = {' ', ' ', 'n', 'n'};
	Jsonb	   *payload;
	Jsonb	   *headers;

	args->stage = POISON;
	if (w->d->ordering_key != NULL && strlen(w->d->ordering_key) > MQTX_SHORTSTR_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("ordering key is %d bytes, more than %d",
						(int) strlen(w->d->ordering_key), MQTX_SHORTSTR_MAX)));
	args->stage = HANDLER_FAILED;
	if (w->d->parked_position == 0 && w->sub->workers > 1)
	{
		/* the apply workers apply it, from mqtx.parked */
		w->held = w->staged = true;
		return;
	}
	if (w->d->parked_position > 0)
	{
		/* gone since it was read: nothing to apply */
		if (!unpark(w))
		{
			w->result = DUPLICATE;
			return;
		}
	}
	else if (w->d->ordering_key != NULL && (w->behind || key_is_held(w)))
	{
		w->held = true;
		return;
	}
	optional_wire_text(w->d->correlation_id, &values[2], &nulls[2]);
	optional_wire_text(w->d->causation_id, &values[3], &nulls[3]);
	if (execute(&inbox_plan, inbox_sql, 4, types, values, nulls, SPI_OK_INSERT) == 0)
	{
		w->result = DUPLICATE;
		return;
	}
	args->stage = POISON;
	payload = parse_body(w->d);
	headers = parse_headers(w->d);
	args->stage = HANDLER_FAILED;
	/* what the handler publishes continues this message's conversation */
	mqtx_enter_handled_message(TextDatumGetCString(values[1]),
							   nulls[2] == 'n' ? NULL : TextDatumGetCString(values[2]));
	mqtx_make_trace_context_current(headers);
	call_handler(handler_info(args->handlers, w->sub->handler), w->sub, payload, headers);
	mqtx_leave_handled_message();
	w->result = APPLIED;
}

/*
 * A serialization failure or a deadlock: the transaction's fault, not the
 * message's.
 */
static bool
is_transient(ErrorData *edata)
{
	return edata->sqlerrcode == ERRCODE_T_R_SERIALIZATION_FAILURE ||
		edata->sqlerrcode == ERRCODE_T_R_DEADLOCK_DETECTED;
}

/*
 * What a delivery's error (in w->edata) means, and in what words.
 */
static void
classify_failure(Work *w, ApplyResult stage, TimestampTz started)
{
	/* what it left outside the rolled-back subtransaction */
	mqtx_forget_session_state();

	/*
	 * A serialization failure or a deadlock is the transaction's, not the
	 * delivery's: what follows it in the batch would fail the same way. The
	 * batch is then applied one transaction per delivery.
	 */
	if (is_transient(w->edata))
		ReThrowError(w->edata);
	w->result = stage;
	w->failed = true;
	/* jsonb_in's own words are about "input syntax"; say what was parsed */
	if (w->result == POISON && strncmp(w->edata->message, "body ", 5) != 0 &&
		strncmp(w->edata->message, "message headers ", 16) != 0)
		w->edata->message = psprintf("body is not valid JSON: %s", w->edata->message);
	if (w->edata->sqlerrcode == ERRCODE_QUERY_CANCELED && w->result == HANDLER_FAILED &&
		TimestampDifferenceExceeds(started, GetCurrentTimestamp(), w->sub->handler_timeout_ms))
		w->edata->message = psprintf("handler ran longer than its timeout of %d ms (handler_timeout of the subscription of queue \"%s\")",
									 w->sub->handler_timeout_ms, w->sub->queue);
}

static void
apply_delivery(Work *w, List **handlers)
{
	ApplyArgs	args = {w, handlers, HANDLER_FAILED};
	TimestampTz started = GetCurrentTimestamp();

	w->edata = in_subtransaction(apply_one, &args);
	if (w->edata != NULL)
		classify_failure(w, args.stage, started);
}

typedef struct BatchArgs
{
	Work	   *work;
	int			count;
	ApplyArgs	current;		/* the delivery being applied */
	TimestampTz started;		/* when it started */
} BatchArgs;

static void
apply_each(void *arg)
{
	BatchArgs  *args = arg;

	for (int i = 0; i < args->count; i++)
	{
		args->current.work = &args->work[i];
		args->current.stage = HANDLER_FAILED;
		args->started = GetCurrentTimestamp();
		args->work[i].behind = is_behind(args->work, i);
		apply_one(&args->current);
		keep_alive();
	}
}

/*
 * Apply the whole batch in one subtransaction, on the bet that nothing in
 * it fails: a subtransaction per delivery costs as much as a small
 * handler, and a SQL-language handler is parsed and planned again in each
 * new one.  Returns false, with nothing applied, when a delivery failed
 * (or had no subscription); the caller then applies the others one by
 * one, each failure on its own.  The one that failed is not applied again:
 * its outcome is known, and a slow or timed-out handler would cost twice.
 */
static bool
apply_all_at_once(Work *work, int count, List **handlers)
{
	BatchArgs	args = {work, count, {NULL, handlers, HANDLER_FAILED}, 0};
	ErrorData  *edata;

	for (int i = 0; i < count; i++)
		if (work[i].sub == NULL || work[i].quarantined)
			return false;
	edata = in_subtransaction(apply_each, &args);
	if (edata == NULL)
		return true;
	args.current.work->edata = edata;
	classify_failure(args.current.work, args.current.stage, args.started);
	return false;
}

/*
 * A string of the delivery as a text datum.  Wire strings are UTF-8; in a
 * database of another encoding they are converted, or kept as hex where
 * that encoding cannot hold them.
 */
typedef struct ConvertArgs
{
	const char *utf8;
	char	   *converted;
} ConvertArgs;

static void
convert_to_server(void *arg)
{
	ConvertArgs *args = arg;

	args->converted = pg_any_to_server(args->utf8, strlen(args->utf8), PG_UTF8);
}

static Datum
wire_text_datum(const char *utf8)
{
	ConvertArgs args = {utf8, NULL};
	ErrorData  *edata;

	if (GetDatabaseEncoding() == PG_UTF8)
		return CStringGetTextDatum(utf8);
	edata = in_subtransaction(convert_to_server, &args);
	if (edata == NULL)
		return CStringGetTextDatum(args.converted);
	FreeErrorData(edata);
	return CStringGetTextDatum(mqtx_hex_string(utf8, strlen(utf8)));
}

/* An optional wire string as a text parameter: NULL stays NULL */
static void
optional_wire_text(const char *utf8, Datum *value, char *null)
{
	*null = utf8 == NULL ? 'n' : ' ';
	if (utf8 != NULL)
		*value = wire_text_datum(utf8);
}

/* The delivery's body, as it was received, as a bytea datum */
static Datum
body_datum(BrokerDelivery *d)
{
	bytea	   *body = palloc(VARHDRSZ + d->body_len);

	memcpy(VARDATA(body), d->body, d->body_len);
	SET_VARSIZE(body, VARHDRSZ + d->body_len);
	return PointerGetDatum(body);
}

/*
 * The dead letter's columns.  full: everything that can be derived, each
 * part parsed afresh (whatever failed to parse before is simply left out);
 * otherwise only what needs no parsing or conversion at all.
 */
typedef struct DeadLetterArgs
{
	Work	   *work;
	bool		full;
	int64		id;				/* the new letter, or 0: there was one */
	bool		notified;
} DeadLetterArgs;

typedef struct ParseArgs
{
	BrokerDelivery *d;
	Datum		result;
} ParseArgs;

static void
body_text_part(void *arg)
{
	ParseArgs  *args = arg;

	args->result = CStringGetTextDatum(pg_any_to_server(args->d->body, args->d->body_len, PG_UTF8));
}

static void
body_json_part(void *arg)
{
	ParseArgs  *args = arg;

	args->result = JsonbPGetDatum(parse_body(args->d));
}

static void
headers_part(void *arg)
{
	ParseArgs  *args = arg;

	args->result = JsonbPGetDatum(parse_headers(args->d));
}

/*
 * A part of the dead letter that may fail to parse: in a subtransaction,
 * NULL when it failed.
 */
static bool
try_part(void (*fn) (void *), BrokerDelivery *d, Datum *value)
{
	ParseArgs	args = {d, (Datum) 0};
	ErrorData  *edata = in_subtransaction(fn, &args);

	if (edata != NULL)
	{
		FreeErrorData(edata);
		return false;
	}
	*value = args.result;
	return true;
}

static void
insert_dead_letter(void *arg)
{
	DeadLetterArgs *args = arg;
	Work	   *w = args->work;
	BrokerDelivery *d = w->d;
	ErrorData  *edata = w->edata;
	Oid			types[16] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, JSONBOID, BYTEAOID,
		TEXTOID, JSONBOID, TEXTOID, TEXTOID, TEXTOID, INT4OID, TEXTOID, INT8OID,
	TEXTOID, TEXTOID};
	Datum		values[16];
	char		nulls[16];
	bool		utf8 = pg_verify_mbstr(PG_UTF8, d->body, d->body_len, true);
	bool		isnull;

	memset(nulls, 'n', sizeof(nulls));

	values[0] = wire_text_datum(d->queue);
	values[1] = wire_text_datum(w->key);
	values[2] = wire_text_datum(d->exchange);
	values[3] = wire_text_datum(d->routing_key);
	nulls[0] = nulls[1] = nulls[2] = nulls[3] = ' ';
	if (args->full && d->headers_json != NULL &&
		try_part(headers_part, d, &values[4]))
		nulls[4] = ' ';
	values[5] = body_datum(d);
	nulls[5] = ' ';
	if (args->full && utf8 && try_part(body_text_part, d, &values[6]))
		nulls[6] = ' ';
	if (args->full && utf8 && d->body_len <= mqtx_max_payload &&
		try_part(body_json_part, d, &values[7]))
		nulls[7] = ' ';
	values[8] = CStringGetTextDatum(edata->message ? edata->message : "unknown error");
	nulls[8] = ' ';
	if (args->full && edata->detail)
	{
		values[9] = CStringGetTextDatum(edata->detail);
		nulls[9] = ' ';
	}
	if (args->full && edata->context)
	{
		values[10] = CStringGetTextDatum(edata->context);
		nulls[10] = ' ';
	}
	values[11] = Int32GetDatum(Max(w->attempts, 1));
	nulls[11] = ' ';
	/* a key too long to be one is no key: it holds nothing */
	if (d->ordering_key != NULL && strlen(d->ordering_key) <= MQTX_SHORTSTR_MAX)
	{
		values[12] = wire_text_datum(d->ordering_key);
		nulls[12] = ' ';
	}
	if (d->parked_position > 0)
	{
		values[13] = Int64GetDatum(d->parked_position);
		nulls[13] = ' ';
	}

	optional_wire_text(d->correlation_id, &values[14], &nulls[14]);
	optional_wire_text(d->causation_id, &values[15], &nulls[15]);
	execute(&dead_letter_plan, dead_letter_sql, 16, types, values, nulls, SPI_OK_SELECT);
	args->id = 0;
	if (SPI_processed == 1)
	{
		args->id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc,
											   1, &isnull));
		args->notified = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0],
													SPI_tuptable->tupdesc, 2, &isnull));
	}
	/* its letter keeps its place in its key (parked_position) */
	if (d->parked_position > 0)
		unpark(w);
}

/*
 * Writing a dead letter failed: with the full record (a minimal one is
 * tried next), or with the minimal one too (the delivery is held).
 */
static void
warn_dead_letter_failed(Work *w, ErrorData *edata, bool full)
{
	ereport(WARNING,
			(full ?
			 errmsg("mqtx consumer: could not write the full dead letter of message %s from queue \"%s\"; writing a minimal one",
					w->key, w->d->queue) :
			 errmsg("mqtx consumer: could not dead-letter message %s from queue \"%s\"; it is held and tried again",
					w->key, w->d->queue),
			 errdetail_internal("%s", edata->message)));
	FreeErrorData(edata);
}

/*
 * Dead-letter a delivery, with all that can be said of it, or else with
 * the least; each try in a subtransaction, so that nothing in a message
 * (nor an error writing it: a lock timeout, where lock_timeout is set)
 * can take the batch down.  Returns whether the message now has its dead
 * letter.
 */
static bool
dead_letter(Work *w)
{
	DeadLetterArgs args = {w, true, 0, false};
	ErrorData  *edata = in_subtransaction(insert_dead_letter, &args);

	if (edata != NULL)
	{
		warn_dead_letter_failed(w, edata, true);
		args.full = false;
		edata = in_subtransaction(insert_dead_letter, &args);
	}
	if (edata != NULL)
	{
		warn_dead_letter_failed(w, edata, false);
		return false;
	}
	if (args.id == 0)
		return true;			/* a copy was dead-lettered already */

	w->dead_lettered = true;
	ereport(WARNING,
			(errmsg_plural("mqtx consumer: dead-lettered message %s from queue \"%s\" after %d attempt (mqtx.dead_letter id " INT64_FORMAT ")",
						   "mqtx consumer: dead-lettered message %s from queue \"%s\" after %d attempts (mqtx.dead_letter id " INT64_FORMAT ")",
						   Max(w->attempts, 1),
						   w->key, w->d->queue, Max(w->attempts, 1), args.id),
			 errdetail_internal("%s", w->edata->message),
			 errhint("Fix the cause, then SELECT mqtx.redrive(id) or mqtx.discard(id).")));
	if (!args.notified)
		ereport(WARNING,
				(errmsg("mqtx consumer: no NOTIFY mqtx_dead_letter for dead letter " INT64_FORMAT ": the notification queue is more than half full",
						args.id)));
	return true;
}

static void
insert_attempt(void *arg)
{
	Work	   *w = arg;
	Oid			types[3] = {TEXTOID, TEXTOID, TEXTOID};
	Datum		values[3] = {wire_text_datum(w->d->queue), wire_text_datum(w->key),
	CStringGetTextDatum(w->edata->message ? w->edata->message : "unknown error")};
	bool		isnull;

	execute(&record_attempt_plan, record_attempt_sql, 3, types, values, NULL,
			SPI_OK_INSERT_RETURNING);
	w->attempts = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc,
											  1, &isnull));
}

/*
 * Count a failed attempt.  When it cannot be recorded (a lock timeout,
 * say), the delivery is held for a retry all the same, its attempt
 * unrecorded.
 */
static void
record_attempt(Work *w)
{
	ErrorData  *edata = in_subtransaction(insert_attempt, w);

	if (edata == NULL)
		return;
	ereport(WARNING,
			(errmsg("mqtx consumer: could not record the failed attempt of message %s from queue \"%s\"",
					w->key, w->d->queue),
			 errdetail_internal("%s", edata->message)));
	FreeErrorData(edata);
	w->attempts = 0;
}

/*
 * When a delivery that failed attempts times is tried again: the backoff,
 * exponential with jitter (half the delay fixed, half random), capped.
 */
static TimestampTz
retry_time(int attempts)
{
	double		delay = Min((double) mqtx_retry_max,
							mqtx_retry_base * pow(2.0, Max(attempts, 1) - 1));

	delay *= 0.5 + 0.5 * pg_prng_double(&pg_global_prng_state);
	return TimestampTzPlusMilliseconds(GetCurrentTimestamp(), (int64) delay);
}

typedef struct ParkArgs
{
	Work	   *work;
	TimestampTz retry_at;		/* 0: as soon as its key lets it */
} ParkArgs;

static void
insert_parked(void *arg)
{
	ParkArgs   *args = arg;
	Work	   *w = args->work;
	BrokerDelivery *d = w->d;
	Oid			types[9] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, JSONBOID, BYTEAOID,
	TIMESTAMPTZOID, TEXTOID};
	Datum		values[9];
	char		nulls[9] = {' ', ' ', ' ', ' ', ' ', 'n', ' ', 'n', 'n'};

	values[0] = CStringGetTextDatum(w->sub->queue);
	if (d->ordering_key != NULL)
		values[1] = wire_text_datum(d->ordering_key);
	else
		nulls[1] = 'n';
	values[2] = wire_text_datum(w->key);
	values[3] = wire_text_datum(d->exchange);
	values[4] = wire_text_datum(d->routing_key);
	if (d->headers_json != NULL)
	{
		values[5] = JsonbPGetDatum(parse_headers(d));
		nulls[5] = ' ';
	}
	values[6] = body_datum(d);
	if (args->retry_at != 0)
	{
		values[7] = TimestampTzGetDatum(args->retry_at);
		nulls[7] = ' ';
	}
	optional_wire_text(d->correlation_id, &values[8], &nulls[8]);
	execute(&park_plan, park_sql, 9, types, values, nulls, SPI_OK_INSERT);
}

/* A message applied from mqtx.parked stays there: only its next attempt's time changes. */
static void
set_parked_retry(void *arg)
{
	ParkArgs   *args = arg;
	Oid			types[2] = {INT8OID, TIMESTAMPTZOID};
	Datum		values[2] = {Int64GetDatum(args->work->d->parked_position),
	TimestampTzGetDatum(args->retry_at)};

	execute(&park_retry_plan, park_retry_sql, 2, types, values, NULL, SPI_OK_UPDATE);
}

/*
 * Park a delivery of an ordering key in mqtx.parked (or, for one applied
 * from there, set its next attempt's time), in a subtransaction.  Returns
 * whether it is parked: it may then be acknowledged.  When it cannot be
 * (headers this database cannot hold, say), it is dead-lettered instead,
 * and the result says whether that worked.
 */
static bool
park(Work *w, TimestampTz retry_at)
{
	ParkArgs	args = {w, retry_at};
	ErrorData  *edata = in_subtransaction(w->d->parked_position > 0 ? set_parked_retry :
										  insert_parked, &args);

	if (edata == NULL)
	{
		/* look for it again by its time; its key's next once it is gone */
		consumer.next_parked_check_at = Min(consumer.next_parked_check_at,
											retry_at != 0 ? retry_at :
											TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
																		mqtx_poll_interval));
		return true;
	}

	/*
	 * Held in memory instead, it would let its key's later messages by:
	 * dead-lettered, it keeps its place (headers this database cannot hold
	 * make it poison anyway).
	 */
	ereport(WARNING,
			(errmsg("mqtx consumer: could not park message %s of ordering key \"%s\" from queue \"%s\"; dead-lettering it",
					w->key, w->d->ordering_key, w->d->queue),
			 errdetail_internal("%s", edata->message)));
	w->edata = edata;
	w->result = POISON;
	w->held = false;
	w->attempts = Max(w->attempts, 1);
	return dead_letter(w);
}

/*
 * A quorum queue with x-delivery-limit drops (or dead-letters to its own
 * exchange) a message handed back once more than the limit: this delivery,
 * if it failed, is the last the consumer would see, and holding it for a
 * retry would lose it to a crash or a lost connection.  It is dead-lettered
 * here instead, where an operator can redrive it.  The consumer's own
 * retries never hand a message back, so only crashes and lost connections
 * bring a message this far.
 */
static bool
is_last_delivery(Work *w)
{
	if (w->sub->delivery_limit <= 0 || w->d->delivery_count < w->sub->delivery_limit)
		return false;
	ereport(LOG,
			(errmsg("mqtx consumer: message %s from queue \"%s\" failed on the last delivery the broker allows (x-delivery-count " INT64_FORMAT ", x-delivery-limit %d); dead-lettering it now",
					w->key, w->d->queue, w->d->delivery_count, w->sub->delivery_limit)));
	return true;
}

/*
 * Decide, in the transaction, what becomes of a delivery that failed.
 */
static void
settle_failure(Work *w)
{
	if (w->result == POISON)
	{
		w->attempts = 1;
		w->settled = dead_letter(w);
		return;
	}
	record_attempt(w);
	if (w->attempts >= w->sub->max_attempts || is_last_delivery(w))
		w->settled = dead_letter(w);
	else if (w->d->ordering_key != NULL || w->d->parked_position > 0)
		w->settled = w->parked = park(w, retry_time(w->attempts));
}

static void
hold_for_retry(BrokerDelivery *d, int attempts)
{
	MemoryContext old = MemoryContextSwitchTo(consumer.long_context);
	HeldDelivery *held = palloc(sizeof(HeldDelivery));

	copy_delivery(&held->delivery, d);
	held->delivery.redelivered = true;	/* it has an attempt on record now */
	held->retry_at = retry_time(attempts);
	consumer.held = lappend(consumer.held, held);
	MemoryContextSwitchTo(old);
}

/*
 * The commit must be on disk before the ack goes out: once acked, the
 * broker forgets the message, and a commit lost in a crash (as an
 * asynchronous one can be, with synchronous_commit = off anywhere in the
 * configuration) would lose the message with it.  A flush of what is on
 * disk already costs nothing.
 */
static void
commit_durably(void)
{
	mqtx_worker_end_step(&consumer.worker);
	if (IsTransactionOrTransactionBlock())
		elog(ERROR, "mqtx consumer: the batch's transaction did not end at its commit");
	XLogFlush(XactLastCommitEnd);
}

/*
 * Is this the delivery earlier consumers died on?  (In the transaction:
 * the digest needs its resource owner.)  And often enough to be
 * dead-lettered instead of applied?  Then it is, with that as its reason.
 */
static bool
is_suspect(Work *w)
{
	return consumer.suspect.digest != NULL && w->key != NULL &&
		strcmp(consumer.suspect.digest, mqtx_crash_guard_digest(w->d->queue, w->key)) == 0;
}

static bool
is_quarantined(Work *w)
{
	MqtxCrashRecord *suspect = &consumer.suspect;

	if (!w->suspect || suspect->deaths < MQTX_DEATHS_BEFORE_QUARANTINE)
		return false;
	w->result = POISON;
	w->edata = palloc0(sizeof(ErrorData));
	w->edata->sqlerrcode = ERRCODE_INTERNAL_ERROR;
	w->edata->message = psprintf("quarantined: the consumer process died %d times while applying this message alone",
								 suspect->deaths);
	w->edata->detail = pstrdup("A crash, the OOM killer or a FATAL error ended the process; the server log has the details.");
	return true;
}

/*
 * Write down what is about to be applied, for the next consumer should
 * this one die in it.
 */
static void
note_applying(Work *work, int count)
{
	int			deaths = count == 1 && work[0].suspect ? consumer.suspect.deaths : 0;

	mqtx_crash_guard_applying(count, work[0].d->queue, work[0].key, deaths);
}

/*
 * The suspect came through, applied or dead-lettered or a duplicate: it is
 * a suspect no more.
 */
static void
forget_suspect(Work *work, int count)
{
	for (int i = 0; i < count; i++)
		if (work[i].settled && work[i].suspect)
			memset(&consumer.suspect, 0, sizeof(consumer.suspect));
}

/*
 * What the previous consumer of this database left: did it die applying?
 */
static void
learn_from_predecessor(void)
{
	const MqtxCrashRecord *record;

	record = mqtx_crash_guard_open(consumer.apply_number < 0 ? "consumer" :
								   psprintf("apply%d", consumer.apply_number));

	if (!record->died_applying)
		return;
	consumer.one_at_a_time = Max(record->deliveries, mqtx_batch_size);
	if (record->digest == NULL)
	{
		ereport(LOG,
				(errmsg_plural("mqtx consumer: the previous consumer died while applying a batch of %d delivery; applying the next %d one at a time",
							   "mqtx consumer: the previous consumer died while applying a batch of %d deliveries; applying the next %d one at a time",
							   record->deliveries,
							   record->deliveries, consumer.one_at_a_time)));
		return;
	}
	consumer.suspect = *record;
	consumer.suspect.deaths = record->deaths + 1;
	ereport(LOG,
			(errmsg_plural("mqtx consumer: a consumer died while applying message %s from queue \"%s\" alone (%d time)",
						   "mqtx consumer: a consumer died while applying message %s from queue \"%s\" alone (%d times)",
						   consumer.suspect.deaths,
						   record->key, record->queue, consumer.suspect.deaths),
			 consumer.suspect.deaths >= MQTX_DEATHS_BEFORE_QUARANTINE ?
			 errdetail("It will be dead-lettered without being applied.") : 0));
}

/*
 * A subscription with apply workers may have this many messages parked
 * for them before the consumer stops acknowledging its deliveries: the
 * broker then stops at the prefetch, and the backlog stays in the queue,
 * where the operator looks for it, rather than moving into mqtx.parked.
 * Two batches a worker keep every worker busy.
 */
static int
staging_limit(Subscription *sub)
{
	return (int) Min((int64) mqtx_batch_size * 2 * sub->workers, INT_MAX);
}

/* Is the subscription's staging full?  In a transaction. */
static bool
is_staging_full(Subscription *sub)
{
	int			running[MQTX_MAX_APPLY_WORKERS];
	int			nrunning = mqtx_apply_workers_running(running);
	int			limit = staging_limit(sub);
	Datum	   *numbers;
	Oid			types[5] = {TEXTOID, INT4OID, BOOLOID, INT4OID, INT4ARRAYOID};
	Datum		values[5];
	bool		isnull;

	/* with no worker at all, everything would wait here: leave it queued */
	if (nrunning == 0)
		return true;
	numbers = palloc(sizeof(Datum) * nrunning);
	for (int i = 0; i < nrunning; i++)
		numbers[i] = Int32GetDatum(running[i]);
	values[0] = CStringGetTextDatum(sub->queue);
	values[1] = Int32GetDatum(limit);
	values[2] = BoolGetDatum(sub->wait_after_dead_letter);
	values[3] = Int32GetDatum(sub->workers);
	values[4] = PointerGetDatum(construct_array(numbers, nrunning, INT4OID, sizeof(int32),
												true, TYPALIGN_INT));
	execute(&staged_plan, staged_sql, 5, types, values, NULL, SPI_OK_SELECT);
	return DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
									   &isnull)) >= limit;
}

/*
 * Of each subscription that staged deliveries in the batch: is its
 * staging full now, with them?
 */
static void
note_staging_full(Work *work, int count)
{
	for (int i = 0; i < count; i++)
	{
		bool		first = true;

		if (!work[i].staged)
			continue;
		for (int j = 0; j < i && first; j++)
			first = !(work[j].staged && work[j].sub == work[i].sub);
		if (first)
			work[i].sub->staging_full = is_staging_full(work[i].sub);
	}
}

/*
 * Apply deliveries in one transaction and decide each one's outcome.
 * Returns whether the transaction committed; when it did not, nothing of
 * it happened and *commit_error says why.
 */
static bool
try_in_one_transaction(Work *work, int count, ErrorData **commit_error)
{
	MemoryContext pass_context = CurrentMemoryContext;
	volatile bool committed = false;

	PG_TRY();
	{
		List	   *handlers = NIL;

		mqtx_worker_begin_step("mqtx consumer: applying a batch");
		/* what handlers of an aborted batch left outside it */
		mqtx_forget_session_state();
		for (int i = 0; i < count; i++)
		{
			Work	   *w = &work[i];

			w->sub = find_subscription(consumer.subscriptions, server_queue_name(w->d));
			w->key = w->sub ? dedupe_key(w->d) : NULL;
			w->edata = NULL;
			w->attempts = 0;
			w->settled = w->dead_lettered = w->failed = false;
			w->held = w->staged = w->parked = false;
			w->result = APPLIED;
			w->suspect = w->sub != NULL && is_suspect(w);
			w->quarantined = is_quarantined(w);
		}
		note_applying(work, count);
		if (!(count > 1 && apply_all_at_once(work, count, &handlers)))
			for (int i = 0; i < count; i++)
			{
				/* a single delivery's place in its batch is the caller's */
				if (count > 1)
				{
					work[i].held = work[i].staged = false;
					work[i].behind = is_behind(work, i);
				}
				if (work[i].sub != NULL && !work[i].quarantined && !work[i].failed)
					apply_delivery(&work[i], &handlers);
				keep_alive();
			}
		/* in the batch's order: parked messages keep it */
		for (int i = 0; i < count; i++)
		{
			Work	   *w = &work[i];

			if (w->sub == NULL)
				continue;
			if (w->held)
				w->settled = w->parked = park(w, 0);
			else if (w->result == APPLIED || w->result == DUPLICATE)
				w->settled = true;
			else
				settle_failure(w);
		}
		note_staging_full(work, count);
		commit_durably();
		committed = true;
	}
	PG_CATCH();
	{
		disable_timeout(STATEMENT_TIMEOUT, false);
		MemoryContextSwitchTo(pass_context);
		*commit_error = CopyErrorData();
		FlushErrorState();
		AbortOutOfAnyTransaction();
		MemoryContextSwitchTo(pass_context);
		clip_error(*commit_error);
		pgstat_report_activity(STATE_IDLE, NULL);
	}
	PG_END_TRY();
	mqtx_crash_guard_idle();
	if (committed)
		forget_suspect(work, count);
	return committed;
}

/*
 * A delivery whose transaction failed on its own, at commit or anywhere
 * else outside a subtransaction: it fails like a handler, in a transaction
 * of its own.  An error here is no message's doing, and is left to the
 * worker's own recovery.
 */
static void
record_transaction_failure(Work *w, ErrorData *commit_error)
{
	mqtx_worker_begin_step("mqtx consumer: recording a failed attempt");
	w->sub = find_subscription(consumer.subscriptions, server_queue_name(w->d));
	w->key = dedupe_key(w->d);
	w->edata = commit_error;
	w->result = HANDLER_FAILED;
	w->settled = w->dead_lettered = false;
	w->held = w->staged = w->parked = false;
	w->attempts = 0;

	/*
	 * A serialization failure or deadlock says nothing about the message: it
	 * is tried again, after the backoff, without spending an attempt.
	 */
	if (is_transient(commit_error))
	{
		ereport(LOG,
				(errmsg("mqtx consumer: message %s from queue \"%s\" is tried again after its backoff",
						w->key, w->d->queue),
				 errdetail_internal("%s", commit_error->message)));
		/* a key's message waits parked, not held (see key_held_sql) */
		if (w->sub != NULL && (w->d->ordering_key != NULL || w->d->parked_position > 0))
			w->settled = w->parked = park(w, retry_time(1));
	}
	else if (w->sub != NULL)
		settle_failure(w);
	commit_durably();
}

/*
 * Apply a batch: in one transaction, or, when that fails, one transaction
 * per delivery, so that a failure at commit falls on the delivery that
 * caused it.
 */
static void
apply_batch(Work *work, int count)
{
	ErrorData  *commit_error = NULL;

	if (try_in_one_transaction(work, count, &commit_error))
		return;
	if (count > 1)
	{
		ereport(LOG,
				(errmsg("mqtx consumer: a batch of %d deliveries failed as a whole; applying them one at a time",
						count),
				 errdetail_internal("%s", commit_error->message)));
		/* the errors stay in the pass's memory, gone with it */
		for (int i = 0; i < count; i++)
		{
			work[i].behind = is_behind(work, i);
			if (!try_in_one_transaction(&work[i], 1, &commit_error))
				record_transaction_failure(&work[i], commit_error);
		}
		return;
	}
	record_transaction_failure(&work[0], commit_error);
}

/* Count a delivery's outcome, once its transaction has committed. */
static void
count_outcome(Work *w)
{
	if (w->held)
		return;					/* parked behind its key: counted when applied */
	if (w->result == APPLIED)
		mqtx_count(consumer.worker.slot, MQTX_CONSUMER_APPLIED, 1);
	else if (w->result == DUPLICATE || (w->settled && !w->dead_lettered && !w->parked))
		mqtx_count(consumer.worker.slot, MQTX_CONSUMER_DUPLICATES, 1);
	else if (w->dead_lettered)
		mqtx_count(consumer.worker.slot, MQTX_CONSUMER_DEAD_LETTERED, 1);
	else
		mqtx_count(consumer.worker.slot, MQTX_CONSUMER_RETRIED, 1);
}

/* Acknowledge it once the apply workers have caught up (release_deferred) */
static void
defer_ack(DeliveryTag tag)
{
	MemoryContext old = MemoryContextSwitchTo(consumer.long_context);
	DeliveryTag *deferred = palloc(sizeof(DeliveryTag));

	*deferred = tag;
	consumer.deferred = lappend(consumer.deferred, deferred);
	MemoryContextSwitchTo(old);
}

/*
 * After the commit: count, and sort into acks, requeues and holds.  A
 * message applied from mqtx.parked has nothing to acknowledge.
 */
static int
act_on_outcomes(Work *work, int count, DeliveryTag *ack, DeliveryTag *requeue,
				int *nrequeue)
{
	int			nack = 0;

	*nrequeue = 0;
	for (int i = 0; i < count; i++)
	{
		Work	   *w = &work[i];
		DeliveryTag tag = {w->d->channel, w->d->delivery_tag};

		if (w->sub == NULL && w->d->parked_position == 0)
		{
			requeue[(*nrequeue)++] = tag;
			continue;
		}
		if (w->sub == NULL)
			continue;
		count_outcome(w);
		if (w->d->parked_position > 0)
			continue;
		if (w->settled && w->staged && w->sub->staging_full)
			defer_ack(tag);
		else if (w->settled)
			ack[nack++] = tag;
		else if (mqtx_broker_channel_is_open(consumer.worker.conn, tag.channel))
			hold_for_retry(w->d, w->attempts);
		/* else its channel closed: the broker has it back, attempts on record */
	}
	return nack;
}

/*
 * Acknowledge a channel's deliveries: with one "multiple" ack when no
 * older delivery of the channel is still held back for a retry or handed
 * back.
 */
static bool
acknowledge_channel(int channel, DeliveryTag *ack, int nack, bool requeued,
					char **error)
{
	uint64		max_tag = 0;
	uint64		oldest_held = PG_UINT64_MAX;
	int			nchannel = 0;
	ListCell   *lc;

	for (int i = 0; i < nack; i++)
		if (ack[i].channel == channel)
		{
			max_tag = Max(max_tag, ack[i].tag);
			nchannel++;
		}
	if (nchannel == 0)
		return true;
	foreach(lc, consumer.held)
	{
		BrokerDelivery *held = &((HeldDelivery *) lfirst(lc))->delivery;

		if (held->channel == channel)
			oldest_held = Min(oldest_held, held->delivery_tag);
	}
	foreach(lc, consumer.deferred)
	{
		DeliveryTag *deferred = lfirst(lc);

		if (deferred->channel == channel)
			oldest_held = Min(oldest_held, deferred->tag);
	}
	if (!requeued && oldest_held > max_tag)
		return mqtx_broker_ack(consumer.worker.conn, channel, max_tag, true, error);
	for (int i = 0; i < nack; i++)
		if (ack[i].channel == channel &&
			!mqtx_broker_ack(consumer.worker.conn, channel, ack[i].tag, false, error))
			return false;
	return true;
}

/*
 * After the commit: acknowledge, channel by channel, and hand back what
 * is no longer subscribed.
 */
static bool
acknowledge(DeliveryTag *ack, int nack, DeliveryTag *requeue, int nrequeue,
			char **error)
{
	for (int i = 0; i < nrequeue; i++)
		if (!mqtx_broker_requeue(consumer.worker.conn, requeue[i].channel, requeue[i].tag,
								 error))
			return false;
	for (int i = 0; i < nack; i++)
	{
		bool		first = true;
		bool		requeued = false;

		/* each channel once, at its first delivery */
		for (int j = 0; j < i && first; j++)
			first = ack[j].channel != ack[i].channel;
		if (!first)
			continue;
		for (int j = 0; j < nrequeue; j++)
			requeued |= requeue[j].channel == ack[i].channel;
		if (!acknowledge_channel(ack[i].channel, ack, nack, requeued, error))
			return false;
	}
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
 * Parked messages whose keys let them go: the first of each key, oldest
 * first, into the batch.  Looked for when the last look found some, when
 * the consumer parked something, and otherwise every poll interval (an
 * operator's redrive or discard, a retry come due).
 */
static int
take_parked(BrokerDelivery *batch, int capacity)
{
	Oid			types[2] = {INT4OID, INT4OID};
	Datum		values[2] = {Int32GetDatum(capacity), Int32GetDatum(consumer.apply_number)};
	int			count;

	if (capacity == 0 || GetCurrentTimestamp() < consumer.next_parked_check_at)
		return 0;
	mqtx_worker_begin_step("mqtx consumer: reading parked messages");
	execute(&parked_heads_plan, parked_heads_sql, 2, types, values, NULL, SPI_OK_SELECT);
	count = (int) SPI_processed;
	MemoryContextSwitchTo(consumer.worker.context);
	for (int i = 0; i < count; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		BrokerDelivery *d = &batch[i];
		bool		isnull;
		bytea	   *body;

		memset(d, 0, sizeof(*d));
		d->parked_position = DatumGetInt64(SPI_getbinval(tuple, desc, 1, &isnull));
		d->queue = server_to_wire(SPI_getvalue(tuple, desc, 2));
		d->ordering_key = server_to_wire(SPI_getvalue(tuple, desc, 3)); /* NULL: none */
		d->message_id = server_to_wire(SPI_getvalue(tuple, desc, 4));
		d->exchange = server_to_wire(SPI_getvalue(tuple, desc, 5));
		d->routing_key = server_to_wire(SPI_getvalue(tuple, desc, 6));
		if (d->exchange == NULL)
			d->exchange = pstrdup("");
		if (d->routing_key == NULL)
			d->routing_key = pstrdup("");
		d->headers_json = server_to_wire(SPI_getvalue(tuple, desc, 7));
		d->correlation_id = server_to_wire(SPI_getvalue(tuple, desc, 9));
		d->causation_id = server_to_wire(SPI_getvalue(tuple, desc, 10));
		d->redelivered = true;
		body = DatumGetByteaPP(SPI_getbinval(tuple, desc, 8, &isnull));
		d->body_len = VARSIZE_ANY_EXHDR(body);
		d->body = palloc(d->body_len + 1);
		memcpy(d->body, VARDATA_ANY(body), d->body_len);
		d->body[d->body_len] = '\0';
	}
	mqtx_worker_end_step(&consumer.worker);
	consumer.next_parked_check_at = count > 0 ? 0 :
		TimestampTzPlusMilliseconds(GetCurrentTimestamp(), mqtx_poll_interval);
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
	int64		budget = (int64) mqtx_batch_max_bytes * 1024;
	int64		bytes = 0;

	count += take_parked(batch + count, capacity - count);
	if (consumer.apply_number >= 0)
		return count;			/* an apply worker reads no queue */

	for (int i = 0; i < count; i++)
		bytes += batch[i].body_len;
	while (count < capacity && bytes < budget)
	{
		int			rc;

		rc = mqtx_broker_next_delivery(consumer.worker.conn,
									   count == 0 ? DELIVERY_WAIT_MS : 0,
									   &batch[count], error);
		if (rc < 0)
			return -1;
		if (rc == BROKER_CHANNEL_LOST)
		{
			lose_subscription_channel(batch[count].channel, *error);
			*error = NULL;
			continue;
		}
		if (rc == 0)
			break;
		bytes += batch[count].body_len;
		count++;
	}
	return count;
}

/* The subscription consumed on this channel, or NULL */
static Subscription *
subscription_on_channel(int channel)
{
	ListCell   *lc;

	foreach(lc, consumer.subscriptions)
	{
		Subscription *sub = lfirst(lc);

		if (sub->channel == channel)
			return sub;
	}
	return NULL;
}

/*
 * Acknowledge the deferred deliveries of the subscriptions whose apply
 * workers have caught up.  Looked at on every pass while any wait.
 * Returns false when the connection failed.
 */
static bool
release_deferred(char **error)
{
	List	   *kept = NIL;
	List	   *released = NIL;
	ListCell   *lc;
	MemoryContext old;

	if (consumer.deferred == NIL)
		return true;
	mqtx_worker_begin_step("mqtx consumer: looking at the apply workers' backlog");
	foreach(lc, consumer.subscriptions)
	{
		Subscription *sub = lfirst(lc);

		if (sub->channel != 0 && sub->staging_full)
			sub->staging_full = sub->workers > 1 && is_staging_full(sub);
	}
	mqtx_worker_end_step(&consumer.worker);

	old = MemoryContextSwitchTo(consumer.long_context);
	foreach(lc, consumer.deferred)
	{
		DeliveryTag *tag = lfirst(lc);
		Subscription *sub = subscription_on_channel(tag->channel);

		if (sub != NULL && sub->staging_full)
			kept = lappend(kept, tag);
		else
			released = lappend(released, tag);
	}
	MemoryContextSwitchTo(old);
	foreach(lc, released)
	{
		DeliveryTag *tag = lfirst(lc);

		/* (a tag of a channel gone is forgotten with the channel) */
		if (!mqtx_broker_ack(consumer.worker.conn, tag->channel, tag->tag, false, error))
		{
			list_free(kept);
			list_free(released);
			return false;
		}
	}
	list_free(consumer.deferred);
	consumer.deferred = kept;
	list_free_deep(released);
	return true;
}

/*
 * Apply one delivery per transaction, to find the one that killed the
 * previous consumer: for as many as it had in hand, and while a suspect
 * has not come back (for at most SUSPECT_WAIT_MS: it may have been taken
 * off its queue meanwhile).
 */
#define SUSPECT_WAIT_MS (5 * 60 * 1000)

static bool
one_at_a_time(void)
{
	if (consumer.one_at_a_time > 0)
		return true;
	if (consumer.suspect.digest != NULL &&
		TimestampDifferenceExceeds(consumer.started_at, GetCurrentTimestamp(), SUSPECT_WAIT_MS))
		memset(&consumer.suspect, 0, sizeof(consumer.suspect));
	return consumer.suspect.digest != NULL;
}

/*
 * One pass: collect, apply, commit, acknowledge.  Returns whether the
 * batch was full.
 */
static bool
consume_pass(void)
{
	int			capacity = one_at_a_time() ? 1 : mqtx_batch_size;
	BrokerDelivery *batch = palloc(sizeof(BrokerDelivery) * capacity);
	Work	   *work;
	DeliveryTag *ack = palloc(sizeof(DeliveryTag) * capacity);
	DeliveryTag *requeue = palloc(sizeof(DeliveryTag) * capacity);
	int			nrequeue;
	char	   *error = NULL;
	int			count;
	int			received = 0;	/* from the broker, not mqtx.parked */
	int			staged = 0;
	int			nack;

	if (!release_deferred(&error))
	{
		mqtx_worker_drop_broker(&consumer.worker, error);
		return false;
	}
	count = collect_batch(batch, capacity, &error);
	if (count < 0)
	{
		mqtx_worker_drop_broker(&consumer.worker, error);
		return false;
	}
	if (count == 0)
		return false;
	for (int i = 0; i < count; i++)
		received += batch[i].parked_position == 0;
	mqtx_count(consumer.worker.slot, MQTX_CONSUMER_CONSUMED, received);
	consumer.one_at_a_time = Max(consumer.one_at_a_time - count, 0);

	work = palloc0(sizeof(Work) * count);
	for (int i = 0; i < count; i++)
		work[i].d = &batch[i];
	apply_batch(work, count);
	for (int i = 0; i < count; i++)
		staged += work[i].staged && work[i].parked;
	if (staged > 0)
		mqtx_apply_workers_wake();
	nack = act_on_outcomes(work, count, ack, requeue, &nrequeue);
	if (!acknowledge(ack, nack, requeue, nrequeue, &error))
		mqtx_worker_drop_broker(&consumer.worker, error);
	return count == capacity;
}

/*
 * An error escaped a pass outside any delivery's handling: from the broker
 * connection, reading subscriptions, or recording an attempt.  It is no
 * message's doing; log it, clean up as PostgresMain would, and start over
 * on a new connection (the broker requeues what was unacknowledged) after
 * the usual backoff, instead of exiting and coming back to the same state.
 */
static void
recover_from_error(void)
{
	HOLD_INTERRUPTS();
	disable_timeout(STATEMENT_TIMEOUT, false);
	QueryCancelPending = false;
	EmitErrorReport();
	AbortOutOfAnyTransaction();
	FlushErrorState();
	MemoryContextSwitchTo(consumer.worker.context);
	pgstat_report_activity(STATE_IDLE, NULL);
	RESUME_INTERRUPTS();

	if (consumer.apply_number < 0)
		mqtx_worker_restart_broker(&consumer.worker,
								   "an error interrupted the consumer (logged just before)");
	consumer.subscriptions_loaded = false;

	/* a persistent error costs a log line now and then, not a busy loop */
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					 consumer.error_pause_ms, PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
	consumer.error_pause_ms = Min(consumer.error_pause_ms * 2, ERROR_PAUSE_MAX_MS);
}

/*
 * The extension is gone (or not updated yet): nothing can be applied, so
 * hand every delivery back (a new connection) rather than let them wait
 * unread, and read the subscriptions afresh when it is back.
 */
static void
stop_consuming(void)
{
	ListCell   *lc;
	bool		consuming = false;

	foreach(lc, consumer.subscriptions)
		consuming |= ((Subscription *) lfirst(lc))->channel != 0;
	if (consuming && consumer.worker.conn != NULL)
		mqtx_worker_restart_broker(&consumer.worker,
								   "the extension is not installed at the version the consumer needs");
	consumer.subscriptions_loaded = false;
	consumer.apply_workers_known = false;
	mqtx_apply_workers_stop();
}

/*
 * Run as many apply workers as the subscription that has the most needs.
 * Read whenever the subscriptions (or the topology) changed, without the
 * broker: they apply what is parked already, broker or not.
 */
static void
follow_apply_workers(void)
{
	uint32		generation = mqtx_slot_topology_generation(consumer.worker.slot);
	bool		isnull;

	if (!consumer.apply_workers_known || generation != consumer.apply_workers_generation)
	{
		mqtx_worker_begin_step("mqtx consumer: reading how many apply workers are needed");
		if (SPI_execute(apply_workers_sql, true, 1) != SPI_OK_SELECT)
			elog(ERROR, "reading mqtx.subscriptions failed");
		consumer.apply_workers_needed =
			DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1,
										&isnull));
		mqtx_worker_end_step(&consumer.worker);
		consumer.apply_workers_generation = generation;
		consumer.apply_workers_known = true;
	}
	mqtx_apply_workers_follow(consumer.apply_workers_needed, consumer.worker.assignment);
}

/*
 * One turn of the loop: connect, follow the subscriptions, consume.
 */
static void
consumer_turn(void)
{
	bool		ready;
	bool		consuming;
	bool		more_work;

	ready = mqtx_worker_extension_ready(&consumer.worker);
	if (!ready)
		stop_consuming();
	else
		follow_apply_workers();
	consuming = ready && mqtx_worker_ensure_broker(&consumer.worker) &&
		load_subscriptions();
	consuming = consuming && consumer.subscriptions != NIL && start_consuming();
	consumer.worker.receiving = consuming;

	/*
	 * While consuming, the wait for deliveries is the loop's sleep: it waits
	 * on the latch with the socket (mqtx_broker_next_delivery), so a SIGHUP,
	 * a SIGTERM or a change of subscriptions ends it as mqtx_worker_wait
	 * would.
	 */
	more_work = consuming && consume_pass();
	if (consuming)
		consumer.error_pause_ms = ERROR_PAUSE_MIN_MS;
	if (!more_work && ready)
		mqtx_worker_apply_retention(&consumer.worker, "inbox", retention_sql, inbox_retention,
									&consumer.next_retention_at);
	if (!consuming)
		mqtx_worker_wait(&consumer.worker, mqtx_poll_interval);
}

/*
 * Entry point of the consumer worker (one per served database).
 */
void
mqtx_consumer_main(Datum main_arg)
{
	memset(&consumer, 0, sizeof(consumer));
	consumer.apply_number = -1;
	mqtx_worker_start(&consumer.worker, MQTX_CONSUMER, main_arg);
	consumer_loop();
}

/*
 * Apply workers.  A subscription with workers > 1 is applied in parallel
 * by that many processes, while the consumer remains the queue's only
 * reader: it parks every delivery in mqtx.parked, in the order it receives
 * them, in its batch's transaction, and acknowledges them after the
 * commit, as it does for any parked message.  Apply worker i applies the
 * parked messages of the keys that hash to i, the first of each key at a
 * time, as the consumer applies a key's parked messages itself, and the
 * messages without a key whose position does.  So one key's messages are
 * applied by one process, one after the other, in the order the consumer
 * received them, and different keys by different processes at once.
 *
 * The hand-over is a table rather than shared-memory queues because the
 * order, the acknowledgement and recovery then need nothing new:
 *
 * - A message is acknowledged once it is durably in the database that
 *   applies it, as a parked message always was; the apply worker's
 *   transaction takes it out of mqtx.parked and applies it at once, so a
 *   crash of any process at any point leaves it either applied or parked,
 *   and the inbox makes a redelivered copy a duplicate.  With queues in
 *   memory, a message handed to a worker that dies would be known only to
 *   the broker, and redelivered behind later messages of its key that
 *   another process already holds.
 * - A key's order is the order of positions, which one process (the
 *   consumer) assigns and commits in order; an apply worker sees the next
 *   message of a key only once the previous one's transaction, which
 *   deleted it, has committed.  Two processes that reach for the same
 *   message (a worker restarted while its predecessor still ran, or the
 *   workers renumbered when a subscription's count changes) meet at its
 *   row: the second one's DELETE waits for the first and then finds
 *   nothing, so the message counts as a duplicate.
 * - Failures keep the consumer's rules: a failed attempt stays parked with
 *   its next attempt's time, holding back its key only; a dead letter
 *   keeps its place for a redrive.
 *
 * The cost is a row written and deleted per message, which a handler of
 * any size outweighs.  The consumer stops acknowledging a subscription's
 * deliveries while its workers are behind (staging_limit), so that the
 * broker holds the backlog.
 */
void
mqtx_apply_worker_main(Datum main_arg)
{
	MqtxApplyWorkerExtra extra;

	memcpy(&extra, MyBgworkerEntry->bgw_extra, sizeof(extra));
	memset(&consumer, 0, sizeof(consumer));
	consumer.apply_number = extra.number;
	consumer.consumer_pid = extra.consumer_pid;
	mqtx_worker_start_apply(&consumer.worker, main_arg);
	mqtx_apply_worker_take_place(consumer.worker.slot, extra.number);
	consumer_loop();
}

/*
 * An apply worker serves the consumer that started it, and only while
 * that consumer is its database's.
 */
static void
exit_without_consumer(void)
{
	mqtx_worker_exit_unless_served(&consumer.worker);
	if (mqtx_slot_worker_pid(consumer.worker.slot, MQTX_CONSUMER) != consumer.consumer_pid)
		proc_exit(0);
}

/*
 * The subscriptions as they are now, when they (or the topology) changed;
 * an apply worker has no channels to follow.
 */
static void
follow_subscriptions(void)
{
	uint32		generation = mqtx_slot_topology_generation(consumer.worker.slot);

	if (consumer.subscriptions_loaded && generation == consumer.subscriptions_generation)
		return;
	replace_subscriptions(read_subscriptions(), generation);
}

/*
 * One turn of an apply worker: apply what is parked for it, or sleep
 * until the consumer parks more (it sets our latch), the poll interval
 * has passed (a retry come due, a redrive), or a signal.
 */
static void
apply_worker_turn(void)
{
	exit_without_consumer();
	follow_subscriptions();
	if (consume_pass())
		return;
	if (consumer.next_parked_check_at > GetCurrentTimestamp())
	{
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Max(1, TimestampDifferenceMilliseconds(GetCurrentTimestamp(),
																consumer.next_parked_check_at)),
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		consumer.next_parked_check_at = 0;
	}
}

/* The loop of the consumer and of an apply worker */
static void
consumer_loop(void)
{
	/*
	 * A batch allocates tens of kilobytes per delivery (handler caches,
	 * parsed bodies) and frees it all at once when the pass ends.  glibc
	 * would hand that memory back to the kernel every time and fault it in
	 * again page by page for the next batch: a page fault for every page of
	 * every batch.  Keep freed memory in the process.
	 */
#ifdef __GLIBC__
	mallopt(M_TRIM_THRESHOLD, 256 * 1024 * 1024);
	mallopt(M_MMAP_THRESHOLD, 64 * 1024 * 1024);
#endif
	consumer.worker.on_disconnect = forget_connection_state;
	consumer.error_pause_ms = ERROR_PAUSE_MIN_MS;
	consumer.long_context = AllocSetContextCreate(TopMemoryContext,
												  "mqtx consumer state",
												  ALLOCSET_DEFAULT_SIZES);
	consumer.started_at = GetCurrentTimestamp();
	learn_from_predecessor();

	for (;;)
	{
		MemoryContextReset(consumer.worker.context);
		MemoryContextSwitchTo(consumer.worker.context);
		if (ConfigReloadPending && consumer.apply_number >= 0)
		{
			/* no broker, and the consumer's place in the slot is not ours */
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}
		else if (ConfigReloadPending)
			mqtx_worker_reload(&consumer.worker);

		PG_TRY();
		{
			/* in here: a cancel that arrives between calls is an ERROR too */
			CHECK_FOR_INTERRUPTS();
			if (consumer.apply_number >= 0)
				apply_worker_turn();
			else
				consumer_turn();
		}
		PG_CATCH();
		{
			recover_from_error();
		}
		PG_END_TRY();
	}
}

/* The consumer's own setting: how long the inbox remembers message ids. */
void
mqtx_consumer_define_settings(void)
{
	DefineCustomIntVariable("mqtx.inbox_retention",
							"How long mqtx.inbox keeps applied message ids (-1 keeps them forever).",
							"Duplicates are recognised only while their id is kept: keep it longer than any redelivery can take.",
							&inbox_retention, 7 * 24 * 3600, -1, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
}
