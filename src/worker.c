/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  What the relay and the consumer workers share: start-up, short
 *	  database steps, waiting for the extension, and a broker connection
 *	  kept up with backoff, logged once per state change, with the topology
 *	  declared on every connect.
 *
 * Database steps and broker I/O never overlap: the topology is read in a
 * step and declared after it.  What the broker refuses (an exchange type
 * it lacks, a queue it will not let us consume) is remembered per object,
 * skipped with a backoff and written to mqtx.broker_errors, so that one
 * bad object never holds up the others.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_extension.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "nodes/makefuncs.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "broker.h"
#include "digest.h"
#include "identity.h"
#include "statements.h"
#include "worker.h"

int			mqtx_batch_size = 1000;
int			mqtx_batch_max_bytes = 16 * 1024;
int			mqtx_poll_interval = 1000;
int			mqtx_retry_base = 1000;
int			mqtx_retry_max = 300000;

/* Retention deletes this many rows per transaction, at most this often. */
#define RETENTION_BATCH 1000
#define RETENTION_INTERVAL_MS 10000

/*
 * Reconnect backoff: doubled per failed attempt, up to the cap.  A
 * connection counts as a success only once it has lasted
 * CONNECTION_STABLE_MS: one the broker closes at once (it refuses a
 * subscription, say) must not make a reconnect loop as fast as the
 * network.
 */
#define RECONNECT_MIN_MS 200
#define RECONNECT_MAX_MS 10000
#define CONNECTION_STABLE_MS 30000

static const char *const topology_sql =
"SELECT 'exchange', name, type, durable, NULL::jsonb, NULL FROM mqtx.exchanges "
"UNION ALL "
"SELECT 'queue', name, NULL, durable, arguments, NULL FROM mqtx.queues "
"UNION ALL "
"SELECT 'binding', queue, exchange, NULL, NULL, routing_key FROM mqtx.bindings "
"ORDER BY 1 DESC, 2, 3";		/* exchanges and queues before bindings */

static const MqtxCounter reconnect_counter[MQTX_NWORKER_KINDS] = {
	MQTX_RELAY_RECONNECTS, MQTX_CONSUMER_RECONNECTS
};

/* The worker of this process, for the exit callback. */
static MqtxWorker *this_worker = NULL;

static void start_process(MqtxWorker *w, MqtxWorkerKind kind, const char *role,
						  Datum main_arg);

static void
worker_exit(int code, Datum arg)
{
	if (this_worker == NULL)
		return;
	mqtx_broker_disconnect(this_worker->conn);
	this_worker->conn = NULL;
	mqtx_slot_detach(this_worker->slot, this_worker->kind);
}

/*
 * Signals, database connection, slot.  SIGTERM uses die(): the worker's
 * waits are all bounded, and CHECK_FOR_INTERRUPTS between them ends it.
 */
void
mqtx_worker_start(MqtxWorker *w, MqtxWorkerKind kind, Datum main_arg)
{
	start_process(w, kind, mqtx_worker_kind_name(kind), main_arg);
	if (!mqtx_slot_attach(w->slot, kind, w->assignment, MyDatabaseId))
		proc_exit(0);
	this_worker = w;
	before_shmem_exit(worker_exit, 0);
	MemoryContextSwitchTo(w->context);
}

/*
 * An apply worker: a process of the consumer's, which watches it, so it
 * takes no place in the slot (apply_workers.c).  It counts in the
 * consumer's counters.
 */
void
mqtx_worker_start_apply(MqtxWorker *w, Datum main_arg)
{
	start_process(w, MQTX_CONSUMER, "apply worker", main_arg);
	MemoryContextSwitchTo(w->context);
}

/* What every worker process of a slot sets up first */
static void
start_process(MqtxWorker *w, MqtxWorkerKind kind, const char *role, Datum main_arg)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	memset(w, 0, sizeof(*w));
	w->kind = kind;
	w->role = role;
	w->slot = mqtx_slot(DatumGetInt32(main_arg));
	memcpy(&w->assignment, MyBgworkerEntry->bgw_extra, sizeof(w->assignment));
	/* started for a database the launcher has let go of since */
	if (mqtx_slot_assignment(w->slot, NULL) != w->assignment)
		proc_exit(0);
	w->reconnect_delay_ms = RECONNECT_MIN_MS;
	w->context = AllocSetContextCreate(TopMemoryContext, "mqtx worker step",
									   ALLOCSET_DEFAULT_SIZES);
	w->long_context = AllocSetContextCreate(TopMemoryContext, "mqtx worker state",
											ALLOCSET_SMALL_SIZES);

	/*
	 * What the server's configuration gives a new session for search_path,
	 * before this database's settings apply: a handler's owner without
	 * settings of its own gets it.
	 */
	mqtx_remember_server_search_path();

	/*
	 * The workers connect as the bootstrap superuser, and that is sound only
	 * because of what they run as that role: mqtx's own statements, on tables
	 * in schema mqtx that only the extension's owner can alter (no triggers,
	 * rules or policies a user could add), with every name resolved in
	 * pg_catalog alone; user code, the consumer's handlers, runs as its owner
	 * (consumer.c).  A dedicated non-superuser role would not be safer: in
	 * PostgreSQL 15 a background worker may only connect as a role that can
	 * log in, so it would be a login role with write access to every served
	 * database's outbox, inbox and dead letters, and a password or trust rule
	 * of its own to guard.
	 *
	 * The search_path is set at session level: a database owner's ALTER
	 * DATABASE ... SET search_path (or one on this role) must not reach the
	 * workers' statements, where a look-alike of a pg_catalog function with
	 * an exact argument-type match in an earlier schema would be chosen over
	 * the real one (CVE-2018-1058).  pg_temp comes last explicitly, and
	 * functions and operators are never looked up there.
	 */
	BackgroundWorkerInitializeConnection(mqtx_slot_dbname(w->slot), NULL, 0);
	SetConfigOption("search_path", "pg_catalog, pg_temp", PGC_SUSET, PGC_S_SESSION);
	pgstat_report_appname(psprintf("mqtx %s", w->role));
}

