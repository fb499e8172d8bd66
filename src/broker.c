/*-------------------------------------------------------------------------
 *
 * broker.c
 *	  Everything that speaks to rabbitmq-c: broker URL parsing, AMQP field
 *	  tables, connecting (TCP or TLS), declaring topology, publishing with
 *	  publisher confirms, consuming.
 *
 * This is the only file that includes the rabbitmq-c headers; the rest of
 * mqtx sees plain C and PostgreSQL types.  Functions here report problems
 * as text in *reason rather than with ereport(ERROR), so that a caller in
 * the middle of a broker exchange can decide what failure means.
 *
 * Every wait for the broker is made in WaitLatchOrSocket, never in the
 * library: a worker answers SIGTERM, cancellation and postmaster death
 * while it waits, and gives up a wait that would hold a transaction open.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <poll.h>

#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#include <openssl/ssl.h>
#include <openssl/x509_vfy.h>

#include "access/xact.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/guc.h"

#include "broker.h"
#include "digest.h"
#include "log_redact.h"

char	   *mqtx_broker_url = NULL;
int			mqtx_confirm_timeout = 10000;
int			mqtx_connect_timeout = 5000;
int			mqtx_heartbeat = 30;
char	   *mqtx_tls_ca_file = NULL;
char	   *mqtx_tls_cert_file = NULL;
char	   *mqtx_tls_key_file = NULL;
bool		mqtx_tls_verify_peer = true;

/*
 * rabbitmq-c quietly substitutes "localhost" for a missing host; we want
 * "amqp://user:pw@:5672/" to be an error, not a connection to localhost.
 */
static bool
names_host(const char *url)
{
	const char *authority = strstr(url, "://") + 3;
	const char *host = authority;
	const char *p;

	for (p = authority; *p != '\0' && *p != '/'; p++)
		if (*p == '@')
			host = p + 1;
	return *host != '\0' && *host != ':' && *host != '/';
}

/*
 * Parse a broker URL into *info.  The strings in *info point into a copy
 * of the URL allocated in the current memory context.
 */
static bool
parse_broker_url(const char *url, struct amqp_connection_info *info,
				 char **reason)
{
	char	   *copy = pstrdup(url);

	if (strncmp(url, "amqp://", 7) != 0 && strncmp(url, "amqps://", 8) != 0)
	{
		*reason = pstrdup("The URL must start with amqp:// or amqps://.");
		return false;
	}
	if (amqp_parse_url(copy, info) != AMQP_STATUS_OK)
	{
		*reason = pstrdup("The URL is malformed: check the user, password, host, port and vhost parts.");
		return false;
	}
	if (!names_host(url))
	{
		*reason = pstrdup("The URL names no host.");
		return false;
	}
	if (info->port <= 0)
	{
		*reason = psprintf("Port %d is out of range (1..65535).", info->port);
		return false;
	}
	if (info->vhost[0] == '\0')
	{
		*reason = pstrdup("The URL names an empty vhost; write %2f for the default vhost \"/\".");
		return false;
	}
	return true;
}

/*
 * Is this a usable broker URL?  On failure *reason says why, without
 * repeating the URL (it may carry a password).
 */
bool
mqtx_broker_url_is_valid(const char *url, char **reason)
{
	struct amqp_connection_info info;

	return parse_broker_url(url, &info, reason);
}

/*
 * AMQP strings are UTF-8; the database may use another encoding.
 */
static amqp_bytes_t
server_text_to_amqp_bytes(const char *text, int len)
{
	amqp_bytes_t bytes;

	bytes.bytes = pg_server_to_any(text, len, PG_UTF8);
	bytes.len = (bytes.bytes == text) ? (size_t) len : strlen(bytes.bytes);
	return bytes;
}

static bool container_to_table(JsonbContainer *container, amqp_table_t *table,
							   char **reason);
static bool container_to_array(JsonbContainer *container, amqp_array_t *array,
							   char **reason);

/*
 * JSON numbers become 64-bit integers when they are integral and fit,
 * doubles otherwise; anything else cannot travel in an AMQP table.
 */
static bool
numeric_to_field(Numeric num, const char *key, amqp_field_value_t *field,
				 char **reason)
{
	char	   *text = DatumGetCString(DirectFunctionCall1(numeric_out,
														   NumericGetDatum(num)));

	if (strpbrk(text, ".eE") == NULL)
	{
		char	   *end;
		long long	value;

		errno = 0;
		value = strtoll(text, &end, 10);
		if (errno == 0 && *end == '\0')
		{
			field->kind = AMQP_FIELD_KIND_I64;
			field->value.i64 = value;
			return true;
		}
		*reason = psprintf("Header \"%s\": the integer %.30s%s does not fit in 64 bits.",
						   key, text, strlen(text) > 30 ? "..." : "");
		return false;
	}
	field->kind = AMQP_FIELD_KIND_F64;
	field->value.f64 = strtod(text, NULL);
	if (isinf(field->value.f64))
	{
		*reason = psprintf("Header \"%s\": the number %s does not fit in a double.",
						   key, text);
		return false;
	}
	return true;
}

static bool
jsonb_value_to_field(JsonbValue *value, const char *key,
					 amqp_field_value_t *field, char **reason)
{
	switch (value->type)
	{
		case jbvNull:
			field->kind = AMQP_FIELD_KIND_VOID;
			return true;
		case jbvBool:
			field->kind = AMQP_FIELD_KIND_BOOLEAN;
			field->value.boolean = value->val.boolean;
			return true;
		case jbvString:
			field->kind = AMQP_FIELD_KIND_UTF8;
			field->value.bytes = server_text_to_amqp_bytes(value->val.string.val,
														   value->val.string.len);
			return true;
		case jbvNumeric:
			return numeric_to_field(value->val.numeric, key, field, reason);
		case jbvBinary:
			if (JsonContainerIsObject(value->val.binary.data))
			{
				field->kind = AMQP_FIELD_KIND_TABLE;
				return container_to_table(value->val.binary.data,
										  &field->value.table, reason);
			}
			field->kind = AMQP_FIELD_KIND_ARRAY;
			return container_to_array(value->val.binary.data,
									  &field->value.array, reason);
		default:
			*reason = psprintf("Header \"%s\" has a value of unexpected type.", key);
			return false;
	}
}

static bool
container_to_table(JsonbContainer *container, amqp_table_t *table, char **reason)
{
	JsonbIterator *it;
	JsonbValue	value;
	JsonbIteratorToken token;
	char	   *key = NULL;

	check_stack_depth();
	it = JsonbIteratorInit(container);

	table->num_entries = 0;
	table->entries = palloc0(sizeof(amqp_table_entry_t) *
							 Max(JsonContainerSize(container), 1));

	while ((token = JsonbIteratorNext(&it, &value, true)) != WJB_DONE)
	{
		amqp_table_entry_t *entry = &table->entries[table->num_entries];

		if (token == WJB_KEY)
		{
			key = pnstrdup(value.val.string.val, value.val.string.len);
			entry->key = server_text_to_amqp_bytes(value.val.string.val,
												   value.val.string.len);
			if (entry->key.len > MQTX_SHORTSTR_MAX)
			{
				*reason = psprintf("Header key \"%.40s...\" is %zu bytes long; AMQP allows at most %d.",
								   key, entry->key.len, MQTX_SHORTSTR_MAX);
				return false;
			}
		}
		else if (token == WJB_VALUE)
		{
			if (!jsonb_value_to_field(&value, key, &entry->value, reason))
				return false;
			table->num_entries++;
		}
	}
	return true;
}

static bool
container_to_array(JsonbContainer *container, amqp_array_t *array, char **reason)
{
	JsonbIterator *it;
	JsonbValue	value;
	JsonbIteratorToken token;

	check_stack_depth();
	it = JsonbIteratorInit(container);
	array->num_entries = 0;
	array->entries = palloc0(sizeof(amqp_field_value_t) *
							 Max(JsonContainerSize(container), 1));

	while ((token = JsonbIteratorNext(&it, &value, true)) != WJB_DONE)
	{
		if (token != WJB_ELEM)
			continue;
		if (!jsonb_value_to_field(&value, "(array element)",
								  &array->entries[array->num_entries], reason))
			return false;
		array->num_entries++;
	}
	return true;
}

/*
 * Translate a jsonb object into an AMQP field table, allocated in the
 * current memory context.
 */
static bool
headers_to_table(Jsonb *headers, amqp_table_t *table, char **reason)
{
	if (!JB_ROOT_IS_OBJECT(headers) || JB_ROOT_IS_SCALAR(headers))
	{
		*reason = pstrdup("Headers must be a JSON object.");
		return false;
	}
	return container_to_table(&headers->root, table, reason);
}

/*
 * Can these headers be sent as an AMQP field table?  The same translation
 * the relay uses decides, so what is accepted here is what gets sent.
 */
bool
mqtx_headers_are_valid(Jsonb *headers, char **reason)
{
	amqp_table_t table;
	amqp_bytes_t buffer;
	size_t		offset = 0;

	if (!headers_to_table(headers, &table, reason))
		return false;

	/* the properties must fit in one frame, with room for the others */
	buffer.len = AMQP_DEFAULT_FRAME_SIZE - 1024;
	buffer.bytes = palloc(buffer.len);
	if (amqp_encode_table(buffer, &table, &offset) != AMQP_STATUS_OK)
	{
		*reason = psprintf("The headers take more than %zu bytes as an AMQP table.",
						   buffer.len);
		return false;
	}
	return true;
}

