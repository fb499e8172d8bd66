/*-------------------------------------------------------------------------
 *
 * message_context.h
 *	  What a message carries from the one that caused it (message_context.c):
 *	  correlation, causation and W3C trace context.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTX_MESSAGE_CONTEXT_H
#define MQTX_MESSAGE_CONTEXT_H

#include "utils/jsonb.h"

/* The W3C trace context headers, as OpenTelemetry's AMQP propagators name them */
#define MQTX_TRACEPARENT_HEADER "traceparent"
#define MQTX_TRACESTATE_HEADER "tracestate"

extern void mqtx_message_context_define_settings(void);

/* consumer: the message whose handler runs now, and its trace context */
extern void mqtx_enter_handled_message(const char *message_id, const char *correlation_id);
extern void mqtx_leave_handled_message(void);
extern void mqtx_make_trace_context_current(Jsonb *headers);

/* outbox: a new message's headers with the context it inherits */
extern Jsonb *mqtx_headers_with_context(Jsonb *headers, text *correlation_id,
										text *causation_id);

#endif							/* MQTX_MESSAGE_CONTEXT_H */
