/*-------------------------------------------------------------------------
 *
 * log_redact.c
 *	  Keep broker passwords out of the server log and out of the text of
 *	  statements that other sessions and extensions can read.
 *
 * mqtx.broker_url carries a password, and PostgreSQL itself repeats
 * setting values in the log: "parameter ... changed to ..." on reload,
 * "invalid value for parameter ..." on a bad value, and any statement that
 * log_statement or an error echoes.  An emit_log_hook installed in every
 * process that loads mqtx (the postmaster included, when preloaded)
 * masks the password part of any amqp:// or amqps:// URL before the
 * message is written anywhere; the client that caused the message sees
 * the masked text too, which costs a superuser nothing they do not know.
 *
 * The statement that sets the URL (ALTER SYSTEM SET mqtx.broker_url = ...)
 * is also kept as text outside the log: pg_stat_activity shows it to
 * pg_read_all_stats members for as long as the session stays idle after
 * it, and pg_stat_statements records it for good.  A ProcessUtility hook
 * masks the password in the text of setting statements before either
 * sees it: pg_stat_activity gets the masked text re-reported, and the
 * hooks called after mqtx's (pg_stat_statements' among them) get it as
 * the statement's text.  That masking keeps the text's length, because
 * pg_stat_statements cuts a statement out of a multi-statement string by
 * offset.  It only works for libraries whose hook mqtx's calls, that is
 * those loaded before mqtx; a library loaded after it is reported once,
 * at server start.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "nodes/parsenodes.h"
#include "pgstat.h"
#include "tcop/tcopprot.h"
#include "tcop/utility.h"
#include "utils/backend_status.h"
#include "utils/elog.h"

#include "log_redact.h"

#define REDACTED_PASSWORD "********"

static emit_log_hook_type previous_emit_log_hook = NULL;
static ProcessUtility_hook_type previous_process_utility_hook = NULL;

/*
 * Does a comma at p separate two URLs of a list, that is, does another
 * amqp:// or amqps:// URL follow it (after blanks)?  Any other comma may be
 * part of a password.
 */
bool
mqtx_starts_next_url(const char *p)
{
	if (*p != ',')
		return false;
	p++;
	while (*p == ' ' || *p == '\t')
		p++;
	return pg_strncasecmp(p, "amqp://", 7) == 0 ||
		pg_strncasecmp(p, "amqps://", 8) == 0;
}

/*
 * Where a URL inside a log message ends: at a blank or a quote, or at the
 * comma before the next URL of a list.
 */
static bool
ends_url(const char *p)
{
	return *p == '\0' || *p == ' ' || *p == '\t' || *p == '\n' ||
		*p == '"' || *p == '\'' || mqtx_starts_next_url(p);
}

/*
 * If a URL's authority starting at "authority" has "user:password@",
 * return the password's bounds.  The last '@' counts, so a password with
 * an unescaped '@' or '/' is still covered whole.
 */
static bool
find_password(const char *authority, const char **start, const char **end)
{
	const char *colon = NULL;
	const char *at = NULL;
	const char *p;

	for (p = authority; !ends_url(p); p++)
	{
		if (*p == ':' && colon == NULL)
			colon = p;
		else if (*p == '@')
			at = p;
	}
	if (colon == NULL || at == NULL || colon > at)
		return false;
	*start = colon + 1;
	*end = at;
	return true;
}

/*
 * Does an AMQP scheme end just before "://" at sep?  Matched without
 * regard to case, as URL schemes are.
 */
static bool
is_amqp_scheme(const char *input, const char *sep)
{
	return (sep - input >= 5 && pg_strncasecmp(sep - 5, "amqps", 5) == 0) ||
		(sep - input >= 4 && pg_strncasecmp(sep - 4, "amqp", 4) == 0);
}

/*
 * The bounds of the first password of an AMQP URL in input at or after
 * from; false when there is none.
 */
static bool
next_password(const char *input, const char *from, const char **start,
			  const char **end)
{
	const char *sep;

	while ((sep = strstr(from, "://")) != NULL)
	{
		from = sep + 3;
		if (is_amqp_scheme(input, sep) && find_password(from, start, end))
			return true;
	}
	return false;
}

/*
 * Return a copy of input with the password of every AMQP URL masked, or
 * NULL when there is nothing to mask.
 */
