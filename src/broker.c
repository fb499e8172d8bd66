/*-------------------------------------------------------------------------
 *
 * broker.c
 *	  Everything that speaks to rabbitmq-c: broker URL parsing, AMQP field
 *	  tables, connecting (TCP or TLS), declaring topology, publishing with
 *	  publisher confirms.
 *
 * This is the only file that includes the rabbitmq-c headers; the rest of
 * mqtx sees plain C and PostgreSQL types.  Functions here report problems
 * as text in *reason rather than with ereport(ERROR), so that a caller in
 * the middle of a broker exchange can decide what failure means.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>

#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#include <openssl/ssl.h>
#include <openssl/x509_vfy.h>

#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "mqtx.h"

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
 * One connection, two channels: one in confirm mode for publishing, one
 * for RPCs (topology, exchange checks).  A declaration the broker refuses
 * closes its channel; on a separate channel that never costs the confirms
 * of messages in flight.
 *
 * The struct lives in TopMemoryContext; the library's own state is
 * malloc'd by rabbitmq-c and must be released with broker_disconnect().
 */
struct BrokerConnection
{
	amqp_connection_state_t state;
	bool		open;			/* false once the connection is unusable */
	bool		channel_open[4];	/* indexed by channel number */
	uint64		next_delivery_tag;	/* confirm tags restart at 1 per channel */

	/*
	 * Messages sent and not yet acked or nacked, in delivery-tag order.  They
	 * belong to the caller, who keeps them alive until they settle or the
	 * connection is dropped.
	 */
	BrokerMessage **unsettled;
	int			unsettled_count;
	int			unsettled_capacity;

	MemoryContext cache_context;	/* holds known_exchanges */
	List	   *known_exchanges;	/* checked to exist on this connection */
	TimestampTz last_keep_alive;	/* when broker_keep_alive last sent */
};

#define PUBLISH_CHANNEL 1
#define RPC_CHANNEL 2
#define CONSUME_CHANNEL 3

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
broker_describe(const char *url)
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
 * The publish channel is gone: its unsettled messages will never be
 * confirmed (they stay PUBLISH_UNCONFIRMED for the caller to retry), and a
 * new channel starts its delivery tags again at 1.
 */
static void
forget_publish_channel(BrokerConnection *conn)
{
	conn->channel_open[PUBLISH_CHANNEL] = false;
	conn->unsettled_count = 0;
}

static void
mark_connection_lost(BrokerConnection *conn)
{
	conn->open = false;
	conn->channel_open[RPC_CHANNEL] = false;
	conn->channel_open[CONSUME_CHANNEL] = false;
	forget_publish_channel(conn);
}

/*
 * The broker closed a channel or the connection: acknowledge it as AMQP
 * requires and remember what is left usable.
 */
