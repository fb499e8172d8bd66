/*-------------------------------------------------------------------------
 *
 * relay.c
 *	  The relay worker: publishes mqtx.outbox to RabbitMQ with publisher
 *	  confirms and records each message's fate.
 *
 * One relay runs per database in mqtx.database.  Each pass, in one
 * transaction, claims a batch of due pending rows, oldest first, with FOR
 * UPDATE SKIP LOCKED, puts the whole batch on the wire, takes in the
 * publisher confirms that have arrived, and records the outcome of every
 * earlier batch whose confirms are all in.  Confirms are pipelined twice
 * over: one wait per batch rather than per message, and up to
 * MAX_BATCHES_IN_FLIGHT batches await theirs while the database records
 * and claims, so the broker always has work.
 *
 * Row locks are therefore held from the claim until the end of that pass,
 * not until the batch's own confirms arrive; later claims skip the rows in
 * flight explicitly, through a hashed subplan (NOT (id = ANY (array))
 * compared every candidate row with every id in flight: a tenth of a
 * second per claim at 5000 in flight).  That is deliberate: nothing is
 * lost by it, since an outbox row leaves "pending" only in the transaction
 * that records its confirm, so a crash at any point leaves every
 * unconfirmed row pending and it is sent again (a duplicate, never a
 * loss; consumers dedupe on message_id).  What it buys is throughput: the
 * database's work overlaps the broker's, and no transaction waits a whole
 * confirm round trip while holding locks.  What it costs: a second relay on the same table (mqtx
 * starts one per database) could, between two passes, claim rows still in
 * flight and send duplicates.
 *
 * The relay commits asynchronously (synchronous_commit = off): losing the
 * last commits in a crash only turns "published" rows back into pending
 * ones, which are published again; the consumer's inbox absorbs the
 * duplicates.  Waiting for a WAL flush per batch would buy nothing.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "mqtx.h"


static const char *const claim_sql =
"SELECT id, message_id::text, exchange, routing_key, payload::text, headers, "
"       extract(epoch FROM created_at)::bigint "
"FROM mqtx.outbox "
"WHERE status = 'pending' AND next_attempt_at <= pg_catalog.now() "
"  AND id NOT IN (SELECT pg_catalog.unnest($2::bigint[])) "
"ORDER BY next_attempt_at, id "
"LIMIT $1 "
"FOR UPDATE SKIP LOCKED";

static const char *const mark_published_sql =
"UPDATE mqtx.outbox SET status = 'published', published_at = pg_catalog.now() "
"WHERE id = ANY($1) AND status = 'pending'";

/*
 * One failed attempt per row: back off exponentially with jitter (half the
 * delay fixed, half random), or give up past max_attempts and raise the
 * alert.  Only the rows that gave up come back.
 *
 * LISTEN needs no privilege, so the alert names the row and nothing of
 * the message: its exchange, routing key and error text (which can quote
 * the payload) stay in the table, for whoever may read it.  No alert goes
 * out while the NOTIFY queue is more than half full: a full one would fail
 * the commit, and the WARNING is logged all the same.
 */
static const char *const record_failures_sql =
"WITH attempt AS ("
"  UPDATE mqtx.outbox o"
"     SET attempts = o.attempts + 1,"
"         last_error = f.error,"
"         status = CASE WHEN o.attempts + 1 >= $3 THEN 'failed' ELSE 'pending' END,"
"         next_attempt_at = pg_catalog.now() + pg_catalog.make_interval(secs =>"
"             least($5::float8, $4::float8 * pg_catalog.power(2, least(o.attempts, 40)))"
"             * (0.5 + pg_catalog.random() / 2) / 1000)"
"    FROM ROWS FROM (pg_catalog.unnest($1::bigint[]), pg_catalog.unnest($2::text[]))"
"         AS f(id, error)"
"   WHERE o.id = f.id AND o.status = 'pending'"
"  RETURNING o.id, o.message_id, o.attempts, o.last_error, o.status"
") "
"SELECT a.id, a.message_id::text, a.attempts, a.last_error "
"FROM attempt a LEFT JOIN LATERAL ("
"  SELECT pg_catalog.pg_notify('mqtx_alert', pg_catalog.json_build_object("
"      'event', 'outbox_message_failed',"
"      'database', pg_catalog.current_database(), 'id', a.id)::text)"
"  WHERE pg_catalog.pg_notification_queue_usage() < 0.5"
") n ON true "
"WHERE a.status = 'failed'";

