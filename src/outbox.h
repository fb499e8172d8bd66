/*-------------------------------------------------------------------------
 *
 * outbox.h
 *	  The outbox's SQL surface (outbox.c): mqtx.publish(), the outbox
 *	  trigger and message ids.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTX_OUTBOX_H
#define MQTX_OUTBOX_H

/* the largest message body accepted, as JSON text; the workers check it too */
extern int	mqtx_max_payload;

extern void mqtx_outbox_define_settings(void);

#endif							/* MQTX_OUTBOX_H */
