=pod

=head1 NAME

MqtxTest::DelayProxy - a slow link to the broker for mqtx TAP tests

=head1 SYNOPSIS

  use MqtxTest::DelayProxy;

  # broker -> client bytes arrive 300 ms late, in order
  my $proxy = MqtxTest::DelayProxy->new(target_port => $mq->port,
      down_delay_ms => 300);
  my $url = $mq->url(port => $proxy->port);   # the slow way in
  $proxy->set_delay(down => 1500);    # from now on
  $proxy->stop;                       # also done at exit

=head1 DESCRIPTION

Runs test/tools/delay_proxy.py (/usr/bin/python3, stdlib only) on
127.0.0.1 and waits until it listens.  The proxy exits by itself when its
standard input closes, so it cannot outlive the test.

=cut

package MqtxTest::DelayProxy;

use strict;
use warnings FATAL => 'all';

use Carp qw(croak);
use Cwd qw(abs_path);
use File::Basename qw(dirname);
use IPC::Run ();
use Time::HiRes qw(time usleep);

our $SCRIPT = abs_path(dirname(__FILE__) . '/../../tools') . '/delay_proxy.py';
my $python = '/usr/bin/python3';

my %live;
my $owner_pid = $$;

sub new
{
	my ($class, %args) = @_;
	croak 'target_port is required' unless $args{target_port};
	my @cmd = ($python, $SCRIPT, '--target', $args{target_port},
		'--port', $args{port} // 0,
		'--down-delay-ms', $args{down_delay_ms} // 300,
		'--up-delay-ms', $args{up_delay_ms} // 0,
		'--max-seconds', $args{max_seconds} // 900);
	my ($in, $out, $err) = ('', '', '');
	my $h = IPC::Run::start(\@cmd, '<', \$in, '>', \$out, '2>', \$err);
	my $deadline = time + 20;
	while ($out !~ /^PORT=(\d+)$/m)
	{
		if (!$h->pumpable || time > $deadline)
		{
			$h->kill_kill;
			die "delay_proxy did not start:\n$out$err";
		}
		$h->pump_nb;
		usleep(20_000);
	}
	my $self = bless { harness => $h, port => ($out =~ /^PORT=(\d+)$/m)[0],
		in => \$in, out => \$out, err => \$err }, $class;
	$live{"$self"} = $h;
	return $self;
}

sub port { return $_[0]{port} }

# Change a direction's delay ('down' or 'up') for the bytes that arrive
# from now on; returns once the proxy has taken it.
sub set_delay
{
	my ($self, $direction, $ms) = @_;
	my $h = $self->{harness};
	${ $self->{in} } .= "$direction $ms\n";
	my $deadline = time + 10;
	while (${ $self->{out} } !~ /^DELAY \Q$direction=$ms\E$/m)
	{
		croak "delay_proxy did not take the new delay" if time > $deadline;
		$h->pump_nb;
		usleep(10_000);
	}
	${ $self->{out} } =~ s/^DELAY .*\n//mg;
	return;
}

# What the proxy wrote to stderr so far (connection problems).
sub errors
{
	my ($self) = @_;
	$self->{harness}->pump_nb if $self->{harness}->pumpable;
	return ${ $self->{err} };
}

sub stop
{
	my ($self) = @_;
	my $h = delete $live{"$self"} or return;
	# SIGTERM, then SIGKILL if it has not gone within 5 s
	$h->kill_kill(grace => 5);
	return;
}

sub DESTROY
{
	my ($self) = @_;
	return unless $$ == $owner_pid;
	local ($@, $?, $!);
	$self->stop;
}

END
{
	if ($$ == $owner_pid)
	{
		local ($@, $?, $!);
		$_->kill_kill for values %live;
		%live = ();
	}
}

1;
