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
	bool		found_extension;	/* it has seen the extension installed */
	MqtxWorkerExit exit_reason; /* why the last worker of this kind left */
	uint32		extension_changes_seen; /* when it found no extension */
} MqtxWorkerInfo;

/*
 * A slot is given to a database by the launcher and taken back when the
 * database leaves mqtx.database.  Each assignment has a new number, which
 * the workers started for it carry: a worker whose number is no longer
 * the slot's serves a database that is not served any more, and leaves.
 */
struct MqtxSlot
{
	slock_t		mutex;			/* protects all but the atomics */
	bool		in_use;
	uint32		assignment;
	char		dbname[NAMEDATALEN];
	Oid			dboid;
	MqtxServeState state;		/* what the launcher made of it */
	char		state_detail[128];
	TimestampTz state_since;
	MqtxWorkerInfo workers[MQTX_NWORKER_KINDS];
	pid_t		apply_places[MQTX_MAX_APPLY_WORKERS];	/* the consumer's apply
														 * workers, by number */
	pg_atomic_uint32 topology_generation;
	/* extensions created or dropped in the database (it wraps) */
	pg_atomic_uint32 extension_changes;
	pg_atomic_uint64 counters[MQTX_NCOUNTERS];
};

typedef struct MqtxSharedState
{
	slock_t		mutex;			/* protects the launcher's latch */
	Latch	   *launcher_latch;
	/* databases created or dropped: the launcher looks again (it wraps) */
	pg_atomic_uint32 database_changes;
	uint32		next_assignment;	/* only the launcher assigns */
	/* the latest now() of a relay's claim: see mqtx_claim_horizon */
	pg_atomic_uint64 claim_horizon;
	pg_atomic_uint32 claim_horizon_open;	/* set once this server is a
											 * primary */
	MqtxSlot	slots[MQTX_MAX_DATABASES];
} MqtxSharedState;

static MqtxSharedState *shared_state = NULL;
static shmem_request_hook_type previous_shmem_request_hook = NULL;
static shmem_startup_hook_type previous_shmem_startup_hook = NULL;

/* mqtx.database; the launcher follows it on reload */
static char *served_databases_setting = NULL;

/* What this backend's open transaction asks of the workers at commit. */
static bool wake_relay_at_commit = false;
static bool topology_changed_at_commit = false;
static bool database_changed_at_commit = false;
static bool extension_changed_at_commit = false;

/*
 * The outermost (sub)transaction level with a topology change still in
 * force: a change rolled back with its savepoint does not count (PREPARE
 * refuses only what would be committed).  0: none.
 */
static int	topology_changed_level = 0;

static void wake_worker(MqtxSlot *slot, MqtxWorkerKind kind, bool only_if_connected);
static MqtxSlot *slot_for_database(Oid dboid);
static void set_launcher_latch(void);

