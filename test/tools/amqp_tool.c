/*
 * amqp_tool: a small AMQP 0-9-1 client the mqtx TAP tests use to look at and
 * inject messages.  amqp-tools' amqp-get prints only bodies, and the tests
 * need properties, headers and redelivery flags, and publisher confirms.
 *
 *   amqp_tool get     --url URL --queue Q [--count N]
 *   amqp_tool count   --url URL --queue Q
 *   amqp_tool publish --url URL [--exchange EX] --routing-key RK
 *                     [--message-id ID] [--correlation-id ID] [--content-type CT]
 *                     [--header key=value ...] [--body S | --body-file F]
 *                     [--repeat N] [--persistent]
 *   amqp_tool declare --url URL --queue Q [--durable]
 *   amqp_tool purge   --url URL --queue Q
 *
 * Every subcommand takes --timeout-ms MS (default 10000), which bounds each
 * wait on the network.  Exit status: 0 success, 1 broker/connection failure
 * (reason on stderr), 2 usage error.
 *
 * get: basic.get + basic.ack up to N messages, one JSON object per line:
 *   {"exchange":..,"routing_key":..,"redelivered":false, <properties>,
 *    "headers":{..},"body":".."}
 * Only properties the message carries appear (content_type, message_id,
 * app_id, ... as strings; delivery_mode, priority, timestamp as numbers).
 * An empty queue prints nothing and still exits 0.  Strings keep valid UTF-8
 * as is; bytes that are not valid UTF-8 come out as \u00XX (see json_string).
 *
 * count: ready messages of an existing queue (passive declare).
 *
 * publish: mandatory, with publisher confirms; exits 0 only if every copy
 * was acked and none was returned.  --exchange defaults to "" (the default
 * exchange); --header values are strings.  Exit 1 after a timeout does not
 * prove the broker dropped the message.
 */
#define _XOPEN_SOURCE 700

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <amqp.h>
#include <amqp_tcp_socket.h>

#define CHANNEL 1
#define DEFAULT_TIMEOUT_MS 10000

static const char *progname = "amqp_tool";

/* ------------------------------------------------------------------ */
/* diagnostics                                                         */

static void
complain(const char *fmt,...)
{
	va_list		ap;

	fprintf(stderr, "%s: ", progname);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

/* AMQP short strings are not NUL-terminated; print them with %.*s. */
#define BYTES_ARG(b) (int) (b).len, (const char *) (b).bytes

/*
 * Explain a failed RPC.  Returns true when only the channel died, i.e. the
 * connection can still be closed politely.
 */
static bool
report_reply(const char *what, amqp_rpc_reply_t r)
{
	switch (r.reply_type)
	{
		case AMQP_RESPONSE_NORMAL:
			complain("%s: unexpected success reply", what);
			return true;
		case AMQP_RESPONSE_NONE:
			complain("%s: no reply from the library", what);
			return false;
		case AMQP_RESPONSE_LIBRARY_EXCEPTION:
			complain("%s: %s", what, amqp_error_string2(r.library_error));
			return false;
		case AMQP_RESPONSE_SERVER_EXCEPTION:
			break;
	}
	if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD)
	{
		const amqp_channel_close_t *m = r.reply.decoded;

		complain("%s: channel closed by broker: %u %.*s", what,
				 (unsigned) m->reply_code, BYTES_ARG(m->reply_text));
		return true;
	}
	if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD)
	{
		const amqp_connection_close_t *m = r.reply.decoded;

		complain("%s: connection closed by broker: %u %.*s", what,
				 (unsigned) m->reply_code, BYTES_ARG(m->reply_text));
		return false;
	}
	complain("%s: unexpected method 0x%08" PRIx32 " from broker", what,
			 (uint32_t) r.reply.id);
	return false;
}

/* ------------------------------------------------------------------ */
/* watchdog                                                            */

/*
 * rabbitmq-c has no timeout for amqp_read_message() or for socket writes
 * (basic.publish, basic.ack), so those calls run under an interval timer
 * whose expiry ends the process: a test must fail, never hang.
 */
static const char *watchdog_what = "";

static void
watchdog_fire(int signo)
{
	static const char prefix[] = ": timed out while ";
	ssize_t		n;

	(void) signo;
	/* Only async-signal-safe calls here. */
	n = write(STDERR_FILENO, progname, strlen(progname));
	n = write(STDERR_FILENO, prefix, sizeof(prefix) - 1);
	n = write(STDERR_FILENO, watchdog_what, strlen(watchdog_what));
	n = write(STDERR_FILENO, "\n", 1);
	(void) n;

	_exit(1);
}

static void
watchdog_set(long ms)
{
	struct itimerval it = {{0, 0}, {ms / 1000, (ms % 1000) * 1000}};

	setitimer(ITIMER_REAL, &it, NULL);
}

static void
watchdog_install(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = watchdog_fire;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGALRM, &sa, NULL);
}

static void
watchdog_arm(const char *what, long ms)
{
	watchdog_what = what;
	watchdog_set(ms);
}

static void
watchdog_disarm(void)
{
	watchdog_set(0);
}

/* ------------------------------------------------------------------ */
/* options                                                             */

