/*-------------------------------------------------------------------------
 *
 * outbox.c
 *	  Enqueueing into mqtx.outbox: mqtx.publish() and mqtx.outbox_trigger().
 *
 * Both entry points validate the message exactly as the relay will need
 * it on the wire and then insert one outbox row in the caller's
 * transaction, so the message commits or rolls back with the caller's own
 * writes.
 *
 * The insert itself runs as the owner of mqtx.outbox.  Callers get no
 * privileges on the outbox table at all: being allowed to publish (EXECUTE
 * on mqtx.publish, usually through the mqtx_publisher role) must not mean
 * being able to read other services' messages or to mark rows published.
 * Converting the caller's row to JSON happens before the switch, under the
 * caller's identity, because it can run user-defined casts.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/syscache.h"
#include "utils/uuid.h"

#include "mqtx.h"

PG_FUNCTION_INFO_V1(mqtx_publish);
PG_FUNCTION_INFO_V1(mqtx_outbox_trigger);

#define TRIGGER_USAGE_HINT \
	"Use CREATE TRIGGER ... AFTER INSERT ON <table> FOR EACH ROW " \
	"EXECUTE FUNCTION mqtx.outbox_trigger('<exchange>', '<routing key>')."

static const char *const insert_sql =
"INSERT INTO mqtx.outbox (exchange, routing_key, payload, headers) "
"VALUES ($1, $2, $3, $4) RETURNING message_id";

static SPIPlanPtr insert_plan = NULL;

/* Per-trigger cache: how to turn this table's rows into jsonb. */
typedef struct RowToJsonbCache
{
	Oid			rowtype;
	FmgrInfo	to_jsonb;
} RowToJsonbCache;

static void
require_argument(bool isnull, const char *what)
{
	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("mqtx message %s must not be NULL", what),
				 strcmp(what, "exchange") == 0 ?
				 errhint("Use '' for RabbitMQ's default exchange.") : 0));
}

/*
 * Exchange names and routing keys are AMQP short strings.
 */
/*
 * Length on the wire, in UTF-8; ERROR when the text has no UTF-8 form.
 */
static int
utf8_length(const char *data, int len)
{
	char	   *converted = pg_server_to_any(data, len, PG_UTF8);

	return converted == data ? len : (int) strlen(converted);
}

static void
check_short_string(text *value, const char *what)
{
	int			len = utf8_length(VARDATA_ANY(value), VARSIZE_ANY_EXHDR(value));

	if (len > MQTX_SHORTSTR_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
				 errmsg("mqtx message %s is too long", what),
				 errdetail("It is %d bytes; AMQP allows at most %d.",
						   len, MQTX_SHORTSTR_MAX)));
}

/*
 * The limit applies to the JSON text that goes on the wire.
 */
static void
check_payload_size(Jsonb *payload)
{
	StringInfoData text;

	int			len;

	initStringInfo(&text);
	JsonbToCString(&text, &payload->root, VARSIZE(payload));
	len = utf8_length(text.data, text.len);
	if (len > mqtx_max_payload)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("mqtx message payload is too large"),
				 errdetail("The payload is %d bytes as JSON text; mqtx.max_payload is %d bytes.",
						   len, mqtx_max_payload),
				 errhint("Send a reference to the data instead, or raise mqtx.max_payload.")));
	pfree(text.data);
}

/*
 * Headers named x-mqtx-... are mqtx's own: x-mqtx-redriven-from sets the
 * key the consumer dedupes on, so a publisher who could send it could have
 * another producer's message dropped as a duplicate of its own.  Only
 * mqtx.redrive, run by a superuser, writes them.
 */
static void
check_reserved_headers(Jsonb *headers)
{
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken token;
	int			depth = 0;

	if (headers == NULL || superuser() || !JB_ROOT_IS_OBJECT(headers))
		return;
	it = JsonbIteratorInit(&headers->root);
	while ((token = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (token == WJB_BEGIN_OBJECT || token == WJB_BEGIN_ARRAY)
			depth++;
		else if (token == WJB_END_OBJECT || token == WJB_END_ARRAY)
			depth--;
		else if (token == WJB_KEY && depth == 1 && v.val.string.len >= 7 &&
				 pg_strncasecmp(v.val.string.val, "x-mqtx-", 7) == 0)
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("mqtx message header \"%.*s\" is reserved",
							v.val.string.len, v.val.string.val),
					 errdetail("Headers named x-mqtx-... are written by mqtx itself; x-mqtx-redriven-from sets the key the consumer deduplicates on."),
					 errhint("Use another header name.")));
	}
}

