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
 * INSERT per row plans a statement, starts an executor and parses and
 * compiles the table's defaults and CHECK constraints every time; so the
 * row is inserted directly, as the logical replication apply worker does
 * (heap insert, then the executor's index maintenance), with the defaults
 * and constraints compiled once per relcache entry.  A table with
 * anything the direct insert does not run (triggers, rules, row
 * security) or with expressions that call code that is not built in goes
 * through an SQL INSERT instead.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/amapi.h"
#include "access/genam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/transam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "common/hashfn.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "nodes/nodeFuncs.h"
#include "optimizer/optimizer.h"
#include "rewrite/rewriteHandler.h"
#include "storage/lmgr.h"
#include "storage/proc.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/resowner.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"
#include "utils/datetime.h"

#include "broker.h"
#include "identity.h"
#include "message_context.h"
#include "outbox.h"
#include "shared.h"
#include "statements.h"

int			mqtx_max_payload = 1024 * 1024;

/*
 * The library is built with hidden symbols (Makefile): what the backend
 * looks up by name is declared PGDLLEXPORT, which PostgreSQL 15's
 * PG_FUNCTION_INFO_V1 does not do for the function itself.
 */
extern PGDLLEXPORT Datum mqtx_publish(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum mqtx_outbox_trigger(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum mqtx_new_message_id_sql(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum mqtx_cancel(PG_FUNCTION_ARGS);

PG_FUNCTION_INFO_V1(mqtx_publish);
PG_FUNCTION_INFO_V1(mqtx_cancel);
PG_FUNCTION_INFO_V1(mqtx_outbox_trigger);
PG_FUNCTION_INFO_V1(mqtx_new_message_id_sql);

#define TRIGGER_USAGE_HINT \
	"Use CREATE TRIGGER ... AFTER INSERT ON <table> FOR EACH ROW " \
	"EXECUTE FUNCTION mqtx.outbox_trigger('<exchange>', '<routing key>'[, '<key column>', ...])."

/*
 * The advisory lock class of ordering keys, in the lock tag's fourth field:
 * PostgreSQL's own advisory locks use 1 and 2, so an application's
 * pg_advisory_xact_lock() never meets mqtx's.  pg_locks shows it as an
 * advisory lock with this objsubid.
 */
#define ORDERING_KEY_LOCK_CLASS 0x6D71

/* Several key columns make one key: their values joined by this */
#define KEY_COLUMN_SEPARATOR '/'

/*
 * The SQL path's INSERTs, in the order of the filled columns: without the
 * ordering columns (an outbox before 0.8.0), with them, and for a
 * scheduled message, with next_attempt_at too (else it takes its default).
 */
typedef enum InsertStatement
{
	INSERT_UNORDERED,
	INSERT_ORDERED,
	INSERT_SCHEDULED,
	NUM_INSERT_STATEMENTS
} InsertStatement;

static const char *const insert_sql[NUM_INSERT_STATEMENTS] = {
	[INSERT_UNORDERED] =
	"INSERT INTO mqtx.outbox (message_id, exchange, routing_key, payload, headers) "
	"VALUES ($1, $2, $3, $4, $5)",
	[INSERT_ORDERED] =
	"INSERT INTO mqtx.outbox (message_id, exchange, routing_key, payload, headers, "
	"                         ordering_key, deliver_at) "
	"VALUES ($1, $2, $3, $4, $5, $6, $7)",
	[INSERT_SCHEDULED] =
	"INSERT INTO mqtx.outbox (message_id, exchange, routing_key, payload, headers, "
	"                         ordering_key, deliver_at, next_attempt_at) "
	"VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
};

static const int insert_nargs[NUM_INSERT_STATEMENTS] = {5, 7, 8};

static SPIPlanPtr insert_plans[NUM_INSERT_STATEMENTS];

/*
 * What an enqueue writes: the message, and how it is to be sent.  NULL
 * for an absent headers, key or schedule.
 */
typedef struct OutboxMessage
{
	text	   *exchange;
	text	   *routing_key;
	Jsonb	   *payload;
	Jsonb	   *headers;
	text	   *ordering_key;
	bool		scheduled;
	TimestampTz deliver_at;
	text	   *correlation_id; /* NULL: the handled message's, if any */
	text	   *causation_id;	/* NULL: the handled message */
} OutboxMessage;

/* Per-trigger cache: how to turn this table's rows into jsonb. */
typedef struct RowToJsonbCache
{
	Oid			rowtype;
	FmgrInfo	to_jsonb;
} RowToJsonbCache;

/* argument is the parameter's name in mqtx.publish()'s signature */
static void
require_argument(bool isnull, const char *argument)
{
	if (isnull)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("argument \"%s\" of mqtx.publish() must not be NULL", argument),
				 strcmp(argument, "exchange") == 0 ?
				 errhint("Use '' for RabbitMQ's default exchange.") : 0));
}

static void
require_nonempty(text *value, const char *argument)
{
	if (VARSIZE_ANY_EXHDR(value) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("argument \"%s\" of mqtx.publish() must not be empty", argument),
				 errhint("Pass NULL for none.")));
}

/*
 * Length on the wire, in UTF-8; ERROR when the text has no UTF-8 form.
 */
static int
utf8_length(const char *data, int len)
{
	char	   *converted = pg_server_to_any(data, len, PG_UTF8);

	return converted == data ? len : (int) strlen(converted);
}

/*
 * Exchange names, routing keys and correlation ids are AMQP short
 * strings.  An ordering
 * key travels as a header value, which could be longer: the same bound
 * keeps it usable as a consistent-hash exchange's input, in an index of
 * the consumer's, and in a log line.
 */
typedef enum ShortField
{
	FIELD_EXCHANGE,
	FIELD_ROUTING_KEY,
	FIELD_ORDERING_KEY,
	FIELD_CORRELATION_ID
} ShortField;

static void
check_short_string(text *value, ShortField field)
{
	int			len = utf8_length(VARDATA_ANY(value), VARSIZE_ANY_EXHDR(value));

	if (len > MQTX_SHORTSTR_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
				 field == FIELD_EXCHANGE ?
				 errmsg("exchange name of mqtx message is too long") :
				 field == FIELD_ROUTING_KEY ?
				 errmsg("routing key of mqtx message is too long") :
				 field == FIELD_CORRELATION_ID ?
				 errmsg("correlation id of mqtx message is too long") :
				 errmsg("ordering key of mqtx message is too long"),
				 field == FIELD_ORDERING_KEY ?
				 errdetail("It is %d bytes; mqtx allows at most %d.",
						   len, MQTX_SHORTSTR_MAX) :
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

/*
 * The headers as they will be sent, mqtx's own among them: the caller's
 * were checked for reserved names before mqtx added its own.
 */
static void
check_headers(Jsonb *headers)
{
	char	   *reason;

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
static pg_uuid_t
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
 * The columns an enqueue fills; every other column takes its default.  The
 * ordering and schedule columns came in 0.8.0: an outbox of an earlier
 * version (the library is new, ALTER EXTENSION UPDATE not run yet) takes
 * messages without a key or a schedule, and refuses the others.
 */
typedef enum OutboxColumn
{
	COLUMN_MESSAGE_ID,
	COLUMN_EXCHANGE,
	COLUMN_ROUTING_KEY,
	COLUMN_PAYLOAD,
	COLUMN_HEADERS,
	COLUMN_ORDERING_KEY,
	COLUMN_DELIVER_AT,
	COLUMN_NEXT_ATTEMPT_AT,
	NUM_FILLED_COLUMNS
} OutboxColumn;

#define FIRST_ORDERING_COLUMN COLUMN_ORDERING_KEY

typedef struct FilledColumn
{
	const char *name;
	Oid			type;
} FilledColumn;

static const FilledColumn filled_columns[NUM_FILLED_COLUMNS] = {
	[COLUMN_MESSAGE_ID] = {"message_id", UUIDOID},
	[COLUMN_EXCHANGE] = {"exchange", TEXTOID},
	[COLUMN_ROUTING_KEY] = {"routing_key", TEXTOID},
	[COLUMN_PAYLOAD] = {"payload", JSONBOID},
	[COLUMN_HEADERS] = {"headers", JSONBOID},
	[COLUMN_ORDERING_KEY] = {"ordering_key", TEXTOID},
	[COLUMN_DELIVER_AT] = {"deliver_at", TIMESTAMPTZOID},
	[COLUMN_NEXT_ATTEMPT_AT] = {"next_attempt_at", TIMESTAMPTZOID},
};

/*
 * What this backend knows of mqtx.outbox, from its relcache entry: whether
 * rows can be inserted directly and, if so, what an INSERT would compute
 * for them, compiled once: each column's default (the id's is its
 * sequence's nextval) and the CHECK constraints.  Any change to the table
 * (columns, defaults, constraints, triggers, rules, policies, DROP)
 * invalidates the relcache entry, and with it this.
 */
typedef struct OutboxShape
{
	Oid			relid;			/* InvalidOid: nothing known */
	bool		direct;
	const char *why_not;		/* when not direct, for the DEBUG message */
	MemoryContext context;		/* holds the compiled expressions */
	bool		has_ordering;	/* the 0.8.0 columns are there */
	int			natts;
	int			filled_attno[NUM_FILLED_COLUMNS];	/* 0-based; -1: none */
	ExprState **defaults;		/* per attribute; NULL: filled, or none */
	int			nchecks;
	ExprState **checks;
	char	  **check_names;
} OutboxShape;

static OutboxShape known_outbox = {InvalidOid};
static bool outbox_callback_registered = false;

static void
forget_known_outbox(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == known_outbox.relid)
		known_outbox.relid = InvalidOid;
}

static bool
is_user_function(Oid function, void *context)
{
	return function >= FirstNormalObjectId;
}

/*
 * Whether an expression calls a function (or an operator's function) that
 * is not built in.  The direct insert runs the table's expressions with
 * the caller's search_path, which built-in code does not consult; code
 * that someone created might, so a table with any goes through SQL.
 */
static bool
calls_user_code(Node *node, void *context)
{
	if (node == NULL)
		return false;
	if (check_functions_in_node(node, is_user_function, context))
		return true;
	return expression_tree_walker(node, calls_user_code, context);
}

/*
 * Whether an index's definition or its access method, operator families
 * or support functions are anything but built in.
 */
static bool
index_runs_user_code(Relation index)
{
	int			nsupport = index->rd_indam->amsupport;

	if (index->rd_rel->relam >= FirstNormalObjectId ||
		calls_user_code((Node *) RelationGetIndexExpressions(index), NULL) ||
		calls_user_code((Node *) RelationGetIndexPredicate(index), NULL))
		return true;
	for (int k = 0; k < index->rd_index->indnkeyatts; k++)
	{
		if (index->rd_opfamily[k] >= FirstNormalObjectId)
			return true;
		for (int p = 0; p < nsupport; p++)
			if (index->rd_support[k * nsupport + p] >= FirstNormalObjectId)
				return true;
	}
	return false;
}

/*
 * Why rows cannot be inserted into the table directly, or NULL: what an
 * INSERT would run that the direct insert does not (triggers, rules, row
 * security, partition constraints, generated columns), an index whose
 * definition or operator classes are not built in, or one of the filled
 * columns missing or of another type.  Records where the filled columns
 * are in shape->filled_attno.
 */
static const char *
direct_insert_obstacle(Relation rel, OutboxShape *shape)
{
	TupleDesc	desc = RelationGetDescr(rel);
	List	   *indexes;
	ListCell   *lc;
	const char *obstacle = NULL;

	if (rel->rd_rel->relkind != RELKIND_RELATION || rel->rd_rel->relispartition)
		return "it is not a plain table";
	if (rel->trigdesc != NULL)
		return "it has triggers";
	if (rel->rd_rules != NULL)
		return "it has rules";
	if (rel->rd_rel->relrowsecurity)
		return "it has row security";
	if (desc->constr != NULL && desc->constr->has_generated_stored)
		return "it has generated columns";
	for (int c = 0; c < FIRST_ORDERING_COLUMN; c++)
		if (shape->filled_attno[c] < 0)
			return "a column mqtx fills is missing or of another type";

	indexes = RelationGetIndexList(rel);
	foreach(lc, indexes)
	{
		Relation	index = index_open(lfirst_oid(lc), AccessShareLock);

		if (index_runs_user_code(index))
			obstacle = "an index runs code that is not built in";
		index_close(index, AccessShareLock);
		if (obstacle != NULL)
			break;
	}
	list_free(indexes);
	return obstacle;
}

/*
 * Compile each column's default and each CHECK constraint into shape's
 * context, as the executor would for an INSERT; false, with shape->why_not
 * set, if one calls code that is not built in.
 */
static bool
compile_outbox_expressions(Relation rel, OutboxShape *shape)
{
	TupleDesc	desc = RelationGetDescr(rel);
	TupleConstr *constr = desc->constr;

	shape->natts = desc->natts;
	shape->defaults = palloc0(sizeof(ExprState *) * desc->natts);
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		bool		filled = false;
		Expr	   *expr;

		/* next_attempt_at is filled only for a scheduled message */
		for (int c = 0; c < NUM_FILLED_COLUMNS; c++)
			filled |= shape->filled_attno[c] == i && c != COLUMN_NEXT_ATTEMPT_AT;
		if (att->attisdropped || filled)
			continue;
		expr = (Expr *) build_column_default(rel, i + 1);
		if (expr == NULL)
			continue;
		if (calls_user_code((Node *) expr, NULL))
		{
			shape->why_not = "a column's default calls code that is not built in";
			return false;
		}
		shape->defaults[i] = ExecInitExpr(expression_planner(expr), NULL);
	}

	shape->nchecks = constr ? constr->num_check : 0;
	shape->checks = palloc0(sizeof(ExprState *) * Max(shape->nchecks, 1));
	shape->check_names = palloc0(sizeof(char *) * Max(shape->nchecks, 1));
	for (int i = 0; i < shape->nchecks; i++)
	{
		Expr	   *check = stringToNode(constr->check[i].ccbin);

		if (calls_user_code((Node *) check, NULL))
		{
			shape->why_not = "a CHECK constraint calls code that is not built in";
			return false;
		}
		shape->checks[i] = ExecInitCheck(list_make1(expression_planner(check)), NULL);
		shape->check_names[i] = pstrdup(constr->check[i].ccname);
	}
	return true;
}

/*
 * Where the filled columns are (-1: missing or of another type), and
 * whether the ordering and schedule columns are all there.
 */
static void
find_filled_columns(Relation rel, OutboxShape *shape)
{
	TupleDesc	desc = RelationGetDescr(rel);

	shape->has_ordering = true;
	for (int c = 0; c < NUM_FILLED_COLUMNS; c++)
	{
		AttrNumber	attno = get_attnum(RelationGetRelid(rel), filled_columns[c].name);

		shape->filled_attno[c] = -1;
		if (attno > 0 && TupleDescAttr(desc, attno - 1)->atttypid == filled_columns[c].type)
			shape->filled_attno[c] = attno - 1;
		else if (c >= FIRST_ORDERING_COLUMN)
			shape->has_ordering = false;
	}
}

static void
learn_outbox(Relation rel)
{
	OutboxShape *shape = &known_outbox;
	MemoryContext old;

	if (!outbox_callback_registered)
	{
		CacheRegisterRelcacheCallback(forget_known_outbox, (Datum) 0);
		outbox_callback_registered = true;
	}
	if (shape->context != NULL)
		MemoryContextDelete(shape->context);
	memset(shape, 0, sizeof(*shape));
	shape->context = AllocSetContextCreate(CacheMemoryContext, "mqtx outbox shape",
										   ALLOCSET_SMALL_SIZES);
	/* set first: an invalidation that arrives while learning clears it */
	shape->relid = RelationGetRelid(rel);

	find_filled_columns(rel, shape);
	shape->why_not = direct_insert_obstacle(rel, shape);
	if (shape->why_not == NULL)
	{
		old = MemoryContextSwitchTo(shape->context);
		shape->direct = compile_outbox_expressions(rel, shape);
		MemoryContextSwitchTo(old);
	}
	ereport(DEBUG1,
			(errmsg_internal("mqtx: rows are inserted into mqtx.outbox %s%s",
							 shape->direct ? "directly" : "through SQL: ",
							 shape->direct ? "" : shape->why_not)));
}

/*
 * The values an INSERT of the filled columns would store: the defaults
 * of the others, then the NOT NULL and CHECK constraints, checked as
 * ExecConstraints does.
 */
static void
form_outbox_row(Relation rel, OutboxShape *shape, TupleTableSlot *slot,
				ExprContext *econtext, Datum *filled, bool *filled_null)
{
	TupleDesc	desc = RelationGetDescr(rel);

	ExecClearTuple(slot);
	for (int i = 0; i < shape->natts; i++)
	{
		slot->tts_isnull[i] = true;
		if (shape->defaults[i] != NULL)
			slot->tts_values[i] = ExecEvalExprSwitchContext(shape->defaults[i], econtext,
															&slot->tts_isnull[i]);
	}
	/* an outbox before 0.8.0 lacks the ordering columns */
	for (int c = 0; c < NUM_FILLED_COLUMNS; c++)
		if (shape->filled_attno[c] >= 0 &&
			!(c == COLUMN_NEXT_ATTEMPT_AT && filled_null[c]))
		{
			slot->tts_values[shape->filled_attno[c]] = filled[c];
			slot->tts_isnull[shape->filled_attno[c]] = filled_null[c];
		}
	ExecStoreVirtualTuple(slot);

	for (int i = 0; i < shape->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		if (att->attnotnull && slot->tts_isnull[i] && !att->attisdropped)
			ereport(ERROR,
					(errcode(ERRCODE_NOT_NULL_VIOLATION),
					 errmsg("null value in column \"%s\" of relation \"%s\" violates not-null constraint",
							NameStr(att->attname), RelationGetRelationName(rel)),
					 errtablecol(rel, i + 1)));
	}
	econtext->ecxt_scantuple = slot;
	for (int i = 0; i < shape->nchecks; i++)
		if (!ExecCheck(shape->checks[i], econtext))
			ereport(ERROR,
					(errcode(ERRCODE_CHECK_VIOLATION),
					 errmsg("new row for relation \"%s\" violates check constraint \"%s\"",
							RelationGetRelationName(rel), shape->check_names[i]),
					 errtableconstraint(rel, shape->check_names[i])));
}

/*
 * The values of the filled columns, for the direct insert and the SQL
 * path alike.  A message not scheduled leaves next_attempt_at to its
 * default (now(), unless the owner changed it): it is marked NULL here.
 */
static void
filled_values(pg_uuid_t *message_id, OutboxMessage *msg, Datum *values, bool *isnull)
{
	memset(isnull, false, sizeof(bool) * NUM_FILLED_COLUMNS);
	values[COLUMN_MESSAGE_ID] = UUIDPGetDatum(message_id);
	values[COLUMN_EXCHANGE] = PointerGetDatum(msg->exchange);
	values[COLUMN_ROUTING_KEY] = PointerGetDatum(msg->routing_key);
	values[COLUMN_PAYLOAD] = JsonbPGetDatum(msg->payload);
	values[COLUMN_HEADERS] = PointerGetDatum(msg->headers);
	isnull[COLUMN_HEADERS] = msg->headers == NULL;
	values[COLUMN_ORDERING_KEY] = PointerGetDatum(msg->ordering_key);
	isnull[COLUMN_ORDERING_KEY] = msg->ordering_key == NULL;
	values[COLUMN_DELIVER_AT] = TimestampTzGetDatum(msg->deliver_at);
	isnull[COLUMN_DELIVER_AT] = !msg->scheduled;
	values[COLUMN_NEXT_ATTEMPT_AT] = TimestampTzGetDatum(msg->deliver_at);
	isnull[COLUMN_NEXT_ATTEMPT_AT] = !msg->scheduled;
}

/*
 * Insert the row as the executor's INSERT would, without planning a
 * statement or compiling the table's expressions for it (they were
 * compiled once, above): defaults, constraints, then the heap insert and
 * the executor's own index maintenance, so whatever indexes the table
 * has, unique checks included, are kept.  The table's expressions and
 * index code run as its owner, in a security-restricted operation, as in
 * the SQL path; they are all built in, so the caller's search_path cannot
 * change what they do.
 */
static void
insert_outbox_row_directly(Relation rel, pg_uuid_t *message_id, OutboxMessage *msg)
{
	EState	   *estate = CreateExecutorState();
	ResultRelInfo *target = makeNode(ResultRelInfo);
	TupleTableSlot *slot = MakeSingleTupleTableSlot(RelationGetDescr(rel),
													&TTSOpsVirtual);
	Datum		filled[NUM_FILLED_COLUMNS];
	bool		filled_null[NUM_FILLED_COLUMNS];
	Oid			saved_user;
	int			saved_context;
	List	   *recheck;

	filled_values(message_id, msg, filled, filled_null);

	GetUserIdAndSecContext(&saved_user, &saved_context);
	SetUserIdAndSecContext(rel->rd_rel->relowner,
						   saved_context | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);

	InitResultRelInfo(target, rel, 1, NULL, 0);
	ExecOpenIndices(target, false);
	form_outbox_row(rel, &known_outbox, slot, GetPerTupleExprContext(estate),
					filled, filled_null);
	simple_table_tuple_insert(rel, slot);
#if PG_VERSION_NUM >= 160000
	recheck = ExecInsertIndexTuples(target, slot, estate, false, false, NULL, NIL, false);
#else
	recheck = ExecInsertIndexTuples(target, slot, estate, false, false, NULL, NIL);
#endif
	/* deferred unique checks come with a constraint trigger: SQL path */
	if (recheck != NIL)
		elog(ERROR, "mqtx.outbox has a deferred index constraint but no trigger for it");

	/* on error, transaction abort restores the identity */
	SetUserIdAndSecContext(saved_user, saved_context);
	ExecCloseIndices(target);
	ExecDropSingleTupleTableSlot(slot);
	FreeExecutorState(estate);
}

/*
 * The SQL path, for an outbox with something the direct insert does not
 * run (see direct_insert_obstacle): an INSERT run as the owner, so that
 * all of it runs.  An outbox of a version before 0.8.0 gets only the
 * columns it has.
 */
static void
insert_outbox_row_with_sql(Relation rel, pg_uuid_t *message_id, OutboxMessage *msg)
{
	Oid			argtypes[NUM_FILLED_COLUMNS];
	Datum		values[NUM_FILLED_COLUMNS];
	bool		isnull[NUM_FILLED_COLUMNS];
	char		nulls[NUM_FILLED_COLUMNS];
	InsertStatement statement = !known_outbox.has_ordering ? INSERT_UNORDERED :
	msg->scheduled ? INSERT_SCHEDULED : INSERT_ORDERED;
	MqtxIdentity saved;
	int			rc;

	filled_values(message_id, msg, values, isnull);
	for (int c = 0; c < NUM_FILLED_COLUMNS; c++)
	{
		argtypes[c] = filled_columns[c].type;
		nulls[c] = isnull[c] ? 'n' : ' ';
	}

	/* nothing the caller put on search_path runs with the owner's rights */
	mqtx_become(&saved, rel->rd_rel->relowner, "pg_catalog, pg_temp", true);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	rc = mqtx_execute_prepared(&insert_plans[statement], insert_sql[statement],
							   insert_nargs[statement], argtypes, values, nulls);
	if (rc != SPI_OK_INSERT || SPI_processed != 1)
		elog(ERROR, "inserting into mqtx.outbox failed: %s",
			 SPI_result_code_string(rc));
	SPI_finish();

	/* on error, transaction abort restores both */
	mqtx_restore_identity(&saved);
}

/*
 * mqtx.outbox, opened by name without a privilege check (callers need
 * none on the table or its schema), and what this backend knows of it.
 */
static Relation
open_outbox(LOCKMODE lockmode)
{
	Oid			relid = get_relname_relid("outbox", get_namespace_oid("mqtx", true));
	Relation	rel = OidIsValid(relid) ? try_table_open(relid, lockmode) : NULL;

	if (rel == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("mqtx.outbox does not exist"),
				 errhint("Run CREATE EXTENSION mqtx in this database.")));
	if (relid != known_outbox.relid)
		learn_outbox(rel);
	return rel;
}

/*
 * Messages of one key are published in the order of their outbox ids;
 * for that to be the order in which their transactions committed, no two
 * transactions may enqueue for the same key at once.  The second waits,
 * on a lock held to the end of the first, as it would on a row lock of
 * the aggregate the key names.  Keys are told apart by a 64-bit hash: two
 * keys that share one only wait for each other.
 *
 * A transaction that enqueues for many keys (a bulk INSERT through a
 * keyed trigger) would fill the shared lock table with one lock a key.
 * Past KEY_LOCKS_PER_TRANSACTION it takes the database's key lock,
 * exclusively, instead: every keyed enqueue holds that one in share mode
 * beside its key's, so the one exclusive holder stands for all its keys.
 */
#define KEY_LOCKS_PER_TRANSACTION 64

static LocalTransactionId keys_locked_in = InvalidLocalTransactionId;
static int	keys_locked = 0;

static void
set_key_lock_tag(LOCKTAG *tag, uint64 hash)
{
	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId, (uint32) (hash >> 32), (uint32) hash,
						 ORDERING_KEY_LOCK_CLASS);
}

