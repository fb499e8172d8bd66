/*-------------------------------------------------------------------------
 *
 * log_redact.c
 *	  Keep broker passwords out of the server log.
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
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "tcop/tcopprot.h"
#include "utils/elog.h"

#include "mqtx.h"

#define REDACTED_PASSWORD "********"

static emit_log_hook_type previous_emit_log_hook = NULL;

/*
 * Characters that end a URL inside a log message.
 */
static bool
ends_url(char c)
{
	return c == '\0' || c == ' ' || c == '\t' || c == '\n' ||
		c == '"' || c == '\'';
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

	for (p = authority; !ends_url(*p); p++)
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
 * Return a copy of text with the password of every AMQP URL masked, or
 * NULL when there is nothing to mask.
 */
/*
 * Does an AMQP scheme end just before "://" at sep?  Matched without
 * regard to case, as URL schemes are.
 */
static bool
is_amqp_scheme(const char *text, const char *sep)
{
	return (sep - text >= 5 && pg_strncasecmp(sep - 5, "amqps", 5) == 0) ||
		(sep - text >= 4 && pg_strncasecmp(sep - 4, "amqp", 4) == 0);
}

/*
 * Return a copy of text with the password of every AMQP URL masked, or
 * NULL when there is nothing to mask.
 */
char *
mqtx_redact_secrets(const char *text)
{
	StringInfoData out;
	const char *cursor = text;
	const char *sep;
	bool		changed = false;

	if (text == NULL)
		return NULL;

	initStringInfo(&out);
	while ((sep = strstr(cursor, "://")) != NULL)
	{
		const char *authority = sep + 3;
		const char *pw_start;
		const char *pw_end;

		if (is_amqp_scheme(text, sep) && find_password(authority, &pw_start, &pw_end))
		{
			appendBinaryStringInfo(&out, cursor, pw_start - cursor);
			appendStringInfoString(&out, REDACTED_PASSWORD);
			cursor = pw_end;
			changed = true;
		}
		else
		{
			appendBinaryStringInfo(&out, cursor, authority - cursor);
			cursor = authority;
		}
	}

	if (!changed)
	{
		pfree(out.data);
		return NULL;
	}
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

void
mqtx_install_log_redaction(void)
{
	previous_emit_log_hook = emit_log_hook;
	emit_log_hook = redact_log_hook;
}
