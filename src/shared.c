/*-------------------------------------------------------------------------
 *
 * shared.c
 *	  Shared memory: one slot per served database, holding the workers'
 *	  latches and counters, and the commit-time wake-up of the relay.
 *
 * A transaction that enqueued a message sets the relay's latch when it
 * commits, so an idle relay publishes within a millisecond or two instead
 * of at its next poll.  Waking at commit, not at insert, matters: the relay
 * could not see the row any earlier.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/trigger.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"
#include "utils/varlena.h"

#include "log_redact.h"
#include "shared.h"

typedef struct MqtxWorkerInfo
{
	pid_t		pid;
	Latch	   *latch;
	bool		broker_connected;
	bool		broker_blocked; /* connection.blocked by the broker */
	char		broker_address[MQTX_BROKER_ADDRESS_LEN];	/* the node, when
															 * connected */
	TimestampTz connected_since;
} MqtxWorkerInfo;

struct MqtxSlot
{
	char		dbname[NAMEDATALEN];
	slock_t		mutex;			/* protects dboid and workers */
	Oid			dboid;
	MqtxWorkerInfo workers[MQTX_NWORKER_KINDS];
	pg_atomic_uint32 topology_generation;
	pg_atomic_uint64 counters[MQTX_NCOUNTERS];
};

typedef struct MqtxSharedState
{
	int			nslots;
	MqtxSlot	slots[FLEXIBLE_ARRAY_MEMBER];
} MqtxSharedState;

static MqtxSharedState *shared_state = NULL;
static shmem_request_hook_type previous_shmem_request_hook = NULL;
static shmem_startup_hook_type previous_shmem_startup_hook = NULL;

/* mqtx.database, and the names in it, parsed once in the postmaster */
static char *served_databases_setting = NULL;
static List *served_databases = NIL;

/* What this backend's open transaction asks of the relay at commit. */
static bool wake_relay_at_commit = false;
static bool topology_changed_at_commit = false;

/*
 * The outermost (sub)transaction level with a topology change still in
 * force: a change rolled back with its savepoint does not count (PREPARE
 * refuses only what would be committed).  0: none.
 */
static int	topology_changed_level = 0;

