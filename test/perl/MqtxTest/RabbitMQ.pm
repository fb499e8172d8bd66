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

=head1 DESCRIPTION

All the work is done by test/harness/rabbitmq.sh; this module only wraps it,
so the shell script stays the single source of truth for how a node is run.

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

our $SCRIPT = abs_path(dirname(__FILE__) . '/../../harness/rabbitmq.sh');

# Nodes still running, by dir.  Keyed by dir (not object) so that the END
# block can stop them even after the objects are gone.
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
	my $self = bless { name => $name, dir => $dir, port => undef,
		tls_ports => [] }, $class;
	$self->set_extra_conf($args{extra_conf}) if defined $args{extra_conf};
	return $self;
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
	my @port = defined $self->{port} ? ($self->{port}) : ();
	my ($rc, $out, $err) = $self->_script('start', $self->{dir}, @port);
	# rabbitmq.sh itself cleans up a node that failed to boot.
	die "RabbitMQ node '$self->{name}' failed to start:\n$err" if $rc != 0;
	$out =~ /^AMQP_PORT=(\d+)$/m
	  or die "rabbitmq.sh start printed no AMQP_PORT:\n$out$err";
	$self->{port} = $1;
	$self->{tls_ports} = [ $out =~ /^AMQPS_PORT=(\d+)$/mg ];
	$running{ $self->{dir} } = 1;
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

# Numeric columns of rabbitmqctl list_queues (messages_ready, consumers,
# ...) for every queue on vhost "/": a hash of queue name => [ the values,
# in the order asked for ].
sub queue_columns
{
	my ($self, @columns) = @_;
	my $out = $self->ctl('list_queues', '-q', '--no-table-headers',
		'name', @columns);
	my $line_re = '^(.*)' . ('\t(\d+)' x @columns) . '$';
	my %queues;
	for my $line (split /\n/, $out)
	{
		my ($name, @values) = $line =~ /$line_re/ or next;
		$queues{$name} = [ map { $_ + 0 } @values ];
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

# Declares $queue on vhost "/" as guest; durable => 1 for a durable queue.
sub declare_queue
{
	my ($self, $queue, %args) = @_;
	my @cmd = ('amqp-declare-queue', '--url=' . $self->url, '-q', $queue);
	push @cmd, '-d' if $args{durable};
	my ($out, $err) = ('', '');
	IPC::Run::run(\@cmd, '<', \undef, '>', \$out, '2>', \$err)
	  or die "amqp-declare-queue $queue failed:\n$err";
	return;
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

# Runs before File::Temp's END (this module loads File::Temp first, and END
# blocks run in reverse order), so the node is down before its dir goes.
END
{
	if ($$ == $owner_pid)
	{
		local ($@, $?, $!);
		for my $dir (sort keys %running)
		{
			my ($out, $err) = ('', '');
			IPC::Run::run([ $SCRIPT, 'stop', $dir ],
				'<', \undef, '>', \$out, '2>', \$err)
			  or warn "could not stop RabbitMQ node in $dir:\n$err";
		}
		%running = ();
	}
}

1;