static void
lock_ordering_key(text *key)
{
	LOCKTAG		tag;
	LOCKTAG		all_keys;
#if PG_VERSION_NUM >= 170000
	LocalTransactionId lxid = MyProc->vxid.lxid;
#else
	LocalTransactionId lxid = MyProc->lxid;
#endif

	if (keys_locked_in != lxid)
	{
		keys_locked_in = lxid;
		keys_locked = 0;
	}
	/* hash 0 stands for every key of the database; a key's has bit 0 set */
	set_key_lock_tag(&all_keys, 0);
	if (++keys_locked > KEY_LOCKS_PER_TRANSACTION)
	{
		(void) LockAcquire(&all_keys, ExclusiveLock, false, false);
		return;
	}
	(void) LockAcquire(&all_keys, ShareLock, false, false);
	set_key_lock_tag(&tag, hash_bytes_extended((const unsigned char *) VARDATA_ANY(key),
											   VARSIZE_ANY_EXHDR(key), 0) | 1);
	(void) LockAcquire(&tag, ExclusiveLock, false, false);
}

/*
 * Insert one outbox row and return its message id, allocated in the
 * caller's memory context.  The insert runs as the table's owner.
 */
static Datum
insert_outbox_row(OutboxMessage *msg)
{
	pg_uuid_t  *message_id = palloc(sizeof(pg_uuid_t));
	Relation	rel = open_outbox(RowExclusiveLock);

	if ((msg->ordering_key != NULL || msg->scheduled) && !known_outbox.has_ordering)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("mqtx.outbox has no ordering_key and deliver_at columns"),
				 errdetail("Ordering keys and scheduled messages need mqtx 0.8.0; the library is newer than the extension installed in this database."),
				 errhint("Run ALTER EXTENSION mqtx UPDATE.")));
	if (msg->ordering_key != NULL)
		lock_ordering_key(msg->ordering_key);

	*message_id = mqtx_new_message_id();
	if (known_outbox.direct)
		insert_outbox_row_directly(rel, message_id, msg);
	else
		insert_outbox_row_with_sql(rel, message_id, msg);
	table_close(rel, NoLock);

	mqtx_wake_relay_at_commit();
	return UUIDPGetDatum(message_id);
}