/*
 * Each database step is a short transaction of its own.  end_step returns
 * to the worker's current context, where the caller keeps its results.
 */
void
mqtx_worker_begin_step(const char *activity)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PushActiveSnapshot(GetTransactionSnapshot());
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	pgstat_report_activity(STATE_RUNNING, activity);
}

/* Commit the step begun by mqtx_worker_begin_step, and report idle. */
void
mqtx_worker_end_step(MqtxWorker *w)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(w->context);
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * The version of the extension's objects in this database, or NULL.
 */
static char *
installed_version(Oid extension)
{
	Relation	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tuple;
	char	   *version = NULL;

	ScanKeyInit(&key, Anum_pg_extension_oid, BTEqualStrategyNumber, F_OIDEQ,
				ObjectIdGetDatum(extension));
	scan = systable_beginscan(rel, ExtensionOidIndexId, true, NULL, 1, &key);
	tuple = systable_getnext(scan);
	if (HeapTupleIsValid(tuple))
	{
		bool		isnull;
		Datum		value = heap_getattr(tuple, Anum_pg_extension_extversion,
										 RelationGetDescr(rel), &isnull);

		if (!isnull)
			version = TextDatumGetCString(value);
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	return version;
}

/* "a.b.c" compared as numbers */
static bool
mqtx_version_older(const char *version, const char *than)
{
	int			a[3] = {0, 0, 0};
	int			b[3] = {0, 0, 0};

	(void) sscanf(version, "%d.%d.%d", &a[0], &a[1], &a[2]);
	(void) sscanf(than, "%d.%d.%d", &b[0], &b[1], &b[2]);
	for (int i = 0; i < 3; i++)
		if (a[i] != b[i])
			return a[i] < b[i];
	return false;
}

/*
 * Exit quietly if the launcher has let go of this worker's database (it
 * left mqtx.database).
 */
void
mqtx_worker_exit_unless_served(MqtxWorker *w)
{
	if (mqtx_slot_assignment(w->slot, NULL) == w->assignment)
		return;
	ereport(LOG,
			(errmsg("mqtx %s: database \"%s\" is no longer served; exiting",
					w->role, mqtx_slot_dbname(w->slot))));
	proc_exit(0);
}

/*
 * Is the extension installed and committed here, at a version this
 * worker's statements work with?  Without it (or with CREATE EXTENSION
 * still in progress) the worker tells the launcher and exits: the
 * launcher starts it again once an extension has been created.  After the
 * library was upgraded, ALTER EXTENSION mqtx UPDATE still to run is
 * waited on, with one log line.  A worker whose database is no longer
 * served exits here too: both workers ask this on every pass.
 */
bool
mqtx_worker_extension_ready(MqtxWorker *w)
{
	const char *needed = w->kind == MQTX_CONSUMER ? MQTX_CONSUMER_SCHEMA_VERSION : NULL;
	Oid			extension;
	char	   *version = NULL;
	bool		ready;
	uint32		extension_changes = mqtx_slot_extension_changes(w->slot);

	mqtx_worker_exit_unless_served(w);
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	extension = get_extension_oid("mqtx", true);
	ready = OidIsValid(extension);
	if (!ready)
	{
		CommitTransactionCommand();
		mqtx_slot_note_exit(w->slot, w->kind, MQTX_EXIT_NO_EXTENSION, extension_changes);
		proc_exit(0);
	}
	if (!w->found_extension)
		mqtx_slot_note_extension_found(w->slot, w->kind);
	w->found_extension = true;
	version = installed_version(extension);
	strlcpy(w->schema_version, version ? version : "", sizeof(w->schema_version));
	if (needed != NULL)
	{
		ready = version != NULL && !mqtx_version_older(version, needed);
		if (!ready && !w->waiting_for_update)
			ereport(LOG,
					(errmsg("mqtx %s: waiting for ALTER EXTENSION mqtx UPDATE: this database has version %s, the worker needs %s",
							w->role, version ? version : "(unknown)", needed)));
		w->waiting_for_update = !ready;
	}
	CommitTransactionCommand();
	MemoryContextSwitchTo(w->context);
	return ready;
}

static void
log_broker_down(MqtxWorker *w, const char *error)
{
	if (w->broker_state != MQTX_BROKER_DOWN)
		ereport(WARNING,
				(w->kind == MQTX_RELAY ?
				 errmsg("mqtx %s: broker %s is unavailable; messages stay pending",
						w->role, mqtx_broker_describe(mqtx_broker_url)) :
				 errmsg("mqtx %s: broker %s is unavailable; consumption is paused",
						w->role, mqtx_broker_describe(mqtx_broker_url)),
				 errdetail_internal("%s", error),
				 errhint("The worker retries with backoff and logs again when the broker is back.")));
	else
		elog(DEBUG1, "mqtx %s: broker still unavailable: %s", w->role, error);
	w->broker_state = MQTX_BROKER_DOWN;
	mqtx_slot_set_connected(w->slot, w->kind, NULL);
}

static void
forget_broker(MqtxWorker *w, const char *reason)
{
	if (w->on_disconnect)
		w->on_disconnect(reason);
	mqtx_broker_disconnect(w->conn);
	w->conn = NULL;
	w->topology_declared = false;
	w->receiving = false;
}

/*
 * Give up on the connection; reconnect on the next pass, to another URL
 * of mqtx.broker_url first when it lists several.  Losing one node of a
 * list is not yet losing the broker: that is logged once the others have
 * been tried (log_broker_down).
 */
void
mqtx_worker_drop_broker(MqtxWorker *w, const char *error)
{
	TimestampTz now = GetCurrentTimestamp();
	bool		moving_on = false;

	if (w->conn != NULL && w->broker_state == MQTX_BROKER_UP)
		moving_on = list_length(mqtx_broker_addresses(mqtx_broker_url)) > 1;

	if (moving_on)
		ereport(LOG,
				(errmsg("mqtx %s: lost broker %s; connecting to another URL of mqtx.broker_url",
						w->role, mqtx_broker_address(w->conn)),
				 errdetail_internal("%s", error)));
	if (w->conn != NULL)
		w->address++;			/* the next URL first; wrapped at use */
	forget_broker(w, error);
	if (TimestampDifferenceExceeds(w->connected_at, now, CONNECTION_STABLE_MS))
	{
		w->reconnect_delay_ms = RECONNECT_MIN_MS;
		w->next_connect_at = now;
	}
	else
	{
		w->next_connect_at = TimestampTzPlusMilliseconds(now, w->reconnect_delay_ms);
		w->reconnect_delay_ms = Min(w->reconnect_delay_ms * 2, RECONNECT_MAX_MS);
	}
	if (moving_on)
	{
		w->broker_state = MQTX_BROKER_UNKNOWN;
		mqtx_slot_set_connected(w->slot, w->kind, NULL);
	}
	else
		log_broker_down(w, error);
}

/*
 * Start again on a new connection after an error that was not the
 * broker's and was logged already: no "unavailable" line, and the next
 * connect logs as a first one.
 */
void
mqtx_worker_restart_broker(MqtxWorker *w, const char *reason)
{
	forget_broker(w, reason);
	w->broker_state = MQTX_BROKER_UNKNOWN;
	mqtx_slot_set_connected(w->slot, w->kind, NULL);
	w->next_connect_at = GetCurrentTimestamp();
}

/*
 * What the broker refused, object by object: an exchange of a type it does
 * not have, a queue declared with other arguments, a queue mqtx may not
 * consume.  Each is skipped and tried again with a backoff, logged once
 * per change of state, and kept in mqtx.broker_errors for operators,
 * while everything else goes on.
 */
#define REFUSAL_RETRY_MIN_MS 5000
#define REFUSAL_RETRY_MAX_MS 60000

/* The oldest version of the SQL objects with mqtx.broker_errors */
#define MQTX_BROKER_ERRORS_VERSION "0.3.0"

typedef struct BrokerRefusal
{
	char	   *object_type;	/* exchange, queue, binding, subscription */
	char	   *object_name;
	char	   *error;
	int			failures;
	TimestampTz retry_at;
	bool		seen;			/* still configured, as of the last round */
	bool		closes_connection;	/* the broker closed the connection over
									 * it */
	bool		unsaved;		/* a failure not yet in mqtx.broker_errors */
	bool		cleared;		/* accepted now: its row goes */
} BrokerRefusal;

static const char *const save_refusal_sql =
"INSERT INTO mqtx.broker_errors AS e (worker, object_type, object_name, error, next_try_at) "
"VALUES ($1, $2, $3, $4, $5) "
"ON CONFLICT ON CONSTRAINT broker_errors_pkey DO UPDATE "
"   SET error = excluded.error, failures = e.failures + 1,"
"       last_failed_at = pg_catalog.now(), next_try_at = excluded.next_try_at";

static const char *const clear_refusal_sql =
"DELETE FROM mqtx.broker_errors "
"WHERE worker = $1 AND object_type = $2 AND object_name = $3";

/* what a process that just started knows: nothing was refused yet */
static const char *const clear_refusals_sql =
"DELETE FROM mqtx.broker_errors WHERE worker = $1";

static BrokerRefusal *
find_refusal(MqtxWorker *w, const char *object_type, const char *object_name)
{
	ListCell   *lc;

	foreach(lc, w->refusals)
	{
		BrokerRefusal *r = lfirst(lc);

		if (strcmp(r->object_type, object_type) == 0 &&
			strcmp(r->object_name, object_name) == 0)
			return r;
	}
	return NULL;
}

static bool
is_of_type(BrokerRefusal *r, const char *const *object_types, int ntypes)
{
	for (int i = 0; i < ntypes; i++)
		if (strcmp(r->object_type, object_types[i]) == 0)
			return true;
	return false;
}

/* Try every refused object of these types at once (the configuration changed) */
static void
retry_now(MqtxWorker *w, const char *const *object_types, int ntypes)
{
	ListCell   *lc;

	foreach(lc, w->refusals)
		if (is_of_type(lfirst(lc), object_types, ntypes))
		((BrokerRefusal *) lfirst(lc))->retry_at = 0;
}

static bool
closes_connection(MqtxWorker *w, const char *object_type, const char *object_name)
{
	BrokerRefusal *r = find_refusal(w, object_type, object_name);

	return r != NULL && !r->cleared && r->closes_connection;
}

/* Not refused, or refused long enough ago to be tried again? */
bool
mqtx_worker_may_try(MqtxWorker *w, const char *object_type, const char *object_name)
{
	BrokerRefusal *r = find_refusal(w, object_type, object_name);

	if (r != NULL)
		r->seen = true;
	return r == NULL || r->cleared || GetCurrentTimestamp() >= r->retry_at;
}

/*
 * The broker refused the object: skip it until its backoff has passed.
 * Logged when it starts, or when the reason changes.
 */
void
mqtx_worker_refused(MqtxWorker *w, const char *object_type,
					const char *object_name, const char *error)
{
	BrokerRefusal *r = find_refusal(w, object_type, object_name);
	MemoryContext old = MemoryContextSwitchTo(w->long_context);
	bool		news = r == NULL || r->cleared || strcmp(r->error, error) != 0;
	int			delay_ms;

	if (r == NULL)
	{
		r = palloc0(sizeof(BrokerRefusal));
		r->object_type = pstrdup(object_type);
		r->object_name = pstrdup(object_name);
		w->refusals = lappend(w->refusals, r);
	}
	if (r->cleared)
		r->failures = 0;
	if (r->error)
		pfree(r->error);
	r->error = pstrdup(error);
	r->failures++;
	delay_ms = REFUSAL_RETRY_MIN_MS << Min(r->failures - 1, 8);
	delay_ms = Min(delay_ms, REFUSAL_RETRY_MAX_MS);
	r->retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), delay_ms);
	r->seen = true;
	r->unsaved = true;
	r->cleared = false;
	MemoryContextSwitchTo(old);

	if (news)
		ereport(WARNING,
				(errmsg("mqtx %s: the broker refused %s \"%s\"; everything else goes on",
						w->role, object_type, object_name),
				 errdetail_internal("%s", error),
				 errhint("It is tried again with a backoff of up to %d s, and listed in mqtx.broker_errors until then.",
						 REFUSAL_RETRY_MAX_MS / 1000)));
	else
		elog(DEBUG1, "mqtx %s: %s \"%s\" still refused: %s",
			 w->role, object_type, object_name, error);
}

