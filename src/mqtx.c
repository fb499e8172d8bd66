/*-------------------------------------------------------------------------
 *
 * mqtx.c
 *	  Module initialisation: each part defines its settings, then (when
 *	  preloaded) the launcher is registered, which starts the relay and
 *	  the consumer of every served database.
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
#include "launcher.h"
#include "log_redact.h"
#include "message_context.h"
#include "outbox.h"
#include "relay.h"
#include "shared.h"
#include "worker.h"

PG_MODULE_MAGIC;

extern PGDLLEXPORT void _PG_init(void);

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
	mqtx_message_context_define_settings();
	mqtx_worker_define_settings();
	mqtx_relay_define_settings();
	mqtx_consumer_define_settings();
	if (process_shared_preload_libraries_in_progress)
		mqtx_launcher_define_settings();
	/* defines mqtx.database when preloaded */
	mqtx_shared_init();
	MarkGUCPrefixReserved("mqtx");

	if (process_shared_preload_libraries_in_progress)
	{
		mqtx_launcher_install_hooks();
		mqtx_launcher_register();
	}
}