static Datum
enqueue_message(OutboxMessage *msg)
{
	check_short_string(msg->exchange, FIELD_EXCHANGE);
	check_short_string(msg->routing_key, FIELD_ROUTING_KEY);
	if (msg->ordering_key != NULL)
		check_short_string(msg->ordering_key, FIELD_ORDERING_KEY);
	if (msg->correlation_id != NULL)
	{
		check_short_string(msg->correlation_id, FIELD_CORRELATION_ID);
		require_nonempty(msg->correlation_id, "correlation_id");
	}
	if (msg->causation_id != NULL)
		require_nonempty(msg->causation_id, "causation_id");
	check_payload_size(msg->payload);
	check_reserved_headers(msg->headers);
	msg->headers = mqtx_headers_with_context(msg->headers, msg->correlation_id,
											 msg->causation_id);
	check_headers(msg->headers);
	return insert_outbox_row(msg);
}

/*
 * When a message given deliver_at or delay is to be sent.  A time already
 * past means at once; infinity, or a delay that goes back, is a mistake.
 */
static TimestampTz
delivery_time(FunctionCallInfo fcinfo, int deliver_at_arg, int delay_arg)
{
	TimestampTz deliver_at;

	if (!PG_ARGISNULL(deliver_at_arg) && !PG_ARGISNULL(delay_arg))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("mqtx.publish() takes deliver_at or delay, not both")));
	if (!PG_ARGISNULL(delay_arg))
	{
		Interval   *delay = PG_GETARG_INTERVAL_P(delay_arg);
		Interval	zero;

		memset(&zero, 0, sizeof(zero));
		if (DatumGetBool(DirectFunctionCall2(interval_lt, IntervalPGetDatum(delay),
											 IntervalPGetDatum(&zero))))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("delay of mqtx.publish() must not be negative")));
		deliver_at = DatumGetTimestampTz(DirectFunctionCall2(timestamptz_pl_interval,
															 TimestampTzGetDatum(GetCurrentTransactionStartTimestamp()),
															 IntervalPGetDatum(delay)));
	}
	else
		deliver_at = PG_GETARG_TIMESTAMPTZ(deliver_at_arg);
	if (TIMESTAMP_NOT_FINITE(deliver_at))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("delivery time of mqtx message must be finite")));
	return deliver_at;
}