static const char *const retention_sql =
"DELETE FROM mqtx.outbox WHERE id IN ("
"  SELECT id FROM mqtx.outbox"
"   WHERE status = 'published'"
"     AND published_at < pg_catalog.now() - pg_catalog.make_interval(secs => $1)"
"   ORDER BY id LIMIT $2)";

/* The batch being relayed: rows and their messages, index-aligned. */
typedef struct RelayBatch
{
	MemoryContext context;		/* holds the batch; deleted once recorded */
	int			count;
	int64	   *ids;
	BrokerMessage *messages;
} RelayBatch;

/*
 * How many sent batches may await their confirms at once.  RabbitMQ
 * confirms persistent messages in bursts, when a queue has written them
 * out; with one batch awaiting, the relay blocks on it while the broker
 * runs out of work.  Four kept the median of six 60000-message drains at
 * 6500 msg/s against 5900 with one, at the default batch size.
 */
#define MAX_BATCHES_IN_FLIGHT 4

typedef struct RelayState
{
	MqtxWorker	worker;			/* worker.context is reset every pass */
	/* sent, confirms not all recorded yet; oldest first */
	RelayBatch *in_flight[MAX_BATCHES_IN_FLIGHT];
	int			batches_in_flight;
	TimestampTz next_retention_at;
} RelayState;

static RelayState relay;

/*
 * The relay's statements, parsed and planned once per process: at a
 * trickle (one pass per committing transaction) parsing and planning them
 * again every pass was nearly half of the relay's CPU.  The plan cache
 * replans them after DDL on the outbox, as it would a PREPAREd statement.
 */
static SPIPlanPtr claim_plan = NULL;
static SPIPlanPtr mark_published_plan = NULL;
static SPIPlanPtr record_failures_plan = NULL;

static Datum build_array(Datum *elements, int count, Oid element_type);
static void record_outcomes(RelayBatch *batch, const char *batch_error);

/*
 * The connection is going: batches still awaiting their confirms will not
 * get them, so their rows get a failed attempt now.
 */
static void
record_cut_off_batches(const char *error)
{
	if (relay.batches_in_flight == 0)
		return;
	mqtx_worker_begin_step("mqtx relay: recording batches cut off from the broker");
	for (int i = 0; i < relay.batches_in_flight; i++)
		record_outcomes(relay.in_flight[i], error);
	mqtx_worker_end_step(&relay.worker);
	for (int i = 0; i < relay.batches_in_flight; i++)
		MemoryContextDelete(relay.in_flight[i]->context);
	relay.batches_in_flight = 0;
}

/*
 * Claim due rows, other than those still in flight, and copy them into the
 * pass context; the transaction (and the row locks) stay open.
 */
