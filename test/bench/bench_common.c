/*
 * bench_common: see bench_common.h.
 */
#define _POSIX_C_SOURCE 200809L

#include "bench_common.h"

#include <amqp_tcp_socket.h>

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *prog = "bench";

/* Built by bench_set_prog(): the signal handler may only write(). */
static char watchdog_msg[256];
static size_t watchdog_msg_len;

void
bench_set_prog(const char *name)
{
	int			n;

	prog = name;
	n = snprintf(watchdog_msg, sizeof(watchdog_msg),
				 "%s: watchdog: no progress, broker stopped reading or "
				 "answering\n", prog);

	if (n < 0)
		n = 0;

	if ((size_t) n >= sizeof(watchdog_msg))
		n = (int) sizeof(watchdog_msg) - 1;
	watchdog_msg_len = (size_t) n;
}

const char *
bench_prog(void)
{
	return prog;
}

void
die(const char *fmt,...)
{
	va_list		ap;

	fprintf(stderr, "%s: ", prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

/* ------------------------------------------------------------------ */
/* Error reporting                                                     */

void
die_on_status(int status, const char *what)
{
	if (status != AMQP_STATUS_OK)
		die("%s: %s", what, amqp_error_string2(status));
}

/* Channel and connection close carry the only useful diagnostics the
 * broker gives (e.g. 404 NOT_FOUND for a missing exchange or queue), so
 * both the RPC path and the programs' frame loops end up here. */
void
die_on_close_method(const amqp_method_t *m, const char *what)
{
	if (m->id == AMQP_CHANNEL_CLOSE_METHOD)
	{
		const amqp_channel_close_t *c = m->decoded;

		die("%s: channel closed by broker: %u %.*s", what, c->reply_code,
			(int) c->reply_text.len, (const char *) c->reply_text.bytes);
	}
	if (m->id == AMQP_CONNECTION_CLOSE_METHOD)
	{
		const amqp_connection_close_t *c = m->decoded;

		die("%s: connection closed by broker: %u %.*s", what,
			c->reply_code, (int) c->reply_text.len,
			(const char *) c->reply_text.bytes);
	}
}

void
die_on_rpc_reply(amqp_rpc_reply_t r, const char *what)
{
	switch (r.reply_type)
	{
		case AMQP_RESPONSE_NORMAL:
			return;
		case AMQP_RESPONSE_NONE:
			die("%s: no reply (missing RPC reply type)", what);
			break;
		case AMQP_RESPONSE_LIBRARY_EXCEPTION:
			die("%s: %s", what, amqp_error_string2(r.library_error));
			break;
		case AMQP_RESPONSE_SERVER_EXCEPTION:
			die_on_close_method(&r.reply, what);
			die("%s: unexpected server method 0x%08x", what, r.reply.id);
			break;
	}
}

void
die_on_rpc(amqp_connection_state_t conn, const char *what)
{
	die_on_rpc_reply(amqp_get_rpc_reply(conn), what);
}

/* ------------------------------------------------------------------ */
/* Watchdog and clock                                                  */

/* rabbitmq-c writes (basic.publish, basic.ack) with an infinite deadline
 * and some reads wait with one too; a broker that stops reading (resource
 * alarm) would hang the benchmark forever.  This backstop turns such a
 * stall into exit 1. */
void
watchdog_fired(int sig)
{
	(void) sig;
	if (write(STDERR_FILENO, watchdog_msg, watchdog_msg_len) < 0)
	{
		/* nothing left to report to */
	}
	_exit(1);
}

double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

/* Called on every unit of progress.  Re-arming at most once a second keeps
 * the alarm() syscall off the per-message path we measure. */
void
watchdog_kick(double *armed_at, int timeout_s)
{
	double		now = now_s();

	if (now - *armed_at >= 1.0)
	{
		alarm((unsigned) timeout_s + 5);
		*armed_at = now;
	}
}

/* ------------------------------------------------------------------ */
/* Connection setup                                                    */

struct timeval
seconds_tv(int s)
{
	struct timeval tv = {s, 0};

	return tv;
}

static void
login(amqp_connection_state_t conn, const struct amqp_connection_info *ci)
{
	/*
	 * rabbitmq-c does not announce connection.blocked by default; without it
	 * a resource alarm looks like a silent hang instead of a message.
	 */
	amqp_table_entry_t cap = {
		.key = amqp_cstring_bytes("connection.blocked"),
		.value = {.kind = AMQP_FIELD_KIND_BOOLEAN,.value = {.boolean = 1}},
	};
	amqp_table_entry_t prop = {
		.key = amqp_cstring_bytes("capabilities"),
		.value = {.kind = AMQP_FIELD_KIND_TABLE,
		.value = {.table = {.num_entries = 1,.entries = &cap}}},
	};
	amqp_table_t props = {.num_entries = 1,.entries = &prop};

	/*
	 * heartbeat 0: a run lasts seconds, and heartbeat bookkeeping sits on the
	 * path we are trying to measure.
	 */
	die_on_rpc_reply(amqp_login_with_properties(conn, ci->vhost, 0,
												AMQP_DEFAULT_FRAME_SIZE, 0,
												&props,
												AMQP_SASL_METHOD_PLAIN,
												ci->user, ci->password),
					 "login");
}

amqp_connection_state_t
connect_broker(const char *url_arg, int timeout_s,
			   amqp_channel_t channel)
{
	struct amqp_connection_info ci;
	struct timeval tv = seconds_tv(timeout_s);
	amqp_connection_state_t conn;
	amqp_socket_t *sock;
	int			status;
	char	   *url = strdup(url_arg);	/* amqp_parse_url() writes into it */

	if (!url)
		die("out of memory");
	if (amqp_parse_url(url, &ci) != AMQP_STATUS_OK)
		die("cannot parse --url '%s'", url_arg);
	if (ci.ssl)
		die("amqps:// is not supported");

	conn = amqp_new_connection();
	if (!conn || !(sock = amqp_tcp_socket_new(conn)))
		die("out of memory");
	status = amqp_socket_open_noblock(sock, ci.host, ci.port, &tv);
	if (status != AMQP_STATUS_OK)
		die("connect to %s:%d: %s", ci.host, ci.port,
			amqp_error_string2(status));
	die_on_status(amqp_set_handshake_timeout(conn, &tv), "handshake timeout");
	die_on_status(amqp_set_rpc_timeout(conn, &tv), "rpc timeout");
	login(conn, &ci);
	free(url);					/* ci points into it; login was its last user */

	amqp_channel_open(conn, channel);
	die_on_rpc(conn, "channel.open");
	return conn;
}

/* Closing the channel hands any unacked delivery back to its queue; its
 * close-ok also proves every earlier frame on it was processed. */
void
close_connection(amqp_connection_state_t conn, amqp_channel_t channel)
{
	die_on_rpc_reply(amqp_channel_close(conn, channel, AMQP_REPLY_SUCCESS),
					 "channel.close");
	die_on_rpc_reply(amqp_connection_close(conn, AMQP_REPLY_SUCCESS),
					 "connection.close");
	amqp_destroy_connection(conn);
}

uint64_t
parse_option_u64(const char *name, const char *s, uint64_t min,
				 uint64_t max)
{
	char	   *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s || *end || s[0] == '-' || v < min || v > max)
		die("--%s must be an integer in %" PRIu64 "..%" PRIu64 ", got '%s'",
			name, min, max, s);
	return v;
}