/*
 * mqtx.publish(exchange, routing_key, payload, headers, ordering_key,
 *				deliver_at, delay, correlation_id, causation_id) returns uuid
 *
 * Not STRICT: a NULL argument is a mistake worth an error, not a silent
 * NULL result with nothing enqueued.  The definition of mqtx 0.7.0 and
 * before has the first four arguments only, that of 0.8.0 and 0.9.0 the
 * first seven.
 */
Datum
mqtx_publish(PG_FUNCTION_ARGS)
{
	OutboxMessage msg = {0};

	require_argument(PG_ARGISNULL(0), "exchange");
	require_argument(PG_ARGISNULL(1), "routing_key");
	require_argument(PG_ARGISNULL(2), "payload");

	msg.exchange = PG_GETARG_TEXT_PP(0);
	msg.routing_key = PG_GETARG_TEXT_PP(1);
	msg.payload = PG_GETARG_JSONB_P(2);
	msg.headers = PG_ARGISNULL(3) ? NULL : PG_GETARG_JSONB_P(3);
	if (PG_NARGS() >= 7)
	{
		msg.ordering_key = PG_ARGISNULL(4) ? NULL : PG_GETARG_TEXT_PP(4);
		msg.scheduled = !PG_ARGISNULL(5) || !PG_ARGISNULL(6);
		if (msg.scheduled)
			msg.deliver_at = delivery_time(fcinfo, 5, 6);
	}
	if (PG_NARGS() >= 9)
	{
		msg.correlation_id = PG_ARGISNULL(7) ? NULL : PG_GETARG_TEXT_PP(7);
		msg.causation_id = PG_ARGISNULL(8) ? NULL : PG_GETARG_TEXT_PP(8);
	}
	PG_RETURN_DATUM(enqueue_message(&msg));
}

