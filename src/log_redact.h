/*-------------------------------------------------------------------------
 *
 * log_redact.h
 *	  Keeping the broker password out of the server log and of what
 *	  sessions can read (log_redact.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTX_LOG_REDACT_H
#define MQTX_LOG_REDACT_H

extern void mqtx_install_log_redaction(void);
extern void mqtx_check_statement_masking(void);
extern char *mqtx_redact_secrets(const char *input);
extern bool mqtx_starts_next_url(const char *p);

#endif							/* MQTX_LOG_REDACT_H */
