# Poison messages cannot stop the consumer.  A catalogue of messages a
# well-behaved publisher would never send (published raw, with pika:
# invalid UTF-8 and NUL bytes in bodies, message ids, header keys and
# values and routing keys; headers nested too deep; oversized and non-JSON
# bodies) and of messages whose handlers fail in every way (an error
# quoting 2000 control characters, a deferred constraint violated at
# COMMIT, a handler that outlives its handler_timeout, two copies of one
# failing message), interleaved with 2 x 1000 good messages on two
# queues.  Every message ends in exactly one outcome: applied once, or
# exactly one dead letter whose error_message names the cause, or a
# duplicate of one of those; the queues drain.  Then serialization
# failures at COMMIT (a write skew with a test session), of a delivery
# alone and of one in a batch of 21.  The same consumer process runs from
# start to end, and the database, with the wire strings it stored, dumps
# and restores cleanly.
use strict;
use warnings FATAL => 'all';

use Cwd qw(abs_path);
use Digest::SHA qw(sha256_hex);
use File::Basename qw(dirname);
use IPC::Run ();
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $publish_raw = abs_path(dirname(__FILE__) . '/../tools') . '/publish_raw.py';
my $python = '/usr/bin/python3';

my $mq = MqtxTest::RabbitMQ->new(name => 'poison');
$mq->start;
my $url = $mq->url;

# The body of h-ctl quotes 2000 chr(1), escaped as \u0001 in the JSON text
# (12 kB): mqtx.max_payload must let it through, and p-size exceed it.
my $max_payload = 16384;
my $node = mqtx_node('poison',
	'mqtx.broker_url' => "'$url'",
	'mqtx.max_payload' => "'16kB'");

my $N = 1000;		# good messages per queue
my $TIMEOUT_MS = 500;	# handler_timeout of poison.b

