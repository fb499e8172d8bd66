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
 * on mqtx.publish, granted by mqtx.grant_publish) must not mean being able
 * to read other services' messages or to mark rows published.  Converting
 * the caller's row to JSON happens before the switch, under the caller's
 * identity, because it can run user-defined casts.
 *
 * Each enqueue is one row in the application's transaction, often the
 * only other row it writes, so its cost is the application's.  An SQL
 * INSERT per row plans a statement, starts an executor and compiles the
 * table's CHECK constraints every time; so the row is inserted directly,
 * as the logical replication apply worker does (heap insert, then the
 * executor's index maintenance), into a table mqtx knows the shape of.
 * An outbox its owner has changed goes through SQL, so that what the owner
 * added runs.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/dependency.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "mqtx.h"

PG_FUNCTION_INFO_V1(mqtx_publish);
PG_FUNCTION_INFO_V1(mqtx_outbox_trigger);
PG_FUNCTION_INFO_V1(mqtx_new_message_id_sql);

#define TRIGGER_USAGE_HINT \
	"Use CREATE TRIGGER ... AFTER INSERT ON <table> FOR EACH ROW " \
	"EXECUTE FUNCTION mqtx.outbox_trigger('<exchange>', '<routing key>')."

static const char *const insert_sql =
"INSERT INTO mqtx.outbox (message_id, exchange, routing_key, payload, headers) "
"VALUES ($1, $2, $3, $4, $5)";

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

/*
 * A new message id: a UUID of version 7 (RFC 9562), the Unix time in
 * milliseconds, then 12 bits of sub-millisecond time and 62 random bits.
 * Ids made later sort later, so the unique index on message_id grows at
 * its right edge like the primary key, instead of dirtying a random leaf
 * page (and writing it whole after each checkpoint) for every message.
 */
pg_uuid_t
mqtx_new_message_id(void)
{
	pg_uuid_t	id;
	int64		unix_us = GetCurrentTimestamp() +
		(int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY;
	uint64		unix_ms = (uint64) unix_us / 1000;
	uint32		sub_ms = (uint32) (((uint64) unix_us % 1000) * 4096 / 1000);

	for (int i = 0; i < 6; i++)
		id.data[i] = (unix_ms >> (8 * (5 - i))) & 0xFF;
	id.data[6] = 0x70 | (sub_ms >> 8);
	id.data[7] = sub_ms & 0xFF;
	if (!pg_strong_random(&id.data[8], 8))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate random values")));
	id.data[8] = 0x80 | (id.data[8] & 0x3F);
	return id;
}

/* mqtx.new_message_id() returns uuid: the outbox's default message id */
Datum
mqtx_new_message_id_sql(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *id = palloc(sizeof(pg_uuid_t));

	*id = mqtx_new_message_id();
	PG_RETURN_UUID_P(id);
}

/*
 * The outbox's columns, in order, as every version of mqtx creates them,
 * and its CHECK constraints.  The direct insert fills these and nothing
 * else, and writes only values those constraints accept.
 */
static const struct
{
	const char *name;
	Oid			type;
}			outbox_columns[] =
{
	{"id", INT8OID},
	{"message_id", UUIDOID},
	{"exchange", TEXTOID},
	{"routing_key", TEXTOID},
	{"payload", JSONBOID},
	{"headers", JSONBOID},
	{"status", TEXTOID},
	{"attempts", INT4OID},
	{"next_attempt_at", TIMESTAMPTZOID},
	{"last_error", TEXTOID},
	{"created_at", TIMESTAMPTZOID},
	{"published_at", TIMESTAMPTZOID},
};

#define OUTBOX_NATTS ((int) lengthof(outbox_columns))

static const char *const outbox_checks[] = {
	"outbox_status_check", "outbox_published_at_check", "outbox_attempts_check",
	"outbox_exchange_check", "outbox_routing_key_check", "outbox_headers_check",
};

/*
 * What this backend knows of mqtx.outbox: whether rows can be inserted
 * directly, and the sequence behind its id.  Any change to the table
 * (columns, constraints, triggers, policies, DROP) invalidates its
 * relcache entry, and with it this.
 */
static Oid	known_outbox = InvalidOid;
static bool known_outbox_direct;
static Oid	known_outbox_sequence;
static bool outbox_callback_registered = false;

static void
forget_known_outbox(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == known_outbox)
		known_outbox = InvalidOid;
}

static bool
has_known_checks(TupleConstr *constr)
{
	if (constr == NULL || constr->num_check != (int) lengthof(outbox_checks))
		return false;
	for (int i = 0; i < constr->num_check; i++)
	{
		bool		known = false;

		for (int j = 0; j < (int) lengthof(outbox_checks) && !known; j++)
			known = strcmp(constr->check[i].ccname, outbox_checks[j]) == 0;
		if (!known)
			return false;
	}
	return true;
}

/*
 * The table as mqtx created it: a plain table with exactly these columns,
 * an identity id, these CHECK constraints and nothing that would have to
 * run on insert (triggers, row security, generated columns).  Anything
 * else the owner added is honoured by taking the SQL path.
 */
static bool
outbox_allows_direct_insert(Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);

	if (rel->rd_rel->relkind != RELKIND_RELATION || rel->trigdesc != NULL ||
		rel->rd_rel->relrowsecurity || desc->natts != OUTBOX_NATTS ||
		!has_known_checks(desc->constr) || desc->constr->has_generated_stored)
		return false;
	for (int i = 0; i < OUTBOX_NATTS; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		if (att->attisdropped || att->atttypid != outbox_columns[i].type ||
			strcmp(NameStr(att->attname), outbox_columns[i].name) != 0)
			return false;
	}
	return TupleDescAttr(desc, 0)->attidentity == ATTRIBUTE_IDENTITY_ALWAYS;
}