static void
accept_close(BrokerConnection *conn, amqp_channel_t channel,
			 amqp_method_number_t method)
{
	if (method == AMQP_CHANNEL_CLOSE_METHOD)
	{
		amqp_channel_close_ok_t ok = {0};

		if (channel == PUBLISH_CHANNEL)
			forget_publish_channel(conn);
		else
			conn->channel_open[channel] = false;
		if (amqp_send_method(conn->state, channel,
							 AMQP_CHANNEL_CLOSE_OK_METHOD, &ok) != AMQP_STATUS_OK)
			mark_connection_lost(conn);

		/*
		 * Deliveries the consumer holds are acknowledged by tags of the
		 * consume channel; a new channel would number its deliveries from 1
		 * again, and an old tag would ack another message.  Only a new
		 * connection is safe: the broker requeues what was unacked.
		 */
		if (channel == CONSUME_CHANNEL)
			mark_connection_lost(conn);
	}
	else
	{
		amqp_connection_close_ok_t ok = {0};

		(void) amqp_send_method(conn->state, 0,
								AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
		mark_connection_lost(conn);
	}
}

static char *
describe_close(const char *what, amqp_method_number_t method, void *decoded)
{
	uint16		code;
	amqp_bytes_t text;

	if (method == AMQP_CHANNEL_CLOSE_METHOD)
	{
		code = ((amqp_channel_close_t *) decoded)->reply_code;
		text = ((amqp_channel_close_t *) decoded)->reply_text;
	}
	else
	{
		code = ((amqp_connection_close_t *) decoded)->reply_code;
		text = ((amqp_connection_close_t *) decoded)->reply_text;
	}
	return psprintf("%s: broker closed the %s: %u %.*s", what,
					method == AMQP_CHANNEL_CLOSE_METHOD ? "channel" : "connection",
					code, (int) text.len, (char *) text.bytes);
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
			mark_connection_lost(conn);
			return psprintf("%s: %s", what, amqp_error_string2(reply.library_error));
		case AMQP_RESPONSE_SERVER_EXCEPTION:
			if (reply.reply.id == AMQP_CHANNEL_CLOSE_METHOD ||
				reply.reply.id == AMQP_CONNECTION_CLOSE_METHOD)
			{
				error = describe_close(what, reply.reply.id, reply.reply.decoded);
				accept_close(conn, channel, reply.reply.id);
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

static bool
rpc_succeeded(BrokerConnection *conn, amqp_channel_t channel, const char *what,
			  char **error)
{
	amqp_rpc_reply_t reply = amqp_get_rpc_reply(conn->state);

	if (reply.reply_type == AMQP_RESPONSE_NORMAL)
		return true;
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

	amqp_channel_open(conn->state, channel);
	if (!rpc_succeeded(conn, channel, "opening a channel", error))
		return false;
	if (channel == PUBLISH_CHANNEL)
	{
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
 * Connect, log in and open the channels, every step bounded by
 * mqtx.connect_timeout.  Returns NULL with *error set on failure.
 */
BrokerConnection *
broker_connect(const char *url, char **error)
{
	struct amqp_connection_info info;
	struct timeval timeout = timeval_from_ms(mqtx_connect_timeout);
	BrokerConnection *conn;
	amqp_socket_t *socket;
	amqp_rpc_reply_t reply;
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
	rc = amqp_socket_open_noblock(socket, info.host, info.port, &timeout);
	if (rc != AMQP_STATUS_OK)
	{
		*error = psprintf("cannot connect to %s:%d: %s", info.host, info.port,
						  amqp_error_string2(rc));
		goto fail;
	}
	amqp_set_handshake_timeout(conn->state, &timeout);
	amqp_set_rpc_timeout(conn->state, &timeout);

	reply = amqp_login(conn->state, info.vhost, 0, AMQP_DEFAULT_FRAME_SIZE,
					   mqtx_heartbeat, AMQP_SASL_METHOD_PLAIN,
					   info.user, info.password);
	if (reply.reply_type != AMQP_RESPONSE_NORMAL)
	{
		*error = handle_failed_reply(conn, 0, reply,
									 psprintf("logging in to %s:%d as \"%s\"",
											  info.host, info.port, info.user));
		goto fail;
	}
	conn->open = true;
	if (!ensure_channel(conn, RPC_CHANNEL, error) ||
		!ensure_channel(conn, PUBLISH_CHANNEL, error))
		goto fail;
	return conn;

fail:
	broker_disconnect(conn);
	return NULL;
}

void
broker_disconnect(BrokerConnection *conn)
{
	if (conn == NULL)
		return;
	if (conn->state != NULL)
	{
		if (conn->open)
			(void) amqp_connection_close(conn->state, AMQP_REPLY_SUCCESS);
		amqp_destroy_connection(conn->state);
	}
	MemoryContextDelete(conn->cache_context);
	pfree(conn);
}

bool
broker_is_open(BrokerConnection *conn)
{
	return conn != NULL && conn->open;
}

bool
broker_declare_exchange(BrokerConnection *conn, const char *name,
						const char *type, bool durable, char **error)
{
	if (!ensure_channel(conn, RPC_CHANNEL, error))
		return false;
	amqp_exchange_declare(conn->state, RPC_CHANNEL,
						  cstring_to_amqp_bytes(name), cstring_to_amqp_bytes(type),
						  false, durable, false, false, amqp_empty_table);
	return rpc_succeeded(conn, RPC_CHANNEL,
						 psprintf("declaring exchange \"%s\"", name), error);
}

bool
broker_declare_queue(BrokerConnection *conn, const char *name, bool durable,
					 Jsonb *arguments, char **error)
{
	amqp_table_t table = amqp_empty_table;

	if (arguments != NULL && !headers_to_table(arguments, &table, error))
		return false;
	if (!ensure_channel(conn, RPC_CHANNEL, error))
		return false;
	amqp_queue_declare(conn->state, RPC_CHANNEL, cstring_to_amqp_bytes(name),
					   false, durable, false, false, table);
	return rpc_succeeded(conn, RPC_CHANNEL,
						 psprintf("declaring queue \"%s\"", name), error);
}

bool
broker_bind(BrokerConnection *conn, const char *queue, const char *exchange,
			const char *routing_key, char **error)
{
	if (!ensure_channel(conn, RPC_CHANNEL, error))
		return false;
	amqp_queue_bind(conn->state, RPC_CHANNEL, cstring_to_amqp_bytes(queue),
					cstring_to_amqp_bytes(exchange),
					cstring_to_amqp_bytes(routing_key), amqp_empty_table);
	return rpc_succeeded(conn, RPC_CHANNEL,
						 psprintf("binding queue \"%s\" to exchange \"%s\"",
								  queue, exchange), error);
}

/*
 * Does the exchange exist?  Asked with a passive declare, once per
 * connection: publishing to a missing exchange would close the publish
 * channel and take every unconfirmed message with it.  Returns false with
 * *error when it does not exist or when the connection failed
 * (broker_is_open() tells which).
 */
bool
broker_exchange_exists(BrokerConnection *conn, const char *name, char **error)
{
	ListCell   *lc;
	MemoryContext old;

	if (name[0] == '\0')
		return true;			/* the default exchange always exists */
	foreach(lc, conn->known_exchanges)
		if (strcmp(lfirst(lc), name) == 0)
			return true;
	if (!ensure_channel(conn, RPC_CHANNEL, error))
		return false;

	amqp_exchange_declare(conn->state, RPC_CHANNEL, cstring_to_amqp_bytes(name),
						  amqp_cstring_bytes("direct"), true, false, false, false,
						  amqp_empty_table);
	if (!rpc_succeeded(conn, RPC_CHANNEL, psprintf("exchange \"%s\"", name), error))
		return false;

	old = MemoryContextSwitchTo(conn->cache_context);
	conn->known_exchanges = lappend(conn->known_exchanges, pstrdup(name));
	MemoryContextSwitchTo(old);
	return true;
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
			MemoryContextAlloc(conn->cache_context,
							   sizeof(BrokerMessage *) * conn->unsettled_capacity) :
			repalloc(conn->unsettled,
					 sizeof(BrokerMessage *) * conn->unsettled_capacity);
	}
	conn->unsettled[conn->unsettled_count++] = message;
}

/*
 * Send one message on the confirm channel, without waiting.  Returns false
 * only when the connection or channel failed (stop sending); a message that
 * cannot be encoded is marked PUBLISH_REJECTED and sending goes on.  The
 * message must stay allocated until it settles (broker_await_confirms) or
 * the connection is dropped.
 */
bool
broker_publish(BrokerConnection *conn, BrokerMessage *message, char **error)
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

		if (!headers_to_table(message->headers, &props.headers, &reason))
		{
			set_message_error(message, PUBLISH_REJECTED, reason);
			return true;
		}
		props._flags |= AMQP_BASIC_HEADERS_FLAG;
	}
	body = server_text_to_amqp_bytes(message->body, message->body_len);

	rc = amqp_basic_publish(conn->state, PUBLISH_CHANNEL,
							cstring_to_amqp_bytes(message->exchange),
							cstring_to_amqp_bytes(message->routing_key),
							true, false, &props, body);
	if (rc == AMQP_STATUS_TABLE_TOO_BIG)
	{
		/* the method frame went out without its header: the channel is lost */
		set_message_error(message, PUBLISH_REJECTED,
						  "the headers are too large for an AMQP frame");
		*error = pstrdup("publishing: a message's headers were too large for a frame");
		mark_connection_lost(conn);
		return false;
	}
	if (rc != AMQP_STATUS_OK)
	{
		*error = psprintf("publishing: %s", amqp_error_string2(rc));
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

	reply = amqp_read_message(conn->state, PUBLISH_CHANNEL, &returned, 0);
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
			set_message_error(m, PUBLISH_RETURNED, reason);
			break;
		}
	}
	return true;
}

/*
 * Handle one frame the broker sent unprompted.  Returns false when the
 * publish channel or the connection closed (with *error set).
 */
static bool
handle_frame(BrokerConnection *conn, amqp_frame_t *frame, char **error)
{
	void	   *decoded = frame->payload.method.decoded;

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
		case AMQP_CHANNEL_CLOSE_METHOD:
		case AMQP_CONNECTION_CLOSE_METHOD:
			*error = describe_close("while publishing", frame->payload.method.id,
									decoded);
			accept_close(conn, frame->channel, frame->payload.method.id);
			return frame->channel != PUBLISH_CHANNEL && conn->open;
		default:
			return true;
	}
}

