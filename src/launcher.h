/*-------------------------------------------------------------------------
 *
 * launcher.h
 *	  The launcher (launcher.c): one background worker that starts and
 *	  stops the relays and consumers of the databases in mqtx.database.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTX_LAUNCHER_H
#define MQTX_LAUNCHER_H

/* from _PG_init: mqtx.relay_enabled and mqtx.consumer_enabled, when preloaded */
extern void mqtx_launcher_define_settings(void);

/* from _PG_init: the hook that tells the launcher of new databases and extensions */
extern void mqtx_launcher_install_hooks(void);

/* from _PG_init, when preloaded */
extern void mqtx_launcher_register(void);

extern PGDLLEXPORT void mqtx_launcher_main(Datum main_arg);

#endif							/* MQTX_LAUNCHER_H */
