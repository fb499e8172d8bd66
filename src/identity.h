/*-------------------------------------------------------------------------
 *
 * identity.h
 *	  Running work as another role (identity.c): an object's owner, with
 *	  that role's search_path, restricted where the code is not ours.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MQTX_IDENTITY_H
#define MQTX_IDENTITY_H

typedef struct MqtxIdentity
{
	Oid			user;
	int			sec_context;
	int			guc_nest_level;
} MqtxIdentity;

extern void mqtx_remember_server_search_path(void);
extern char *mqtx_session_search_path(Oid role);
extern void mqtx_become(MqtxIdentity *saved, Oid role, const char *search_path,
						bool restricted);
extern void mqtx_restore_identity(MqtxIdentity *saved);
extern void mqtx_forget_session_state(void);

#endif							/* MQTX_IDENTITY_H */