/*
 * Has every message sent from the array been acked or nacked?  Confirms
 * are taken in by broker_poll and broker_await_confirms.
 */
bool
broker_all_settled(BrokerMessage *messages, int count)
{
	for (int i = 0; i < count; i++)
		if (messages[i].outcome != PUBLISH_NOT_SENT &&
			messages[i].outcome != PUBLISH_REJECTED &&
			!messages[i].settled)
			return false;
	return true;
}

/*
 * Wait until every sent message of the array is acked or nacked (returned
 * ones included: their ack follows the return), or timeout_ms passes.
 * Confirms for other messages in flight are applied as they come.  Returns
 * false on timeout or when the channel or connection closed; messages
 * still PUBLISH_UNCONFIRMED then have an unknown fate.
 */
bool
broker_await_confirms(BrokerConnection *conn, BrokerMessage *messages,
					  int count, int timeout_ms, char **error)
{
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													   timeout_ms);

	while (!broker_all_settled(messages, count))
	{
		long		remaining_ms = TimestampDifferenceMilliseconds(GetCurrentTimestamp(),
																   deadline);
		struct timeval tv = timeval_from_ms((int) remaining_ms);
		amqp_frame_t frame;
		int			rc;

		CHECK_FOR_INTERRUPTS();
		if (!conn->channel_open[PUBLISH_CHANNEL])
		{
			*error = pstrdup("the publish channel closed before every confirm arrived");
			return false;
		}
		if (remaining_ms <= 0)
		{
			*error = psprintf("no publisher confirm within %d ms", timeout_ms);
			return false;
		}
		amqp_maybe_release_buffers(conn->state);
		rc = amqp_simple_wait_frame_noblock(conn->state, &frame, &tv);
		if (rc == AMQP_STATUS_TIMEOUT)
			continue;
		if (rc != AMQP_STATUS_OK)
		{
			*error = psprintf("waiting for publisher confirms: %s",
							  amqp_error_string2(rc));
			mark_connection_lost(conn);
			return false;
		}
		if (!handle_frame(conn, &frame, error))
			return false;
	}
	return true;
}

