# mqtx: PGXS build.  The version is defined once, in mqtx.control.

EXTENSION = mqtx

MODULE_big = mqtx
OBJS = src/mqtx.o src/shared.o src/broker.o src/broker_fields.o src/broker_publish.o src/broker_consume.o src/outbox.o src/statements.o src/digest.o src/launcher.o src/standby.o src/worker.o src/relay.o src/consumer.o src/apply_workers.o src/key_lock.o src/crash_guard.o src/identity.o src/log_redact.o src/message_context.o

# SQL scripts, in src/sql: mqtx.sql is the source of the current version,
# whose install script mqtx--$(EXTVERSION).sql is made from it (a copy);
# every released version's install script stays as it was released, with
# the upgrade scripts mqtx--<old>--<new>.sql between them.
#
# Every change to the SQL objects makes a new version.  To go from <old> to <new>:
#  1. freeze <old>: cp src/sql/mqtx.sql src/sql/mqtx--<old>.sql, point the
#     line in .gitignore at mqtx--<new>.sql, and commit both;
#  2. set default_version = '<new>' in mqtx.control (the only place the
#     version is defined);
#  3. change src/sql/mqtx.sql, write src/sql/mqtx--<old>--<new>.sql making the
#     same changes, and a pg_regress test that fills <old> and updates it.
EXTVERSION := $(shell sed -n "s/^default_version *= *'\([^']*\)'.*/\1/p" $(EXTENSION).control)
ifeq ($(EXTVERSION),)
$(error no default_version in $(EXTENSION).control)
endif
DATA_built = src/sql/$(EXTENSION)--$(EXTVERSION).sql
DATA = $(filter-out $(DATA_built),$(wildcard src/sql/$(EXTENSION)--*.sql))

# Symbols are hidden but for what the backend looks up by name (declared
# PGDLLEXPORT: _PG_init, the worker mains, the SQL functions), as PGXS does
# from PostgreSQL 16 on.  Exported, every mqtx_ function would be visible
# to every library a backend loads, and a second copy of mqtx.so (loaded
# by another path) would call into the first one's.
PG_CPPFLAGS = -fvisibility=hidden '-DPGDLLEXPORT=__attribute__((visibility("default")))' \
	-Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers \
	$(shell pkg-config --cflags librabbitmq openssl)
SHLIB_LINK = $(shell pkg-config --libs librabbitmq openssl)

# pg_regress: sql/*.sql against expected/*.out, in a private instance that
# preloads mqtx (initdb refuses root: run the tests as a normal user).
REGRESS = $(patsubst sql/%.sql,%,$(sort $(wildcard sql/*.sql)))
REGRESS_OPTS = --temp-instance=./tmp_check_regress --temp-config=./test/regress.conf

# TAP: test/t/*.pl, with the harness modules under test/perl.
TAP_TESTS = 1
PROVE_TESTS = $(sort $(wildcard test/t/*.pl))

EXTRA_CLEAN = tmp_check_regress test/tools/amqp_tool test/bench/ceiling_publisher \
	test/bench/raw_consumer test/bench/perrow_relay

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# (after PGXS, which resets it)
PROVE_FLAGS += -I ./test/perl --timer

# PGXS does not track headers: any change to one rebuilds every part.
$(OBJS): $(wildcard src/*.h)

# The current version's install script (make clean removes it, as PGXS does
# every DATA_built file)
$(DATA_built): src/sql/$(EXTENSION).sql
	cp $< $@

# The TAP tests inspect and inject AMQP messages with a small rabbitmq-c tool.
.PHONY: test-tools
test-tools:
	$(MAKE) -C test/tools
installcheck: test-tools

# Formatting: `make indent` formats the C sources as pgindent formats
# PostgreSQL's, with the type names in src/typedefs.list; `make typedefs`
# remakes that list after new types (test/tools/indent.sh says how to get
# pg_bsd_indent).  A formatted tree is left unchanged by `make indent`.
INDENT_FILES = $(sort $(wildcard src/*.c src/*.h test/tools/*.c test/bench/*.c test/bench/*.h))
.PHONY: indent typedefs
indent:
	test/tools/indent.sh indent $(INDENT_FILES)
typedefs:
	TYPEDEF_CFLAGS="-I. -I$(includedir_server) -I$(includedir) $(shell pkg-config --cflags librabbitmq openssl)" \
		test/tools/indent.sh typedefs $(INDENT_FILES) > src/typedefs.list
