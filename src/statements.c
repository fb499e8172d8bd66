/*-------------------------------------------------------------------------
 *
 * statements.c
 *	  Statements whose plans are kept for the life of the process.
 *
 * The outbox's enqueueing and the workers share this: a session that
 * enqueues thousands of messages, or a worker that runs a handful of
 * statements for months, should parse and plan each of them once.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "executor/spi.h"

#include "statements.h"

/*
 * Run a statement through a plan prepared on first use and kept for the
 * life of the process: the workers, and the outbox's enqueueing, run the
 * same few statements over and over, and parsing and planning them again
 * each time was a large share of their CPU.  The plan cache replans after
 * DDL on the tables involved.  Needs an SPI connection.
 */
int
mqtx_execute_prepared(SPIPlanPtr *plan, const char *sql, int nargs,
					  Oid *argtypes, Datum *args, const char *nulls)
{
	if (*plan == NULL)
	{
		SPIPlanPtr	prepared = SPI_prepare(sql, nargs, argtypes);

		if (prepared == NULL)
			elog(ERROR, "SPI_prepare failed: %s",
				 SPI_result_code_string(SPI_result));
		if (SPI_keepplan(prepared) != 0)
			elog(ERROR, "SPI_keepplan failed");
		*plan = prepared;
	}
	return SPI_execute_plan(*plan, args, nulls, false, 0);
}
