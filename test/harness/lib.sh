# shellcheck shell=bash
# Sourced by the harness scripts, the benchmarks (test/bench/servers.sh) and
# the demo (examples/demo.sh): the one place that says where PostgreSQL's
# programs are and how a free loopback port is found.
#
#   pg_bindir                 prints the directory of initdb, pg_ctl, psql,
#                             pgbench: pg_config's when it has a server,
#                             PostgreSQL 15's (Debian's path) otherwise
#   free_ports N [PORT...]    prints N distinct free TCP ports of 127.0.0.1,
#                             none of the given ones

pg_bindir() {
	local dir
	if command -v pg_config >/dev/null 2>&1 && dir=$(pg_config --bindir) &&
		[ -x "$dir/initdb" ]; then
		echo "$dir"
	else
		echo /usr/lib/postgresql/15/bin
	fi
}

# The kernel picks each port (bind to port 0); every socket stays open until
# all N are chosen, so it cannot hand out the same port twice.  Ports
# 35672-35682 are left out: rabbitmqctl's own distribution listener takes
# one of those, and RabbitMQ nodes run next to the clusters.
free_ports() {
	local n=$1
	shift
	perl -MIO::Socket::INET -e '
		my ($n, @excl) = @ARGV;
		my %skip = map { $_ => 1 } (@excl, 35672 .. 35682);
		my (@socks, @ports);
		for (my $try = 0; @ports < $n; $try++) {
			die "cannot find free ports\n" if $try > 1000;
			my $s = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => 0,
				Proto => "tcp", Listen => 1) or die "bind: $!\n";
			my $p = $s->sockport;
			next if $skip{$p}++;
			push @socks, $s;
			push @ports, $p;
		}
		print "@ports\n";' "$n" "$@"
}
