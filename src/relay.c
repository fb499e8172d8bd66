/*-------------------------------------------------------------------------
 *
 * relay.c
 *	  The relay worker: publishes mqtx.outbox to RabbitMQ with publisher
 *	  confirms and records each message's fate.
 *
 * One relay runs per database in mqtx.database.  Each pass has two halves.
 * In one short transaction it records the outcome of every message the
 * broker has decided (confirmed, refused, returned) and reads the next
 * batch of due pending rows, oldest first, up to mqtx.batch_size rows or
 * mqtx.batch_max_bytes of payload; the transaction commits.  Then, holding
 * no transaction, no snapshot and no lock, it flushes WAL as far as the
 * batch's commits need (make_durable), puts the batch on the wire and
 * takes in the confirms that have arrived, waiting for them only when the
 * pipeline is full or there is nothing else to send.  A broker that is
 * slow, blocked or gone therefore never holds back vacuum, and every wait
 * for it answers signals (broker.c).
 *
 * The claim is the in-flight list, not row locks: later claims skip the
 * rows in flight explicitly, through a hashed subplan (NOT (id = ANY
 * (array)) compared every candidate row with every id in flight, which
 * grows with the square of what is in flight).  Nothing is lost by it, since
 * an outbox row leaves "pending" only in the transaction that records its
 * confirm, so a crash at any point leaves every unconfirmed row pending
 * and it is sent again (a duplicate, never a loss; consumers dedupe on
 * message_id).  Up to MAX_BATCHES_IN_FLIGHT batches await their confirms
 * while the database records and claims, so the broker always has work.
 * What it costs: a second relay on the same table (mqtx starts one per
 * database) could claim rows still in flight and send duplicates.
 *
 * Attempts count what the broker refused, never what could not be
 * observed: a message whose confirm is late, or whose connection was lost,
 * has an unknown fate, stays pending and is sent again without being
 * charged (note_late_confirms, forget_in_flight).
 *
 * The relay commits asynchronously (synchronous_commit = off): losing the
 * last commits in a crash only turns "published" rows back into pending
 * ones, which are published again; the consumer's inbox absorbs the
 * duplicates.  Waiting for a WAL flush per batch would buy nothing.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/transam.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/namespace.h"
#include "nodes/makefuncs.h"
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

#include "broker.h"
#include "outbox.h"
#include "relay.h"
#include "standby.h"
#include "statements.h"
#include "worker.h"

static int	max_attempts = 10;
static int	outbox_retention = 7 * 24 * 3600;
static bool wait_for_standby = false;

/*
 * With mqtx.wait_for_standby, how long a pass waits for a standby to flush
 * a claimed batch's WAL before it holds the batch back and later passes
 * look again; a standby on a fast network flushes in a millisecond or two.
 */
#define STANDBY_WAIT_MS 100
#define STANDBY_POLL_MS 1

/*
 * A standby that lags is said once it has kept the messages back this
 * long; no standby at all, at once.
 */
#define STANDBY_LAG_WARNING_MS 10000


/*
 * Due pending rows, oldest first, other than those in flight.  The relay's
 * claim is the in-flight list, not the row locks taken here: they last
 * only as long as the claim's short transaction, and keep it from taking
 * a row that a session is withdrawing (mqtx.cancel) or changing.  xmin
 * tells whose commit made a row visible, for make_durable.
 *
 * A row with an ordering key is taken only when no earlier row of its key
 * is pending or failed: the earlier one is published and confirmed first,
 * and each key has at most one message on its way (a later one sent with
 * it could overtake it, were the earlier one refused and retried).  Its
 * key goes with the message as the header x-mqtx-ordering-key
 * (MQTX_ORDERING_KEY_HEADER, spelt out: test/bench reads this statement
 * from the source).  The correlation id that mqtx.publish wrote into the
 * headers (MQTX_CORRELATION_ID_HEADER) is sent as the AMQP property too,
 * where consumers look for it.
 */
static const char *const claim_sql =
"SELECT o.id, o.message_id::text, o.exchange, o.routing_key, o.payload::text, "
"       CASE WHEN o.ordering_key IS NULL THEN o.headers "
"            ELSE coalesce(o.headers, '{}'::pg_catalog.jsonb) "
"                 OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object("
"                     'x-mqtx-ordering-key', o.ordering_key) END, "
"       extract(epoch FROM o.created_at)::bigint, o.xmin,"
"       o.headers ->> 'x-mqtx-correlation-id' "
"FROM mqtx.outbox o "
"WHERE o.status = 'pending' AND o.next_attempt_at <= pg_catalog.now() "
"  AND o.id NOT IN (SELECT pg_catalog.unnest($2::bigint[])) "
"  AND (o.ordering_key IS NULL OR NOT EXISTS ("
"        SELECT FROM mqtx.outbox e "
"         WHERE e.ordering_key = o.ordering_key AND e.id < o.id "
"           AND e.status IN ('pending', 'failed'))) "
"ORDER BY o.next_attempt_at, o.id "
"LIMIT $1 "
"FOR NO KEY UPDATE OF o SKIP LOCKED";

/*
 * The claim for an outbox before 0.8.0, which has no ordering keys: the
 * library is upgraded and restarted before ALTER EXTENSION ... UPDATE
 * runs, and publishing goes on meanwhile.
 */