/*
 * mqtx.outbox_trigger() works only as an AFTER INSERT ... FOR EACH ROW
 * trigger with the exchange and routing key as its first two arguments.
 */
static void
check_trigger_usage(TriggerData *trigdata)
{
	TriggerEvent event = trigdata->tg_event;
	const char *trigger = trigdata->tg_trigger->tgname;
	const char *table = RelationGetRelationName(trigdata->tg_relation);
	int			nargs = trigdata->tg_trigger->tgnargs;

	if (!TRIGGER_FIRED_AFTER(event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("mqtx.outbox_trigger() must be fired AFTER INSERT"),
				 TRIGGER_FIRED_BEFORE(event) ?
				 errdetail("Trigger \"%s\" on \"%s\" is a BEFORE trigger.",
						   trigger, table) :
				 errdetail("Trigger \"%s\" on \"%s\" is an INSTEAD OF trigger.",
						   trigger, table),
				 errhint(TRIGGER_USAGE_HINT)));
	if (!TRIGGER_FIRED_FOR_ROW(event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("mqtx.outbox_trigger() must be fired FOR EACH ROW"),
				 errdetail("Trigger \"%s\" on \"%s\" is a statement-level trigger.",
						   trigger, table),
				 errhint(TRIGGER_USAGE_HINT)));
	if (!TRIGGER_FIRED_BY_INSERT(event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("mqtx.outbox_trigger() must be fired by INSERT only"),
				 TRIGGER_FIRED_BY_UPDATE(event) ?
				 errdetail("Trigger \"%s\" on \"%s\" was fired by UPDATE.",
						   trigger, table) :
				 TRIGGER_FIRED_BY_DELETE(event) ?
				 errdetail("Trigger \"%s\" on \"%s\" was fired by DELETE.",
						   trigger, table) :
				 errdetail("Trigger \"%s\" on \"%s\" was fired by TRUNCATE.",
						   trigger, table),
				 errhint(TRIGGER_USAGE_HINT)));
	if (nargs < 2)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("mqtx.outbox_trigger() takes the exchange and the routing key, then optionally the columns that make the ordering key"),
				 errdetail_plural("Trigger \"%s\" on \"%s\" passes %d argument.",
								  "Trigger \"%s\" on \"%s\" passes %d arguments.",
								  nargs, trigger, table, nargs),
				 errhint(TRIGGER_USAGE_HINT)));
}