/* The broker accepted the object: if it had refused it, that is over. */
void
mqtx_worker_accepted(MqtxWorker *w, const char *object_type, const char *object_name)
{
	BrokerRefusal *r = find_refusal(w, object_type, object_name);

	if (r == NULL || r->cleared)
		return;
	ereport(LOG,
			(errmsg_plural("mqtx %s: the broker accepted %s \"%s\" after %d refusal",
						   "mqtx %s: the broker accepted %s \"%s\" after %d refusals",
						   r->failures,
						   w->role, object_type, object_name, r->failures)));
	r->cleared = true;
}

/*
 * Start a round over the objects of these types: those not tried or
 * skipped (mqtx_worker_may_try) before mqtx_worker_end_round are no longer
 * configured, and their refusals go.
 */
void
mqtx_worker_begin_round(MqtxWorker *w, const char *const *object_types, int ntypes)
{
	ListCell   *lc;

	foreach(lc, w->refusals)
		if (is_of_type(lfirst(lc), object_types, ntypes))
		((BrokerRefusal *) lfirst(lc))->seen = false;
}

/* End the round: refusals of objects no longer configured are cleared. */
void
mqtx_worker_end_round(MqtxWorker *w)
{
	ListCell   *lc;

	foreach(lc, w->refusals)
	{
		BrokerRefusal *r = lfirst(lc);

		if (!r->seen)
			r->cleared = true;
	}
}