/*
 * Service the connection between batches without blocking: heartbeats go
 * out, confirms and closes from the broker are taken in.  Returns false
 * when the connection is gone.
 */
bool
broker_poll(BrokerConnection *conn, char **error)
{
	for (;;)
	{
		struct timeval no_wait = {0, 0};
		amqp_frame_t frame;
		int			rc;

		if (!conn->open)
		{
			*error = pstrdup("the broker connection is closed");
			return false;
		}
		amqp_maybe_release_buffers(conn->state);
		rc = amqp_simple_wait_frame_noblock(conn->state, &frame, &no_wait);
		if (rc == AMQP_STATUS_TIMEOUT)
			return true;
		if (rc != AMQP_STATUS_OK)
		{
			*error = psprintf("broker connection lost: %s", amqp_error_string2(rc));
			mark_connection_lost(conn);
			return false;
		}
		if (!handle_frame(conn, &frame, error))
			return false;
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
 * Start consuming a queue on the consume channel, with manual acks and at
 * most "prefetch" unacknowledged deliveries; the consumer tag is the queue
 * name.
 */
bool
broker_consume(BrokerConnection *conn, const char *queue, int prefetch,
			   char **error)
{
	if (!ensure_channel(conn, CONSUME_CHANNEL, error))
		return false;
	amqp_basic_qos(conn->state, CONSUME_CHANNEL, 0, (uint16_t) prefetch, false);
	if (!rpc_succeeded(conn, CONSUME_CHANNEL, "setting the prefetch count", error))
		return false;
	amqp_basic_consume(conn->state, CONSUME_CHANNEL, cstring_to_amqp_bytes(queue),
					   cstring_to_amqp_bytes(queue), false, false, false,
					   amqp_empty_table);
	return rpc_succeeded(conn, CONSUME_CHANNEL,
						 psprintf("consuming queue \"%s\"", queue), error);
}

bool
broker_cancel(BrokerConnection *conn, const char *queue, char **error)
{
	if (!ensure_channel(conn, CONSUME_CHANNEL, error))
		return false;
	amqp_basic_cancel(conn->state, CONSUME_CHANNEL, cstring_to_amqp_bytes(queue));
	return rpc_succeeded(conn, CONSUME_CHANNEL,
						 psprintf("cancelling the consumer of queue \"%s\"", queue),
						 error);
}

static void
copy_envelope(amqp_envelope_t *envelope, BrokerDelivery *delivery)
{
	amqp_basic_properties_t *props = &envelope->message.properties;

	memset(delivery, 0, sizeof(*delivery));
	/* the consumer tag is the queue name mqtx sent: taken as it is */
	delivery->queue = amqp_bytes_to_cstring(envelope->consumer_tag);
	delivery->delivery_tag = envelope->delivery_tag;
	delivery->redelivered = envelope->redelivered;
	delivery->exchange = wire_string(envelope->exchange);
	delivery->routing_key = wire_string(envelope->routing_key);
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
	delivery->body_len = (int) envelope->message.body.len;
	delivery->body = palloc(delivery->body_len + 1);
	memcpy(delivery->body, envelope->message.body.bytes, delivery->body_len);
	delivery->body[delivery->body_len] = '\0';
}

/*
 * Wait up to timeout_ms for the next delivery and copy it, in the current
 * memory context, into *delivery.  Returns 1 for a delivery, 0 for none,
 * -1 when the connection or the consume channel failed (*error says why).
 */
int
broker_next_delivery(BrokerConnection *conn, int timeout_ms,
					 BrokerDelivery *delivery, char **error)
{
	struct timeval tv = timeval_from_ms(timeout_ms);
	amqp_envelope_t envelope;
	amqp_rpc_reply_t reply;
	amqp_frame_t frame;
	int			rc;

	if (!conn->open || !conn->channel_open[CONSUME_CHANNEL])
	{
		*error = pstrdup("the broker connection is closed");
		return -1;
	}
	amqp_maybe_release_buffers(conn->state);
	reply = amqp_consume_message(conn->state, &envelope, &tv, 0);
	if (reply.reply_type == AMQP_RESPONSE_NORMAL)
	{
		copy_envelope(&envelope, delivery);
		amqp_destroy_envelope(&envelope);
		return 1;
	}
	if (reply.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
		reply.library_error == AMQP_STATUS_TIMEOUT)
		return 0;
	if (reply.reply_type != AMQP_RESPONSE_LIBRARY_EXCEPTION ||
		reply.library_error != AMQP_STATUS_UNEXPECTED_STATE)
	{
		*error = handle_failed_reply(conn, CONSUME_CHANNEL, reply, "consuming");
		mark_connection_lost(conn);
		return -1;
	}

	/* Another frame came first: a close, or a confirm for the publisher. */
	tv = timeval_from_ms(0);
	rc = amqp_simple_wait_frame_noblock(conn->state, &frame, &tv);
	if (rc == AMQP_STATUS_TIMEOUT)
		return 0;
	if (rc != AMQP_STATUS_OK)
	{
		*error = psprintf("consuming: %s", amqp_error_string2(rc));
		mark_connection_lost(conn);
		return -1;
	}
	if (frame.frame_type == AMQP_FRAME_METHOD &&
		frame.payload.method.id == AMQP_BASIC_CANCEL_METHOD)
	{
		*error = pstrdup("the broker cancelled a consumer (was its queue deleted?)");
		return -1;
	}
	if (!handle_frame(conn, &frame, error))
		return -1;
	if (!conn->channel_open[CONSUME_CHANNEL])
	{
		if (*error == NULL)
			*error = pstrdup("the broker closed the consume channel");
		return -1;
	}
	return 0;
}

/*
 * Acknowledge one delivery, or with "multiple" every one up to it; or
 * reject one back onto its queue.
 */
bool
broker_ack(BrokerConnection *conn, uint64 delivery_tag, bool multiple,
		   char **error)
{
	int			rc = amqp_basic_ack(conn->state, CONSUME_CHANNEL, delivery_tag, multiple);

	if (rc == AMQP_STATUS_OK)
		return true;
	*error = psprintf("acknowledging: %s", amqp_error_string2(rc));
	mark_connection_lost(conn);
	return false;
}

/*
 * Send a heartbeat when one is due, so that a long stretch of database
 * work (a large batch, slow handlers) does not make the broker close the
 * connection for silence.  Returns false when the connection failed.
 */
bool
broker_keep_alive(BrokerConnection *conn, char **error)
{
	amqp_frame_t heartbeat;
	int			interval = amqp_get_heartbeat(conn->state);
	TimestampTz now;
	int			rc;

	if (!conn->open || interval <= 0)
		return conn->open;
	now = GetCurrentTimestamp();
	if (!TimestampDifferenceExceeds(conn->last_keep_alive, now, interval * 1000 / 2))
		return true;
	memset(&heartbeat, 0, sizeof(heartbeat));
	heartbeat.frame_type = AMQP_FRAME_HEARTBEAT;
	heartbeat.channel = 0;
	rc = amqp_send_frame(conn->state, &heartbeat);
	if (rc != AMQP_STATUS_OK)
	{
		*error = psprintf("sending a heartbeat: %s", amqp_error_string2(rc));
		mark_connection_lost(conn);
		return false;
	}
	conn->last_keep_alive = now;
	return true;
}

bool
broker_requeue(BrokerConnection *conn, uint64 delivery_tag, char **error)
{
	int			rc = amqp_basic_reject(conn->state, CONSUME_CHANNEL, delivery_tag, true);

	if (rc == AMQP_STATUS_OK)
		return true;
	*error = psprintf("requeueing: %s", amqp_error_string2(rc));
	mark_connection_lost(conn);
	return false;
}