/*
 * The ordering key of a row, from the columns the trigger's arguments
 * after the second name: one column's value as text, or several joined by
 * KEY_COLUMN_SEPARATOR (two tuples that join the same only wait for each
 * other).  NULL when there are none, or every one is NULL.
 */
static text *
row_ordering_key(TriggerData *trigdata)
{
	Trigger    *trigger = trigdata->tg_trigger;
	TupleDesc	desc = RelationGetDescr(trigdata->tg_relation);
	StringInfoData key;
	bool		any = false;

	if (trigger->tgnargs <= 2)
		return NULL;
	initStringInfo(&key);
	for (int i = 2; i < trigger->tgnargs; i++)
	{
		int			attno = SPI_fnumber(desc, trigger->tgargs[i]);
		char	   *value;

		if (attno <= 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_COLUMN),
					 errmsg("column \"%s\" named by trigger \"%s\" as an ordering key column does not exist in table \"%s\"",
							trigger->tgargs[i], trigger->tgname,
							RelationGetRelationName(trigdata->tg_relation)),
					 errhint(TRIGGER_USAGE_HINT)));
		if (i > 2)
			appendStringInfoChar(&key, KEY_COLUMN_SEPARATOR);
		value = SPI_getvalue(trigdata->tg_trigtuple, desc, attno);
		if (value != NULL)
		{
			appendStringInfoString(&key, value);
			any = true;
		}
	}
	return any ? cstring_to_text_with_len(key.data, key.len) : NULL;
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
 * mqtx.outbox_trigger(exchange, routing_key [, key_column ...]): AFTER
 * INSERT FOR EACH ROW, enqueues the new row, as a JSON object, in the
 * inserting transaction, with the ordering key its key columns make.
 */
