/*-------------------------------------------------------------------------
 *
 * mqtx.c
 *	  Module initialisation: settings and (when preloaded) the workers.
 *
 * The SQL functions must work when the library is loaded on demand, as
 * pg_regress does, so nothing here insists on shared_preload_libraries;
 * only what genuinely needs the postmaster (postmaster-level settings,
 * background workers) is skipped without it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/memutils.h"
#include "utils/guc.h"
#include "utils/varlena.h"

#include "mqtx.h"

PG_MODULE_MAGIC;

char	   *mqtx_broker_url = NULL;
char	   *mqtx_databases = NULL;
List	   *mqtx_database_names = NIL;
int			mqtx_max_payload = 1024 * 1024;
bool		mqtx_relay_enabled = true;
bool		mqtx_consumer_enabled = true;
int			mqtx_inbox_retention = 7 * 24 * 3600;
int			mqtx_batch_size = 1000;
int			mqtx_batch_max_bytes = 16 * 1024;
int			mqtx_poll_interval = 1000;
int			mqtx_max_attempts = 10;
int			mqtx_retry_base = 1000;
int			mqtx_retry_max = 300000;
int			mqtx_confirm_timeout = 10000;
int			mqtx_connect_timeout = 5000;
int			mqtx_heartbeat = 30;
int			mqtx_retention = 7 * 24 * 3600;
char	   *mqtx_tls_ca_file = NULL;
char	   *mqtx_tls_cert_file = NULL;
char	   *mqtx_tls_key_file = NULL;
bool		mqtx_tls_verify_peer = true;

void		_PG_init(void);

/*
 * GUC check hook for mqtx.broker_url.  An empty URL is allowed and means
 * "no broker configured yet".  The rejected value is not repeated in the
 * detail: it contains the password.
 */
static bool
check_broker_url(char **newval, void **extra, GucSource source)
{
	char	   *reason;

	if (*newval == NULL || (*newval)[0] == '\0')
		return true;
	if (mqtx_broker_url_is_valid(*newval, &reason))
		return true;
	GUC_check_errdetail("%s", reason);
	GUC_check_errhint("The expected form is amqp[s]://user:password@host:port/vhost; "
					  "percent-encode reserved characters (the default vhost "
					  "\"/\" is written %%2f).");
	return false;
}

/*
 * GUC check hook for mqtx.database: a comma-separated list of database
 * names, at least one.
 */
/*
 * What SHOW, current_setting() and pg_settings display: the URL with its
 * password masked, even to superusers and pg_read_all_settings members.
 */
static const char *
show_broker_url(void)
{
	char	   *masked = mqtx_redact_secrets(mqtx_broker_url);

	return masked ? masked : mqtx_broker_url;
}

static bool
check_database_list(char **newval, void **extra, GucSource source)
{
	char	   *copy = pstrdup(*newval);
	List	   *names = NIL;
	bool		ok;

	ok = SplitIdentifierString(copy, ',', &names) && names != NIL &&
		list_length(names) <= MQTX_MAX_DATABASES;
	if (!ok)
		GUC_check_errdetail("mqtx.database must be a comma-separated list of 1 to %d database names.",
							MQTX_MAX_DATABASES);
	for (ListCell *a = list_head(names); ok && a != NULL; a = lnext(names, a))
		for (ListCell *b = lnext(names, a); ok && b != NULL; b = lnext(names, b))
			if (strcmp(lfirst(a), lfirst(b)) == 0)
			{
				GUC_check_errdetail("Database \"%s\" is listed twice.", (char *) lfirst(a));
				ok = false;
			}
	list_free(names);
	pfree(copy);
	return ok;
}

/*
 * The served databases, parsed once in the postmaster; workers inherit
 * the list.
 */
static List *
parse_database_list(void)
{
	List	   *names = NIL;
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	if (!SplitIdentifierString(pstrdup(mqtx_databases), ',', &names))
		elog(ERROR, "invalid mqtx.database");	/* the check hook prevents it */
	MemoryContextSwitchTo(old);
	return names;
}

