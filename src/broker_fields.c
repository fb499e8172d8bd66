/*-------------------------------------------------------------------------
 *
 * broker_fields.c
 *	  Values between PostgreSQL and AMQP: jsonb headers and queue arguments
 *	  as AMQP field tables for sending, received field tables as JSON text
 *	  for a consumer's handler, and text between the server encoding and
 *	  the UTF-8 of AMQP strings.
 *
 * Nothing here does I/O or keeps state: every function works on the
 * values it is handed and allocates its result in the current memory
 * context.  That is what lets the check made when a message is enqueued
 * (mqtx_headers_are_valid) be the very translation the relay sends with,
 * so that what is accepted is what gets sent.
 *
 * The two directions are not mirror images.  Going out, a value AMQP
 * cannot carry (an integer beyond 64 bits, a key longer than a shortstr)
 * is refused with a reason, since the caller can still tell its user.
 * Coming in, whatever a broker or another client put in a table is taken
 * and shown as JSON, bytes that are not UTF-8 text as "hex:" and their
 * digits: the consumer has to store every delivery, even one it cannot
 * apply.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <errno.h>
#include <math.h>

#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "broker_internal.h"
#include "digest.h"

/*
 * Text in the server encoding as an AMQP string, which is UTF-8: the text
 * itself in a UTF-8 database, else a converted copy in the current memory
 * context.  Text from the database always converts; pg_server_to_any
 * raises the error for anything else.
 */
amqp_bytes_t
mqtx_amqp_from_server(const char *str, int len)
{
	amqp_bytes_t bytes;

	bytes.bytes = pg_server_to_any(str, len, PG_UTF8);
	bytes.len = (bytes.bytes == str) ? (size_t) len : strlen(bytes.bytes);
	return bytes;
}

/* The same, for a NUL-terminated string */
amqp_bytes_t
mqtx_amqp_from_server_cstring(const char *str)
{
	return mqtx_amqp_from_server(str, strlen(str));
}

/*
 * AMQP bytes as a C string, copied as they are, not converted or checked:
 * only for what mqtx sent itself and gets back (a consumer tag, a message
 * id).  What other clients wrote goes through mqtx_amqp_wire_string.
 */
char *
mqtx_amqp_to_cstring(amqp_bytes_t bytes)
{
	return pnstrdup(bytes.bytes, bytes.len);
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
	char	   *str = DatumGetCString(DirectFunctionCall1(numeric_out,
														  NumericGetDatum(num)));

	if (strpbrk(str, ".eE") == NULL)
	{
		char	   *end;
		long long	value;

		errno = 0;
		value = strtoll(str, &end, 10);
		if (errno == 0 && *end == '\0')
		{
			field->kind = AMQP_FIELD_KIND_I64;
			field->value.i64 = value;
			return true;
		}
		*reason = psprintf("Header \"%s\": the integer %.30s%s does not fit in 64 bits.",
						   key, str, strlen(str) > 30 ? "..." : "");
		return false;
	}
	field->kind = AMQP_FIELD_KIND_F64;
	field->value.f64 = strtod(str, NULL);
	if (isinf(field->value.f64))
	{
		*reason = psprintf("Header \"%s\": the number %s does not fit in a double.",
						   key, str);
		return false;
	}
	return true;
}