Datum
mqtx_outbox_trigger(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	TupleDesc	tupdesc;
	RowToJsonbCache *cache;
	Datum		row;
	char	  **args;
	OutboxMessage msg = {0};

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

	msg.exchange = cstring_to_text(args[0]);
	msg.routing_key = cstring_to_text(args[1]);
	msg.payload = DatumGetJsonbP(FunctionCall1(&cache->to_jsonb, row));
	msg.ordering_key = row_ordering_key(trigdata);
	enqueue_message(&msg);
	return PointerGetDatum(NULL);
}

/*
 * mqtx.cancel: the relays' claims are fenced by time, not by a list of
 * rows.  Before a claim reads the outbox, its relay raises the claim
 * horizon (shared.c) to the claim's now(); the claim takes only rows due
 * by then, and skips rows locked by a session.  So once a cancel holds a
 * row's lock, no claim that starts later takes it, and one that already
 * read it had raised the horizon past the row's due time.  A row due
 * after the horizon, then, has never been claimed, and is not on its way.
 * So is a failed one: the relay records refusals only of messages whose
 * fate it knows (see record_decided), so no copy is on its way.  Clocks
 * matter: a horizon is a time of this server's clock (see
 * mqtx_claim_horizon for a promoted standby).
 */
static const char *const cancel_lock_sql =
"SELECT o.id, o.status, o.next_attempt_at"
"  FROM mqtx.outbox o"
" WHERE o.message_id = $1 AND o.status IN ('pending', 'failed')"
"   FOR UPDATE OF o";

