/*-------------------------------------------------------------------------
 *
 * identity.c
 *	  Running a piece of work as another role, with a search_path of its
 *	  own: the outbox insert as the outbox's owner, a consumer handler as
 *	  the handler's owner.
 *
 * This is what PostgreSQL does around a SECURITY DEFINER call:
 * SetUserIdAndSecContext for the identity (which forbids SET ROLE and SET
 * SESSION AUTHORIZATION inside), a new GUC nest level for search_path.
 * Leaving the nest level rolls back every setting the work changed, even
 * with plain SET or set_config(..., false).  Our own statements (the
 * outbox insert) also run as a security-restricted operation, as
 * REFRESH MATERIALIZED VIEW does; a handler cannot, because that forbids
 * deferred triggers, which handlers legitimately use.  What a handler
 * leaves in the long-lived worker session instead (temporary objects,
 * open cursors, prepared statements, LISTEN, session advisory locks) is
 * removed by mqtx_forget_session_state before the next handler, possibly
 * another role's, runs.  A transaction or subtransaction abort restores
 * the identity and the settings by itself.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "catalog/namespace.h"
#include "catalog/pg_db_role_setting.h"
#include "catalog/pg_type.h"
#include "commands/async.h"
#include "commands/prepare.h"
#include "miscadmin.h"
#include "storage/lock.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/portal.h"
#include "utils/rel.h"

#include "identity.h"

#define SEARCH_PATH_PREFIX "search_path="

/* search_path from the server's configuration, before any database's */
static char *server_search_path = NULL;

/*
 * Call before connecting to a database, while search_path is still what
 * postgresql.conf, ALTER SYSTEM or the command line made it.
 */
void
mqtx_remember_server_search_path(void)
{
	server_search_path = MemoryContextStrdup(TopMemoryContext,
											 GetConfigOption("search_path", false, false));
}

/*
 * The search_path of one pg_db_role_setting row (ALTER ROLE/DATABASE ...
 * SET), or NULL.  Of two entries the later counts, as when applied.
 */
static char *
stored_search_path(Relation settings, Oid database, Oid role)
{
	ScanKeyData keys[2];
	SysScanDesc scan;
	HeapTuple	tuple;
	char	   *result = NULL;

	ScanKeyInit(&keys[0], Anum_pg_db_role_setting_setdatabase,
				BTEqualStrategyNumber, F_OIDEQ, ObjectIdGetDatum(database));
	ScanKeyInit(&keys[1], Anum_pg_db_role_setting_setrole,
				BTEqualStrategyNumber, F_OIDEQ, ObjectIdGetDatum(role));
	scan = systable_beginscan(settings, DbRoleSettingDatidRolidIndexId, true,
							  NULL, 2, keys);
	tuple = systable_getnext(scan);
	if (HeapTupleIsValid(tuple))
	{
		bool		isnull;
		Datum		config = heap_getattr(tuple, Anum_pg_db_role_setting_setconfig,
										  RelationGetDescr(settings), &isnull);
		Datum	   *entries;
		int			count;

		if (!isnull)
		{
			deconstruct_array(DatumGetArrayTypeP(config), TEXTOID, -1, false,
							  TYPALIGN_INT, &entries, NULL, &count);
			for (int i = 0; i < count; i++)
			{
				char	   *entry = TextDatumGetCString(entries[i]);

				if (pg_strncasecmp(entry, SEARCH_PATH_PREFIX,
								   strlen(SEARCH_PATH_PREFIX)) == 0)
					result = entry + strlen(SEARCH_PATH_PREFIX);
			}
		}
	}
	systable_endscan(scan);
	return result;
}

/*
 * The search_path a new session of role would get in this database: the
 * settings for the role in this database, for the role, for the database,
 * for all roles, in that order (as InitPostgres applies them), else the
 * server's.  A change to the server's own setting is seen by workers
 * started after it.
 */
char *
mqtx_session_search_path(Oid role)
{
	Oid			scopes[4][2] = {
		{MyDatabaseId, role}, {InvalidOid, role},
		{MyDatabaseId, InvalidOid}, {InvalidOid, InvalidOid}
	};
	Relation	settings = table_open(DbRoleSettingRelationId, AccessShareLock);
	char	   *result = NULL;

	for (size_t i = 0; i < lengthof(scopes) && result == NULL; i++)
		result = stored_search_path(settings, scopes[i][0], scopes[i][1]);
	table_close(settings, AccessShareLock);

	if (result == NULL)
		result = pstrdup(server_search_path ? server_search_path :
						 GetConfigOption("search_path", false, false));
	return result;
}

/*
 * Become role, with search_path, until mqtx_restore_identity(saved);
 * restricted: as a security-restricted operation.
 */
void
mqtx_become(MqtxIdentity *saved, Oid role, const char *search_path,
			bool restricted)
{
	GetUserIdAndSecContext(&saved->user, &saved->sec_context);
	SetUserIdAndSecContext(role, saved->sec_context |
						   SECURITY_LOCAL_USERID_CHANGE |
						   (restricted ? SECURITY_RESTRICTED_OPERATION : 0));
	saved->guc_nest_level = NewGUCNestLevel();
	(void) set_config_option("search_path", search_path,
							 PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE,
							 true, 0, false);
}

/*
 * Back to the identity saved by mqtx_become; the search_path and any
 * setting changed meanwhile are undone.  Not needed after an error: the
 * (sub)transaction's abort restores both.
 */
void
mqtx_restore_identity(MqtxIdentity *saved)
{
	AtEOXact_GUC(false, saved->guc_nest_level);
	SetUserIdAndSecContext(saved->user, saved->sec_context);
}

/*
 * Remove what code run as another role may have left in this session and
 * that would outlive it: another role's code could use it (fetch from its
 * cursor, find its temporary table first on the search path) or be held
 * up by it (its advisory locks, a LISTEN whose notifications nobody
 * reads).  Each is cheap when there is nothing to remove; the temporary
 * namespace is only looked into once one exists.  Needs a transaction.
 */
void
mqtx_forget_session_state(void)
{
	Oid			temp_namespace;
	Oid			temp_toast_namespace;

	PortalHashTableDeleteAll();
	DropAllPreparedStatements();
	Async_UnlistenAll();
	LockReleaseSession(USER_LOCKMETHOD);
	GetTempNamespaceState(&temp_namespace, &temp_toast_namespace);
	if (OidIsValid(temp_namespace))
		ResetTempTableNamespace();
}
