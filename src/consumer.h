/*-------------------------------------------------------------------------
 *
 * consumer.h
 *	  The consumer worker (consumer.c), which applies subscribed queues.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTX_CONSUMER_H
#define MQTX_CONSUMER_H

#include "fmgr.h"

extern void mqtx_consumer_define_settings(void);
extern PGDLLEXPORT void mqtx_consumer_main(Datum main_arg);
extern PGDLLEXPORT void mqtx_apply_worker_main(Datum main_arg);

#endif							/* MQTX_CONSUMER_H */
