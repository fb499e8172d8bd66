/*-------------------------------------------------------------------------
 *
 * broker.c
 *	  Everything that speaks to rabbitmq-c: broker URL parsing and the
 *	  translation of message headers into AMQP field tables.
 *
 * This is the only file that includes the rabbitmq-c headers; the rest of
 * mqtx sees plain C and PostgreSQL types.  Functions here report problems
 * as text in *reason rather than with ereport(ERROR), so that a caller in
 * the middle of a broker exchange can decide what failure means.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <errno.h>
#include <math.h>

#include <amqp.h>

#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "mqtx.h"

/*
 * rabbitmq-c quietly substitutes "localhost" for a missing host; we want
 * "amqp://user:pw@:5672/" to be an error, not a connection to localhost.
 */
static bool
names_host(const char *url)
{
	const char *authority = strstr(url, "://") + 3;
	const char *host = authority;
	const char *p;

	for (p = authority; *p != '\0' && *p != '/'; p++)
		if (*p == '@')
			host = p + 1;
	return *host != '\0' && *host != ':' && *host != '/';
}

/*
 * Parse a broker URL into *info.  The strings in *info point into a copy
 * of the URL allocated in the current memory context.
 */
static bool
parse_broker_url(const char *url, struct amqp_connection_info *info,
				 char **reason)
{
	char	   *copy = pstrdup(url);

	if (strncmp(url, "amqp://", 7) != 0 && strncmp(url, "amqps://", 8) != 0)
	{
		*reason = pstrdup("The URL must start with amqp:// or amqps://.");
		return false;
	}
	if (amqp_parse_url(copy, info) != AMQP_STATUS_OK)
	{
		*reason = pstrdup("The URL is malformed: check the user, password, host, port and vhost parts.");
		return false;
	}
	if (!names_host(url))
	{
		*reason = pstrdup("The URL names no host.");
		return false;
	}
	if (info->port <= 0)
	{
		*reason = psprintf("Port %d is out of range (1..65535).", info->port);
		return false;
	}
	if (info->vhost[0] == '\0')
	{
		*reason = pstrdup("The URL names an empty vhost; write %2f for the default vhost \"/\".");
		return false;
	}
	return true;
}

/*
 * Is this a usable broker URL?  On failure *reason says why, without
 * repeating the URL (it may carry a password).
 */
bool
mqtx_broker_url_is_valid(const char *url, char **reason)
{
	struct amqp_connection_info info;

	return parse_broker_url(url, &info, reason);
}

/*
 * AMQP strings are UTF-8; the database may use another encoding.
 */
static amqp_bytes_t
server_text_to_amqp_bytes(const char *text, int len)
{
	amqp_bytes_t bytes;

	bytes.bytes = pg_server_to_any(text, len, PG_UTF8);
	bytes.len = (bytes.bytes == text) ? (size_t) len : strlen(bytes.bytes);
	return bytes;
}

static bool container_to_table(JsonbContainer *container, amqp_table_t *table,
							   char **reason);
static bool container_to_array(JsonbContainer *container, amqp_array_t *array,
							   char **reason);

/*
 * JSON numbers become 64-bit integers when they are integral and fit,
 * doubles otherwise; anything else cannot travel in an AMQP table.
 */
static bool
numeric_to_field(Numeric num, const char *key, amqp_field_value_t *field,
				 char **reason)
{
	char	   *text = DatumGetCString(DirectFunctionCall1(numeric_out,
														   NumericGetDatum(num)));

	if (strpbrk(text, ".eE") == NULL)
	{
		char	   *end;
		long long	value;

		errno = 0;
		value = strtoll(text, &end, 10);
		if (errno == 0 && *end == '\0')
		{
			field->kind = AMQP_FIELD_KIND_I64;
			field->value.i64 = value;
			return true;
		}
		*reason = psprintf("Header \"%s\": the integer %.30s%s does not fit in 64 bits.",
						   key, text, strlen(text) > 30 ? "..." : "");
		return false;
	}
	field->kind = AMQP_FIELD_KIND_F64;
	field->value.f64 = strtod(text, NULL);
	if (isinf(field->value.f64))
	{
		*reason = psprintf("Header \"%s\": the number %s does not fit in a double.",
						   key, text);
		return false;
	}
	return true;
}

