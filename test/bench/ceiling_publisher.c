/*
 * ceiling_publisher: the fastest a plain rabbitmq-c (0.11) client can publish
 * persistent, mandatory messages with pipelined publisher confirms.  The
 * relay benchmark compares mqtx's relay worker against this number, so the
 * publish path deliberately mirrors what the relay sends (properties, body
 * size, mandatory flag, one channel) and does nothing else.
 *
 *   ceiling_publisher --url amqp://guest:guest@127.0.0.1:5672/%2f
 *       --exchange EX --routing-key RK --count N --window W --body-size B
 *       [--declare QUEUE] [--purge] [--timeout SECONDS]
 *
 * Prints one line
 *   ceiling: N messages in S.SSS s = R msg/s (acked=A nacked=K returned=T)
 * and exits 0 only if every message was acked and none was nacked or returned.
 *
 * rabbitmq-c 0.11 has no confirm helper, so confirms are read as raw frames:
 * delivery tags start at 1 after confirm.select and count publishes on the
 * channel, and one basic.ack/nack with multiple=1 settles every tag up to and
 * including its delivery_tag.
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
#define PROG "ceiling_publisher"

struct options
{
	const char *url;
	const char *exchange;
	const char *routing_key;
	const char *declare_queue;	/* NULL: use existing topology */
	int			purge;
	uint64_t	count;
	uint64_t	window;
	size_t		body_size;
	int			timeout_s;
};

enum tag_state
{
	TAG_PENDING = 0, TAG_ACKED, TAG_NACKED
};

struct run
{
	amqp_connection_state_t conn;
	const struct options *opt;

	/*
	 * Indexed by delivery tag (1..count).  One byte per message keeps
	 * out-of-order single confirms and overlapping multiple confirms from
	 * being counted twice.
	 */
	unsigned char *tag_state;
	uint64_t	published;		/* == highest delivery tag used so far */
	uint64_t	lowest_open;	/* every tag below this is settled */
	uint64_t	settled;
	uint64_t	acked;
	uint64_t	nacked;
	uint64_t	returned;
	uint64_t	id_prefix;		/* makes message_ids unique across runs */
	char	   *body;
	double		watchdog_armed_at;
};

