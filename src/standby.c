/*-------------------------------------------------------------------------
 *
 * standby.c
 *	  How far the streaming standbys have flushed this server's WAL, read
 *	  from the walsenders' shared memory as synchronous replication reads
 *	  it (syncrep.c), without a transaction or a lock held for long.
 *
 * Only physical standbys count: a logical walsender's flush position says
 * what a subscriber has applied of a publication, not that a server that
 * could be promoted has this WAL.  PostgreSQL 16 records the kind of each
 * walsender; before it, a physical walsender is the one connected to no
 * database.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xlog.h"
#include "access/xlog_internal.h"
#include "access/xlogdefs.h"
#include "replication/walsender.h"
#include "replication/walsender_private.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "storage/spin.h"

#include "standby.h"

static bool
is_physical(const WalSnd *walsnd, pid_t pid)
{
#if PG_VERSION_NUM >= 160000
	return walsnd->kind == REPLICATION_KIND_PHYSICAL;
#else
	PGPROC	   *proc = BackendPidGetProc(pid);

	return proc != NULL && !OidIsValid(proc->databaseId);
#endif
}

/*
 * The end of the WAL inserted so far, as a position XLogFlush accepts.
 * GetXLogInsertRecPtr() points where the next record would start: on a
 * fresh page, past its header, where nothing has been written yet; the
 * WAL inserted so far ends at the page's start then.
 */
XLogRecPtr
mqtx_wal_inserted_end(void)
{
	XLogRecPtr	next = GetXLogInsertRecPtr();
	uint32		page_offset = next % XLOG_BLCKSZ;
	bool		segment_start = XLogSegmentOffset(next, wal_segment_size) < XLOG_BLCKSZ;

	if (page_offset == (segment_start ? SizeOfXLogLongPHD : SizeOfXLogShortPHD))
		return next - page_offset;
	return next;
}

XLogRecPtr
mqtx_standby_flush_position(int *standbys)
{
	XLogRecPtr	furthest = InvalidXLogRecPtr;

	*standbys = 0;
	if (WalSndCtl == NULL)
		return InvalidXLogRecPtr;
	for (int i = 0; i < max_wal_senders; i++)
	{
		WalSnd	   *walsnd = &WalSndCtl->walsnds[i];
		pid_t		pid;
		WalSndState state;
		XLogRecPtr	flush;

		SpinLockAcquire(&walsnd->mutex);
		pid = walsnd->pid;
		state = walsnd->state;
		flush = walsnd->flush;
		SpinLockRelease(&walsnd->mutex);

		if (pid == 0 || state != WALSNDSTATE_STREAMING || XLogRecPtrIsInvalid(flush) ||
			!is_physical(walsnd, pid))
			continue;
		(*standbys)++;
		if (flush > furthest)
			furthest = flush;
	}
	return furthest;
}
