/*-------------------------------------------------------------------------
 *
 * apply_workers.c
 *	  The pool of apply workers a consumer runs for its subscriptions with
 *	  workers > 1: started as dynamic background workers, started again
 *	  when one exits, woken when there is work, stopped with the consumer.
 *
 * The consumer needs as many as the largest workers of its subscriptions;
 * worker number i applies, of every such subscription, the keys that hash
 * to i (consumer.c).  They are the consumer's own: it registers them with
 * itself as bgw_notify_pid, so that its latch is set when one starts or
 * stops, and each of them exits once the consumer that started it is no
 * longer its database's consumer.  A worker that exits is started again
 * after APPLY_RESTART_MS: what it was applying is still in mqtx.parked.
 * When max_worker_processes leaves no room, that is said once, and the
 * start is tried again every APPLY_NO_SLOT_RETRY_MS; meanwhile the
 * messages of the keys it would apply wait in mqtx.parked.
 *
 * Worker number n of a database is one process at a time: each takes its
 * place in the slot (mqtx_apply_worker_take_place) for its life, and one
 * started while its predecessor is still on its way out waits for it.  Its
 * crash record (crash_guard.c) is then its own, and so is what it applies.
 * The place is in shared memory, not a session lock: the workers release
 * every session lock a handler may have left (identity.c).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "apply_workers.h"
#include "shared.h"

#define APPLY_RESTART_MS 1000

/* how often a worker looks whether its place is free */
#define APPLY_PLACE_WAIT_MS 100
#define APPLY_NO_SLOT_RETRY_MS 10000

typedef struct ApplyWorker
{
	BackgroundWorkerHandle *handle; /* in TopMemoryContext; NULL: not running */
	TimestampTz start_at;		/* not before */
} ApplyWorker;

static ApplyWorker pool[MQTX_MAX_APPLY_WORKERS];
static bool said_no_slot = false;
static int	apply_place_number = -1;	/* this apply worker's */
static bool stop_registered = false;

static void
stop_at_exit(int code, Datum arg)
{
	mqtx_apply_workers_stop();
}

static void
start_apply_worker(int number, uint32 assignment)
{
	BackgroundWorker worker;
	MqtxApplyWorkerExtra extra = {assignment, MyProcPid, number};
	int			slot_index = DatumGetInt32(MyBgworkerEntry->bgw_main_arg);
	MemoryContext old;
	bool		started;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	strlcpy(worker.bgw_library_name, "mqtx", BGW_MAXLEN);
	strlcpy(worker.bgw_function_name, "mqtx_apply_worker_main", BGW_MAXLEN);
	snprintf(worker.bgw_name, BGW_MAXLEN, "mqtx apply worker %d for database %s",
			 number, mqtx_slot_dbname(mqtx_slot(slot_index)));
	strlcpy(worker.bgw_type, "mqtx apply worker", BGW_MAXLEN);
	worker.bgw_main_arg = Int32GetDatum(slot_index);
	StaticAssertStmt(sizeof(extra) <= BGW_EXTRALEN, "apply worker's extra does not fit");
	memcpy(worker.bgw_extra, &extra, sizeof(extra));
	worker.bgw_notify_pid = MyProcPid;

	old = MemoryContextSwitchTo(TopMemoryContext);
	started = RegisterDynamicBackgroundWorker(&worker, &pool[number].handle);
	MemoryContextSwitchTo(old);
	if (started)
	{
		said_no_slot = false;
		return;
	}
	pool[number].handle = NULL;
	pool[number].start_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
														APPLY_NO_SLOT_RETRY_MS);
	if (!said_no_slot)
		ereport(WARNING,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("mqtx consumer: could not start apply worker %d: no background worker slot is free",
						number),
				 errdetail("The messages of the keys it applies wait in mqtx.parked until it starts; the consumer tries again every %d seconds.",
						   APPLY_NO_SLOT_RETRY_MS / 1000),
				 errhint("Raise max_worker_processes, or lower the workers of the subscriptions.")));
	said_no_slot = true;
}

/* Has the worker of this number exited?  (Its handle is then let go.) */
static bool
has_exited(ApplyWorker *w)
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
			return true;
		default:
			break;
	}
	return false;
}

/*
 * Run apply workers 0 .. count - 1, and no others: start those not
 * running (a worker that exited, after APPLY_RESTART_MS), stop those
 * beyond count.  Called on every turn of the consumer's loop.
 */
void
mqtx_apply_workers_follow(int count, uint32 assignment)
{
	TimestampTz now = GetCurrentTimestamp();

	if (!stop_registered)
	{
		before_shmem_exit(stop_at_exit, 0);
		stop_registered = true;
	}
	for (int i = 0; i < MQTX_MAX_APPLY_WORKERS; i++)
	{
		ApplyWorker *w = &pool[i];

		if (w->handle != NULL && i >= count)
		{
			TerminateBackgroundWorker(w->handle);
			pfree(w->handle);
			w->handle = NULL;
		}
		if (i >= count)
			continue;
		if (w->handle != NULL && has_exited(w))
			w->start_at = TimestampTzPlusMilliseconds(now, APPLY_RESTART_MS);
		if (w->handle == NULL && now >= w->start_at)
			start_apply_worker(i, assignment);
	}
}

/*
 * Wake the apply workers: the consumer parked messages for them.  A latch
 * found by a pid that has been reused since is another process's, which
 * only wakes up once for nothing.
 */
void
mqtx_apply_workers_wake(void)
{
	for (int i = 0; i < MQTX_MAX_APPLY_WORKERS; i++)
	{
		pid_t		pid;
		PGPROC	   *proc;

		if (pool[i].handle == NULL ||
			GetBackgroundWorkerPid(pool[i].handle, &pid) != BGWH_STARTED)
			continue;
		proc = BackendPidGetProc(pid);
		if (proc != NULL)
			SetLatch(&proc->procLatch);
	}
}

/*
 * The numbers of the apply workers that run, or are about to, into
 * numbers (room for MQTX_MAX_APPLY_WORKERS); returns how many.
 */
int
mqtx_apply_workers_running(int *numbers)
{
	int			count = 0;

	for (int i = 0; i < MQTX_MAX_APPLY_WORKERS; i++)
	{
		pid_t		pid;

		if (pool[i].handle != NULL &&
			GetBackgroundWorkerPid(pool[i].handle, &pid) != BGWH_STOPPED)
			numbers[count++] = i;
	}
	return count;
}

static void
leave_place(int code, Datum arg)
{
	mqtx_slot_leave_apply_place((MqtxSlot *) DatumGetPointer(arg), apply_place_number);
}

/*
 * An apply worker takes its place, number, in its slot: waiting, if need
 * be, for the one before it to exit.  Kept until this process exits.
 */
void
mqtx_apply_worker_take_place(MqtxSlot *slot, int number)
{
	apply_place_number = number;
	on_shmem_exit(leave_place, PointerGetDatum(slot));
	while (!mqtx_slot_take_apply_place(slot, number))
	{
		pgstat_report_activity(STATE_RUNNING, "mqtx apply worker: waiting for the one before to exit");
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 APPLY_PLACE_WAIT_MS, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
	pgstat_report_activity(STATE_IDLE, NULL);
}

/* Stop them all: the consumer exits, or has nothing for them. */
void
mqtx_apply_workers_stop(void)
{
	for (int i = 0; i < MQTX_MAX_APPLY_WORKERS; i++)
		if (pool[i].handle != NULL)
		{
			TerminateBackgroundWorker(pool[i].handle);
			pfree(pool[i].handle);
			pool[i].handle = NULL;
		}
}