static void
usage(void)
{
	fprintf(stderr,
			"usage: " PROG " --url amqp://USER:PASS@HOST:PORT/VHOST"
			" --exchange EX --routing-key RK\n"
			"         --count N --window W --body-size B"
			" [--declare QUEUE] [--purge] [--timeout SECONDS]\n"
			"  --declare QUEUE  declare durable direct EX, durable QUEUE and"
			" bind it with RK first\n"
			"  --purge          purge the --declare'd QUEUE before publishing\n"
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
		{"exchange", required_argument, NULL, 'e'},
		{"routing-key", required_argument, NULL, 'r'},
		{"count", required_argument, NULL, 'n'},
		{"window", required_argument, NULL, 'w'},
		{"body-size", required_argument, NULL, 'b'},
		{"declare", required_argument, NULL, 'd'},
		{"purge", no_argument, NULL, 'p'},
		{"timeout", required_argument, NULL, 't'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	int			c;

	memset(opt, 0, sizeof(*opt));
	opt->timeout_s = 30;
	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1)
	{
		switch (c)
		{
			case 'u':
				opt->url = optarg;
				break;
			case 'e':
				opt->exchange = optarg;
				break;
			case 'r':
				opt->routing_key = optarg;
				break;
			case 'n':
				opt->count = parse_option_u64("count", optarg, 1, UINT64_MAX);
				break;
			case 'w':
				opt->window = parse_option_u64("window", optarg, 1, UINT64_MAX);
				break;
			case 'b':
				opt->body_size = parse_option_u64("body-size", optarg, 0, UINT64_MAX);
				break;
			case 'd':
				opt->declare_queue = optarg;
				break;
			case 'p':
				opt->purge = 1;
				break;
			case 't':
				opt->timeout_s = (int) parse_option_u64("timeout", optarg, 1, 86400);
				break;
			default:
				usage();
		}
	}
	if (optind != argc || !opt->url || !opt->exchange || !opt->routing_key ||
		!opt->count || !opt->window)
		usage();
	if (opt->purge && !opt->declare_queue)
		die("--purge needs --declare QUEUE");
}

/* ------------------------------------------------------------------ */
/* Connection setup                                                    */

static void
declare_topology(amqp_connection_state_t conn, const struct options *opt)
{
	amqp_bytes_t ex = amqp_cstring_bytes(opt->exchange);
	amqp_bytes_t q = amqp_cstring_bytes(opt->declare_queue);

	amqp_exchange_declare(conn, CHANNEL, ex, amqp_cstring_bytes("direct"),
						  0, 1, 0, 0, amqp_empty_table);
	die_on_rpc(conn, "exchange.declare");
	amqp_queue_declare(conn, CHANNEL, q, 0, 1, 0, 0, amqp_empty_table);
	die_on_rpc(conn, "queue.declare");
	amqp_queue_bind(conn, CHANNEL, q, ex,
					amqp_cstring_bytes(opt->routing_key), amqp_empty_table);
	die_on_rpc(conn, "queue.bind");
	if (opt->purge)
	{
		amqp_queue_purge(conn, CHANNEL, q);
		die_on_rpc(conn, "queue.purge");
	}
}

/* ------------------------------------------------------------------ */
/* Publishing                                                          */

static uint64_t
random_u64(void)
{
	uint64_t	v = 0;
	FILE	   *f = fopen("/dev/urandom", "rb");

	if (!f || fread(&v, sizeof(v), 1, f) != 1)
		v = (uint64_t) time(NULL) ^ ((uint64_t) getpid() << 32);
	if (f)
		fclose(f);
	return v;
}

/* UUID-shaped (8-4-4-4-12): a per-run random prefix plus the message
 * number, so ids are distinct within a run without tracking them. */
static void
format_message_id(char out[37], uint64_t prefix, uint64_t seq)
{
	snprintf(out, 37, "%08" PRIx32 "-%04" PRIx32 "-4%03" PRIx32 "-8%03" PRIx32
			 "-%012" PRIx64,
			 (uint32_t) (prefix >> 32), (uint32_t) (prefix >> 16) & 0xffff,
			 (uint32_t) (prefix >> 4) & 0xfff, (uint32_t) prefix & 0xf,
			 seq & UINT64_C(0xffffffffffff));
}

/* {"order_id": SEQ, "pad": "xxx"} padded to body_size bytes (or as short
 * as the fixed part allows). */
static amqp_bytes_t
format_body(char *buf, size_t body_size, uint64_t seq)
{
	static const char tail[] = "\"}";
	int			head = sprintf(buf, "{\"order_id\": %" PRIu64 ", \"pad\": \"", seq);
	size_t		fixed = (size_t) head + sizeof(tail) - 1;
	size_t		pad = body_size > fixed ? body_size - fixed : 0;
	amqp_bytes_t b;

	memset(buf + head, 'x', pad);
	memcpy(buf + head + pad, tail, sizeof(tail) - 1);
	b.bytes = buf;
	b.len = fixed + pad;
	return b;
}

static void
publish_one(struct run *r)
{
	uint64_t	seq = r->published + 1; /* == its delivery tag */
	char		message_id[37];
	amqp_basic_properties_t props;

	format_message_id(message_id, r->id_prefix, seq);
	props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG |
		AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_MESSAGE_ID_FLAG;
	props.content_type = amqp_cstring_bytes("application/json");
	props.delivery_mode = AMQP_DELIVERY_PERSISTENT;
	props.message_id = amqp_cstring_bytes(message_id);

	die_on_status(amqp_basic_publish(r->conn, CHANNEL,
									 amqp_cstring_bytes(r->opt->exchange),
									 amqp_cstring_bytes(r->opt->routing_key),
									 1, 0, &props,
									 format_body(r->body, r->opt->body_size, seq)),
				  "basic.publish");
	r->published = seq;
	watchdog_kick(&r->watchdog_armed_at, r->opt->timeout_s);
}

/* ------------------------------------------------------------------ */
/* Confirms                                                            */

static void
settle_tag(struct run *r, uint64_t tag, enum tag_state outcome)
{
	if (r->tag_state[tag] != TAG_PENDING)
		return;
	r->tag_state[tag] = (unsigned char) outcome;
	r->settled++;
	if (outcome == TAG_ACKED)
		r->acked++;
	else
		r->nacked++;
}

static void
handle_confirm(struct run *r, uint64_t tag, amqp_boolean_t multiple,
			   enum tag_state outcome)
{
	const char *kind = outcome == TAG_ACKED ? "basic.ack" : "basic.nack";
	uint64_t	t;

	if (tag == 0 || tag > r->published)
		die("%s for delivery tag %" PRIu64 " but only %" PRIu64
			" published", kind, tag, r->published);
	if (!multiple && r->tag_state[tag] != TAG_PENDING)
		die("duplicate %s for delivery tag %" PRIu64, kind, tag);

	for (t = multiple ? r->lowest_open : tag; t <= tag; t++)
		settle_tag(r, t, outcome);
	while (r->lowest_open <= r->published &&
		   r->tag_state[r->lowest_open] != TAG_PENDING)
		r->lowest_open++;
}

/* The returned message's header and body frames follow basic.return; they
 * must be consumed or the next "frame" we read would be its content. */
static void
handle_return(struct run *r, const amqp_basic_return_t *ret)
{
	amqp_message_t msg;

	if (r->returned == 0)
		fprintf(stderr, PROG ": first basic.return: %u %.*s (routing key '%.*s')\n",
				ret->reply_code, (int) ret->reply_text.len,
				(const char *) ret->reply_text.bytes,
				(int) ret->routing_key.len, (const char *) ret->routing_key.bytes);
	r->returned++;
	die_on_rpc_reply(amqp_read_message(r->conn, CHANNEL, &msg, 0),
					 "reading returned message");
	amqp_destroy_message(&msg);
}

static void
handle_connection_method(const amqp_method_t *m)
{
	die_on_close_method(m, "publishing");
	if (m->id == AMQP_CONNECTION_BLOCKED_METHOD)
	{
		const amqp_connection_blocked_t *b = m->decoded;

		fprintf(stderr, PROG ": broker blocked the connection: %.*s\n",
				(int) b->reason.len, (const char *) b->reason.bytes);
	}
	else if (m->id == AMQP_CONNECTION_UNBLOCKED_METHOD)
	{
		fprintf(stderr, PROG ": broker unblocked the connection\n");
	}
	else
	{
		die("unexpected method 0x%08x on channel 0", m->id);
	}
}

static void
handle_frame(struct run *r, const amqp_frame_t *f)
{
	const amqp_method_t *m = &f->payload.method;

	if (f->frame_type != AMQP_FRAME_METHOD)
		die("unexpected frame type %u on channel %u", f->frame_type,
			f->channel);
	if (f->channel == 0)
	{
		handle_connection_method(m);
		return;
	}
	if (f->channel != CHANNEL)
		die("frame on unknown channel %u", f->channel);

	switch (m->id)
	{
		case AMQP_BASIC_ACK_METHOD:
			{
				const amqp_basic_ack_t *a = m->decoded;

				handle_confirm(r, a->delivery_tag, a->multiple, TAG_ACKED);
				break;
			}
		case AMQP_BASIC_NACK_METHOD:
			{
				const amqp_basic_nack_t *n = m->decoded;

				handle_confirm(r, n->delivery_tag, n->multiple, TAG_NACKED);
				break;
			}
		case AMQP_BASIC_RETURN_METHOD:
			handle_return(r, m->decoded);
			break;
		default:
			die_on_close_method(m, "publishing");
			die("unexpected method 0x%08x on channel %u", m->id, f->channel);
	}
}

/* Returns 0 if no complete frame arrived within *tv. */
static int
read_one_frame(struct run *r, const struct timeval *tv)
{
	amqp_frame_t f;
	int			status = amqp_simple_wait_frame_noblock(r->conn, &f, tv);

	if (status == AMQP_STATUS_TIMEOUT)
		return 0;
	die_on_status(status, "waiting for confirms");
	watchdog_kick(&r->watchdog_armed_at, r->opt->timeout_s);
	handle_frame(r, &f);

	/*
	 * Decoded frames live in the channel pool until released; without this a
	 * long run grows without bound.
	 */
	amqp_maybe_release_buffers_on_channel(r->conn, f.channel);
	return 1;
}

/* Blocks (bounded) for one frame, then takes whatever else has already
 * arrived without another syscall-level wait, so the window is refilled
 * with as many free slots as possible at once. */
static void
collect_confirms(struct run *r)
{
	struct timeval wait = seconds_tv(r->opt->timeout_s);
	static const struct timeval no_wait = {0, 0};

	if (!read_one_frame(r, &wait))
		die("no confirm within %d s (%" PRIu64 " published, %" PRIu64
			" settled)", r->opt->timeout_s, r->published, r->settled);
	while (amqp_frames_enqueued(r->conn) || amqp_data_in_buffer(r->conn))
		if (!read_one_frame(r, &no_wait))
			break;				/* only part of a frame is buffered */
}

static void
enable_confirms(amqp_connection_state_t conn)
{
	amqp_confirm_select(conn, CHANNEL);
	die_on_rpc(conn, "confirm.select");
}

/* Sliding window: keep up to W publishes unconfirmed at all times. */
static void
run_publish_loop(struct run *r)
{
	const struct options *opt = r->opt;

	watchdog_kick(&r->watchdog_armed_at, r->opt->timeout_s);
	while (r->settled < opt->count)
	{
		while (r->published < opt->count &&
			   r->published - r->settled < opt->window)
			publish_one(r);
		collect_confirms(r);
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

	bench_set_prog(PROG);
	parse_args(argc, argv, &opt);
	signal(SIGALRM, watchdog_fired);

	memset(&r, 0, sizeof(r));
	r.opt = &opt;
	r.lowest_open = 1;
	r.id_prefix = random_u64();
	r.tag_state = calloc(opt.count + 1, 1);
	r.body = malloc(opt.body_size + 64);	/* 64: the fixed JSON around pad */
	if (!r.tag_state || !r.body)
		die("out of memory");

	r.conn = connect_broker(opt.url, opt.timeout_s, CHANNEL);
	if (opt.declare_queue)
		declare_topology(r.conn, &opt);
	enable_confirms(r.conn);

	t0 = now_s();
	run_publish_loop(&r);
	elapsed = now_s() - t0;

	close_connection(r.conn, CHANNEL);
	printf("ceiling: %" PRIu64 " messages in %.3f s = %.0f msg/s"
		   " (acked=%" PRIu64 " nacked=%" PRIu64 " returned=%" PRIu64 ")\n",
		   opt.count, elapsed, (double) opt.count / elapsed, r.acked,
		   r.nacked, r.returned);
	free(r.tag_state);
	free(r.body);
	return r.acked == opt.count && r.nacked == 0 && r.returned == 0 ? 0 : 1;
}