char *
mqtx_redact_secrets(const char *input)
{
	StringInfoData out;
	const char *cursor = input;
	const char *pw_start;
	const char *pw_end;

	if (input == NULL || !next_password(input, input, &pw_start, &pw_end))
		return NULL;

	initStringInfo(&out);
	do
	{
		appendBinaryStringInfo(&out, cursor, pw_start - cursor);
		appendStringInfoString(&out, REDACTED_PASSWORD);
		cursor = pw_end;
	} while (next_password(input, cursor, &pw_start, &pw_end));
	appendStringInfoString(&out, cursor);
	return out.data;
}

static void
redact_field(char **field)
{
	char	   *redacted = mqtx_redact_secrets(*field);

	if (redacted != NULL)
		*field = redacted;
}

/*
 * Runs in ErrorContext, so the redacted copies live exactly as long as the
 * report does.
 */
static void
redact_log_hook(ErrorData *edata)
{
	redact_field(&edata->message);
	redact_field(&edata->detail);
	redact_field(&edata->detail_log);
	redact_field(&edata->hint);
	redact_field(&edata->context);
	redact_field(&edata->internalquery);

	/* The statement text cannot be rewritten here, only withheld. */
	if (debug_query_string != NULL &&
		mqtx_redact_secrets(debug_query_string) != NULL)
		edata->hide_stmt = true;

	if (previous_emit_log_hook)
		previous_emit_log_hook(edata);
}

/*
 * Mask the password of every AMQP URL in text, in place, one '*' per
 * character.  Returns whether there was one.
 */
static bool
mask_secrets_in_place(char *input)
{
	const char *cursor = input;
	const char *pw_start;
	const char *pw_end;
	bool		masked = false;

	while (next_password(input, cursor, &pw_start, &pw_end))
	{
		memset((char *) pw_start, '*', pw_end - pw_start);
		cursor = pw_end;
		masked = true;
	}
	return masked;
}

/*
 * The statements that can carry a setting's value.
 */
static bool
sets_a_parameter(Node *statement)
{
	return IsA(statement, AlterSystemStmt) || IsA(statement, VariableSetStmt) ||
		IsA(statement, AlterDatabaseSetStmt) || IsA(statement, AlterRoleSetStmt);
}

static void
mask_statement_hook(PlannedStmt *pstmt, const char *queryString,
					bool readOnlyTree, ProcessUtilityContext context,
					ParamListInfo params, QueryEnvironment *queryEnv,
					DestReceiver *dest, QueryCompletion *qc)
{
	if (queryString != NULL && sets_a_parameter(pstmt->utilityStmt))
	{
		char	   *masked = pstrdup(queryString);

		if (mask_secrets_in_place(masked))
		{
			queryString = masked;
			if (context == PROCESS_UTILITY_TOPLEVEL)
			{
				pgstat_report_activity(STATE_RUNNING, masked);
				pgstat_report_query_id(pstmt->queryId, true);
			}
		}
	}

	if (previous_process_utility_hook)
		previous_process_utility_hook(pstmt, queryString, readOnlyTree, context,
									  params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context,
								params, queryEnv, dest, qc);
}

/*
 * From _PG_init, before anything can log the broker URL: every log line
 * of this process goes through redact_log_hook, and utility statements
 * through mask_statement_hook, which masks the text of setting statements.
 */
void
mqtx_install_log_redaction(void)
{
	previous_emit_log_hook = emit_log_hook;
	emit_log_hook = redact_log_hook;
	previous_process_utility_hook = ProcessUtility_hook;
	ProcessUtility_hook = mask_statement_hook;
}

/*
 * Called in the postmaster once every preloaded library has installed its
 * hooks: a library loaded after mqtx sees setting statements before they
 * are masked.
 */
void
mqtx_check_statement_masking(void)
{
	if (ProcessUtility_hook != mask_statement_hook)
		ereport(WARNING,
				(errmsg("mqtx: a library loaded after mqtx sees statements before mqtx masks broker passwords in them"),
				 errdetail("pg_stat_statements, for one, would record ALTER SYSTEM SET mqtx.broker_url with the password."),
				 errhint("List mqtx last in shared_preload_libraries.")));
}