/* When the earliest refused object of the type is due again (0: none) */
static TimestampTz
mqtx_worker_next_retry(MqtxWorker *w, const char *object_type)
{
	TimestampTz next = 0;
	ListCell   *lc;

	foreach(lc, w->refusals)
	{
		BrokerRefusal *r = lfirst(lc);

		if (!r->cleared && strcmp(r->object_type, object_type) == 0 &&
			(next == 0 || r->retry_at < next))
			next = r->retry_at;
	}
	return next;
}

static void
execute_refusal_statement(const char *sql, int nargs, Datum *values, const char *nulls)
{
	Oid			types[5] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TIMESTAMPTZOID};

	if (SPI_execute_with_args(sql, nargs, types, values, nulls, false, 0) < 0)
		elog(ERROR, "writing mqtx.broker_errors failed: %s", sql);
}

/*
 * Bring mqtx.broker_errors up to date with what changed, in a transaction
 * of its own (no broker I/O in it).  A database whose objects predate the
 * table gets the log lines only.
 */
void
mqtx_worker_save_refusals(MqtxWorker *w)
{
	bool		changes = !w->refusals_saved;
	List	   *kept = NIL;
	ListCell   *lc;
	MemoryContext old;

	foreach(lc, w->refusals)
	{
		BrokerRefusal *r = lfirst(lc);

		changes |= r->unsaved || r->cleared;
	}
	if (!changes)
		return;

	if (w->schema_version[0] != '\0' &&
		!mqtx_version_older(w->schema_version, MQTX_BROKER_ERRORS_VERSION))
	{
		Datum		worker = CStringGetTextDatum(w->role);

		mqtx_worker_begin_step(psprintf("mqtx %s: recording what the broker refused", w->role));
		if (!w->refusals_saved)
			execute_refusal_statement(clear_refusals_sql, 1, &worker, NULL);
		foreach(lc, w->refusals)
		{
			BrokerRefusal *r = lfirst(lc);
			Datum		values[5];

			values[0] = worker;
			values[1] = CStringGetTextDatum(r->object_type);
			values[2] = CStringGetTextDatum(r->object_name);
			if (r->cleared)
				execute_refusal_statement(clear_refusal_sql, 3, values, NULL);
			else if (r->unsaved)
			{
				values[3] = CStringGetTextDatum(r->error);
				values[4] = TimestampTzGetDatum(r->retry_at);
				execute_refusal_statement(save_refusal_sql, 5, values, NULL);
			}
		}
		mqtx_worker_end_step(w);
		w->refusals_saved = true;
	}

	old = MemoryContextSwitchTo(w->long_context);
	foreach(lc, w->refusals)
	{
		BrokerRefusal *r = lfirst(lc);

		r->unsaved = false;
		if (!r->cleared)
			kept = lappend(kept, r);
		else
		{
			pfree(r->object_type);
			pfree(r->object_name);
			pfree(r->error);
			pfree(r);
		}
	}
	list_free(w->refusals);
	w->refusals = kept;
	MemoryContextSwitchTo(old);
}

