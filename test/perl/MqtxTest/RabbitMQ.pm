=pod

=head1 NAME

MqtxTest::RabbitMQ - throwaway RabbitMQ nodes for mqtx TAP tests

=head1 SYNOPSIS

  use lib 'test/perl';
  use MqtxTest::RabbitMQ;

  # Before any test: skip_all, with the reason, when RabbitMQ is missing.
  MqtxTest::RabbitMQ->skip_all_unless_installed;

  my $mq = MqtxTest::RabbitMQ->new(name => 'mq1');   # not started yet
  $mq->start;                                      # dies with the reason
  my $url = $mq->url;          # amqp://guest:guest@127.0.0.1:PORT/%2f
  $mq->add_user('mqtx', 'secret');
  $mq->declare_queue('orders');
  is($mq->queue_depth('orders'), 0);
  my $q = $mq->queue_columns('messages_ready', 'messages_unacknowledged');
  my ($ready, $unacked) = @{ $q->{orders} };      # no key: no such queue
  my $body = $mq->get_message('orders');         # undef when empty
  $mq->set_memory_alarm(1);                        # block publishers
  my @states = $mq->connection_states;             # ('blocked', ...)
  $mq->set_memory_alarm(0);
  $mq->kill;  $mq->start;                          # same port, data kept
  $mq->stop;                                       # also done at exit

  # A TLS listener: extra rabbitmq.conf lines, applied at each start.
  my $tls_port = PostgreSQL::Test::Cluster::get_free_port();
  my $tq = MqtxTest::RabbitMQ->new(name => 'tls', extra_conf => <<"EOC");
  listeners.ssl.1 = 127.0.0.1:$tls_port
  ssl_options.cacertfile = $dir/ca.crt
  ssl_options.certfile = $dir/server.crt
  ssl_options.keyfile = $dir/server.key
  EOC
  $tq->start;
  my $amqps = $tq->amqps_url;   # amqps://guest:guest@localhost:TLSPORT/%2f
  $tq->stop;  $tq->set_extra_conf($other_lines);  $tq->start;

  # A cluster of 3 nodes, all on 127.0.0.1 and sharing one epmd; started
  # (all at once; dies with the reasons) unless start => 0 is given.
  my @mq = MqtxTest::RabbitMQ->new_cluster(name => 'qc', size => 3);
  my ($n1, $n2, $n3) = @mq;        # seed first; each an object as above
                                   # (url, port, ctl, kill, start, stop, ...)
  my $urls = $n1->cluster_urls;    # "amqp://guest:guest@127.0.0.1:P1/%2f,..."
  my @peers = $n1->cluster_nodes;  # the node objects of its cluster (@mq)
  my @names = $n1->running_nodes;  # sorted node names from its
                                   # cluster_status (in scalar context: count)
  $n1->node_name;                  # 'mqtx_..._NNN@localhost' (after start)
  $n1->env_value('ERL_EPMD_PORT'); # a variable of its DIR/env
  $n1->os_pid;                     # pid of its beam; undef while down
  $n1->declare_queue('qq', quorum => 1);  # durable, x-queue-type quorum
  $n1->declare_queue('q2', durable => 1, arguments => { 'x-max-length' => 10 });
  my $leader = $n2->queue_leader('qq');   # a node name
  my @members = $n2->queue_members('qq'); # sorted node names
  my $info = $n2->queue_info('qq');       # { type, leader, members, online }
  my $node = $n2->node_by_name($leader);  # the object of that node
  $node->kill;  $node->start;      # comes back into the same cluster
  MqtxTest::RabbitMQ->stop_nodes(@mq);    # all at once; also done at exit
  MqtxTest::RabbitMQ->start_nodes(@mq);   # all at once, after such a stop

=head1 DESCRIPTION

All the work is done by test/harness/rabbitmq.sh; this module only wraps it,
so the shell script stays the single source of truth for how a node is run.