/*
 * One connection, and on it a channel per purpose: one in confirm mode for
 * publishing, one for RPCs (topology, exchange checks), and one per
 * consumed queue.  A declaration the broker refuses closes its channel; on
 * a separate channel that never costs the confirms of messages in flight,
 * and a queue the broker will not let us consume closes only its own
 * channel, never the deliveries of the others.
 *
 * The struct lives in TopMemoryContext; the library's own state is
 * malloc'd by rabbitmq-c and must be released with mqtx_broker_disconnect().
 */
#define PUBLISH_CHANNEL 1
#define RPC_CHANNEL 2
#define FIRST_CONSUME_CHANNEL 3
#define MAX_CHANNELS 1024		/* channel numbers below this */

/*
 * rabbitmq-c's socket object and its table of functions, as declared by
 * the library's private amqp_socket.h (the same from 0.5 to 0.15).  The
 * library waits for its socket in poll() with no regard for signals, and
 * sends with no deadline at all; mqtx puts its own send and recv in the
 * table so that every wait the library would make is made here instead:
 * in WaitLatchOrSocket, bounded, and given up when the process is asked
 * to stop.
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

/* amqp_private.h: "try again when the socket is readable / writable" */
#define LIBRARY_SOCKET_NEEDREAD (-0x1301)
#define LIBRARY_SOCKET_NEEDWRITE (-0x1302)

/* A missing exchange is asked about again after this long. */
#define MISSING_EXCHANGE_RECHECK_MS 5000

/* Room kept in a header frame for the properties other than the headers */
#define PROPERTIES_RESERVE 1024

typedef struct MissingExchange
{
	char	   *name;
	char	   *reason;
	TimestampTz recheck_at;
} MissingExchange;

struct BrokerConnection
{
	amqp_connection_state_t state;
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
	bool		refused;		/* the last RPC failed because the broker said no */
	int			next_consume_channel;	/* never reused on a connection */
	char	   *io_error;		/* why our send or recv gave up, or NULL */
	BrokerConnection *next;		/* in open_connections */

	MemoryContext cache_context;	/* holds the exchange caches */
	List	   *known_exchanges;	/* checked to exist on this connection */
	List	   *missing_exchanges;	/* of MissingExchange */
	TimestampTz last_keep_alive;	/* when mqtx_broker_keep_alive last sent */
};

/* Connections whose socket functions are ours, to find one from its socket */
static BrokerConnection *open_connections = NULL;

static struct timeval
timeval_from_ms(int ms)
{
	struct timeval tv;

	tv.tv_sec = ms / 1000;
	tv.tv_usec = (ms % 1000) * 1000;
	return tv;
}

static amqp_bytes_t
cstring_to_amqp_bytes(const char *text)
{
	return server_text_to_amqp_bytes(text, strlen(text));
}

static char *
amqp_bytes_to_cstring(amqp_bytes_t bytes)
{
	return pnstrdup(bytes.bytes, bytes.len);
}

/*
 * "amqp://host:port", for log lines: never the user or password.
 */
char *
mqtx_broker_describe(const char *url)
{
	struct amqp_connection_info info;
	char	   *reason;

	if (url == NULL || url[0] == '\0')
		return pstrdup("(no broker configured)");
	if (!parse_broker_url(url, &info, &reason))
		return pstrdup("(invalid broker URL)");
	return psprintf("%s%s:%d", info.ssl ? "amqps://" : "amqp://", info.host, info.port);
}

/*
 * The wait events broker waits are shown with in pg_stat_activity: named
 * ones where PostgreSQL lets an extension name them (17 and later), the
 * generic "Extension" before that; the activity text says which wait it is.
 */
typedef enum BrokerWait
{
	BROKER_WAIT_READ,
	BROKER_WAIT_WRITE,
	BROKER_WAIT_REPLY,
	BROKER_NWAITS
} BrokerWait;

static uint32
wait_event_for(BrokerWait wait)
{
#if PG_VERSION_NUM >= 170000
	static uint32 events[BROKER_NWAITS];
	static const char *const names[BROKER_NWAITS] = {
		"MqtxBrokerRead", "MqtxBrokerWrite", "MqtxBrokerReply"
	};

	if (events[wait] == 0)
		events[wait] = WaitEventExtensionNew(names[wait]);
	return events[wait];
#else
	return PG_WAIT_EXTENSION;
#endif
}

/*
 * Does the process have to stop rather than wait?  Only termination and
 * cancellation count: other interrupts (a barrier, a request to log memory
 * contexts) are served at the next CHECK_FOR_INTERRUPTS, once the library
 * has returned.
 */
static bool
must_stop_waiting(void)
{
	return ProcDiePending || QueryCancelPending || proc_exit_inprogress;
}

/*
 * Wait, inside a library call, until the socket is ready for the event or
 * the deadline passes.  A latch set meanwhile is reset (it would end every
 * wait at once) and set again on return, so that the wake-up still reaches
 * the worker's loop.  Returns false when the wait was given up: deadline,
 * stop request, or a transaction in progress (no network wait may hold
 * one open).
 */
static bool
wait_in_library(BrokerConnection *conn, int socket_event, TimestampTz deadline)
{
	int			fd = amqp_get_sockfd(conn->state);
	bool		woken = false;
	bool		ready = false;

	if (IsTransactionOrTransactionBlock())
	{
		conn->io_error = "the broker was not ready and the worker holds a transaction";
		return false;
	}
	for (;;)
	{
		long		timeout_ms;
		int			events;

		if (must_stop_waiting())
		{
			conn->io_error = "interrupted";
			break;
		}
		timeout_ms = TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);
		if (timeout_ms <= 0)
		{
			conn->io_error = socket_event == WL_SOCKET_WRITEABLE ?
				"the broker took no data within the timeout" :
				"no reply from the broker within the timeout";
			break;
		}
		events = WaitLatchOrSocket(MyLatch,
								   WL_LATCH_SET | socket_event | WL_TIMEOUT |
								   WL_EXIT_ON_PM_DEATH,
								   fd, timeout_ms,
								   wait_event_for(socket_event == WL_SOCKET_WRITEABLE ?
												  BROKER_WAIT_WRITE : BROKER_WAIT_REPLY));
		if (events & WL_LATCH_SET)
		{
			ResetLatch(MyLatch);
			woken = true;
		}
		if (events & socket_event)
		{
			ready = true;
			break;
		}
	}
	if (woken)
		SetLatch(MyLatch);
	return ready;
}

static BrokerConnection *
connection_of(void *socket)
{
	for (BrokerConnection *conn = open_connections; conn != NULL; conn = conn->next)
		if ((void *) conn->socket == socket)
			return conn;
	elog(FATAL, "mqtx: a broker socket without its connection");
	return NULL;				/* keep the compiler quiet */
}

/*
 * The socket's send, as the library calls it.  The library would wait for
 * a full socket in poll() with no deadline; this waits until the broker
 * takes data again, for at most the longer of mqtx.confirm_timeout and
 * mqtx.connect_timeout without progress, and never when the process must
 * stop.  Giving up is a socket error: the connection is lost, part of a
 * frame may have gone out.
 */
static ssize_t
interruptible_send(void *self, const void *buf, size_t len, int flags)
{
	BrokerConnection *conn = connection_of(self);

	for (;;)
	{
		ssize_t		res = conn->library_class->send(self, buf, len, flags);
		int			event;
		int			stall_ms = Max(mqtx_confirm_timeout, mqtx_connect_timeout);

		if (res != LIBRARY_SOCKET_NEEDWRITE && res != LIBRARY_SOCKET_NEEDREAD)
			return res;
		event = res == LIBRARY_SOCKET_NEEDREAD ? WL_SOCKET_READABLE : WL_SOCKET_WRITEABLE;
		if (!wait_in_library(conn, event,
							 TimestampTzPlusMilliseconds(GetCurrentTimestamp(), stall_ms)))
			return AMQP_STATUS_SOCKET_ERROR;
	}
}

/*
 * The socket's recv, as the library calls it.  When no reply is awaited
 * (reply_deadline 0) it never waits: the caller asked the library not to,
 * and waits in WaitLatchOrSocket itself.  When one is (an RPC, the rest of
 * a message), it waits here until the deadline, then gives up with a
 * socket error rather than let the library wait on.
 */
static ssize_t
interruptible_recv(void *self, void *buf, size_t len, int flags)
{
	BrokerConnection *conn = connection_of(self);

	for (;;)
	{
		ssize_t		res = conn->library_class->recv(self, buf, len, flags);
		int			event;

		if (res > 0)
			conn->last_received_at = GetCurrentTimestamp();
		if (res != LIBRARY_SOCKET_NEEDWRITE && res != LIBRARY_SOCKET_NEEDREAD)
			return res;
		if (conn->reply_deadline == 0)
			return res;
		event = res == LIBRARY_SOCKET_NEEDREAD ? WL_SOCKET_READABLE : WL_SOCKET_WRITEABLE;
		if (!wait_in_library(conn, event, conn->reply_deadline))
			return AMQP_STATUS_SOCKET_ERROR;
	}
}

static void
wrap_socket(BrokerConnection *conn, amqp_socket_t *socket)
{
	conn->socket = (LibrarySocket *) socket;
	conn->library_class = conn->socket->klass;
	conn->wrapped_class = *conn->library_class;
	conn->wrapped_class.send = interruptible_send;
	conn->wrapped_class.recv = interruptible_recv;
	conn->socket->klass = &conn->wrapped_class;
	conn->next = open_connections;
	open_connections = conn;
}

