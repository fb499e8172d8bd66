/*-------------------------------------------------------------------------
 *
 * standby.h
 *	  How far the server's streaming standbys have flushed its WAL
 *	  (standby.c), for mqtx.wait_for_standby.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTX_STANDBY_H
#define MQTX_STANDBY_H

#include "access/xlogdefs.h"

/*
 * The furthest WAL position a streaming physical standby has flushed, and
 * (standbys) how many stream; InvalidXLogRecPtr when none has said.
 */
extern XLogRecPtr mqtx_standby_flush_position(int *standbys);

/* the end of the WAL inserted so far (GetXLogInsertRecPtr, made flushable) */
extern XLogRecPtr mqtx_wal_inserted_end(void);

#endif							/* MQTX_STANDBY_H */
