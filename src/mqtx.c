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
#include "utils/guc.h"
#include "utils/varlena.h"

#include "mqtx.h"

PG_MODULE_MAGIC;

char	   *mqtx_broker_url = NULL;
char	   *mqtx_databases = NULL;
int			mqtx_max_payload = 1024 * 1024;

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
static bool
check_database_list(char **newval, void **extra, GucSource source)
{
	char	   *copy = pstrdup(*newval);
	List	   *names = NIL;
	bool		ok;

	ok = SplitIdentifierString(copy, ',', &names) && names != NIL;
	if (!ok)
		GUC_check_errdetail("mqtx.database must be a comma-separated list of database names.");
	list_free(names);
	pfree(copy);
	return ok;
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
							   GUC_SUPERUSER_ONLY,
							   check_broker_url, NULL, NULL);

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

	/* can't define PGC_POSTMASTER variables after startup */
	if (process_shared_preload_libraries_in_progress)
		DefineCustomStringVariable("mqtx.database",
								   "Databases served by the mqtx workers.",
								   "A comma-separated list; each database needs CREATE EXTENSION mqtx.",
								   &mqtx_databases,
								   "postgres",
								   PGC_POSTMASTER,
								   GUC_LIST_INPUT,
								   check_database_list, NULL, NULL);

	MarkGUCPrefixReserved("mqtx");
}

void
_PG_init(void)
{
	define_settings();
	mqtx_install_log_redaction();
}
