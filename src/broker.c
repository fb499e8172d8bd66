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

#include <errno.h>
#include <math.h>

#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>

#include "mb/pg_wchar.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/builtins.h"
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
	JsonbIterator *it = JsonbIteratorInit(container);
	JsonbValue	value;
	JsonbIteratorToken token;
	char	   *key = NULL;

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
	JsonbIterator *it = JsonbIteratorInit(container);
	JsonbValue	value;
	JsonbIteratorToken token;

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

	return headers_to_table(headers, &table, reason);
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
	bool		channel_open[3];	/* indexed by channel number */
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
};

#define PUBLISH_CHANNEL 1
#define RPC_CHANNEL 2

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

static amqp_socket_t *
new_tls_socket(amqp_connection_state_t state, char **error)
{
	amqp_socket_t *socket = amqp_ssl_socket_new(state);
	int			rc;

	if (socket == NULL)
	{
		*error = pstrdup("cannot create a TLS socket");
		return NULL;
	}
	amqp_ssl_socket_set_verify_peer(socket, mqtx_tls_verify_peer);
	amqp_ssl_socket_set_verify_hostname(socket, mqtx_tls_verify_peer);
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
	socket = info.ssl ? new_tls_socket(conn->state, error) :
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
		if (!headers_to_table(message->headers, &props.headers, &message->error))
		{
			message->outcome = PUBLISH_REJECTED;
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
		message->outcome = PUBLISH_REJECTED;
		message->error = pstrdup("the headers are too large for an AMQP frame");
		return true;
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
			if (m->outcome == PUBLISH_UNCONFIRMED)
			{
				m->outcome = outcome;
				if (outcome == PUBLISH_NACKED)
					m->error = pstrdup("the broker refused the message (basic.nack)");
			}
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
			m->outcome = PUBLISH_RETURNED;
			m->error = reason;
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

static bool
all_settled(BrokerMessage *messages, int count)
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

	while (!all_settled(messages, count))
	{
		long		remaining_ms = TimestampDifferenceMilliseconds(GetCurrentTimestamp(),
																   deadline);
		struct timeval tv = timeval_from_ms((int) remaining_ms);
		amqp_frame_t frame;
		int			rc;

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
		(void) handle_frame(conn, &frame, error);
	}
}
