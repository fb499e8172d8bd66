/*-------------------------------------------------------------------------
 *
 * broker_internal.h
 *	  What the four broker files share and the rest of mqtx must not see:
 *	  the rabbitmq-c headers, the inside of a BrokerConnection, and the
 *	  functions one broker file calls in another.
 *
 * broker.c owns the connection (socket, frames, RPCs, closes, topology);
 * broker_publish.c and broker_consume.c drive its publish channel and
 * its consume channels; broker_fields.c converts between jsonb and AMQP
 * field tables and owns no state.  Functions named mqtx_amqp_* are those
 * conversions; the other internal ones are mqtx_broker_*, like the public
 * functions in broker.h (every symbol mqtx exports starts with mqtx_).
 *
 * Like the public functions, these report failure as text in *error (or
 * *reason), never with ereport(ERROR): the caller is in the middle of a
 * broker exchange and decides what the failure means.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTX_BROKER_INTERNAL_H
#define MQTX_BROKER_INTERNAL_H

#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>

#include "lib/stringinfo.h"
#include "nodes/pg_list.h"

#include "broker.h"
#include "shared.h"

/*
 * One connection, and on it a channel per purpose: one in confirm mode for
 * publishing, one for RPCs (topology, exchange checks), and one per
 * consumed queue.  A declaration the broker refuses closes its channel; on
 * a separate channel that never costs the confirms of messages in flight,
 * and a queue the broker will not let us consume closes only its own
 * channel, never the deliveries of the others.
 */
#define PUBLISH_CHANNEL 1
#define RPC_CHANNEL 2
#define FIRST_CONSUME_CHANNEL 3
#define MAX_CHANNELS 1024		/* channel numbers below this */

/* Room kept in a header frame for the properties other than the headers */
#define PROPERTIES_RESERVE 1024

/*
 * Header tables a consumer receives nest at most this deep; a deeper one
 * makes the delivery poison.  Far more than any real header needs, and it
 * bounds the recursion of mqtx_amqp_table_to_json.  It does not bound
 * rabbitmq-c 0.11's own decoder, which recurses to any depth a frame can
 * hold (some 20,000 levels in the default 128 kB frame, a few MB of
 * stack: within the 8 MB a process has, but a reason to keep frame_max at
 * its default).
 */
#define MAX_HEADER_DEPTH 64

/*
 * rabbitmq-c's socket object and its table of functions, as declared by
 * the library's private amqp_socket.h (the same from 0.5 to 0.15).  The
 * library waits for its socket in poll() with no regard for signals, and
 * sends with no deadline at all; broker.c puts its own send and recv in
 * the table so that every wait the library would make is made there
 * instead: in WaitLatchOrSocket, bounded, and given up when the process
 * is asked to stop.
 */
typedef struct LibrarySocketClass
{
	ssize_t		(*send) (void *self, const void *buf, size_t len, int flags);
	ssize_t		(*recv) (void *self, void *buf, size_t len, int flags);
	int			(*open) (void *self, const char *host, int port,
						 const struct timeval *timeout);
	int			(*close) (void *self, int force);
	int			(*get_sockfd) (void *self);
	void		(*delete) (void *self);
} LibrarySocketClass;

typedef struct LibrarySocket
{
	const LibrarySocketClass *klass;
} LibrarySocket;

/*
 * The struct lives in TopMemoryContext; the library's own state is
 * malloc'd by rabbitmq-c and must be released with mqtx_broker_disconnect().
 */
struct BrokerConnection
{
	amqp_connection_state_t state;
	char		address[MQTX_BROKER_ADDRESS_LEN];	/* amqp[s]://host:port */
	bool		open;			/* false once the connection is unusable */
	bool		channel_open[MAX_CHANNELS];
	int			channel_max;	/* negotiated, capped at MAX_CHANNELS - 1 */
	uint64		next_delivery_tag;	/* confirm tags restart at 1 per channel */

	/*
	 * Messages sent and not yet acked or nacked, in delivery-tag order.  They
	 * belong to the caller, who keeps them alive until they settle or the
	 * connection is dropped.
	 */
	BrokerMessage **unsettled;
	int			unsettled_count;
	int			unsettled_capacity;

	/* connection.blocked from the broker: publish nothing until unblocked */
	bool		blocked;
	char		blocked_reason[256];

