/*-------------------------------------------------------------------------
 *
 * relay.h
 *	  The relay worker (relay.c), which publishes the outbox.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTX_RELAY_H
#define MQTX_RELAY_H

#include "fmgr.h"

extern void mqtx_relay_define_settings(void);
extern PGDLLEXPORT void mqtx_relay_main(Datum main_arg);

#endif							/* MQTX_RELAY_H */