static const char *const unordered_claim_sql =
"SELECT o.id, o.message_id::text, o.exchange, o.routing_key, o.payload::text, o.headers, "
"       extract(epoch FROM o.created_at)::bigint, o.xmin,"
"       o.headers ->> 'x-mqtx-correlation-id' "
"FROM mqtx.outbox o "
"WHERE o.status = 'pending' AND o.next_attempt_at <= pg_catalog.now() "
"  AND o.id NOT IN (SELECT pg_catalog.unnest($2::bigint[])) "
"ORDER BY o.next_attempt_at, o.id "
"LIMIT $1 "
"FOR NO KEY UPDATE OF o SKIP LOCKED";

/*
 * When the next pending row not yet due becomes due: a scheduled message,
 * or a retry.  The relay sleeps until then at most, so a message is sent
 * within milliseconds of its time without polling the outbox for it.
 */
static const char *const next_due_sql =
"SELECT pg_catalog.min(next_attempt_at) FROM mqtx.outbox "
"WHERE status = 'pending' AND next_attempt_at > pg_catalog.now()";

/*
 * Outcomes are written to the rows that were sent: the same id and the
 * same message id.  Ids alone could name other messages by then: after
 * DROP and CREATE EXTENSION, or TRUNCATE ... RESTART IDENTITY, they start
 * again at 1 while confirms of the old rows may still be coming in.
 */
static const char *const mark_published_sql =
"UPDATE mqtx.outbox o SET status = 'published', published_at = pg_catalog.now() "
"  FROM ROWS FROM (pg_catalog.unnest($1::bigint[]), pg_catalog.unnest($2::text[]))"
"       AS p(id, message_id) "
"WHERE o.id = p.id AND o.message_id = p.message_id::pg_catalog.uuid "
"  AND o.status = 'pending'";

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
"         status = CASE WHEN o.attempts + 1 >= $4 THEN 'failed' ELSE 'pending' END,"
"         next_attempt_at = pg_catalog.now() + pg_catalog.make_interval(secs =>"
"             least($6::float8, $5::float8 * pg_catalog.power(2, least(o.attempts, 40)))"
"             * (0.5 + pg_catalog.random() / 2) / 1000)"
"    FROM ROWS FROM (pg_catalog.unnest($1::bigint[]), pg_catalog.unnest($2::text[]),"
"                    pg_catalog.unnest($3::text[]))"
"         AS f(id, message_id, error)"
"   WHERE o.id = f.id AND o.message_id = f.message_id::pg_catalog.uuid"
"     AND o.status = 'pending'"
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

/*
 * Published rows past retention, oldest first, through
 * outbox_published_at_idx (0.4.0): a pass reads what it deletes.
 */
static const char *const retention_sql =
"DELETE FROM mqtx.outbox WHERE id IN ("
"  SELECT id FROM mqtx.outbox"
"   WHERE status = 'published'"
"     AND published_at < pg_catalog.now() - pg_catalog.make_interval(secs => $1)"
"   ORDER BY published_at LIMIT $2)";

/*
 * A batch sent to the broker: rows and their messages, index-aligned.  A
 * message's body is freed as soon as it is on the wire; what stays until
 * its outcome is recorded is its id, message id and outcome.
 */
typedef struct RelayBatch
{
	MemoryContext context;		/* holds the batch; deleted once recorded */
	Oid			outbox;			/* the table its rows are in */
	int			count;
	int64	   *ids;
	BrokerMessage *messages;
	bool	   *recorded;		/* its outcome is written */
	TimestampTz sent_at;		/* confirms are due confirm_timeout later */
	bool		timed_out;		/* its unconfirmed rows may be sent again */
} RelayBatch;

/*
 * How many sent batches may await their confirms at once.  RabbitMQ
 * confirms persistent messages in bursts, when a queue has written them
 * out; with one batch awaiting, the relay blocks on it while the broker
 * runs out of work.  Batches whose confirms are late count too: they bound
 * how much is sent again to a broker that is slow to confirm.
 */
#define MAX_BATCHES_IN_FLIGHT 4

typedef struct RelayState
{
	MqtxWorker	worker;			/* worker.context is reset every pass */
	/* sent, outcomes not all recorded yet; oldest first */
	RelayBatch *in_flight[MAX_BATCHES_IN_FLIGHT];
	int			batches_in_flight;
	bool		blocked;		/* the broker blocked the connection */
	bool		confirms_late;	/* logged that a batch timed out */
	double		confirm_latency_ms; /* recent send-to-confirm time, 0: none
									 * yet */
	bool		outbox_replaced;	/* logged that in-flight rows were dropped */
	XLogRecPtr	standby_target; /* waiting for a standby to flush this far */
	RelayBatch *held;			/* claimed, sent once a standby has its WAL */
	XLogRecPtr	held_newest_commit;
	TimestampTz standby_wait_since;
	bool		standby_wait_logged;
	TimestampTz next_retention_at;
	TimestampTz next_due_at;	/* a row not due at the last claim is then; 0:
								 * none known */
} RelayState;

static RelayState relay;

/*
 * The relay's statements, parsed and planned once per process: at a
 * trickle (one pass per committing transaction) parsing and planning them
 * again every pass was nearly half of the relay's CPU.  The plan cache
 * replans them after DDL on the outbox, as it would a PREPAREd statement.
 */
static SPIPlanPtr claim_plan = NULL;
static SPIPlanPtr unordered_claim_plan = NULL;
static SPIPlanPtr mark_published_plan = NULL;
static SPIPlanPtr record_failures_plan = NULL;
static SPIPlanPtr next_due_plan = NULL;

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

