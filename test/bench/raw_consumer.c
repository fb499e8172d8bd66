/*
 * raw_consumer: the fastest a plain rabbitmq-c (0.11) client can consume and
 * acknowledge messages from a queue.  The consumer benchmark compares mqtx's
 * consumer worker against this number, so the consume path mirrors what the
 * worker does on the wire (basic.qos prefetch, basic.consume with manual
 * acks, amqp_consume_message with bounded waits, acks on the same channel)
 * and does nothing with the messages: no parsing, no database.
 *
 *   raw_consumer --url amqp://guest:guest@127.0.0.1:5672/%2f --queue Q
 *       --count N [--prefetch P] [--ack-every K] [--timeout SECONDS]
 *
 * --ack-every 1 (the default) sends one basic.ack per message; K > 1 sends
 * one basic.ack with multiple=1 every K messages (and one for the tail).
 * K may not exceed the prefetch: the broker would stop delivering before
 * the ack that frees the window is due.
 *
 * Prints one line
 *   raw consumer: N messages in S.SSS s = R msg/s (prefetch P, ACKS)
 * where ACKS says how messages were acknowledged.  The clock starts just
 * before basic.qos (connection and channel already open) and stops when the
 * last ack has been handed to the socket.  Exits 0 only if all N messages
 * arrived, each wait for one lasting at most --timeout seconds.
 */
#define _POSIX_C_SOURCE 200809L

#include <amqp.h>
#include <amqp_tcp_socket.h>

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "bench_common.h"

#define CHANNEL 1
#define PROG "raw_consumer"

struct options
{
	const char *url;
	const char *queue;
	uint64_t	count;
	uint64_t	prefetch;
	uint64_t	ack_every;
	int			timeout_s;
};

struct run
{
	amqp_connection_state_t conn;
	const struct options *opt;
	uint64_t	received;
	uint64_t	redelivered;
	uint64_t	acks_sent;		/* basic.ack frames */
	uint64_t	last_tag;		/* delivery tag of the last message received */
	uint64_t	body_bytes;
	double		watchdog_armed_at;
};

static void
usage(void)
{
	fprintf(stderr,
			"usage: " PROG " --url amqp://USER:PASS@HOST:PORT/VHOST --queue Q"
			" --count N\n"
			"         [--prefetch P] [--ack-every K] [--timeout SECONDS]\n"
			"  --prefetch P     basic.qos prefetch count, 1..65535 (default 1000)\n"
			"  --ack-every K    1: one basic.ack per message (default);"
			" K > 1: one\n"
			"                   basic.ack multiple=1 every K messages (K <= P)\n"
			"  --timeout S      bound on every broker wait (default 30)\n");
	exit(2);
}

/* ------------------------------------------------------------------ */
/* Command line                                                        */

