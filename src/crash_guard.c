/*-------------------------------------------------------------------------
 *
 * crash_guard.c
 *	  What the consumer remembers across its own deaths, so that a message
 *	  that kills the process cannot do it for ever.
 *
 * Errors never take the consumer down (consumer.c catches them at the
 * delivery, the batch or the pass).  What is left is a death no handler
 * can catch: a crash in some extension's C code, the kernel's OOM killer,
 * a FATAL.  The broker then hands the unacknowledged deliveries out again
 * and, left alone, the consumer would die on the same message over and
 * over, taking every other queue of the database with it.
 *
 * So before each batch the consumer writes down, in a small file of its
 * own, that it is applying, and which delivery when it applies only one;
 * after the batch, that it is not.  A consumer that starts and finds
 * "applying" knows how its predecessor ended: after a batch it applies the
 * next deliveries one per transaction, to find the culprit; after a single
 * delivery it counts a death against that message, and once a message has
 * MQTX_DEATHS_BEFORE_QUARANTINE, it is dead-lettered the next time it
 * comes, without being applied.  The file lives in the data directory and
 * is not synced: a process's death leaves the page cache intact, and an
 * operating-system crash is no message's doing.  An exit that runs the
 * exit callbacks (a shutdown, SIGTERM, a FATAL error) writes "idle", and
 * so does SIGQUIT, which the postmaster sends to every process when
 * another one crashed: only the consumer's own death (a crash, SIGKILL)
 * counts.  A delivery is written down as a SHA-256 digest of its queue and
 * dedupe key, compared exactly, and its key cut short for the log line.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/file_perm.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "postmaster/interrupt.h"
#include "utils/builtins.h"
#include "storage/fd.h"
#include "storage/ipc.h"
#include "utils/memutils.h"

#include "crash_guard.h"
#include "digest.h"

#define GUARD_DIRECTORY "pg_mqtx"

/* The record, as lines: state, deliveries, deaths, digest, queue, key */
#define GUARD_RECORD_MAX 2048
#define GUARD_LOGGED_MAX 200	/* of the queue and the key */

static const char idle_record[] = "idle\n";

static int	guard_fd = -1;
static char *guard_path = NULL;
static pqsigfunc previous_sigquit = NULL;

/* What the previous consumer of this database left */
static MqtxCrashRecord previous;

static void
write_record(const char *record)
{
	size_t		len = strlen(record);

	if (guard_fd < 0)
		return;
	/* a record that cannot be written leaves the guard off, not the worker */
	if (pwrite(guard_fd, record, len, 0) != (ssize_t) len ||
		ftruncate(guard_fd, len) != 0)
	{
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("mqtx consumer: could not write \"%s\": %m", guard_path),
				 errdetail("A message that kills the consumer will not be quarantined.")));
		close(guard_fd);
		guard_fd = -1;
	}
}

/*
 * Strings of the record are at most a short string's length; longer ones
 * (a hex: key) are cut, which only makes two keys that share their start
 * compare equal, and a death be counted against a sibling.
 */
static void
parse_record(char *record_text)
{
	char	   *state = strtok(record_text, "\n");
	char	   *deliveries = strtok(NULL, "\n");
	char	   *deaths = strtok(NULL, "\n");
	char	   *digest = strtok(NULL, "\n");
	char	   *queue = strtok(NULL, "\n");
	char	   *key = strtok(NULL, "\n");

	memset(&previous, 0, sizeof(previous));
	if (state == NULL || strcmp(state, "applying") != 0 || deliveries == NULL || deaths == NULL)
		return;
	previous.died_applying = true;
	previous.deliveries = atoi(deliveries);
	previous.deaths = atoi(deaths);
	if (previous.deliveries == 1 && digest != NULL && strlen(digest) == 64)
	{
		previous.digest = MemoryContextStrdup(TopMemoryContext, digest);
		previous.queue = MemoryContextStrdup(TopMemoryContext, queue ? queue : "?");
		previous.key = MemoryContextStrdup(TopMemoryContext, key ? key : "?");
	}
}