static const char *const cancel_delete_sql =
"DELETE FROM mqtx.outbox WHERE id = $1";

static SPIPlanPtr cancel_lock_plan = NULL;
static SPIPlanPtr cancel_delete_plan = NULL;

/*
 * Lock the message's row and decide whether it can be withdrawn; if so,
 * delete it.  Returns whether it did.  In the caller's subtransaction,
 * as the outbox's owner.
 */
static bool
withdraw_message(Datum message_id)
{
	Oid			uuid_type = UUIDOID;
	Oid			id_type = INT8OID;
	HeapTuple	row;
	TupleDesc	desc;
	bool		isnull;
	Datum		id;
	bool		failed;
	TimestampTz due;

	if (mqtx_execute_prepared(&cancel_lock_plan, cancel_lock_sql, 1, &uuid_type,
							  &message_id, NULL) != SPI_OK_SELECT)
		elog(ERROR, "locking the outbox row of a message to cancel failed");
	if (SPI_processed == 0)
		return false;
	row = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	id = SPI_getbinval(row, desc, 1, &isnull);
	failed = strcmp(SPI_getvalue(row, desc, 2), "failed") == 0;
	due = DatumGetTimestampTz(SPI_getbinval(row, desc, 3, &isnull));

	/* the lock is held: only now is the horizon worth reading */
	if (!failed && due <= mqtx_claim_horizon())
		return false;
	if (mqtx_execute_prepared(&cancel_delete_plan, cancel_delete_sql, 1, &id_type,
							  &id, NULL) != SPI_OK_DELETE || SPI_processed != 1)
		elog(ERROR, "deleting the outbox row of a cancelled message failed");
	return true;
}

/*
 * mqtx.cancel(message_id uuid) returns boolean
 *
 * Withdraws the message in the caller's transaction, by deleting its row
 * (rolled back with the transaction, the message stays).  The row's lock
 * is kept only when the message is withdrawn: one that may be on its way
 * is left unlocked, in a subtransaction rolled back, so that the relay can
 * record its outcome without waiting for the caller to commit.
 */
Datum
mqtx_cancel(PG_FUNCTION_ARGS)
{
	MemoryContext context = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	Relation	rel;
	Oid			outbox_owner;
	MqtxIdentity saved;
	volatile bool withdrawn = false;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("argument \"message_id\" of mqtx.cancel() must not be NULL")));
	rel = open_outbox(RowExclusiveLock);
	if (!known_outbox.has_ordering)
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("mqtx.cancel() needs mqtx 0.8.0"),
				 errhint("Run ALTER EXTENSION mqtx UPDATE.")));
	outbox_owner = rel->rd_rel->relowner;
	table_close(rel, NoLock);

	/*
	 * The owner's identity is taken inside the subtransaction, so that its
	 * end, whichever it is, gives the caller's back: an error caught by the
	 * caller's own exception block must not leave it the outbox owner.
	 */
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(context);
	PG_TRY();
	{
		mqtx_become(&saved, outbox_owner, "pg_catalog, pg_temp", true);
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		withdrawn = withdraw_message(PG_GETARG_DATUM(0));
		SPI_finish();
		mqtx_restore_identity(&saved);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(context);
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(context);
		CurrentResourceOwner = owner;
		PG_RE_THROW();
	}
	PG_END_TRY();
	if (withdrawn)
		ReleaseCurrentSubTransaction();
	else
		RollbackAndReleaseCurrentSubTransaction();
	MemoryContextSwitchTo(context);
	CurrentResourceOwner = owner;
	PG_RETURN_BOOL(withdrawn);
}

/*
 * mqtx.max_payload bounds what sessions may enqueue; PGC_SUSET, so that an
 * application role can't raise its own limit.
 */
void
mqtx_outbox_define_settings(void)
{
	DefineCustomIntVariable("mqtx.max_payload",
							"Largest message body mqtx accepts, as JSON text.",
							NULL,
							&mqtx_max_payload,
							1024 * 1024,
							1024,
							128 * 1024 * 1024,
							PGC_SUSET,
							GUC_UNIT_BYTE,
							NULL, NULL, NULL);
}
