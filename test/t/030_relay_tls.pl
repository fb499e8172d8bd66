# The relay over amqps://: a RabbitMQ TLS listener with certificates made
# here by openssl.  The broker's certificate must chain to mqtx.tls_ca_file
# and name the URL's host, unless mqtx.tls_verify_peer is off; a broker that
# requires a client certificate gets mqtx.tls_cert_file/tls_key_file.
# Whatever fails, messages stay pending and go out once the relay can
# connect.
use strict;
use warnings FATAL => 'all';

use IPC::Run ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

# --- certificates: a CA, a server certificate for localhost (DNS and IP
# SAN), a client certificate, a server certificate for another name, and an
# unrelated CA.  EC keys: quick to make.
my $pki = PostgreSQL::Test::Utils::tempdir('tls');

sub openssl
{
	my @args = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'openssl', @args ], '<', \undef, '>', \$out, '2>', \$err)
	  or die "openssl @args failed:\n$err";
	return $out;
}

my @new_key = ('-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
	'-nodes');

sub make_ca
{
	my ($name, $cn) = @_;
	openssl('req', '-x509', @new_key, '-keyout', "$pki/$name.key",
		'-out', "$pki/$name.crt", '-days', '2', '-subj', "/CN=$cn",
		'-addext', 'basicConstraints=critical,CA:TRUE',
		'-addext', 'keyUsage=critical,keyCertSign,cRLSign');
	return;
}

sub make_leaf
{
	my ($name, $ca, $cn, @ext) = @_;
	open(my $fh, '>', "$pki/$name.ext") or die "cannot write $pki/$name.ext: $!";
	print $fh join("\n", 'basicConstraints=CA:FALSE', @ext), "\n";
	close($fh) or die $!;
	openssl('req', '-new', @new_key, '-keyout', "$pki/$name.key",
		'-out', "$pki/$name.csr", '-subj', "/CN=$cn");
	openssl('x509', '-req', '-in', "$pki/$name.csr", '-CA', "$pki/$ca.crt",
		'-CAkey', "$pki/$ca.key", '-CAcreateserial', '-days', '2',
		'-out', "$pki/$name.crt", '-extfile', "$pki/$name.ext");
	# the fixture itself must be right, or the assertions below mean nothing
	openssl('verify', '-CAfile', "$pki/$ca.crt", "$pki/$name.crt");
	return;
}

make_ca('ca', 'mqtx test CA');
make_ca('other-ca', 'mqtx unrelated CA');
make_leaf('server', 'ca', 'localhost',
	'subjectAltName=DNS:localhost,IP:127.0.0.1', 'extendedKeyUsage=serverAuth');
make_leaf('other-name', 'ca', 'mqtx-other.invalid',
	'subjectAltName=DNS:mqtx-other.invalid', 'extendedKeyUsage=serverAuth');
make_leaf('client', 'ca', 'mqtx-relay', 'extendedKeyUsage=clientAuth');

# --- a broker with a TLS listener (and its plain one, for reading back)
my $tls_port = PostgreSQL::Test::Cluster::get_free_port();

sub tls_conf
{
	my (%o) = @_;
	my $cert = $o{cert} // 'server';
	my $require = $o{require_client_cert} ? 'true' : 'false';
	return <<"EOC";
listeners.ssl.1 = 127.0.0.1:$tls_port
ssl_options.cacertfile = $pki/ca.crt
ssl_options.certfile = $pki/$cert.crt
ssl_options.keyfile = $pki/$cert.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = $require
EOC
}

my $mq = MqtxTest::RabbitMQ->new(name => 'tls', extra_conf => tls_conf());
$mq->start;
is($mq->tls_port, $tls_port, 'the broker listens for TLS on the chosen port');
my $plain = $mq->url;
my $amqps = $mq->amqps_url;    # amqps://guest:guest@localhost:PORT/%2f
my $where = "amqps://localhost:$tls_port";

# DEBUG1 shows each of the relay's connection retries.
my $node = mqtx_node('tls',
	'mqtx.broker_url' => "'$amqps'",
	'mqtx.tls_ca_file' => "'$pki/ca.crt'",
	log_min_messages => 'debug1');