/* Its messages may still await confirms: the connection must let go of them. */
static void
free_batch(RelayBatch *batch)
{
	mqtx_broker_forget_messages(relay.worker.conn, batch->messages, batch->count);
	MemoryContextDelete(batch->context);
}

static void
mark_published(Datum *ids, Datum *message_ids, int count)
{
	Oid			argtypes[2] = {INT8ARRAYOID, TEXTARRAYOID};
	Datum		args[2];

	if (count == 0)
		return;
	args[0] = build_array(ids, count, INT8OID);
	args[1] = build_array(message_ids, count, TEXTOID);
	if (mqtx_execute_prepared(&mark_published_plan, mark_published_sql, 2,
							  argtypes, args, NULL) != SPI_OK_UPDATE)
		elog(ERROR, "marking outbox rows published failed");
	mqtx_count(relay.worker.slot, MQTX_RELAY_PUBLISHED, count);
}

/*
 * Record a failed attempt for each row; rows past mqtx.max_attempts become
 * failed, with a WARNING and a NOTIFY mqtx_alert each.
 */
static void
record_failures(Datum *ids, Datum *message_ids, Datum *errors, int count)
{
	Oid			argtypes[6] = {INT8ARRAYOID, TEXTARRAYOID, TEXTARRAYOID,
	INT4OID, INT4OID, INT4OID};
	Datum		args[6];
	uint64		gave_up;

	if (count == 0)
		return;
	args[0] = build_array(ids, count, INT8OID);
	args[1] = build_array(message_ids, count, TEXTOID);
	args[2] = build_array(errors, count, TEXTOID);
	args[3] = Int32GetDatum(max_attempts);
	args[4] = Int32GetDatum(mqtx_retry_base);
	args[5] = Int32GetDatum(mqtx_retry_max);
	if (mqtx_execute_prepared(&record_failures_plan, record_failures_sql, 6,
							  argtypes, args, NULL) != SPI_OK_SELECT)
		elog(ERROR, "recording failed outbox attempts failed");

	gave_up = SPI_processed;
	for (uint64 i = 0; i < gave_up; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		int			attempts = DatumGetInt32(SPI_getbinval(tuple, desc, 3, &isnull));

		ereport(WARNING,
				(errmsg_plural("mqtx relay: gave up on message %s (outbox id %s) after %d attempt",
							   "mqtx relay: gave up on message %s (outbox id %s) after %d attempts",
							   attempts,
							   SPI_getvalue(tuple, desc, 2), SPI_getvalue(tuple, desc, 1),
							   attempts),
				 errdetail_internal("Last error: %s", SPI_getvalue(tuple, desc, 4)),
				 errhint("Its outbox row is now failed; fix the cause, then set its status to 'pending' and attempts to 0 to send it again.")));
	}
	mqtx_count(relay.worker.slot, MQTX_RELAY_FAILED, gave_up);
	mqtx_count(relay.worker.slot, MQTX_RELAY_RETRIED, count - gave_up);
}

/* Has the broker decided the message's fate (or did we, before sending)? */
static bool
is_decided(BrokerMessage *m)
{
	return m->settled || m->outcome == PUBLISH_REJECTED;
}

/*
 * Write the outcome of every message whose fate is decided and not yet
 * written: published, or a failed attempt for what the broker refused
 * (nack, return, unknown exchange, a channel it closed over the message).
 * A message whose fate is unknown (not sent, or no confirm) is left
 * pending: it goes out again, and costs no attempt.
 */
static void
record_decided(RelayBatch **batches, int nbatches)
{
	int			capacity = 0;
	Datum	   *published_ids;
	Datum	   *published_mids;
	Datum	   *failed_ids;
	Datum	   *failed_mids;
	Datum	   *errors;
	int			npublished = 0;
	int			nfailed = 0;

	for (int b = 0; b < nbatches; b++)
		capacity += batches[b]->count;
	published_ids = palloc(sizeof(Datum) * Max(capacity, 1));
	published_mids = palloc(sizeof(Datum) * Max(capacity, 1));
	failed_ids = palloc(sizeof(Datum) * Max(capacity, 1));
	failed_mids = palloc(sizeof(Datum) * Max(capacity, 1));
	errors = palloc(sizeof(Datum) * Max(capacity, 1));

	for (int b = 0; b < nbatches; b++)
	{
		RelayBatch *batch = batches[b];

		for (int i = 0; i < batch->count; i++)
		{
			BrokerMessage *m = &batch->messages[i];

			if (batch->recorded[i] || !is_decided(m))
				continue;
			batch->recorded[i] = true;

			/*
			 * A batch whose confirms came late had its unconfirmed rows sent
			 * again: a refusal of this copy says nothing of the other, which
			 * may be on its way, so it is not charged (the row stays due, as
			 * it was: mqtx.cancel relies on a claimed row keeping its time).
			 */
			if (batch->timed_out &&
				(m->outcome == PUBLISH_NACKED || m->outcome == PUBLISH_RETURNED))
				continue;
			if (m->outcome == PUBLISH_ACKED)
			{
				published_ids[npublished] = Int64GetDatum(batch->ids[i]);
				published_mids[npublished++] = CStringGetTextDatum(m->message_id);
				continue;
			}
			if (m->outcome == PUBLISH_NACKED)
				mqtx_count(relay.worker.slot, MQTX_RELAY_NACKED, 1);
			else if (m->outcome == PUBLISH_RETURNED)
				mqtx_count(relay.worker.slot, MQTX_RELAY_RETURNED, 1);
			failed_ids[nfailed] = Int64GetDatum(batch->ids[i]);
			failed_mids[nfailed] = CStringGetTextDatum(m->message_id);
			errors[nfailed++] = CStringGetTextDatum(m->error ? m->error : "refused by the broker");
		}
	}
	mark_published(published_ids, published_mids, npublished);
	record_failures(failed_ids, failed_mids, errors, nfailed);
}