static void
unwrap_socket(BrokerConnection *conn)
{
	for (BrokerConnection **p = &open_connections; *p != NULL; p = &(*p)->next)
		if (*p == conn)
		{
			*p = conn->next;
			break;
		}
}

/*
 * A reply is awaited from now on, for at most mqtx.connect_timeout (the
 * library's own RPC timeout is the same); expect_no_reply ends that.
 */
static void
expect_reply(BrokerConnection *conn)
{
	conn->reply_awaited_since = GetCurrentTimestamp();
	conn->reply_deadline = TimestampTzPlusMilliseconds(conn->reply_awaited_since,
													   mqtx_connect_timeout);
	conn->io_error = NULL;
}

static void
expect_no_reply(BrokerConnection *conn)
{
	conn->reply_deadline = 0;
}

/* The library's error, or ours when our send or recv gave up */
static const char *
io_error_string(BrokerConnection *conn, int status)
{
	if (conn->io_error != NULL && status == AMQP_STATUS_SOCKET_ERROR)
		return conn->io_error;
	return amqp_error_string2(status);
}

/*
 * The publish channel is gone: its unsettled messages will never be
 * confirmed, and a new channel starts its delivery tags again at 1.  When
 * the broker closed it for something it refused (refusal != NULL), every
 * unsettled message counts as refused with that reason; otherwise their
 * fate is unknown and they stay PUBLISH_UNCONFIRMED.
 */
static void set_message_error(BrokerMessage *message, PublishOutcome outcome,
							  const char *error);

static void
forget_publish_channel(BrokerConnection *conn, const char *refusal)
{
	for (int i = 0; refusal != NULL && i < conn->unsettled_count; i++)
	{
		BrokerMessage *m = conn->unsettled[i];

		if (m->outcome == PUBLISH_UNCONFIRMED)
			set_message_error(m, PUBLISH_NACKED, refusal);
		m->settled = true;
	}
	conn->channel_open[PUBLISH_CHANNEL] = false;
	conn->unsettled_count = 0;
}

static void
mark_connection_lost(BrokerConnection *conn)
{
	conn->open = false;
	for (int channel = 0; channel < MAX_CHANNELS; channel++)
		if (channel != PUBLISH_CHANNEL)
			conn->channel_open[channel] = false;
	forget_publish_channel(conn, NULL);
}

/*
 * Reply codes by which the broker refuses something the client sent (AMQP
 * 0-9-1 section 1.9).  Others (320 connection-forced, 541 internal error)
 * say nothing about the messages in flight.
 */
static bool
is_refusal(uint16 code)
{
	switch (code)
	{
		case 403:				/* access-refused */
		case 404:				/* not-found */
		case 405:				/* resource-locked */
		case 406:				/* precondition-failed */
		case 501:				/* frame-error */
		case 502:				/* syntax-error */
		case 503:				/* command-invalid */
		case 504:				/* channel-error */
		case 505:				/* unexpected-frame */
		case 506:				/* resource-error */
		case 530:				/* not-allowed */
		case 540:				/* not-implemented */
			return true;
		default:
			return false;
	}
}

static uint16
close_code(amqp_method_number_t method, void *decoded)
{
	return method == AMQP_CHANNEL_CLOSE_METHOD ?
		((amqp_channel_close_t *) decoded)->reply_code :
		((amqp_connection_close_t *) decoded)->reply_code;
}

static char *
describe_close(const char *what, amqp_method_number_t method, void *decoded)
{
	amqp_bytes_t text;

	if (method == AMQP_CHANNEL_CLOSE_METHOD)
		text = ((amqp_channel_close_t *) decoded)->reply_text;
	else
		text = ((amqp_connection_close_t *) decoded)->reply_text;
	return psprintf("%s: broker closed the %s: %u %.*s", what,
					method == AMQP_CHANNEL_CLOSE_METHOD ? "channel" : "connection",
					close_code(method, decoded), (int) text.len, (char *) text.bytes);
}

static bool
is_consume_channel(amqp_channel_t channel)
{
	return channel >= FIRST_CONSUME_CHANNEL && channel < MAX_CHANNELS;
}

/*
 * The broker closed a channel or the connection: acknowledge it as AMQP
 * requires and remember what is left usable.  A consume channel's
 * deliveries can no longer be acknowledged (the broker requeues them); the
 * consumer learns of it through mqtx_broker_next_delivery.
 */
