/*-------------------------------------------------------------------------
 *
 * launcher.c
 *	  The launcher: one background worker, registered at server start,
 *	  that starts a relay and a consumer for each database of
 *	  mqtx.database as dynamic background workers, and follows the setting
 *	  on reload.
 *
 * Shaped after PostgreSQL's logical replication launcher: the workers are
 * never restarted by the postmaster (BGW_NEVER_RESTART); the launcher
 * starts them again five seconds after one exits, and not at all while
 * their database has no reason to be served.  So a database that does
 * not exist, or has no CREATE EXTENSION mqtx, costs no process and no
 * worker slot; it is looked at again when a session creates or drops a
 * database or an extension (an object access hook wakes the launcher at
 * commit).  A database that cannot get a worker slot is logged as a
 * WARNING and shown in mqtx.served_databases, and tried again.
 *
 * The launcher connects to no database: pg_database is a shared catalog.
 * Whether a database has the extension only a worker connected to it can
 * tell; one that finds none says so in its slot and exits.
 *
 * On a hot standby the launcher starts too, says once that the workers
 * wait for promotion, and starts them when the server is promoted.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/objectaccess.h"
#include "catalog/pg_database.h"
#include "catalog/pg_extension.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "launcher.h"
#include "shared.h"

/*
 * A worker that exits with an error is started again after this long (the
 * bgw_restart_time the static workers of mqtx 0.6 had).
 */
#define WORKER_RESTART_MS 5000

/* With every worker slot taken, try again this often. */
#define NO_SLOT_RETRY_MS 5000

/*
 * A listed database that does not exist is looked for again this often,
 * besides whenever a session creates one.
 */
#define DATABASE_RECHECK_MS 60000

/*
 * How often to look at workers the launcher did not start (a launcher
 * that restarts finds its predecessor's still running; it has no handle
 * to be told when they exit), and at a standby's promotion.
 */
#define UNWATCHED_POLL_MS 1000
#define STANDBY_POLL_MS 1000

/*
 * The workers of a database that leaves mqtx.database notice at their next
 * pass and exit cleanly; one still running after this long (a handler
 * that takes its time) is sent SIGTERM.
 */
#define RETIRE_GRACE_MS 10000

/* The longest sleep: nothing else is due. */
#define IDLE_MS 60000

static bool relay_enabled = true;
static bool consumer_enabled = true;

static const char *const worker_function[MQTX_NWORKER_KINDS] = {
	"mqtx_relay_main", "mqtx_consumer_main"
};

static object_access_hook_type previous_object_access_hook = NULL;

/* The launcher's view of one worker of a served database */
typedef struct LaunchedWorker
{
	BackgroundWorkerHandle *handle; /* of the worker it started, if running */
	bool		unwatched;		/* running, started by an earlier launcher */
	TimestampTz start_at;		/* when to start it, when not running */
	bool		awaits_extension;	/* it found no extension ... */
	uint32		extension_changes_seen; /* ... as of this count */
	bool		awaits_database;	/* the database does not exist */
	bool		lacks_slot;		/* no background worker slot was free */
} LaunchedWorker;

typedef struct ServedDatabase
{
	LaunchedWorker workers[MQTX_NWORKER_KINDS];
	MqtxServeState logged_state;	/* logged last, or STARTING */
	TimestampTz retired_at;		/* when it left mqtx.database */
	bool		terminated;		/* its workers were sent SIGTERM */
} ServedDatabase;

/* by slot index */
static ServedDatabase served[MQTX_MAX_DATABASES];

/* what one pass allocates: the setting's names, pg_database's */
static MemoryContext pass_context = NULL;

/* the databases that accept connections, read at most once per pass */
static List *connectable_databases = NIL;
static bool connectable_databases_read = false;

static uint32 database_changes_seen = 0;
static bool in_standby_logged = false;

static bool
kind_enabled(MqtxWorkerKind kind)
{
	return kind == MQTX_RELAY ? relay_enabled : consumer_enabled;
}

/*
 * Which workers run at all; PGC_POSTMASTER, so they can only be defined
 * while the library is being preloaded.
 */