/* exported despite hidden symbols: see outbox.c */
extern PGDLLEXPORT Datum mqtx_relay_stats(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum mqtx_consumer_stats(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum mqtx_topology_trigger(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum mqtx_broker_connections(PG_FUNCTION_ARGS);

PG_FUNCTION_INFO_V1(mqtx_relay_stats);
PG_FUNCTION_INFO_V1(mqtx_consumer_stats);
PG_FUNCTION_INFO_V1(mqtx_topology_trigger);
PG_FUNCTION_INFO_V1(mqtx_broker_connections);

static Size
shared_state_size(void)
{
	return add_size(offsetof(MqtxSharedState, slots),
					mul_size(sizeof(MqtxSlot), list_length(served_databases)));
}

static void
request_shared_memory(void)
{
	if (previous_shmem_request_hook)
		previous_shmem_request_hook();
	RequestAddinShmemSpace(shared_state_size());
	/* the one moment after every preloaded library has set its hooks */
	mqtx_check_statement_masking();
}

static void
init_shared_memory(void)
{
	bool		found;

	if (previous_shmem_startup_hook)
		previous_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	shared_state = ShmemInitStruct("mqtx", shared_state_size(), &found);
	if (!found)
	{
		ListCell   *lc;
		int			i = 0;

		memset(shared_state, 0, shared_state_size());
		shared_state->nslots = list_length(served_databases);
		foreach(lc, served_databases)
		{
			MqtxSlot   *slot = &shared_state->slots[i++];

			strlcpy(slot->dbname, lfirst(lc), NAMEDATALEN);
			SpinLockInit(&slot->mutex);
			pg_atomic_init_u32(&slot->topology_generation, 0);
			for (int c = 0; c < MQTX_NCOUNTERS; c++)
				pg_atomic_init_u64(&slot->counters[c], 0);
		}
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * "relay" or "consumer": in log lines, process names and the views.
 */
const char *
mqtx_worker_kind_name(MqtxWorkerKind kind)
{
	static const char *const names[MQTX_NWORKER_KINDS] = {"relay", "consumer"};

	return names[kind];
}

/* The slot of the index-th served database (a worker's main_arg). */
MqtxSlot *
mqtx_slot(int index)
{
	Assert(shared_state != NULL && index >= 0 && index < shared_state->nslots);
	return &shared_state->slots[index];
}

/* The database a slot serves; fixed at server start. */
const char *
mqtx_slot_dbname(MqtxSlot *slot)
{
	return slot->dbname;
}

/* how many topology or subscription changes have committed (it wraps) */
uint32
mqtx_slot_topology_generation(MqtxSlot *slot)
{
	return pg_atomic_read_u32(&slot->topology_generation);
}

/*
 * The slot of the relay serving this database, or NULL when there is none
 * (mqtx not preloaded, or the database is not in mqtx.database).
 */
static MqtxSlot *
slot_for_database(Oid dboid)
{
	if (shared_state == NULL)
		return NULL;
	for (int i = 0; i < shared_state->nslots; i++)
		if (shared_state->slots[i].dboid == dboid)
			return &shared_state->slots[i];
	return NULL;
}

/*
 * The open transaction enqueued a message: if it commits, the relay's
 * latch is set (wake_at_commit_callback).
 */
void
mqtx_wake_relay_at_commit(void)
{
	wake_relay_at_commit = true;
}

static void
mqtx_topology_changed_at_commit(void)
{
	int			level = GetCurrentTransactionNestLevel();

	topology_changed_at_commit = true;
	wake_relay_at_commit = true;
	if (topology_changed_level == 0 || level < topology_changed_level)
		topology_changed_level = level;
}

static void
follow_subtransactions(SubXactEvent event, SubTransactionId mySubid,
					   SubTransactionId parentSubid, void *arg)
{
	int			level = GetCurrentTransactionNestLevel();

	if (topology_changed_level < level)
		return;
	if (event == SUBXACT_EVENT_COMMIT_SUB)
		topology_changed_level = level - 1;
	else if (event == SUBXACT_EVENT_ABORT_SUB)
		topology_changed_level = 0;
}

/*
 * Set the worker's latch; if only_if_connected, only while it is connected
 * to the broker.  A relay that is not connected can do nothing with new
 * messages (it claims every due row once it is), and waking it on every
 * commit, thousands of times a second during an outage, would take CPU
 * from the application for nothing.
 */
static void
wake_worker(MqtxSlot *slot, MqtxWorkerKind kind, bool only_if_connected)
{
	Latch	   *latch;

	SpinLockAcquire(&slot->mutex);
	latch = slot->workers[kind].latch;
	if (only_if_connected && !slot->workers[kind].broker_connected)
		latch = NULL;
	SpinLockRelease(&slot->mutex);
	if (latch != NULL)
		SetLatch(latch);
}

/*
 * New messages concern the relay; a topology or subscription change
 * concerns both workers.
 */
static void
wake_workers(Oid dboid, bool topology_changed)
{
	MqtxSlot   *slot = slot_for_database(dboid);

	if (slot == NULL)
		return;
	if (topology_changed)
	{
		pg_atomic_fetch_add_u32(&slot->topology_generation, 1);
		wake_worker(slot, MQTX_CONSUMER, false);
	}
	wake_worker(slot, MQTX_RELAY, !topology_changed);
}

static void
wake_at_commit_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
			if (wake_relay_at_commit)
				wake_workers(MyDatabaseId, topology_changed_at_commit);
			/* FALLTHROUGH */
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PREPARE:
			wake_relay_at_commit = false;
			topology_changed_at_commit = false;
			topology_changed_level = 0;
			break;
		case XACT_EVENT_PRE_PREPARE:

			/*
			 * COMMIT PREPARED runs in another session, or after a restart,
			 * where no callback of this one can tell the workers; a change of
			 * topology or subscriptions they never hear of would never be
			 * declared or consumed.  Messages enqueued in a prepared
			 * transaction are found by the relay's poll.
			 */
			if (topology_changed_level > 0)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("cannot PREPARE a transaction that changed the mqtx topology or subscriptions"),
						 errhint("Change mqtx.exchanges, mqtx.queues, mqtx.bindings and mqtx.subscriptions in a transaction that commits without two-phase commit.")));
			break;
		default:
			break;
	}
}

/*
 * GUC check hook for mqtx.database: a comma-separated list of 1 to
 * MQTX_MAX_DATABASES database names, none twice.
 */
static bool
check_database_list(char **newval, void **extra, GucSource source)
{
	char	   *copy = pstrdup(*newval);
	List	   *names = NIL;
	bool		ok;

	ok = SplitIdentifierString(copy, ',', &names) && names != NIL &&
		list_length(names) <= MQTX_MAX_DATABASES;
	if (!ok)
		GUC_check_errdetail("mqtx.database must be a comma-separated list of 1 to %d database names.",
							MQTX_MAX_DATABASES);
	for (ListCell *a = list_head(names); ok && a != NULL; a = lnext(names, a))
		for (ListCell *b = lnext(names, a); ok && b != NULL; b = lnext(names, b))
			if (strcmp(lfirst(a), lfirst(b)) == 0)
			{
				GUC_check_errdetail("Database \"%s\" is listed twice.", (char *) lfirst(a));
				ok = false;
			}
	list_free(names);
	pfree(copy);
	return ok;
}

/*
 * mqtx.database names the databases that get a slot and workers; it is
 * parsed once, in the postmaster, and the workers inherit the list.
 */
static void
define_served_databases(void)
{
	MemoryContext old;

	DefineCustomStringVariable("mqtx.database",
							   "Databases served by the mqtx workers.",
							   "A comma-separated list; each database needs CREATE EXTENSION mqtx.",
							   &served_databases_setting,
							   "postgres",
							   PGC_POSTMASTER,
							   GUC_LIST_INPUT,
							   check_database_list, NULL, NULL);
	old = MemoryContextSwitchTo(TopMemoryContext);
	if (!SplitIdentifierString(pstrdup(served_databases_setting), ',',
							   &served_databases))
		elog(ERROR, "invalid mqtx.database");	/* the check hook prevents it */
	MemoryContextSwitchTo(old);
}

/* How many databases mqtx.database lists (0 when not preloaded). */
int
mqtx_served_database_count(void)
{
	return list_length(served_databases);
}

/* The index-th database of mqtx.database, as listed. */
const char *
mqtx_served_database(int index)
{
	return list_nth(served_databases, index);
}

/*
 * Shared memory, and the setting that sizes it, exist only when preloaded
 * (a PGC_POSTMASTER setting can't be defined later); the commit callbacks
 * are wanted wherever the library is loaded (they do nothing without
 * shared memory).
 */
void
mqtx_shared_init(void)
{
	if (process_shared_preload_libraries_in_progress)
	{
		define_served_databases();
		previous_shmem_request_hook = shmem_request_hook;
		shmem_request_hook = request_shared_memory;
		previous_shmem_startup_hook = shmem_startup_hook;
		shmem_startup_hook = init_shared_memory;
	}
	RegisterXactCallback(wake_at_commit_callback, NULL);
	RegisterSubXactCallback(follow_subtransactions, NULL);
}

/*
 * A worker claims its slot: records who it is and where to wake it.
 */
void
mqtx_slot_attach(MqtxSlot *slot, MqtxWorkerKind kind, Oid dboid)
{
	SpinLockAcquire(&slot->mutex);
	slot->dboid = dboid;
	slot->workers[kind].pid = MyProcPid;
	slot->workers[kind].latch = MyLatch;
	SpinLockRelease(&slot->mutex);
}

/* A worker gives up its slot as it exits (a before_shmem_exit callback). */
void
mqtx_slot_detach(MqtxSlot *slot, MqtxWorkerKind kind)
{
	SpinLockAcquire(&slot->mutex);
	slot->workers[kind].pid = 0;
	slot->workers[kind].latch = NULL;
	slot->workers[kind].broker_connected = false;
	slot->workers[kind].broker_blocked = false;
	slot->workers[kind].broker_address[0] = '\0';
	slot->workers[kind].connected_since = 0;
	SpinLockRelease(&slot->mutex);
}

/*
 * The worker is connected to the broker node broker_address ("amqp://host:
 * port"), or, for NULL, not connected: mqtx.broker_connections and the
 * stats views show it, and commits wake only a relay that is connected.
 */
void
mqtx_slot_set_connected(MqtxSlot *slot, MqtxWorkerKind kind,
						const char *broker_address)
{
	MqtxWorkerInfo *info = &slot->workers[kind];
	TimestampTz now = GetCurrentTimestamp();

	SpinLockAcquire(&slot->mutex);
	info->broker_connected = broker_address != NULL;
	strlcpy(info->broker_address, broker_address ? broker_address : "",
			sizeof(info->broker_address));
	info->connected_since = broker_address != NULL ? now : 0;
	SpinLockRelease(&slot->mutex);
}

/* Whether the broker has blocked the worker's connection (connection.blocked). */
void
mqtx_slot_set_blocked(MqtxSlot *slot, MqtxWorkerKind kind, bool blocked)
{
	SpinLockAcquire(&slot->mutex);
	slot->workers[kind].broker_blocked = blocked;
	SpinLockRelease(&slot->mutex);
}

/* Add n to one of the slot's counters; lock-free, any process may call it. */
void
mqtx_count(MqtxSlot *slot, MqtxCounter counter, uint64 n)
{
	if (n > 0)
		pg_atomic_fetch_add_u64(&slot->counters[counter], n);
}

/* A consistent copy of what a slot holds of one worker */
static MqtxWorkerInfo
worker_info(MqtxSlot *slot, MqtxWorkerKind kind)
{
	MqtxWorkerInfo info;

	SpinLockAcquire(&slot->mutex);
	info = slot->workers[kind];
	SpinLockRelease(&slot->mutex);
	return info;
}

/*
 * One row per served database: the worker's process, broker state and a
 * range of counters since server start.
 */
static void
worker_stats(FunctionCallInfo fcinfo, MqtxWorkerKind kind,
			 MqtxCounter first, MqtxCounter last)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	InitMaterializedSRF(fcinfo, 0);
	if (shared_state == NULL)
		return;

	for (int i = 0; i < shared_state->nslots; i++)
	{
		MqtxSlot   *slot = &shared_state->slots[i];
		Datum		values[4 + MQTX_NCOUNTERS];
		bool		nulls[4 + MQTX_NCOUNTERS] = {0};
		MqtxWorkerInfo info;
		int			ncols = 3;

		info = worker_info(slot, kind);

		values[0] = CStringGetTextDatum(slot->dbname);
		values[1] = Int32GetDatum(info.pid);
		nulls[1] = (info.pid == 0);
		values[2] = BoolGetDatum(info.broker_connected);
		/* only a publishing connection is ever blocked; 0.2.0 had no column */
		if (kind == MQTX_RELAY && rsinfo->setDesc->natts == 4 + (int) last - (int) first + 1)
			values[ncols++] = BoolGetDatum(info.broker_blocked);
		for (int c = (int) first; c <= (int) last; c++)
			values[ncols++] = Int64GetDatum((int64) pg_atomic_read_u64(&slot->counters[c]));
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
}

/* mqtx.relay_stats(): the relays' processes, broker states and counters. */
Datum
mqtx_relay_stats(PG_FUNCTION_ARGS)
{
	worker_stats(fcinfo, MQTX_RELAY, MQTX_RELAY_PUBLISHED, MQTX_RELAY_RECONNECTS);
	PG_RETURN_VOID();
}

/* mqtx.consumer_stats(): the same for the consumers. */
Datum
mqtx_consumer_stats(PG_FUNCTION_ARGS)
{
	worker_stats(fcinfo, MQTX_CONSUMER, MQTX_CONSUMER_CONSUMED,
				 MQTX_CONSUMER_RECONNECTS);
	PG_RETURN_VOID();
}

/*
 * mqtx.broker_connections(): per served database and worker, its process
 * and the broker node it is connected to, since when (NULLs when none).
 * Which node matters once mqtx.broker_url lists a cluster's nodes.
 */
Datum
mqtx_broker_connections(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	InitMaterializedSRF(fcinfo, 0);
	if (shared_state == NULL)
		PG_RETURN_VOID();

	for (int i = 0; i < shared_state->nslots; i++)
	{
		MqtxSlot   *slot = &shared_state->slots[i];

		for (int kind = 0; kind < MQTX_NWORKER_KINDS; kind++)
		{
			Datum		values[5];
			bool		nulls[5] = {0};
			MqtxWorkerInfo info;

			info = worker_info(slot, kind);

			values[0] = CStringGetTextDatum(slot->dbname);
			values[1] = CStringGetTextDatum(mqtx_worker_kind_name(kind));
			values[2] = Int32GetDatum(info.pid);
			nulls[2] = info.pid == 0;
			values[3] = CStringGetTextDatum(info.broker_address);
			nulls[3] = !info.broker_connected;
			values[4] = TimestampTzGetDatum(info.connected_since);
			nulls[4] = !info.broker_connected;
			tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		}
	}
	PG_RETURN_VOID();
}

/*
 * Statement trigger on mqtx.exchanges, mqtx.queues and mqtx.bindings: the
 * relay re-declares the topology once the change commits.
 */
Datum
mqtx_topology_trigger(PG_FUNCTION_ARGS)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("mqtx.topology_trigger() can only be called as a trigger")));
	mqtx_topology_changed_at_commit();
	return PointerGetDatum(NULL);
}