static void
learn_outbox(Relation rel)
{
	if (!outbox_callback_registered)
	{
		CacheRegisterRelcacheCallback(forget_known_outbox, (Datum) 0);
		outbox_callback_registered = true;
	}
	known_outbox_direct = outbox_allows_direct_insert(rel);
	known_outbox_sequence = !known_outbox_direct ? InvalidOid :
#if PG_VERSION_NUM >= 170000
		getIdentitySequence(rel, 1, false);
#else
		getIdentitySequence(RelationGetRelid(rel), 1, false);
#endif
	known_outbox = RelationGetRelid(rel);
}

/*
 * Insert the row as the executor's INSERT would, minus what the table as
 * mqtx made it does not need: no plan, no CHECK expressions (the values
 * written are the ones they accept, and the message was validated
 * above), no triggers (there are none).  Index maintenance is the
 * executor's own, so whatever indexes the table has, unique checks
 * included, are kept.  Index expressions run as the table's owner, in a
 * security-restricted operation, as in the SQL path.
 */
static void
insert_outbox_row_directly(Relation rel, pg_uuid_t *message_id, text *exchange,
						   text *routing_key, Jsonb *payload, Jsonb *headers)
{
	EState	   *estate = CreateExecutorState();
	ResultRelInfo *target = makeNode(ResultRelInfo);
	TupleTableSlot *slot = MakeSingleTupleTableSlot(RelationGetDescr(rel),
													&TTSOpsVirtual);
	Datum		now = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	Datum	   *values = slot->tts_values;
	bool	   *isnull = slot->tts_isnull;
	Oid			saved_user;
	int			saved_context;
	List	   *recheck;

	InitResultRelInfo(target, rel, 1, NULL, 0);
	ExecOpenIndices(target, false);

	ExecClearTuple(slot);
	memset(isnull, false, OUTBOX_NATTS * sizeof(bool));
	values[0] = Int64GetDatum(nextval_internal(known_outbox_sequence, false));
	values[1] = UUIDPGetDatum(message_id);
	values[2] = PointerGetDatum(exchange);
	values[3] = PointerGetDatum(routing_key);
	values[4] = JsonbPGetDatum(payload);
	values[5] = headers ? JsonbPGetDatum(headers) : (Datum) 0;
	isnull[5] = headers == NULL;
	values[6] = CStringGetTextDatum("pending");
	values[7] = Int32GetDatum(0);
	values[8] = now;			/* next_attempt_at: due at once */
	isnull[9] = true;			/* last_error */
	values[10] = now;			/* created_at: now(), like the default */
	isnull[11] = true;			/* published_at */
	ExecStoreVirtualTuple(slot);

	GetUserIdAndSecContext(&saved_user, &saved_context);
	SetUserIdAndSecContext(rel->rd_rel->relowner,
						   saved_context | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	simple_table_tuple_insert(rel, slot);
#if PG_VERSION_NUM >= 160000
	recheck = ExecInsertIndexTuples(target, slot, estate, false, false, NULL, NIL, false);
#else
	recheck = ExecInsertIndexTuples(target, slot, estate, false, false, NULL, NIL);
#endif
	SetUserIdAndSecContext(saved_user, saved_context);

	/* deferred unique checks need a constraint trigger: SQL path */
	Assert(recheck == NIL);
	list_free(recheck);
	ExecCloseIndices(target);
	ExecDropSingleTupleTableSlot(slot);
	FreeExecutorState(estate);
}

/*
 * The SQL path, for an outbox its owner has changed (added a trigger, a
 * column, a policy): an INSERT run as the owner, so that all of it runs.
 */
static void
insert_outbox_row_with_sql(Relation rel, pg_uuid_t *message_id, text *exchange,
						   text *routing_key, Jsonb *payload, Jsonb *headers)
{
	Oid			argtypes[5] = {UUIDOID, TEXTOID, TEXTOID, JSONBOID, JSONBOID};
	Datum		values[5];
	char		nulls[5] = {' ', ' ', ' ', ' ', headers ? ' ' : 'n'};
	MqtxIdentity saved;
	int			rc;

	values[0] = UUIDPGetDatum(message_id);
	values[1] = PointerGetDatum(exchange);
	values[2] = PointerGetDatum(routing_key);
	values[3] = JsonbPGetDatum(payload);
	values[4] = headers ? JsonbPGetDatum(headers) : (Datum) 0;

	/* nothing the caller put on search_path runs with the owner's rights */
	mqtx_become(&saved, rel->rd_rel->relowner, "pg_catalog, pg_temp", true);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	rc = mqtx_execute_prepared(&insert_plan, insert_sql, 5, argtypes, values, nulls);
	if (rc != SPI_OK_INSERT || SPI_processed != 1)
		elog(ERROR, "inserting into mqtx.outbox failed: %s",
			 SPI_result_code_string(rc));
	SPI_finish();

	/* on error, transaction abort restores both */
	mqtx_restore_identity(&saved);
}

/*
 * Insert one outbox row and return its message id, allocated in the
 * caller's memory context.  The caller needs no privilege on the table
 * or its schema: the lookup checks none, and the insert runs as the
 * table's owner.
 */
static Datum
insert_outbox_row(text *exchange, text *routing_key, Jsonb *payload,
				  Jsonb *headers)
{
	pg_uuid_t  *message_id = palloc(sizeof(pg_uuid_t));
	Oid			relid = get_relname_relid("outbox", get_namespace_oid("mqtx", true));
	Relation	rel;

	/* by name without a privilege check: callers need none on the schema */
	rel = OidIsValid(relid) ? try_table_open(relid, RowExclusiveLock) : NULL;
	if (rel == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("mqtx.outbox does not exist"),
				 errhint("Run CREATE EXTENSION mqtx in this database.")));
	if (relid != known_outbox)
		learn_outbox(rel);

	*message_id = mqtx_new_message_id();
	if (known_outbox_direct)
		insert_outbox_row_directly(rel, message_id, exchange, routing_key, payload, headers);
	else
		insert_outbox_row_with_sql(rel, message_id, exchange, routing_key, payload, headers);
	table_close(rel, NoLock);

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