void
mqtx_launcher_define_settings(void)
{
	DefineCustomBoolVariable("mqtx.relay_enabled",
							 "Run the relay workers, which publish the outbox.",
							 NULL,
							 &relay_enabled, true,
							 PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("mqtx.consumer_enabled",
							 "Run the consumer workers, which apply subscribed queues.",
							 NULL,
							 &consumer_enabled, true,
							 PGC_POSTMASTER, 0, NULL, NULL, NULL);
}

/*
 * A database or an extension created or dropped may let the launcher
 * serve a database it could not: wake it when the transaction commits.
 * Which extension it is cannot be told here (CREATE EXTENSION calls the
 * hook before its catalog row is visible), and it does not matter: the
 * launcher only looks again.
 */
static void
notice_catalog_change(ObjectAccessType access, Oid classId, Oid objectId,
					  int subId, void *arg)
{
	if (previous_object_access_hook)
		previous_object_access_hook(access, classId, objectId, subId, arg);
	if ((access == OAT_POST_CREATE || access == OAT_DROP) &&
		(classId == DatabaseRelationId || classId == ExtensionRelationId))
		mqtx_wake_launcher_at_commit(classId == DatabaseRelationId);
}

void
mqtx_launcher_install_hooks(void)
{
	previous_object_access_hook = object_access_hook;
	object_access_hook = notice_catalog_change;
}

/*
 * The launcher is registered with the postmaster, which restarts it five
 * seconds after it exits.  It starts on a hot standby too
 * (BgWorkerStart_ConsistentState), only to say that the workers wait.
 */
void
mqtx_launcher_register(void)
{
	BackgroundWorker worker;

	if (!relay_enabled && !consumer_enabled)
		return;
	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_ConsistentState;
	worker.bgw_restart_time = 5;
	strlcpy(worker.bgw_library_name, "mqtx", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "mqtx_launcher_main", BGW_MAXLEN);
	strlcpy(worker.bgw_name, "mqtx launcher", BGW_MAXLEN);
	strlcpy(worker.bgw_type, "mqtx launcher", BGW_MAXLEN);
	RegisterBackgroundWorker(&worker);
}

/*
 * Start the worker of this kind for the database of slot index, carrying
 * the slot's assignment number; false when no worker slot is free.  The
 * handle must outlive the pass, so it lives in TopMemoryContext.
 */
static bool
start_worker(int index, MqtxWorkerKind kind, uint32 assignment,
			 const char *dbname, LaunchedWorker *w)
{
	BackgroundWorker worker;
	MemoryContext old;
	uint32		ignored;
	bool		started;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	strlcpy(worker.bgw_library_name, "mqtx", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, worker_function[kind], BGW_MAXLEN);
	snprintf(worker.bgw_name, BGW_MAXLEN, "mqtx %s for database %s",
			 mqtx_worker_kind_name(kind), dbname);
	snprintf(worker.bgw_type, BGW_MAXLEN, "mqtx %s", mqtx_worker_kind_name(kind));
	worker.bgw_main_arg = Int32GetDatum(index);
	memcpy(worker.bgw_extra, &assignment, sizeof(assignment));
	worker.bgw_notify_pid = MyProcPid;

	/* what an earlier worker said of its exit is not this one's */
	(void) mqtx_slot_take_exit(mqtx_slot(index), kind, &ignored);

	old = MemoryContextSwitchTo(TopMemoryContext);
	started = RegisterDynamicBackgroundWorker(&worker, &w->handle);
	MemoryContextSwitchTo(old);
	if (!started)
		w->handle = NULL;
	return started;
}

/* Is the worker running (or about to), as far as the launcher knows? */
static bool
worker_running(LaunchedWorker *w)
{
	return w->handle != NULL || w->unwatched;
}

/*
 * Notice that the worker has exited, and when it is to start again: after
 * the restart delay, or once a database or extension has changed if it
 * left because this database has no extension.
 */
static void
watch_worker(MqtxSlot *slot, MqtxWorkerKind kind, LaunchedWorker *w,
			 TimestampTz now)
{
	uint32		changes_seen;

	if (w->handle != NULL)
	{
		pid_t		pid;

		switch (GetBackgroundWorkerPid(w->handle, &pid))
		{
			case BGWH_POSTMASTER_DIED:
				proc_exit(1);
				break;
			case BGWH_STOPPED:
				pfree(w->handle);
				w->handle = NULL;
				break;
			default:
				return;
		}
	}
	else if (!w->unwatched)
		return;

	/*
	 * A worker of this kind is in the slot all the same: one an earlier
	 * launcher started, which ours gave way to (mqtx_slot_attach).
	 */
	w->unwatched = mqtx_slot_worker_pid(slot, kind) != 0;
	if (w->unwatched)
		return;

	if (mqtx_slot_take_exit(slot, kind, &changes_seen) == MQTX_EXIT_NO_EXTENSION)
	{
		w->awaits_extension = true;
		w->extension_changes_seen = changes_seen;
		w->start_at = now;
	}
	else
		w->start_at = TimestampTzPlusMilliseconds(now, WORKER_RESTART_MS);
}

/*
 * The databases that exist and accept connections, read from pg_database
 * into the pass's memory.
 */
static List *
read_connectable_databases(void)
{
	MemoryContext pass = CurrentMemoryContext;
	List	   *names = NIL;
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tuple;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while (HeapTupleIsValid(tuple = heap_getnext(scan, ForwardScanDirection)))
	{
		Form_pg_database db = (Form_pg_database) GETSTRUCT(tuple);
		MemoryContext old;

		if (!db->datallowconn)
			continue;
#ifdef DATCONNLIMIT_INVALID_DB
		/* a DROP DATABASE that was interrupted */
		if (db->datconnlimit == DATCONNLIMIT_INVALID_DB)
			continue;
#endif
		old = MemoryContextSwitchTo(pass);
		names = lappend(names, pstrdup(NameStr(db->datname)));
		MemoryContextSwitchTo(old);
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();
	MemoryContextSwitchTo(pass);
	return names;
}

static bool
database_connectable(const char *dbname)
{
	ListCell   *lc;

	if (!connectable_databases_read)
	{
		connectable_databases = read_connectable_databases();
		connectable_databases_read = true;
	}
	foreach(lc, connectable_databases)
		if (strcmp(lfirst(lc), dbname) == 0)
		return true;
	return false;
}

static bool
name_listed(List *names, const char *dbname)
{
	ListCell   *lc;

	foreach(lc, names)
		if (strcmp(lfirst(lc), dbname) == 0)
		return true;
	return false;
}

/* The slot serving dbname (retired ones excepted), or -1. */
static int
slot_serving(const char *dbname)
{
	char		name[NAMEDATALEN];

	for (int i = 0; i < MQTX_MAX_DATABASES; i++)
		if (mqtx_slot_assignment(mqtx_slot(i), name) != 0 &&
			strcmp(name, dbname) == 0)
			return i;
	return -1;
}

/* Whether a retired slot of dbname still waits for its workers to exit. */
static bool
slot_retiring(const char *dbname)
{
	char		name[NAMEDATALEN];

	for (int i = 0; i < MQTX_MAX_DATABASES; i++)
		if (mqtx_slot_in_use(mqtx_slot(i)) &&
			mqtx_slot_assignment(mqtx_slot(i), name) == 0 &&
			strcmp(name, dbname) == 0)
			return true;
	return false;
}

/* A fresh view of a slot's database; now: start its workers at once. */
static void
reset_served(int index, TimestampTz now)
{
	memset(&served[index], 0, sizeof(served[index]));
	served[index].logged_state = MQTX_SERVE_STARTING;
	for (int kind = 0; kind < MQTX_NWORKER_KINDS; kind++)
		served[index].workers[kind].start_at = now;
}

/*
 * Let go of the databases no longer listed (their workers are told to
 * stop; the slot is freed once they have), and give a slot to each newly
 * listed one.  False when a listed database found no free slot, which
 * happens only while retired slots still wait for their workers: the
 * caller tries again on its next pass.
 */
static bool
follow_setting(TimestampTz now)
{
	List	   *names = mqtx_listed_databases();
	ListCell   *lc;
	bool		complete = true;

	for (int i = 0; i < MQTX_MAX_DATABASES; i++)
	{
		MqtxSlot   *slot = mqtx_slot(i);
		char		dbname[NAMEDATALEN];

		if (mqtx_slot_assignment(slot, dbname) == 0 || name_listed(names, dbname))
			continue;
		ereport(LOG,
				(errmsg("mqtx launcher: database \"%s\" is no longer in mqtx.database; stopping its workers",
						dbname)));
		mqtx_slot_retire(slot);
		served[i].retired_at = now;
	}

	foreach(lc, names)
	{
		const char *dbname = lfirst(lc);
		int			free_slot = -1;

		if (slot_serving(dbname) >= 0)
			continue;

		/*
		 * Listed again while its old slot waits for its workers to exit: wait
		 * too, or two relays would publish the same rows.
		 */
		if (slot_retiring(dbname))
		{
			complete = false;
			continue;
		}
		for (int i = 0; i < MQTX_MAX_DATABASES && free_slot < 0; i++)
			if (!mqtx_slot_in_use(mqtx_slot(i)))
				free_slot = i;
		if (free_slot < 0)
		{
			complete = false;
			continue;
		}
		(void) mqtx_slot_assign(mqtx_slot(free_slot), dbname);
		reset_served(free_slot, now);
	}
	return complete;
}

/*
 * After a restart of the launcher alone, the slots still hold what its
 * predecessor assigned, and their workers may still run: keep both, and
 * watch those workers through their slots.
 */
static void
adopt_slots(TimestampTz now)
{
	for (int i = 0; i < MQTX_MAX_DATABASES; i++)
	{
		MqtxSlot   *slot = mqtx_slot(i);

		reset_served(i, now);
		if (!mqtx_slot_in_use(slot))
			continue;
		served[i].retired_at = now;
		for (int kind = 0; kind < MQTX_NWORKER_KINDS; kind++)
			served[i].workers[kind].unwatched = mqtx_slot_worker_pid(slot, kind) != 0;
	}
}

/*
 * A retired slot is freed once its workers have exited; those still
 * running after the grace period are told to stop.
 */
static bool
release_if_stopped(int index, TimestampTz now)
{
	MqtxSlot   *slot = mqtx_slot(index);
	ServedDatabase *db = &served[index];
	bool		stopped = true;
	bool		overdue = !db->terminated &&
	now >= TimestampTzPlusMilliseconds(db->retired_at, RETIRE_GRACE_MS);

	for (int kind = 0; kind < MQTX_NWORKER_KINDS; kind++)
	{
		LaunchedWorker *w = &db->workers[kind];

		pid_t		pid;

		watch_worker(slot, kind, w, now);
		pid = mqtx_slot_worker_pid(slot, kind);
		if (!worker_running(w) && pid == 0)
			continue;
		stopped = false;
		if (overdue && w->handle != NULL)
			TerminateBackgroundWorker(w->handle);
		else if (overdue && pid > 0)
			(void) kill(pid, SIGTERM);
	}
	db->terminated |= overdue;
	if (stopped)
		mqtx_slot_release(slot);
	return stopped;
}

static long
ms_until(TimestampTz now, TimestampTz then)
{
	return Max(1, TimestampDifferenceMilliseconds(now, then));
}

/*
 * Start what is due of one database's workers; lower *timeout to when
 * the next one is.
 */
static void
start_due_workers(int index, uint32 assignment, const char *dbname,
				  bool databases_changed, TimestampTz now, long *timeout)
{
	MqtxSlot   *slot = mqtx_slot(index);

	for (int kind = 0; kind < MQTX_NWORKER_KINDS; kind++)
	{
		LaunchedWorker *w = &served[index].workers[kind];

		if (!kind_enabled(kind))
			continue;
		watch_worker(slot, kind, w, now);
		if (worker_running(w))
		{
			if (w->unwatched)
				*timeout = Min(*timeout, UNWATCHED_POLL_MS);
			continue;
		}
		if (w->awaits_extension &&
			mqtx_slot_extension_changes(slot) == w->extension_changes_seen)
			continue;
		if (w->awaits_database && databases_changed)
			w->start_at = now;
		/* one that an earlier launcher started, ours gave way to */
		if (mqtx_slot_worker_pid(slot, kind) != 0)
		{
			w->unwatched = true;
			continue;
		}
		if (now < w->start_at)
		{
			*timeout = Min(*timeout, ms_until(now, w->start_at));
			continue;
		}

		w->awaits_database = !database_connectable(dbname);
		if (w->awaits_database)
		{
			w->start_at = TimestampTzPlusMilliseconds(now, DATABASE_RECHECK_MS);
			*timeout = Min(*timeout, DATABASE_RECHECK_MS);
			continue;
		}
		w->awaits_extension = false;
		w->lacks_slot = !start_worker(index, kind, assignment, dbname, w);
		if (w->lacks_slot)
		{
			w->start_at = TimestampTzPlusMilliseconds(now, NO_SLOT_RETRY_MS);
			*timeout = Min(*timeout, NO_SLOT_RETRY_MS);
		}
	}
}

/* What the launcher makes of a database now, and a detail for the view. */
static MqtxServeState
database_state(int index, char *detail, size_t detail_size)
{
	MqtxServeState state = MQTX_SERVE_SERVING;

	detail[0] = '\0';
	for (int kind = 0; kind < MQTX_NWORKER_KINDS; kind++)
	{
		LaunchedWorker *w = &served[index].workers[kind];

		if (!kind_enabled(kind))
			continue;
		if (w->lacks_slot)
		{
			snprintf(detail, detail_size, "no background worker slot for the %s",
					 mqtx_worker_kind_name(kind));
			return MQTX_SERVE_NO_WORKER_SLOT;
		}
		if (w->awaits_database)
			state = MQTX_SERVE_NO_DATABASE;
		else if (w->awaits_extension && state == MQTX_SERVE_SERVING)
			state = MQTX_SERVE_NO_EXTENSION;
		else if (state == MQTX_SERVE_SERVING &&
				 (!worker_running(w) || !mqtx_slot_extension_found(mqtx_slot(index), kind)))
			state = MQTX_SERVE_STARTING;
	}
	return state;
}

/*
 * One log line per change of what a database lacks, and one when the
 * WARNING of a missing worker slot is over; none for starting and
 * serving, which the workers' own lines tell (and a database that has
 * just been created is "serving" only until its workers find no
 * extension).
 */
static void
log_state(int index, const char *dbname, MqtxServeState state, const char *detail)
{
	ServedDatabase *db = &served[index];

	if (state == MQTX_SERVE_STARTING || state == db->logged_state)
		return;
	if (state == MQTX_SERVE_SERVING && db->logged_state != MQTX_SERVE_NO_WORKER_SLOT)
	{
		db->logged_state = state;
		return;
	}

	switch (state)
	{
		case MQTX_SERVE_NO_DATABASE:
			ereport(LOG,
					(errmsg("mqtx launcher: database \"%s\" of mqtx.database does not exist or does not accept connections; it gets workers once it does",
							dbname)));
			break;
		case MQTX_SERVE_NO_EXTENSION:
			ereport(LOG,
					(errmsg("mqtx launcher: database \"%s\" has no extension mqtx; its workers start after CREATE EXTENSION mqtx there",
							dbname)));
			break;
		case MQTX_SERVE_NO_WORKER_SLOT:
			ereport(WARNING,
					(errmsg("mqtx launcher: database \"%s\" is not served: %s",
							dbname, detail),
					 errdetail("All %d background worker slots (max_worker_processes) are taken.",
							   max_worker_processes),
					 errhint("Raise max_worker_processes (it takes a restart) or serve fewer databases; the launcher keeps trying.")));
			break;
		case MQTX_SERVE_SERVING:
			ereport(LOG,
					(errmsg("mqtx launcher: database \"%s\" has its workers now", dbname)));
			break;
		default:
			break;
	}
	db->logged_state = state;
}

/*
 * One pass over the slots: free the retired ones whose workers are gone,
 * start what is due; returns how long to sleep.
 */
static long
serve_databases(TimestampTz now)
{
	long		timeout = IDLE_MS;
	uint32		database_changes = mqtx_database_changes();
	bool		databases_changed = database_changes != database_changes_seen;

	connectable_databases_read = false;
	for (int i = 0; i < MQTX_MAX_DATABASES; i++)
	{
		MqtxSlot   *slot = mqtx_slot(i);
		char		dbname[NAMEDATALEN];
		char		detail[128];
		uint32		assignment;
		MqtxServeState state;

		if (!mqtx_slot_in_use(slot))
			continue;
		assignment = mqtx_slot_assignment(slot, dbname);
		if (assignment == 0)
		{
			if (!release_if_stopped(i, now))
				timeout = Min(timeout, UNWATCHED_POLL_MS);
			continue;
		}
		start_due_workers(i, assignment, dbname, databases_changed, now, &timeout);
		state = database_state(i, detail, sizeof(detail));
		mqtx_slot_set_state(slot, state, detail);
		log_state(i, dbname, state, detail);
	}
	database_changes_seen = database_changes;
	return timeout;
}

/*
 * On a standby: say so once, show it in the view, and look again soon.
 * The workers' statements write; they wait for the promotion.
 */
/* whether this launcher has opened mqtx.cancel's claim horizon */
static bool claim_horizon_opened = false;

static bool
wait_for_promotion(void)
{
	if (!RecoveryInProgress())
	{
		if (in_standby_logged)
			ereport(LOG,
					(errmsg("mqtx launcher: the server was promoted; starting the workers")));
		in_standby_logged = false;
		if (!claim_horizon_opened)
			mqtx_open_claim_horizon();
		claim_horizon_opened = true;
		return false;
	}
	if (!in_standby_logged)
		ereport(LOG,
				(errmsg("mqtx launcher: this server is a standby; the mqtx workers start when it is promoted")));
	in_standby_logged = true;
	for (int i = 0; i < MQTX_MAX_DATABASES; i++)
		if (mqtx_slot_assignment(mqtx_slot(i), NULL) != 0)
			mqtx_slot_set_state(mqtx_slot(i), MQTX_SERVE_STANDBY, "");
	return true;
}

/*
 * On reload, look again at every database without the extension: the
 * commit of a prepared CREATE EXTENSION (COMMIT PREPARED) wakes nobody.
 */
static void
look_again(void)
{
	for (int i = 0; i < MQTX_MAX_DATABASES; i++)
		for (int kind = 0; kind < MQTX_NWORKER_KINDS; kind++)
			served[i].workers[kind].awaits_extension = false;
}

static void
launcher_exit(int code, Datum arg)
{
	mqtx_set_launcher_latch(NULL);
}

/*
 * Entry point of the launcher.  Errors end it; the postmaster starts a
 * new one after five seconds, which takes over the slots (adopt_slots).
 */
void
mqtx_launcher_main(Datum main_arg)
{
	bool		setting_followed;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	/* no database: pg_database is all it reads */
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pass_context = AllocSetContextCreate(TopMemoryContext, "mqtx launcher pass",
										 ALLOCSET_DEFAULT_SIZES);
	MemoryContextSwitchTo(pass_context);
	mqtx_set_launcher_latch(MyLatch);
	before_shmem_exit(launcher_exit, 0);

	adopt_slots(GetCurrentTimestamp());
	setting_followed = follow_setting(GetCurrentTimestamp());
	for (;;)
	{
		long		timeout;

		CHECK_FOR_INTERRUPTS();
		MemoryContextReset(pass_context);
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			setting_followed = false;
			look_again();
		}
		if (!setting_followed)
			setting_followed = follow_setting(GetCurrentTimestamp());

		if (wait_for_promotion())
			timeout = STANDBY_POLL_MS;
		else
			timeout = serve_databases(GetCurrentTimestamp());
		if (!setting_followed)
			timeout = Min(timeout, UNWATCHED_POLL_MS);

		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