/*
 * The postmaster's SIGQUIT after another process's crash: the consumer is
 * not the one that died.  pwrite is async-signal-safe.
 */
static void
guard_sigquit(SIGNAL_ARGS)
{
	if (guard_fd >= 0 && pwrite(guard_fd, idle_record, sizeof(idle_record) - 1, 0) < 0)
	{
		/* nothing to be done about it here */
	}
	previous_sigquit(postgres_signal_arg);
}

/*
 * The identity of a delivery in the record: hex SHA-256 of queue, NUL, key.
 */
char *
mqtx_crash_guard_digest(const char *queue, const char *key)
{
	size_t		queue_len = strlen(queue) + 1;
	size_t		key_len = strlen(key);
	char	   *both = palloc(queue_len + key_len);

	memcpy(both, queue, queue_len);
	memcpy(both + queue_len, key, key_len);
	return mqtx_sha256_hex(both, queue_len + key_len);
}

/* A string for the log line: cut short, without line breaks */
static void
append_loggable(StringInfo out, const char *s)
{
	for (int i = 0; s[i] != '\0' && i < GUARD_LOGGED_MAX; i++)
		appendStringInfoChar(out, s[i] == '\n' || s[i] == '\r' ? ' ' : s[i]);
	appendStringInfoChar(out, '\n');
}

static void
guard_exit(int code, Datum arg)
{
	mqtx_crash_guard_idle();
}

/*
 * Open the record of this database's consumer, or of one of its apply
 * workers (process: "consumer", "apply<number>"), and read what the
 * previous process in that place left.
 */
const MqtxCrashRecord *
mqtx_crash_guard_open(const char *process)
{
	char		record_text[GUARD_RECORD_MAX + 1];
	ssize_t		len;

	if (MakePGDirectory(GUARD_DIRECTORY) < 0 && errno != EEXIST)
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("mqtx consumer: could not create directory \"%s\": %m", GUARD_DIRECTORY)));
	guard_path = MemoryContextStrdup(TopMemoryContext,
									 psprintf("%s/%s_%u", GUARD_DIRECTORY, process, MyDatabaseId));
	guard_fd = open(guard_path, O_RDWR | O_CREAT | O_CLOEXEC | PG_BINARY, pg_file_create_mode);
	if (guard_fd < 0)
	{
		ereport(WARNING,
				(errcode_for_file_access(),
				 errmsg("mqtx consumer: could not open \"%s\": %m", guard_path),
				 errdetail("A message that kills the consumer will not be quarantined.")));
		memset(&previous, 0, sizeof(previous));
		return &previous;
	}
	len = pread(guard_fd, record_text, GUARD_RECORD_MAX, 0);
	record_text[Max(len, 0)] = '\0';
	parse_record(record_text);
	write_record(idle_record);
	before_shmem_exit(guard_exit, 0);
	previous_sigquit = pqsignal(SIGQUIT, guard_sigquit);
	return &previous;
}

/*
 * About to apply "deliveries" deliveries; for a single one, which, and how
 * many consumers died applying it before.
 */
void
mqtx_crash_guard_applying(int deliveries, const char *queue, const char *key, int deaths)
{
	StringInfoData record;

	initStringInfo(&record);
	appendStringInfo(&record, "applying\n%d\n%d\n", deliveries, deaths);
	if (deliveries == 1 && queue != NULL && key != NULL)
	{
		appendStringInfo(&record, "%s\n", mqtx_crash_guard_digest(queue, key));
		append_loggable(&record, queue);
		append_loggable(&record, key);
	}
	write_record(record.data);
	pfree(record.data);
}

/* The batch is settled: a death from now on is not the batch's doing. */
void
mqtx_crash_guard_idle(void)
{
	write_record(idle_record);
}
