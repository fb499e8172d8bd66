/*-------------------------------------------------------------------------
 *
 * crash_guard.h
 *	  The consumer's memory of its own deaths (crash_guard.c): a delivery
 *	  that kills consumers again and again is quarantined, not retried.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTX_CRASH_GUARD_H
#define MQTX_CRASH_GUARD_H

#define MQTX_DEATHS_BEFORE_QUARANTINE 2

typedef struct MqtxCrashRecord
{
	bool		died_applying;	/* the previous consumer died in a batch */
	int			deliveries;		/* of that many deliveries */
	int			deaths;			/* for one: consumers that died on it before */
	char	   *digest;			/* for one: which (mqtx_crash_guard_digest) */
	char	   *queue;			/* and, for the log, its queue and key */
	char	   *key;
} MqtxCrashRecord;

extern const MqtxCrashRecord *mqtx_crash_guard_open(const char *process);
extern char *mqtx_crash_guard_digest(const char *queue, const char *key);
extern void mqtx_crash_guard_applying(int deliveries, const char *queue,
									  const char *key, int deaths);
extern void mqtx_crash_guard_idle(void);

#endif							/* MQTX_CRASH_GUARD_H */
