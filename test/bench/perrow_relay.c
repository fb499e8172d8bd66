/*
 * perrow_relay: the classic hand-written outbox relay, one row per
 * transaction and one synchronous confirm per message, in C with libpq and
 * rabbitmq-c 0.11 so that the relay benchmark compares designs, not
 * languages.  Per row:
 *
 *   BEGIN;
 *   SELECT id, message_id, exchange, routing_key, payload FROM mqtx.outbox
 *    WHERE status = 'pending' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED;
 *   basic.publish (persistent, mandatory, message_id) on a confirm channel;
 *   wait for its basic.ack;
 *   UPDATE mqtx.outbox SET status = 'published', published_at = now()
 *    WHERE id = $1;
 *   COMMIT;
 *
 * until the SELECT finds no row.  Both statements are prepared once (fair to
 * it), and the session commits like the mqtx relay does
 * (synchronous_commit = off) unless --sync-commit is given, so the
 * comparison is about round trips per message, not about durability
 * settings.
 *
 *   perrow_relay --dsn 'host=... port=... dbname=...' --url amqp://...
 *       [--limit N] [--sync-commit] [--timeout SECONDS]
 *
 * Prints one line
 *   perrow: N messages in S.SSS s = R msg/s
 * and exits 0 only if every message sent was acked (a nack or a return is
 * fatal: this is a benchmark, it has no retry logic).
 */
#define _POSIX_C_SOURCE 200809L

#include <amqp.h>
#include <libpq-fe.h>

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench_common.h"

#define CHANNEL 1
#define PROG "perrow_relay"

static const char *const claim_sql =
"SELECT id, message_id::text, exchange, routing_key, payload::text "
"FROM mqtx.outbox WHERE status = 'pending' "
"ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED";

static const char *const mark_sql =
"UPDATE mqtx.outbox SET status = 'published', published_at = now() "
"WHERE id = $1";

struct options
{
	const char *dsn;
	const char *url;
	uint64_t	limit;			/* 0: until the outbox has no pending row */
	int			sync_commit;
	int			timeout_s;
};

struct relay
{
	PGconn	   *db;
	amqp_connection_state_t conn;
	const struct options *opt;
	uint64_t	published;		/* == delivery tag of the last publish */
	double		watchdog_armed_at;
};

static void
usage(void)
{
	fprintf(stderr,
			"usage: " PROG " --dsn CONNINFO --url amqp://USER:PASS@HOST:PORT/VHOST\n"
			"         [--limit N] [--sync-commit] [--timeout SECONDS]\n"
			"  --limit N        stop after N messages (default: when none is pending)\n"
			"  --sync-commit    keep the session's synchronous_commit (default: off,\n"
			"                   as the mqtx relay commits)\n"
			"  --timeout S      bound on every broker wait (default 30)\n");
	exit(2);
}

static void
parse_args(int argc, char **argv, struct options *opt)
{
	static const struct option longopts[] = {
		{"dsn", required_argument, NULL, 'd'},
		{"url", required_argument, NULL, 'u'},
		{"limit", required_argument, NULL, 'n'},
		{"sync-commit", no_argument, NULL, 's'},
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
			case 'd':
				opt->dsn = optarg;
				break;
			case 'u':
				opt->url = optarg;
				break;
			case 'n':
				opt->limit = parse_option_u64("limit", optarg, 1, UINT64_MAX);
				break;
			case 's':
				opt->sync_commit = 1;
				break;
			case 't':
				opt->timeout_s = (int) parse_option_u64("timeout", optarg, 1, 86400);
				break;
			default:
				usage();
		}
	}
	if (optind != argc || !opt->dsn || !opt->url)
		usage();
}

/* ------------------------------------------------------------------ */
/* Database                                                            */

static void
die_on_result(PGresult *res, ExecStatusType expected,
			  const char *what)
{
	if (PQresultStatus(res) != expected)
		die("%s: %s", what, PQresultErrorMessage(res));
}

static void
exec_command(PGconn *db, const char *sql)
{
	PGresult   *res = PQexec(db, sql);

	die_on_result(res, PGRES_COMMAND_OK, sql);
	PQclear(res);
}

static PGconn *
connect_db(const struct options *opt)
{
	PGconn	   *db = PQconnectdb(opt->dsn);
	PGresult   *res;

	if (PQstatus(db) != CONNECTION_OK)
		die("connect to PostgreSQL: %s", PQerrorMessage(db));
	if (!opt->sync_commit)
		exec_command(db, "SET synchronous_commit = off");

	res = PQprepare(db, "claim", claim_sql, 0, NULL);
	die_on_result(res, PGRES_COMMAND_OK, "prepare claim");
	PQclear(res);
	res = PQprepare(db, "mark", mark_sql, 1, NULL);
	die_on_result(res, PGRES_COMMAND_OK, "prepare mark");
	PQclear(res);
	return db;
}

/* ------------------------------------------------------------------ */
/* Broker                                                              */

