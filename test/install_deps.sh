#!/usr/bin/env bash
# Install the Debian packages mqtx needs to build, test and run its demo.
# Safe to run again: apt-get skips what is already installed.
#
#   test/install_deps.sh [EXTRA_PACKAGE ...]   (the benchmarks add theirs)
set -euo pipefail

packages=(
	build-essential pkg-config
	postgresql-15 postgresql-server-dev-15 postgresql-contrib
	rabbitmq-server librabbitmq-dev libssl-dev amqp-tools openssl
	libipc-run-perl python3-pika
	procps iproute2
	pg-bsd-indent
	"$@"
)

missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
	echo "missing Debian packages: ${missing[*]}" >&2
	echo "run this as root (sudo $0) to install them" >&2
	exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The package's own service is not wanted: tests and the demo start private
# nodes.  policy-rc.d keeps apt from starting it where init scripts run.  A
# policy-rc.d the machine already has is its administrator's: it is left as
# it is, and so is what it allows (a dangling link counts as one: writing
# through it would create its target, and removing it would remove the link).
if [ ! -e /usr/sbin/policy-rc.d ] && [ ! -L /usr/sbin/policy-rc.d ]; then
	printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
	chmod +x /usr/sbin/policy-rc.d
	trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get install -y -qq --no-install-recommends "${missing[@]}"