/*
 * One jsonb value as an AMQP field value; "key" names it in *reason.
 * Objects and arrays become nested tables and arrays.
 */
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
			field->value.bytes = mqtx_amqp_from_server(value->val.string.val,
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

/*
 * A jsonb object as a field table.  Keys are shortstrs: one longer than
 * MQTX_SHORTSTR_MAX bytes (in UTF-8) cannot be sent.
 */
static bool
container_to_table(JsonbContainer *container, amqp_table_t *table, char **reason)
{
	JsonbIterator *it;
	JsonbValue	value;
	JsonbIteratorToken token;
	char	   *key = NULL;

	check_stack_depth();
	it = JsonbIteratorInit(container);

	table->num_entries = 0;
	table->entries = palloc0(sizeof(amqp_table_entry_t) *
							 Max(JsonContainerSize(container), 1));

	while ((token = JsonbIteratorNext(&it, &value, true)) != WJB_DONE)
	{
		amqp_table_entry_t *entry = &table->entries[table->num_entries];

		if (token == WJB_KEY)
		{
			key = pnstrdup(value.val.string.val, value.val.string.len);
			entry->key = mqtx_amqp_from_server(value.val.string.val,
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

/* A jsonb array as a field array */
static bool
container_to_array(JsonbContainer *container, amqp_array_t *array, char **reason)
{
	JsonbIterator *it;
	JsonbValue	value;
	JsonbIteratorToken token;

	check_stack_depth();
	it = JsonbIteratorInit(container);
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
 * Translate a jsonb object (a message's headers, a queue's arguments) into
 * an AMQP field table, allocated in the current memory context.  Returns
 * false, with *reason a sentence naming the header at fault, when it is
 * not an object or holds a value AMQP cannot carry.
 */
bool
mqtx_amqp_headers_to_table(Jsonb *headers, amqp_table_t *table, char **reason)
{
	if (!JB_ROOT_IS_OBJECT(headers) || JB_ROOT_IS_SCALAR(headers))
	{
		*reason = pstrdup("Headers must be a JSON object.");
		return false;
	}
	return container_to_table(&headers->root, table, reason);
}

/*
 * Does the table, encoded, fit in a header frame of frame_max bytes and
 * leave PROPERTIES_RESERVE of it to the other properties?  *room is what
 * it may take.  rabbitmq-c finds a table too large only once the publish
 * method has gone out, which costs the channel: it is asked here first.
 */
bool
mqtx_amqp_table_fits_frame(amqp_table_t *table, int frame_max, size_t *room)
{
	amqp_bytes_t buffer;
	size_t		offset = 0;
	bool		fits;

	buffer.len = Max(frame_max - PROPERTIES_RESERVE, 0);
	buffer.bytes = palloc(Max(buffer.len, 1));
	fits = amqp_encode_table(buffer, table, &offset) == AMQP_STATUS_OK;
	pfree(buffer.bytes);
	*room = buffer.len;
	return fits;
}

/*
 * Can these headers be sent as an AMQP field table?  The same translation
 * the relay uses decides, so what is accepted here is what gets sent; the
 * frame is the size mqtx asks for when it connects.  On failure *reason
 * says why, as a sentence for an errdetail.
 */
bool
mqtx_headers_are_valid(Jsonb *headers, char **reason)
{
	amqp_table_t table;
	size_t		room;

	if (!mqtx_amqp_headers_to_table(headers, &table, reason))
		return false;
	if (!mqtx_amqp_table_fits_frame(&table, AMQP_DEFAULT_FRAME_SIZE, &room))
	{
		*reason = psprintf("The headers take more than %zu bytes as an AMQP table.",
						   room);
		return false;
	}
	return true;
}

/* UTF-8 text without NUL bytes */
static bool
is_plain_text(const char *data, int len)
{
	return memchr(data, '\0', len) == NULL && pg_verify_mbstr(PG_UTF8, data, len, true);
}

/*
 * Bytes from the wire as a string: themselves when they are plain text
 * (and do not begin with "hex:"), else "hex:" and their hexadecimal
 * digits.  What the consumer stores must be valid text (pg_restore of a
 * table holding invalid UTF-8 fails), and a NUL would cut a message id
 * short, so that two different messages shared one dedupe key.
 */
char *
mqtx_amqp_wire_string(amqp_bytes_t bytes)
{
	const char *data = bytes.bytes;
	int			len = (int) bytes.len;

	/* a string that starts like an encoded one is encoded too */
	if (is_plain_text(data, len) && !(len >= 4 && memcmp(data, "hex:", 4) == 0))
		return pnstrdup(data, len);
	return mqtx_hex_string(data, len);
}

/*
 * Bytes that mqtx wrote, or that are passed on as they came (an id it
 * wrote, a key, a correlation id): themselves when they are plain text,
 * "hex:" ones included, so that an id already encoded once is not encoded
 * again at every hop; else encoded like a wire string.
 */
char *
mqtx_amqp_text_string(amqp_bytes_t bytes)
{
	return is_plain_text(bytes.bytes, (int) bytes.len) ?
		pnstrdup(bytes.bytes, bytes.len) : mqtx_amqp_wire_string(bytes);
}

static bool field_to_json(StringInfo out, amqp_field_value_t *field, int depth);

/*
 * AMQP field values as JSON, for the headers handed to a consumer's
 * handler: the table is appended to "out" as a JSON object, "depth" being
 * its nesting level (1 at the top).  Integers of any width become numbers,
 * byte arrays and timestamps strings and numbers, decimals numbers, and
 * what JSON cannot hold (infinities, NaN, unknown kinds) null.  Returns
 * false when the table nests deeper than MAX_HEADER_DEPTH; "out" then
 * holds a part of it.
 */
bool
mqtx_amqp_table_to_json(StringInfo out, amqp_table_t *table, int depth)
{
	if (depth > MAX_HEADER_DEPTH)
		return false;
	appendStringInfoChar(out, '{');
	for (int i = 0; i < table->num_entries; i++)
	{
		if (i > 0)
			appendStringInfoString(out, ", ");
		escape_json(out, mqtx_amqp_wire_string(table->entries[i].key));
		appendStringInfoString(out, ": ");
		if (!field_to_json(out, &table->entries[i].value, depth))
			return false;
	}
	appendStringInfoChar(out, '}');
	return true;
}

/* One field value as JSON, for mqtx_amqp_table_to_json */
static bool
field_to_json(StringInfo out, amqp_field_value_t *field, int depth)
{
	switch (field->kind)
	{
		case AMQP_FIELD_KIND_BOOLEAN:
			appendStringInfoString(out, field->value.boolean ? "true" : "false");
			break;
		case AMQP_FIELD_KIND_I8:
			appendStringInfo(out, "%d", field->value.i8);
			break;
		case AMQP_FIELD_KIND_U8:
			appendStringInfo(out, "%u", field->value.u8);
			break;
		case AMQP_FIELD_KIND_I16:
			appendStringInfo(out, "%d", field->value.i16);
			break;
		case AMQP_FIELD_KIND_U16:
			appendStringInfo(out, "%u", field->value.u16);
			break;
		case AMQP_FIELD_KIND_I32:
			appendStringInfo(out, "%d", field->value.i32);
			break;
		case AMQP_FIELD_KIND_U32:
			appendStringInfo(out, "%u", field->value.u32);
			break;
		case AMQP_FIELD_KIND_I64:
			appendStringInfo(out, INT64_FORMAT, (int64) field->value.i64);
			break;
		case AMQP_FIELD_KIND_U64:
		case AMQP_FIELD_KIND_TIMESTAMP:
			appendStringInfo(out, UINT64_FORMAT, (uint64) field->value.u64);
			break;
		case AMQP_FIELD_KIND_F32:
		case AMQP_FIELD_KIND_F64:
			{
				double		d = field->kind == AMQP_FIELD_KIND_F32 ?
				field->value.f32 : field->value.f64;

				if (isfinite(d))
					appendStringInfo(out, "%.17g", d);
				else
					appendStringInfoString(out, "null");
				break;
			}
		case AMQP_FIELD_KIND_DECIMAL:
			{
				double		d = field->value.decimal.value;

				for (int i = 0; i < field->value.decimal.decimals; i++)
					d /= 10;
				appendStringInfo(out, "%.17g", d);
				break;
			}
		case AMQP_FIELD_KIND_UTF8:
		case AMQP_FIELD_KIND_BYTES:
			escape_json(out, mqtx_amqp_wire_string(field->value.bytes));
			break;
		case AMQP_FIELD_KIND_ARRAY:
			if (depth + 1 > MAX_HEADER_DEPTH)
				return false;
			appendStringInfoChar(out, '[');
			for (int i = 0; i < field->value.array.num_entries; i++)
			{
				if (i > 0)
					appendStringInfoString(out, ", ");
				if (!field_to_json(out, &field->value.array.entries[i], depth + 1))
					return false;
			}
			appendStringInfoChar(out, ']');
			break;
		case AMQP_FIELD_KIND_TABLE:
			return mqtx_amqp_table_to_json(out, &field->value.table, depth + 1);
		default:
			appendStringInfoString(out, "null");
			break;
	}
	return true;
}

/* The value of the header named name at the top level of the table, or NULL. */
static amqp_field_value_t *
find_header(amqp_table_t *headers, const char *name)
{
	for (int i = 0; i < headers->num_entries; i++)
	{
		amqp_table_entry_t *entry = &headers->entries[i];

		if (entry->key.len == strlen(name) &&
			memcmp(entry->key.bytes, name, entry->key.len) == 0)
			return &entry->value;
	}
	return NULL;
}

/*
 * A string header of mqtx's own (the original id of a redriven message,
 * an ordering key), when it is a non-empty string; else NULL.
 */
char *
mqtx_amqp_string_header(amqp_table_t *headers, const char *name)
{
	amqp_field_value_t *value = find_header(headers, name);

	if (value == NULL ||
		(value->kind != AMQP_FIELD_KIND_UTF8 && value->kind != AMQP_FIELD_KIND_BYTES) ||
		value->value.bytes.len == 0)
		return NULL;
	/* written by mqtx (a dedupe key, a key): taken as it is */
	return mqtx_amqp_text_string(value->value.bytes);
}

/*
 * How often a quorum queue has handed the message out before and had it
 * back: its header x-delivery-count, whatever integer type carries it; 0
 * when there is none (a first delivery, or not a quorum queue).
 */
int64
mqtx_amqp_delivery_count(amqp_table_t *headers)
{
	amqp_field_value_t *value = find_header(headers, "x-delivery-count");

	if (value == NULL)
		return 0;
	switch (value->kind)
	{
		case AMQP_FIELD_KIND_I8:
			return value->value.i8;
		case AMQP_FIELD_KIND_U8:
			return value->value.u8;
		case AMQP_FIELD_KIND_I16:
			return value->value.i16;
		case AMQP_FIELD_KIND_U16:
			return value->value.u16;
		case AMQP_FIELD_KIND_I32:
			return value->value.i32;
		case AMQP_FIELD_KIND_U32:
			return value->value.u32;
		case AMQP_FIELD_KIND_I64:
			return value->value.i64;
		case AMQP_FIELD_KIND_U64:
			return (int64) Min(value->value.u64, (uint64) PG_INT64_MAX);
		default:
			return 0;
	}
}
