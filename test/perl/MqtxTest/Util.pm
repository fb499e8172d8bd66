# Helpers shared by the mqtx TAP tests: PostgreSQL nodes that preload mqtx,
# bounded waits, and the AMQP test tool.
package MqtxTest::Util;

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

use Exporter qw(import);
our @EXPORT = qw(mqtx_node wait_for wait_until wait_queue_exists wait_queue_drained
  amqp_tool amqp_publish_args amqp_publish amqp_publish_many amqp_messages
  message_body relay_pid);

# Servers listen on 127.0.0.1 TCP, like a deployment, not on a socket dir.
$PostgreSQL::Test::Utils::use_unix_sockets = 0;

my $tool = abs_path(dirname(__FILE__) . '/../../tools') . '/amqp_tool';

# A started PostgreSQL node with mqtx preloaded and short worker timings.
# Extra settings are appended verbatim (name => value, value unquoted).
sub mqtx_node
{
	my ($name, %settings) = @_;
	my %conf = (
		shared_preload_libraries => "'mqtx'",
		'mqtx.database' => "'postgres'",
		'mqtx.poll_interval' => "'200ms'",
		'mqtx.retry_base' => "'100ms'",
		'mqtx.retry_max' => "'1s'",
		'mqtx.connect_timeout' => "'2s'",
		'mqtx.confirm_timeout' => "'5s'",
		log_min_messages => 'info',
		# the test framework turns it off; the relay-kill tests need it
		restart_after_crash => 'on',
		%settings);
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init;
	$node->append_conf('postgresql.conf',
		join('', map { "$_ = $conf{$_}\n" } sort keys %conf));
	$node->start;
	return $node;
}

# Poll until the query returns the expected text; fail the test (and stop
# waiting) after the harness timeout.
sub wait_for
{
	my ($node, $db, $query, $expected, $what) = @_;
	my $ok = $node->poll_query_until($db, $query, $expected);
	ok($ok, $what) or diag("last result: " . $node->safe_psql($db, $query));
	return $ok;
}

# Poll a Perl condition until it holds or the harness timeout passes.
sub wait_until
{
	my ($what, $cond) = @_;
	my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
	while (time < $deadline)
	{
		return ok(1, $what) if $cond->();
		usleep(200_000);
	}
	return ok(0, $what);
}

sub wait_queue_exists
{
	my ($url, $queue) = @_;
	wait_until("queue $queue exists on the broker",
		sub { defined eval { amqp_tool('count', '--url', $url, '--queue', $queue) } });
}

# Nothing ready and nothing unacked: every delivery was acked.
sub wait_queue_drained
{
	my ($mq, $queue, $what) = @_;
	my $depth;
	wait_until($what // "queue $queue is drained (all acked)",
		sub { $depth = $mq->queue_depth($queue); defined $depth && $depth == 0 })
	  or diag("queue $queue depth: " . ($depth // 'no queue'));
}

# Run the AMQP test tool; returns stdout, dies on failure.
sub amqp_tool
{
	my @args = @_;
	my ($stdout, $stderr);
	IPC::Run::run([ $tool, @args ], '>', \$stdout, '2>', \$stderr)
	  or die "amqp_tool @args failed: $stderr";
	return $stdout;
}

# Arguments of one confirmed, persistent publish to the default exchange,
# routed to $queue.  %o: id (message_id; none if absent), body or
# body_file, headers (list of "k=v"), repeat.
sub amqp_publish_args
{
	my ($url, $queue, %o) = @_;
	my @args = ('publish', '--url', $url, '--routing-key', $queue,
		'--persistent');
	push @args, '--message-id', $o{id} if defined $o{id};
	push @args, '--header', $_ for @{ $o{headers} // [] };
	push @args, '--repeat', $o{repeat} if $o{repeat};
	if (defined $o{body_file})
	{
		push @args, '--body-file', $o{body_file};
	}
	else
	{
		push @args, '--body', $o{body};
	}
	return @args;
}

sub amqp_publish
{
	my ($url, $queue, %o) = @_;
	return amqp_tool(amqp_publish_args($url, $queue, %o));
}

# Publish many [message_id, body] pairs, one confirmed publish each.  One
# process at a time: the broker's connection setup is the cost, and
# parallel connections do not make it cheaper.
sub amqp_publish_many
{
	my ($url, $queue, @messages) = @_;
	for my $m (@messages)
	{
		system($tool, amqp_publish_args($url, $queue, id => $m->[0], body => $m->[1])) == 0
		  or die "amqp_tool publish $m->[0] failed (status $?)";
	}
}

# Every message in a queue, as hashes decoded from the tool's JSON lines.
sub amqp_messages
{
	my ($url, $queue, $max) = @_;
	my $out = amqp_tool('get', '--url', $url, '--queue', $queue,
		'--count', $max // 100000);
	require JSON::PP;
	return [ map { JSON::PP::decode_json($_) } grep { /\S/ } split /\n/, $out ];
}

# A message's body, decoded from JSON (the tool already decoded the line's
# UTF-8, so the body is a character string).
sub message_body
{
	my ($message) = @_;
	return JSON::PP->new->decode($message->{body});
}

sub relay_pid
{
	my ($node, $db) = @_;
	return $node->safe_psql('postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'mqtx relay'"
		  . " AND datname = '$db'");
}

1;
