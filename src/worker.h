/*-------------------------------------------------------------------------
 *
 * worker.h
 *	  What the relay and the consumer share (worker.c): the start and
 *	  the steps of a worker's loop, its broker connection and
 *	  topology, what the broker refused, waiting, and retention.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTX_WORKER_H
#define MQTX_WORKER_H

#include "nodes/pg_list.h"

#include "broker.h"
#include "shared.h"

/* Settings both workers read (defined by mqtx_worker_define_settings) */
extern int	mqtx_batch_size;
extern int	mqtx_batch_max_bytes;
extern int	mqtx_poll_interval;
extern int	mqtx_retry_base;
extern int	mqtx_retry_max;

/* The oldest version of the SQL objects the consumer's statements work with */
#define MQTX_CONSUMER_SCHEMA_VERSION "0.10.0"

typedef enum MqtxBrokerState
{
	MQTX_BROKER_UNKNOWN,
	MQTX_BROKER_UP,
	MQTX_BROKER_DOWN
} MqtxBrokerState;

typedef struct MqtxWorker
{
	MqtxWorkerKind kind;
	const char *role;			/* "relay", "consumer" or "apply worker", for
								 * log lines */
	MqtxSlot   *slot;
	uint32		assignment;		/* the slot's, when the launcher started us */
	MemoryContext context;		/* where each step returns; the worker may
								 * switch it */
	BrokerConnection *conn;
	int			address;		/* the URL of mqtx.broker_url conn is to, or
								 * (not connected) the one to try first */
	MqtxBrokerState broker_state;
	bool		ever_connected;
	int			reconnect_delay_ms;
	TimestampTz connected_at;	/* of the current or last connection */
	bool		waiting_for_update; /* logged that the schema is too old */
	bool		found_extension;	/* told the launcher it is installed */
	TimestampTz next_connect_at;
	uint32		declared_generation;
	bool		topology_declared;
	TimestampTz next_topology_retry_at; /* a refused object is due again */
	MemoryContext long_context; /* what outlives passes: the refusals */
	List	   *refusals;		/* what the broker refused, and when to retry */
	bool		refusals_saved; /* mqtx.broker_errors is this process's */
	char		schema_version[NAMEDATALEN];	/* of the extension's objects */
	bool		receiving;		/* deliveries may arrive: don't poll frames */
	void		(*on_disconnect) (const char *error);	/* before the connection
														 * goes */
} MqtxWorker;

extern void mqtx_worker_define_settings(void);
extern void mqtx_worker_start(MqtxWorker *w, MqtxWorkerKind kind, Datum main_arg);
extern void mqtx_worker_start_apply(MqtxWorker *w, Datum main_arg);
extern void mqtx_worker_begin_step(const char *activity);
extern void mqtx_worker_end_step(MqtxWorker *w);
extern void mqtx_worker_exit_unless_served(MqtxWorker *w);
extern bool mqtx_worker_extension_ready(MqtxWorker *w);
extern bool mqtx_worker_ensure_broker(MqtxWorker *w);
extern void mqtx_worker_drop_broker(MqtxWorker *w, const char *error);
extern void mqtx_worker_restart_broker(MqtxWorker *w, const char *reason);
extern void mqtx_worker_reload(MqtxWorker *w);
extern void mqtx_worker_wait(MqtxWorker *w, long poll_ms);
extern Oid	mqtx_lock_table(const char *table);
extern void mqtx_plan_index_order_for_session(void);
extern bool mqtx_worker_may_try(MqtxWorker *w, const char *object_type,
								const char *object_name);
extern void mqtx_worker_refused(MqtxWorker *w, const char *object_type,
								const char *object_name, const char *error);
extern void mqtx_worker_accepted(MqtxWorker *w, const char *object_type,
								 const char *object_name);
extern void mqtx_worker_begin_round(MqtxWorker *w, const char *const *object_types,
									int ntypes);
extern void mqtx_worker_end_round(MqtxWorker *w);
extern void mqtx_worker_save_refusals(MqtxWorker *w);
extern void mqtx_worker_apply_retention(MqtxWorker *w, const char *table,
										const char *delete_sql, int keep_seconds,
										TimestampTz *next_at);

#endif							/* MQTX_WORKER_H */