/* exported despite hidden symbols: see outbox.c */
extern PGDLLEXPORT Datum mqtx_relay_stats(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum mqtx_consumer_stats(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum mqtx_topology_trigger(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum mqtx_broker_connections(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum mqtx_served_databases(PG_FUNCTION_ARGS);

PG_FUNCTION_INFO_V1(mqtx_relay_stats);
PG_FUNCTION_INFO_V1(mqtx_consumer_stats);
PG_FUNCTION_INFO_V1(mqtx_topology_trigger);
PG_FUNCTION_INFO_V1(mqtx_broker_connections);
PG_FUNCTION_INFO_V1(mqtx_served_databases);

/*
 * Room for as many databases as mqtx.database may list, whatever it lists
 * now: the setting can change on reload, shared memory cannot.
 */
static Size
shared_state_size(void)
{
	return sizeof(MqtxSharedState);
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
		memset(shared_state, 0, shared_state_size());
		SpinLockInit(&shared_state->mutex);
		pg_atomic_init_u32(&shared_state->database_changes, 0);
		/* closed until mqtx_open_claim_horizon raises it to that time */
		pg_atomic_init_u64(&shared_state->claim_horizon, 0);
		pg_atomic_init_u32(&shared_state->claim_horizon_open, 0);
		for (int i = 0; i < MQTX_MAX_DATABASES; i++)
		{
			MqtxSlot   *slot = &shared_state->slots[i];

			SpinLockInit(&slot->mutex);
			pg_atomic_init_u32(&slot->topology_generation, 0);
			pg_atomic_init_u32(&slot->extension_changes, 0);
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

/* The index-th of the MQTX_MAX_DATABASES slots (a worker's main_arg). */
MqtxSlot *
mqtx_slot(int index)
{
	Assert(shared_state != NULL && index >= 0 && index < MQTX_MAX_DATABASES);
	return &shared_state->slots[index];
}

/*
 * The database a slot serves; it changes only while no worker serves it,
 * so a worker reads its own slot's without the lock.
 */
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
 * The slot's assignment number if it is in use and, when dbname is not
 * NULL, its database (NAMEDATALEN bytes); 0 when it is free.
 */
uint32
mqtx_slot_assignment(MqtxSlot *slot, char *dbname)
{
	uint32		assignment;

	SpinLockAcquire(&slot->mutex);
	assignment = slot->in_use ? slot->assignment : 0;
	if (dbname != NULL)
		strlcpy(dbname, slot->dbname, NAMEDATALEN);
	SpinLockRelease(&slot->mutex);
	return assignment;
}

/*
 * Give a free slot to a database, with fresh counters; returns the
 * assignment number its workers carry.  Only the launcher calls this.
 */
uint32
mqtx_slot_assign(MqtxSlot *slot, const char *dbname)
{
	uint32		assignment;
	TimestampTz now = GetCurrentTimestamp();

	/* 0 means "free"; numbers wrap only after four billion assignments */
	if (++shared_state->next_assignment == 0)
		shared_state->next_assignment = 1;
	assignment = shared_state->next_assignment;

	for (int c = 0; c < MQTX_NCOUNTERS; c++)
		pg_atomic_write_u64(&slot->counters[c], 0);
	SpinLockAcquire(&slot->mutex);
	slot->in_use = true;
	slot->assignment = assignment;
	strlcpy(slot->dbname, dbname, NAMEDATALEN);
	slot->dboid = InvalidOid;
	slot->state = MQTX_SERVE_STARTING;
	slot->state_detail[0] = '\0';
	slot->state_since = now;
	for (int kind = 0; kind < MQTX_NWORKER_KINDS; kind++)
		slot->workers[kind].exit_reason = MQTX_EXIT_UNKNOWN;
	SpinLockRelease(&slot->mutex);
	return assignment;
}

/*
 * The database leaves mqtx.database: its workers see that their number is
 * no longer the slot's and exit; the launcher frees the slot once they
 * have (mqtx_slot_release).
 */
void
mqtx_slot_retire(MqtxSlot *slot)
{
	TimestampTz now = GetCurrentTimestamp();

	SpinLockAcquire(&slot->mutex);
	slot->assignment = 0;
	slot->state = MQTX_SERVE_STOPPING;
	slot->state_detail[0] = '\0';
	slot->state_since = now;
	SpinLockRelease(&slot->mutex);
	for (int kind = 0; kind < MQTX_NWORKER_KINDS; kind++)
		wake_worker(slot, kind, false);
}

/* A retired slot whose workers are gone is free again. */
void
mqtx_slot_release(MqtxSlot *slot)
{
	SpinLockAcquire(&slot->mutex);
	slot->in_use = false;
	slot->dboid = InvalidOid;
	SpinLockRelease(&slot->mutex);
}

/* Whether the slot is given to a database, retired or not. */
bool
mqtx_slot_in_use(MqtxSlot *slot)
{
	bool		in_use;

	SpinLockAcquire(&slot->mutex);
	in_use = slot->in_use;
	SpinLockRelease(&slot->mutex);
	return in_use;
}

/* What the launcher made of the slot's database, for mqtx.served_databases. */
void
mqtx_slot_set_state(MqtxSlot *slot, MqtxServeState state, const char *detail)
{
	TimestampTz now = GetCurrentTimestamp();

	SpinLockAcquire(&slot->mutex);
	if (slot->state != state || strcmp(slot->state_detail, detail) != 0)
	{
		slot->state = state;
		strlcpy(slot->state_detail, detail, sizeof(slot->state_detail));
		slot->state_since = now;
	}
	SpinLockRelease(&slot->mutex);
}

/* The process of the slot's worker of this kind, or 0. */
pid_t
mqtx_slot_worker_pid(MqtxSlot *slot, MqtxWorkerKind kind)
{
	pid_t		pid;

	SpinLockAcquire(&slot->mutex);
	pid = slot->workers[kind].pid;
	SpinLockRelease(&slot->mutex);
	return pid;
}

/*
 * An apply worker takes its number's place in the slot, or finds it taken
 * by another live process (its predecessor, on its way out).  The place is
 * left by mqtx_slot_leave_apply_place as it exits; a crash resets shared
 * memory, and the places with it.
 */
bool
mqtx_slot_take_apply_place(MqtxSlot *slot, int number)
{
	bool		taken;

	SpinLockAcquire(&slot->mutex);
	taken = slot->apply_places[number] == 0 || slot->apply_places[number] == MyProcPid;
	if (taken)
		slot->apply_places[number] = MyProcPid;
	SpinLockRelease(&slot->mutex);
	return taken;
}

void
mqtx_slot_leave_apply_place(MqtxSlot *slot, int number)
{
	SpinLockAcquire(&slot->mutex);
	if (slot->apply_places[number] == MyProcPid)
		slot->apply_places[number] = 0;
	SpinLockRelease(&slot->mutex);
}

/*
 * A worker says why it leaves: the launcher restarts one that found no
 * extension only once an extension has been created or dropped in its
 * database since extension_changes_seen, the count it read before
 * looking.
 */
void
mqtx_slot_note_exit(MqtxSlot *slot, MqtxWorkerKind kind, MqtxWorkerExit reason,
					uint32 extension_changes_seen)
{
	SpinLockAcquire(&slot->mutex);
	slot->workers[kind].exit_reason = reason;
	slot->workers[kind].extension_changes_seen = extension_changes_seen;
	SpinLockRelease(&slot->mutex);
}

/*
 * The worker has found the extension installed (it may still wait for an
 * update): the launcher can say the database is served.
 */
void
mqtx_slot_note_extension_found(MqtxSlot *slot, MqtxWorkerKind kind)
{
	SpinLockAcquire(&slot->mutex);
	slot->workers[kind].found_extension = true;
	SpinLockRelease(&slot->mutex);
	set_launcher_latch();
}

/*
 * Why the slot's last worker of this kind left; resets it, and whether a
 * worker found the extension, for the next worker the launcher starts.
 */
MqtxWorkerExit
mqtx_slot_take_exit(MqtxSlot *slot, MqtxWorkerKind kind, uint32 *extension_changes_seen)
{
	MqtxWorkerExit reason;

	SpinLockAcquire(&slot->mutex);
	reason = slot->workers[kind].exit_reason;
	*extension_changes_seen = slot->workers[kind].extension_changes_seen;
	slot->workers[kind].exit_reason = MQTX_EXIT_UNKNOWN;
	slot->workers[kind].found_extension = false;
	SpinLockRelease(&slot->mutex);
	return reason;
}

/* Whether the slot's running worker of this kind has found the extension. */
bool
mqtx_slot_extension_found(MqtxSlot *slot, MqtxWorkerKind kind)
{
	bool		found;

	SpinLockAcquire(&slot->mutex);
	found = slot->workers[kind].found_extension;
	SpinLockRelease(&slot->mutex);
	return found;
}

/* How many databases have been created or dropped (it wraps). */
uint32
mqtx_database_changes(void)
{
	return pg_atomic_read_u32(&shared_state->database_changes);
}

/* How many extensions have been created or dropped in the slot's database. */
uint32
mqtx_slot_extension_changes(MqtxSlot *slot)
{
	return pg_atomic_read_u32(&slot->extension_changes);
}

/* The launcher says where to wake it, or (NULL) that it is gone. */
void
mqtx_set_launcher_latch(Latch *latch)
{
	SpinLockAcquire(&shared_state->mutex);
	shared_state->launcher_latch = latch;
	SpinLockRelease(&shared_state->mutex);
}

/*
 * Count what changed, then wake the launcher: a database created or
 * dropped concerns every database the launcher could not find; an
 * extension only this database, if it has a slot (its workers record the
 * database's OID there before they look for the extension).
 */
static void
wake_launcher(bool database_changed, bool extension_changed)
{
	if (database_changed)
		pg_atomic_fetch_add_u32(&shared_state->database_changes, 1);
	if (extension_changed)
	{
		MqtxSlot   *slot = slot_for_database(MyDatabaseId);

		if (slot != NULL)
			pg_atomic_fetch_add_u32(&slot->extension_changes, 1);
	}
	set_launcher_latch();
}

static void
set_launcher_latch(void)
{
	Latch	   *latch;

	SpinLockAcquire(&shared_state->mutex);
	latch = shared_state->launcher_latch;
	SpinLockRelease(&shared_state->mutex);
	if (latch != NULL)
		SetLatch(latch);
}

/*
 * The open transaction creates or drops a database (database) or an
 * extension: if it commits, the launcher looks again at the databases it
 * could not serve.
 */
void
mqtx_wake_launcher_at_commit(bool database)
{
	if (database)
		database_changed_at_commit = true;
	else
		extension_changed_at_commit = true;
}

/*
 * The slot of the workers serving this database, or NULL when there is
 * none (mqtx not preloaded, the database not in mqtx.database, or its
 * workers not started yet).  A slot's dboid is set by its workers and
 * cleared when it is freed.
 */
static MqtxSlot *
slot_for_database(Oid dboid)
{
	if (shared_state == NULL)
		return NULL;
	for (int i = 0; i < MQTX_MAX_DATABASES; i++)
		if (shared_state->slots[i].dboid == dboid)
			return &shared_state->slots[i];
	return NULL;
}

/*
 * A relay is about to claim outbox rows due by claim_now (its claim's
 * now()): the claim horizon moves up to it, before the claim reads
 * anything.  One horizon serves every database: it only ever grows, and
 * a horizon per database would be lost with its slot.
 */
void
mqtx_note_claim(TimestampTz claim_now)
{
	uint64		horizon;

	if (shared_state == NULL)
		return;
	horizon = pg_atomic_read_u64(&shared_state->claim_horizon);
	while ((int64) horizon < claim_now &&
		   !pg_atomic_compare_exchange_u64(&shared_state->claim_horizon, &horizon,
										   (uint64) claim_now))
		;
}

/*
 * No relay has claimed, or can still claim, an outbox row due after this
 * time and locked before this call, since this server started: a
 * message scheduled later than this has not been sent (mqtx.cancel).
 * Infinity until the launcher has seen the server as a primary.  Without
 * shared memory (mqtx not preloaded) no relay runs here at all.
 */
TimestampTz
mqtx_claim_horizon(void)
{
	if (shared_state == NULL)
		return DT_NOBEGIN;
	pg_memory_barrier();
	if (pg_atomic_read_u32(&shared_state->claim_horizon_open) == 0)
		return DT_NOEND;
	return (TimestampTz) pg_atomic_read_u64(&shared_state->claim_horizon);
}

/*
 * The launcher sees this server as a primary (at start, or promoted): the
 * horizon moves up to now, and is open.  Until then nothing counts as not
 * sent: a promoted standby's shared memory dates from the standby's start,
 * and the old primary's relay may have sent since whatever was due.
 */
void
mqtx_open_claim_horizon(void)
{
	if (shared_state == NULL)
		return;
	mqtx_note_claim(GetCurrentTimestamp());
	pg_write_barrier();
	pg_atomic_write_u32(&shared_state->claim_horizon_open, 1);
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
			if ((database_changed_at_commit || extension_changed_at_commit) &&
				shared_state != NULL)
				wake_launcher(database_changed_at_commit, extension_changed_at_commit);
			/* FALLTHROUGH */
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PREPARE:
			wake_relay_at_commit = false;
			database_changed_at_commit = false;
			extension_changed_at_commit = false;
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
 * mqtx.database names the databases that get a slot and workers.  The
 * launcher reads it again on every reload.
 */
static void
define_served_databases(void)
{
	DefineCustomStringVariable("mqtx.database",
							   "Databases served by the mqtx workers.",
							   "A comma-separated list; each database needs CREATE EXTENSION mqtx.",
							   &served_databases_setting,
							   "postgres",
							   PGC_SIGHUP,
							   GUC_LIST_INPUT,
							   check_database_list, NULL, NULL);
}

/*
 * The databases mqtx.database lists now, in the current memory context
 * (NIL when not preloaded).
 */
List *
mqtx_listed_databases(void)
{
	List	   *names = NIL;

	if (served_databases_setting == NULL)
		return NIL;
	if (!SplitIdentifierString(pstrdup(served_databases_setting), ',', &names))
		elog(ERROR, "invalid mqtx.database");	/* the check hook prevents it */
	return names;
}

/*
 * Shared memory, and mqtx.database, exist only when preloaded (without
 * the launcher nothing would follow the setting); the commit callbacks
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
 * False, and nothing recorded, when the slot no longer has the worker's
 * assignment (its database left mqtx.database since it was started).
 */
bool
mqtx_slot_attach(MqtxSlot *slot, MqtxWorkerKind kind, uint32 assignment, Oid dboid)
{
	bool		mine;

	SpinLockAcquire(&slot->mutex);

	/*
	 * and no other worker of this kind is there (one a launcher lost sight
	 * of)
	 */
	mine = slot->in_use && slot->assignment == assignment &&
		slot->workers[kind].pid == 0;
	if (mine)
	{
		slot->dboid = dboid;
		slot->workers[kind].pid = MyProcPid;
		slot->workers[kind].latch = MyLatch;
	}
	SpinLockRelease(&slot->mutex);
	return mine;
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

/* What the views show of a slot, copied under its lock */
typedef struct SlotCopy
{
	char		dbname[NAMEDATALEN];
	MqtxServeState state;
	char		state_detail[128];
	TimestampTz state_since;
	MqtxWorkerInfo workers[MQTX_NWORKER_KINDS];
} SlotCopy;

/* false when the slot serves no database */
static bool
copy_slot(MqtxSlot *slot, SlotCopy *copy)
{
	bool		in_use;

	SpinLockAcquire(&slot->mutex);
	in_use = slot->in_use;
	memcpy(copy->dbname, slot->dbname, NAMEDATALEN);
	copy->state = slot->state;
	memcpy(copy->state_detail, slot->state_detail, sizeof(copy->state_detail));
	copy->state_since = slot->state_since;
	memcpy(copy->workers, slot->workers, sizeof(copy->workers));
	SpinLockRelease(&slot->mutex);
	return in_use;
}

/*
 * The next slot in use after *index (start from -1), copied into *copy;
 * NULL after the last one, or without shared memory.
 */
static MqtxSlot *
next_slot_in_use(int *index, SlotCopy *copy)
{
	if (shared_state == NULL)
		return NULL;
	while (++(*index) < MQTX_MAX_DATABASES)
		if (copy_slot(&shared_state->slots[*index], copy))
			return &shared_state->slots[*index];
	return NULL;
}

/*
 * One row per served database: the worker's process, broker state and a
 * range of counters since the database was first served.
 */
static void
worker_stats(FunctionCallInfo fcinfo, MqtxWorkerKind kind,
			 MqtxCounter first, MqtxCounter last)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	MqtxSlot   *slot;
	SlotCopy	copy;

	InitMaterializedSRF(fcinfo, 0);
	for (int i = -1; (slot = next_slot_in_use(&i, &copy)) != NULL;)
	{
		Datum		values[4 + MQTX_NCOUNTERS];
		bool		nulls[4 + MQTX_NCOUNTERS] = {0};
		MqtxWorkerInfo info = copy.workers[kind];
		int			ncols = 3;

		values[0] = CStringGetTextDatum(copy.dbname);
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
	SlotCopy	copy;

	InitMaterializedSRF(fcinfo, 0);
	for (int i = -1; next_slot_in_use(&i, &copy) != NULL;)
	{
		for (int kind = 0; kind < MQTX_NWORKER_KINDS; kind++)
		{
			Datum		values[5];
			bool		nulls[5] = {0};
			MqtxWorkerInfo info = copy.workers[kind];

			values[0] = CStringGetTextDatum(copy.dbname);
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

/* how mqtx.served_databases names a state */
static const char *
serve_state_name(MqtxServeState state)
{
	static const char *const names[] = {
		[MQTX_SERVE_STARTING] = "starting",
		[MQTX_SERVE_SERVING] = "serving",
		[MQTX_SERVE_STANDBY] = "standby",
		[MQTX_SERVE_NO_DATABASE] = "no database",
		[MQTX_SERVE_NO_EXTENSION] = "no extension",
		[MQTX_SERVE_NO_WORKER_SLOT] = "no worker slot",
		[MQTX_SERVE_STOPPING] = "stopping",
	};

	return names[state];
}

/*
 * mqtx.served_databases(): per database of mqtx.database (and any still
 * being let go), what the launcher made of it, since when, and the
 * workers' processes.
 */
Datum
mqtx_served_databases(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	SlotCopy	copy;

	InitMaterializedSRF(fcinfo, 0);
	for (int i = -1; next_slot_in_use(&i, &copy) != NULL;)
	{
		Datum		values[6];
		bool		nulls[6] = {0};

		values[0] = CStringGetTextDatum(copy.dbname);
		values[1] = CStringGetTextDatum(serve_state_name(copy.state));
		values[2] = CStringGetTextDatum(copy.state_detail);
		nulls[2] = copy.state_detail[0] == '\0';
		values[3] = TimestampTzGetDatum(copy.state_since);
		for (int kind = 0; kind < MQTX_NWORKER_KINDS; kind++)
		{
			values[4 + kind] = Int32GetDatum(copy.workers[kind].pid);
			nulls[4 + kind] = copy.workers[kind].pid == 0;
		}
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
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