$node->safe_psql('postgres', q{
	CREATE EXTENSION mqtx;
	SELECT mqtx.declare_queue('tls.q');
});

# Wait (bounded) until the server log after $offset matches; returns the
# match's first group, or 1 if it has none; undef on timeout.
sub wait_log
{
	my ($re, $offset) = @_;
	my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
	while (time < $deadline)
	{
		my @m = slurp_file($node->logfile, $offset) =~ $re;
		return (grep { defined } @m)[0] // 1 if @m;
		usleep(100_000);
	}
	return undef;
}

# Apply settings (name => value) with ALTER SYSTEM and a reload, and return
# the relay's next connection outcome under them: 'connected', or the DETAIL
# of its "unavailable" WARNING.  Any change of the URL or of a TLS setting
# makes the relay log that it reconnects, and then one of those two lines.
# (Values are set explicitly: RESET would fall back to postgresql.conf.)
sub reconfigure
{
	my (%set) = @_;
	my $offset = -s $node->logfile;
	$node->safe_psql('postgres',
		join('', map { "ALTER SYSTEM SET $_ = '$set{$_}';\n" } sort keys %set)
		  . 'SELECT pg_reload_conf();');
	# only what the relay did after it took the new settings
	my $changed = qr/LOG:  mqtx relay: broker settings changed, connecting to amqps:[^\n]*\n/;
	my $connected = qr/LOG:  mqtx relay: (connected) to broker amqps:/;
	my $refused = qr/WARNING:  mqtx relay: broker amqps:\S+ is unavailable; messages stay pending\n[^\n]*DETAIL:  ([^\n]*)\n/;
	return wait_log(
		qr/$changed(?:(?!WARNING:  mqtx relay: broker ).)*?(?:$connected|$refused)/s,
		$offset) // 'no outcome logged in time';
}

sub connected
{
	my ($expected, $what) = @_;
	return wait_for($node, 'postgres',
		"SELECT broker_connected FROM mqtx.relay_stats WHERE database = 'postgres'",
		$expected, $what);
}

# Publish to the queue through the default exchange; returns the message id.
sub publish
{
	my ($tag) = @_;
	return $node->safe_psql('postgres',
		"SELECT mqtx.publish('', 'tls.q', '{\"tag\": \"$tag\"}')");
}

sub status
{
	my ($id) = @_;
	return $node->safe_psql('postgres',
		"SELECT status || '/' || attempts FROM mqtx.outbox WHERE message_id = '$id'");
}

sub published
{
	my ($id, $what) = @_;
	return wait_for($node, 'postgres',
		"SELECT status FROM mqtx.outbox WHERE message_id = '$id'",
		'published', $what);
}

# Bodies in tls.q, read (and removed) over the plain listener.
sub queue_tags
{
	return join ',',
	  map { message_body($_)->{tag} } @{ amqp_messages($plain, 'tls.q') };
}

# After an enqueue, the relay tries the broker again (its retries are
# logged at DEBUG1) and still fails for the same reason: the message stays
# pending, with no publish attempt spent on it.
sub stays_pending
{
	my ($id, $reason, $what) = @_;
	my $offset = -s $node->logfile;
	ok( wait_log(
			qr/DEBUG:  mqtx relay: broker still unavailable: \Q$reason\E\n/,
			$offset),
		"$what: the relay retries, refused again");
	is(status($id), 'pending/0', "$what: the message stays pending");
	return;
}

# --- a. verified against the CA: connects, publishes
ok( wait_log(qr/LOG:  mqtx relay: connected to broker \Q$where\E\n/, 0),
	'a: the relay connects over TLS, verifying the broker against mqtx.tls_ca_file');
connected('t', 'a: relay_stats shows it connected');
my $id_a = publish('a');
published($id_a, 'a: a message goes out over TLS');
my ($msg) = @{ amqp_messages($plain, 'tls.q') };
is($msg && $msg->{message_id}, $id_a, 'a: and is in the queue');
is($msg && message_body($msg)->{tag}, 'a', 'a: with its body');

