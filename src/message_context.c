/*-------------------------------------------------------------------------
 *
 * message_context.c
 *	  What a message carries from the one that caused it: correlation,
 *	  causation and W3C trace context.
 *
 * A service that handles a message and publishes others in reply is one
 * step of a longer conversation; without something that ties the steps
 * together, an operator looking at one message cannot say what it was
 * part of.  Three things do:
 *
 * - the correlation id, the AMQP correlation_id property: the same for
 *   every message of one conversation.  A message published while a
 *   handler runs takes the handled message's correlation id, or the
 *   handled message's own id when it has none (it started the
 *   conversation), unless the publisher names one;
 * - the causation id, header x-mqtx-causation-id: the id of the message
 *   whose handler published this one, so a conversation is a tree and
 *   not just a set;
 * - W3C trace context (headers traceparent and tracestate), for tracing
 *   systems: an application sets mqtx.traceparent for its transaction,
 *   every message it publishes carries it, and the consumer makes a
 *   message's trace context current while its handler runs, so that what
 *   the handler publishes continues the trace.  mqtx does not record
 *   spans itself: it passes the context on unchanged, and a handler that
 *   starts a span of its own sets mqtx.traceparent to it.
 *
 * All three are written into the message's headers when it is enqueued,
 * where the relay finds them (it sends the correlation id as the
 * property); headers the publisher gives win over them.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"

#include "broker.h"
#include "message_context.h"

/* W3C Trace Context, level 1: version 00 is exactly this long */
#define TRACEPARENT_LENGTH 55
/* tracestate: what a propagator must at least carry */
#define TRACESTATE_MAX_LENGTH 512
#define TRACESTATE_MAX_MEMBERS 32

static char *mqtx_traceparent = NULL;
static char *mqtx_tracestate = NULL;

/*
 * The message whose handler runs, while it runs: its dedupe key (the id
 * the rest of the conversation knows it by) and its correlation id.  The
 * strings live in TopMemoryContext between enter and leave.
 */
static char *handled_message_id = NULL;
static char *handled_correlation_id = NULL;

static bool
is_lower_hex(const char *s, int len, bool *all_zero)
{
	*all_zero = true;
	for (int i = 0; i < len; i++)
	{
		if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
			return false;
		if (s[i] != '0')
			*all_zero = false;
	}
	return true;
}

/*
 * version "-" trace-id "-" parent-id "-" trace-flags, in lower-case hex:
 * version ff and all-zero ids are invalid.  A later version may append
 * fields after another "-"; version 00 may not.
 */
static bool
traceparent_is_valid(const char *value, const char **why)
{
	size_t		len = strlen(value);
	bool		zero;

	*why = NULL;
	if (len < TRACEPARENT_LENGTH ||
		value[2] != '-' || value[35] != '-' || value[52] != '-')
		*why = "It must be version-traceid-parentid-flags: 2, 32, 16 and 2 lower-case hex digits.";
	else if (!is_lower_hex(value, 2, &zero) || strncmp(value, "ff", 2) == 0)
		*why = "Its version must be two lower-case hex digits other than ff.";
	else if (!is_lower_hex(value + 3, 32, &zero) || zero)
		*why = "Its trace id must be 32 lower-case hex digits, not all zero.";
	else if (!is_lower_hex(value + 36, 16, &zero) || zero)
		*why = "Its parent id must be 16 lower-case hex digits, not all zero.";
	else if (!is_lower_hex(value + 53, 2, &zero))
		*why = "Its trace flags must be two lower-case hex digits.";
	else if (strncmp(value, "00", 2) == 0 ? len != TRACEPARENT_LENGTH :
			 (len > TRACEPARENT_LENGTH && value[TRACEPARENT_LENGTH] != '-'))
		*why = "Version 00 has exactly 55 characters; a later version continues with \"-\".";
	return *why == NULL;
}

static bool
is_key_char(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || strchr("_-*/", c) != NULL;
}

/*
 * key "=" value, as W3C tracestate defines a list member: a key is a
 * lower-case name, or tenant "@" system (a tenant may start with a digit,
 * a system may not); a value is printable ASCII but "," and "=".  The
 * caller has trimmed the white space around the member.
 */