enum option_id
{
	OPT_URL,
	OPT_QUEUE,
	OPT_COUNT,
	OPT_EXCHANGE,
	OPT_ROUTING_KEY,
	OPT_MESSAGE_ID,
	OPT_CORRELATION_ID,
	OPT_CONTENT_TYPE,
	OPT_HEADER,
	OPT_BODY,
	OPT_BODY_FILE,
	OPT_REPEAT,
	OPT_PERSISTENT,
	OPT_DURABLE,
	OPT_TIMEOUT_MS,
	OPT_HELP
};

#define BIT(o) (1u << (o))

static const struct option long_options[] = {
	{"url", required_argument, NULL, OPT_URL},
	{"queue", required_argument, NULL, OPT_QUEUE},
	{"count", required_argument, NULL, OPT_COUNT},
	{"exchange", required_argument, NULL, OPT_EXCHANGE},
	{"routing-key", required_argument, NULL, OPT_ROUTING_KEY},
	{"message-id", required_argument, NULL, OPT_MESSAGE_ID},
	{"correlation-id", required_argument, NULL, OPT_CORRELATION_ID},
	{"content-type", required_argument, NULL, OPT_CONTENT_TYPE},
	{"header", required_argument, NULL, OPT_HEADER},
	{"body", required_argument, NULL, OPT_BODY},
	{"body-file", required_argument, NULL, OPT_BODY_FILE},
	{"repeat", required_argument, NULL, OPT_REPEAT},
	{"persistent", no_argument, NULL, OPT_PERSISTENT},
	{"durable", no_argument, NULL, OPT_DURABLE},
	{"timeout-ms", required_argument, NULL, OPT_TIMEOUT_MS},
	{"help", no_argument, NULL, OPT_HELP},
	{NULL, 0, NULL, 0}
};

struct options
{
	unsigned	seen;			/* BIT(option_id) for each option given */
	const char *url;
	const char *queue;
	const char *exchange;
	const char *routing_key;
	const char *message_id;
	const char *correlation_id;
	const char *content_type;
	const char *body;
	const char *body_file;
	char	  **headers;		/* "key=value" strings, pointing into argv */
	int			n_headers;
	long		count;
	long		repeat;
	long		timeout_ms;
};

static void
usage(FILE *out)
{
	fprintf(out,
			"usage:\n"
			"  amqp_tool get     --url URL --queue Q [--count N]\n"
			"  amqp_tool count   --url URL --queue Q\n"
			"  amqp_tool publish --url URL [--exchange EX] --routing-key RK\n"
			"              [--message-id ID] [--correlation-id ID] [--content-type CT]\n"
			"              [--header key=value ...] [--body S | --body-file F]\n"
			"              [--repeat N] [--persistent]\n"
			"  amqp_tool declare --url URL --queue Q [--durable]\n"
			"  amqp_tool purge   --url URL --queue Q\n"
			"all take --timeout-ms MS (default %d); --body-file - reads stdin\n",
			DEFAULT_TIMEOUT_MS);
}

static bool
parse_positive(const char *name, const char *s, long *out)
{
	char	   *end;
	long		v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0' || v < 1)
	{
		complain("--%s wants a positive integer, got \"%s\"", name, s);
		return false;
	}
	*out = v;
	return true;
}

/* Returns false on a malformed option value (already reported). */
static bool
take_option(struct options *o, int id, char *arg)
{
	o->seen |= BIT(id);
	switch (id)
	{
		case OPT_URL:
			o->url = arg;
			break;
		case OPT_QUEUE:
			o->queue = arg;
			break;
		case OPT_EXCHANGE:
			o->exchange = arg;
			break;
		case OPT_ROUTING_KEY:
			o->routing_key = arg;
			break;
		case OPT_MESSAGE_ID:
			o->message_id = arg;
			break;
		case OPT_CORRELATION_ID:
			o->correlation_id = arg;
			break;
		case OPT_CONTENT_TYPE:
			o->content_type = arg;
			break;
		case OPT_BODY:
			o->body = arg;
			break;
		case OPT_BODY_FILE:
			o->body_file = arg;
			break;
		case OPT_PERSISTENT:
		case OPT_DURABLE:
			break;
		case OPT_COUNT:
			return parse_positive("count", arg, &o->count);
		case OPT_REPEAT:
			return parse_positive("repeat", arg, &o->repeat);
		case OPT_TIMEOUT_MS:
			return parse_positive("timeout-ms", arg, &o->timeout_ms);
		case OPT_HEADER:
			if (strchr(arg, '=') == NULL)
			{
				complain("--header wants key=value, got \"%s\"", arg);
				return false;
			}
			/* At most one header per two argv slots, so this is enough. */
			o->headers[o->n_headers++] = arg;
			break;
	}
	return true;
}

/* ------------------------------------------------------------------ */
/* session: one connection with channel CHANNEL open                   */

struct session
{
	amqp_connection_state_t conn;
	long		timeout_ms;
	bool		connection_ok;	/* worth sending connection.close */
	bool		channel_ok;		/* worth sending channel.close */
};

static struct timeval
ms_to_timeval(long ms)
{
	struct timeval tv = {ms / 1000, (ms % 1000) * 1000};

	return tv;
}