static void
check_headers(Jsonb *headers)
{
	char	   *reason;

	check_reserved_headers(headers);
	if (headers != NULL && !mqtx_headers_are_valid(headers, &reason))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("mqtx message headers cannot be sent as AMQP headers"),
				 errdetail_internal("%s", reason),
				 errhint("Headers must be a JSON object with keys of at most %d bytes "
						 "and numbers that fit in 64-bit integers or doubles.",
						 MQTX_SHORTSTR_MAX)));
}

static Oid
outbox_owner(void)
{
	Oid			relid = get_relname_relid("outbox", get_namespace_oid("mqtx", true));
	HeapTuple	tuple;
	Oid			owner;

	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("mqtx.outbox does not exist"),
				 errhint("Run CREATE EXTENSION mqtx in this database.")));
	tuple = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	if (!HeapTupleIsValid(tuple))
		elog(ERROR, "cache lookup failed for relation %u", relid);
	owner = ((Form_pg_class) GETSTRUCT(tuple))->relowner;
	ReleaseSysCache(tuple);
	return owner;
}

/*
 * Insert one outbox row as the outbox's owner and return its message id,
 * allocated in the caller's memory context.
 */
static Datum
insert_outbox_row(text *exchange, text *routing_key, Jsonb *payload,
				  Jsonb *headers)
{
	pg_uuid_t  *message_id = palloc(sizeof(pg_uuid_t));
	Oid			argtypes[4] = {TEXTOID, TEXTOID, JSONBOID, JSONBOID};
	Datum		values[4];
	char		nulls[4] = {' ', ' ', ' ', headers ? ' ' : 'n'};
	MqtxIdentity saved;
	bool		isnull;
	int			rc;

	values[0] = PointerGetDatum(exchange);
	values[1] = PointerGetDatum(routing_key);
	values[2] = JsonbPGetDatum(payload);
	values[3] = headers ? JsonbPGetDatum(headers) : (Datum) 0;

	/* nothing the caller put on search_path runs with the owner's rights */
	mqtx_become(&saved, outbox_owner(), "pg_catalog, pg_temp", true);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	rc = mqtx_execute_prepared(&insert_plan, insert_sql, 4, argtypes, values, nulls);
	if (rc != SPI_OK_INSERT_RETURNING || SPI_processed != 1)
		elog(ERROR, "inserting into mqtx.outbox failed: %s",
			 SPI_result_code_string(rc));
	memcpy(message_id,
		   DatumGetUUIDP(SPI_getbinval(SPI_tuptable->vals[0],
									   SPI_tuptable->tupdesc, 1, &isnull)),
		   sizeof(pg_uuid_t));
	SPI_finish();

	/* on error, transaction abort restores both */
	mqtx_restore_identity(&saved);
	mqtx_wake_relay_at_commit();
	return UUIDPGetDatum(message_id);
}

static Datum
enqueue_message(text *exchange, text *routing_key, Jsonb *payload,
				Jsonb *headers)
{
	check_short_string(exchange, "exchange");
	check_short_string(routing_key, "routing key");
	check_payload_size(payload);
	check_headers(headers);
	return insert_outbox_row(exchange, routing_key, payload, headers);
}

/*
 * mqtx.publish(exchange, routing_key, payload, headers) returns uuid
 *
 * Not STRICT: a NULL argument is a mistake worth an error, not a silent
 * NULL result with nothing enqueued.
 */
Datum
mqtx_publish(PG_FUNCTION_ARGS)
{
	require_argument(PG_ARGISNULL(0), "exchange");
	require_argument(PG_ARGISNULL(1), "routing key");
	require_argument(PG_ARGISNULL(2), "payload");

	PG_RETURN_DATUM(enqueue_message(PG_GETARG_TEXT_PP(0),
									PG_GETARG_TEXT_PP(1),
									PG_GETARG_JSONB_P(2),
									PG_ARGISNULL(3) ? NULL : PG_GETARG_JSONB_P(3)));
}