static bool
jsonb_value_to_field(JsonbValue *value, const char *key,
					 amqp_field_value_t *field, char **reason)
{
	switch (value->type)
	{
		case jbvNull:
			field->kind = AMQP_FIELD_KIND_VOID;
			return true;
		case jbvBool:
			field->kind = AMQP_FIELD_KIND_BOOLEAN;
			field->value.boolean = value->val.boolean;
			return true;
		case jbvString:
			field->kind = AMQP_FIELD_KIND_UTF8;
			field->value.bytes = server_text_to_amqp_bytes(value->val.string.val,
														   value->val.string.len);
			return true;
		case jbvNumeric:
			return numeric_to_field(value->val.numeric, key, field, reason);
		case jbvBinary:
			if (JsonContainerIsObject(value->val.binary.data))
			{
				field->kind = AMQP_FIELD_KIND_TABLE;
				return container_to_table(value->val.binary.data,
										  &field->value.table, reason);
			}
			field->kind = AMQP_FIELD_KIND_ARRAY;
			return container_to_array(value->val.binary.data,
									  &field->value.array, reason);
		default:
			*reason = psprintf("Header \"%s\" has a value of unexpected type.", key);
			return false;
	}
}

static bool
container_to_table(JsonbContainer *container, amqp_table_t *table, char **reason)
{
	JsonbIterator *it = JsonbIteratorInit(container);
	JsonbValue	value;
	JsonbIteratorToken token;
	char	   *key = NULL;

	table->num_entries = 0;
	table->entries = palloc0(sizeof(amqp_table_entry_t) *
							 Max(JsonContainerSize(container), 1));

	while ((token = JsonbIteratorNext(&it, &value, true)) != WJB_DONE)
	{
		amqp_table_entry_t *entry = &table->entries[table->num_entries];

		if (token == WJB_KEY)
		{
			key = pnstrdup(value.val.string.val, value.val.string.len);
			entry->key = server_text_to_amqp_bytes(value.val.string.val,
												   value.val.string.len);
			if (entry->key.len > MQTX_SHORTSTR_MAX)
			{
				*reason = psprintf("Header key \"%.40s...\" is %zu bytes long; AMQP allows at most %d.",
								   key, entry->key.len, MQTX_SHORTSTR_MAX);
				return false;
			}
		}
		else if (token == WJB_VALUE)
		{
			if (!jsonb_value_to_field(&value, key, &entry->value, reason))
				return false;
			table->num_entries++;
		}
	}
	return true;
}

static bool
container_to_array(JsonbContainer *container, amqp_array_t *array, char **reason)
{
	JsonbIterator *it = JsonbIteratorInit(container);
	JsonbValue	value;
	JsonbIteratorToken token;

	array->num_entries = 0;
	array->entries = palloc0(sizeof(amqp_field_value_t) *
							 Max(JsonContainerSize(container), 1));

	while ((token = JsonbIteratorNext(&it, &value, true)) != WJB_DONE)
	{
		if (token != WJB_ELEM)
			continue;
		if (!jsonb_value_to_field(&value, "(array element)",
								  &array->entries[array->num_entries], reason))
			return false;
		array->num_entries++;
	}
	return true;
}

/*
 * Translate a jsonb object into an AMQP field table, allocated in the
 * current memory context.
 */
static bool
headers_to_table(Jsonb *headers, amqp_table_t *table, char **reason)
{
	if (!JB_ROOT_IS_OBJECT(headers) || JB_ROOT_IS_SCALAR(headers))
	{
		*reason = pstrdup("Headers must be a JSON object.");
		return false;
	}
	return container_to_table(&headers->root, table, reason);
}

/*
 * Can these headers be sent as an AMQP field table?  The same translation
 * the relay uses decides, so what is accepted here is what gets sent.
 */
bool
mqtx_headers_are_valid(Jsonb *headers, char **reason)
{
	amqp_table_t table;

	return headers_to_table(headers, &table, reason);
}