static int64_t
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Record a failed RPC; returns -1 so callers can `return session_fail()`. */
static int
session_fail(struct session *s, const char *what, amqp_rpc_reply_t r)
{
	bool		channel_only = report_reply(what, r);

	s->channel_ok = false;
	if (!channel_only)
		s->connection_ok = false;
	return -1;
}

/* Check the reply of the RPC the library just performed. */
static int
session_check(struct session *s, const char *what)
{
	amqp_rpc_reply_t r = amqp_get_rpc_reply(s->conn);

	return r.reply_type == AMQP_RESPONSE_NORMAL ? 0 : session_fail(s, what, r);
}

static int
session_connect(struct session *s, const char *url_arg)
{
	struct amqp_connection_info ci;
	struct timeval tv = ms_to_timeval(s->timeout_ms);
	amqp_socket_t *sock;
	amqp_rpc_reply_t r;
	char	   *url;
	int			rc;

	/* amqp_parse_url() carves the string up in place. */
	url = strdup(url_arg);
	if (url == NULL || amqp_parse_url(url, &ci) != AMQP_STATUS_OK)
	{
		complain("cannot parse AMQP URL \"%s\"", url_arg);
		free(url);
		return -1;
	}
	if (ci.ssl)
	{
		complain("amqps:// is not supported");
		free(url);
		return -1;
	}

	s->conn = amqp_new_connection();
	sock = s->conn ? amqp_tcp_socket_new(s->conn) : NULL;
	if (sock == NULL)
	{
		complain("out of memory creating connection");
		free(url);
		return -1;
	}
	/* Without these, login and RPCs would wait forever on a stuck broker. */
	amqp_set_handshake_timeout(s->conn, &tv);
	amqp_set_rpc_timeout(s->conn, &tv);

	rc = amqp_socket_open_noblock(sock, ci.host, ci.port, &tv);
	if (rc != AMQP_STATUS_OK)
	{
		complain("cannot connect to %s:%d: %s", ci.host, ci.port,
				 amqp_error_string2(rc));
		free(url);
		return -1;
	}
	r = amqp_login(s->conn, ci.vhost, 0, AMQP_DEFAULT_FRAME_SIZE, 0,
				   AMQP_SASL_METHOD_PLAIN, ci.user, ci.password);
	free(url);
	if (r.reply_type != AMQP_RESPONSE_NORMAL)
		return session_fail(s, "login", r);
	s->connection_ok = true;

	amqp_channel_open(s->conn, CHANNEL);
	if (session_check(s, "channel.open") < 0)
		return -1;
	s->channel_ok = true;
	return 0;
}

/*
 * Close politely where still possible.  The channel.close round trip also
 * proves the broker processed everything sent before it (acks in
 * particular), so a failure here fails the command.
 */
static int
session_close(struct session *s)
{
	int			status = 0;
	amqp_rpc_reply_t r;

	if (s->channel_ok)
	{
		r = amqp_channel_close(s->conn, CHANNEL, AMQP_REPLY_SUCCESS);
		if (r.reply_type != AMQP_RESPONSE_NORMAL)
			status = session_fail(s, "channel.close", r);
	}
	if (s->connection_ok)
	{
		r = amqp_connection_close(s->conn, AMQP_REPLY_SUCCESS);
		if (r.reply_type != AMQP_RESPONSE_NORMAL)
			status = session_fail(s, "connection.close", r);
	}
	if (s->conn)
		amqp_destroy_connection(s->conn);
	s->conn = NULL;
	return status;
}

/* amqp_read_message() with the watchdog; the message is only valid on 0. */
static int
session_read_message(struct session *s, amqp_message_t *msg)
{
	amqp_rpc_reply_t r;

	watchdog_arm("reading message content", s->timeout_ms);
	r = amqp_read_message(s->conn, CHANNEL, msg, 0);
	watchdog_disarm();
	return r.reply_type == AMQP_RESPONSE_NORMAL ? 0
		: session_fail(s, "reading message content", r);
}

/* Report a library status from a non-RPC call (publish, ack, frame wait). */
static int
session_status(struct session *s, const char *what, int rc)
{
	if (rc == AMQP_STATUS_OK)
		return 0;
	complain("%s: %s", what, amqp_error_string2(rc));
	s->channel_ok = s->connection_ok = false;
	return -1;
}

/* ------------------------------------------------------------------ */
/* JSON rendering                                                      */

/*
 * Length of the well-formed UTF-8 sequence starting at p (Unicode table 3-7:
 * no overlongs, no surrogates, nothing above U+10FFFF), or 0 if there is none.
 */
static size_t
utf8_sequence_length(const unsigned char *p, size_t avail)
{
	unsigned char lo = 0x80;
	unsigned char hi = 0xBF;
	size_t		n;
	size_t		i;

	if (p[0] >= 0xC2 && p[0] <= 0xDF)
		n = 2;
	else if (p[0] >= 0xE0 && p[0] <= 0xEF)
	{
		n = 3;
		if (p[0] == 0xE0)
			lo = 0xA0;
		else if (p[0] == 0xED)
			hi = 0x9F;
	}
	else if (p[0] >= 0xF0 && p[0] <= 0xF4)
	{
		n = 4;
		if (p[0] == 0xF0)
			lo = 0x90;
		else if (p[0] == 0xF4)
			hi = 0x8F;
	}
	else
		return 0;

	if (avail < n || p[1] < lo || p[1] > hi)
		return 0;
	for (i = 2; i < n; i++)
		if ((p[i] & 0xC0) != 0x80)
			return 0;
	return n;
}

