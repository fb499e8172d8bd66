/*-------------------------------------------------------------------------
 *
 * broker.c
 *	  The broker connection: URL parsing, the settings, connecting (TCP or
 *	  TLS) and disconnecting, the socket and every wait on it, RPCs and
 *	  the frames the broker sends unprompted, channel and connection
 *	  closes, and the topology declarations.
 *
 * Publishing (broker_publish.c) and consuming (broker_consume.c) drive
 * channels of this connection, and broker_fields.c converts values; all
 * four share broker_internal.h, and they alone include the rabbitmq-c
 * headers: the rest of mqtx sees plain C and PostgreSQL types through
 * broker.h.  Functions here report problems as text in *error (or
 * *reason) rather than with ereport(ERROR), so that a caller in the middle
 * of a broker exchange can decide what failure means.
 *
 * Every wait for the broker is made in WaitLatchOrSocket, never in the
 * library: a worker answers SIGTERM, cancellation and postmaster death
 * while it waits, and gives up a wait that would hold a transaction open.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <arpa/inet.h>
#include <poll.h>

#include <openssl/ssl.h>
#include <openssl/x509_vfy.h>

#include "access/xact.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "broker_internal.h"
#include "log_redact.h"

char	   *mqtx_broker_url = NULL;
int			mqtx_confirm_timeout = 10000;
int			mqtx_connect_timeout = 5000;
int			mqtx_heartbeat = 30;
char	   *mqtx_tls_ca_file = NULL;
char	   *mqtx_tls_cert_file = NULL;
char	   *mqtx_tls_key_file = NULL;
bool		mqtx_tls_verify_peer = true;

/* amqp_private.h: "try again when the socket is readable / writable" */
#define LIBRARY_SOCKET_NEEDREAD (-0x1301)
#define LIBRARY_SOCKET_NEEDWRITE (-0x1302)

/* A missing exchange is asked about again after this long. */
#define MISSING_EXCHANGE_RECHECK_MS 5000

typedef struct MissingExchange
{
	char	   *name;
	char	   *reason;
	TimestampTz recheck_at;
} MissingExchange;

/* Connections whose socket functions are ours, to find one from its socket */
static BrokerConnection *open_connections = NULL;

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
 * The URLs of mqtx.broker_url, in order: one, or several separated by
 * commas (the nodes of a cluster).  A comma separates two URLs only where
 * another amqp:// or amqps:// URL follows it, so a password may contain
 * one; blanks around the commas are dropped.  An empty setting is one
 * empty URL, which mqtx_broker_connect refuses as "not set".
 */
List *
mqtx_broker_addresses(const char *urls)
{
	List	   *addresses = NIL;
	const char *start = urls != NULL ? urls : "";

	for (;;)
	{
		const char *separator = start;
		const char *end;

		while (*separator != '\0' && !mqtx_starts_next_url(separator))
			separator++;
		end = separator;
		while (end > start && (end[-1] == ' ' || end[-1] == '\t'))
			end--;
		addresses = lappend(addresses, pnstrdup(start, end - start));
		if (*separator == '\0')
			return addresses;
		start = separator + 1;
		while (*start == ' ' || *start == '\t')
			start++;
	}
}

/*
 * Is this a usable value of mqtx.broker_url, every URL of it?  On failure
 * *reason says why (and, in a list, which URL), without repeating a URL:
 * it may carry a password.
 */
bool
mqtx_broker_url_is_valid(const char *urls, char **reason)
{
	List	   *addresses = mqtx_broker_addresses(urls);
	ListCell   *lc;

	foreach(lc, addresses)
	{
		struct amqp_connection_info info;

		if (parse_broker_url(lfirst(lc), &info, reason))
			continue;
		if (list_length(addresses) > 1)
			*reason = psprintf("URL %d of %d: %s", foreach_current_index(lc) + 1,
							   list_length(addresses), *reason);
		return false;
	}
	return true;
}

/*
 * "amqp://host:port", for log lines: never the user or password.  For a
 * list, each URL so, separated by ", ".
 */
