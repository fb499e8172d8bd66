/*-------------------------------------------------------------------------
 *
 * shared.h
 *	  Shared memory (shared.c): one slot per served database, with the
 *	  workers' latches, broker states and counters, and the commit-time
 *	  wake-ups that sessions give the workers.
 *
 * A slot's layout is private to shared.c: the workers and the SQL
 * functions reach it only through these calls, which take its spinlock
 * where they must.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTX_SHARED_H
#define MQTX_SHARED_H

/* mqtx.database lists at most this many databases: one slot each */
#define MQTX_MAX_DATABASES 64

/* room for a broker node as "amqps://host:port" (host: an AMQP shortstr) */
#define MQTX_BROKER_ADDRESS_LEN 300

typedef enum MqtxWorkerKind
{
	MQTX_RELAY,
	MQTX_CONSUMER,
	MQTX_NWORKER_KINDS
} MqtxWorkerKind;

/* what mqtx.relay_stats() and mqtx.consumer_stats() show, in their order */
typedef enum MqtxCounter
{
	MQTX_RELAY_PUBLISHED,
	MQTX_RELAY_NACKED,
	MQTX_RELAY_RETURNED,
	MQTX_RELAY_RETRIED,
	MQTX_RELAY_FAILED,
	MQTX_RELAY_RECONNECTS,
	MQTX_CONSUMER_CONSUMED,
	MQTX_CONSUMER_APPLIED,
	MQTX_CONSUMER_DUPLICATES,
	MQTX_CONSUMER_RETRIED,
	MQTX_CONSUMER_DEAD_LETTERED,
	MQTX_CONSUMER_RECONNECTS,
	MQTX_NCOUNTERS
} MqtxCounter;

typedef struct MqtxSlot MqtxSlot;

/* from _PG_init: mqtx.database, the hooks and the commit callbacks */
extern void mqtx_shared_init(void);

/* the served databases, known in the postmaster before shared memory is */
extern int	mqtx_served_database_count(void);
extern const char *mqtx_served_database(int index);

extern const char *mqtx_worker_kind_name(MqtxWorkerKind kind);
extern MqtxSlot *mqtx_slot(int index);
extern const char *mqtx_slot_dbname(MqtxSlot *slot);
extern void mqtx_slot_attach(MqtxSlot *slot, MqtxWorkerKind kind, Oid dboid);
extern void mqtx_slot_detach(MqtxSlot *slot, MqtxWorkerKind kind);
extern void mqtx_slot_set_connected(MqtxSlot *slot, MqtxWorkerKind kind,
									const char *broker_address);
extern void mqtx_slot_set_blocked(MqtxSlot *slot, MqtxWorkerKind kind,
								  bool blocked);
extern uint32 mqtx_slot_topology_generation(MqtxSlot *slot);
extern void mqtx_count(MqtxSlot *slot, MqtxCounter counter, uint64 n);

/* the session's open transaction enqueued a message: wake the relay at commit */
extern void mqtx_wake_relay_at_commit(void);

#endif							/* MQTX_SHARED_H */
