/*-------------------------------------------------------------------------
 *
 * mqtx.h
 *	  Declarations shared by the parts of mqtx: settings, the outbox SQL
 *	  surface, the broker connection and the log redaction.
 *
 * Nothing here mentions rabbitmq-c: only broker.c includes its headers.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTX_H
#define MQTX_H

#include "utils/jsonb.h"

/* AMQP 0-9-1 "shortstr": exchange names, routing keys, header keys */
#define MQTX_SHORTSTR_MAX 255

/* Settings (mqtx.c) */
extern char *mqtx_broker_url;
extern char *mqtx_databases;
extern int	mqtx_max_payload;

/* Broker connection (broker.c) */
extern bool mqtx_broker_url_is_valid(const char *url, char **reason);
extern bool mqtx_headers_are_valid(Jsonb *headers, char **reason);

/* Log redaction (log_redact.c) */
extern void mqtx_install_log_redaction(void);
extern char *mqtx_redact_secrets(const char *text);

#endif							/* MQTX_H */