static void
accept_close(BrokerConnection *conn, amqp_channel_t channel,
			 amqp_method_number_t method, const char *description, uint16 code,
			 bool while_publishing)
{
	/* a refusal of what was published, not of an RPC on another channel */
	const char *refusal = while_publishing && is_refusal(code) ? description : NULL;

	if (method == AMQP_CHANNEL_CLOSE_METHOD)
	{
		amqp_channel_close_ok_t ok = {0};

		if (channel == PUBLISH_CHANNEL)
			forget_publish_channel(conn, refusal);
		else
			conn->channel_open[channel] = false;
		if (is_consume_channel(channel))
		{
			conn->lost_channel = channel;
			strlcpy(conn->lost_channel_reason, description,
					sizeof(conn->lost_channel_reason));
		}
		if (amqp_send_method(conn->state, channel,
							 AMQP_CHANNEL_CLOSE_OK_METHOD, &ok) != AMQP_STATUS_OK)
			mark_connection_lost(conn);
	}
	else
	{
		amqp_connection_close_ok_t ok = {0};

		forget_publish_channel(conn, refusal);
		(void) amqp_send_method(conn->state, 0,
								AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
		mark_connection_lost(conn);
	}
}

/*
 * Turn a failed RPC reply on a channel into text and connection state.
 */
static char *
handle_failed_reply(BrokerConnection *conn, amqp_channel_t channel,
					amqp_rpc_reply_t reply, const char *what)
{
	char	   *error;

	switch (reply.reply_type)
	{
		case AMQP_RESPONSE_LIBRARY_EXCEPTION:
			/* timeouts and socket errors leave the connection unusable */
			error = psprintf("%s: %s", what, io_error_string(conn, reply.library_error));
			mark_connection_lost(conn);
			return error;
		case AMQP_RESPONSE_SERVER_EXCEPTION:
			if (reply.reply.id == AMQP_CHANNEL_CLOSE_METHOD ||
				reply.reply.id == AMQP_CONNECTION_CLOSE_METHOD)
			{
				error = describe_close(what, reply.reply.id, reply.reply.decoded);
				accept_close(conn, channel, reply.reply.id, error,
							 close_code(reply.reply.id, reply.reply.decoded), false);
				conn->refused = true;
				return error;
			}
			mark_connection_lost(conn);
			return psprintf("%s: unexpected %s from broker", what,
							amqp_method_name(reply.reply.id));
		default:
			mark_connection_lost(conn);
			return psprintf("%s: no reply from broker", what);
	}
}

/*
 * Did the RPC just made succeed?  Ends the wait for its reply.
 */
static bool
rpc_succeeded(BrokerConnection *conn, amqp_channel_t channel, const char *what,
			  char **error)
{
	amqp_rpc_reply_t reply = amqp_get_rpc_reply(conn->state);

	expect_no_reply(conn);
	conn->refused = false;
	if (reply.reply_type == AMQP_RESPONSE_NORMAL)
	{
		double		sample = (double) TimestampDifferenceMilliseconds(conn->reply_awaited_since,
																	  GetCurrentTimestamp());

		conn->round_trip_ms = mqtx_moving_average(conn->round_trip_ms, sample);
		return true;
	}
	*error = handle_failed_reply(conn, channel, reply, what);
	return false;
}

/*
 * Open the channel if it is not open; the publish channel in confirm mode.
 */
static bool
ensure_channel(BrokerConnection *conn, amqp_channel_t channel, char **error)
{
	if (!conn->open)
	{
		*error = pstrdup("the broker connection is closed");
		return false;
	}
	if (conn->channel_open[channel])
		return true;

	expect_reply(conn);
	amqp_channel_open(conn->state, channel);
	if (!rpc_succeeded(conn, channel, "opening a channel", error))
		return false;
	if (channel == PUBLISH_CHANNEL)
	{
		expect_reply(conn);
		amqp_confirm_select(conn->state, channel);
		if (!rpc_succeeded(conn, channel, "enabling publisher confirms", error))
			return false;
		conn->next_delivery_tag = 1;
		conn->unsettled_count = 0;
	}
	conn->channel_open[channel] = true;
	return true;
}

static bool
is_ip_address(const char *host)
{
	unsigned char addr[sizeof(struct in6_addr)];

	return inet_pton(AF_INET, host, addr) == 1 || inet_pton(AF_INET6, host, addr) == 1;
}

/*
 * rabbitmq-c checks the broker's name only against the certificate's DNS
 * names; for a URL with an IP address, have OpenSSL check the
 * certificate's IP addresses instead.
 */
static bool
verify_broker_name(amqp_socket_t *socket, const char *host, char **error)
{
	SSL_CTX    *context;

	if (!mqtx_tls_verify_peer || !is_ip_address(host))
	{
		amqp_ssl_socket_set_verify_hostname(socket, mqtx_tls_verify_peer);
		return true;
	}
	amqp_ssl_socket_set_verify_hostname(socket, false);
	context = amqp_ssl_socket_get_context(socket);
	if (context == NULL ||
		X509_VERIFY_PARAM_set1_ip_asc(SSL_CTX_get0_param(context), host) != 1)
	{
		*error = psprintf("cannot set up verification of the broker's address %s", host);
		return false;
	}
	return true;
}

static amqp_socket_t *
new_tls_socket(amqp_connection_state_t state, const char *host, char **error)
{
	amqp_socket_t *socket = amqp_ssl_socket_new(state);
	int			rc;

	if (socket == NULL)
	{
		*error = pstrdup("cannot create a TLS socket");
		return NULL;
	}
	amqp_ssl_socket_set_verify_peer(socket, mqtx_tls_verify_peer);
	if (!verify_broker_name(socket, host, error))
		return NULL;
	if (mqtx_tls_ca_file[0] != '\0')
	{
		rc = amqp_ssl_socket_set_cacert(socket, mqtx_tls_ca_file);
		if (rc != AMQP_STATUS_OK)
		{
			*error = psprintf("cannot load mqtx.tls_ca_file \"%s\": %s",
							  mqtx_tls_ca_file, amqp_error_string2(rc));
			return NULL;
		}
	}
	else if (mqtx_tls_verify_peer)
	{
		*error = pstrdup("amqps:// needs mqtx.tls_ca_file to verify the broker's certificate");
		return NULL;
	}
	if (mqtx_tls_cert_file[0] != '\0' || mqtx_tls_key_file[0] != '\0')
	{
		rc = amqp_ssl_socket_set_key(socket, mqtx_tls_cert_file, mqtx_tls_key_file);
		if (rc != AMQP_STATUS_OK)
		{
			*error = psprintf("cannot load the client certificate \"%s\" or key \"%s\": %s",
							  mqtx_tls_cert_file, mqtx_tls_key_file,
							  amqp_error_string2(rc));
			return NULL;
		}
	}
	return socket;
}



/*
 * What mqtx tells the broker about itself.  RabbitMQ sends connection.blocked
 * and basic.cancel only to clients that say they understand them, and
 * shows the connection's name in its management tools.
 */
static amqp_table_t
client_properties(const char *name)
{
	static amqp_table_entry_t capabilities[3];
	static amqp_table_entry_t properties[2];
	amqp_table_t table;

	capabilities[0].key = amqp_cstring_bytes("connection.blocked");
	capabilities[1].key = amqp_cstring_bytes("consumer_cancel_notify");
	capabilities[2].key = amqp_cstring_bytes("authentication_failure_close");
	for (int i = 0; i < (int) lengthof(capabilities); i++)
	{
		capabilities[i].value.kind = AMQP_FIELD_KIND_BOOLEAN;
		capabilities[i].value.value.boolean = true;
	}
	properties[0].key = amqp_cstring_bytes("capabilities");
	properties[0].value.kind = AMQP_FIELD_KIND_TABLE;
	properties[0].value.value.table.num_entries = lengthof(capabilities);
	properties[0].value.value.table.entries = capabilities;
	properties[1].key = amqp_cstring_bytes("connection_name");
	properties[1].value.kind = AMQP_FIELD_KIND_UTF8;
	properties[1].value.value.bytes = cstring_to_amqp_bytes(name);
	table.num_entries = lengthof(properties);
	table.entries = properties;
	return table;
}

/*
 * Connect, log in and open the channels, every step bounded by
 * mqtx.connect_timeout; "name" is what the broker shows the connection as.
 * Returns NULL with *error set on failure.
 */
BrokerConnection *
mqtx_broker_connect(const char *url, const char *name, char **error)
{
	struct amqp_connection_info info;
	struct timeval timeout = timeval_from_ms(mqtx_connect_timeout);
	BrokerConnection *conn;
	amqp_socket_t *socket;
	amqp_rpc_reply_t reply;
	amqp_table_t properties;
	int			rc;

	if (url == NULL || url[0] == '\0')
	{
		*error = pstrdup("mqtx.broker_url is not set");
		return NULL;
	}
	if (!parse_broker_url(url, &info, error))
		return NULL;

	conn = MemoryContextAllocZero(TopMemoryContext, sizeof(BrokerConnection));
	conn->cache_context = AllocSetContextCreate(TopMemoryContext,
												"mqtx broker connection",
												ALLOCSET_SMALL_SIZES);
	conn->state = amqp_new_connection();
	if (conn->state == NULL)
	{
		*error = pstrdup("out of memory creating a broker connection");
		goto fail;
	}
	socket = info.ssl ? new_tls_socket(conn->state, info.host, error) :
		amqp_tcp_socket_new(conn->state);
	if (socket == NULL)
	{
		if (!info.ssl)
			*error = pstrdup("cannot create a TCP socket");
		goto fail;
	}
	wrap_socket(conn, socket);
	conn->last_received_at = GetCurrentTimestamp();
	rc = amqp_socket_open_noblock(socket, info.host, info.port, &timeout);
	if (rc != AMQP_STATUS_OK)
	{
		*error = psprintf("cannot connect to %s:%d: %s", info.host, info.port,
						  amqp_error_string2(rc));
		goto fail;
	}
	amqp_set_handshake_timeout(conn->state, &timeout);
	amqp_set_rpc_timeout(conn->state, &timeout);

	properties = client_properties(name);
	expect_reply(conn);
	reply = amqp_login_with_properties(conn->state, info.vhost, 0,
									   AMQP_DEFAULT_FRAME_SIZE, mqtx_heartbeat,
									   &properties, AMQP_SASL_METHOD_PLAIN,
									   info.user, info.password);
	expect_no_reply(conn);
	if (reply.reply_type != AMQP_RESPONSE_NORMAL)
	{
		*error = handle_failed_reply(conn, 0, reply,
									 psprintf("logging in to %s:%d as \"%s\"",
											  info.host, info.port, info.user));
		goto fail;
	}
	conn->open = true;
	conn->channel_max = amqp_get_channel_max(conn->state);
	if (conn->channel_max <= 0 || conn->channel_max >= MAX_CHANNELS)
		conn->channel_max = MAX_CHANNELS - 1;
	if (!ensure_channel(conn, RPC_CHANNEL, error) ||
		!ensure_channel(conn, PUBLISH_CHANNEL, error))
		goto fail;
	return conn;

fail:
	mqtx_broker_disconnect(conn);
	return NULL;
}

/*
 * Close the connection (politely, unless that would mean waiting where the
 * process may not: while it exits on a signal, the send and recv above
 * give up at once) and free it.
 */
void
mqtx_broker_disconnect(BrokerConnection *conn)
{
	if (conn == NULL)
		return;
	if (conn->state != NULL)
	{
		if (conn->open)
		{
			expect_reply(conn);
			(void) amqp_connection_close(conn->state, AMQP_REPLY_SUCCESS);
		}
		amqp_destroy_connection(conn->state);
	}
	unwrap_socket(conn);
	if (conn->unsettled != NULL)
		pfree(conn->unsettled);
	MemoryContextDelete(conn->cache_context);
	pfree(conn);
}

/*
 * Did the last RPC fail because the broker refused it (it closed the
 * channel or the connection over it), rather than because the connection
 * failed?
 */
bool
mqtx_broker_refused(BrokerConnection *conn)
{
	return conn != NULL && conn->refused;
}

/* How long the broker has been taking to answer an RPC (0: no answer yet) */
double
mqtx_broker_round_trip_ms(BrokerConnection *conn)
{
	return conn != NULL ? conn->round_trip_ms : 0;
}

bool
mqtx_broker_is_open(BrokerConnection *conn)
{
	return conn != NULL && conn->open;
}

/*
 * Has the broker blocked this connection (connection.blocked: a memory or
 * disk alarm)?  *reason, when not NULL, gets the broker's reason.
 */
bool
mqtx_broker_is_blocked(BrokerConnection *conn, const char **reason)
{
	if (reason != NULL)
		*reason = conn != NULL && conn->blocked ? conn->blocked_reason : NULL;
	return conn != NULL && conn->blocked;
}

static bool
rpc_on_channel_succeeded(BrokerConnection *conn, const char *what, char **error)
{
	return rpc_succeeded(conn, RPC_CHANNEL, what, error);
}

bool
mqtx_broker_declare_exchange(BrokerConnection *conn, const char *name,
						const char *type, bool durable, char **error)
{
	if (!ensure_channel(conn, RPC_CHANNEL, error))
		return false;
	expect_reply(conn);
	amqp_exchange_declare(conn->state, RPC_CHANNEL,
						  cstring_to_amqp_bytes(name), cstring_to_amqp_bytes(type),
						  false, durable, false, false, amqp_empty_table);
	return rpc_on_channel_succeeded(conn, psprintf("declaring exchange \"%s\"", name),
									error);
}

bool
mqtx_broker_declare_queue(BrokerConnection *conn, const char *name, bool durable,
					 Jsonb *arguments, char **error)
{
	amqp_table_t table = amqp_empty_table;

	if (arguments != NULL && !headers_to_table(arguments, &table, error))
		return false;
	if (!ensure_channel(conn, RPC_CHANNEL, error))
		return false;
	expect_reply(conn);
	amqp_queue_declare(conn->state, RPC_CHANNEL, cstring_to_amqp_bytes(name),
					   false, durable, false, false, table);
	return rpc_on_channel_succeeded(conn, psprintf("declaring queue \"%s\"", name),
									error);
}

bool
mqtx_broker_bind(BrokerConnection *conn, const char *queue, const char *exchange,
			const char *routing_key, char **error)
{
	if (!ensure_channel(conn, RPC_CHANNEL, error))
		return false;
	expect_reply(conn);
	amqp_queue_bind(conn->state, RPC_CHANNEL, cstring_to_amqp_bytes(queue),
					cstring_to_amqp_bytes(exchange),
					cstring_to_amqp_bytes(routing_key), amqp_empty_table);
	return rpc_on_channel_succeeded(conn,
									psprintf("binding queue \"%s\" to exchange \"%s\"",
											 queue, exchange), error);
}

/*
 * Forget what the connection learnt about exchanges: the topology was
 * declared again, or the broker said an exchange is gone.
 */
void
mqtx_broker_forget_exchanges(BrokerConnection *conn)
{
	MemoryContextReset(conn->cache_context);
	conn->known_exchanges = NIL;
	conn->missing_exchanges = NIL;
}

static MissingExchange *
missing_exchange(BrokerConnection *conn, const char *name)
{
	ListCell   *lc;

	foreach(lc, conn->missing_exchanges)
	{
		MissingExchange *missing = lfirst(lc);

		if (strcmp(missing->name, name) == 0)
			return missing;
	}
	return NULL;
}

/*
 * Does the exchange exist?  Asked with a passive declare, once per
 * connection for one that exists and at most every
 * MISSING_EXCHANGE_RECHECK_MS for one that does not: publishing to a
 * missing exchange would close the publish channel and take every
 * unconfirmed message with it, and each question about a missing one
 * costs the RPC channel.  Returns false with *error when it does not exist
 * or when the connection failed (mqtx_broker_is_open() tells which).
 */
bool
mqtx_broker_exchange_exists(BrokerConnection *conn, const char *name, char **error)
{
	ListCell   *lc;
	MissingExchange *missing;
	MemoryContext old;
	bool		exists;

	if (name[0] == '\0')
		return true;			/* the default exchange always exists */
	foreach(lc, conn->known_exchanges)
		if (strcmp(lfirst(lc), name) == 0)
			return true;
	missing = missing_exchange(conn, name);
	if (missing != NULL && GetCurrentTimestamp() < missing->recheck_at)
	{
		*error = pstrdup(missing->reason);
		return false;
	}
	if (!ensure_channel(conn, RPC_CHANNEL, error))
		return false;

	expect_reply(conn);
	amqp_exchange_declare(conn->state, RPC_CHANNEL, cstring_to_amqp_bytes(name),
						  amqp_cstring_bytes("direct"), true, false, false, false,
						  amqp_empty_table);
	exists = rpc_on_channel_succeeded(conn, psprintf("exchange \"%s\"", name), error);
	if (!exists && !conn->open)
		return false;

	old = MemoryContextSwitchTo(conn->cache_context);
	if (exists)
		conn->known_exchanges = lappend(conn->known_exchanges, pstrdup(name));
	else
	{
		if (missing == NULL)
		{
			missing = palloc0(sizeof(MissingExchange));
			missing->name = pstrdup(name);
			conn->missing_exchanges = lappend(conn->missing_exchanges, missing);
		}
		missing->reason = pstrdup(*error);
		missing->recheck_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
														  MISSING_EXCHANGE_RECHECK_MS);
	}
	MemoryContextSwitchTo(old);
	if (exists && missing != NULL)
		conn->missing_exchanges = list_delete_ptr(conn->missing_exchanges, missing);
	return exists;
}

