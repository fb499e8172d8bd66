/*-------------------------------------------------------------------------
 *
 * broker_consume.c
 *	  Consuming: a channel per queue with manual acknowledgements,
 *	  deliveries copied out of rabbitmq-c's buffers, acks and requeues, and
 *	  what becomes of a queue's channel when the broker closes it or
 *	  cancels its consumer.
 *
 * Each consumed queue has a channel of its own, so that a queue the broker
 * refuses or deletes costs only its own deliveries.  A lost channel is
 * remembered in the connection (conn->lost_channel) wherever broker.c
 * happened to read the frame that lost it, and reported by the next
 * mqtx_broker_next_delivery.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/timestamp.h"

#include "broker_internal.h"

/*
 * Start consuming a queue on a channel of its own, with manual acks and at
 * most "prefetch" unacknowledged deliveries; the consumer tag is the queue
 * name.  Returns the channel, or 0 with *error when the broker refused
 * (the connection is still open: mqtx_broker_is_open) or the connection
 * failed.
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
	 * delivery held for a retry, or read while the old channel closed) would
	 * acknowledge another message.  When they run out, the connection is
	 * replaced.
	 */
	if (conn->next_consume_channel < FIRST_CONSUME_CHANNEL)
		conn->next_consume_channel = FIRST_CONSUME_CHANNEL;
	if (conn->next_consume_channel > conn->channel_max)
	{
		*error = psprintf("consuming queue \"%s\": every channel number of this connection has been used; connecting again",
						  queue);
		mqtx_broker_mark_connection_lost(conn);
		return 0;
	}
	channel = conn->next_consume_channel++;
	if (!mqtx_broker_ensure_channel(conn, channel, error))
		return 0;
	mqtx_broker_expect_reply(conn);
	amqp_basic_qos(conn->state, channel, 0, (uint16_t) prefetch, false);
	if (mqtx_broker_rpc_succeeded(conn, channel, "setting the prefetch count", error))
	{
		mqtx_broker_expect_reply(conn);
		amqp_basic_consume(conn->state, channel, mqtx_amqp_from_server_cstring(queue),
						   mqtx_amqp_from_server_cstring(queue), false, false, false,
						   amqp_empty_table);
		if (mqtx_broker_rpc_succeeded(conn, channel,
									  psprintf("consuming queue \"%s\"", queue), error))
			return channel;
	}
	/* the caller has the refusal: it is not a channel lost later */
	if (conn->lost_channel == channel)
		conn->lost_channel = 0;
	return 0;
}

/*
 * Stop consuming: close the queue's channel.  The broker hands its
 * unacknowledged deliveries back to the queue.  Returns false only when
 * the connection failed (*error says why); a channel already closed, or
 * one the broker refused to close, costs nothing more.
 */
