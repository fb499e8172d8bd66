/*-------------------------------------------------------------------------
 *
 * broker_publish.c
 *	  Publishing with publisher confirms: sending messages on the confirm
 *	  channel and settling them as the broker's acks, nacks and returns
 *	  come in.
 *
 * A message is sent without waiting for its confirm, and the caller's
 * BrokerMessage is kept in conn->unsettled until the broker decides its
 * fate.  The frames that decide it (basic.ack, basic.nack, basic.return,
 * a close of the channel) are read by broker.c wherever it happens to be
 * waiting, so they are applied here through the functions broker.c calls
 * back, and a fate may be decided while the caller is busy with another
 * batch.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/memutils.h"

#include "broker_internal.h"

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

/*
 * The publish channel is gone (broker.c calls this when the broker closed
 * it or the connection, or the connection failed): its unsettled messages
 * will never be confirmed, and a new channel starts its delivery tags
 * again at 1.  When the broker closed it for something it refused
 * (refusal != NULL), every unsettled message counts as refused with that
 * reason; otherwise their fate is unknown and they stay
 * PUBLISH_UNCONFIRMED.
 */
void
mqtx_broker_forget_publish_channel(BrokerConnection *conn, const char *refusal)
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

/* Keep a message just sent until its confirm comes */
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
 * method went out, which loses the channel.  Else false, with *reason.
 */
static bool
headers_fit_frame(BrokerConnection *conn, Jsonb *headers, amqp_table_t *table,
				  char **reason)
{
	size_t		room;

	if (!mqtx_amqp_headers_to_table(headers, table, reason))
		return false;
	if (!mqtx_amqp_table_fits_frame(table, amqp_get_frame_max(conn->state), &room))
	{
		*reason = psprintf("the headers take more than the %zu bytes a header frame of this broker leaves them",
						   room);
		return false;
	}
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

	if (!mqtx_broker_ensure_channel(conn, PUBLISH_CHANNEL, error))
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
	if (message->correlation_id != NULL)
	{
		/*
		 * mqtx.publish checks its length; a superuser may have written the
		 * header by hand, and a short string too long would fail the whole
		 * frame, and with it the connection.
		 */
		props.correlation_id = mqtx_amqp_from_server_cstring(message->correlation_id);
		if (props.correlation_id.len > MQTX_SHORTSTR_MAX)
		{
			set_message_error(message, PUBLISH_REJECTED,
							  psprintf("the correlation id (header %s) is %zu bytes, more than the %d an AMQP short string holds",
									   MQTX_CORRELATION_ID_HEADER, props.correlation_id.len,
									   MQTX_SHORTSTR_MAX));
			return true;
		}
		props._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
	}
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
	body = mqtx_amqp_from_server(message->body, message->body_len);

	conn->io_error = NULL;
	rc = amqp_basic_publish(conn->state, PUBLISH_CHANNEL,
							mqtx_amqp_from_server_cstring(message->exchange),
							mqtx_amqp_from_server_cstring(message->routing_key),
							true, false, &props, body);
	if (rc != AMQP_STATUS_OK)
	{
		*error = psprintf("publishing: %s", mqtx_broker_io_error_string(conn, rc));
		mqtx_broker_mark_connection_lost(conn);
		return false;
	}
	message->delivery_tag = conn->next_delivery_tag++;
	message->outcome = PUBLISH_UNCONFIRMED;
	message->settled = false;
	track_unsettled(conn, message);
	return true;
}

/*
 * Has every message sent from the array been settled (acked, nacked,
 * returned, or refused with its channel)?  Confirms are taken in by
 * mqtx_broker_wait; this only looks at the messages.
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
 * The caller is about to free these messages: confirms that still come
 * for them are ignored.  conn may be NULL (no connection, nothing to
 * forget).
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
 * Apply a basic.ack or basic.nack (outcome PUBLISH_ACKED or
 * PUBLISH_NACKED) that broker.c read; "multiple" covers every tag up to
 * and including delivery_tag.  A message already returned keeps that
 * outcome: RabbitMQ acks an unroutable message after returning it.
 */
void
mqtx_broker_apply_confirm(BrokerConnection *conn, uint64 delivery_tag, bool multiple,
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
 * A basic.return that broker.c read: the message body follows and must
 * be read off the wire.  It carries no delivery tag, so it is matched on
 * its message_id.  Returns false when reading the body failed (*error
 * says why; the connection or the publish channel is gone).
 */
bool
mqtx_broker_apply_return(BrokerConnection *conn, amqp_basic_return_t *ret, char **error)
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

	reply = mqtx_broker_read_content(conn, PUBLISH_CHANNEL, &returned);
	if (reply.reply_type != AMQP_RESPONSE_NORMAL)
	{
		*error = mqtx_broker_handle_failed_reply(conn, PUBLISH_CHANNEL, reply,
												 "reading a returned message");
		return false;
	}
	message_id = (returned.properties._flags & AMQP_BASIC_MESSAGE_ID_FLAG) ?
		mqtx_amqp_to_cstring(returned.properties.message_id) : NULL;
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