char *
mqtx_broker_describe(const char *urls)
{
	List	   *addresses = mqtx_broker_addresses(urls);
	StringInfoData described;
	ListCell   *lc;

	initStringInfo(&described);
	foreach(lc, addresses)
	{
		const char *url = lfirst(lc);
		struct amqp_connection_info info;
		char	   *reason;

		if (described.len > 0)
			appendStringInfoString(&described, ", ");
		if (url[0] == '\0')
			appendStringInfoString(&described, "(no broker configured)");
		else if (!parse_broker_url(url, &info, &reason))
			appendStringInfoString(&described, "(invalid broker URL)");
		else
			appendStringInfo(&described, "%s%s:%d", info.ssl ? "amqps://" : "amqp://",
							 info.host, info.port);
	}
	return described.data;
}

/* The library's timeouts are timevals */
static struct timeval
timeval_from_ms(int ms)
{
	struct timeval tv;

	tv.tv_sec = ms / 1000;
	tv.tv_usec = (ms % 1000) * 1000;
	return tv;
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

/* The connection a socket belongs to, as the wrapped send and recv need */
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

/*
 * Put interruptible_send and interruptible_recv in front of the socket's
 * own, in a copy of its table kept in the connection, and remember the
 * connection for connection_of.
 */
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

/* The connection is going: connection_of must no longer find it */
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
 * library's own RPC timeout is the same): call this before a library call
 * that waits for one.  mqtx_broker_rpc_succeeded, or expect_no_reply,
 * ends the wait.
 */
void
mqtx_broker_expect_reply(BrokerConnection *conn)
{
	conn->reply_awaited_since = GetCurrentTimestamp();
	conn->reply_deadline = TimestampTzPlusMilliseconds(conn->reply_awaited_since,
													   mqtx_connect_timeout);
	conn->io_error = NULL;
}

/* No reply is awaited: the socket's recv must not wait at all */
static void
expect_no_reply(BrokerConnection *conn)
{
	conn->reply_deadline = 0;
}

/*
 * The text of a library status: the library's own, or ours when our send
 * or recv gave up (the library sees only a socket error then).
 */
const char *
mqtx_broker_io_error_string(BrokerConnection *conn, int status)
{
	if (conn->io_error != NULL && status == AMQP_STATUS_SOCKET_ERROR)
		return conn->io_error;
	return amqp_error_string2(status);
}

/*
 * The connection is unusable (a socket error, a timeout, a close by the
 * broker): every channel is gone, and the publish channel's unsettled
 * messages stay unconfirmed.  The caller reports why.
 */
void
mqtx_broker_mark_connection_lost(BrokerConnection *conn)
{
	conn->open = false;
	for (int channel = 0; channel < MAX_CHANNELS; channel++)
		if (channel != PUBLISH_CHANNEL)
			conn->channel_open[channel] = false;
	mqtx_broker_forget_publish_channel(conn, NULL);
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

/* The reply code of a channel.close or connection.close */
static uint16
close_code(amqp_method_number_t method, void *decoded)
{
	return method == AMQP_CHANNEL_CLOSE_METHOD ?
		((amqp_channel_close_t *) decoded)->reply_code :
		((amqp_connection_close_t *) decoded)->reply_code;
}

/*
 * A close as text for *error: "what" (what mqtx was doing), then the
 * broker's reply code and text.
 */
static char *
describe_close(const char *what, amqp_method_number_t method, void *decoded)
{
	amqp_bytes_t reply_text;

	if (method == AMQP_CHANNEL_CLOSE_METHOD)
	{
		reply_text = ((amqp_channel_close_t *) decoded)->reply_text;
		return psprintf("%s: broker closed the channel: %u %.*s", what,
						close_code(method, decoded),
						(int) reply_text.len, (char *) reply_text.bytes);
	}
	reply_text = ((amqp_connection_close_t *) decoded)->reply_text;
	return psprintf("%s: broker closed the connection: %u %.*s", what,
					close_code(method, decoded),
					(int) reply_text.len, (char *) reply_text.bytes);
}

/* Is this one of the channels that consume a queue? */
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
			mqtx_broker_forget_publish_channel(conn, refusal);
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
			mqtx_broker_mark_connection_lost(conn);
	}
	else
	{
		amqp_connection_close_ok_t ok = {0};

		mqtx_broker_forget_publish_channel(conn, refusal);
		(void) amqp_send_method(conn->state, 0,
								AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
		mqtx_broker_mark_connection_lost(conn);
	}
}

/*
 * Turn a failed RPC reply on a channel into connection state, and return
 * the text for *error, "what" (what mqtx was doing) first.  A timeout or a
 * socket error loses the connection; a close from the broker is accepted
 * and counts as a refusal (mqtx_broker_refused).
 */
char *
mqtx_broker_handle_failed_reply(BrokerConnection *conn, amqp_channel_t channel,
								amqp_rpc_reply_t reply, const char *what)
{
	char	   *error;

	switch (reply.reply_type)
	{
		case AMQP_RESPONSE_LIBRARY_EXCEPTION:
			/* timeouts and socket errors leave the connection unusable */
			error = psprintf("%s: %s", what,
							 mqtx_broker_io_error_string(conn, reply.library_error));
			mqtx_broker_mark_connection_lost(conn);
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
			mqtx_broker_mark_connection_lost(conn);
			return psprintf("%s: unexpected %s from broker", what,
							amqp_method_name(reply.reply.id));
		default:
			mqtx_broker_mark_connection_lost(conn);
			return psprintf("%s: no reply from broker", what);
	}
}

/*
 * Did the RPC just made on the channel succeed?  Ends the wait for its
 * reply and takes its time into the round-trip average.  If not, *error
 * says why and the connection's state follows the failure (see
 * mqtx_broker_handle_failed_reply).
 */
bool
mqtx_broker_rpc_succeeded(BrokerConnection *conn, amqp_channel_t channel, const char *what,
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
	*error = mqtx_broker_handle_failed_reply(conn, channel, reply, what);
	return false;
}

/*
 * Open the channel if it is not open; the publish channel in confirm mode.
 * Returns false, with *error, when the connection is closed or the broker
 * would not open it.
 */
bool
mqtx_broker_ensure_channel(BrokerConnection *conn, amqp_channel_t channel, char **error)
{
	if (!conn->open)
	{
		*error = pstrdup("the broker connection is closed");
		return false;
	}
	if (conn->channel_open[channel])
		return true;

	mqtx_broker_expect_reply(conn);
	amqp_channel_open(conn->state, channel);
	if (!mqtx_broker_rpc_succeeded(conn, channel, "opening a channel", error))
		return false;
	if (channel == PUBLISH_CHANNEL)
	{
		mqtx_broker_expect_reply(conn);
		amqp_confirm_select(conn->state, channel);
		if (!mqtx_broker_rpc_succeeded(conn, channel, "enabling publisher confirms", error))
			return false;
		conn->next_delivery_tag = 1;
		conn->unsettled_count = 0;
	}
	conn->channel_open[channel] = true;
	return true;
}

/*
 * Read the content (header and body frames) that follows a basic.return or
 * basic.deliver on the channel, waiting for it at most mqtx.connect_timeout
 * at a time.  Returns the library's reply, which a caller whose read failed
 * hands to mqtx_broker_handle_failed_reply.
 */
amqp_rpc_reply_t
mqtx_broker_read_content(BrokerConnection *conn, amqp_channel_t channel, amqp_message_t *message)
{
	amqp_rpc_reply_t reply;

	mqtx_broker_expect_reply(conn);
	reply = amqp_read_message(conn->state, channel, message, 0);
	expect_no_reply(conn);
	return reply;
}

/* An IPv4 or IPv6 address rather than a host name? */
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
		*error = psprintf("could not set up verification of the broker's address \"%s\"", host);
		return false;
	}
	return true;
}