/*
 * A message's fate may be decided while another batch's step is running:
 * its reason goes where the message itself lives.
 */
static void
set_message_error(BrokerMessage *message, PublishOutcome outcome,
				  const char *error)
{
	message->outcome = outcome;
	message->error = MemoryContextStrdup(message->context, error);
}

static void
track_unsettled(BrokerConnection *conn, BrokerMessage *message)
{
	if (conn->unsettled_count == conn->unsettled_capacity)
	{
		conn->unsettled_capacity = Max(64, conn->unsettled_capacity * 2);
		conn->unsettled = conn->unsettled == NULL ?
			MemoryContextAlloc(TopMemoryContext,
							   sizeof(BrokerMessage *) * conn->unsettled_capacity) :
			repalloc(conn->unsettled,
					 sizeof(BrokerMessage *) * conn->unsettled_capacity);
	}
	conn->unsettled[conn->unsettled_count++] = message;
}

/*
 * The headers as an AMQP table, if they fit in a header frame of the size
 * this connection negotiated: rabbitmq-c finds out only after the publish
 * method went out, which loses the channel.
 */
static bool
headers_fit_frame(BrokerConnection *conn, Jsonb *headers, amqp_table_t *table,
				  char **reason)
{
	amqp_bytes_t buffer;
	size_t		offset = 0;

	if (!headers_to_table(headers, table, reason))
		return false;
	buffer.len = Max(amqp_get_frame_max(conn->state) - PROPERTIES_RESERVE, 0);
	buffer.bytes = palloc(Max(buffer.len, 1));
	if (amqp_encode_table(buffer, table, &offset) != AMQP_STATUS_OK)
	{
		*reason = psprintf("the headers take more than the %zu bytes a header frame of this broker leaves them",
						   buffer.len);
		pfree(buffer.bytes);
		return false;
	}
	pfree(buffer.bytes);
	return true;
}

/*
 * Send one message on the confirm channel, without waiting for its
 * confirm.  Returns false only when the connection or channel failed (stop
 * sending); a message that cannot be encoded is marked PUBLISH_REJECTED
 * and sending goes on.  The message must stay allocated until it settles
 * or the connection is dropped; its body may be freed once this returns.
 */
bool
mqtx_broker_publish(BrokerConnection *conn, BrokerMessage *message, char **error)
{
	amqp_basic_properties_t props;
	amqp_bytes_t body;
	int			rc;

	if (!ensure_channel(conn, PUBLISH_CHANNEL, error))
		return false;

	memset(&props, 0, sizeof(props));
	props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG |
		AMQP_BASIC_MESSAGE_ID_FLAG | AMQP_BASIC_TIMESTAMP_FLAG |
		AMQP_BASIC_APP_ID_FLAG;
	props.content_type = amqp_cstring_bytes("application/json");
	props.delivery_mode = AMQP_DELIVERY_PERSISTENT;
	props.message_id = amqp_cstring_bytes((char *) message->message_id);
	props.timestamp = (uint64_t) message->timestamp;
	props.app_id = amqp_cstring_bytes("mqtx");
	if (message->headers != NULL)
	{
		char	   *reason;

		if (!headers_fit_frame(conn, message->headers, &props.headers, &reason))
		{
			set_message_error(message, PUBLISH_REJECTED, reason);
			return true;
		}
		props._flags |= AMQP_BASIC_HEADERS_FLAG;
	}
	body = server_text_to_amqp_bytes(message->body, message->body_len);

	conn->io_error = NULL;
	rc = amqp_basic_publish(conn->state, PUBLISH_CHANNEL,
							cstring_to_amqp_bytes(message->exchange),
							cstring_to_amqp_bytes(message->routing_key),
							true, false, &props, body);
	if (rc != AMQP_STATUS_OK)
	{
		*error = psprintf("publishing: %s", io_error_string(conn, rc));
		mark_connection_lost(conn);
		return false;
	}
	message->delivery_tag = conn->next_delivery_tag++;
	message->outcome = PUBLISH_UNCONFIRMED;
	message->settled = false;
	track_unsettled(conn, message);
	return true;
}

/*
 * The caller is about to free these messages: confirms that still come
 * for them are ignored.
 */
void
mqtx_broker_forget_messages(BrokerConnection *conn, BrokerMessage *messages, int count)
{
	int			kept = 0;

	if (conn == NULL)
		return;
	for (int i = 0; i < conn->unsettled_count; i++)
	{
		BrokerMessage *m = conn->unsettled[i];

		if (m < messages || m >= messages + count)
			conn->unsettled[kept++] = m;
	}
	conn->unsettled_count = kept;
}

/*
 * Apply a basic.ack or basic.nack; "multiple" covers every tag up to and
 * including delivery_tag.  A message already returned keeps that outcome:
 * RabbitMQ acks an unroutable message after returning it.
 */
static void
apply_confirm(BrokerConnection *conn, uint64 delivery_tag, bool multiple,
			  PublishOutcome outcome)
{
	int			kept = 0;

	for (int i = 0; i < conn->unsettled_count; i++)
	{
		BrokerMessage *m = conn->unsettled[i];

		if (m->delivery_tag == delivery_tag ||
			(multiple && m->delivery_tag < delivery_tag))
		{
			if (m->outcome == PUBLISH_UNCONFIRMED && outcome == PUBLISH_NACKED)
				set_message_error(m, outcome, "the broker refused the message (basic.nack)");
			else if (m->outcome == PUBLISH_UNCONFIRMED)
				m->outcome = outcome;
			m->settled = true;
		}
		else
			conn->unsettled[kept++] = m;
	}
	conn->unsettled_count = kept;
}

/*
 * Read the content (header and body frames) that follows a basic.return or
 * basic.deliver on the channel, waiting for it at most mqtx.connect_timeout
 * at a time.
 */
static amqp_rpc_reply_t
read_content(BrokerConnection *conn, amqp_channel_t channel, amqp_message_t *message)
{
	amqp_rpc_reply_t reply;

	expect_reply(conn);
	reply = amqp_read_message(conn->state, channel, message, 0);
	expect_no_reply(conn);
	return reply;
}

/*
 * basic.return: the message body follows and must be read off the wire.
 * It carries no delivery tag, so it is matched on its message_id.
 */