static void
trigger_misuse(TriggerData *trigdata, const char *rule, const char *actual)
{
	ereport(ERROR,
			(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
			 errmsg("mqtx.outbox_trigger() %s", rule),
			 errdetail("Trigger \"%s\" on \"%s\" %s.",
					   trigdata->tg_trigger->tgname,
					   RelationGetRelationName(trigdata->tg_relation), actual),
			 errhint(TRIGGER_USAGE_HINT)));
}

static void
check_trigger_usage(TriggerData *trigdata)
{
	TriggerEvent event = trigdata->tg_event;
	int			nargs = trigdata->tg_trigger->tgnargs;

	if (!TRIGGER_FIRED_AFTER(event))
		trigger_misuse(trigdata, "must be fired AFTER INSERT",
					   TRIGGER_FIRED_BEFORE(event) ? "is a BEFORE trigger" :
					   "is an INSTEAD OF trigger");
	if (!TRIGGER_FIRED_FOR_ROW(event))
		trigger_misuse(trigdata, "must be fired FOR EACH ROW",
					   "is a statement-level trigger");
	if (!TRIGGER_FIRED_BY_INSERT(event))
		trigger_misuse(trigdata, "must be fired by INSERT only",
					   TRIGGER_FIRED_BY_UPDATE(event) ? "was fired by UPDATE" :
					   TRIGGER_FIRED_BY_DELETE(event) ? "was fired by DELETE" :
					   "was fired by TRUNCATE");
	if (nargs != 2)
		trigger_misuse(trigdata, "takes exactly two arguments, the exchange and the routing key",
					   psprintf("passes %d", nargs));
}

/*
 * to_jsonb() learns its argument's type from the call expression, so give
 * it one naming the table's row type.
 */
static RowToJsonbCache *
row_to_jsonb_cache(FunctionCallInfo fcinfo, Oid rowtype)
{
	RowToJsonbCache *cache = fcinfo->flinfo->fn_extra;

	if (cache == NULL || cache->rowtype != rowtype)
	{
		MemoryContext old = MemoryContextSwitchTo(fcinfo->flinfo->fn_mcxt);
		FuncExpr   *call;

		cache = palloc0(sizeof(RowToJsonbCache));
		cache->rowtype = rowtype;
		fmgr_info_cxt(F_TO_JSONB, &cache->to_jsonb, fcinfo->flinfo->fn_mcxt);
		call = makeFuncExpr(F_TO_JSONB, JSONBOID,
							list_make1(makeNullConst(rowtype, -1, InvalidOid)),
							InvalidOid, InvalidOid, COERCE_EXPLICIT_CALL);
		fmgr_info_set_expr((Node *) call, &cache->to_jsonb);
		fcinfo->flinfo->fn_extra = cache;
		MemoryContextSwitchTo(old);
	}
	return cache;
}

/*
 * mqtx.outbox_trigger(exchange, routing_key): AFTER INSERT FOR EACH ROW,
 * enqueues the new row, as a JSON object, in the inserting transaction.
 */
Datum
mqtx_outbox_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	TupleDesc	tupdesc;
	RowToJsonbCache *cache;
	Datum		row;
	char	  **args;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("mqtx.outbox_trigger() can only be called as a trigger"),
				 errhint(TRIGGER_USAGE_HINT)));
	check_trigger_usage(trigdata);

	tupdesc = RelationGetDescr(trigdata->tg_relation);
	cache = row_to_jsonb_cache(fcinfo, tupdesc->tdtypeid);
	row = heap_copy_tuple_as_datum(trigdata->tg_trigtuple, tupdesc);
	args = trigdata->tg_trigger->tgargs;

	enqueue_message(cstring_to_text(args[0]), cstring_to_text(args[1]),
					DatumGetJsonbP(FunctionCall1(&cache->to_jsonb, row)),
					NULL);
	return PointerGetDatum(NULL);
}