static void
define_worker_settings(void)
{
	DefineCustomIntVariable("mqtx.batch_size",
							"Outbox rows the relay publishes per batch.",
							"The batch is published with pipelined confirms: one round trip per batch.",
							&mqtx_batch_size, 1000, 1, 10000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("mqtx.batch_max_bytes",
							"Message payload a worker holds in memory at once.",
							"The relay's messages in flight, and the consumer's batch, stop growing at this many bytes of payload; a single larger message goes alone.",
							&mqtx_batch_max_bytes, 16 * 1024, 64, 1024 * 1024,
							PGC_SIGHUP, GUC_UNIT_KB, NULL, NULL, NULL);
	DefineCustomIntVariable("mqtx.poll_interval",
							"How often the relay looks for due rows when nothing wakes it.",
							"Committed messages wake the relay at once; this covers retries and missed wake-ups.",
							&mqtx_poll_interval, 1000, 10, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("mqtx.max_attempts",
							"Publish attempts before an outbox row becomes failed.",
							NULL,
							&mqtx_max_attempts, 10, 1, 1000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("mqtx.retry_base",
							"Delay before the first retry; it doubles per attempt, with jitter.",
							NULL,
							&mqtx_retry_base, 1000, 1, 24 * 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("mqtx.retry_max",
							"Longest delay between two attempts.",
							NULL,
							&mqtx_retry_max, 300000, 1, 24 * 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("mqtx.confirm_timeout",
							"How long the relay waits for a message's publisher confirm before sending it again.",
							"Or three times the recent confirm latency, if longer. A message not confirmed in time has an unknown fate: it is sent again, without counting an attempt, and a confirm that comes later still counts.",
							&mqtx_confirm_timeout, 10000, 100, 600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("mqtx.connect_timeout",
							"Bound on connecting, logging in and each broker RPC.",
							NULL,
							&mqtx_connect_timeout, 5000, 100, 600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("mqtx.heartbeat",
							"AMQP heartbeat interval requested from the broker (0 disables).",
							NULL,
							&mqtx_heartbeat, 30, 0, 3600,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("mqtx.retention",
							"How long published outbox rows are kept (-1 keeps them forever).",
							NULL,
							&mqtx_retention, 7 * 24 * 3600, -1, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("mqtx.inbox_retention",
							"How long mqtx.inbox keeps applied message ids (-1 keeps them forever).",
							"Duplicates are recognised only while their id is kept: keep it longer than any redelivery can take.",
							&mqtx_inbox_retention, 7 * 24 * 3600, -1, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomStringVariable("mqtx.tls_ca_file",
							   "CA certificates (PEM) that verify the broker for amqps:// URLs.",
							   NULL,
							   &mqtx_tls_ca_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("mqtx.tls_cert_file",
							   "Client certificate (PEM) presented to the broker, if it asks for one.",
							   NULL,
							   &mqtx_tls_cert_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomStringVariable("mqtx.tls_key_file",
							   "Private key (PEM) of mqtx.tls_cert_file.",
							   NULL,
							   &mqtx_tls_key_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
	DefineCustomBoolVariable("mqtx.tls_verify_peer",
							 "Verify the broker's certificate and host name for amqps:// URLs.",
							 NULL,
							 &mqtx_tls_verify_peer, true,
							 PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
}

static void
define_settings(void)
{
	DefineCustomStringVariable("mqtx.broker_url",
							   "URL of the RabbitMQ broker the workers connect to.",
							   "amqp://user:password@host:port/vhost, or amqps:// for TLS. "
							   "Empty means no broker is configured.",
							   &mqtx_broker_url,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY | GUC_NO_SHOW_ALL,
							   check_broker_url, NULL, show_broker_url);

	DefineCustomIntVariable("mqtx.max_payload",
							"Largest message body mqtx accepts, as JSON text.",
							NULL,
							&mqtx_max_payload,
							1024 * 1024,
							1024,
							128 * 1024 * 1024,
							PGC_SUSET,
							GUC_UNIT_BYTE,
							NULL, NULL, NULL);

	define_worker_settings();

	/* can't define PGC_POSTMASTER variables after startup */
	if (process_shared_preload_libraries_in_progress)
	{
		DefineCustomBoolVariable("mqtx.relay_enabled",
								 "Run the relay worker, which publishes the outbox.",
								 NULL,
								 &mqtx_relay_enabled, true,
								 PGC_POSTMASTER, 0, NULL, NULL, NULL);
		DefineCustomBoolVariable("mqtx.consumer_enabled",
								 "Run the consumer worker, which applies subscribed queues.",
								 NULL,
								 &mqtx_consumer_enabled, true,
								 PGC_POSTMASTER, 0, NULL, NULL, NULL);
		DefineCustomStringVariable("mqtx.database",
								   "Databases served by the mqtx workers.",
								   "A comma-separated list; each database needs CREATE EXTENSION mqtx.",
								   &mqtx_databases,
								   "postgres",
								   PGC_POSTMASTER,
								   GUC_LIST_INPUT,
								   check_database_list, NULL, NULL);
	}

	MarkGUCPrefixReserved("mqtx");
}

void
_PG_init(void)
{
	/* first: defining the settings can log the configured URL */
	mqtx_install_log_redaction();
	define_settings();
	mqtx_shared_init();

	if (process_shared_preload_libraries_in_progress)
	{
		int			index = 0;
		ListCell   *lc;

		mqtx_database_names = parse_database_list();
		foreach(lc, mqtx_database_names)
		{
			if (mqtx_relay_enabled)
				mqtx_register_worker(MQTX_RELAY, index, lfirst(lc));
			if (mqtx_consumer_enabled)
				mqtx_register_worker(MQTX_CONSUMER, index, lfirst(lc));
			index++;
		}
	}
}