static bool
apply_return(BrokerConnection *conn, amqp_basic_return_t *ret, char **error)
{
	amqp_message_t returned;
	amqp_rpc_reply_t reply;
	char	   *message_id;
	char	   *reason;

	reason = psprintf("unroutable: the broker returned it (%u %.*s) from exchange \"%.*s\" with routing key \"%.*s\"",
					  ret->reply_code,
					  (int) ret->reply_text.len, (char *) ret->reply_text.bytes,
					  (int) ret->exchange.len, (char *) ret->exchange.bytes,
					  (int) ret->routing_key.len, (char *) ret->routing_key.bytes);

	reply = read_content(conn, PUBLISH_CHANNEL, &returned);
	if (reply.reply_type != AMQP_RESPONSE_NORMAL)
	{
		*error = handle_failed_reply(conn, PUBLISH_CHANNEL, reply,
									 "reading a returned message");
		return false;
	}
	message_id = (returned.properties._flags & AMQP_BASIC_MESSAGE_ID_FLAG) ?
		amqp_bytes_to_cstring(returned.properties.message_id) : NULL;
	amqp_destroy_message(&returned);

	for (int i = 0; message_id != NULL && i < conn->unsettled_count; i++)
	{
		BrokerMessage *m = conn->unsettled[i];

		if (m->outcome == PUBLISH_UNCONFIRMED &&
			strcmp(m->message_id, message_id) == 0)
		{
			/* the broker's verdict: its ack only follows, and may be lost */
			set_message_error(m, PUBLISH_RETURNED, reason);
			m->settled = true;
			break;
		}
	}
	return true;
}

static void
set_blocked(BrokerConnection *conn, bool blocked, amqp_bytes_t reason)
{
	conn->blocked = blocked;
	snprintf(conn->blocked_reason, sizeof(conn->blocked_reason), "%.*s",
			 (int) reason.len, (char *) reason.bytes);
}

/*
 * A delivery nobody is waiting for (its channel is closing, or the worker
 * is not consuming right now): read its content, so that the frames that
 * follow make sense, and drop it.  Unacknowledged, it goes back to its
 * queue when its channel closes.
 */
static bool
discard_delivery(BrokerConnection *conn, amqp_channel_t channel, char **error)
{
	amqp_message_t message;
	amqp_rpc_reply_t reply = read_content(conn, channel, &message);

	if (reply.reply_type == AMQP_RESPONSE_NORMAL)
	{
		amqp_destroy_message(&message);
		return true;
	}
	*error = handle_failed_reply(conn, channel, reply, "reading a delivery");
	return conn->open;
}

/*
 * The broker cancelled a consumer (its queue was deleted, or it is a
 * quorum queue whose leader moved away): its channel is closed here, which
 * hands its unacknowledged deliveries back, and reported as lost.
 */
static void
accept_cancel(BrokerConnection *conn, amqp_channel_t channel,
			  amqp_basic_cancel_t *cancel)
{
	char	   *tag = amqp_bytes_to_cstring(cancel->consumer_tag);
	char	   *ignored;

	conn->lost_channel = channel;
	snprintf(conn->lost_channel_reason, sizeof(conn->lost_channel_reason),
			 "the broker cancelled the consumer of queue \"%s\" (was the queue deleted?)",
			 tag);
	expect_reply(conn);
	amqp_channel_close(conn->state, channel, AMQP_REPLY_SUCCESS);
	(void) rpc_succeeded(conn, channel, "closing a cancelled consumer's channel", &ignored);
	conn->channel_open[channel] = false;
}

/*
 * Handle one frame the broker sent unprompted (anything but a delivery).
 * Returns false when the publish channel or the connection closed (with
 * *error set).
 */
static bool
handle_frame(BrokerConnection *conn, amqp_frame_t *frame, char **error)
{
	void	   *decoded = frame->payload.method.decoded;

	if (frame->channel >= MAX_CHANNELS)
	{
		*error = psprintf("the broker sent a frame on channel %u, which mqtx never opened",
						  frame->channel);
		mark_connection_lost(conn);
		return false;
	}
	if (frame->frame_type != AMQP_FRAME_METHOD)
		return true;

	switch (frame->payload.method.id)
	{
		case AMQP_BASIC_ACK_METHOD:
			apply_confirm(conn, ((amqp_basic_ack_t *) decoded)->delivery_tag,
						  ((amqp_basic_ack_t *) decoded)->multiple, PUBLISH_ACKED);
			return true;
		case AMQP_BASIC_NACK_METHOD:
			apply_confirm(conn, ((amqp_basic_nack_t *) decoded)->delivery_tag,
						  ((amqp_basic_nack_t *) decoded)->multiple, PUBLISH_NACKED);
			return true;
		case AMQP_BASIC_RETURN_METHOD:
			return apply_return(conn, decoded, error);
		case AMQP_CONNECTION_BLOCKED_METHOD:
			set_blocked(conn, true, ((amqp_connection_blocked_t *) decoded)->reason);
			return true;
		case AMQP_CONNECTION_UNBLOCKED_METHOD:
			set_blocked(conn, false, amqp_empty_bytes);
			return true;
		case AMQP_BASIC_CANCEL_METHOD:
			accept_cancel(conn, frame->channel, decoded);
			if (!conn->open)
				*error = pstrdup("the connection failed while closing a cancelled consumer's channel");
			return conn->open;
		case AMQP_BASIC_DELIVER_METHOD:
			/* not awaited here: its content must still be read off the wire */
			return discard_delivery(conn, frame->channel, error);
		case AMQP_CHANNEL_CLOSE_METHOD:
		case AMQP_CONNECTION_CLOSE_METHOD:
			{
				char	   *description = describe_close(frame->channel == PUBLISH_CHANNEL ?
														 "while publishing" : "unprompted",
														 frame->payload.method.id,
														 decoded);

				accept_close(conn, frame->channel, frame->payload.method.id,
							 description, close_code(frame->payload.method.id, decoded),
							 true);
				if (frame->channel == PUBLISH_CHANNEL || !conn->open)
				{
					*error = description;
					/* an exchange the relay thought it knew may be gone */
					mqtx_broker_forget_exchanges(conn);
					return false;
				}
				return true;
			}
		default:
			return true;
	}
}

/*
 * Has every message sent from the array been acked or nacked?  Confirms
 * are taken in by mqtx_broker_wait.
 */
bool
mqtx_broker_all_settled(BrokerMessage *messages, int count)
{
	for (int i = 0; i < count; i++)
		if (messages[i].outcome != PUBLISH_NOT_SENT &&
			messages[i].outcome != PUBLISH_REJECTED &&
			!messages[i].settled)
			return false;
	return true;
}

/*
 * The next frame the broker sent, waiting for it until the deadline (0:
 * not at all) in WaitLatchOrSocket, in slices short enough to send
 * heartbeats on time.  Returns AMQP_STATUS_OK with *frame set,
 * AMQP_STATUS_TIMEOUT when the deadline passed or the latch was set (then
 * *woken is true and the latch is reset: the caller acts on the wake-up),
 * or a library error.  Termination and cancel requests are served here,
 * between library calls.
 */
static int
next_frame(BrokerConnection *conn, amqp_frame_t *frame, TimestampTz deadline,
		   bool *woken)
{
	long		slice_ms = mqtx_heartbeat > 0 ? mqtx_heartbeat * 1000L / 2 : 1000L;

	*woken = false;
	for (;;)
	{
		struct timeval no_wait = {0, 0};
		long		timeout_ms;
		int			events;
		int			rc;

		if (!conn->open)
			return AMQP_STATUS_CONNECTION_CLOSED;
		if (!amqp_frames_enqueued(conn->state) && !amqp_data_in_buffer(conn->state))
			amqp_maybe_release_buffers(conn->state);
		conn->io_error = NULL;
		rc = amqp_simple_wait_frame_noblock(conn->state, frame, &no_wait);
		if (rc != AMQP_STATUS_TIMEOUT)
			return rc;

		/*
		 * Asked not to wait, the library never notices a silent broker
		 * (it compares its heartbeat deadline only with the wait's): two
		 * heartbeat intervals without a byte mean the connection is dead.
		 */
		if (amqp_get_heartbeat(conn->state) > 0 &&
			TimestampDifferenceExceeds(conn->last_received_at, GetCurrentTimestamp(),
									   2 * 1000 * amqp_get_heartbeat(conn->state)))
			return AMQP_STATUS_HEARTBEAT_TIMEOUT;

		timeout_ms = deadline == 0 ? 0 :
			TimestampDifferenceMilliseconds(GetCurrentTimestamp(), deadline);
		if (timeout_ms <= 0)
			return AMQP_STATUS_TIMEOUT;
		events = WaitLatchOrSocket(MyLatch,
								   WL_LATCH_SET | WL_SOCKET_READABLE | WL_TIMEOUT |
								   WL_EXIT_ON_PM_DEATH,
								   amqp_get_sockfd(conn->state),
								   Min(timeout_ms, slice_ms),
								   wait_event_for(BROKER_WAIT_READ));
		if (events & WL_LATCH_SET)
		{
			ResetLatch(MyLatch);
			CHECK_FOR_INTERRUPTS();
			*woken = true;
			return AMQP_STATUS_TIMEOUT;
		}
	}
}

static void
lose_connection(BrokerConnection *conn, const char *what, int rc, char **error)
{
	*error = psprintf("%s: %s", what, io_error_string(conn, rc));
	mark_connection_lost(conn);
}

/*
 * Take in what the broker sent (confirms, returns, blocked and unblocked,
 * closes), waiting for it until the deadline when nothing has come yet (0:
 * not at all).  Returns once something was taken in, the deadline passed
 * or the latch was set; false when the connection or the publish channel
 * failed.  Heartbeats go out on the way.
 */
