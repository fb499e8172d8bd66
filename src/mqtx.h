/*-------------------------------------------------------------------------
 *
 * mqtx.h
 *	  Declarations shared by the parts of mqtx: settings, shared state,
 *	  the outbox SQL surface, the broker connection and the relay.
 *
 * Nothing here mentions rabbitmq-c: only broker.c includes its headers.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTX_H
#define MQTX_H

#include "nodes/pg_list.h"
#include "port/atomics.h"
#include "storage/latch.h"
#include "storage/spin.h"
#include "datatype/timestamp.h"
#include "executor/spi.h"
#include "utils/jsonb.h"

/* AMQP 0-9-1 "shortstr": exchange names, routing keys, header keys */
#define MQTX_SHORTSTR_MAX 255

/* Settings (mqtx.c) */
#define MQTX_MAX_DATABASES 64

extern char *mqtx_broker_url;
extern char *mqtx_databases;
extern List *mqtx_database_names;
extern int	mqtx_max_payload;
extern bool mqtx_relay_enabled;
extern bool mqtx_consumer_enabled;
extern int	mqtx_inbox_retention;
extern int	mqtx_batch_size;
extern int	mqtx_batch_max_bytes;
extern int	mqtx_poll_interval;
extern int	mqtx_max_attempts;
extern int	mqtx_retry_base;
extern int	mqtx_retry_max;
extern int	mqtx_confirm_timeout;
extern int	mqtx_connect_timeout;
extern int	mqtx_heartbeat;
extern int	mqtx_retention;
extern char *mqtx_tls_ca_file;
extern char *mqtx_tls_cert_file;
extern char *mqtx_tls_key_file;
extern bool mqtx_tls_verify_peer;

/* Shared state (shared.c) */
typedef enum MqtxWorkerKind
{
	MQTX_RELAY,
	MQTX_CONSUMER,
	MQTX_NWORKER_KINDS
} MqtxWorkerKind;

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

typedef struct MqtxWorkerInfo
{
	pid_t		pid;
	Latch	   *latch;
	bool		broker_connected;
	bool		broker_blocked; /* connection.blocked by the broker */
} MqtxWorkerInfo;

typedef struct MqtxSlot
{
	char		dbname[NAMEDATALEN];
	slock_t		mutex;			/* protects dboid and workers */
	Oid			dboid;
	MqtxWorkerInfo workers[MQTX_NWORKER_KINDS];
	pg_atomic_uint32 topology_generation;
	pg_atomic_uint64 counters[MQTX_NCOUNTERS];
} MqtxSlot;

extern void mqtx_shared_init(void);
extern MqtxSlot *mqtx_slot(int index);
extern void mqtx_slot_attach(MqtxSlot *slot, MqtxWorkerKind kind, Oid dboid);
extern void mqtx_slot_detach(MqtxSlot *slot, MqtxWorkerKind kind);
extern void mqtx_slot_set_connected(MqtxSlot *slot, MqtxWorkerKind kind,
									bool connected);
extern void mqtx_slot_set_blocked(MqtxSlot *slot, MqtxWorkerKind kind,
								  bool blocked);
extern void mqtx_count(MqtxSlot *slot, MqtxCounter counter, uint64 n);
extern void mqtx_wake_relay_at_commit(void);

/* Broker connection (broker.c) */
typedef struct BrokerConnection BrokerConnection;

typedef enum PublishOutcome
{
	PUBLISH_NOT_SENT,			/* never reached the broker */
	PUBLISH_UNCONFIRMED,		/* sent, no confirm yet */
	PUBLISH_ACKED,
	PUBLISH_NACKED,
	PUBLISH_RETURNED,			/* unroutable (mandatory) */
	PUBLISH_REJECTED			/* refused before sending, e.g. unknown exchange */
} PublishOutcome;

typedef struct BrokerMessage
{
	/* what to send; strings in the server encoding */
	const char *exchange;
	const char *routing_key;
	const char *message_id;
	const char *body;
	int			body_len;
	Jsonb	   *headers;		/* NULL for none */
	int64		timestamp;		/* seconds since the Unix epoch */

	/* what became of it; error allocated in context, which outlives it */
	MemoryContext context;
	PublishOutcome outcome;
	uint64		delivery_tag;
	bool		settled;		/* its ack or nack has arrived */
	char	   *error;			/* why, for NACKED, RETURNED and REJECTED */
} BrokerMessage;

