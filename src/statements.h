/*-------------------------------------------------------------------------
 *
 * statements.h
 *	  Statements whose plans are kept for the life of the process
 *	  (statements.c), for the workers and the outbox's enqueueing.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTX_STATEMENTS_H
#define MQTX_STATEMENTS_H

#include "executor/spi.h"

extern int	mqtx_execute_prepared(SPIPlanPtr *plan, const char *sql, int nargs,
								  Oid *argtypes, Datum *args, const char *nulls);

#endif							/* MQTX_STATEMENTS_H */