bool
mqtx_broker_wait(BrokerConnection *conn, TimestampTz deadline, char **error)
{
	bool		taken = false;

	for (;;)
	{
		amqp_frame_t frame;
		bool		woken;
		int			rc = next_frame(conn, &frame, taken ? 0 : deadline, &woken);

		if (rc == AMQP_STATUS_TIMEOUT)
			return true;
		if (rc != AMQP_STATUS_OK)
		{
			lose_connection(conn, "broker connection lost", rc, error);
			return false;
		}
		if (!handle_frame(conn, &frame, error))
			return false;
		taken = true;
	}
}

/*
 * Header tables nest at most this deep; a deeper one makes the delivery
 * poison.  Far more than any real header needs, and it bounds the
 * recursion below.  It does not bound rabbitmq-c 0.11's own decoder,
 * which recurses to any depth a frame can hold (some 20,000 levels in
 * the default 128 kB frame, a few MB of stack: within the 8 MB a process
 * has, but a reason to keep frame_max at its default).
 */
#define MAX_HEADER_DEPTH 64

/* UTF-8 text without NUL bytes */
static bool
is_plain_text(const char *data, int len)
{
	return memchr(data, '\0', len) == NULL && pg_verify_mbstr(PG_UTF8, data, len, true);
}

/*
 * Bytes from the wire as a string: themselves when they are plain text
 * (and do not begin with "hex:"), else "hex:" and their hexadecimal
 * digits.  What the consumer stores must be valid text (pg_restore of a
 * table holding invalid UTF-8 fails), and a NUL would cut a message id
 * short, so that two different messages shared one dedupe key.
 */
static char *
wire_string(amqp_bytes_t bytes)
{
	const char *data = bytes.bytes;
	int			len = (int) bytes.len;

	/* a string that starts like an encoded one is encoded too */
	if (is_plain_text(data, len) && !(len >= 4 && memcmp(data, "hex:", 4) == 0))
		return pnstrdup(data, len);
	return mqtx_hex_string(data, len);
}

/*
 * AMQP field values as JSON, for the headers handed to a consumer's
 * handler.  Integers of any width become numbers, byte arrays and
 * timestamps strings and numbers, decimals numbers.  Returns false when
 * the table nests deeper than MAX_HEADER_DEPTH.
 */
static bool field_to_json(StringInfo out, amqp_field_value_t *field, int depth);

static bool
table_to_json(StringInfo out, amqp_table_t *table, int depth)
{
	if (depth > MAX_HEADER_DEPTH)
		return false;
	appendStringInfoChar(out, '{');
	for (int i = 0; i < table->num_entries; i++)
	{
		if (i > 0)
			appendStringInfoString(out, ", ");
		escape_json(out, wire_string(table->entries[i].key));
		appendStringInfoString(out, ": ");
		if (!field_to_json(out, &table->entries[i].value, depth))
			return false;
	}
	appendStringInfoChar(out, '}');
	return true;
}

static bool
field_to_json(StringInfo out, amqp_field_value_t *field, int depth)
{
	switch (field->kind)
	{
		case AMQP_FIELD_KIND_BOOLEAN:
			appendStringInfoString(out, field->value.boolean ? "true" : "false");
			break;
		case AMQP_FIELD_KIND_I8:
			appendStringInfo(out, "%d", field->value.i8);
			break;
		case AMQP_FIELD_KIND_U8:
			appendStringInfo(out, "%u", field->value.u8);
			break;
		case AMQP_FIELD_KIND_I16:
			appendStringInfo(out, "%d", field->value.i16);
			break;
		case AMQP_FIELD_KIND_U16:
			appendStringInfo(out, "%u", field->value.u16);
			break;
		case AMQP_FIELD_KIND_I32:
			appendStringInfo(out, "%d", field->value.i32);
			break;
		case AMQP_FIELD_KIND_U32:
			appendStringInfo(out, "%u", field->value.u32);
			break;
		case AMQP_FIELD_KIND_I64:
			appendStringInfo(out, INT64_FORMAT, (int64) field->value.i64);
			break;
		case AMQP_FIELD_KIND_U64:
		case AMQP_FIELD_KIND_TIMESTAMP:
			appendStringInfo(out, UINT64_FORMAT, (uint64) field->value.u64);
			break;
		case AMQP_FIELD_KIND_F32:
		case AMQP_FIELD_KIND_F64:
			{
				double		d = field->kind == AMQP_FIELD_KIND_F32 ?
					field->value.f32 : field->value.f64;

				if (isfinite(d))
					appendStringInfo(out, "%.17g", d);
				else
					appendStringInfoString(out, "null");
				break;
			}
		case AMQP_FIELD_KIND_DECIMAL:
			{
				double		d = field->value.decimal.value;

				for (int i = 0; i < field->value.decimal.decimals; i++)
					d /= 10;
				appendStringInfo(out, "%.17g", d);
				break;
			}
		case AMQP_FIELD_KIND_UTF8:
		case AMQP_FIELD_KIND_BYTES:
			escape_json(out, wire_string(field->value.bytes));
			break;
		case AMQP_FIELD_KIND_ARRAY:
			if (depth + 1 > MAX_HEADER_DEPTH)
				return false;
			appendStringInfoChar(out, '[');
			for (int i = 0; i < field->value.array.num_entries; i++)
			{
				if (i > 0)
					appendStringInfoString(out, ", ");
				if (!field_to_json(out, &field->value.array.entries[i], depth + 1))
					return false;
			}
			appendStringInfoChar(out, ']');
			break;
		case AMQP_FIELD_KIND_TABLE:
			return table_to_json(out, &field->value.table, depth + 1);
		default:
			appendStringInfoString(out, "null");
			break;
	}
	return true;
}

/*
 * The original id of a redriven message: a string header at the top level.
 */
static char *
redriven_from(amqp_table_t *headers)
{
	for (int i = 0; i < headers->num_entries; i++)
	{
		amqp_table_entry_t *entry = &headers->entries[i];

		if (entry->key.len == strlen(MQTX_REDRIVEN_FROM_HEADER) &&
			memcmp(entry->key.bytes, MQTX_REDRIVEN_FROM_HEADER, entry->key.len) == 0 &&
			(entry->value.kind == AMQP_FIELD_KIND_UTF8 ||
			 entry->value.kind == AMQP_FIELD_KIND_BYTES) &&
			entry->value.value.bytes.len > 0)
		{
			amqp_bytes_t id = entry->value.value.bytes;

			/* a dedupe key already, written by mqtx.redrive: taken as it is */
			return is_plain_text(id.bytes, id.len) ? pnstrdup(id.bytes, id.len) :
				wire_string(id);
		}
	}
	return NULL;
}


/*
 * Start consuming a queue on a channel of its own, with manual acks and at
 * most "prefetch" unacknowledged deliveries; the consumer tag is the queue
 * name.  Returns the channel, or 0 when the broker refused (the connection
 * is still open: mqtx_broker_is_open) or the connection failed.
 */
int
mqtx_broker_consume(BrokerConnection *conn, const char *queue, int prefetch,
			   char **error)
{
	int			channel = 0;

	if (!conn->open)
	{
		*error = pstrdup("the broker connection is closed");
		return 0;
	}
	/*
	 * A channel number is never used twice on a connection: a new channel
	 * numbers its deliveries from 1 again, and a tag of the old one (a
	 * delivery held for a retry, or read while the old channel closed)
	 * would acknowledge another message.  When they run out, the
	 * connection is replaced.
	 */
	if (conn->next_consume_channel < FIRST_CONSUME_CHANNEL)
		conn->next_consume_channel = FIRST_CONSUME_CHANNEL;
	if (conn->next_consume_channel > conn->channel_max)
	{
		*error = psprintf("consuming queue \"%s\": every channel number of this connection has been used; connecting again",
						  queue);
		mark_connection_lost(conn);
		return 0;
	}
	channel = conn->next_consume_channel++;
	if (!ensure_channel(conn, channel, error))
		return 0;
	expect_reply(conn);
	amqp_basic_qos(conn->state, channel, 0, (uint16_t) prefetch, false);
	if (rpc_succeeded(conn, channel, "setting the prefetch count", error))
	{
		expect_reply(conn);
		amqp_basic_consume(conn->state, channel, cstring_to_amqp_bytes(queue),
						   cstring_to_amqp_bytes(queue), false, false, false,
						   amqp_empty_table);
		if (rpc_succeeded(conn, channel, psprintf("consuming queue \"%s\"", queue), error))
			return channel;
	}
	/* the caller has the refusal: it is not a channel lost later */
	if (conn->lost_channel == channel)
		conn->lost_channel = 0;
	return 0;
}

/*
 * Stop consuming: close the queue's channel.  The broker hands its
 * unacknowledged deliveries back to the queue.
 */
bool
mqtx_broker_cancel(BrokerConnection *conn, int channel, const char *queue, char **error)
{
	if (!conn->open || !conn->channel_open[channel])
		return conn->open;
	expect_reply(conn);
	amqp_channel_close(conn->state, channel, AMQP_REPLY_SUCCESS);
	conn->channel_open[channel] = false;
	return rpc_succeeded(conn, channel,
						 psprintf("closing the channel of queue \"%s\"", queue),
						 error) || conn->open;
}

/* Can deliveries that came on this channel still be acknowledged? */
bool
mqtx_broker_channel_is_open(BrokerConnection *conn, int channel)
{
	return conn != NULL && conn->open && channel > 0 && channel < MAX_CHANNELS &&
		conn->channel_open[channel];
}