static RelayBatch *
claim_batch(void)
{
	Oid			argtypes[2] = {INT4OID, INT8ARRAYOID};
	Datum		args[2];
	Datum	   *in_flight_ids;
	int			in_flight_count = 0;
	RelayBatch *batch;
	MemoryContext batch_context;
	MemoryContext spi_context;

	for (int b = 0; b < relay.batches_in_flight; b++)
		in_flight_count += relay.in_flight[b]->count;
	in_flight_ids = palloc(sizeof(Datum) * Max(in_flight_count, 1));
	in_flight_count = 0;
	for (int b = 0; b < relay.batches_in_flight; b++)
		for (int i = 0; i < relay.in_flight[b]->count; i++)
			in_flight_ids[in_flight_count++] = Int64GetDatum(relay.in_flight[b]->ids[i]);

	mqtx_worker_begin_step("mqtx relay: publishing");
	args[0] = Int32GetDatum(mqtx_batch_size);
	args[1] = build_array(in_flight_ids, in_flight_count, INT8OID);
	if (mqtx_execute_prepared(&claim_plan, claim_sql, 2, argtypes, args, NULL) != SPI_OK_SELECT)
		elog(ERROR, "claiming outbox rows failed");

	batch_context = AllocSetContextCreate(TopMemoryContext, "mqtx relay batch",
										  ALLOCSET_DEFAULT_SIZES);
	spi_context = MemoryContextSwitchTo(batch_context);
	batch = palloc0(sizeof(RelayBatch));
	batch->context = batch_context;
	batch->count = (int) SPI_processed;
	batch->ids = palloc0(sizeof(int64) * Max(batch->count, 1));
	batch->messages = palloc0(sizeof(BrokerMessage) * Max(batch->count, 1));
	for (int i = 0; i < batch->count; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		BrokerMessage *m = &batch->messages[i];
		bool		isnull;
		Datum		headers;

		batch->ids[i] = DatumGetInt64(SPI_getbinval(tuple, desc, 1, &isnull));
		m->context = batch_context;
		m->message_id = SPI_getvalue(tuple, desc, 2);
		m->exchange = SPI_getvalue(tuple, desc, 3);
		m->routing_key = SPI_getvalue(tuple, desc, 4);
		m->body = SPI_getvalue(tuple, desc, 5);
		m->body_len = strlen(m->body);
		headers = SPI_getbinval(tuple, desc, 6, &isnull);
		m->headers = isnull ? NULL : DatumGetJsonbPCopy(headers);
		m->timestamp = DatumGetInt64(SPI_getbinval(tuple, desc, 7, &isnull));
		m->outcome = PUBLISH_NOT_SENT;
	}
	MemoryContextSwitchTo(spi_context);
	return batch;
}

/*
 * Refuse, before sending anything, the messages whose exchange does not
 * exist: publishing to it would close the channel and fail the whole
 * batch.  Returns false when the connection failed.
 */
static bool
reject_unknown_exchanges(RelayBatch *batch, char **error)
{
	for (int i = 0; i < batch->count; i++)
	{
		BrokerMessage *m = &batch->messages[i];
		char	   *reason = NULL;

		if (m->outcome != PUBLISH_NOT_SENT)
			continue;
		if (broker_exchange_exists(relay.worker.conn, m->exchange, &reason))
			continue;
		if (!broker_is_open(relay.worker.conn))
		{
			*error = reason;
			return false;
		}
		/* the same verdict for every message of the batch to that exchange */
		for (int j = i; j < batch->count; j++)
			if (strcmp(batch->messages[j].exchange, m->exchange) == 0)
			{
				batch->messages[j].outcome = PUBLISH_REJECTED;
				batch->messages[j].error = reason;
			}
	}
	return true;
}

/*
 * Put every message of the batch on the wire, without waiting for
 * confirms.  Returns false when the connection (or channel) failed on the
 * way; the messages' outcomes say how far each got.
 */
static bool
send_batch(RelayBatch *batch, char **error)
{
	if (!reject_unknown_exchanges(batch, error))
		return false;

	for (int i = 0; i < batch->count; i++)
	{
		if (batch->messages[i].outcome != PUBLISH_NOT_SENT)
			continue;
		if (!broker_publish(relay.worker.conn, &batch->messages[i], error))
			return false;
	}
	return true;
}

static Datum
build_array(Datum *elements, int count, Oid element_type)
{
	int16		typlen;
	bool		typbyval;
	char		typalign;

	get_typlenbyvalalign(element_type, &typlen, &typbyval, &typalign);
	return PointerGetDatum(construct_array(elements, count, element_type,
										   typlen, typbyval, typalign));
}

static void
mark_published(Datum *ids, int count)
{
	Oid			argtypes[1] = {INT8ARRAYOID};
	Datum		args[1];

	if (count == 0)
		return;
	args[0] = build_array(ids, count, INT8OID);
	if (mqtx_execute_prepared(&mark_published_plan, mark_published_sql, 1,
							  argtypes, args, NULL) != SPI_OK_UPDATE)
		elog(ERROR, "marking outbox rows published failed");
	mqtx_count(relay.worker.slot, MQTX_RELAY_PUBLISHED, count);
}

/*
 * Record a failed attempt for each row; rows past mqtx.max_attempts become
 * failed, with a WARNING and a NOTIFY mqtx_alert each.
 */