/*
 * How long a batch's confirms may take before they count as late:
 * mqtx.confirm_timeout, or three times the recent confirm latency when
 * that is longer.  A broker that confirms slowly but surely (a slow link,
 * a busy disk) is not sent everything twice; one that falls silent
 * against its own pace is.
 */
static double
late_after_ms(void)
{
	/* before any confirm, the connection's RPCs tell how far the broker is */
	double		latency = relay.confirm_latency_ms > 0 ? relay.confirm_latency_ms :
	mqtx_broker_round_trip_ms(relay.worker.conn);

	return Max((double) mqtx_confirm_timeout, 3 * latency);
}

static void
learn_confirm_latency(RelayBatch *batch)
{
	double		sample = (double) TimestampDifferenceMilliseconds(batch->sent_at,
																  GetCurrentTimestamp());

	relay.confirm_latency_ms = mqtx_moving_average(relay.confirm_latency_ms, sample);
}

/* Is every message of the batch either recorded or of unknown fate for good? */
static bool
is_finished(RelayBatch *batch, bool connection_gone)
{
	for (int i = 0; i < batch->count; i++)
	{
		BrokerMessage *m = &batch->messages[i];

		if (batch->recorded[i] || m->outcome == PUBLISH_NOT_SENT)
			continue;
		/* what the broker had not decided, it never will now */
		if (connection_gone && !is_decided(m))
			continue;
		return false;
	}
	return true;
}

/*
 * Record what is decided in the batches in flight, and drop the batches
 * that are finished (all of them when the connection is gone: what was not
 * confirmed will not be).  Batches of an outbox that is no longer there
 * (the extension was dropped, and maybe created again) are dropped
 * unrecorded: their rows are gone.  In a transaction, with outbox the
 * table locked by mqtx_lock_table (InvalidOid: the extension is gone).
 */
static void
record_in_flight(Oid outbox, bool connection_gone)
{
	RelayBatch *current[MAX_BATCHES_IN_FLIGHT];
	int			ncurrent = 0;
	int			kept = 0;

	for (int b = 0; b < relay.batches_in_flight; b++)
		if (relay.in_flight[b]->outbox == outbox)
			current[ncurrent++] = relay.in_flight[b];
		else if (!relay.outbox_replaced)
		{
			ereport(LOG,
					(errmsg("mqtx relay: mqtx.outbox was dropped while messages were in flight; their outcomes are not recorded")));
			relay.outbox_replaced = true;
		}
	record_decided(current, ncurrent);

	for (int b = 0; b < relay.batches_in_flight; b++)
	{
		RelayBatch *batch = relay.in_flight[b];

		if (batch->outbox != outbox || is_finished(batch, connection_gone))
		{
			if (!connection_gone && !batch->timed_out && batch->outbox == outbox)
				learn_confirm_latency(batch);
			free_batch(batch);
		}
		else
			relay.in_flight[kept++] = batch;
	}
	relay.batches_in_flight = kept;
}

/* Has the broker decided anything not yet recorded? */
static bool
any_decided(void)
{
	for (int b = 0; b < relay.batches_in_flight; b++)
	{
		RelayBatch *batch = relay.in_flight[b];

		for (int i = 0; i < batch->count; i++)
			if (!batch->recorded[i] && is_decided(&batch->messages[i]))
				return true;
	}
	return false;
}

/*
 * The connection is going: record what the broker decided, and forget the
 * rest, whose fate is unknown.  Their rows are still pending and go out
 * again on the next connection; nothing is charged an attempt.
 */
static void
forget_in_flight(const char *error)
{
	/* a new connection says for itself whether it is blocked, and how fast */
	relay.blocked = false;
	relay.confirm_latency_ms = 0;
	mqtx_slot_set_blocked(relay.worker.slot, MQTX_RELAY, false);
	if (relay.batches_in_flight == 0)
		return;
	mqtx_worker_begin_step("mqtx relay: recording batches cut off from the broker");
	record_in_flight(mqtx_lock_table("outbox"), true);
	mqtx_worker_end_step(&relay.worker);
	Assert(relay.batches_in_flight == 0);
}

/*
 * The ids of the rows in flight whose fate the broker may still decide:
 * the claim leaves them out.  Those of batches whose confirms are late
 * are not among them: they are sent again.
 */
static Datum
ids_in_flight(void)
{
	Datum	   *ids;
	int			count = 0;

	for (int b = 0; b < relay.batches_in_flight; b++)
		count += relay.in_flight[b]->count;
	ids = palloc(sizeof(Datum) * Max(count, 1));
	count = 0;
	for (int b = 0; b < relay.batches_in_flight; b++)
	{
		RelayBatch *batch = relay.in_flight[b];

		for (int i = 0; i < batch->count; i++)
			if (!batch->recorded[i] &&
				!(batch->timed_out && batch->messages[i].outcome == PUBLISH_UNCONFIRMED))
				ids[count++] = Int64GetDatum(batch->ids[i]);
	}
	return build_array(ids, count, INT8OID);
}

