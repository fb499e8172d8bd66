# mqtx: PGXS build.  The version is defined once, in mqtx.control.

EXTENSION = mqtx

MODULE_big = mqtx
OBJS = src/mqtx.o src/shared.o src/broker.o src/outbox.o src/worker.o src/relay.o src/consumer.o src/crash_guard.o src/identity.o src/log_redact.o
# every release's install script stays, with the upgrade scripts between them
DATA = $(wildcard $(EXTENSION)--*.sql)

PG_CPPFLAGS = -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers \
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

# Every part includes the shared header; PGXS does not track it.
$(OBJS): src/mqtx.h

# The TAP tests inspect and inject AMQP messages with a small rabbitmq-c tool.
.PHONY: test-tools
test-tools:
	$(MAKE) -C test/tools
installcheck: test-tools
