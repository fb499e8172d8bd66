/*-------------------------------------------------------------------------
 *
 * shared.h
 *	  Shared memory (shared.c): one slot per served database, with the
 *	  workers' latches, broker states and counters, and the commit-time
 *	  wake-ups that sessions give the workers and the launcher.
 *
 * A slot's layout is private to shared.c: the workers and the SQL
 * functions reach it only through these calls, which take its spinlock
 * where they must.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTX_SHARED_H
#define MQTX_SHARED_H

#include "datatype/timestamp.h"
#include "nodes/pg_list.h"
#include "storage/latch.h"

/* mqtx.database lists at most this many databases: one slot each */
#define MQTX_MAX_DATABASES 64

/* a consumer runs at most this many apply workers (mqtx.subscriptions.workers) */
#define MQTX_MAX_APPLY_WORKERS 64

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

/* what the launcher made of a database, in mqtx.served_databases */
typedef enum MqtxServeState
{
	MQTX_SERVE_STARTING,
	MQTX_SERVE_SERVING,
	MQTX_SERVE_STANDBY,
	MQTX_SERVE_NO_DATABASE,
	MQTX_SERVE_NO_EXTENSION,
	MQTX_SERVE_NO_WORKER_SLOT,
	MQTX_SERVE_STOPPING
} MqtxServeState;

/* why a worker left, as it tells the launcher */
typedef enum MqtxWorkerExit
{
	MQTX_EXIT_UNKNOWN,			/* an error, a signal: start it again later */
	MQTX_EXIT_NO_EXTENSION		/* wait for CREATE EXTENSION mqtx */
} MqtxWorkerExit;

typedef struct MqtxSlot MqtxSlot;

/* from _PG_init: mqtx.database, the hooks and the commit callbacks */
extern void mqtx_shared_init(void);

/* the databases mqtx.database lists now, in the current memory context */
extern List *mqtx_listed_databases(void);

extern const char *mqtx_worker_kind_name(MqtxWorkerKind kind);
extern MqtxSlot *mqtx_slot(int index);
extern const char *mqtx_slot_dbname(MqtxSlot *slot);

/* the launcher's side of a slot */
extern uint32 mqtx_slot_assignment(MqtxSlot *slot, char *dbname);
extern uint32 mqtx_slot_assign(MqtxSlot *slot, const char *dbname);
extern void mqtx_slot_retire(MqtxSlot *slot);
extern void mqtx_slot_release(MqtxSlot *slot);
extern bool mqtx_slot_in_use(MqtxSlot *slot);
extern void mqtx_slot_set_state(MqtxSlot *slot, MqtxServeState state,
								const char *detail);
extern pid_t mqtx_slot_worker_pid(MqtxSlot *slot, MqtxWorkerKind kind);
extern MqtxWorkerExit mqtx_slot_take_exit(MqtxSlot *slot, MqtxWorkerKind kind,
										  uint32 *extension_changes_seen);
extern bool mqtx_slot_extension_found(MqtxSlot *slot, MqtxWorkerKind kind);
extern uint32 mqtx_database_changes(void);
extern uint32 mqtx_slot_extension_changes(MqtxSlot *slot);
extern void mqtx_set_launcher_latch(Latch *latch);

/* a worker's side */
extern bool mqtx_slot_attach(MqtxSlot *slot, MqtxWorkerKind kind,
							 uint32 assignment, Oid dboid);
extern void mqtx_slot_note_exit(MqtxSlot *slot, MqtxWorkerKind kind,
								MqtxWorkerExit reason, uint32 extension_changes_seen);
extern void mqtx_slot_note_extension_found(MqtxSlot *slot, MqtxWorkerKind kind);
extern void mqtx_slot_detach(MqtxSlot *slot, MqtxWorkerKind kind);
extern void mqtx_slot_set_connected(MqtxSlot *slot, MqtxWorkerKind kind,
									const char *broker_address);
extern void mqtx_slot_set_blocked(MqtxSlot *slot, MqtxWorkerKind kind,
								  bool blocked);
extern uint32 mqtx_slot_topology_generation(MqtxSlot *slot);
extern bool mqtx_slot_take_apply_place(MqtxSlot *slot, int number);
extern void mqtx_slot_leave_apply_place(MqtxSlot *slot, int number);
extern void mqtx_count(MqtxSlot *slot, MqtxCounter counter, uint64 n);

/* the claim horizon: what a relay may have taken, for mqtx.cancel */
extern void mqtx_note_claim(TimestampTz claim_now);
extern TimestampTz mqtx_claim_horizon(void);
extern void mqtx_open_claim_horizon(void);

/* the session's open transaction enqueued a message: wake the relay at commit */
extern void mqtx_wake_relay_at_commit(void);

/* it created or dropped a database or an extension: wake the launcher */
extern void mqtx_wake_launcher_at_commit(bool database);

#endif							/* MQTX_SHARED_H */