bool
mqtx_broker_cancel(BrokerConnection *conn, int channel, const char *queue, char **error)
{
	if (!conn->open || !conn->channel_open[channel])
		return conn->open;
	mqtx_broker_expect_reply(conn);
	amqp_channel_close(conn->state, channel, AMQP_REPLY_SUCCESS);
	conn->channel_open[channel] = false;
	return mqtx_broker_rpc_succeeded(conn, channel,
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

/*
 * The broker cancelled a consumer (its queue was deleted, or it is a
 * quorum queue whose leader moved away), broker.c read the basic.cancel:
 * its channel is closed here, which hands its unacknowledged deliveries
 * back, and reported as lost by the next mqtx_broker_next_delivery.  A
 * failure to close it shows as a closed connection (mqtx_broker_is_open).
 */
void
mqtx_broker_accept_cancel(BrokerConnection *conn, amqp_channel_t channel,
						  amqp_basic_cancel_t *cancel)
{
	char	   *tag = mqtx_amqp_to_cstring(cancel->consumer_tag);
	char	   *ignored;

	conn->lost_channel = channel;
	snprintf(conn->lost_channel_reason, sizeof(conn->lost_channel_reason),
			 "the broker cancelled the consumer of queue \"%s\" (was the queue deleted?)",
			 tag);
	mqtx_broker_expect_reply(conn);
	amqp_channel_close(conn->state, channel, AMQP_REPLY_SUCCESS);
	(void) mqtx_broker_rpc_succeeded(conn, channel,
									 "closing a cancelled consumer's channel", &ignored);
	conn->channel_open[channel] = false;
}

/*
 * A delivery nobody is waiting for, that broker.c read (its channel is
 * closing, or the worker is not consuming right now): read its content, so
 * that the frames that follow make sense, and drop it.  Unacknowledged, it
 * goes back to its queue when its channel closes.  Returns false when the
 * connection failed; *error is set whenever reading failed.
 */
bool
mqtx_broker_discard_delivery(BrokerConnection *conn, amqp_channel_t channel, char **error)
{
	amqp_message_t message;
	amqp_rpc_reply_t reply = mqtx_broker_read_content(conn, channel, &message);

	if (reply.reply_type == AMQP_RESPONSE_NORMAL)
	{
		amqp_destroy_message(&message);
		return true;
	}
	*error = mqtx_broker_handle_failed_reply(conn, channel, reply, "reading a delivery");
	return conn->open;
}

/*
 * Copy a delivery's message and correlation ids, headers (as JSON, or why
 * they cannot be read), redrive origin, causation and body out of the library's buffers, into the
 * current memory context.  A table too deep is not an error here: the
 * consumer stores the delivery as poison, with headers_error as its cause.
 */
static void
copy_content(amqp_message_t *message, BrokerDelivery *delivery)
{
	amqp_basic_properties_t *props = &message->properties;

	if ((props->_flags & AMQP_BASIC_MESSAGE_ID_FLAG) && props->message_id.len > 0)
		delivery->message_id = mqtx_amqp_wire_string(props->message_id);
	/* not a dedupe key: passed on as it came, if it is text */
	if ((props->_flags & AMQP_BASIC_CORRELATION_ID_FLAG) && props->correlation_id.len > 0)
		delivery->correlation_id = mqtx_amqp_text_string(props->correlation_id);
	if (props->_flags & AMQP_BASIC_HEADERS_FLAG)
	{
		StringInfoData json;

		initStringInfo(&json);
		if (mqtx_amqp_table_to_json(&json, &props->headers, 1))
			delivery->headers_json = json.data;
		else
			delivery->headers_error = psprintf("headers nest deeper than %d levels",
											   MAX_HEADER_DEPTH);
		delivery->redriven_from = mqtx_amqp_string_header(&props->headers,
														  MQTX_REDRIVEN_FROM_HEADER);
		delivery->ordering_key = mqtx_amqp_string_header(&props->headers,
														 MQTX_ORDERING_KEY_HEADER);
		delivery->causation_id = mqtx_amqp_string_header(&props->headers,
														 MQTX_CAUSATION_ID_HEADER);
		/* the broker's on a message it hands out again; else the publisher's */
		if (delivery->redelivered)
			delivery->delivery_count = mqtx_amqp_delivery_count(&props->headers);
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
	delivery->queue = mqtx_amqp_to_cstring(deliver->consumer_tag);
	delivery->delivery_tag = deliver->delivery_tag;
	delivery->redelivered = deliver->redelivered;
	delivery->exchange = mqtx_amqp_wire_string(deliver->exchange);
	delivery->routing_key = mqtx_amqp_wire_string(deliver->routing_key);

	reply = mqtx_broker_read_content(conn, delivery->channel, &message);
	if (reply.reply_type != AMQP_RESPONSE_NORMAL)
	{
		*error = mqtx_broker_handle_failed_reply(conn, delivery->channel, reply,
												 "reading a delivery");
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
		rc = mqtx_broker_next_frame(conn, &frame, deadline, &woken);
		if (rc == AMQP_STATUS_TIMEOUT)
			return 0;
		if (rc != AMQP_STATUS_OK)
		{
			mqtx_broker_lose_connection(conn, "consuming", rc, error);
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
		if (!mqtx_broker_handle_frame(conn, &frame, error) && !conn->open)
			return -1;
	}
}

/*
 * Answer a delivery: acknowledge it (with "multiple", every delivery up to
 * it on its channel), or reject it back onto its queue.  A delivery whose
 * channel has closed needs neither: the broker has requeued it.  The
 * library sends the frame without waiting for a reply; returns false when
 * the connection failed, with *error saying why.
 */
static bool
answer_delivery(BrokerConnection *conn, int channel, uint64 delivery_tag,
				bool ack, bool multiple, char **error)
{
	int			rc;

	if (!conn->open)
	{
		*error = pstrdup("the broker connection is closed");
		return false;
	}
	if (!mqtx_broker_channel_is_open(conn, channel))
		return true;
	rc = ack ? amqp_basic_ack(conn->state, channel, delivery_tag, multiple) :
		amqp_basic_reject(conn->state, channel, delivery_tag, true);
	if (rc == AMQP_STATUS_OK)
		return true;
	mqtx_broker_lose_connection(conn, ack ? "acknowledging" : "requeueing", rc, error);
	return false;
}

/*
 * Acknowledge one delivery, or with "multiple" every one up to it on its
 * channel.  Returns false when the connection failed (*error says why); a
 * delivery whose channel has closed is left to the broker, which has
 * requeued it.
 */
bool
mqtx_broker_ack(BrokerConnection *conn, int channel, uint64 delivery_tag,
				bool multiple, char **error)
{
	return answer_delivery(conn, channel, delivery_tag, true, multiple, error);
}

/*
 * Reject one delivery back onto its queue, to be delivered again.  Fails
 * as mqtx_broker_ack does.
 */
bool
mqtx_broker_requeue(BrokerConnection *conn, int channel, uint64 delivery_tag,
					char **error)
{
	return answer_delivery(conn, channel, delivery_tag, false, false, error);
}