A cluster's members are ordinary node objects that know their seed (the
first node): their start passes C<--join SEED_DIR>, which rabbitmq.sh
honours once (the first boot joins; later boots rejoin from mnesia).  A
member that was stopped or killed can be started again on its own while
another node of its cluster runs; after a stop of the whole cluster, start
it again with C<start_nodes> (all nodes at once: each waits for its peers).
Keep all the node objects: one that is dropped stops its node (DESTROY), and
the others know their peers only weakly.  Queue counts from C<rabbitmqctl
list_queues> (C<queue_depth> and friends) are metrics that a quorum queue
publishes with a lag, so right after a restart they can read 0: count with
AMQP (Util.pm's queue_count) instead.

=cut

package MqtxTest::RabbitMQ;

use strict;
use warnings FATAL => 'all';

use Carp qw(croak);
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Path qw(make_path);
use File::Temp ();
use IPC::Run ();
use JSON::PP ();
use Scalar::Util qw(weaken);

our $SCRIPT = abs_path(dirname(__FILE__) . '/../../harness/rabbitmq.sh');

# Nodes still running (or being started), by dir.  Keyed by dir (not
# object) so that the END block can stop them even after the objects are
# gone.
my %running;

# Only the process that started a node may stop it: a forked child that
# exits normally must not take the test's nodes down with it.
my $owner_pid = $$;

# A test file that runs a broker calls this first: without RabbitMQ where
# rabbitmq.sh runs it from ("rabbitmq.sh check" says), the file is skipped,
# with the reason, instead of failing.
sub skip_all_unless_installed
{
	my ($class) = @_;
	my ($rc, $out, $err) = $class->_script('check');
	return if $rc == 0;
	my $why = join(' ', grep { /\S/ } split /\n/, "$out$err");
	require Test::More;
	Test::More::plan(skip_all => "RabbitMQ is not installed: $why"
		  . ' (test/install_deps.sh installs it)');
	return;
}

sub new
{
	my ($class, %args) = @_;
	my $name = $args{name} // 'rabbitmq';
	croak "bad node name '$name'" unless $name =~ /^[A-Za-z0-9_]+$/;
	my $dir = $args{dir} // _tempdir($name);
	make_path($dir);
	# Absolute, so a later chdir in the test cannot lose the node.
	$dir = abs_path($dir);
	# seed_dir: the directory of the seed node of this node's cluster
	my $self = bless { name => $name, dir => $dir, port => undef,
		tls_ports => [], seed_dir => $args{seed_dir} }, $class;
	$self->set_extra_conf($args{extra_conf}) if defined $args{extra_conf};
	return $self;
}

# The node objects of a cluster of $args{size} (default 3) nodes named
# NAME_1 .. NAME_N; NAME_1 is the seed the others join.  Started (see
# start_nodes) unless start => 0.
sub new_cluster
{
	my ($class, %args) = @_;
	my $name = delete $args{name} // 'cluster';
	my $size = delete $args{size} // 3;
	my $start = delete $args{start} // 1;
	croak "bad cluster size '$size'" unless $size =~ /^[1-9][0-9]*$/;
	croak "unknown new_cluster argument(s): @{[ sort keys %args ]}" if %args;
	croak "new_cluster returns a list of nodes" unless wantarray;
	my @nodes = ($class->new(name => "${name}_1"));
	push @nodes, $class->new(name => "${name}_$_",
		seed_dir => $nodes[0]->dir)
	  for 2 .. $size;
	# Each node knows them all; weakly, or they would never be destroyed.
	my @peers = @nodes;
	weaken($_) for @peers;
	$_->{peers} = \@peers for @nodes;
	$class->start_nodes(@nodes) if $start;
	return @nodes;
}

# Starts the given nodes at the same time and waits for all of them; dies
# with every failure's reason.  On a first start a member waits for its
# seed, so the seed must be among them or already running.
sub start_nodes
{
	my ($class, @nodes) = @_;
	my (@jobs, @errors);
	for my $n (@nodes)
	{
		my ($out, $err) = ('', '');
		$running{ $n->{dir} } = 1;
		my $h = IPC::Run::start([ $SCRIPT, $n->_start_args ],
			'<', \undef, '>', \$out, '2>', \$err);
		push @jobs, [ $n, $h, \$out, \$err ];
	}
	for my $job (@jobs)
	{
		my ($n, $h, $out, $err) = @$job;
		my $rc = eval { $h->finish } ? 0 : (($h->full_result // 256) >> 8 || 1);
		eval { $n->_started($rc, $$out, $$err); 1 } or push @errors, $@;
	}
	die join('', @errors) if @errors;
	return;
}

# Stops the given nodes at the same time; dies if any could not be stopped.
sub stop_nodes
{
	my ($class, @nodes) = @_;
	my @errors = _stop_dirs(map { $_->{dir} } @nodes);
	die join("\n", @errors) if @errors;
	return;
}

# Lines appended to the node's rabbitmq.conf (DIR/extra.conf, see
# rabbitmq.sh) from the next start on; undef or '' drops them.  Paths in it
# must be absolute and readable by the node's user.
sub set_extra_conf
{
	my ($self, $text) = @_;
	my $file = "$self->{dir}/extra.conf";
	if (!defined $text || $text eq '')
	{
		unlink $file or $!{ENOENT} or die "cannot remove $file: $!";
		return;
	}
	open(my $fh, '>', "$file.tmp") or die "cannot write $file.tmp: $!";
	print $fh $text, ($text =~ /\n\z/ ? '' : "\n");
	close($fh) or die "cannot write $file.tmp: $!";
	rename("$file.tmp", $file) or die "cannot rename $file.tmp: $!";
	return;
}

sub _tempdir
{
	my ($name) = @_;
	# PostgreSQL::Test::Utils keeps temp dirs under tmp_check, next to the
	# test's own logs.
	return PostgreSQL::Test::Utils::tempdir("rabbitmq_$name")
	  if defined &PostgreSQL::Test::Utils::tempdir;
	return File::Temp::tempdir("rabbitmq_${name}_XXXX",
		TMPDIR => 1, CLEANUP => 1);
}

sub name { return $_[0]{name} }
sub dir { return $_[0]{dir} }
sub port { return $_[0]{port} }
# The first TLS listener's port (undef if none was configured); tls_ports
# lists them all, as of the last start.
sub tls_port { return $_[0]{tls_ports}[0] }
sub tls_ports { return @{ $_[0]{tls_ports} } }
# The seed's dir for a cluster member (undef for a seed or standalone node).
sub seed_dir { return $_[0]{seed_dir} }

# The node objects of this node's cluster, seed first, itself included
# (just itself for a standalone node); in scalar context, how many.
sub cluster_nodes
{
	my ($self) = @_;
	my @nodes = $self->{peers} ? grep { defined } @{ $self->{peers} } : ($self);
	return @nodes;
}

# The URLs of all the nodes of the cluster, comma-separated, as
# mqtx.broker_url takes them.  %args as for url (user, password, vhost).
sub cluster_urls
{
	my ($self, %args) = @_;
	return join(',', map { $_->url(%args) } $self->cluster_nodes);
}

# The object of the node of this cluster whose node name is $name (undef:
# none).
sub node_by_name
{
	my ($self, $name) = @_;
	return (grep { $_->node_name eq $name } $self->cluster_nodes)[0];
}

# The node's Erlang name (mqtx_..._N@localhost), known from its first start
# on: rabbitmq.sh derives it from the dir and records it in DIR/env.
sub node_name
{
	my ($self) = @_;
	return $self->{node_name} //= $self->env_value('RABBITMQ_NODENAME')
	  // die "no RABBITMQ_NODENAME in $self->{dir}/env\n";
}

# A variable of the node's DIR/env (ERL_EPMD_PORT, RABBITMQ_DIST_PORT, ...;
# see rabbitmq.sh), or undef if it has none; croaks before the first start.
sub env_value
{
	my ($self, $var) = @_;
	my ($rc, $out, $err) = $self->_script('env', $self->{dir});
	croak "RabbitMQ node '$self->{name}' has no env yet (never started):\n$err"
	  if $rc != 0;
	$out =~ /^export \Q$var\E=(.*)$/m or return undef;
	# undo printf %q's backslashes (enough for the values written there)
	(my $value = $1) =~ s/\\(.)/$1/g;
	return $value;
}

# The OS pid of the node's beam, or undef while it is not running.
sub os_pid
{
	my ($self) = @_;
	my ($rc, $out) = $self->_script('pid', $self->{dir});
	return $rc == 0 && $out =~ /^(\d+)$/m ? $1 + 0 : undef;
}

# Run rabbitmq.sh; returns (exit status, stdout, stderr).  A class method
# too (check needs no node).
sub _script
{
	my ($self, @args) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ $SCRIPT, @args ], '<', \undef, '>', \$out, '2>', \$err);
	return ($? >> 8, $out, $err);
}

sub start
{
	my ($self) = @_;
	$running{ $self->{dir} } = 1;
	my ($rc, $out, $err) = $self->_script($self->_start_args);
	return $self->_started($rc, $out, $err);
}

# rabbitmq.sh's arguments for starting this node.
sub _start_args
{
	my ($self) = @_;
	my @args = ('start', $self->{dir});
	push @args, $self->{port} if defined $self->{port};
	push @args, '--join', $self->{seed_dir} if defined $self->{seed_dir};
	return @args;
}

# What rabbitmq.sh start said: take the ports, or die with its reason.
sub _started
{
	my ($self, $rc, $out, $err) = @_;
	# rabbitmq.sh itself cleans up a node that failed to boot.
	die "RabbitMQ node '$self->{name}' failed to start:\n$err" if $rc != 0;
	$out =~ /^AMQP_PORT=(\d+)$/m
	  or die "rabbitmq.sh start printed no AMQP_PORT:\n$out$err";
	$self->{port} = $1;
	$self->{tls_ports} = [ $out =~ /^AMQPS_PORT=(\d+)$/mg ];
	return $self;
}

sub stop
{
	my ($self) = @_;
	my ($rc, undef, $err) = $self->_script('stop', $self->{dir});
	die "stopping RabbitMQ node '$self->{name}' failed:\n$err" if $rc != 0;
	delete $running{ $self->{dir} };
	return;
}

# SIGKILL for fault tests; a later start() reuses port and data.
sub kill
{
	my ($self) = @_;
	my ($rc, undef, $err) = $self->_script('kill', $self->{dir});
	die "killing RabbitMQ node '$self->{name}' failed:\n$err" if $rc != 0;
	# epmd is still up; keep the dir registered so END cleans it up.
	return;
}

sub url
{
	my ($self, %args) = @_;
	croak "RabbitMQ node '$self->{name}' has no port yet (not started)"
	  unless defined $self->{port};
	my $user = $args{user} // 'guest';
	my $password = $args{password} // 'guest';
	my $vhost = $args{vhost} // '/';
	# port: another way in to this node (a proxy in front of it, say)
	my $port = $args{port} // $self->{port};
	return sprintf('amqp://%s:%s@127.0.0.1:%d/%s',
		_esc($user), _esc($password), $port, _esc($vhost));
}

# amqps:// URL of the first TLS listener.  The host defaults to "localhost"
# (what a test certificate names; still loopback, so guest may log in).
sub amqps_url
{
	my ($self, %args) = @_;
	croak "RabbitMQ node '$self->{name}' has no TLS listener (not started,"
	  . " or no listeners.ssl in its extra_conf)"
	  unless defined $self->tls_port;
	my $host = $args{host} // 'localhost';
	my $port = $args{port} // $self->tls_port;
	my $user = $args{user} // 'guest';
	my $password = $args{password} // 'guest';
	my $vhost = $args{vhost} // '/';
	return sprintf('amqps://%s:%s@%s:%d/%s',
		_esc($user), _esc($password), $host, $port, _esc($vhost));
}

# Percent-encode everything but RFC 3986 unreserved characters; lower-case
# hex so that the default vhost comes out as the customary "%2f".
sub _esc
{
	my ($s) = @_;
	$s =~ s/([^A-Za-z0-9\-._~])/sprintf('%%%02x', ord $1)/ge;
	return $s;
}

sub ctl
{
	my ($self, @args) = @_;
	my ($rc, $out, $err) = $self->_script('ctl', $self->{dir}, @args);
	die "rabbitmqctl @args failed (exit $rc):\n$err$out" if $rc != 0;
	return $out;
}

sub add_user
{
	my ($self, $user, $password) = @_;
	$self->ctl('add_user', $user, $password);
	$self->ctl('set_permissions', '-p', '/', $user, '.*', '.*', '.*');
	return;
}

# Number of ready messages in $queue (vhost "/"), or undef if there is no
# such queue.
sub queue_depth
{
	my ($self, $queue) = @_;
	return $self->queue_number($queue, 'messages');
}

# Consumers the broker sees on a queue, or undef if there is no such queue.
sub consumer_count
{
	my ($self, $queue) = @_;
	return $self->queue_number($queue, 'consumers');
}

# One numeric column of rabbitmqctl list_queues for a queue (undef: none).
sub queue_number
{
	my ($self, $queue, $column) = @_;
	my $values = $self->queue_columns($column)->{$queue};
	return defined $values ? $values->[0] : undef;
}

# Columns of rabbitmqctl list_queues (messages_ready, consumers, type,
# ...) for every queue on vhost "/": a hash of queue name => [ the values,
# in the order asked for ], numbers as numbers.  A column's value must not
# hold a tab (list columns such as members are better read by queue_info).
sub queue_columns
{
	my ($self, @columns) = @_;
	my $out = $self->ctl('list_queues', '-q', '--no-table-headers',
		'name', @columns);
	my $line_re = '^(.*)' . ('\t([^\t]*)' x @columns) . '$';
	my %queues;
	for my $line (split /\n/, $out)
	{
		my ($name, @values) = $line =~ /$line_re/ or next;
		$queues{$name} = [ map { /^\d+$/ ? $_ + 0 : $_ } @values ];
	}
	return \%queues;
}

# The memory alarm: on makes the node block every connection that
# publishes (vm_memory_high_watermark 0), off puts the watermark back to
# RabbitMQ's default, 0.4.
sub set_memory_alarm
{
	my ($self, $on) = @_;
	$self->ctl('set_vm_memory_high_watermark', $on ? '0' : '0.4');
	return;
}

# The state of every client connection (running, blocking, blocked, ...),
# as the broker sees them.
sub connection_states
{
	my ($self) = @_;
	my $out = $self->ctl('list_connections', '-q', '--no-table-headers',
		'state');
	return grep { /\S/ } split /\n/, $out;
}

# Names of the exchanges on vhost "/".
sub exchange_names
{
	my ($self) = @_;
	my $out = $self->ctl('list_exchanges', '-q', '--no-table-headers', 'name');
	return grep { /\S/ } split /\n/, $out;
}

sub purge_queue
{
	my ($self, $queue) = @_;
	$self->ctl('purge_queue', $queue);
	return;
}

# Declares $queue on vhost "/" as guest, through this node (so a quorum
# queue's first leader is this node); durable => 1 for a durable queue,
# quorum => 1 for a quorum queue (durable, as they must be), arguments =>
# { 'x-...' => value } for other queue arguments.
sub declare_queue
{
	my ($self, $queue, %args) = @_;
	my %qargs = %{ $args{arguments} // {} };
	if ($args{quorum})
	{
		$qargs{'x-queue-type'} = 'quorum';
		$args{durable} = 1;
	}
	my ($out, $err) = ('', '');
	if (!%qargs)
	{
		my @cmd = ('amqp-declare-queue', '--url=' . $self->url, '-q', $queue);
		push @cmd, '-d' if $args{durable};
		IPC::Run::run(\@cmd, '<', \undef, '>', \$out, '2>', \$err)
		  or die "amqp-declare-queue $queue failed:\n$err";
		return;
	}
	# amqp-declare-queue cannot pass queue arguments; pika (python3-pika,
	# for Debian's python3, hence the path) can.
	my $py = <<'PY';
import json, sys, pika
url, queue, durable, qargs = sys.argv[1], sys.argv[2], sys.argv[3] == "1", json.loads(sys.argv[4])
params = pika.URLParameters(url + "?connection_attempts=1&socket_timeout=10&blocked_connection_timeout=10")
conn = pika.BlockingConnection(params)
conn.channel().queue_declare(queue, durable=durable, arguments=qargs)
conn.close()
PY
	IPC::Run::run(
		[
			'/usr/bin/python3', '-c', $py, $self->url, $queue,
			$args{durable} ? 1 : 0, JSON::PP->new->canonical->encode(\%qargs)
		],
		'<', \undef, '>', \$out, '2>', \$err)
	  or die "declaring queue $queue (arguments "
	  . join(', ', map { "$_ => $qargs{$_}" } sort keys %qargs)
	  . ") failed:\n$err";
	return;
}

# The decoded JSON of rabbitmqctl cluster_status, as this node sees it.
sub cluster_status
{
	my ($self) = @_;
	return JSON::PP::decode_json(
		$self->ctl('cluster_status', '-q', '--formatter', 'json'));
}

# Names of the nodes of this node's cluster that run (itself included),
# sorted; in scalar context, how many.
sub running_nodes
{
	my ($self) = @_;
	my @names = sort @{ $self->cluster_status->{running_nodes} // [] };
	return @names;
}

# What rabbitmqctl list_queues says of $queue (vhost "/"): a hash with type
# ("classic", "quorum", ...), leader (a node name), members and online
# (array refs of node names, sorted), or undef if there is no such queue.
sub queue_info
{
	my ($self, $queue) = @_;
	my $list = JSON::PP::decode_json(
		$self->ctl('list_queues', '-q', '--formatter', 'json',
			'name', 'type', 'leader', 'members', 'online'));
	for my $q (@$list)
	{
		next unless $q->{name} eq $queue;
		# classic queues have '' rather than lists here
		$q->{$_} = [ sort @{ ref $q->{$_} ? $q->{$_} : [] } ]
		  for qw(members online);
		return $q;
	}
	return undef;
}

# The node name of a quorum queue's leader (undef: no such queue).
sub queue_leader
{
	my ($self, $queue) = @_;
	my $info = $self->queue_info($queue) // return undef;
	return $info->{leader};
}

# The node names of a quorum queue's members, sorted (empty: no such queue).
sub queue_members
{
	my ($self, $queue) = @_;
	my $info = $self->queue_info($queue) // return ();
	return @{ $info->{members} };
}

# Takes one message off $queue (auto-ack, as guest); returns its body, or
# undef if the queue is empty.
sub get_message
{
	my ($self, $queue) = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'amqp-get', '--url=' . $self->url, '-q', $queue ],
		'<', \undef, '>', \$out, '2>', \$err);
	my $rc = $? >> 8;
	return $out if $rc == 0;
	# amqp-get exits 2 without any output for an empty queue; a missing
	# queue or a connection problem is exit 1 with a message.
	return undef if $rc == 2 && $err eq '';
	die "amqp-get $queue failed (exit $rc):\n$err";
}

sub DESTROY
{
	my ($self) = @_;
	return unless $$ == $owner_pid && $running{ $self->{dir} // '' };
	local ($@, $?, $!);
	eval { $self->stop };
	return;
}

# Stop the nodes in these dirs, all at once (a stop takes seconds, mostly
# waiting); returns the error messages of those that failed.  The nodes of
# a cluster share an epmd, which the last of them to stop takes down
# (rabbitmq.sh sees to that), so stopping them together is safe.
sub _stop_dirs
{
	my (@dirs) = @_;
	my (@jobs, @errors);
	for my $dir (@dirs)
	{
		my ($out, $err) = ('', '');
		my $h = eval {
			IPC::Run::start([ $SCRIPT, 'stop', $dir ],
				'<', \undef, '>', \$out, '2>', \$err);
		};
		if (!$h)
		{
			push @errors, "could not run rabbitmq.sh stop $dir: $@";
			next;
		}
		push @jobs, [ $dir, $h, \$err ];
	}
	for my $job (@jobs)
	{
		my ($dir, $h, $err) = @$job;
		if (eval { $h->finish })
		{
			delete $running{$dir};
		}
		else
		{
			push @errors, "could not stop RabbitMQ node in $dir:\n${$err}$@";
		}
	}
	return @errors;
}

# Runs before File::Temp's END (this module loads File::Temp first, and END
# blocks run in reverse order), so the node is down before its dir goes.
# A node that only got as far as being started is stopped too (stop of a
# node that is not running does nothing), and so is a killed one: its dir
# stays registered.
END
{
	if ($$ == $owner_pid)
	{
		local ($@, $?, $!);
		warn "$_\n" for _stop_dirs(sort keys %running);
		%running = ();
	}
}

1;
