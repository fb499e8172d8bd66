/*
 * bench_common: the plumbing ceiling_publisher, perrow_relay and raw_consumer share
 * (rabbitmq-c 0.11): dying with a clear message, the SIGALRM watchdog, the
 * monotonic clock, and opening/closing a connection with one channel.
 *
 * Call bench_set_prog() first: every message is prefixed with that name.
 */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#include <amqp.h>

#include <stdint.h>
#include <sys/time.h>

#ifdef __GNUC__
#define BENCH_NORETURN __attribute__((noreturn))
#define BENCH_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define BENCH_NORETURN
#define BENCH_PRINTF(f, a)
#endif

/* Name used in front of every message (die(), watchdog).  Not copied. */
void		bench_set_prog(const char *prog);
const char *bench_prog(void);

/* Prints "PROG: <message>\n" to stderr and exits 1. */
BENCH_NORETURN BENCH_PRINTF(1, 2)
void		die(const char *fmt,...);

void		die_on_status(int status, const char *what);

/* Dies if m is a channel.close or connection.close; returns otherwise. */
void		die_on_close_method(const amqp_method_t *m, const char *what);
void		die_on_rpc_reply(amqp_rpc_reply_t r, const char *what);
void		die_on_rpc(amqp_connection_state_t conn, const char *what);

/* Parses option --name's value s as an integer in min..max; dies with a
 * message naming the option otherwise. */
uint64_t	parse_option_u64(const char *name, const char *s, uint64_t min,
							 uint64_t max);

/* SIGALRM handler: reports "no progress" and _exit(1)s.  Install it with
 * signal(SIGALRM, watchdog_fired) after bench_set_prog(). */
void		watchdog_fired(int sig);

/* (Re-)arms alarm(timeout_s + 5), at most once a second; *armed_at holds
 * the now_s() of the last arming (start it at 0). */
void		watchdog_kick(double *armed_at, int timeout_s);

/* CLOCK_MONOTONIC in seconds. */
double		now_s(void);
struct timeval seconds_tv(int s);

/* Parses url (amqp:// only), connects, logs in and opens channel; every
 * broker wait is bounded by timeout_s.  Dies on any failure. */
amqp_connection_state_t connect_broker(const char *url, int timeout_s,
									   amqp_channel_t channel);

/* Closes channel, then the connection, and destroys it.  Dies on failure. */
void		close_connection(amqp_connection_state_t conn, amqp_channel_t channel);

#endif