# The certificate names 127.0.0.1 too (IP SAN), so a URL by address
# verifies as well (rabbitmq-c matches DNS names only; mqtx has OpenSSL check
# the address).
is(reconfigure('mqtx.broker_url' => $mq->amqps_url(host => '127.0.0.1')),
	'connected',
	'amqps:// by IP address verifies against the certificate\'s IP SAN');
is(reconfigure('mqtx.broker_url' => $amqps), 'connected',
	'a: back to localhost: connected again');

# --- b. a CA that did not sign the broker's certificate: no connection
my $untrusted = "cannot connect to localhost:$tls_port: SSL peer cert verification failed";
is(reconfigure('mqtx.tls_ca_file' => "$pki/other-ca.crt"), $untrusted,
	'b: with an unrelated CA the relay refuses the broker, saying why');
connected('f', 'b: relay_stats shows it disconnected');
my $id_b = publish('b');
stays_pending($id_b, $untrusted, 'b');

like(reconfigure('mqtx.tls_ca_file' => ''),
	qr/^amqps:\/\/ needs mqtx\.tls_ca_file/,
	'b: verifying with no CA file at all is refused, and says what is missing');
connected('f', 'b: still disconnected');

# --- c. verification off: the unrelated CA no longer matters
is( reconfigure(
		'mqtx.tls_ca_file' => "$pki/other-ca.crt",
		'mqtx.tls_verify_peer' => 'off'),
	'connected',
	'c: with mqtx.tls_verify_peer off the relay connects despite the unrelated CA');
connected('t', 'c: relay_stats shows it connected');
published($id_b, 'c: the message held back in b goes out');
my $id_c = publish('c');
published($id_c, 'c: and so does a new one');
is(queue_tags(), 'b,c', 'c: both are in the queue, once each, in order');

# --- d. a broker that requires a client certificate
$mq->stop;
$mq->set_extra_conf(tls_conf(require_client_cert => 1));
$mq->start;
is($mq->tls_port, $tls_port, 'd: the broker is back, on the same TLS port');
my $d_refused = reconfigure(
	'mqtx.tls_ca_file' => "$pki/ca.crt",
	'mqtx.tls_verify_peer' => 'on');
# TLS 1.3 (what these two negotiate) completes the handshake before the
# server checks for a certificate, so the refusal shows when logging in;
# with TLS 1.2 it would be the handshake.
like( $d_refused,
	qr/^(?:logging in to localhost:$tls_port as "guest": a SSL error occurred|cannot connect to localhost:$tls_port: SSL [a-z ]+)$/,
	'd: without mqtx.tls_cert_file the relay cannot connect');
connected('f', 'd: relay_stats shows it disconnected');
my $id_d = publish('d');
stays_pending($id_d, $d_refused, 'd');
is( reconfigure(
		'mqtx.tls_cert_file' => "$pki/client.crt",
		'mqtx.tls_key_file' => "$pki/client.key"),
	'connected',
	'd: with a client certificate from the broker\'s CA it connects');
connected('t', 'd: relay_stats shows it connected');
published($id_d, 'd: and the message goes out');
is(queue_tags(), 'd', 'd: it is in the queue');

# --- e. the certificate must name the URL's host.  The broker now presents
# one from the trusted CA, but for another name.
$mq->stop;
$mq->set_extra_conf(tls_conf(cert => 'other-name', require_client_cert => 1));
$mq->start;
is(reconfigure('mqtx.tls_verify_peer' => 'off'), 'connected',
	'e: unverified, the certificate for another name is accepted');
my $mismatch = "cannot connect to localhost:$tls_port: SSL hostname verification failed";
is(reconfigure('mqtx.tls_verify_peer' => 'on'), $mismatch,
	'e: verified, it is refused: it does not name localhost');
connected('f', 'e: relay_stats shows it disconnected');
my $id_e = publish('e');
stays_pending($id_e, $mismatch, 'e');
like(reconfigure('mqtx.broker_url' => $mq->amqps_url(host => '127.0.0.1')),
	qr/^cannot connect to 127\.0\.0\.1:$tls_port: SSL peer cert verification failed/,
	'e: by IP address it is refused too: that certificate does not name 127.0.0.1');
connected('f', 'e: still disconnected');

$node->stop;
$mq->stop;
done_testing();