/*
 * UTF-8 passes through untouched.  A byte that is not part of well-formed
 * UTF-8 (poison bodies) becomes \u00XX: passing it through would make the
 * whole line invalid JSON, and for an all-binary body the decoded Perl string
 * then compares equal to the original byte string.
 */
static void
json_string(FILE *out, const void *data, size_t len)
{
	const unsigned char *p = data;
	size_t		i = 0;

	fputc('"', out);
	while (i < len)
	{
		unsigned char c = p[i];
		size_t		n;

		if (c == '"' || c == '\\')
		{
			fputc('\\', out);
			fputc(c, out);
			i++;
		}
		else if (c < 0x20)
		{
			fprintf(out, "\\u%04x", c);
			i++;
		}
		else if (c < 0x80)
		{
			fputc(c, out);
			i++;
		}
		else if ((n = utf8_sequence_length(p + i, len - i)) > 0)
		{
			fwrite(p + i, 1, n, out);
			i += n;
		}
		else
		{
			fprintf(out, "\\u%04x", c);
			i++;
		}
	}
	fputc('"', out);
}

static void
json_bytes(FILE *out, amqp_bytes_t b)
{
	json_string(out, b.bytes, b.len);
}

static void
json_key(FILE *out, const char *key)
{
	fprintf(out, ",\"%s\":", key);
}

/* JSON has no NaN or infinities. */
static void
json_double(FILE *out, double d, int digits)
{
	if (isfinite(d))
		fprintf(out, "%.*g", digits, d);
	else
		fputs("null", out);
}

/* Exact decimal text, e.g. {decimals 2, value 5} -> 0.05. */
static void
json_decimal(FILE *out, amqp_decimal_t d)
{
	char		digits[16];
	int			len = snprintf(digits, sizeof(digits), "%" PRIu32, d.value);
	int			point = len - d.decimals;

	if (d.decimals == 0)
	{
		fputs(digits, out);
		return;
	}
	if (point <= 0)
	{
		fputs("0.", out);
		for (; point < 0; point++)
			fputc('0', out);
		fputs(digits, out);
	}
	else
		fprintf(out, "%.*s.%s", point, digits, digits + point);
}

static void json_table(FILE *out, const amqp_table_t *t);

static void json_field_value(FILE *out, const amqp_field_value_t *v);

static void
json_array(FILE *out, const amqp_array_t *a)
{
	int			i;

	fputc('[', out);
	for (i = 0; i < a->num_entries; i++)
	{
		if (i > 0)
			fputc(',', out);
		json_field_value(out, &a->entries[i]);
	}
	fputc(']', out);
}

static void
json_table(FILE *out, const amqp_table_t *t)
{
	int			i;

	fputc('{', out);
	for (i = 0; i < t->num_entries; i++)
	{
		if (i > 0)
			fputc(',', out);
		json_bytes(out, t->entries[i].key);
		fputc(':', out);
		json_field_value(out, &t->entries[i].value);
	}
	fputc('}', out);
}

static void
json_field_value(FILE *out, const amqp_field_value_t *v)
{
	switch (v->kind)
	{
		case AMQP_FIELD_KIND_BOOLEAN:
			fputs(v->value.boolean ? "true" : "false", out);
			break;
		case AMQP_FIELD_KIND_I8:
			fprintf(out, "%d", (int) v->value.i8);
			break;
		case AMQP_FIELD_KIND_U8:
			fprintf(out, "%u", (unsigned) v->value.u8);
			break;
		case AMQP_FIELD_KIND_I16:
			fprintf(out, "%d", (int) v->value.i16);
			break;
		case AMQP_FIELD_KIND_U16:
			fprintf(out, "%u", (unsigned) v->value.u16);
			break;
		case AMQP_FIELD_KIND_I32:
			fprintf(out, "%" PRId32, v->value.i32);
			break;
		case AMQP_FIELD_KIND_U32:
			fprintf(out, "%" PRIu32, v->value.u32);
			break;
		case AMQP_FIELD_KIND_I64:
			fprintf(out, "%" PRId64, v->value.i64);
			break;
		case AMQP_FIELD_KIND_U64:
		case AMQP_FIELD_KIND_TIMESTAMP:
			fprintf(out, "%" PRIu64, v->value.u64);
			break;
		case AMQP_FIELD_KIND_F32:
			json_double(out, v->value.f32, 9);	/* enough to round-trip */
			break;
		case AMQP_FIELD_KIND_F64:
			json_double(out, v->value.f64, 17);
			break;
		case AMQP_FIELD_KIND_DECIMAL:
			json_decimal(out, v->value.decimal);
			break;
		case AMQP_FIELD_KIND_UTF8:
		case AMQP_FIELD_KIND_BYTES:
			json_bytes(out, v->value.bytes);
			break;
		case AMQP_FIELD_KIND_TABLE:
			json_table(out, &v->value.table);
			break;
		case AMQP_FIELD_KIND_ARRAY:
			json_array(out, &v->value.array);
			break;
		case AMQP_FIELD_KIND_VOID:
		default:
			fputs("null", out);
			break;
	}
}

