/*-------------------------------------------------------------------------
 *
 * broker.h
 *	  The broker connection, as the rest of mqtx sees it: connect, declare
 *	  the topology, publish with confirms, consume and acknowledge, and the
 *	  settings that shape the connection.
 *
 * Nothing here mentions rabbitmq-c: only the broker files (broker.c,
 * broker_fields.c, broker_publish.c, broker_consume.c) include its
 * headers, through broker_internal.h.  A BrokerConnection is opaque.
 *
 * These functions report failure as text in *error (or *reason), not with
 * ereport(ERROR): a caller in the middle of a broker exchange decides what
 * the failure means.  Each says at its definition what it returns then.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTX_BROKER_H
#define MQTX_BROKER_H

#include "datatype/timestamp.h"
#include "nodes/pg_list.h"
#include "utils/jsonb.h"

/* AMQP 0-9-1 "shortstr": exchange names, routing keys, header keys */
#define MQTX_SHORTSTR_MAX 255

/* Settings (defined by mqtx_broker_define_settings) */
extern char *mqtx_broker_url;
extern int	mqtx_confirm_timeout;
extern int	mqtx_connect_timeout;
extern int	mqtx_heartbeat;
extern char *mqtx_tls_ca_file;
extern char *mqtx_tls_cert_file;
extern char *mqtx_tls_key_file;
extern bool mqtx_tls_verify_peer;

extern void mqtx_broker_define_settings(void);

/* A moving average of timings, recent samples weighing a quarter (0: none yet) */
static inline double
mqtx_moving_average(double average, double sample)
{
	return average == 0 ? sample : 0.75 * average + 0.25 * sample;
}

typedef struct BrokerConnection BrokerConnection;

typedef enum PublishOutcome
{
	PUBLISH_NOT_SENT,			/* never reached the broker */
	PUBLISH_UNCONFIRMED,		/* sent, no confirm yet */
	PUBLISH_ACKED,
	PUBLISH_NACKED,
	PUBLISH_RETURNED,			/* unroutable (mandatory) */
	PUBLISH_REJECTED			/* refused before sending, e.g. unknown
								 * exchange */
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
	const char *correlation_id; /* NULL for none */
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
	char	   *correlation_id; /* NULL when the message has none */
	char	   *causation_id;	/* header x-mqtx-causation-id, or NULL */
	char	   *redriven_from;	/* header x-mqtx-redriven-from, or NULL */
	char	   *ordering_key;	/* header x-mqtx-ordering-key, or NULL */
	int64		parked_position;	/* applied from mqtx.parked, at this
									 * position; 0: from the broker */
	int64		delivery_count; /* header x-delivery-count, or 0 */
	char	   *headers_json;	/* NULL when the message has none */
	char	   *headers_error;	/* why the headers could not be read, or NULL */
	char	   *body;			/* raw bytes, NUL-terminated for convenience */
	int			body_len;
} BrokerDelivery;

/* The header that carries a redriven message's original id */
#define MQTX_REDRIVEN_FROM_HEADER "x-mqtx-redriven-from"

/* The header that carries a message's ordering key */
#define MQTX_ORDERING_KEY_HEADER "x-mqtx-ordering-key"

/*
 * The correlation id mqtx.publish gives a message, in the outbox (the
 * relay sends it as the AMQP property), and the id of the message whose
 * handler published it (message_context.c)
 */
#define MQTX_CORRELATION_ID_HEADER "x-mqtx-correlation-id"
#define MQTX_CAUSATION_ID_HEADER "x-mqtx-causation-id"

/* mqtx_broker_next_delivery: a queue's channel was closed or its consumer cancelled */
#define BROKER_CHANNEL_LOST 2

/* Checks that need no connection (broker.c, broker_fields.c) */
extern List *mqtx_broker_addresses(const char *urls);
extern bool mqtx_broker_url_is_valid(const char *urls, char **reason);
extern char *mqtx_broker_describe(const char *urls);
extern bool mqtx_headers_are_valid(Jsonb *headers, char **reason);

/* The connection (broker.c) */
extern const char *mqtx_broker_address(BrokerConnection *conn);
extern BrokerConnection *mqtx_broker_connect(const char *url, const char *name,
											 char **error);
extern void mqtx_broker_disconnect(BrokerConnection *conn);
extern bool mqtx_broker_is_open(BrokerConnection *conn);
extern bool mqtx_broker_refused(BrokerConnection *conn);
extern double mqtx_broker_round_trip_ms(BrokerConnection *conn);
extern bool mqtx_broker_is_blocked(BrokerConnection *conn, const char **reason);
extern bool mqtx_broker_wait(BrokerConnection *conn, TimestampTz deadline, char **error);
extern bool mqtx_broker_keep_alive(BrokerConnection *conn, char **error);

/* Topology (broker.c) */
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

/* Publishing with confirms (broker_publish.c) */
extern bool mqtx_broker_publish(BrokerConnection *conn, BrokerMessage *message,
								char **error);
extern bool mqtx_broker_all_settled(BrokerMessage *messages, int count);
extern void mqtx_broker_forget_messages(BrokerConnection *conn, BrokerMessage *messages,
										int count);

/* Consuming (broker_consume.c) */
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

#endif							/* MQTX_BROKER_H */