/*
 * How many rows to fetch next: as many as may be needed, but never more
 * than could exceed the byte budget if each were as large as a message may
 * be, so that a batch holds at most mqtx.batch_max_bytes of payload plus
 * one message.
 */
static int
rows_to_fetch(int have, int64 bytes, int64 budget)
{
	int64		room = (budget - bytes) / Max(mqtx_max_payload, 1);

	return (int) Max(1, Min(Min(64, mqtx_batch_size - have), room));
}

/*
 * Copy one claimed row into the batch; returns its payload size.
 */
static int64
copy_row(RelayBatch *batch, HeapTuple tuple, TupleDesc desc, TransactionId *xmins)
{
	BrokerMessage *m = &batch->messages[batch->count];
	bool		isnull;
	Datum		headers;

	batch->ids[batch->count] = DatumGetInt64(SPI_getbinval(tuple, desc, 1, &isnull));
	m->context = batch->context;
	m->message_id = SPI_getvalue(tuple, desc, 2);
	m->exchange = SPI_getvalue(tuple, desc, 3);
	m->routing_key = SPI_getvalue(tuple, desc, 4);
	m->body = SPI_getvalue(tuple, desc, 5);
	m->body_len = strlen(m->body);
	headers = SPI_getbinval(tuple, desc, 6, &isnull);
	m->headers = isnull ? NULL : DatumGetJsonbPCopy(headers);
	m->timestamp = DatumGetInt64(SPI_getbinval(tuple, desc, 7, &isnull));
	m->outcome = PUBLISH_NOT_SENT;
	xmins[batch->count] = DatumGetTransactionId(SPI_getbinval(tuple, desc, 8, &isnull));
	m->correlation_id = SPI_getvalue(tuple, desc, 9);
	batch->count++;
	return m->body_len + (m->headers ? VARSIZE(m->headers) : 0);
}

/*
 * The latest commit record, among the transactions that wrote these rows,
 * that an asynchronous commit may have left in memory only: the commit
 * LSN clog keeps for asynchronous commits (hint bits wait for the same).
 * The xmin column is the raw xmin, also of frozen rows, whose status clog
 * may have truncated: a transaction older than clog's oldest is long on
 * disk.  XactTruncationLock keeps clog from being truncated meanwhile,
 * as pg_xact_status() does.
 */
static XLogRecPtr
newest_commit_of(TransactionId *xmins, int count)
{
	XLogRecPtr	newest = InvalidXLogRecPtr;
	TransactionId oldest_in_clog;

	LWLockAcquire(XactTruncationLock, LW_SHARED);
#if PG_VERSION_NUM >= 170000
	oldest_in_clog = TransamVariables->oldestClogXid;
#else
	oldest_in_clog = ShmemVariableCache->oldestClogXid;
#endif
	for (int i = 0; i < count; i++)
	{
		XLogRecPtr	commit;

		if (!TransactionIdIsNormal(xmins[i]) ||
			TransactionIdPrecedes(xmins[i], oldest_in_clog))
			continue;
		commit = TransactionIdGetCommitLSN(xmins[i]);
		if (commit > newest)
			newest = commit;
	}
	LWLockRelease(XactTruncationLock);
	return newest;
}

/*
 * Claim due rows, other than those in flight, into a new batch, fetching
 * them a few at a time until the batch has mqtx.batch_size rows or
 * mqtx.batch_max_bytes of payload.  *newest_commit becomes the latest
 * commit record an asynchronous commit of theirs may still have in
 * memory only.  In a transaction; the batch outlives it.
 */
static RelayBatch *
claim_batch(Oid outbox, XLogRecPtr *newest_commit)
{
	Oid			argtypes[2] = {INT4OID, INT8ARRAYOID};
	Datum		args[2];
	MemoryContext batch_context;
	MemoryContext step_context;
	RelayBatch *batch;
	Portal		portal;
	int64		budget = (int64) mqtx_batch_max_bytes * 1024;
	int64		bytes = 0;
	TransactionId *xmins = palloc(sizeof(TransactionId) * mqtx_batch_size);

	/* asked in this transaction: an ALTER EXTENSION UPDATE may just have run */
	bool		ordered = get_attnum(outbox, "ordering_key") != InvalidAttrNumber;
	SPIPlanPtr *plan = ordered ? &claim_plan : &unordered_claim_plan;

	args[0] = Int32GetDatum(mqtx_batch_size);
	args[1] = ids_in_flight();
	if (*plan == NULL)
	{
		*plan = SPI_prepare(ordered ? claim_sql : unordered_claim_sql, 2, argtypes);
		if (*plan == NULL || SPI_keepplan(*plan) != 0)
			elog(ERROR, "preparing the claim of outbox rows failed");
	}
	/* before anything is read: see mqtx_cancel */
	mqtx_note_claim(GetCurrentTransactionStartTimestamp());
	portal = SPI_cursor_open(NULL, *plan, args, NULL, false);

	batch_context = AllocSetContextCreate(TopMemoryContext, "mqtx relay batch",
										  ALLOCSET_DEFAULT_SIZES);
	step_context = MemoryContextSwitchTo(batch_context);
	batch = palloc0(sizeof(RelayBatch));
	batch->context = batch_context;
	batch->outbox = outbox;
	batch->ids = palloc0(sizeof(int64) * mqtx_batch_size);
	batch->messages = palloc0(sizeof(BrokerMessage) * mqtx_batch_size);
	batch->recorded = palloc0(sizeof(bool) * mqtx_batch_size);

	while (batch->count < mqtx_batch_size && bytes < budget)
	{
		uint64		fetched;

		SPI_cursor_fetch(portal, true, rows_to_fetch(batch->count, bytes, budget));
		/* SPI returns to its own memory: the rows are copied into the batch's */
		MemoryContextSwitchTo(batch_context);
		fetched = SPI_processed;
		for (uint64 i = 0; i < fetched; i++)
			bytes += copy_row(batch, SPI_tuptable->vals[i], SPI_tuptable->tupdesc,
							  xmins);
		SPI_freetuptable(SPI_tuptable);
		if (fetched == 0)
			break;
	}
	MemoryContextSwitchTo(step_context);
	SPI_cursor_close(portal);
	*newest_commit = newest_commit_of(xmins, batch->count);
	return batch;
}