/* One row of the topology, read before anything is declared */
typedef struct TopologyObject
{
	const char *object_type;	/* exchange, queue, binding */
	char	   *name;			/* exchange or queue name */
	char	   *other;			/* exchange type; binding: the exchange */
	bool		durable;
	Jsonb	   *arguments;		/* queue arguments, or NULL */
	char	   *routing_key;	/* binding */
	char	   *object_name;	/* as mqtx.broker_errors names it */
} TopologyObject;

static const char *const topology_types[] = {"exchange", "queue", "binding"};

/*
 * Read mqtx.exchanges, mqtx.queues and mqtx.bindings into the worker's
 * pass memory, in the order they are declared in.
 */
static TopologyObject *
read_topology(MqtxWorker *w, uint64 *count)
{
	TopologyObject *objects;

	mqtx_worker_begin_step(psprintf("mqtx %s: reading the topology", w->role));
	if (SPI_execute(topology_sql, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "reading the mqtx topology failed");
	*count = SPI_processed;
	objects = MemoryContextAllocZero(w->context, sizeof(TopologyObject) * Max(*count, 1));
	for (uint64 i = 0; i < *count; i++)
	{
		HeapTuple	tuple = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		TopologyObject *o = &objects[i];
		MemoryContext old = MemoryContextSwitchTo(w->context);
		char	   *kind = SPI_getvalue(tuple, desc, 1);
		bool		isnull;
		Datum		arguments;

		for (int t = 0; t < (int) lengthof(topology_types); t++)
			if (strcmp(kind, topology_types[t]) == 0)
				o->object_type = topology_types[t];
		o->name = SPI_getvalue(tuple, desc, 2);
		o->other = SPI_getvalue(tuple, desc, 3);
		o->durable = DatumGetBool(SPI_getbinval(tuple, desc, 4, &isnull));
		arguments = SPI_getbinval(tuple, desc, 5, &isnull);
		o->arguments = isnull ? NULL : DatumGetJsonbPCopy(arguments);
		o->routing_key = SPI_getvalue(tuple, desc, 6);
		o->object_name = o->routing_key == NULL ? o->name :
			psprintf("%s <- %s (%s)", o->name, o->other, o->routing_key);
		MemoryContextSwitchTo(old);
	}
	mqtx_worker_end_step(w);
	return objects;
}

static bool
declare_object_on(BrokerConnection *conn, TopologyObject *o, char **error)
{
	if (o->object_type == topology_types[0])
		return mqtx_broker_declare_exchange(conn, o->name, o->other, o->durable, error);
	if (o->object_type == topology_types[1])
		return mqtx_broker_declare_queue(conn, o->name, o->durable, o->arguments, error);
	return mqtx_broker_bind(conn, o->name, o->other, o->routing_key, error);
}

static bool
declare_object(MqtxWorker *w, TopologyObject *o, char **error)
{
	return declare_object_on(w->conn, o, error);
}

/*
 * The URL of mqtx.broker_url the worker is connected to.  The setting
 * cannot have changed under the connection: a reload that changes it
 * replaces the connection (mqtx_worker_reload).
 */
static const char *
connected_url(MqtxWorker *w)
{
	List	   *addresses = mqtx_broker_addresses(mqtx_broker_url);

	return list_nth(addresses, w->address);
}

/*
 * An object over which the broker closed the whole connection before (an
 * exchange type it lacks) is tried again on a connection of its own, so
 * that the worker's connection, and the messages in flight on it, are
 * not lost each time.  Returns whether the broker accepts it now; a
 * refusal is noted as before.
 */
static bool
probe_object(MqtxWorker *w, TopologyObject *o)
{
	char	   *error = NULL;
	BrokerConnection *probe = mqtx_broker_connect(connected_url(w),
												  psprintf("mqtx %s probe for database %s",
														   w->role, mqtx_slot_dbname(w->slot)),
												  &error);
	bool		accepted;

	if (probe == NULL)
		return false;			/* the broker is away: try again later */
	accepted = declare_object_on(probe, o, &error);
	if (!accepted && mqtx_broker_refused(probe))
		mqtx_worker_refused(w, o->object_type, o->object_name, error);
	mqtx_broker_disconnect(probe);
	return accepted;
}

/*
 * Declare what mqtx.exchanges, mqtx.queues and mqtx.bindings describe,
 * with no transaction open.  Declarations are idempotent; one the broker
 * refuses (an exchange redeclared with another type: it closes the
 * channel; an exchange type it lacks: it closes the whole connection) is
 * skipped from then on, with a backoff, and the rest go on, on a new
 * connection if need be.  Returns false when the connection was lost.
 */
static bool
declare_topology(MqtxWorker *w, char **error)
{
	uint32		generation = mqtx_slot_topology_generation(w->slot);
	uint64		count;
	TopologyObject *objects = read_topology(w, &count);
	bool		connected = true;

	pgstat_report_activity(STATE_RUNNING, psprintf("mqtx %s: declaring topology", w->role));
	if (generation != w->declared_generation)
		retry_now(w, topology_types, lengthof(topology_types));
	mqtx_worker_begin_round(w, topology_types, lengthof(topology_types));
	for (uint64 i = 0; i < count && connected; i++)
	{
		TopologyObject *o = &objects[i];

		if (!mqtx_worker_may_try(w, o->object_type, o->object_name))
			continue;
		if (closes_connection(w, o->object_type, o->object_name) &&
			!probe_object(w, o))
			continue;
		if (declare_object(w, o, error))
			mqtx_worker_accepted(w, o->object_type, o->object_name);
		else if (mqtx_broker_refused(w->conn))
		{
			connected = mqtx_broker_is_open(w->conn);
			mqtx_worker_refused(w, o->object_type, o->object_name, *error);
			find_refusal(w, o->object_type, o->object_name)->closes_connection = !connected;
		}
		else
		{
			/* the connection failed, not the object: the usual backoff */
			pgstat_report_activity(STATE_IDLE, NULL);
			mqtx_worker_drop_broker(w, *error);
			return false;
		}
	}
	pgstat_report_activity(STATE_IDLE, NULL);
	if (!connected)
	{
		mqtx_worker_save_refusals(w);
		return false;
	}
	mqtx_worker_end_round(w);
	mqtx_worker_save_refusals(w);

	w->declared_generation = generation;
	w->topology_declared = true;
	w->next_topology_retry_at = 0;
	for (int t = 0; t < (int) lengthof(topology_types); t++)
	{
		TimestampTz next = mqtx_worker_next_retry(w, topology_types[t]);

		if (next != 0 && (w->next_topology_retry_at == 0 || next < w->next_topology_retry_at))
			w->next_topology_retry_at = next;
	}
	/* what a declaration changed, the relay's exchange checks learn again */
	mqtx_broker_forget_exchanges(w->conn);
	return true;
}

/* Declared, at the current generation, with no refused object due again? */
static bool
topology_is_current(MqtxWorker *w)
{
	return w->topology_declared &&
		w->declared_generation == mqtx_slot_topology_generation(w->slot) &&
		(w->next_topology_retry_at == 0 || GetCurrentTimestamp() < w->next_topology_retry_at);
}

/*
 * Connect to the first URL of mqtx.broker_url that answers, starting from
 * w->address and going round the list once: the node the worker was on
 * is tried last after it failed (mqtx_worker_drop_broker moves w->address
 * on), so a dead node costs one attempt, not one per pass.
 * On failure *error says what each URL answered.
 */
static void
connect_to_an_address(MqtxWorker *w, char **error)
{
	List	   *addresses = mqtx_broker_addresses(mqtx_broker_url);
	int			count = list_length(addresses);
	char	   *name = psprintf("mqtx %s for database %s", w->role,
								mqtx_slot_dbname(w->slot));
	StringInfoData errors;

	initStringInfo(&errors);
	for (int i = 0; i < count && w->conn == NULL; i++)
	{
		int			index = (w->address + i) % count;
		const char *url = list_nth(addresses, index);
		char	   *url_error = NULL;

		CHECK_FOR_INTERRUPTS();
		w->conn = mqtx_broker_connect(url, name, &url_error);
		if (w->conn != NULL)
			w->address = index;
		else if (count == 1)
			appendStringInfoString(&errors, url_error);
		else
			appendStringInfo(&errors, "%s%s: %s", errors.len > 0 ? "; " : "",
							 mqtx_broker_describe(url), url_error);
	}
	*error = errors.data;
}

/*
 * Make sure there is a broker connection, respecting the reconnect
 * backoff, with the topology declared.  Returns whether there is one.
 */
bool
mqtx_worker_ensure_broker(MqtxWorker *w)
{
	char	   *error = NULL;

	/*
	 * Between passes, take in what the broker sent unprompted (and send
	 * heartbeats); a consumer does that while waiting for deliveries, and
	 * polling here would swallow them.
	 */
	if (w->conn != NULL && !w->receiving && !mqtx_broker_wait(w->conn, 0, &error))
		mqtx_worker_drop_broker(w, error);

	if (w->conn == NULL)
	{
		if (GetCurrentTimestamp() < w->next_connect_at)
			return false;
		pgstat_report_activity(STATE_RUNNING, psprintf("mqtx %s: connecting to broker", w->role));
		connect_to_an_address(w, &error);
		pgstat_report_activity(STATE_IDLE, NULL);
		if (w->conn == NULL)
		{
			log_broker_down(w, error);
			w->next_connect_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
															 w->reconnect_delay_ms);
			w->reconnect_delay_ms = Min(w->reconnect_delay_ms * 2, RECONNECT_MAX_MS);
			return false;
		}
		if (w->ever_connected)
			mqtx_count(w->slot, reconnect_counter[w->kind], 1);
		if (w->broker_state != MQTX_BROKER_UP)
			ereport(LOG,
					(errmsg("mqtx %s: connected to broker %s",
							w->role, mqtx_broker_address(w->conn))));
		w->ever_connected = true;
		w->broker_state = MQTX_BROKER_UP;
		w->connected_at = GetCurrentTimestamp();
		mqtx_slot_set_connected(w->slot, w->kind, mqtx_broker_address(w->conn));
	}

	/*
	 * A declaration that made the broker close the connection was the refused
	 * object's doing, not the broker's: start again on a new connection at
	 * once, without it.
	 */
	if (!topology_is_current(w) && !declare_topology(w, &error))
	{
		/* declare_topology dropped a connection that failed by itself */
		if (w->conn != NULL)
			mqtx_worker_restart_broker(w, error);
		return false;
	}
	return mqtx_broker_is_open(w->conn);
}