/* The string-valued basic properties, in output order. */
static const struct
{
	amqp_flags_t flag;
	const char *name;
	size_t		offset;
}			bytes_properties[] = {
#define BYTES_PROPERTY(FLAG, field) \
	{AMQP_BASIC_##FLAG##_FLAG, #field, offsetof(amqp_basic_properties_t, field)}
	BYTES_PROPERTY(CONTENT_TYPE, content_type),
	BYTES_PROPERTY(CONTENT_ENCODING, content_encoding),
	BYTES_PROPERTY(CORRELATION_ID, correlation_id),
	BYTES_PROPERTY(REPLY_TO, reply_to),
	BYTES_PROPERTY(EXPIRATION, expiration),
	BYTES_PROPERTY(MESSAGE_ID, message_id),
	BYTES_PROPERTY(TYPE, type),
	BYTES_PROPERTY(USER_ID, user_id),
	BYTES_PROPERTY(APP_ID, app_id),
	BYTES_PROPERTY(CLUSTER_ID, cluster_id),
#undef BYTES_PROPERTY
};

static void
json_properties(FILE *out, const amqp_basic_properties_t *p)
{
	size_t		i;

	for (i = 0; i < sizeof(bytes_properties) / sizeof(bytes_properties[0]); i++)
	{
		if (p->_flags & bytes_properties[i].flag)
		{
			json_key(out, bytes_properties[i].name);
			json_bytes(out, *(const amqp_bytes_t *)
					   ((const char *) p + bytes_properties[i].offset));
		}
	}
	if (p->_flags & AMQP_BASIC_DELIVERY_MODE_FLAG)
		fprintf(out, ",\"delivery_mode\":%u", (unsigned) p->delivery_mode);
	if (p->_flags & AMQP_BASIC_PRIORITY_FLAG)
		fprintf(out, ",\"priority\":%u", (unsigned) p->priority);
	if (p->_flags & AMQP_BASIC_TIMESTAMP_FLAG)
		fprintf(out, ",\"timestamp\":%" PRIu64, p->timestamp);
	if (p->_flags & AMQP_BASIC_HEADERS_FLAG)
	{
		json_key(out, "headers");
		json_table(out, &p->headers);
	}
}

/*
 * One line of JSON for a fetched message, in a malloc'd string (*line), so
 * that a failure halfway never leaves a partial line on stdout.
 */
static int
render_message(const amqp_basic_get_ok_t *ok, const amqp_message_t *msg,
			   char **line, size_t *len)
{
	FILE	   *out = open_memstream(line, len);

	if (out == NULL)
		return -1;
	fputs("{\"exchange\":", out);
	json_bytes(out, ok->exchange);
	json_key(out, "routing_key");
	json_bytes(out, ok->routing_key);
	fprintf(out, ",\"redelivered\":%s", ok->redelivered ? "true" : "false");
	json_properties(out, &msg->properties);
	json_key(out, "body");
	json_bytes(out, msg->body);
	fputs("}\n", out);
	if (ferror(out))
	{
		fclose(out);
		free(*line);
		return -1;
	}
	return fclose(out) == 0 ? 0 : -1;
}

/* ------------------------------------------------------------------ */
/* get                                                                 */

/* Fetch, ack and print one message; 1 = got one, 0 = queue empty, -1 error. */
static int
get_one(struct session *s, const char *queue)
{
	amqp_rpc_reply_t r;
	const amqp_basic_get_ok_t *ok;
	amqp_message_t msg;
	char	   *line = NULL;
	size_t		len = 0;
	int			rendered,
				acked;

	r = amqp_basic_get(s->conn, CHANNEL, amqp_cstring_bytes(queue), 0);
	if (r.reply_type != AMQP_RESPONSE_NORMAL)
		return session_fail(s, "basic.get", r);
	if (r.reply.id == AMQP_BASIC_GET_EMPTY_METHOD)
		return 0;
	if (r.reply.id != AMQP_BASIC_GET_OK_METHOD)
	{
		complain("basic.get: unexpected reply method 0x%08" PRIx32,
				 (uint32_t) r.reply.id);
		s->channel_ok = s->connection_ok = false;
		return -1;
	}
	/* ok lives in the connection's pool until amqp_maybe_release_buffers(). */
	ok = r.reply.decoded;
	if (session_read_message(s, &msg) < 0)
		return -1;
	rendered = render_message(ok, &msg, &line, &len);
	amqp_destroy_message(&msg);
	if (rendered < 0)
	{
		complain("out of memory rendering message");
		return -1;
	}

	/*
	 * Ack before printing: if the ack cannot be sent the message goes back to
	 * the queue, and the test must not believe it was consumed.
	 */
	watchdog_arm("sending basic.ack", s->timeout_ms);
	acked = amqp_basic_ack(s->conn, CHANNEL, ok->delivery_tag, 0);
	watchdog_disarm();
	if (session_status(s, "basic.ack", acked) < 0)
	{
		free(line);
		return -1;
	}
	amqp_maybe_release_buffers(s->conn);

	fwrite(line, 1, len, stdout);
	free(line);
	return fflush(stdout) == 0 ? 1 : -1;
}

static int
cmd_get(struct session *s, const struct options *o)
{
	long		i;
	int			rc = 1;

	for (i = 0; i < o->count && rc == 1; i++)
		rc = get_one(s, o->queue);
	return rc < 0 ? -1 : 0;
}

/* ------------------------------------------------------------------ */
/* count, declare, purge                                               */

static int
cmd_count(struct session *s, const struct options *o)
{
	amqp_queue_declare_ok_t *ok;

	ok = amqp_queue_declare(s->conn, CHANNEL, amqp_cstring_bytes(o->queue),
							1, 0, 0, 0, amqp_empty_table);
	if (session_check(s, "queue.declare (passive)") < 0)
		return -1;
	printf("%" PRIu32 "\n", ok->message_count);
	return fflush(stdout) == 0 ? 0 : -1;
}

static int
cmd_declare(struct session *s, const struct options *o)
{
	amqp_queue_declare(s->conn, CHANNEL, amqp_cstring_bytes(o->queue), 0,
					   (o->seen & BIT(OPT_DURABLE)) != 0, 0, 0,
					   amqp_empty_table);
	return session_check(s, "queue.declare");
}

static int
cmd_purge(struct session *s, const struct options *o)
{
	amqp_queue_purge(s->conn, CHANNEL, amqp_cstring_bytes(o->queue));
	return session_check(s, "queue.purge");
}

/* ------------------------------------------------------------------ */
/* publish                                                             */

/* Publisher-confirm bookkeeping; delivery tags run 1..published. */
struct confirms
{
	uint64_t	published;
	uint64_t	settled;		/* acked + nacked */
	uint64_t	nacked;
	uint64_t	returned;
	uint64_t	lowest_open;	/* no tag below this is unsettled */
	unsigned char *done;		/* done[tag] != 0 once settled */
};

static void
confirms_settle_one(struct confirms *c, uint64_t tag, bool ack)
{
	if (c->done[tag])
		return;
	c->done[tag] = 1;
	c->settled++;
	if (!ack)
		c->nacked++;
}

/* basic.ack / basic.nack, honouring `multiple` (tag 0 + multiple = all). */
static int
confirms_settle(struct confirms *c, uint64_t tag, bool multiple, bool ack)
{
	uint64_t	t;

	if (multiple && tag == 0)
		tag = c->published;
	if (tag == 0 || tag > c->published)
	{
		complain("broker confirmed unknown delivery tag %" PRIu64, tag);
		return -1;
	}
	if (!multiple)
	{
		confirms_settle_one(c, tag, ack);
		return 0;
	}
	for (t = c->lowest_open; t <= tag; t++)
		confirms_settle_one(c, t, ack);
	if (tag >= c->lowest_open)
		c->lowest_open = tag + 1;
	return 0;
}

/* basic.return is followed by the returned message, which must be drained. */
static int
confirms_returned(struct session *s, struct confirms *c,
				  const amqp_basic_return_t *ret)
{
	amqp_message_t msg;

	complain("publish: broker returned message: %u %.*s (exchange \"%.*s\", "
			 "routing key \"%.*s\")", (unsigned) ret->reply_code,
			 BYTES_ARG(ret->reply_text), BYTES_ARG(ret->exchange),
			 BYTES_ARG(ret->routing_key));
	c->returned++;
	if (session_read_message(s, &msg) < 0)
		return -1;
	amqp_destroy_message(&msg);
	return 0;
}

/* A close from the broker arrives as a plain frame here, not as an RPC reply. */
static int
session_closed_by_broker(struct session *s, const amqp_frame_t *f)
{
	amqp_rpc_reply_t r;

	memset(&r, 0, sizeof(r));
	r.reply_type = AMQP_RESPONSE_SERVER_EXCEPTION;
	r.reply = f->payload.method;
	return session_fail(s, "publish", r);
}

static int
confirms_handle_frame(struct session *s, struct confirms *c,
					  const amqp_frame_t *f)
{
	const amqp_method_t *m = &f->payload.method;

	if (f->frame_type != AMQP_FRAME_METHOD)
	{
		complain("publish: unexpected frame type %u on channel %u",
				 (unsigned) f->frame_type, (unsigned) f->channel);
		s->channel_ok = s->connection_ok = false;
		return -1;
	}
	switch (m->id)
	{
		case AMQP_BASIC_ACK_METHOD:
			{
				const amqp_basic_ack_t *a = m->decoded;

				return confirms_settle(c, a->delivery_tag, a->multiple, true);
			}
		case AMQP_BASIC_NACK_METHOD:
			{
				const amqp_basic_nack_t *n = m->decoded;

				return confirms_settle(c, n->delivery_tag, n->multiple, false);
			}
		case AMQP_BASIC_RETURN_METHOD:
			return confirms_returned(s, c, m->decoded);
		case AMQP_CHANNEL_CLOSE_METHOD:
		case AMQP_CONNECTION_CLOSE_METHOD:
			return session_closed_by_broker(s, f);
		default:
			return 0;
	}
}

/*
 * Process broker frames until every publish is settled.  With drain_only,
 * stop as soon as nothing more is buffered instead: called between publishes
 * so confirms do not pile up unread.
 */
static int
confirms_pump(struct session *s, struct confirms *c, bool drain_only)
{
	int64_t		deadline = now_ms() + (drain_only ? 0 : s->timeout_ms);

	while (c->settled < c->published)
	{
		int64_t		left = deadline - now_ms();
		struct timeval tv = ms_to_timeval(left > 0 ? (long) left : 0);
		amqp_frame_t f;
		int			rc;

		rc = amqp_simple_wait_frame_noblock(s->conn, &f, &tv);
		if (rc == AMQP_STATUS_TIMEOUT)
		{
			if (drain_only)
				return 0;

			/*
			 * A broker that sends no confirms (resource alarm, say) would not
			 * answer a polite close either; do not wait a second time.
			 */
			complain("publish: timed out waiting for confirms: %" PRIu64
					 " of %" PRIu64 " settled", c->settled, c->published);
			s->channel_ok = s->connection_ok = false;
			return -1;
		}
		if (session_status(s, "waiting for confirms", rc) < 0 ||
			confirms_handle_frame(s, c, &f) < 0)
			return -1;
		amqp_maybe_release_buffers(s->conn);
	}
	return 0;
}

static int
read_stream(FILE *in, amqp_bytes_t *out)
{
	char	   *buf = NULL;
	size_t		len = 0,
				cap = 0;

	for (;;)
	{
		size_t		n;

		if (len == cap)
		{
			char	   *bigger;

			cap = cap ? cap * 2 : 65536;
			bigger = realloc(buf, cap);
			if (bigger == NULL)
			{
				free(buf);
				return -1;
			}
			buf = bigger;
		}
		n = fread(buf + len, 1, cap - len, in);
		len += n;

		if (n == 0)
			break;
	}
	if (ferror(in))
	{
		free(buf);
		return -1;
	}
	out->bytes = buf;
	out->len = len;
	return 0;
}

/* --body-file contents, arbitrary bytes; "-" is stdin.  Caller frees. */
static int
read_body_file(const char *path, amqp_bytes_t *out)
{
	bool		is_stdin = strcmp(path, "-") == 0;
	FILE	   *in = is_stdin ? stdin : fopen(path, "rb");
	int			rc;

	if (in == NULL)
	{
		complain("cannot open %s: %s", path, strerror(errno));
		return -1;
	}
	rc = read_stream(in, out);
	if (rc < 0)
		complain("cannot read %s", path);
	if (!is_stdin)
		fclose(in);
	return rc;
}

/* --header key=value options as an AMQP table of long strings. */
static amqp_table_t
build_headers(const struct options *o, amqp_table_entry_t *entries)
{
	amqp_table_t t = {o->n_headers, entries};
	int			i;

	for (i = 0; i < o->n_headers; i++)
	{
		const char *kv = o->headers[i];
		const char *eq = strchr(kv, '=');

		entries[i].key.bytes = (void *) kv;
		entries[i].key.len = (size_t) (eq - kv);
		entries[i].value.kind = AMQP_FIELD_KIND_UTF8;
		entries[i].value.value.bytes = amqp_cstring_bytes(eq + 1);
	}
	return t;
}

static void
build_properties(const struct options *o, amqp_table_entry_t *entries,
				 amqp_basic_properties_t *p)
{
	memset(p, 0, sizeof(*p));
	if (o->message_id)
	{
		p->_flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
		p->message_id = amqp_cstring_bytes(o->message_id);
	}
	if (o->correlation_id)
	{
		p->_flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
		p->correlation_id = amqp_cstring_bytes(o->correlation_id);
	}
	if (o->content_type)
	{
		p->_flags |= AMQP_BASIC_CONTENT_TYPE_FLAG;
		p->content_type = amqp_cstring_bytes(o->content_type);
	}
	if (o->seen & BIT(OPT_PERSISTENT))
	{
		p->_flags |= AMQP_BASIC_DELIVERY_MODE_FLAG;
		p->delivery_mode = AMQP_DELIVERY_PERSISTENT;
	}
	if (o->n_headers > 0)
	{
		p->_flags |= AMQP_BASIC_HEADERS_FLAG;
		p->headers = build_headers(o, entries);
	}
}

static int
publish_all(struct session *s, const struct options *o, struct confirms *c,
			amqp_bytes_t body)
{
	amqp_table_entry_t *entries = calloc((size_t) o->n_headers + 1,
										 sizeof(*entries));
	amqp_basic_properties_t props;
	long		i;
	int			rc = 0;

	if (entries == NULL)
	{
		complain("out of memory");
		return -1;
	}
	build_properties(o, entries, &props);
	for (i = 0; i < o->repeat && rc == 0; i++)
	{
		watchdog_arm("publishing", s->timeout_ms);
		/* mandatory: an unroutable message must come back as a failure. */
		rc = session_status(s, "basic.publish",
							amqp_basic_publish(s->conn, CHANNEL,
											   amqp_cstring_bytes(o->exchange),
											   amqp_cstring_bytes(o->routing_key),
											   1, 0, &props, body));
		watchdog_disarm();
		if (rc == 0)
		{
			c->published++;
			rc = confirms_pump(s, c, true);
		}
	}
	free(entries);
	return rc;
}

static int
cmd_publish(struct session *s, const struct options *o)
{
	struct confirms c = {0, 0, 0, 0, 1, NULL};
	amqp_bytes_t body = amqp_empty_bytes;
	int			rc = -1;

	if (o->body)
		body = amqp_cstring_bytes(o->body);
	else if (o->body_file && read_body_file(o->body_file, &body) < 0)
		return -1;

	amqp_confirm_select(s->conn, CHANNEL);
	c.done = calloc((size_t) o->repeat + 1, 1);
	if (c.done == NULL)
		complain("out of memory");
	else if (session_check(s, "confirm.select") == 0 &&
			 publish_all(s, o, &c, body) == 0 &&
			 confirms_pump(s, &c, false) == 0)
	{
		if (c.nacked > 0 || c.returned > 0)
			complain("publish: %" PRIu64 " of %" PRIu64 " messages failed "
					 "(%" PRIu64 " nacked, %" PRIu64 " returned)",
					 c.nacked + c.returned, c.published, c.nacked, c.returned);
		else
			rc = 0;
	}
	free(c.done);
	if (o->body_file)
		free(body.bytes);
	return rc;
}

/* ------------------------------------------------------------------ */
/* main                                                                */

static const struct command
{
	const char *name;
	int			(*run) (struct session *, const struct options *);
	unsigned	required;
	unsigned	allowed;		/* besides --url, --timeout-ms, --help */
}			commands[] = {
	{"get", cmd_get, BIT(OPT_QUEUE), BIT(OPT_QUEUE) | BIT(OPT_COUNT)},
	{"count", cmd_count, BIT(OPT_QUEUE), BIT(OPT_QUEUE)},
	{"publish", cmd_publish, BIT(OPT_ROUTING_KEY),
		BIT(OPT_EXCHANGE) | BIT(OPT_ROUTING_KEY) | BIT(OPT_MESSAGE_ID) | BIT(OPT_CORRELATION_ID) |
		BIT(OPT_CONTENT_TYPE) | BIT(OPT_HEADER) | BIT(OPT_BODY) |
	BIT(OPT_BODY_FILE) | BIT(OPT_REPEAT) | BIT(OPT_PERSISTENT)},
	{"declare", cmd_declare, BIT(OPT_QUEUE), BIT(OPT_QUEUE) | BIT(OPT_DURABLE)},
	{"purge", cmd_purge, BIT(OPT_QUEUE), BIT(OPT_QUEUE)},
};

static const struct command *
find_command(const char *name)
{
	size_t		i;

	for (i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		if (strcmp(commands[i].name, name) == 0)
			return &commands[i];
	return NULL;
}

/* Complain about the first option in mask; false if mask is empty. */
static bool
report_option(unsigned mask, const char *problem, const char *cmd)
{
	const struct option *lo;

	for (lo = long_options; lo->name != NULL; lo++)
	{
		if (mask & BIT(lo->val))
		{
			complain("%s: --%s %s", cmd, lo->name, problem);
			return true;
		}
	}
	return false;
}

/* Returns 0, or the exit status to leave with. */
static int
parse_options(const struct command *cmd, int argc, char **argv,
			  struct options *o)
{
	unsigned	allowed = cmd->allowed | BIT(OPT_URL) | BIT(OPT_TIMEOUT_MS);
	int			id;

	o->headers = calloc((size_t) argc, sizeof(*o->headers));
	if (o->headers == NULL)
	{
		complain("out of memory");
		return 1;
	}
	while ((id = getopt_long(argc, argv, "h", long_options, NULL)) != -1)
	{
		if (id == 'h' || id == OPT_HELP)
		{
			usage(stdout);
			exit(0);
		}
		if (id == '?' || !take_option(o, id, optarg))
			return 2;
	}
	if (optind < argc)
	{
		complain("%s: unexpected argument \"%s\"", cmd->name, argv[optind]);
		return 2;
	}
	if (report_option(o->seen & ~allowed, "does not apply here", cmd->name) ||
		report_option((cmd->required | BIT(OPT_URL)) & ~o->seen,
					  "is required", cmd->name))
		return 2;
	if (o->body && o->body_file)
	{
		complain("%s: give --body or --body-file, not both", cmd->name);
		return 2;
	}
	return 0;
}

int
main(int argc, char **argv)
{
	struct options o = {0};
	struct session s = {0};
	const struct command *cmd;
	int			status;

	if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)
	{
		usage(argc < 2 ? stderr : stdout);
		return argc < 2 ? 2 : 0;
	}
	cmd = find_command(argv[1]);
	if (cmd == NULL)
	{
		complain("unknown subcommand \"%s\"", argv[1]);
		usage(stderr);
		return 2;
	}
	o.exchange = "";
	o.count = 1;
	o.repeat = 1;
	o.timeout_ms = DEFAULT_TIMEOUT_MS;
	/* getopt sees the subcommand as argv[0]. */
	status = parse_options(cmd, argc - 1, argv + 1, &o);
	if (status != 0)
	{
		free(o.headers);
		return status;
	}

	watchdog_install();
	s.timeout_ms = o.timeout_ms;
	status = session_connect(&s, o.url) == 0 && cmd->run(&s, &o) == 0 ? 0 : 1;
	if (session_close(&s) != 0)
		status = 1;
	free(o.headers);
	return status;
}