static void
record_failures(Datum *ids, Datum *errors, int count)
{
	Oid			argtypes[5] = {INT8ARRAYOID, TEXTARRAYOID, INT4OID, INT4OID, INT4OID};
	Datum		args[5];
	uint64		gave_up;

	if (count == 0)
		return;
	args[0] = build_array(ids, count, INT8OID);
	args[1] = build_array(errors, count, TEXTOID);
	args[2] = Int32GetDatum(mqtx_max_attempts);
	args[3] = Int32GetDatum(mqtx_retry_base);
	args[4] = Int32GetDatum(mqtx_retry_max);
	if (mqtx_execute_prepared(&record_failures_plan, record_failures_sql, 5,
							  argtypes, args, NULL) != SPI_OK_SELECT)
		elog(ERROR, "recording failed outbox attempts failed");

	gave_up = SPI_processed;
	for (uint64 i = 0; i < gave_up; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;

		ereport(WARNING,
				(errmsg("mqtx relay: gave up on message %s (outbox id %s) after %s attempts",
						SPI_getvalue(tuple, desc, 2), SPI_getvalue(tuple, desc, 1),
						SPI_getvalue(tuple, desc, 3)),
				 errdetail_internal("Last error: %s", SPI_getvalue(tuple, desc, 4)),
				 errhint("Its outbox row is now failed; fix the cause, then set its status to 'pending' and attempts to 0 to send it again.")));
	}
	mqtx_count(relay.worker.slot, MQTX_RELAY_FAILED, gave_up);
	mqtx_count(relay.worker.slot, MQTX_RELAY_RETRIED, count - gave_up);
}

/*
 * Write every row's outcome.  Messages that never reached the broker are
 * left as they were: they go out with the next batch.
 */
static void
record_outcomes(RelayBatch *batch, const char *batch_error)
{
	Datum	   *published = palloc(sizeof(Datum) * batch->count);
	Datum	   *failed = palloc(sizeof(Datum) * batch->count);
	Datum	   *errors = palloc(sizeof(Datum) * batch->count);
	int			npublished = 0;
	int			nfailed = 0;

	for (int i = 0; i < batch->count; i++)
	{
		BrokerMessage *m = &batch->messages[i];
		const char *error;

		switch (m->outcome)
		{
			case PUBLISH_NOT_SENT:
				continue;
			case PUBLISH_ACKED:
				published[npublished++] = Int64GetDatum(batch->ids[i]);
				continue;
			case PUBLISH_NACKED:
				mqtx_count(relay.worker.slot, MQTX_RELAY_NACKED, 1);
				error = m->error;
				break;
			case PUBLISH_RETURNED:
				mqtx_count(relay.worker.slot, MQTX_RELAY_RETURNED, 1);
				error = m->error;
				break;
			case PUBLISH_REJECTED:
				error = m->error;
				break;
			case PUBLISH_UNCONFIRMED:
			default:
				error = batch_error ? batch_error : "no publisher confirm";
				break;
		}
		failed[nfailed] = Int64GetDatum(batch->ids[i]);
		errors[nfailed++] = CStringGetTextDatum(error);
	}
	mark_published(published, npublished);
	record_failures(failed, errors, nfailed);
}

/*
 * Take batches off the front of the pipeline into done[], oldest first, as
 * long as their confirms are all in.  Blocks, once, for the oldest when
 * the pipeline is full or nothing new was sent (there is nothing else to
 * do, and returning would spin).  Returns the number taken; *delivered
 * becomes false when the wait failed.
 */
static int
take_settled_batches(RelayBatch **done, bool sent_something, bool *delivered,
					 char **error)
{
	int			taken = 0;
	bool		waited = false;

	while (relay.batches_in_flight > 0)
	{
		RelayBatch *oldest = relay.in_flight[0];

		if (!broker_all_settled(oldest->messages, oldest->count))
		{
			bool		must_wait = !waited &&
				(!sent_something || relay.batches_in_flight == MAX_BATCHES_IN_FLIGHT);

			if (!must_wait)
				break;
			waited = true;
			if (!broker_await_confirms(relay.worker.conn, oldest->messages,
									   oldest->count, mqtx_confirm_timeout, error))
			{
				*delivered = false;
				break;
			}
		}
		done[taken++] = oldest;
		relay.batches_in_flight--;
		memmove(&relay.in_flight[0], &relay.in_flight[1],
				sizeof(RelayBatch *) * relay.batches_in_flight);
	}
	return taken;
}

