#!/usr/bin/env bash
# Build mqtx, install it, and run every test: pg_regress (SQL surface) and
# the TAP suite (workers against real PostgreSQL and RabbitMQ servers that
# the tests start on 127.0.0.1 and stop again).
#
#   test/run_all.sh          (as root; a sudoer: sudo test/run_all.sh)
#
# initdb refuses to run as root, so as root the tests run as the postgres
# user, in a copy of the tree that user owns.
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
cd "$src"

"$src/test/install_deps.sh"

make -s clean
make -s COPT=-Werror
if [ "$(id -u)" -eq 0 ]; then
	make -s install
else
	sudo make -s install
fi

workdir=$src
if [ "$(id -u)" -eq 0 ]; then
	workdir=$(mktemp -d /tmp/mqtx-tests.XXXXXX)
	cp -a "$src/." "$workdir/"
	chown -R postgres: "$workdir"
	as_tester=(runuser -u postgres --)
else
	as_tester=()
fi

cd "$workdir"
status=0
"${as_tester[@]}" make installcheck || status=$?
if [ $status -ne 0 ]; then
	[ -f regression.diffs ] && cat regression.diffs
	for log in tmp_check/log/*; do
		[ -f "$log" ] || continue
		echo "=== $log (last 60 lines)"
		tail -n 60 "$log"
	done
	echo "tests failed; their files are in $workdir" >&2
	exit $status
fi
[ "$workdir" != "$src" ] && rm -rf "$workdir"
echo "all tests passed"