static void
copy_content(amqp_message_t *message, BrokerDelivery *delivery)
{
	amqp_basic_properties_t *props = &message->properties;

	if ((props->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) && props->message_id.len > 0)
		delivery->message_id = wire_string(props->message_id);
	if (props->_flags & AMQP_BASIC_HEADERS_FLAG)
	{
		StringInfoData json;

		initStringInfo(&json);
		if (table_to_json(&json, &props->headers, 1))
			delivery->headers_json = json.data;
		else
			delivery->headers_error = psprintf("headers nest deeper than %d levels",
											   MAX_HEADER_DEPTH);
		delivery->redriven_from = redriven_from(&props->headers);
	}
	delivery->body_len = (int) message->body.len;
	delivery->body = palloc(delivery->body_len + 1);
	memcpy(delivery->body, message->body.bytes, delivery->body_len);
	delivery->body[delivery->body_len] = '\0';
}

/*
 * A basic.deliver came: copy it, and read and copy its content, in the
 * current memory context.  Returns 1, or 0 when the broker closed the
 * delivery's channel meanwhile, or -1 when the connection failed.
 */
static int
read_delivery(BrokerConnection *conn, amqp_frame_t *frame,
			  BrokerDelivery *delivery, char **error)
{
	amqp_basic_deliver_t *deliver = frame->payload.method.decoded;
	amqp_message_t message;
	amqp_rpc_reply_t reply;

	memset(delivery, 0, sizeof(*delivery));
	delivery->channel = frame->channel;
	/* the consumer tag is the queue name mqtx sent: taken as it is */
	delivery->queue = amqp_bytes_to_cstring(deliver->consumer_tag);
	delivery->delivery_tag = deliver->delivery_tag;
	delivery->redelivered = deliver->redelivered;
	delivery->exchange = wire_string(deliver->exchange);
	delivery->routing_key = wire_string(deliver->routing_key);

	reply = read_content(conn, delivery->channel, &message);
	if (reply.reply_type != AMQP_RESPONSE_NORMAL)
	{
		*error = handle_failed_reply(conn, delivery->channel, reply, "reading a delivery");
		return conn->open ? 0 : -1;
	}
	/* queued while its channel closed: the broker has it back already */
	if (!conn->channel_open[delivery->channel])
	{
		amqp_destroy_message(&message);
		return 0;
	}
	copy_content(&message, delivery);
	amqp_destroy_message(&message);
	return 1;
}

/*
 * Wait up to timeout_ms for the next delivery and copy it, in the current
 * memory context, into *delivery.  Returns 1 for a delivery; 0 for none
 * (the time passed, or the latch was set); BROKER_CHANNEL_LOST when the
 * broker closed a queue's channel or cancelled its consumer
 * (delivery->channel says which, *error why; the other queues go on); -1
 * when the connection failed (*error says why).
 */
int
mqtx_broker_next_delivery(BrokerConnection *conn, int timeout_ms,
					 BrokerDelivery *delivery, char **error)
{
	TimestampTz deadline = timeout_ms > 0 ?
		TimestampTzPlusMilliseconds(GetCurrentTimestamp(), timeout_ms) : 0;

	for (;;)
	{
		amqp_frame_t frame;
		bool		woken;
		int			rc;

		if (conn->lost_channel != 0)
		{
			memset(delivery, 0, sizeof(*delivery));
			delivery->channel = conn->lost_channel;
			*error = pstrdup(conn->lost_channel_reason);
			conn->lost_channel = 0;
			return BROKER_CHANNEL_LOST;
		}
		rc = next_frame(conn, &frame, deadline, &woken);
		if (rc == AMQP_STATUS_TIMEOUT)
			return 0;
		if (rc != AMQP_STATUS_OK)
		{
			lose_connection(conn, "consuming", rc, error);
			return -1;
		}
		if (frame.frame_type == AMQP_FRAME_METHOD &&
			frame.payload.method.id == AMQP_BASIC_DELIVER_METHOD &&
			frame.channel < MAX_CHANNELS)
		{
			rc = read_delivery(conn, &frame, delivery, error);
			if (rc != 0)
				return rc;
			continue;
		}
		/* a consumer publishes nothing: only a lost connection matters */
		if (!handle_frame(conn, &frame, error) && !conn->open)
			return -1;
	}
}

/*
 * Acknowledge one delivery, or with "multiple" every one up to it on its
 * channel; or reject one back onto its queue.  A delivery whose channel
 * has closed needs neither: the broker has requeued it.
 */
bool
mqtx_broker_ack(BrokerConnection *conn, int channel, uint64 delivery_tag,
		   bool multiple, char **error)
{
	int			rc;

	if (!conn->open)
	{
		*error = pstrdup("the broker connection is closed");
		return false;
	}
	if (!mqtx_broker_channel_is_open(conn, channel))
		return true;
	rc = amqp_basic_ack(conn->state, channel, delivery_tag, multiple);
	if (rc == AMQP_STATUS_OK)
		return true;
	lose_connection(conn, "acknowledging", rc, error);
	return false;
}

bool
mqtx_broker_requeue(BrokerConnection *conn, int channel, uint64 delivery_tag,
			   char **error)
{
	int			rc;

	if (!conn->open)
	{
		*error = pstrdup("the broker connection is closed");
		return false;
	}
	if (!mqtx_broker_channel_is_open(conn, channel))
		return true;
	rc = amqp_basic_reject(conn->state, channel, delivery_tag, true);
	if (rc == AMQP_STATUS_OK)
		return true;
	lose_connection(conn, "requeueing", rc, error);
	return false;
}

/*
 * Send a heartbeat when one is due, so that a long stretch of database
 * work (a large batch, slow handlers) does not make the broker close the
 * connection for silence.  This runs inside the consumer's transaction,
 * so only when the socket takes the frame at once; a full socket is the
 * broker's silence, not ours.  Returns false when the connection failed.
 */
bool
mqtx_broker_keep_alive(BrokerConnection *conn, char **error)
{
	amqp_frame_t heartbeat;
	int			interval = amqp_get_heartbeat(conn->state);
	struct pollfd writable;
	TimestampTz now;
	int			rc;

	if (!conn->open || interval <= 0)
		return conn->open;
	now = GetCurrentTimestamp();
	if (!TimestampDifferenceExceeds(conn->last_keep_alive, now, interval * 1000 / 2))
		return true;
	writable.fd = amqp_get_sockfd(conn->state);
	writable.events = POLLOUT;
	if (poll(&writable, 1, 0) != 1 || !(writable.revents & POLLOUT))
		return true;
	memset(&heartbeat, 0, sizeof(heartbeat));
	heartbeat.frame_type = AMQP_FRAME_HEARTBEAT;
	heartbeat.channel = 0;
	rc = amqp_send_frame(conn->state, &heartbeat);
	if (rc != AMQP_STATUS_OK)
	{
		lose_connection(conn, "sending a heartbeat", rc, error);
		return false;
	}
	conn->last_keep_alive = now;
	return true;
}

/*
 * GUC check hook for mqtx.broker_url.  An empty URL is allowed and means
 * "no broker configured yet".  The rejected value is not repeated in the
 * detail: it contains the password.
 */
static bool
check_broker_url(char **newval, void **extra, GucSource source)
{
	char	   *reason;

	if (*newval == NULL || (*newval)[0] == '\0')
		return true;
	if (mqtx_broker_url_is_valid(*newval, &reason))
		return true;
	GUC_check_errdetail("%s", reason);
	GUC_check_errhint("The expected form is amqp[s]://user:password@host:port/vhost; "
					  "percent-encode reserved characters (the default vhost "
					  "\"/\" is written %%2f).");
	return false;
}

/*
 * What SHOW, current_setting() and pg_settings display: the URL with its
 * password masked, even to superusers and pg_read_all_settings members.
 */
static const char *
show_broker_url(void)
{
	char	   *masked = mqtx_redact_secrets(mqtx_broker_url);

	return masked ? masked : mqtx_broker_url;
}

/*
 * The broker's settings.  mqtx.broker_url holds a password: only
 * superusers set it, and what SHOW displays of it is masked.
 */
void
mqtx_broker_define_settings(void)
{
	DefineCustomStringVariable("mqtx.broker_url",
							   "URL of the RabbitMQ broker the workers connect to.",
							   "amqp://user:password@host:port/vhost, or amqps:// for TLS. "
							   "Empty means no broker is configured.",
							   &mqtx_broker_url,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL,
							   check_broker_url, NULL, show_broker_url);
	DefineCustomIntVariable("mqtx.confirm_timeout",
							"How long the relay waits for a message's publisher confirm before sending it again.",
							"Or three times the recent confirm latency, if longer. A message not confirmed in time has an unknown fate: it is sent again, without counting an attempt, and a confirm that comes later still counts.",
							&mqtx_confirm_timeout, 10000, 100, 600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("mqtx.connect_timeout",
							"Bound on connecting, logging in and each broker RPC.",
							NULL,
							&mqtx_connect_timeout, 5000, 100, 600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("mqtx.heartbeat",
							"AMQP heartbeat interval requested from the broker (0 disables).",
							NULL,
							&mqtx_heartbeat, 30, 0, 3600,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomStringVariable("mqtx.tls_ca_file",
							   "CA certificates (PEM) that verify the broker for amqps:// URLs.",
							   NULL,
							   &mqtx_tls_ca_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("mqtx.tls_cert_file",
							   "Client certificate (PEM) presented to the broker, if it asks for one.",
							   NULL,
							   &mqtx_tls_cert_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("mqtx.tls_key_file",
							   "Private key (PEM) of mqtx.tls_cert_file.",
							   NULL,
							   &mqtx_tls_key_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomBoolVariable("mqtx.tls_verify_peer",
							 "Verify the broker's certificate and host name for amqps:// URLs.",
							 NULL,
							 &mqtx_tls_verify_peer, true,
							 PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
}