/*
 * One pass, in one transaction: claim a batch and send it, take in the
 * confirms that have arrived, and record the outcome of every batch in
 * flight whose confirms are all in.  When the connection fails, this
 * pass's batch is recorded with the error here, and the batches in flight
 * by record_cut_off_batches as the connection is dropped.  Returns whether
 * there is more to do right away.
 */
static bool
relay_pass(void)
{
	RelayBatch *batch = claim_batch();
	RelayBatch *done[MAX_BATCHES_IN_FLIGHT + 1];	/* and this pass's batch */
	int			ndone = 0;
	char	   *error = NULL;
	bool		delivered;

	if (batch->count == 0 && relay.batches_in_flight == 0)
	{
		mqtx_worker_end_step(&relay.worker);
		MemoryContextDelete(batch->context);
		return false;
	}

	delivered = send_batch(batch, &error) &&
		broker_poll(relay.worker.conn, &error);
	if (delivered)
		ndone = take_settled_batches(done, batch->count > 0, &delivered, &error);
	for (int i = 0; i < ndone; i++)
		record_outcomes(done[i], NULL);
	if (delivered && batch->count > 0)
		relay.in_flight[relay.batches_in_flight++] = batch;
	else
	{
		if (!delivered)
			record_outcomes(batch, error);
		done[ndone++] = batch;
	}
	/* the error text lives in SPI's memory, gone at the end of the step */
	error = error ? MemoryContextStrdup(relay.worker.context, error) : NULL;
	mqtx_worker_end_step(&relay.worker);

	for (int i = 0; i < ndone; i++)
		MemoryContextDelete(done[i]->context);
	if (!delivered)
		mqtx_worker_drop_broker(&relay.worker, error);
	return relay.batches_in_flight > 0;
}

void
mqtx_relay_main(Datum main_arg)
{
	bool		more_work = false;

	memset(&relay, 0, sizeof(relay));
	mqtx_worker_start(&relay.worker, MQTX_RELAY, main_arg);
	relay.worker.on_disconnect = record_cut_off_batches;
	SetConfigOption("synchronous_commit", "off", PGC_SUSET, PGC_S_OVERRIDE);

	/*
	 * The relay's queries walk the outbox's indexes in order.  Statistics
	 * on a queue table are stale by nature (a bulk enqueue is not analyzed
	 * before it is relayed), and a plan that sorts every pending row to
	 * pick the oldest few costs O(backlog) per batch.  Keep the planner on
	 * index paths for this session.
	 */
	SetConfigOption("enable_seqscan", "off", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("enable_bitmapscan", "off", PGC_SUSET, PGC_S_OVERRIDE);
	SetConfigOption("enable_sort", "off", PGC_SUSET, PGC_S_OVERRIDE);

	/*
	 * With those paths disabled, a plan that still needs one costs over
	 * 1e10 and crosses every JIT threshold: LLVM compiled, inlined and
	 * optimized at start-up, some 0.45 billion instructions, as much as
	 * 500 small passes.  The relay's statements are short; JIT never pays
	 * off for them.
	 */
	SetConfigOption("jit", "off", PGC_SUSET, PGC_S_OVERRIDE);

	for (;;)
	{
		if (!more_work)
			mqtx_worker_wait(&relay.worker, mqtx_poll_interval);
		CHECK_FOR_INTERRUPTS();
		MemoryContextReset(relay.worker.context);
		MemoryContextSwitchTo(relay.worker.context);

		if (ConfigReloadPending)
			mqtx_worker_reload(&relay.worker);

		more_work = false;
		if (!mqtx_worker_extension_ready(&relay.worker))
			continue;
		if (mqtx_worker_ensure_broker(&relay.worker))
			more_work = relay_pass();
		if (!more_work)
			mqtx_worker_apply_retention(&relay.worker, retention_sql, mqtx_retention,
										&relay.next_retention_at);
	}
}
