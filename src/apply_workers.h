/*-------------------------------------------------------------------------
 *
 * apply_workers.h
 *	  The consumer's apply workers (apply_workers.c): started, watched,
 *	  woken and stopped by the consumer of their database.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTX_APPLY_WORKERS_H
#define MQTX_APPLY_WORKERS_H

#include "postgres.h"

#include "shared.h"

/* What an apply worker is told in bgw_extra: the assignment comes first, as for the others */
typedef struct MqtxApplyWorkerExtra
{
	uint32		assignment;		/* its slot's, when the consumer started it */
	pid_t		consumer_pid;	/* the consumer that started it */
	int			number;			/* 0 .. count - 1 */
} MqtxApplyWorkerExtra;

extern void mqtx_apply_workers_follow(int count, uint32 assignment);
extern void mqtx_apply_workers_wake(void);
extern void mqtx_apply_workers_stop(void);
extern int	mqtx_apply_workers_running(int *numbers);

/* an apply worker's own */
extern void mqtx_apply_worker_take_place(MqtxSlot *slot, int number);

#endif							/* MQTX_APPLY_WORKERS_H */