/*
 * Publish nothing the database could still lose.  A row is visible as soon
 * as its transaction commits, but a transaction that committed with
 * synchronous_commit = off may not be on disk yet: sent now, its message
 * would outlive the order it announces if the server crashed.  Flushing up
 * to the latest such commit among the claimed rows (the commit LSN clog
 * keeps for asynchronous commits) costs nothing when they are all on disk
 * already.
 */
static void
make_durable(XLogRecPtr newest_commit)
{
	if (!XLogRecPtrIsInvalid(newest_commit) && XLogNeedsFlush(newest_commit))
		XLogFlush(newest_commit);
}

/* The messages held back for a standby may go: say so if the wait was said. */
static void
end_standby_wait(const char *why)
{
	if (relay.standby_wait_logged)
		ereport(LOG,
				(errmsg("mqtx relay: %s; publishing again", why)));
	relay.standby_target = InvalidXLogRecPtr;
	relay.standby_wait_logged = false;
}

/*
 * Whether a streaming standby has flushed WAL up to target.  give_up: a
 * pass puts its batch back, and later passes wait for target.  The wait is
 * said once: at once when no standby streams, after a while when one lags.
 */
static bool
standby_has(XLogRecPtr target, bool give_up)
{
	int			standbys;
	XLogRecPtr	flushed = mqtx_standby_flush_position(&standbys);
	bool		has = !XLogRecPtrIsInvalid(flushed) && flushed >= target;
	TimestampTz now = GetCurrentTimestamp();

	if (has)
	{
		end_standby_wait("a standby has the pending messages' commits");
		return true;
	}
	if (give_up && XLogRecPtrIsInvalid(relay.standby_target))
	{
		relay.standby_target = target;
		relay.standby_wait_since = now;
	}
	if (!XLogRecPtrIsInvalid(relay.standby_target) && !relay.standby_wait_logged &&
		(standbys == 0 ||
		 now >= TimestampTzPlusMilliseconds(relay.standby_wait_since, STANDBY_LAG_WARNING_MS)))
	{
		relay.standby_wait_logged = true;
		ereport(WARNING,
				(errmsg("mqtx relay: no standby has the commits of the pending messages; they stay pending (mqtx.wait_for_standby)"),
				 standbys == 0 ?
				 errdetail("No physical standby is streaming from this server.") :
				 errdetail("The furthest of %d standbys has flushed WAL to %X/%X; the messages need %X/%X.",
						   standbys, LSN_FORMAT_ARGS(flushed), LSN_FORMAT_ARGS(target)),
				 errhint("The relay publishes them once a standby catches up, or once mqtx.wait_for_standby is turned off.")));
	}
	return false;
}

/*
 * mqtx.wait_for_standby: publish nothing a failover could lose.  Under
 * asynchronous replication a commit the primary has acknowledged may not
 * be on its standby yet; published now, its message would outlive the
 * order it announces if the standby took over (a phantom).  Every row the
 * claim saw was committed before the claim, so once a standby has flushed
 * WAL past the insert position read after the claim, it has them all.
 * Waits briefly; false if no standby got there, and the caller holds the
 * batch back.
 */
static bool
replicated(XLogRecPtr claimed_at)
{
	TimestampTz give_up = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													  STANDBY_WAIT_MS);

	/* the walsenders send only what is flushed */
	if (XLogNeedsFlush(claimed_at))
		XLogFlush(claimed_at);
	pgstat_report_activity(STATE_RUNNING, "mqtx relay: waiting for a standby to flush the batch's commits");
	while (!standby_has(claimed_at, false))
	{
		if (GetCurrentTimestamp() >= give_up)
			return standby_has(claimed_at, true);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 STANDBY_POLL_MS, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
	return true;
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
		if (mqtx_broker_exchange_exists(relay.worker.conn, m->exchange, &reason))
			continue;
		if (!mqtx_broker_is_open(relay.worker.conn))
		{
			*error = reason;
			return false;
		}
		/* the same verdict for every message of the batch to that exchange */
		for (int j = i; j < batch->count; j++)
			if (strcmp(batch->messages[j].exchange, m->exchange) == 0)
			{
				batch->messages[j].outcome = PUBLISH_REJECTED;
				batch->messages[j].error = MemoryContextStrdup(batch->context, reason);
			}
	}
	return true;
}

/*
 * Put every message of the batch on the wire, without waiting for
 * confirms, freeing each body once sent.  Returns false when the
 * connection (or channel) failed on the way; the messages' outcomes say
 * how far each got.
 */