static void
parse_args(int argc, char **argv, struct options *opt)
{
	static const struct option longopts[] = {
		{"url", required_argument, NULL, 'u'},
		{"queue", required_argument, NULL, 'q'},
		{"count", required_argument, NULL, 'n'},
		{"prefetch", required_argument, NULL, 'p'},
		{"ack-every", required_argument, NULL, 'k'},
		{"timeout", required_argument, NULL, 't'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	int			c;

	memset(opt, 0, sizeof(*opt));
	opt->prefetch = 1000;
	opt->ack_every = 1;
	opt->timeout_s = 30;
	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1)
	{
		switch (c)
		{
			case 'u':
				opt->url = optarg;
				break;
			case 'q':
				opt->queue = optarg;
				break;
			case 'n':
				opt->count = parse_option_u64("count", optarg, 1, UINT64_MAX);
				break;
			case 'p':
				opt->prefetch = parse_option_u64("prefetch", optarg, 1, 65535);
				break;
			case 'k':
				opt->ack_every = parse_option_u64("ack-every", optarg, 1, 65535);
				break;
			case 't':
				opt->timeout_s = (int) parse_option_u64("timeout", optarg, 1, 86400);
				break;
			default:
				usage();
		}
	}
	if (optind != argc || !opt->url || !opt->queue || !opt->count)
		usage();
	if (opt->ack_every > opt->prefetch)
		die("--ack-every %" PRIu64 " exceeds --prefetch %" PRIu64
			": the broker would stop delivering before the first ack",
			opt->ack_every, opt->prefetch);
}

/* ------------------------------------------------------------------ */
/* Connection setup                                                    */

static void
start_consuming(struct run *r)
{
	amqp_connection_state_t conn = r->conn;

	amqp_basic_qos(conn, CHANNEL, 0, (uint16_t) r->opt->prefetch, 0);
	die_on_rpc(conn, "basic.qos");
	/* no_local 0, no_ack 0 (manual acks), exclusive 0 */
	amqp_basic_consume(conn, CHANNEL, amqp_cstring_bytes(r->opt->queue),
					   amqp_cstring_bytes(PROG), 0, 0, 0, amqp_empty_table);
	die_on_rpc(conn, "basic.consume");
}

/* ------------------------------------------------------------------ */
/* Consuming                                                           */

static void
send_ack(struct run *r, uint64_t tag, int multiple)
{
	die_on_status(amqp_basic_ack(r->conn, CHANNEL, tag, multiple),
				  "basic.ack");
	r->acks_sent++;
}

/* amqp_consume_message() met a frame that is not a delivery: read it and
 * say what it was.  Anything but a connection (un)block is fatal here. */
static void
handle_other_frame(struct run *r)
{
	struct timeval tv = seconds_tv(r->opt->timeout_s);
	amqp_frame_t f;
	const amqp_method_t *m = &f.payload.method;

	die_on_status(amqp_simple_wait_frame_noblock(r->conn, &f, &tv),
				  "reading a non-delivery frame");
	if (f.frame_type != AMQP_FRAME_METHOD)
		die("unexpected frame type %u on channel %u", f.frame_type,
			f.channel);
	die_on_close_method(m, "consuming");
	switch (m->id)
	{
		case AMQP_CONNECTION_BLOCKED_METHOD:
			{
				const amqp_connection_blocked_t *b = m->decoded;

				fprintf(stderr, PROG ": broker blocked the connection: %.*s\n",
						(int) b->reason.len, (const char *) b->reason.bytes);
				break;
			}
		case AMQP_CONNECTION_UNBLOCKED_METHOD:
			fprintf(stderr, PROG ": broker unblocked the connection\n");
			break;
		case AMQP_BASIC_CANCEL_METHOD:
			die("broker cancelled the consumer (queue '%s' deleted?) after %"
				PRIu64 " of %" PRIu64 " messages", r->opt->queue,
				r->received, r->opt->count);
			break;
		default:
			die("unexpected method 0x%08x on channel %u", m->id, f.channel);
	}
}

/* Wait (bounded) for the next delivery.  Returns 0 on timeout. */
static int
receive_one(struct run *r)
{
	struct timeval tv = seconds_tv(r->opt->timeout_s);
	amqp_envelope_t env;
	amqp_rpc_reply_t reply;

	for (;;)
	{
		/*
		 * Decoded frames live in pools until released; without this a long
		 * run grows without bound.
		 */
		amqp_maybe_release_buffers(r->conn);
		reply = amqp_consume_message(r->conn, &env, &tv, 0);
		if (reply.reply_type == AMQP_RESPONSE_NORMAL)
			break;
		if (reply.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
			reply.library_error == AMQP_STATUS_TIMEOUT)
			return 0;
		if (reply.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
			reply.library_error == AMQP_STATUS_UNEXPECTED_STATE)
		{
			handle_other_frame(r);
			continue;
		}
		die_on_rpc_reply(reply, "consuming");
		die("consuming: unexpected reply type %d", reply.reply_type);
	}

	if (env.channel != CHANNEL)
		die("delivery on unknown channel %u", env.channel);
	if (env.delivery_tag != r->last_tag + 1)
		die("delivery tag %" PRIu64 " after %" PRIu64 " (tags are"
			" consecutive on a fresh channel)", env.delivery_tag,
			r->last_tag);
	r->last_tag = env.delivery_tag;
	r->received++;
	r->redelivered += env.redelivered != 0;
	r->body_bytes += env.message.body.len;
	amqp_destroy_envelope(&env);
	watchdog_kick(&r->watchdog_armed_at, r->opt->timeout_s);
	return 1;
}

static void
run_consume_loop(struct run *r)
{
	const struct options *opt = r->opt;

	watchdog_kick(&r->watchdog_armed_at, r->opt->timeout_s);
	while (r->received < opt->count)
	{
		if (!receive_one(r))
		{
			fprintf(stderr, PROG ": only %" PRIu64 " of %" PRIu64
					" messages from queue '%s': none for %d s\n",
					r->received, opt->count, opt->queue,
					opt->timeout_s);
			exit(1);
		}
		if (opt->ack_every == 1)
			send_ack(r, r->last_tag, 0);
		else if (r->received % opt->ack_every == 0 ||
				 r->received == opt->count)
			send_ack(r, r->last_tag, 1);
	}
	alarm(0);
}

int
main(int argc, char **argv)
{
	struct options opt;
	struct run	r;
	double		t0,
				elapsed;
	char		acks[96];

	bench_set_prog(PROG);
	parse_args(argc, argv, &opt);
	signal(SIGALRM, watchdog_fired);

	memset(&r, 0, sizeof(r));
	r.opt = &opt;
	r.conn = connect_broker(opt.url, opt.timeout_s, CHANNEL);

	t0 = now_s();
	start_consuming(&r);
	run_consume_loop(&r);
	elapsed = now_s() - t0;

	close_connection(r.conn, CHANNEL);
	if (opt.ack_every == 1)
		snprintf(acks, sizeof(acks), "one ack per message");
	else
		snprintf(acks, sizeof(acks),
				 "ack multiple=1 every %" PRIu64 " messages, %" PRIu64
				 " acks", opt.ack_every, r.acks_sent);
	printf("raw consumer: %" PRIu64 " messages in %.3f s = %.0f msg/s"
		   " (prefetch %" PRIu64 ", %s, %" PRIu64 " body bytes,"
		   " redelivered=%" PRIu64 ")\n",
		   r.received, elapsed, (double) r.received / elapsed, opt.prefetch,
		   acks, r.body_bytes, r.redelivered);
	return 0;
}
