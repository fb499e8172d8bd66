/*-------------------------------------------------------------------------
 *
 * mqtx.c
 *	  Module initialisation: each part defines its settings, then (when
 *	  preloaded) the relay and the consumer are registered for every
 *	  served database.
 *
 * The SQL functions must work when the library is loaded on demand, as
 * pg_regress does, so nothing here insists on shared_preload_libraries;
 * only what genuinely needs the postmaster (postmaster-level settings,
 * shared memory, background workers) is skipped without it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/guc.h"

#include "broker.h"
#include "consumer.h"
#include "log_redact.h"
#include "outbox.h"
#include "relay.h"
#include "shared.h"
#include "worker.h"

PG_MODULE_MAGIC;

static bool relay_enabled = true;
static bool consumer_enabled = true;

extern PGDLLEXPORT void _PG_init(void);

/*
 * Which workers the postmaster starts; PGC_POSTMASTER, so they can only be
 * defined while the library is being preloaded.
 */
static void
define_worker_switches(void)
{
	DefineCustomBoolVariable("mqtx.relay_enabled",
							 "Run the relay worker, which publishes the outbox.",
							 NULL,
							 &relay_enabled, true,
							 PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("mqtx.consumer_enabled",
							 "Run the consumer worker, which applies subscribed queues.",
							 NULL,
							 &consumer_enabled, true,
							 PGC_POSTMASTER, 0, NULL, NULL, NULL);
}

static void
register_workers(void)
{
	for (int i = 0; i < mqtx_served_database_count(); i++)
	{
		if (relay_enabled)
			mqtx_register_worker(MQTX_RELAY, i, mqtx_served_database(i));
		if (consumer_enabled)
			mqtx_register_worker(MQTX_CONSUMER, i, mqtx_served_database(i));
	}
}

/*
 * Module load, in the postmaster when preloaded, else in the first session
 * that calls one of our functions.
 */
void
_PG_init(void)
{
	/* first: defining the settings can log the configured URL */
	mqtx_install_log_redaction();

	mqtx_broker_define_settings();
	mqtx_outbox_define_settings();
	mqtx_worker_define_settings();
	mqtx_relay_define_settings();
	mqtx_consumer_define_settings();
	if (process_shared_preload_libraries_in_progress)
		define_worker_switches();
	/* defines mqtx.database when preloaded */
	mqtx_shared_init();
	MarkGUCPrefixReserved("mqtx");

	if (process_shared_preload_libraries_in_progress)
		register_workers();
}