/*
 * A message received by the consumer, copied out of rabbitmq-c's buffers.
 * Every string is valid UTF-8 without NUL bytes: wire bytes that are not
 * are given as "hex:" and their hexadecimal digits, so that they can be
 * stored, compared and dumped, and two different ids never become one.
 */
typedef struct BrokerDelivery
{
	int			channel;		/* what it must be acknowledged on */
	char	   *queue;
	uint64		delivery_tag;
	bool		redelivered;
	char	   *exchange;
	char	   *routing_key;
	char	   *message_id;		/* NULL when the message has none */
	char	   *redriven_from;	/* header x-mqtx-redriven-from, or NULL */
	char	   *headers_json;	/* NULL when the message has none */
	char	   *headers_error;	/* why the headers could not be read, or NULL */
	char	   *body;			/* raw bytes, NUL-terminated for convenience */
	int			body_len;
} BrokerDelivery;

/* The header that carries a redriven message's original id */
#define MQTX_REDRIVEN_FROM_HEADER "x-mqtx-redriven-from"

/* mqtx_broker_next_delivery: a queue's channel was closed or its consumer cancelled */
#define BROKER_CHANNEL_LOST 2

extern int	mqtx_broker_consume(BrokerConnection *conn, const char *queue,
						   int prefetch, char **error);
extern bool mqtx_broker_cancel(BrokerConnection *conn, int channel, const char *queue,
						  char **error);
extern bool mqtx_broker_channel_is_open(BrokerConnection *conn, int channel);
extern int	mqtx_broker_next_delivery(BrokerConnection *conn, int timeout_ms,
								 BrokerDelivery *delivery, char **error);
extern bool mqtx_broker_ack(BrokerConnection *conn, int channel, uint64 delivery_tag,
					   bool multiple, char **error);
extern bool mqtx_broker_requeue(BrokerConnection *conn, int channel,
						   uint64 delivery_tag, char **error);
extern bool mqtx_broker_keep_alive(BrokerConnection *conn, char **error);
extern bool mqtx_broker_url_is_valid(const char *url, char **reason);
extern bool mqtx_headers_are_valid(Jsonb *headers, char **reason);
extern char *mqtx_broker_describe(const char *url);
extern BrokerConnection *mqtx_broker_connect(const char *url, const char *name,
										char **error);
extern void mqtx_broker_disconnect(BrokerConnection *conn);
extern bool mqtx_broker_is_open(BrokerConnection *conn);
extern double mqtx_broker_round_trip_ms(BrokerConnection *conn);
extern bool mqtx_broker_refused(BrokerConnection *conn);
extern bool mqtx_broker_is_blocked(BrokerConnection *conn, const char **reason);
extern bool mqtx_broker_wait(BrokerConnection *conn, TimestampTz deadline, char **error);
extern bool mqtx_broker_declare_exchange(BrokerConnection *conn, const char *name,
									const char *type, bool durable, char **error);
extern bool mqtx_broker_declare_queue(BrokerConnection *conn, const char *name,
								 bool durable, Jsonb *arguments, char **error);
extern bool mqtx_broker_bind(BrokerConnection *conn, const char *queue,
						const char *exchange, const char *routing_key,
						char **error);
extern bool mqtx_broker_exchange_exists(BrokerConnection *conn, const char *name,
								   char **error);
extern void mqtx_broker_forget_exchanges(BrokerConnection *conn);
extern bool mqtx_broker_publish(BrokerConnection *conn, BrokerMessage *message,
						   char **error);
extern bool mqtx_broker_all_settled(BrokerMessage *messages, int count);
extern void mqtx_broker_forget_messages(BrokerConnection *conn, BrokerMessage *messages,
								   int count);

/* Worker plumbing shared by the relay and the consumer (worker.c) */