#define SEND_CHECK_BYTES (256 * 1024)

static bool
send_batch(RelayBatch *batch, char **error)
{
	bool		sent = reject_unknown_exchanges(batch, error);
	int64		unchecked = 0;

	for (int i = 0; sent && i < batch->count; i++)
	{
		BrokerMessage *m = &batch->messages[i];

		/*
		 * RabbitMQ says connection.blocked and then stops reading: look for
		 * it now and then, rather than fill the socket and stall.
		 */
		if (unchecked >= SEND_CHECK_BYTES)
		{
			unchecked = 0;
			sent = mqtx_broker_wait(relay.worker.conn, 0, error);
			if (!sent || mqtx_broker_is_blocked(relay.worker.conn, NULL))
				break;
		}
		if (m->outcome == PUBLISH_NOT_SENT)
		{
			unchecked += m->body_len;
			sent = mqtx_broker_publish(relay.worker.conn, m, error);
		}
		if (m->outcome != PUBLISH_NOT_SENT)
		{
			pfree((char *) m->body);
			m->body = NULL;
			if (m->headers)
				pfree(m->headers);
			m->headers = NULL;
		}
	}
	batch->sent_at = GetCurrentTimestamp();
	return sent;
}

static bool
awaits_confirms(RelayBatch *batch)
{
	return !batch->timed_out && !mqtx_broker_all_settled(batch->messages, batch->count);
}

/* The node the relay publishes to, for log lines */
static const char *
connected_broker(void)
{
	return relay.worker.conn != NULL ? mqtx_broker_address(relay.worker.conn) :
		mqtx_broker_describe(mqtx_broker_url);
}

/*
 * Batches whose confirms did not all come in time (late_after_ms):
 * their unconfirmed rows have an unknown fate and may be claimed and sent
 * again (the inbox absorbs the duplicate); a confirm that still comes
 * counts.  Logged once, until confirms are on time again.
 */
static void
note_late_confirms(void)
{
	TimestampTz now = GetCurrentTimestamp();
	bool		late = false;

	for (int b = 0; b < relay.batches_in_flight; b++)
	{
		RelayBatch *batch = relay.in_flight[b];

		if (awaits_confirms(batch) &&
			TimestampDifferenceExceeds(batch->sent_at, now, (int) late_after_ms()))
		{
			batch->timed_out = true;
			late = true;
		}
	}
	if (late && !relay.confirms_late)
		ereport(LOG,
				(errmsg("mqtx relay: broker %s did not confirm messages within %.0f ms; sending them again",
						connected_broker(), late_after_ms()),
				 errdetail("A confirm that arrives later still counts; the consumer's inbox absorbs the duplicates.")));
	if (late)
		relay.confirms_late = true;
	else if (relay.batches_in_flight == 0)
		relay.confirms_late = false;
}

/*
 * connection.blocked: RabbitMQ has stopped reading from publishers (a
 * memory or disk alarm).  Nothing new is sent until it unblocks, and the
 * confirm clocks of what is in flight stand still meanwhile.
 */
static void
follow_blocked_state(void)
{
	const char *reason;
	bool		blocked = mqtx_broker_is_blocked(relay.worker.conn, &reason);

	if (blocked != relay.blocked)
	{
		if (blocked)
			ereport(WARNING,
					(errmsg("mqtx relay: broker %s blocked publishing: %s",
							connected_broker(),
							reason && reason[0] ? reason : "no reason given"),
					 errdetail("Messages stay pending until the broker unblocks the connection."),
					 errhint("This is usually a memory or disk alarm on the broker.")));
		else
			ereport(LOG,
					(errmsg("mqtx relay: broker %s unblocked publishing",
							connected_broker())));
		relay.blocked = blocked;
		mqtx_slot_set_blocked(relay.worker.slot, MQTX_RELAY, blocked);
	}
	if (blocked)
		for (int b = 0; b < relay.batches_in_flight; b++)
			relay.in_flight[b]->sent_at = GetCurrentTimestamp();
}

/*
 * When the first row not due at the last claim becomes due, or 0: none
 * is known.  In the claim's transaction.
 */
static TimestampTz
next_due(void)
{
	bool		isnull;
	Datum		due;

	if (mqtx_execute_prepared(&next_due_plan, next_due_sql, 0, NULL, NULL, NULL) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "reading when the next outbox row is due failed");
	due = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? 0 : DatumGetTimestampTz(due);
}

/*
 * How long the relay may sleep when it has nothing to do: the poll
 * interval, or less when a scheduled message or a retry comes due sooner.
 * A time that has passed without a claim (the broker is away) no longer
 * shortens it.
 */
static long
idle_wait_ms(void)
{
	TimestampTz now = GetCurrentTimestamp();

	if (relay.next_due_at > now)
		return Min((long) mqtx_poll_interval,
				   Max(1, TimestampDifferenceMilliseconds(now, relay.next_due_at)));
	return mqtx_poll_interval;
}

static bool
may_claim(void)
{
	return !relay.blocked && relay.batches_in_flight < MAX_BATCHES_IN_FLIGHT &&
		mqtx_broker_is_open(relay.worker.conn);
}

/*
 * How long to wait for the broker after this pass: not at all when a batch
 * was just sent and the pipeline has room, else until the oldest awaited
 * confirm is due (or the poll interval, for retries coming due).  The
 * latch ends the wait early: new rows committed.
 */