static bool
tracestate_member_is_valid(const char *member, int len)
{
	const char *eq = memchr(member, '=', len);
	const char *at;
	int			key_len;
	int			value_len;

	if (eq == NULL)
		return false;
	key_len = eq - member;
	value_len = len - key_len - 1;
	if (key_len < 1 || key_len > 256 || value_len < 1 || value_len > 256)
		return false;
	at = memchr(member, '@', key_len);
	if (!(member[0] >= 'a' && member[0] <= 'z') &&
		!(at != NULL && member[0] >= '0' && member[0] <= '9'))
		return false;
	if (at != NULL && (at == member || at + 1 == eq || !(at[1] >= 'a' && at[1] <= 'z')))
		return false;
	for (const char *c = member; c < eq; c++)
		if (c != at && !is_key_char(*c))
			return false;
	for (const char *c = eq + 1; c < member + len; c++)
		if (*c < 0x20 || *c > 0x7e || *c == ',' || *c == '=')
			return false;
	return true;
}

static bool
tracestate_is_valid(const char *value, const char **why)
{
	int			members = 0;
	const char *start = value;

	*why = NULL;
	if (strlen(value) > TRACESTATE_MAX_LENGTH)
	{
		*why = "It may have at most 512 characters.";
		return false;
	}
	while (*why == NULL)
	{
		const char *comma = strchr(start, ',');
		const char *end = comma ? comma : start + strlen(start);
		const char *first = start;
		const char *last = end;

		/* optional white space around a member; empty members are allowed */
		while (first < last && (*first == ' ' || *first == '\t'))
			first++;
		while (last > first && (last[-1] == ' ' || last[-1] == '\t'))
			last--;
		if (last > first)
		{
			if (++members > TRACESTATE_MAX_MEMBERS)
				*why = "It may have at most 32 list members.";
			else if (!tracestate_member_is_valid(first, last - first))
				*why = "Each list member must be key=value: a key of lower-case letters, digits and _-*/ starting with a letter (or tenant@system), a value of printable ASCII without \",\" and \"=\".";
		}
		if (*end == '\0')
			break;
		start = end + 1;
	}
	return *why == NULL;
}

static bool
check_traceparent(char **newval, void **extra, GucSource source)
{
	const char *why;

	if (*newval == NULL || (*newval)[0] == '\0' || traceparent_is_valid(*newval, &why))
		return true;
	GUC_check_errmsg("\"%s\" is not a W3C traceparent", *newval);
	GUC_check_errdetail("%s", why);
	GUC_check_errhint("For example: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01.");
	return false;
}

static bool
check_tracestate(char **newval, void **extra, GucSource source)
{
	const char *why;

	if (*newval == NULL || (*newval)[0] == '\0' || tracestate_is_valid(*newval, &why))
		return true;
	GUC_check_errmsg("\"%s\" is not a W3C tracestate", *newval);
	GUC_check_errdetail("%s", why);
	GUC_check_errhint("For example: congo=t61rcWkgMzE,rojo=00f067aa0ba902b7.");
	return false;
}

void
mqtx_message_context_define_settings(void)
{
	DefineCustomStringVariable("mqtx.traceparent",
							   "W3C traceparent that messages published now carry (header traceparent).",
							   "Set it for a transaction with SET LOCAL; while a handler runs, the consumer sets it to the handled message's. Empty: none.",
							   &mqtx_traceparent,
							   "",
							   PGC_USERSET,
							   GUC_NOT_IN_SAMPLE,
							   check_traceparent, NULL, NULL);
	DefineCustomStringVariable("mqtx.tracestate",
							   "W3C tracestate that messages published now carry with mqtx.traceparent (header tracestate).",
							   "Sent only with a traceparent. Empty: none.",
							   &mqtx_tracestate,
							   "",
							   PGC_USERSET,
							   GUC_NOT_IN_SAMPLE,
							   check_tracestate, NULL, NULL);
}

/*
 * The consumer calls these around a handler.  What the handler publishes
 * in between is caused by this message.
 */
void
mqtx_enter_handled_message(const char *message_id, const char *correlation_id)
{
	mqtx_leave_handled_message();
	handled_message_id = MemoryContextStrdup(TopMemoryContext, message_id);
	if (correlation_id != NULL)
		handled_correlation_id = MemoryContextStrdup(TopMemoryContext, correlation_id);
}

void
mqtx_leave_handled_message(void)
{
	if (handled_message_id != NULL)
		pfree(handled_message_id);
	if (handled_correlation_id != NULL)
		pfree(handled_correlation_id);
	handled_message_id = handled_correlation_id = NULL;
}

/* A top-level string member of headers, or NULL */
static char *
string_header(Jsonb *headers, const char *name)
{
	JsonbValue *value;

	if (headers == NULL || !JB_ROOT_IS_OBJECT(headers) || JB_ROOT_IS_SCALAR(headers))
		return NULL;
	value = getKeyJsonValueFromContainer(&headers->root, name, strlen(name), NULL);
	if (value == NULL || value->type != jbvString)
		return NULL;
	return pnstrdup(value->val.string.val, value->val.string.len);
}