static char *
broker_settings(void)
{
	return psprintf("%s|%s|%s|%s|%d", mqtx_broker_url, mqtx_tls_ca_file,
					mqtx_tls_cert_file, mqtx_tls_key_file, mqtx_tls_verify_peer);
}

/*
 * SIGHUP: reload, and reconnect when the broker URL or TLS settings changed.
 */
void
mqtx_worker_reload(MqtxWorker *w)
{
	char	   *before = broker_settings();

	ConfigReloadPending = false;
	ProcessConfigFile(PGC_SIGHUP);
	if (strcmp(before, broker_settings()) == 0)
		return;

	ereport(LOG,
			(errmsg("mqtx %s: broker settings changed, connecting to %s",
					w->role, mqtx_broker_describe(mqtx_broker_url))));
	mqtx_worker_restart_broker(w, "the broker settings changed");
	w->reconnect_delay_ms = RECONNECT_MIN_MS;
	w->address = 0;
}

/*
 * Sleep until woken, or for at most poll_ms, but short enough to send
 * heartbeats and to reconnect on schedule.
 */
void
mqtx_worker_wait(MqtxWorker *w, long poll_ms)
{
	long		timeout = poll_ms;

	if (w->conn != NULL && mqtx_heartbeat > 0)
		timeout = Min(timeout, mqtx_heartbeat * 1000L / 2);
	if (w->conn == NULL)
		timeout = Min(timeout,
					  Max(1, TimestampDifferenceMilliseconds(GetCurrentTimestamp(),
															 w->next_connect_at)));
	(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
					 timeout, PG_WAIT_EXTENSION);
	ResetLatch(MyLatch);
}