/* A moving average of timings, recent samples weighing a quarter (0: none yet) */
static inline double
mqtx_moving_average(double average, double sample)
{
	return average == 0 ? sample : 0.75 * average + 0.25 * sample;
}

/* The oldest version of the SQL objects the consumer's statements work with */
#define MQTX_CONSUMER_SCHEMA_VERSION "0.2.0"

typedef enum MqtxBrokerState
{
	MQTX_BROKER_UNKNOWN,
	MQTX_BROKER_UP,
	MQTX_BROKER_DOWN
} MqtxBrokerState;

typedef struct MqtxWorker
{
	MqtxWorkerKind kind;
	const char *role;			/* "relay" or "consumer", for log lines */
	MqtxSlot   *slot;
	MemoryContext context;		/* where each step returns; the worker may switch it */
	BrokerConnection *conn;
	MqtxBrokerState broker_state;
	bool		ever_connected;
	int			reconnect_delay_ms;
	TimestampTz connected_at;	/* of the current or last connection */
	bool		waiting_for_update; /* logged that the schema is too old */
	TimestampTz next_connect_at;
	uint32		declared_generation;
	bool		topology_declared;
	TimestampTz next_topology_retry_at; /* a refused object is due again */
	MemoryContext long_context; /* what outlives passes: the refusals */
	List	   *refusals;		/* what the broker refused, and when to retry */
	bool		refusals_saved; /* mqtx.broker_errors is this process's */
	char		schema_version[NAMEDATALEN];	/* of the extension's objects */
	bool		receiving;		/* deliveries may arrive: don't poll frames */
	void		(*on_disconnect) (const char *error);	/* before the connection goes */
} MqtxWorker;

extern void mqtx_register_worker(MqtxWorkerKind kind, int slot_index,
								 const char *dbname);
extern void mqtx_worker_start(MqtxWorker *w, MqtxWorkerKind kind, Datum main_arg);
extern void mqtx_worker_begin_step(const char *activity);
extern void mqtx_worker_end_step(MqtxWorker *w);
/* a statement from a plan kept for the process (outbox.c uses it too) */
extern int	mqtx_execute_prepared(SPIPlanPtr *plan, const char *sql, int nargs,
								  Oid *argtypes, Datum *args, const char *nulls);
extern bool mqtx_worker_extension_ready(MqtxWorker *w);
extern bool mqtx_worker_ensure_broker(MqtxWorker *w);
extern void mqtx_worker_drop_broker(MqtxWorker *w, const char *error);
extern void mqtx_worker_restart_broker(MqtxWorker *w, const char *reason);
extern void mqtx_worker_reload(MqtxWorker *w);
extern void mqtx_worker_wait(MqtxWorker *w, long poll_ms);
extern char *mqtx_hex_string(const char *data, int len);
extern char *mqtx_sha256_hex(const char *data, size_t len);
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

/* The workers (relay.c, consumer.c) */
extern PGDLLEXPORT void mqtx_relay_main(Datum main_arg);
extern PGDLLEXPORT void mqtx_consumer_main(Datum main_arg);

/* The consumer's memory of its own deaths (crash_guard.c) */
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

extern const MqtxCrashRecord *mqtx_crash_guard_open(void);
extern char *mqtx_crash_guard_digest(const char *queue, const char *key);
extern void mqtx_crash_guard_applying(int deliveries, const char *queue,
									  const char *key, int deaths);
extern void mqtx_crash_guard_idle(void);

/* Running work as another role (identity.c) */
typedef struct MqtxIdentity
{
	Oid			user;
	int			sec_context;
	int			guc_nest_level;
} MqtxIdentity;

extern void mqtx_remember_server_search_path(void);
extern char *mqtx_session_search_path(Oid role);
extern void mqtx_become(MqtxIdentity *saved, Oid role, const char *search_path,
						bool restricted);
extern void mqtx_restore_identity(MqtxIdentity *saved);
extern void mqtx_forget_session_state(void);

/* Log redaction (log_redact.c) */
extern void mqtx_install_log_redaction(void);
extern void mqtx_check_statement_masking(void);
extern char *mqtx_redact_secrets(const char *text);

#endif							/* MQTX_H */