static void
set_local(const char *name, const char *value)
{
	(void) set_config_option(name, value, PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_LOCAL, true, 0, false);
}

/*
 * Make a handled message's trace context current, for the rest of the
 * consumer's transaction: every delivery sets both, so none inherits the
 * one before it in the batch (a SET LOCAL in a subtransaction outlives
 * it).  A context that is not valid W3C trace context is not carried on:
 * the message is applied as if it had none.
 */
void
mqtx_make_trace_context_current(Jsonb *headers)
{
	char	   *traceparent = string_header(headers, MQTX_TRACEPARENT_HEADER);
	char	   *tracestate = string_header(headers, MQTX_TRACESTATE_HEADER);
	const char *why;

	if (traceparent != NULL && !traceparent_is_valid(traceparent, &why))
		traceparent = NULL;
	if (traceparent == NULL || (tracestate != NULL && !tracestate_is_valid(tracestate, &why)))
		tracestate = NULL;
	set_local("mqtx.traceparent", traceparent ? traceparent : "");
	set_local("mqtx.tracestate", tracestate ? tracestate : "");
}

static bool
has_header(Jsonb *headers, const char *name)
{
	return headers != NULL && JB_ROOT_IS_OBJECT(headers) && !JB_ROOT_IS_SCALAR(headers) &&
		getKeyJsonValueFromContainer(&headers->root, name, strlen(name), NULL) != NULL;
}

/* How long a string is on the wire, in UTF-8 */
static size_t
utf8_length(const char *s)
{
	return strlen(pg_server_to_any(s, strlen(s), PG_UTF8));
}

static void
push_string_pair(JsonbParseState **state, const char *key, const char *value)
{
	JsonbValue	v;

	v.type = jbvString;
	v.val.string.val = (char *) key;
	v.val.string.len = strlen(key);
	(void) pushJsonbValue(state, WJB_KEY, &v);
	v.val.string.val = (char *) value;
	v.val.string.len = strlen(value);
	(void) pushJsonbValue(state, WJB_VALUE, &v);
}

/*
 * A new message's headers with the context it carries: the caller's
 * correlation and causation ids if given, else those the handled message
 * hands down, and the current trace context.  The publisher's own headers
 * win over all of it; one who gives a traceparent gets no tracestate of
 * the setting's either.  An inherited correlation id too long for the AMQP
 * property (a "hex:" id of a foreign message) is not inherited.
 */
Jsonb *
mqtx_headers_with_context(Jsonb *headers, text *correlation_id, text *causation_id)
{
	const char *correlation = NULL;
	const char *causation = NULL;
	JsonbParseState *state = NULL;
	Jsonb	   *context;
	bool		with_trace;

	if (correlation_id != NULL)
		correlation = text_to_cstring(correlation_id);
	else if (handled_message_id != NULL)
	{
		correlation = handled_correlation_id ? handled_correlation_id : handled_message_id;
		if (utf8_length(correlation) > MQTX_SHORTSTR_MAX)
			correlation = NULL;
	}
	if (causation_id != NULL)
		causation = text_to_cstring(causation_id);
	else
		causation = handled_message_id;

	/* a trace context the publisher gives is taken whole, or not at all */
	with_trace = mqtx_traceparent != NULL && mqtx_traceparent[0] != '\0' &&
		!has_header(headers, MQTX_TRACEPARENT_HEADER);
	if (correlation == NULL && causation == NULL && !with_trace)
		return headers;

	(void) pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	if (correlation != NULL)
		push_string_pair(&state, MQTX_CORRELATION_ID_HEADER, correlation);
	if (causation != NULL)
		push_string_pair(&state, MQTX_CAUSATION_ID_HEADER, causation);
	if (with_trace)
	{
		push_string_pair(&state, MQTX_TRACEPARENT_HEADER, mqtx_traceparent);
		if (mqtx_tracestate != NULL && mqtx_tracestate[0] != '\0')
			push_string_pair(&state, MQTX_TRACESTATE_HEADER, mqtx_tracestate);
	}
	context = JsonbValueToJsonb(pushJsonbValue(&state, WJB_END_OBJECT, NULL));
	if (headers == NULL)
		return context;
	return DatumGetJsonbP(DirectFunctionCall2(jsonb_concat, JsonbPGetDatum(context),
											  JsonbPGetDatum(headers)));
}