/*
 * mqtx.<table>, locked for writing until the end of the step, or
 * InvalidOid when the extension is gone.  Locked first, it cannot be
 * dropped under the step's statements: a DROP EXTENSION that commits
 * between a worker's check for the extension and its statements would
 * otherwise fail them.
 */
Oid
mqtx_lock_table(const char *table)
{
	return RangeVarGetRelidExtended(makeRangeVar("mqtx", (char *) table, -1),
									RowExclusiveLock, RVR_MISSING_OK, NULL, NULL);
}

/*
 * The workers' own statements read a few rows at the head of an index (a
 * claim, a retention batch), which costs what they read whatever the
 * table holds.  Statistics on a queue table are stale by nature (a bulk
 * enqueue is not analyzed before it is relayed), and when they say that
 * much of it qualifies, the planner prefers a sequential or bitmap scan
 * and a sort, which then pay for the whole backlog or history on every
 * batch.  With these plan types off, the index walk is what is left.  JIT
 * goes too: a plan costed with a disabled path crosses every JIT
 * threshold, and compiling it costs more than hundreds of the statements.
 */
static const char *const index_order_settings[] = {
	"enable_seqscan", "enable_bitmapscan", "enable_sort", "jit",
};

/*
 * For a worker whose session runs only its own statements (the relay):
 * index-order plans for the whole session.
 */