sub sql
{
	my ($query, $db) = @_;
	return $node->safe_psql($db // 'postgres', $query);
}

sub hex_of { return 'hex:' . unpack('H*', $_[0]) }

# A SQL string literal (standard_conforming_strings is on).
sub lit
{
	my ($s) = @_;
	$s =~ s/'/''/g;
	return "'$s'";
}

# Ready and unacknowledged messages of a queue, as "ready|unacked".
sub queue_counts
{
	my ($queue) = @_;
	my $c = $mq->queue_columns('messages_ready', 'messages_unacknowledged')->{$queue};
	return defined $c ? join('|', @$c) : 'no queue';
}

# ------------------------------------------------------------------
# the receiving service: two queues, handlers that log their calls in
# effect tables without unique constraints (a double apply shows)

sql(q{
	CREATE EXTENSION mqtx;

	CREATE TABLE effects_a (tag text, n int, headers jsonb,
		pid int NOT NULL DEFAULT pg_backend_pid(),
		isolation text DEFAULT current_setting('transaction_isolation'));
	CREATE TABLE effects_b (tag text, n int, headers jsonb,
		pid int NOT NULL DEFAULT pg_backend_pid());

	-- checked at COMMIT, not in the handler
	CREATE TABLE parents (id int PRIMARY KEY);
	INSERT INTO parents VALUES (1);
	CREATE TABLE deferred_child (tag text,
		parent_id int REFERENCES parents DEFERRABLE INITIALLY DEFERRED);

	-- a write skew (serializable): read ssi_y, write ssi_x
	CREATE TABLE ssi_x (tag text);
	CREATE TABLE ssi_y (tag text);

	CREATE FUNCTION handle_a(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO effects_a (tag, n, headers)
		VALUES (payload->>'tag', (payload->>'n')::int, headers);
		IF payload ? 'qty' THEN
			PERFORM (payload->>'qty')::int;
		END IF;
		IF payload ? 'parent' THEN
			INSERT INTO deferred_child VALUES (payload->>'tag', (payload->>'parent')::int);
		END IF;
		IF payload ? 'ssi' THEN
			PERFORM count(*) FROM ssi_y;
			INSERT INTO ssi_x VALUES (payload->>'tag');
			PERFORM pg_sleep((payload->>'ssi')::float8);
		END IF;
		IF payload ? 'sleep' THEN
			PERFORM pg_sleep((payload->>'sleep')::float8);
		END IF;
		IF payload ? 'fail' THEN
			RAISE EXCEPTION 'refused: %', payload->>'tag';
		END IF;
	END $$;

	CREATE FUNCTION handle_b(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO effects_b (tag, n, headers)
		VALUES (payload->>'tag', (payload->>'n')::int, headers);
		IF payload ? 'sleep' THEN
			PERFORM pg_sleep((payload->>'sleep')::float8);
		END IF;
		IF payload ? 'fail' THEN
			RAISE EXCEPTION 'refused: %', payload->>'tag';
		END IF;
	END $$;
});
sql(qq{
	SELECT mqtx.subscribe('poison.a', 'handle_a(jsonb,jsonb)', max_attempts => 3);
	SELECT mqtx.subscribe('poison.b', 'handle_b(jsonb,jsonb)', max_attempts => 3,
		handler_timeout => '$TIMEOUT_MS milliseconds');
	SELECT mqtx.declare_exchange('poison.fanout', 'fanout');
	SELECT mqtx.bind('poison.a', 'poison.fanout');
});
is( sql(
		"SELECT queue, max_attempts, (extract(epoch FROM handler_timeout) * 1000)::int "
		  . "FROM mqtx.subscriptions ORDER BY queue"),
	"poison.a|3|30000\npoison.b|3|$TIMEOUT_MS",
	'subscriptions: max_attempts 3, the default handler_timeout (30 s) and 500 ms');

wait_for($node, 'postgres',
	"SELECT broker_connected FROM mqtx.consumer_stats WHERE database = 'postgres'",
	't', 'the consumer connects to the broker');
my $consumer_pid = worker_pid($node, 'consumer');
like($consumer_pid, qr/^\d+$/, "one consumer runs (pid $consumer_pid)");
wait_queue_exists($url, $_) for qw(poison.a poison.b);
wait_until('the relay binds poison.a to the fanout exchange poison.fanout',
	sub {
		$mq->ctl('list_bindings', '-q', '--no-table-headers',
			'source_name', 'destination_name') =~ /^poison\.fanout\tpoison\.a$/m;
	});

# ------------------------------------------------------------------
# the catalogue

my $ctl = "\x01" x 2000;
my $size_head = '{"tag": "p-size", "pad": "';
my $size_tail = '"}';
my $size_body = $size_head . ('x' x (20000 - length($size_head . $size_tail))) . $size_tail;
my $anon_good_body = '{"tag": "anon-good"}';
my $anon_poison_body = "\xc3\x28 no id, not UTF-8";
my $rk_good = "rk-\xff";
my $rk_poison = "rk-\xfe\x00";

# bytes as publish_raw.py takes them
sub b { return { hex => unpack('H*', $_[0]) } }

sub msg
{
	my ($queue, %m) = @_;
	my %line = (routing_key => $queue, body => b($m{body}));
	$line{message_id} = b($m{id}) if defined $m{id};
	$line{exchange} = $m{exchange} if defined $m{exchange};
	$line{routing_key} = b($m{routing_key}) if defined $m{routing_key};
	$line{headers} = $m{headers} if defined $m{headers};
	$line{headers_nest} = $m{headers_nest} if defined $m{headers_nest};
	return \%line;
}

# In publishing order; spread through the good messages below (an array
# of messages goes out together).
my @specials = (
	# poison: dead-lettered at once
	msg('poison.a', id => 'p-utf8', body => "\xff\xfe{\"tag\": \"p-utf8\"}"),
	msg('poison.b', id => 'h-apart', body => '{"tag": "h-apart", "fail": true}'),
	msg('poison.a', id => 'p-json', body => 'not json {'),
	msg('poison.a', id => 'p-size', body => $size_body),
	msg('poison.a', id => 'p-deep100', body => '{"tag": "p-deep100"}',
		headers_nest => [ 100, 'n', 1 ]),
	msg('poison.a', id => 'p-deep65', body => '{"tag": "p-deep65"}',
		headers_nest => [ 65, 'n', 1 ]),
	msg('poison.a', body => $anon_poison_body),
	msg('poison.a', id => "p-rk-\xff", exchange => 'poison.fanout',
		routing_key => $rk_poison, body => 'not json either',
		headers => [ [ b("h-\xff"), 'v' ], [ 'nul', b("ok\x00") ] ]),
	# wire strings that are not text: applied, keyed hex:
	msg('poison.a', id => "w-nul\x00a", body => '{"tag": "w-nul"}'),
	msg('poison.a', id => "w-nul\x00b", body => '{"tag": "w-nul"}'),
	msg('poison.a', id => "w-id-\xff\xfe", body => '{"tag": "w-id"}'),
	msg('poison.a', id => 'w-hdr', body => '{"tag": "w-hdr"}',
		headers => [
			[ b("k-\xff"), b("v-\xfe") ],
			[ 'plain', 'ok' ],
			[ 'nul', b("a\x00b") ],
			[ 'bin', { bytes => unpack('H*', "\x00\x01") } ],
			[ 'bin-text', { bytes => unpack('H*', 'abc') } ],
		]),
	msg('poison.a', id => 'w-rk', exchange => 'poison.fanout',
		routing_key => $rk_good, body => '{"tag": "w-rk"}'),
	msg('poison.a', body => $anon_good_body),
	msg('poison.a', id => 'g-deep64', body => '{"tag": "g-deep64"}',
		headers_nest => [ 64, 'n', 1 ]),
	# handler failures: retried, then dead-lettered
	msg('poison.a', id => 'h-ctl',
		body => '{"tag": "h-ctl", "qty": "' . ('\u0001' x 2000) . '"}'),
	# a deferred constraint violated (checked at COMMIT), next to one kept
	[
		msg('poison.a', id => 'g-deferred', body => '{"tag": "g-deferred", "parent": 1}'),
		msg('poison.a', id => 'h-deferred', body => '{"tag": "h-deferred", "parent": 999}'),
	],
	msg('poison.b', id => 'h-slow', body => '{"tag": "h-slow", "sleep": 10}'),
	msg('poison.b', id => 'b-slow-ok', body => '{"tag": "b-slow-ok", "sleep": 0.05}'),
	# two copies back to back, most likely in one batch
	[ map { msg('poison.b', id => 'h-twice', body => '{"tag": "h-twice", "fail": true}') } 1 .. 2 ],
	# later copies of a poison message and of a failing one
	msg('poison.a', id => 'p-utf8', body => "\xff\xfe{\"tag\": \"p-utf8\"}"),
	msg('poison.b', id => 'h-apart', body => '{"tag": "h-apart", "fail": true}'),
);

my @messages;
my $every = int($N / (@specials + 1));
for my $i (1 .. $N)
{
	push @messages,
	  msg('poison.a', id => "a-$i", body => qq({"tag": "a-$i", "n": $i})),
	  msg('poison.b', id => "b-$i", body => qq({"tag": "b-$i", "n": $i}));
	push @messages, map { ref $_ eq 'ARRAY' ? @$_ : $_ } shift @specials
	  if $i % $every == 0 && @specials;
}
push @messages, map { ref $_ eq 'ARRAY' ? @$_ : $_ } @specials;
is(scalar @messages, 2 * $N + 24, 'publishing 2000 good messages and 24 others');

my $file = PostgreSQL::Test::Utils::tempdir() . '/messages.jsonl';
open(my $fh, '>', $file) or die "cannot write $file: $!";
print $fh JSON::PP->new->canonical->encode($_), "\n" for @messages;
close($fh) or die "cannot write $file: $!";

my ($out, $err) = ('', '');
my $started = time;
ok( IPC::Run::run([ $python, $publish_raw, '--url', $url, $file ],
		'<', \undef, '>', \$out, '2>', \$err),
	'the broker confirmed every message (publish_raw.py)')
  or diag($err);

# ------------------------------------------------------------------
# every message comes to its end

my $good_a = $N + 8;	# a-*, w-nul twice, w-id, w-hdr, w-rk, anon-good, g-deep64, g-deferred
my $good_b = $N + 1;	# b-*, b-slow-ok
my $letters = 12;
# A message is acked only once its outcome has committed, and a delivery
# held for a retry stays unacked: with both queues empty (every message
# was in them once publish_raw.py returned) and no attempts on record,
# every message has come to its end.
for my $q (qw(poison.a poison.b))
{
	my $counts;
	wait_until("$q is drained: nothing ready, nothing unacked",
		sub { ($counts = queue_counts($q)) eq '0|0' })
	  or diag("$q ready|unacked: $counts");
}
wait_for($node, 'postgres', 'SELECT count(*) FROM mqtx.consumer_attempts',
	'0', 'mqtx.consumer_attempts is empty');
is(sql('SELECT count(*) FROM effects_a'), $good_a,
	"poison.a: $good_a good messages applied, no more");
is(sql('SELECT count(*) FROM effects_b'), $good_b,
	"poison.b: $good_b good messages applied, no more");
is(sql('SELECT count(*) FROM mqtx.dead_letter'), $letters, "$letters dead letters")
  or diag(sql(
	'SELECT queue, message_id, attempts, left(error_message, 80) FROM mqtx.dead_letter ORDER BY id'));
note('all outcomes reached ' . (time - $started) . ' s after publishing began');

# ------------------------------------------------------------------
# good messages: applied exactly once

for my $case ([ 'effects_a', 'a' ], [ 'effects_b', 'b' ])
{
	my ($table, $p) = @$case;
	is( sql(
			"SELECT count(*), count(DISTINCT tag), min(n), max(n), "
			  . "bool_and(tag = '$p-' || n) FROM $table WHERE tag ~ '^$p-\\d+\$'"),
		"$N|$N|1|$N|t", "$table: the $N good messages, each applied once");
}
is( sql(
		"SELECT tag, count(*) FROM effects_a WHERE tag !~ '^a-\\d+\$' GROUP BY tag ORDER BY tag"),
	"anon-good|1\ng-deep64|1\ng-deferred|1\nw-hdr|1\nw-id|1\nw-nul|2\nw-rk|1",
	'poison.a: the other good messages applied, once each (w-nul: two messages)');
is( sql("SELECT tag, count(*) FROM effects_b WHERE tag !~ '^b-\\d+\$' GROUP BY tag"),
	'b-slow-ok|1', 'poison.b: a handler that sleeps 50 ms (under its timeout) is applied');
is( sql('SELECT tag, parent_id FROM deferred_child'),
	'g-deferred|1', 'the message that met the deferred constraint is applied, next to the one that did not');
is( sql(
		"SELECT count(DISTINCT pid), min(pid) FROM "
		  . "(SELECT pid FROM effects_a UNION ALL SELECT pid FROM effects_b) e"),
	"1|$consumer_pid", 'all applied by the consumer started first');

# ------------------------------------------------------------------
# wire strings that are not text: stored as hex:, each message its own key

my %key = (
	nul_a => hex_of("w-nul\x00a"),
	nul_b => hex_of("w-nul\x00b"),
	id => hex_of("w-id-\xff\xfe"),
	p_rk => hex_of("p-rk-\xff"),
	anon_good => 'sha256:' . sha256_hex($anon_good_body),
	anon_poison => 'sha256:' . sha256_hex($anon_poison_body),
);
is($key{nul_a}, 'hex:772d6e756c0061', "the id 'w-nul\\0a' is keyed hex:772d6e756c0061");
is( sql(
		"SELECT message_id FROM mqtx.inbox WHERE queue = 'poison.a' AND message_id LIKE 'hex:%' "
		  . 'ORDER BY message_id'),
	join("\n", sort($key{id}, $key{nul_a}, $key{nul_b}, $key{p_rk})),
	'the inbox keys of the ids with a NUL or invalid UTF-8 are hex:, one per message');
is( sql(
		"SELECT count(*) FROM mqtx.inbox WHERE queue = 'poison.a' AND message_id IN ("
		  . join(', ', map { lit($key{$_}) } qw(anon_good anon_poison)) . ')'),
	'2', "the messages without a message_id are keyed 'sha256:' || hex of the body");
is( sql(q{SELECT headers FROM effects_a WHERE tag = 'w-hdr'}),
	'{"bin": "hex:0001", "nul": "hex:610062", "plain": "ok", "bin-text": "abc", "hex:6b2dff": "hex:762dfe"}',
	'the handler sees header keys and values that are not text as hex:');
my $path = join(',', ('n') x 63, 'leaf');
is( sql(qq{SELECT headers #>> '{$path}' FROM effects_a WHERE tag = 'g-deep64'}),
	'1', 'headers nested 64 levels deep reach the handler whole');
is( sql(
		"SELECT count(*) FROM mqtx.inbox WHERE queue = 'poison.a' AND message_id = 'w-rk'"),
	'1', 'a message with an invalid UTF-8 routing key (through the fanout) is applied');

# ------------------------------------------------------------------
# the dead letters: one per message, each with its cause

# [queue, dedupe key, attempts, error_message (regex), extra checks]
my @dead = (
	[ 'poison.a', 'p-utf8', 1, qr/^body is not valid UTF-8$/ ],
	[ 'poison.a', 'p-json', 1, qr/^body is not valid JSON: invalid input syntax for type json$/ ],
	[ 'poison.a', 'p-size', 1,
		qr/^body is 20000 bytes, more than mqtx\.max_payload \($max_payload bytes\)$/ ],
	[ 'poison.a', 'p-deep100', 1,
		qr/^message headers cannot be read: headers nest deeper than 64 levels$/ ],
	[ 'poison.a', 'p-deep65', 1,
		qr/^message headers cannot be read: headers nest deeper than 64 levels$/ ],
	[ 'poison.a', $key{anon_poison}, 1, qr/^body is not valid UTF-8$/ ],
	[ 'poison.a', $key{p_rk}, 1, qr/^body is not valid JSON: / ],
	[ 'poison.a', 'h-ctl', 3, qr/^invalid input syntax for type integer: "\x01{2000}"$/ ],
	[ 'poison.a', 'h-deferred', 3,
		qr/^insert or update on table "deferred_child" violates foreign key constraint "deferred_child_parent_id_fkey"$/ ],
	[ 'poison.b', 'h-slow', 3,
		qr/^handler ran longer than its timeout of $TIMEOUT_MS ms \(handler_timeout of the subscription of queue "poison\.b"\)$/ ],
	[ 'poison.b', 'h-twice', 3, qr/^refused: h-twice$/ ],
	[ 'poison.b', 'h-apart', 3, qr/^refused: h-apart$/ ],
);
is( sql(
		'SELECT count(*), count(DISTINCT (queue, message_id)) FROM mqtx.dead_letter'),
	"$letters|$letters", "$letters dead letters, no two for one message");
for my $d (@dead)
{
	my ($queue, $id, $attempts, $error) = @$d;
	my $what = $id =~ /^(?:sha256|hex):/ ? substr($id, 0, 20) . '...' : $id;
	my $row = sql(
		"SELECT count(*), min(attempts), min(error_message) FROM mqtx.dead_letter "
		  . "WHERE queue = '$queue' AND message_id = " . lit($id));
	my ($n, $att, $msg) = split /\|/, $row, 3;
	is($n, 1, "$what: exactly one dead letter");
	is($att, $attempts, "$what: after $attempts attempt" . ($attempts > 1 ? 's' : ''));
	like($msg // '', $error, "$what: error_message names the cause")
	  or diag('error_message: ' . substr($msg // '', 0, 300));
	is( sql(
			"SELECT count(*) FROM mqtx.inbox WHERE queue = '$queue' AND message_id = " . lit($id)),
		'1', "$what: its inbox row is written (later copies are duplicates)");
}
is( sql(
		"SELECT count(*) FROM (SELECT tag FROM effects_a UNION ALL SELECT tag FROM effects_b) e "
		  . "WHERE tag LIKE 'p-%' OR tag LIKE 'h-%'"),
	'0', 'no effect of a dead-lettered message was committed');
is( sql(
		"SELECT (SELECT count(*) FROM mqtx.inbox WHERE queue = 'poison.a'), "
		  . "(SELECT count(*) FROM mqtx.inbox WHERE queue = 'poison.b')"),
	($good_a + 9) . '|' . ($good_b + 3),
	'the inbox holds exactly the applied and the dead-lettered messages');

# details of some of them
is( sql(q{
		SELECT encode(body, 'hex'), body_text IS NULL, body_json IS NULL
		FROM mqtx.dead_letter WHERE message_id = 'p-utf8'}),
	unpack('H*', "\xff\xfe{\"tag\": \"p-utf8\"}") . '|t|t',
	'p-utf8: the exact bytes, no body_text, no body_json');
is( sql(q{
		SELECT body_text, body_json IS NULL, error_detail
		FROM mqtx.dead_letter WHERE message_id = 'p-json'}),
	'not json {|t|Token "not" is invalid.',
	'p-json: body_text kept, no body_json, the parser\'s detail');
is( sql(q{
		SELECT length(body), length(body_text), body_json IS NULL
		FROM mqtx.dead_letter WHERE message_id = 'p-size'}),
	'20000|20000|t', 'p-size: the whole body kept, as text, not parsed');
is( sql(q{
		SELECT headers IS NULL, body_json->>'tag'
		FROM mqtx.dead_letter WHERE message_id = 'p-deep100'}),
	't|p-deep100', 'p-deep100: no headers stored, the body parsed');
is( sql(
		"SELECT exchange, routing_key, headers, body_text FROM mqtx.dead_letter "
		  . 'WHERE message_id = ' . lit($key{p_rk})),
	'poison.fanout|' . hex_of($rk_poison) . '|{"nul": "hex:6f6b00", "hex:682dff": "v"}|not json either',
	'p-rk: the invalid routing key, header key and NUL value are stored as hex:');
is( sql(
		"SELECT error_message = format('invalid input syntax for type integer: \"%s\"', "
		  . "repeat(chr(1), 2000)) FROM mqtx.dead_letter WHERE message_id = 'h-ctl'"),
	't', 'h-ctl: the error quotes the 2000 control characters whole');
is( sql(q{SELECT error_detail FROM mqtx.dead_letter WHERE message_id = 'h-deferred'}),
	'Key (parent_id)=(999) is not present in table "parents".',
	'h-deferred: with the constraint\'s detail');

# ------------------------------------------------------------------
# the counters, and the same process throughout

is( sql(q{
		SELECT applied, dead_lettered, duplicates >= 1, retried >= 10,
			consumed >= applied + dead_lettered + 1
		FROM mqtx.consumer_stats WHERE database = 'postgres'}),
	($good_a + $good_b) . "|$letters|t|t|t",
	'consumer_stats: applied and dead_lettered add up');
is( worker_pid($node, 'consumer'),
	$consumer_pid, 'after the catalogue, the consumer pid is the one of the start');
my $catalogue_log = slurp_file($node->logfile);
unlike($catalogue_log, qr/an error interrupted the consumer/,
	'no error of the catalogue escaped a delivery into the worker\'s recovery');
unlike($catalogue_log,
	qr/could not (?:write the full dead letter|dead-letter message|record the failed attempt)/,
	'every dead letter and attempt of the catalogue was written in full');

# ------------------------------------------------------------------
# a serialization failure at COMMIT: the consumer's transactions made
# serializable, a write skew with a session that commits while the
# handler sleeps.  The delivery fails at commit like a handler error
# (an attempt with the error), is retried, and is applied once.

sql(q{
	ALTER SYSTEM SET default_transaction_isolation = 'serializable';
	SELECT pg_reload_conf();
});
my $probe = 0;
wait_until('the consumer applies in serializable transactions after the reload',
	sub {
		$probe++;
		amqp_tool('publish', '--url', $url, '--routing-key', 'poison.a', '--persistent',
			'--message-id', "probe-$probe", '--body', qq({"tag": "probe-$probe"}));
		$node->poll_query_until('postgres',
			"SELECT count(*) FROM effects_a WHERE tag = 'probe-$probe'", '1')
		  or return 0;
		return sql("SELECT isolation FROM effects_a WHERE tag = 'probe-$probe'")
		  eq 'serializable';
	});
my $retried_before = sql(
	"SELECT retried FROM mqtx.consumer_stats WHERE database = 'postgres'");
my $skew = $node->background_psql('postgres');
$skew->query_safe('BEGIN ISOLATION LEVEL SERIALIZABLE');
$skew->query_safe('SELECT count(*) FROM ssi_x');
$skew->query_safe("INSERT INTO ssi_y VALUES ('session')");
amqp_tool('publish', '--url', $url, '--routing-key', 'poison.a', '--persistent',
	'--message-id', 's-ssi', '--body', '{"tag": "s-ssi", "ssi": 2}');
wait_for($node, 'postgres',
	"SELECT wait_event FROM pg_stat_activity WHERE pid = $consumer_pid",
	'PgSleep', 's-ssi: the handler has read ssi_y, written ssi_x and sleeps');
$skew->query_safe('COMMIT');
$skew->quit;
wait_until('s-ssi: its commit fails with a serialization failure (logged)', sub {
		$node->log_contains(qr/could not serialize access due to read\/write dependencies/) });
wait_for($node, 'postgres',
	"SELECT count(*) FROM effects_a WHERE tag = 's-ssi'",
	'1', 's-ssi: retried, and applied');
is( sql("SELECT count(*) FROM mqtx.consumer_attempts WHERE message_id = 's-ssi'"),
	'0', 's-ssi: a serialization failure spends no attempt');
is( sql(q{
		SELECT (SELECT count(*) FROM effects_a WHERE tag = 's-ssi'),
			(SELECT string_agg(tag, ',') FROM ssi_x),
			(SELECT count(*) FROM mqtx.inbox WHERE message_id = 's-ssi'),
			(SELECT count(*) FROM mqtx.dead_letter WHERE message_id = 's-ssi')}),
	'1|s-ssi|1|0', 's-ssi: applied once on the retry, not dead-lettered');
cmp_ok(sql("SELECT retried FROM mqtx.consumer_stats WHERE database = 'postgres'"),
	'>', $retried_before, 's-ssi: counted as retried');
is( worker_pid($node, 'consumer'),
	$consumer_pid, 's-ssi: the consumer pid is still the one of the start');

# The same in a batch: the other deliveries of the batch are applied, and
# the culprit too once it is alone (the other transaction is over).
# While a first message keeps the consumer busy, 21 arrive and make the
# next batch.
$skew = $node->background_psql('postgres');
$skew->query_safe('BEGIN ISOLATION LEVEL SERIALIZABLE');
$skew->query_safe('SELECT count(*) FROM ssi_x');
$skew->query_safe("INSERT INTO ssi_y VALUES ('session 2')");
my $log_offset = -s $node->logfile;
amqp_tool('publish', '--url', $url, '--routing-key', 'poison.a', '--persistent',
	'--message-id', 's-block', '--body', '{"tag": "s-block", "sleep": 1.5}');
wait_for($node, 'postgres',
	"SELECT wait_event FROM pg_stat_activity WHERE pid = $consumer_pid",
	'PgSleep', 's-block keeps the consumer busy');
my @batch = ((map { msg('poison.a', id => "s-a-$_", body => qq({"tag": "s-a-$_"})) } 1 .. 10),
	msg('poison.a', id => 's-ssi-2', body => '{"tag": "s-ssi-2", "ssi": 2}'),
	(map { msg('poison.a', id => "s-a-$_", body => qq({"tag": "s-a-$_"})) } 11 .. 20));
open($fh, '>', $file) or die "cannot write $file: $!";
print $fh JSON::PP->new->canonical->encode($_), "\n" for @batch;
close($fh) or die "cannot write $file: $!";
ok( IPC::Run::run([ $python, $publish_raw, '--url', $url, $file ],
		'<', \undef, '>', \$out, '2>', \$err),
	'21 messages published while the consumer is busy')
  or diag($err);
wait_for($node, 'postgres', "SELECT count(*) FROM effects_a WHERE tag = 's-block'",
	'1', 's-block applied');
wait_for($node, 'postgres',
	"SELECT wait_event FROM pg_stat_activity WHERE pid = $consumer_pid",
	'PgSleep', 's-ssi-2: the handler has read ssi_y, written ssi_x and sleeps');
$skew->query_safe('COMMIT');
$skew->quit;
wait_until('the batch fails at COMMIT with the serialization failure and is applied one by one',
	sub {
		slurp_file($node->logfile, $log_offset) =~
		  /a batch of (\d+) deliveries failed as a whole; applying them one at a time\n[^\n]*DETAIL:  could not serialize access due to read\/write dependencies among transactions/
		  && $1 > 1;
	});
wait_for($node, 'postgres',
	"SELECT count(*) FROM mqtx.inbox WHERE message_id ~ '^s-(a-\\d+|ssi-2)\$'",
	'21', 'all 21 come to an outcome');
is( sql(q{
		SELECT count(*), count(DISTINCT tag) FROM effects_a WHERE tag ~ '^s-(a-\d+|ssi-2)$'}),
	'21|21', 'the 20 others of the batch and the culprit are applied once each');
is( sql(q{
		SELECT (SELECT string_agg(tag, ',' ORDER BY tag) FROM ssi_x),
			(SELECT count(*) FROM mqtx.dead_letter WHERE message_id LIKE 's-%'),
			(SELECT count(*) FROM mqtx.consumer_attempts)}),
	's-ssi,s-ssi-2|0|0', 'the culprit\'s effect once; no dead letter, no attempt left');
is( worker_pid($node, 'consumer'),
	$consumer_pid, 's-ssi-2: the consumer pid is still the one of the start');
unlike(slurp_file($node->logfile, $log_offset),
	qr/background worker "[^"]*consumer[^"]*" \(PID \d+\) (?:exited|was terminated)/,
	's-ssi-2: the consumer did not die applying the batch one delivery at a time');

sql(q{
	ALTER SYSTEM RESET default_transaction_isolation;
	SELECT pg_reload_conf();
});

# ------------------------------------------------------------------
# what the consumer stored is valid text: the database dumps and restores

my $dump_dir = PostgreSQL::Test::Utils::tempdir();
sub run_ok
{
	my ($cmd, $what) = @_;
	my ($o, $e) = ('', '');
	my $ok = IPC::Run::run($cmd, '<', \undef, '>', \$o, '2>', \$e);
	ok($ok && $e eq '', $what) or diag("@$cmd:\n$e");
}
run_ok([ 'pg_dump', '-Fc', '-f', "$dump_dir/poison.dump", '-d', $node->connstr('postgres') ],
	'pg_dump -Fc of the database succeeds');
run_ok([ 'pg_dump', '-Fp', '-f', "$dump_dir/poison.sql", '-d', $node->connstr('postgres') ],
	'pg_dump -Fp of the database succeeds');
sql('CREATE DATABASE restored_c');
sql('CREATE DATABASE restored_p');
run_ok([ 'pg_restore', '--exit-on-error', '-d', $node->connstr('restored_c'),
		"$dump_dir/poison.dump" ],
	'pg_restore into a new database: no error');
run_ok([ 'psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-o', '/dev/null',
		'-d', $node->connstr('restored_p'), '-f', "$dump_dir/poison.sql" ],
	'psql of the plain dump into a new database: no error');

my $fingerprint = q{
	SELECT (SELECT md5(string_agg(d::text, E'\n' ORDER BY id)) FROM mqtx.dead_letter d),
	       (SELECT md5(string_agg(i::text, E'\n' ORDER BY queue, message_id)) FROM mqtx.inbox i),
	       (SELECT count(*) FROM effects_a), (SELECT count(*) FROM effects_b)};
my $original = sql($fingerprint);
is(sql($fingerprint, 'restored_c'), $original,
	'the restored dead letters, inbox and effects equal the original (pg_restore)');
is(sql($fingerprint, 'restored_p'), $original,
	'the restored dead letters, inbox and effects equal the original (psql)');

# ------------------------------------------------------------------
# the end: queues drained, no attempt pending, the same process throughout

for my $q (qw(poison.a poison.b))
{
	my $counts;
	wait_until("at the end, $q is drained: nothing ready, nothing unacked",
		sub { ($counts = queue_counts($q)) eq '0|0' })
	  or diag("$q ready|unacked: $counts");
}
is(sql('SELECT count(*) FROM mqtx.consumer_attempts'), '0',
	'at the end, mqtx.consumer_attempts is empty');

is( worker_pid($node, 'consumer'),
	$consumer_pid, 'the consumer pid is the same as at the start');
my $log = slurp_file($node->logfile);
unlike($log,
	qr/background worker "[^"]*consumer[^"]*" \(PID \d+\) (?:exited|was terminated)/,
	'the consumer worker never exited');
unlike($log, qr/an error interrupted the consumer/,
	'no error escaped a delivery into the worker\'s recovery');

$node->stop;
$mq->stop;
done_testing();