/*
 * A TLS socket set up from the mqtx.tls_* settings, or NULL with *error.
 * Without mqtx.tls_ca_file nothing could verify the broker: that is an
 * error unless mqtx.tls_verify_peer is off.
 */
static amqp_socket_t *
new_tls_socket(amqp_connection_state_t state, const char *host, char **error)
{
	amqp_socket_t *socket = amqp_ssl_socket_new(state);
	int			rc;

	if (socket == NULL)
	{
		*error = pstrdup("could not create a TLS socket");
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
			*error = psprintf("could not load mqtx.tls_ca_file \"%s\": %s",
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
			*error = psprintf("could not load the client certificate \"%s\" or key \"%s\": %s",
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
	properties[1].value.value.bytes = mqtx_amqp_from_server_cstring(name);
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
	snprintf(conn->address, sizeof(conn->address), "%s%s:%d",
			 info.ssl ? "amqps://" : "amqp://", info.host, info.port);
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
			*error = pstrdup("could not create a TCP socket");
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
	mqtx_broker_expect_reply(conn);
	reply = amqp_login_with_properties(conn->state, info.vhost, 0,
									   AMQP_DEFAULT_FRAME_SIZE, mqtx_heartbeat,
									   &properties, AMQP_SASL_METHOD_PLAIN,
									   info.user, info.password);
	expect_no_reply(conn);
	if (reply.reply_type != AMQP_RESPONSE_NORMAL)
	{
		*error = mqtx_broker_handle_failed_reply(conn, 0, reply,
												 psprintf("logging in to %s:%d as \"%s\"",
														  info.host, info.port, info.user));
		goto fail;
	}
	conn->open = true;
	conn->channel_max = amqp_get_channel_max(conn->state);
	if (conn->channel_max <= 0 || conn->channel_max >= MAX_CHANNELS)
		conn->channel_max = MAX_CHANNELS - 1;
	if (!mqtx_broker_ensure_channel(conn, RPC_CHANNEL, error) ||
		!mqtx_broker_ensure_channel(conn, PUBLISH_CHANNEL, error))
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
			mqtx_broker_expect_reply(conn);
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

/* The node a connection is to, as "amqp://host:port" (no credentials) */
const char *
mqtx_broker_address(BrokerConnection *conn)
{
	return conn->address;
}

/* Is the connection still usable?  False for NULL */
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

/*
 * Get the RPC channel, where topology goes, ready for an RPC: open it if
 * need be, and await the reply.  False, with *error, when it cannot be.
 */
static bool
begin_rpc(BrokerConnection *conn, char **error)
{
	if (!mqtx_broker_ensure_channel(conn, RPC_CHANNEL, error))
		return false;
	mqtx_broker_expect_reply(conn);
	return true;
}

/* mqtx_broker_rpc_succeeded for the RPC channel */
static bool
rpc_on_channel_succeeded(BrokerConnection *conn, const char *what, char **error)
{
	return mqtx_broker_rpc_succeeded(conn, RPC_CHANNEL, what, error);
}

/*
 * Declare the exchange, or check that one declared already has this type
 * and durability.  Returns false with *error when the broker refused
 * (mqtx_broker_refused) or the connection failed, as do
 * mqtx_broker_declare_queue and mqtx_broker_bind.
 */
bool
mqtx_broker_declare_exchange(BrokerConnection *conn, const char *name,
							 const char *type, bool durable, char **error)
{
	if (!begin_rpc(conn, error))
		return false;
	amqp_exchange_declare(conn->state, RPC_CHANNEL,
						  mqtx_amqp_from_server_cstring(name),
						  mqtx_amqp_from_server_cstring(type),
						  false, durable, false, false, amqp_empty_table);
	return rpc_on_channel_succeeded(conn, psprintf("declaring exchange \"%s\"", name),
									error);
}

/*
 * Declare the queue, with "arguments" (a jsonb object, or NULL) as its
 * x-arguments; arguments that cannot be an AMQP table fail before
 * anything is sent.
 */
bool
mqtx_broker_declare_queue(BrokerConnection *conn, const char *name, bool durable,
						  Jsonb *arguments, char **error)
{
	amqp_table_t table = amqp_empty_table;

	if (arguments != NULL && !mqtx_amqp_headers_to_table(arguments, &table, error))
		return false;
	if (!begin_rpc(conn, error))
		return false;
	amqp_queue_declare(conn->state, RPC_CHANNEL, mqtx_amqp_from_server_cstring(name),
					   false, durable, false, false, table);
	return rpc_on_channel_succeeded(conn, psprintf("declaring queue \"%s\"", name),
									error);
}

/* Bind the queue to the exchange with the routing key */
bool
mqtx_broker_bind(BrokerConnection *conn, const char *queue, const char *exchange,
				 const char *routing_key, char **error)
{
	if (!begin_rpc(conn, error))
		return false;
	amqp_queue_bind(conn->state, RPC_CHANNEL, mqtx_amqp_from_server_cstring(queue),
					mqtx_amqp_from_server_cstring(exchange),
					mqtx_amqp_from_server_cstring(routing_key), amqp_empty_table);
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

/* What the connection remembers of an exchange found missing, or NULL */
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
	if (!begin_rpc(conn, error))
		return false;

	amqp_exchange_declare(conn->state, RPC_CHANNEL, mqtx_amqp_from_server_cstring(name),
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

/* connection.blocked or connection.unblocked, and the broker's reason */
static void
set_blocked(BrokerConnection *conn, bool blocked, amqp_bytes_t reason)
{
	conn->blocked = blocked;
	snprintf(conn->blocked_reason, sizeof(conn->blocked_reason), "%.*s",
			 (int) reason.len, (char *) reason.bytes);
}

/*
 * Handle one frame the broker sent unprompted, whoever was waiting for
 * the broker: confirms and returns go to broker_publish.c, cancels and
 * the deliveries nobody awaits here to broker_consume.c, blocks and closes
 * stay here.  Returns false when the publish channel or the connection
 * closed (with *error set).
 */
bool
mqtx_broker_handle_frame(BrokerConnection *conn, amqp_frame_t *frame, char **error)
{
	void	   *decoded = frame->payload.method.decoded;

	if (frame->channel >= MAX_CHANNELS)
	{
		*error = psprintf("the broker sent a frame on channel %u, which mqtx never opened",
						  frame->channel);
		mqtx_broker_mark_connection_lost(conn);
		return false;
	}
	if (frame->frame_type != AMQP_FRAME_METHOD)
		return true;

	switch (frame->payload.method.id)
	{
		case AMQP_BASIC_ACK_METHOD:
			mqtx_broker_apply_confirm(conn, ((amqp_basic_ack_t *) decoded)->delivery_tag,
									  ((amqp_basic_ack_t *) decoded)->multiple, PUBLISH_ACKED);
			return true;
		case AMQP_BASIC_NACK_METHOD:
			mqtx_broker_apply_confirm(conn, ((amqp_basic_nack_t *) decoded)->delivery_tag,
									  ((amqp_basic_nack_t *) decoded)->multiple, PUBLISH_NACKED);
			return true;
		case AMQP_BASIC_RETURN_METHOD:
			return mqtx_broker_apply_return(conn, decoded, error);
		case AMQP_CONNECTION_BLOCKED_METHOD:
			set_blocked(conn, true, ((amqp_connection_blocked_t *) decoded)->reason);
			return true;
		case AMQP_CONNECTION_UNBLOCKED_METHOD:
			set_blocked(conn, false, amqp_empty_bytes);
			return true;
		case AMQP_BASIC_CANCEL_METHOD:
			mqtx_broker_accept_cancel(conn, frame->channel, decoded);
			if (!conn->open)
				*error = pstrdup("the connection failed while closing a cancelled consumer's channel");
			return conn->open;
		case AMQP_BASIC_DELIVER_METHOD:
			/* not awaited here: its content must still be read off the wire */
			return mqtx_broker_discard_delivery(conn, frame->channel, error);
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
 * The next frame the broker sent, waiting for it until the deadline (0:
 * not at all) in WaitLatchOrSocket, in slices short enough to send
 * heartbeats on time.  Returns AMQP_STATUS_OK with *frame set,
 * AMQP_STATUS_TIMEOUT when the deadline passed or the latch was set (then
 * *woken is true and the latch is reset: the caller acts on the wake-up),
 * or a library error.  Termination and cancel requests are served here,
 * between library calls.
 */
int
mqtx_broker_next_frame(BrokerConnection *conn, amqp_frame_t *frame, TimestampTz deadline,
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
		 * Asked not to wait, the library never notices a silent broker (it
		 * compares its heartbeat deadline only with the wait's): two
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

/*
 * A library call failed with status rc while "what": set *error to say so
 * and mark the connection lost.
 */
void
mqtx_broker_lose_connection(BrokerConnection *conn, const char *what, int rc, char **error)
{
	*error = psprintf("%s: %s", what, mqtx_broker_io_error_string(conn, rc));
	mqtx_broker_mark_connection_lost(conn);
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
		int			rc = mqtx_broker_next_frame(conn, &frame, taken ? 0 : deadline, &woken);

		if (rc == AMQP_STATUS_TIMEOUT)
			return true;
		if (rc != AMQP_STATUS_OK)
		{
			mqtx_broker_lose_connection(conn, "broker connection lost", rc, error);
			return false;
		}
		if (!mqtx_broker_handle_frame(conn, &frame, error))
			return false;
		taken = true;
	}
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
		mqtx_broker_lose_connection(conn, "sending a heartbeat", rc, error);
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
	GUC_check_errhint("The expected form is amqp[s]://user:password@host:port/vhost, or several such URLs separated by commas; percent-encode reserved characters (the default vhost \"/\" is written %%2f).");
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
							   "URL of the RabbitMQ broker the workers connect to, or a comma-separated list of the URLs of a cluster's nodes.",
							   "amqp://user:password@host:port/vhost, or amqps:// for TLS. "
							   "The workers connect to the first URL that answers and move on when it fails. "
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