void
mqtx_plan_index_order_for_session(void)
{
	for (int i = 0; i < (int) lengthof(index_order_settings); i++)
		SetConfigOption(index_order_settings[i], "off", PGC_SUSET, PGC_S_OVERRIDE);
}

/*
 * The same for the statements that follow, until
 * end_index_order_plans: for retention, which the consumer runs in a
 * session whose settings its handlers see.  Returns the GUC nest level to
 * end.
 */
static int
begin_index_order_plans(void)
{
	int			level = NewGUCNestLevel();

	for (int i = 0; i < (int) lengthof(index_order_settings); i++)
		(void) set_config_option(index_order_settings[i], "off", PGC_USERSET,
								 PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
	return level;
}

static void
end_index_order_plans(int level)
{
	AtEOXact_GUC(true, level);
}

/*
 * Delete one batch of rows of mqtx.<table> older than keep_seconds with delete_sql ($1:
 * seconds, $2: batch size), at most every RETENTION_INTERVAL_MS unless the
 * previous batch was full.  A negative keep_seconds keeps everything.
 */
void
mqtx_worker_apply_retention(MqtxWorker *w, const char *table, const char *delete_sql,
							int keep_seconds, TimestampTz *next_at)
{
	Oid			types[2] = {INT4OID, INT4OID};
	Datum		values[2] = {Int32GetDatum(keep_seconds), Int32GetDatum(RETENTION_BATCH)};
	uint64		deleted;

	if (keep_seconds < 0 || GetCurrentTimestamp() < *next_at)
		return;

	mqtx_worker_begin_step(psprintf("mqtx %s: deleting rows past retention", w->role));
	deleted = 0;
	if (OidIsValid(mqtx_lock_table(table)))
	{
		int			plans = begin_index_order_plans();

		if (SPI_execute_with_args(delete_sql, 2, types, values, NULL, false, 0) != SPI_OK_DELETE)
			elog(ERROR, "retention delete failed: %s", delete_sql);
		deleted = SPI_processed;
		end_index_order_plans(plans);
	}
	mqtx_worker_end_step(w);

	*next_at = deleted == RETENTION_BATCH ? 0 :
		TimestampTzPlusMilliseconds(GetCurrentTimestamp(), RETENTION_INTERVAL_MS);
}

/*
 * The settings both workers read: batch sizes, the poll interval and the
 * retry backoff.
 */
void
mqtx_worker_define_settings(void)
{
	DefineCustomIntVariable("mqtx.batch_size",
							"Outbox rows the relay publishes per batch.",
							"The batch is published with pipelined confirms: one round trip per batch.",
							&mqtx_batch_size, 1000, 1, 10000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("mqtx.batch_max_bytes",
							"Message payload a worker holds in memory at once.",
							"The relay's messages in flight, and the consumer's batch, stop growing at this many bytes of payload; a single larger message goes alone.",
							&mqtx_batch_max_bytes, 16 * 1024, 64, 1024 * 1024,
							PGC_SIGHUP, GUC_UNIT_KB, NULL, NULL, NULL);
	DefineCustomIntVariable("mqtx.poll_interval",
							"How often the relay looks for due rows when nothing wakes it.",
							"Committed messages wake the relay at once; this covers retries and missed wake-ups.",
							&mqtx_poll_interval, 1000, 10, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("mqtx.retry_base",
							"Delay before the first retry; it doubles per attempt, with jitter.",
							NULL,
							&mqtx_retry_base, 1000, 1, 24 * 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("mqtx.retry_max",
							"Longest delay between two attempts.",
							NULL,
							&mqtx_retry_max, 300000, 1, 24 * 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
}