static void
publish(struct relay *r, const char *message_id,
		const char *exchange, const char *routing_key,
		const char *payload, size_t payload_len)
{
	amqp_basic_properties_t props;
	amqp_bytes_t body;

	memset(&props, 0, sizeof(props));
	props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG |
		AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_MESSAGE_ID_FLAG;
	props.content_type = amqp_cstring_bytes("application/json");
	props.delivery_mode = AMQP_DELIVERY_PERSISTENT;
	props.message_id = amqp_cstring_bytes((char *) message_id);
	body.bytes = (void *) payload;
	body.len = payload_len;

	die_on_status(amqp_basic_publish(r->conn, CHANNEL,
									 amqp_cstring_bytes((char *) exchange),
									 amqp_cstring_bytes((char *) routing_key),
									 1, 0, &props, body),
				  "basic.publish");
	r->published++;
}

/* Reads frames until the confirm of the message just published. */
static void
await_confirm(struct relay *r)
{
	struct timeval tv = seconds_tv(r->opt->timeout_s);

	for (;;)
	{
		amqp_frame_t f;
		const amqp_method_t *m = &f.payload.method;
		int			status = amqp_simple_wait_frame_noblock(r->conn, &f, &tv);

		if (status == AMQP_STATUS_TIMEOUT)
			die("no confirm within %d s for delivery tag %" PRIu64,
				r->opt->timeout_s, r->published);
		die_on_status(status, "waiting for a confirm");
		if (f.frame_type != AMQP_FRAME_METHOD)
			die("unexpected frame type %u", f.frame_type);
		die_on_close_method(m, "publishing");

		if (m->id == AMQP_BASIC_ACK_METHOD)
		{
			const amqp_basic_ack_t *a = m->decoded;

			if (a->delivery_tag != r->published)
				die("basic.ack for delivery tag %" PRIu64
					", expected %" PRIu64, a->delivery_tag,
					r->published);
			amqp_maybe_release_buffers_on_channel(r->conn, CHANNEL);
			return;
		}
		if (m->id == AMQP_BASIC_NACK_METHOD)
			die("basic.nack for delivery tag %" PRIu64, r->published);
		if (m->id == AMQP_BASIC_RETURN_METHOD)
		{
			const amqp_basic_return_t *ret = m->decoded;

			die("message returned as unroutable: %u %.*s",
				ret->reply_code, (int) ret->reply_text.len,
				(const char *) ret->reply_text.bytes);
		}
		if (m->id == AMQP_CONNECTION_BLOCKED_METHOD ||
			m->id == AMQP_CONNECTION_UNBLOCKED_METHOD)
			continue;			/* the watchdog bounds a block */
		die("unexpected method 0x%08x on channel %u", m->id, f.channel);
	}
}

/* ------------------------------------------------------------------ */
/* The loop                                                            */

/* One row, start to finish.  Returns 0 when no pending row was left. */
static int
relay_one(struct relay *r)
{
	PGresult   *res;
	char		id[32];
	const char *params[1] = {id};

	exec_command(r->db, "BEGIN");
	res = PQexecPrepared(r->db, "claim", 0, NULL, NULL, NULL, 0);
	die_on_result(res, PGRES_TUPLES_OK, "claim");
	if (PQntuples(res) == 0)
	{
		PQclear(res);
		exec_command(r->db, "COMMIT");
		return 0;
	}
	snprintf(id, sizeof(id), "%s", PQgetvalue(res, 0, 0));
	publish(r, PQgetvalue(res, 0, 1), PQgetvalue(res, 0, 2),
			PQgetvalue(res, 0, 3), PQgetvalue(res, 0, 4),
			(size_t) PQgetlength(res, 0, 4));
	PQclear(res);

	await_confirm(r);

	res = PQexecPrepared(r->db, "mark", 1, params, NULL, NULL, 0);
	die_on_result(res, PGRES_COMMAND_OK, "mark published");
	if (strcmp(PQcmdTuples(res), "1") != 0)
		die("marking outbox row %s published updated %s rows", id,
			PQcmdTuples(res));
	PQclear(res);
	exec_command(r->db, "COMMIT");
	watchdog_kick(&r->watchdog_armed_at, r->opt->timeout_s);
	return 1;
}

int
main(int argc, char **argv)
{
	struct options opt;
	struct relay r;
	double		t0,
				elapsed;

	bench_set_prog(PROG);
	parse_args(argc, argv, &opt);
	signal(SIGALRM, watchdog_fired);

	memset(&r, 0, sizeof(r));
	r.opt = &opt;
	r.db = connect_db(&opt);
	r.conn = connect_broker(opt.url, opt.timeout_s, CHANNEL);
	amqp_confirm_select(r.conn, CHANNEL);
	die_on_rpc(r.conn, "confirm.select");

	t0 = now_s();
	watchdog_kick(&r.watchdog_armed_at, opt.timeout_s);
	while ((opt.limit == 0 || r.published < opt.limit) && relay_one(&r))
		;
	elapsed = now_s() - t0;
	alarm(0);

	close_connection(r.conn, CHANNEL);
	PQfinish(r.db);
	printf("perrow: %" PRIu64 " messages in %.3f s = %.0f msg/s\n",
		   r.published, elapsed,
		   elapsed > 0 ? (double) r.published / elapsed : 0.0);
	return 0;
}