	/* a consume channel the broker closed, or whose consumer it cancelled */
	int			lost_channel;
	char		lost_channel_reason[512];

	/* the socket, and the library's own functions behind ours */
	LibrarySocket *socket;
	const LibrarySocketClass *library_class;
	LibrarySocketClass wrapped_class;
	TimestampTz reply_deadline; /* a reply is awaited until then; 0: none */
	TimestampTz last_received_at;	/* when the broker last sent anything */
	TimestampTz reply_awaited_since;	/* the RPC in progress began */
	double		round_trip_ms;	/* of recent RPCs; 0: none yet */
	bool		refused;		/* the last RPC failed because the broker said
								 * no */
	int			next_consume_channel;	/* never reused on a connection */
	char	   *io_error;		/* why our send or recv gave up, or NULL */
	BrokerConnection *next;		/* in open_connections */

	MemoryContext cache_context;	/* holds the exchange caches */
	List	   *known_exchanges;	/* checked to exist on this connection */
	List	   *missing_exchanges;	/* of MissingExchange */
	TimestampTz last_keep_alive;	/* when mqtx_broker_keep_alive last sent */
};

/* broker.c: the connection, its RPCs and frames */
extern void mqtx_broker_expect_reply(BrokerConnection *conn);
extern bool mqtx_broker_rpc_succeeded(BrokerConnection *conn, amqp_channel_t channel,
									  const char *what, char **error);
extern char *mqtx_broker_handle_failed_reply(BrokerConnection *conn, amqp_channel_t channel,
											 amqp_rpc_reply_t reply, const char *what);
extern bool mqtx_broker_ensure_channel(BrokerConnection *conn, amqp_channel_t channel,
									   char **error);
extern amqp_rpc_reply_t mqtx_broker_read_content(BrokerConnection *conn,
												 amqp_channel_t channel,
												 amqp_message_t *message);
extern const char *mqtx_broker_io_error_string(BrokerConnection *conn, int status);
extern void mqtx_broker_mark_connection_lost(BrokerConnection *conn);
extern void mqtx_broker_lose_connection(BrokerConnection *conn, const char *what,
										int rc, char **error);
extern int	mqtx_broker_next_frame(BrokerConnection *conn, amqp_frame_t *frame,
								   TimestampTz deadline, bool *woken);
extern bool mqtx_broker_handle_frame(BrokerConnection *conn, amqp_frame_t *frame,
									 char **error);

/* broker_publish.c: what the frames say about messages published */
extern void mqtx_broker_forget_publish_channel(BrokerConnection *conn,
											   const char *refusal);
extern void mqtx_broker_apply_confirm(BrokerConnection *conn, uint64 delivery_tag,
									  bool multiple, PublishOutcome outcome);
extern bool mqtx_broker_apply_return(BrokerConnection *conn, amqp_basic_return_t *ret,
									 char **error);

/* broker_consume.c: what the frames say about the queues consumed */
extern void mqtx_broker_accept_cancel(BrokerConnection *conn, amqp_channel_t channel,
									  amqp_basic_cancel_t *cancel);
extern bool mqtx_broker_discard_delivery(BrokerConnection *conn, amqp_channel_t channel,
										 char **error);

/* broker_fields.c: jsonb and text to AMQP values, and back */
extern amqp_bytes_t mqtx_amqp_from_server(const char *str, int len);
extern amqp_bytes_t mqtx_amqp_from_server_cstring(const char *str);
extern char *mqtx_amqp_to_cstring(amqp_bytes_t bytes);
extern bool mqtx_amqp_headers_to_table(Jsonb *headers, amqp_table_t *table,
									   char **reason);
extern bool mqtx_amqp_table_fits_frame(amqp_table_t *table, int frame_max,
									   size_t *room);
extern char *mqtx_amqp_wire_string(amqp_bytes_t bytes);
extern char *mqtx_amqp_text_string(amqp_bytes_t bytes);
extern bool mqtx_amqp_table_to_json(StringInfo out, amqp_table_t *table, int depth);
extern char *mqtx_amqp_string_header(amqp_table_t *headers, const char *name);
extern int64 mqtx_amqp_delivery_count(amqp_table_t *headers);

#endif							/* MQTX_BROKER_INTERNAL_H */