static TimestampTz
confirm_wait_deadline(bool sent)
{
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													   idle_wait_ms());

	if (sent && may_claim())
		return 0;
	for (int b = 0; b < relay.batches_in_flight; b++)
	{
		RelayBatch *batch = relay.in_flight[b];
		TimestampTz due = TimestampTzPlusMilliseconds(batch->sent_at,
													  (int64) late_after_ms());

		if (awaits_confirms(batch) && !relay.blocked && due < deadline)
			deadline = due;
	}
	return deadline;
}

/*
 * One pass: in one short transaction, record the outcomes the broker has
 * decided and claim the next batch; then, with no transaction open, make
 * the batch durable, send it and take in confirms, waiting for them when
 * the pipeline is full or there is nothing new to send.  Returns whether
 * there is more to do right away.
 */
static bool
relay_pass(void)
{
	RelayBatch *batch = NULL;
	XLogRecPtr	newest_commit = InvalidXLogRecPtr;
	XLogRecPtr	claimed_at = InvalidXLogRecPtr;
	char	   *error = NULL;
	bool		ok = true;

	follow_blocked_state();
	if (!wait_for_standby && !XLogRecPtrIsInvalid(relay.standby_target))
		end_standby_wait("mqtx.wait_for_standby is off");
	if (any_decided() || (relay.held == NULL && may_claim()))
	{
		Oid			outbox;

		mqtx_worker_begin_step("mqtx relay: recording outcomes and claiming rows");
		outbox = mqtx_lock_table("outbox");
		record_in_flight(outbox, false);
		if (relay.held == NULL && may_claim() && OidIsValid(outbox))
		{
			batch = claim_batch(outbox, &newest_commit);
			if (batch->count < mqtx_batch_size)
				relay.next_due_at = next_due();
		}
		mqtx_worker_end_step(&relay.worker);
		claimed_at = mqtx_wal_inserted_end();
	}
	if (batch != NULL && batch->count == 0)
	{
		free_batch(batch);
		batch = NULL;
	}

	/*
	 * A batch held back for a standby goes once one has its commits; until
	 * then nothing more is claimed.  Claiming it again instead would take a
	 * new, later position to wait for every time, and never catch up with a
	 * standby that lags by more than STANDBY_WAIT_MS.
	 */
	if (relay.held != NULL && may_claim() &&
		(!wait_for_standby || standby_has(relay.standby_target, false)))
	{
		batch = relay.held;
		newest_commit = relay.held_newest_commit;
		relay.held = NULL;
	}
	else if (batch != NULL && wait_for_standby && !replicated(claimed_at))
	{
		relay.held = batch;
		relay.held_newest_commit = newest_commit;
		batch = NULL;
	}

	pgstat_report_activity(STATE_RUNNING, "mqtx relay: publishing");
	if (batch != NULL)
	{
		make_durable(newest_commit);
		relay.in_flight[relay.batches_in_flight++] = batch;
		ok = send_batch(batch, &error);
	}
	if (ok && relay.batches_in_flight > 0)
	{
		pgstat_report_activity(STATE_RUNNING, relay.blocked ?
							   "mqtx relay: waiting for the broker to unblock publishing" :
							   "mqtx relay: waiting for publisher confirms");
		ok = mqtx_broker_wait(relay.worker.conn, confirm_wait_deadline(batch != NULL), &error);
		note_late_confirms();
	}
	pgstat_report_activity(STATE_IDLE, NULL);

	if (!ok)
	{
		/* the error text lives in the pass's memory, which outlives this */
		mqtx_worker_drop_broker(&relay.worker, error);
	}
	return relay.batches_in_flight > 0;
}

/*
 * Entry point of the relay worker (one per served database).  Each turn
 * waits for a commit's wake-up, the poll interval or a confirm, then
 * publishes a pass of due rows; retention runs only when a pass left
 * nothing to do, so it never delays publishing.  Errors are FATAL: the
 * launcher starts a new relay five seconds later, and rows claimed
 * but not confirmed are simply due again.
 */
void
mqtx_relay_main(Datum main_arg)
{
	bool		more_work = false;

	memset(&relay, 0, sizeof(relay));
	mqtx_worker_start(&relay.worker, MQTX_RELAY, main_arg);
	relay.worker.on_disconnect = forget_in_flight;
	SetConfigOption("synchronous_commit", "off", PGC_SUSET, PGC_S_OVERRIDE);

	/* the relay's statements are all walks of the outbox's indexes */
	mqtx_plan_index_order_for_session();

	for (;;)
	{
		if (!more_work)
			mqtx_worker_wait(&relay.worker, idle_wait_ms());
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
			mqtx_worker_apply_retention(&relay.worker, "outbox", retention_sql, outbox_retention,
										&relay.next_retention_at);
	}
}

/* The relay's own settings: attempts before failing, and retention. */
void
mqtx_relay_define_settings(void)
{
	DefineCustomIntVariable("mqtx.max_attempts",
							"Publish attempts before an outbox row becomes failed.",
							NULL,
							&max_attempts, 10, 1, 1000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("mqtx.wait_for_standby",
							 "Publish a message only once a streaming standby has flushed its commit.",
							 "Under asynchronous replication, keeps a failover from leaving published messages whose rows the new primary lacks.",
							 &wait_for_standby, false,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("mqtx.retention",
							"How long published outbox rows are kept (-1 keeps them forever).",
							NULL,
							&outbox_retention, 7 * 24 * 3600, -1, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
}
