# Least privilege (0.2.0), played by an attacker: the owner of a served
# database (role "app") sets traps for the superuser the workers connect as,
# subscribes handlers that try to escalate, and an unprivileged role ("spy")
# listens to the alerts.  Every hole must be closed:
#
#  - the workers never resolve a name through the database's search_path
#    (look-alike functions and operators in public, ALTER DATABASE ... SET
#    search_path = public, pg_catalog);
#  - a handler runs as its owner, with the owner's session search_path, as
#    a SECURITY DEFINER function would: what the owner may not do fails, is
#    retried and dead-lettered; its deferred triggers fire when it returns,
#    as the owner, not at the worker's commit; nothing it sets or creates
#    in the session (settings, temp tables) outlives the call;
#  - the NOTIFY payloads name the event, database, row id (and queue), and
#    nothing of the message;
#  - publishing is granted per database; subscribing is the superuser's, and
#    a delegated writer of mqtx.subscriptions may only subscribe functions of
#    roles whose privileges it has;
#  - the broker password set with ALTER SYSTEM is masked in
#    pg_stat_activity, pg_stat_statements and the server log.
use strict;
use warnings FATAL => 'all';

use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

use MqtxTest::RabbitMQ;
use MqtxTest::Util;

MqtxTest::RabbitMQ->skip_all_unless_installed;

my $mq = MqtxTest::RabbitMQ->new(name => 'leastpriv');
$mq->start;
my $url = $mq->url;

my $node = mqtx_node('leastpriv',
	'mqtx.broker_url' => "'$url'",
	'mqtx.database' => "'appdb'",
	'mqtx.max_attempts' => '2',
	shared_preload_libraries => "'pg_stat_statements,mqtx'",
	'pg_stat_statements.track_utility' => 'on');

# The test's own superuser sessions never resolve a name through the hostile
# database's search_path (they would walk into the traps themselves).  The
# attacker's and the spy's sessions, and the one superuser session that
# checks mqtx's own SQL API, run without this (see as_role and su_exposed).
$ENV{PGOPTIONS} = '-c search_path=pg_catalog,pg_temp';

sub su
{
	my ($db, $sql) = @_;
	return $node->safe_psql($db, $sql);
}

# psql as $role (a real login), with the session defaults a client of that
# role gets.  List context: (exit status, stdout, stderr).
sub as_role
{
	my ($role, $db, $sql) = @_;
	delete local $ENV{PGOPTIONS};
	my ($ret, $out, $err) = $node->psql($db, $sql,
		extra_params => [ '-U', $role ],
		on_error_stop => 1);
	return wantarray ? ($ret, $out, $err) : $ret;
}

sub safe_as
{
	my ($role, $db, $sql) = @_;
	delete local $ENV{PGOPTIONS};
	return $node->safe_psql($db, $sql, extra_params => [ '-U', $role ]);
}

# A superuser session that gets appdb's hostile search_path.
sub su_exposed
{
	my ($db, $sql) = @_;
	delete local $ENV{PGOPTIONS};
	return $node->safe_psql($db, $sql);
}

# backend_type => pid of the workers that serve appdb
sub worker_pids
{
	my %pids;
	for my $kind (qw(relay consumer))
	{
		my $pid = worker_pid($node, $kind, db => 'appdb');
		$pids{"mqtx $kind"} = $pid if $pid ne '';
	}
	return \%pids;
}

# What ran where it must not: every look-alike, and the deferred trigger
# unless it fired as app, its owner (in the handler, when it returned).
sub trap_rows
{
	return su('appdb', "SELECT who, what FROM public.trap "
		  . "WHERE NOT (what = 'deferred trigger' AND who = 'app') ORDER BY at");
}

# Once app has escalated, what follows can only time out: stop there.
sub not_escalated
{
	my ($stage) = @_;
	my $super = su('postgres', "SELECT rolsuper FROM pg_roles WHERE rolname = 'app'");
	my $trap = trap_rows();
	return if ok($super eq 'f' && $trap eq '',
		"$stage: app is not a superuser, and no look-alike ran");
	diag("rolsuper: $super; public.trap (who|what):\n$trap");
	die "$stage: app escalated; stopping here\n";
}

# ------------------------------------------------------------------
# setup, as the superuser

su('postgres', q{
	CREATE ROLE app LOGIN;
	CREATE ROLE spy LOGIN;
	CREATE DATABASE appdb OWNER app;
	CREATE DATABASE otherdb;
	CREATE EXTENSION pg_stat_statements SCHEMA public;
});
su('appdb', q{
	CREATE EXTENSION mqtx;
	SELECT mqtx.grant_publish('app');
	SELECT mqtx.declare_exchange('orders', 'topic');
	SELECT mqtx.declare_exchange('lonely', 'fanout');   -- no bindings, ever
	SELECT mqtx.declare_queue('orders.audit');
	SELECT mqtx.bind('orders.audit', 'orders', 'order.#');
	SELECT mqtx.declare_queue('app.q');
	SELECT mqtx.bind('app.q', 'orders', 'order.created');
	SELECT mqtx.declare_queue('app.probe');
});
su('otherdb', 'CREATE EXTENSION mqtx');

is(su('postgres', "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'mqtx%'"),
	'0', 'CREATE EXTENSION created no cluster-wide role');

wait_workers($node, 2, 'the relay and the consumer serve appdb', db => 'appdb');

# ------------------------------------------------------------------
# the attacker (app, owner of appdb) sets up its schema, its handlers and
# the traps: look-alikes in public that, run by a superuser, make app a
# superuser; and each leaves a row in public.trap, whoever runs it

safe_as('app', 'appdb', q{
	CREATE SCHEMA app;
	CREATE TABLE app.handled (
		id			bigserial PRIMARY KEY,
		who			name NOT NULL,
		session_who name NOT NULL,
		path		text NOT NULL,
		payload		jsonb NOT NULL);
	CREATE TABLE app.evil_log (attack text, who name, path text);
	CREATE TABLE app.deferred_target (x int);
	CREATE TABLE app.orders (order_id bigint PRIMARY KEY, item text NOT NULL);
	CREATE TRIGGER orders_outbox AFTER INSERT ON app.orders
		FOR EACH ROW EXECUTE FUNCTION mqtx.outbox_trigger('orders', 'order.created');

	-- "handled" unqualified: found only with app's own search_path
	CREATE FUNCTION app.app_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO handled (who, session_who, path, payload)
		VALUES (current_user, session_user, current_setting('search_path'), payload);
	END $$;

	CREATE FUNCTION app.card_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		RAISE EXCEPTION 'card % declined', payload->>'card';
	END $$;

	CREATE TABLE public.trap (
		who		name NOT NULL,
		what	text NOT NULL,
		at		timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp());
	GRANT INSERT ON public.trap TO PUBLIC;

	CREATE FUNCTION public.trap_fire(kind text) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO public.trap (who, what) VALUES (current_user, kind);
		BEGIN
			ALTER ROLE app SUPERUSER;
		EXCEPTION WHEN OTHERS THEN
			NULL;	-- not a superuser: stay quiet, and work as the real thing
		END;
	END $$;

	-- a deferred trigger would fire at the worker's commit, outside the
	-- handler's identity, if it could be queued
	CREATE FUNCTION app.escalate() RETURNS trigger
	LANGUAGE plpgsql AS $$
	BEGIN
		PERFORM public.trap_fire('deferred trigger');
		RETURN NULL;
	END $$;
	CREATE CONSTRAINT TRIGGER escalate AFTER INSERT ON app.deferred_target
		DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION app.escalate();

	CREATE FUNCTION app.evil_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	DECLARE
		attack text := payload->>'attack';
	BEGIN
		INSERT INTO app.evil_log VALUES (attack, current_user, current_setting('search_path'));
		CASE attack
		WHEN 'set_role' THEN
			EXECUTE format('SET ROLE %I', session_user);
		WHEN 'session_authorization' THEN
			EXECUTE format('SET SESSION AUTHORIZATION %I', session_user);
		WHEN 'listen' THEN
			EXECUTE 'LISTEN app_evil';
		WHEN 'temp_table' THEN
			CREATE TEMP TABLE evil_tmp (x int);
		WHEN 'temp_probe' THEN
			-- whatever an earlier handler left in the session is gone
			INSERT INTO app.evil_log VALUES ('temp_probe:' ||
				(pg_catalog.to_regclass('pg_temp.evil_tmp') IS NULL)::text, current_user, '');
		WHEN 'deferred_trigger' THEN
			INSERT INTO app.deferred_target VALUES (1);
		WHEN 'sticky_search_path' THEN
			-- session level: must not outlive the call
			PERFORM set_config('search_path', 'public, pg_catalog', false);
		END CASE;
	END $$;

	CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
	BEGIN PERFORM public.trap_fire('now()'); RETURN pg_catalog.now(); END $$;
	CREATE FUNCTION public.random() RETURNS double precision LANGUAGE plpgsql AS $$
	BEGIN PERFORM public.trap_fire('random()'); RETURN pg_catalog.random(); END $$;
	CREATE FUNCTION public.unnest(bigint[]) RETURNS SETOF bigint LANGUAGE plpgsql AS $$
	BEGIN PERFORM public.trap_fire('unnest(bigint[])'); RETURN QUERY SELECT pg_catalog.unnest($1); END $$;
	CREATE FUNCTION public.make_interval(secs integer) RETURNS interval LANGUAGE plpgsql AS $$
	BEGIN
		PERFORM public.trap_fire('make_interval(secs integer)');
		RETURN pg_catalog.make_interval(secs => $1::double precision);
	END $$;
	CREATE FUNCTION public.power(integer, integer) RETURNS double precision LANGUAGE plpgsql AS $$
	BEGIN
		PERFORM public.trap_fire('power(integer, integer)');
		RETURN pg_catalog.power($1::double precision, $2::double precision);
	END $$;
	CREATE FUNCTION public.pg_notify(text, text) RETURNS void LANGUAGE plpgsql AS $$
	BEGIN PERFORM public.trap_fire('pg_notify(text, text)'); PERFORM pg_catalog.pg_notify($1, $2); END $$;
	CREATE FUNCTION public.current_database() RETURNS name LANGUAGE plpgsql AS $$
	BEGIN PERFORM public.trap_fire('current_database()'); RETURN pg_catalog.current_database(); END $$;
	-- json_build_object(VARIADIC "any") cannot be written in SQL or PL/pgSQL;
	-- these match the alerts' calls exactly, which beats VARIADIC "any"
	CREATE FUNCTION public.json_build_object(text, text, text, name, text, bigint) RETURNS json
	LANGUAGE plpgsql AS $$
	BEGIN
		PERFORM public.trap_fire('json_build_object(alert)');
		RETURN pg_catalog.json_build_object($1, $2, $3, $4, $5, $6);
	END $$;
	CREATE FUNCTION public.json_build_object(text, text, text, name, text, bigint, text, text) RETURNS json
	LANGUAGE plpgsql AS $$
	BEGIN
		PERFORM public.trap_fire('json_build_object(dead letter)');
		RETURN pg_catalog.json_build_object($1, $2, $3, $4, $5, $6, $7, $8);
	END $$;

	CREATE FUNCTION public.trap_int8eq(bigint, bigint) RETURNS boolean LANGUAGE plpgsql AS $$
	BEGIN PERFORM public.trap_fire('bigint = bigint'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
	CREATE OPERATOR public.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = public.trap_int8eq);
	CREATE FUNCTION public.trap_texteq(text, text) RETURNS boolean LANGUAGE plpgsql AS $$
	BEGIN PERFORM public.trap_fire('text = text'); RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
	CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.trap_texteq);
	CREATE FUNCTION public.trap_tstzle(timestamptz, timestamptz) RETURNS boolean LANGUAGE plpgsql AS $$
	BEGIN PERFORM public.trap_fire('timestamptz <= timestamptz'); RETURN $1 OPERATOR(pg_catalog.<=) $2; END $$;
	CREATE OPERATOR public.<= (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = public.trap_tstzle);

	ALTER DATABASE appdb SET search_path = public, pg_catalog;
	-- a new session of app: role-in-database first, then role, then database
	ALTER ROLE app IN DATABASE appdb SET search_path = app, public;
	ALTER ROLE app SET search_path = nowhere;
});

my ($vret, undef, $verr) = as_role('app', 'appdb',
	q{CREATE FUNCTION public.json_build_object(VARIADIC "any") RETURNS json LANGUAGE sql AS 'SELECT NULL::json'});
note('json_build_object(VARIADIC "any") look-alike: '
	  . ($vret == 0 ? 'created' : "not creatable ($verr)"));

is(su_exposed('appdb', 'SHOW search_path'), 'public, pg_catalog',
	'a new superuser session in appdb gets the hostile search_path');
is(safe_as('app', 'appdb', 'SHOW search_path'), 'app, public',
	"a new session of app in appdb gets app's role-in-database search_path");

# Positive control: the traps are armed.  spy, with the database's search
# path, walks into every one of them (and, not being a superuser, gains
# nothing for app).
my @armed = ('now()', 'random()', 'unnest(bigint[])', 'make_interval(secs integer)',
	'power(integer, integer)', 'pg_notify(text, text)', 'current_database()',
	'json_build_object(alert)', 'json_build_object(dead letter)',
	'bigint = bigint', 'text = text', 'timestamptz <= timestamptz');
safe_as('spy', 'appdb', q{
	SELECT now() IS NOT NULL, random() >= 0, (SELECT pg_catalog.count(*) FROM unnest('{1,2}'::bigint[])),
		make_interval(secs => 1), power(2, 3), current_database();
	SELECT pg_notify('nobody', 'x');
	SELECT json_build_object('event', 'e', 'database', pg_catalog.current_database(), 'id', 1::bigint);
	SELECT json_build_object('event', 'e', 'database', pg_catalog.current_database(), 'id', 1::bigint,
		'queue', 'q'::text);
	SELECT 1::bigint = 2::bigint, 'a'::text = 'b'::text,
		pg_catalog.clock_timestamp() <= pg_catalog.clock_timestamp();
});
is_deeply(
	[ sort split /\n/, su('appdb', "SELECT DISTINCT what FROM public.trap WHERE who = 'spy'") ],
	[ sort @armed ],
	'positive control: every look-alike is chosen over pg_catalog\'s with that search_path');
is(su('postgres', "SELECT rolsuper FROM pg_roles WHERE rolname = 'app'"),
	'f', 'and run by a non-superuser, gains app nothing');
su('appdb', 'DELETE FROM public.trap');

# ------------------------------------------------------------------
# the workers start over, so that they connect, and plan, with the traps
# in place

my $old = worker_pids();
is(scalar keys %$old, 2, 'relay and consumer pids before the restart');
su('postgres',
	'SELECT pg_terminate_backend(pid) FROM (' . worker_pid_query() . ') w');
my $old_list = join(',', values %$old);
wait_workers($node, 2, 'the postmaster starts both workers again (new pids)',
	db => 'appdb', where => "pid NOT IN ($old_list)");
my $pids = worker_pids();
wait_for($node, 'appdb',
	"SELECT pid = $pids->{'mqtx relay'} AND broker_connected FROM mqtx.relay_stats WHERE database = 'appdb'",
	't', 'the new relay is connected to the broker');
wait_for($node, 'appdb',
	"SELECT pid = $pids->{'mqtx consumer'} AND broker_connected FROM mqtx.consumer_stats WHERE database = 'appdb'",
	't', 'the new consumer is connected to the broker');

# ------------------------------------------------------------------
# spy listens to the alerts for the rest of the test

my $spy = do
{
	delete local $ENV{PGOPTIONS};
	$node->background_psql('appdb', extra_params => [ '-U', 'spy' ]);
};
$spy->query_safe('LISTEN mqtx_alert');
$spy->query_safe('LISTEN mqtx_dead_letter');
my $spy_out = '';

sub spy_notifications
{
	$spy_out .= $spy->query('SELECT 1');
	my @n;
	while ($spy_out =~
		/Asynchronous notification "([^"]+)" with payload "(.*)" received from server process with PID \d+\./g)
	{
		push @n, { channel => $1, payload => $2 };
	}
	return @n;
}

# ------------------------------------------------------------------
# subscriptions: the superuser's (from a session exposed to the traps:
# mqtx's own functions must not resolve names through it either)

su_exposed('appdb', q{
	SELECT mqtx.subscribe('app.q', 'app.app_handler(jsonb,jsonb)', max_attempts => 2);
	SELECT mqtx.subscribe('app.cards', 'app.card_handler(jsonb,jsonb)', max_attempts => 2);
	SELECT mqtx.subscribe('app.evil', 'app.evil_handler(jsonb,jsonb)', max_attempts => 2);
	SELECT mqtx.declare_queue('app.unused');
	SELECT mqtx.unsubscribe('app.unused');
	SELECT * FROM mqtx.outbox_stats;
	SELECT * FROM mqtx.relay_stats;
	SELECT * FROM mqtx.consumer_stats;
});
is(trap_rows(), '', 'a superuser calling mqtx.subscribe & co. in the hostile database springs no trap');
wait_queue_exists($url, $_) for qw(app.q app.cards app.evil);

# ------------------------------------------------------------------
# ordinary orders, as app: applied as app, with app's search_path

my $ordinary = 0;

sub publish_orders
{
	my ($from, $to) = @_;
	safe_as('app', 'appdb',
		"SELECT count(mqtx.publish('orders', 'order.created', jsonb_build_object('order_id', g))) "
		  . "FROM generate_series($from, $to) g");
	$ordinary += $to - $from + 1;
}

publish_orders(1, 10);
wait_for($node, 'appdb',
	"SELECT (SELECT count(*) FROM app.handled) + (SELECT count(*) FROM mqtx.dead_letter) >= $ordinary",
	't', 'the first 10 orders have been dealt with');
is(su('appdb', 'SELECT count(*) FROM app.handled'), $ordinary, 'they are applied');
is( su('appdb', 'SELECT DISTINCT who, path FROM app.handled'),
	'app|app, public',
	"the handler ran as app, with app's role-in-database search_path");
not_escalated('after the first orders');
note('session_user seen by the handler: '
	  . su('appdb', 'SELECT string_agg(DISTINCT session_who, \',\') FROM app.handled'));

# ------------------------------------------------------------------
# publishing and subscribing rights

my ($ret, $out, $err);
($ret, undef, $err) = as_role('app', 'otherdb',
	q{SELECT mqtx.publish('', 'x', '{"db": "other"}')});
isnt($ret, 0, 'app, granted publishing in appdb only, cannot publish in otherdb');
like($err, qr/permission denied/, 'with a permission error') or diag($err);
is( su('otherdb',
		"SELECT has_function_privilege('app', 'mqtx.publish(text,text,jsonb,jsonb,text,timestamptz,interval,text,text)', 'EXECUTE'), "
		  . "has_schema_privilege('app', 'mqtx', 'USAGE')"),
	'f|f', 'otherdb grants app neither EXECUTE on mqtx.publish nor USAGE on mqtx');
is(su('otherdb', 'SELECT count(*) FROM mqtx.outbox'), '0', 'nothing was enqueued in otherdb');
is( safe_as('app', 'appdb', q{SELECT mqtx.publish('', 'app.probe', '{"probe": 1}') IS NOT NULL}),
	't', 'while in appdb app can publish');
($ret, undef, $err) = as_role('app', 'appdb', 'SELECT count(*) FROM mqtx.outbox');
like($err, qr/permission denied for table outbox/, 'but not read the outbox');
($ret, undef, $err) = as_role('spy', 'appdb', q{SELECT mqtx.publish('', 'app.q', '{"order_id": 0}')});
like($err, qr/permission denied/, 'spy cannot publish in appdb');
($ret, undef, $err) = as_role('spy', 'appdb', 'SELECT count(*) FROM mqtx.dead_letter');
like($err, qr/permission denied/, 'spy cannot read the dead letters');
($ret, undef, $err) = as_role('app', 'appdb',
	q{SELECT mqtx.subscribe('app.mine', 'app.app_handler(jsonb,jsonb)')});
like($err, qr/permission denied for function subscribe/, 'mqtx.subscribe is not granted to app')
  or diag($err);

# a delegated writer of mqtx.subscriptions (given every right mqtx.subscribe
# needs) still cannot make the consumer run someone else's function
su('appdb', q{
	CREATE FUNCTION public.su_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$ BEGIN END $$;
	GRANT EXECUTE ON FUNCTION mqtx.subscribe(text, regprocedure, integer, integer, interval, text, integer) TO app;
	GRANT SELECT ON mqtx.queues TO app;
	GRANT SELECT, INSERT, UPDATE ON mqtx.subscriptions TO app;
});
($ret, undef, $err) = as_role('app', 'appdb',
	q{SELECT mqtx.subscribe('app.q', 'public.su_handler(jsonb,jsonb)', 100, 2)});
like($err, qr/permission denied to subscribe handler/,
	'delegated: mqtx.subscribe of a superuser-owned handler is refused') or diag($err);
($ret, undef, $err) = as_role('app', 'appdb',
	q{UPDATE mqtx.subscriptions SET handler = 'public.su_handler(jsonb,jsonb)' WHERE queue = 'app.q'});
like($err, qr/permission denied to subscribe handler/,
	'delegated: an UPDATE of the handler to it is refused') or diag($err);
($ret, undef, $err) = as_role('app', 'appdb',
	q{INSERT INTO mqtx.subscriptions (queue, handler) VALUES ('app.stolen', 'public.su_handler(jsonb,jsonb)')});
like($err, qr/permission denied to subscribe handler/,
	'delegated: a direct INSERT of it is refused') or diag($err);
($ret, undef, $err) = as_role('app', 'appdb',
	q{SELECT mqtx.subscribe('app.q', 'app.app_handler(jsonb,jsonb)', 100, 2)});
is($ret, 0, 'delegated: subscribing its own function is allowed') or diag($err);
su('appdb', q{
	REVOKE EXECUTE ON FUNCTION mqtx.subscribe(text, regprocedure, integer, integer, interval, text, integer) FROM app;
	REVOKE SELECT ON mqtx.queues FROM app;
	REVOKE SELECT, INSERT, UPDATE ON mqtx.subscriptions FROM app;
	DROP FUNCTION public.su_handler(jsonb, jsonb);
});
is( su('appdb', 'SELECT queue, handler::text FROM mqtx.subscriptions ORDER BY queue'),
	"app.cards|app.card_handler(jsonb,jsonb)\napp.evil|app.evil_handler(jsonb,jsonb)\napp.q|app.app_handler(jsonb,jsonb)",
	'the subscriptions are the superuser\'s three, unchanged');
# (should a write have got through, undo it, so that the rest still runs)
su('appdb', q{
	DELETE FROM mqtx.subscriptions WHERE queue NOT IN ('app.q', 'app.cards', 'app.evil');
	SELECT mqtx.subscribe('app.q', 'app.app_handler(jsonb,jsonb)', max_attempts => 2);
});

# ------------------------------------------------------------------
# app replaces its subscribed handler with one that makes itself superuser

safe_as('app', 'appdb', q{
	CREATE OR REPLACE FUNCTION app.app_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO handled (who, session_who, path, payload)
		VALUES (current_user, session_user, 'EVIL MARKER', payload);
		ALTER ROLE app SUPERUSER;
	END $$;
	SELECT mqtx.publish('', 'app.q', '{"order_id": -1, "evil": true}');
});
# (waits for either outcome, so that a hole fails fast)
wait_for($node, 'appdb',
	"SELECT (SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'app.q') "
	  . "+ (SELECT count(*) FROM mqtx.inbox WHERE queue = 'app.q') > $ordinary",
	't', 'the escalating handler\'s message has been dealt with');
is(su('appdb', "SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'app.q'"),
	'1', 'it is dead-lettered');
($out) = su('appdb',
	"SELECT attempts || '|' || error_message FROM mqtx.dead_letter WHERE queue = 'app.q'");
like($out, qr/^2\|.*(?:permission denied|must be superuser)/,
	'after 2 attempts, with the permission error') or diag($out);
is(su('postgres', "SELECT rolsuper FROM pg_roles WHERE rolname = 'app'"), 'f',
	'app is still not a superuser');
is(su('appdb', "SELECT count(*) FROM app.handled WHERE path = 'EVIL MARKER'"), '0',
	'nothing of the failed handler was kept');
not_escalated('after the escalating handler');
safe_as('app', 'appdb', q{
	CREATE OR REPLACE FUNCTION app.app_handler(payload jsonb, headers jsonb) RETURNS void
	LANGUAGE plpgsql AS $$
	BEGIN
		INSERT INTO handled (who, session_who, path, payload)
		VALUES (current_user, session_user, current_setting('search_path'), payload);
	END $$;
});

# ------------------------------------------------------------------
# a handler error that quotes a secret from the payload; the other
# escalations; an unroutable message and one to an exchange without
# bindings

my $card = '4111111111111111';
my %escape = (
	# (PostgreSQL names the identity change first, when both apply)
	set_role =>
	  qr/cannot set parameter "role" within security-(?:definer function|restricted operation)/,
	session_authorization =>
	  qr/cannot set parameter "session_authorization" within security-(?:definer function|restricted operation)/,
	listen => qr/cannot execute LISTEN within (?:a background process|security-restricted operation)/);
# allowed, but they must not outlive the handler nor run as anyone else:
# the deferred trigger fires when the handler returns, as app; the temp
# table is gone before the next handler; the session-level search_path is
# rolled back
my @applied = ('deferred_trigger', 'sticky_search_path', 'temp_table', 'temp_probe');
my @attacks = (sort(keys %escape), @applied);
safe_as('app', 'appdb',
	"SELECT mqtx.publish('', 'app.cards', '{\"card\": \"$card\"}');\n"
	  . join('', map { "SELECT mqtx.publish('', 'app.evil', '{\"attack\": \"$_\"}');\n" } @attacks)
	  . "SELECT mqtx.publish('orders', 'nobody.listens', '{\"lost\": 1}');\n"
	  . "SELECT mqtx.publish('lonely', 'any.key', '{\"lost\": 2}');\n");
# and ordinary orders right behind the sticky search_path, in the same
# consumer session
publish_orders(11, 20);

wait_for($node, 'appdb',
	"SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'app.cards'",
	'1', 'the card handler\'s message is dead-lettered');
is( su('appdb', "SELECT error_message FROM mqtx.dead_letter WHERE queue = 'app.cards'"),
	"card $card declined", 'with its error (the secret stays in mqtx.dead_letter)');
# (a dead letter writes its message's inbox row too)
wait_for($node, 'appdb',
	"SELECT count(*) FROM mqtx.inbox WHERE queue = 'app.evil'",
	scalar(@attacks), 'every message of app.evil has been dealt with');
is(su('appdb', "SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'app.evil'"),
	scalar(keys %escape), 'every escape attempt from the handler is dead-lettered');
for my $attack (sort keys %escape)
{
	my $msg = su('appdb',
		"SELECT attempts || '|' || error_message FROM mqtx.dead_letter "
		  . "WHERE queue = 'app.evil' AND body_json->>'attack' = '$attack'");
	like($msg, qr/^2\|.*$escape{$attack}/, "$attack: refused in the handler, after 2 attempts")
	  or diag($msg);
}
is( su('appdb', 'SELECT string_agg(attack || \':\' || who || \':\' || path, \',\' ORDER BY attack COLLATE "C") FROM app.evil_log'),
	'deferred_trigger:app:app, public,sticky_search_path:app:app, public,'
	  . 'temp_probe:app:app, public,temp_probe:true:app:,temp_table:app:app, public',
	'only the harmless attempts were applied (as app, with app\'s search_path), and the temp table was gone for the next handler');
is( su('appdb', "SELECT string_agg(who, ',') FROM public.trap WHERE what = 'deferred trigger'"),
	'app', 'the deferred trigger fired once, as app, when the handler returned (not as the worker at commit)');
wait_for($node, 'appdb',
	"SELECT count(*) FROM mqtx.outbox WHERE status = 'failed' AND payload ? 'lost'",
	'2', 'the unroutable message and the one to an exchange without bindings end failed');
is( su('appdb',
		"SELECT string_agg(attempts || ':' || (last_error LIKE '%NO_ROUTE%'), ',' ORDER BY id) "
		  . "FROM mqtx.outbox WHERE payload ? 'lost'"),
	'2:true,2:true', 'after mqtx.max_attempts = 2, returned by the broker');
wait_for($node, 'appdb', 'SELECT count(*) FROM app.handled', $ordinary,
	'the orders behind them are applied');
not_escalated('after the dead letters and failed rows');

# ------------------------------------------------------------------
# the broker password in ALTER SYSTEM: masked in pg_stat_activity,
# pg_stat_statements and the server log

# (nothing in flight when the relay reconnects: no message is sent twice)
wait_for($node, 'appdb', "SELECT count(*) FROM mqtx.outbox WHERE status = 'pending'",
	'0', 'the relay has nothing in flight');
my $password = 'Pw4mqtxSvcQ7zXk2';
$mq->add_user('mqtxsvc', $password);
my $secret_url = $mq->url(user => 'mqtxsvc', password => $password);
(my $masked_url = $secret_url) =~ s/\Q$password\E/'*' x length($password)/e;

my $setter = $node->background_psql('postgres');
my $setter_pid = $setter->query_safe('SELECT pg_backend_pid()');
# exactly one statement, so that it stays the session's last
$setter->query_until(qr/altered/,
	"ALTER SYSTEM SET mqtx.broker_url = '$secret_url';\n\\echo altered\n");
su('postgres', 'SELECT pg_reload_conf()');

my $activity = su('postgres',
	"SELECT state || '|' || query FROM pg_stat_activity WHERE pid = $setter_pid");
like($activity, qr/^idle\|ALTER SYSTEM SET mqtx\.broker_url/,
	'the setting session is idle after ALTER SYSTEM') or diag($activity);
unlike($activity, qr/\Q$password\E/, 'pg_stat_activity.query does not show the password');
like($activity, qr/\Q$masked_url\E/, 'it shows the URL with one * per password character');
my $statements = su('postgres',
	"SELECT string_agg(query, E'\\n') FROM public.pg_stat_statements WHERE query ILIKE 'ALTER SYSTEM%broker_url%'");
isnt($statements, '', 'pg_stat_statements recorded the ALTER SYSTEM');
unlike($statements, qr/\Q$password\E/, 'pg_stat_statements does not hold the password');
like($statements, qr/\*\*\*\*/, 'it holds the masked URL') or diag($statements);
$setter->quit;
unlike(su('postgres', 'SHOW mqtx.broker_url'), qr/\Q$password\E/,
	'SHOW mqtx.broker_url does not show it');

wait_until('the workers reconnect with the new URL (as mqtxsvc)', sub {
	my $users = $mq->ctl('list_connections', '-q', '--no-table-headers', 'user');
	(() = $users =~ /^mqtxsvc$/mg) >= 2;
});
safe_as('app', 'appdb',
	"INSERT INTO app.orders SELECT g, 'item ' || g FROM generate_series(21, 30) g");
$ordinary += 10;
wait_for($node, 'appdb', 'SELECT count(*) FROM app.handled', $ordinary,
	'orders inserted through the outbox trigger after the change are applied');

# ------------------------------------------------------------------
# what spy heard

my @notes;
my $dead_letter_count = su('appdb', 'SELECT count(*) FROM mqtx.dead_letter');
cmp_ok($dead_letter_count, '>=', 5, 'the dead letters are there to be heard of');
wait_until('spy received every dead letter and alert notification', sub {
	@notes = spy_notifications();
	(grep { $_->{channel} eq 'mqtx_dead_letter' } @notes) >= $dead_letter_count
	  && (grep { $_->{channel} eq 'mqtx_alert' } @notes) >= 2;
});
my @dead = grep { $_->{channel} eq 'mqtx_dead_letter' } @notes;
my @alerts = grep { $_->{channel} eq 'mqtx_alert' } @notes;
ok(@dead >= 1 && @alerts >= 1, 'spy got at least one notification of each kind');
note("spy: $_->{channel} $_->{payload}") for @notes;

my %dead_letters = map { split /\|/ } split /\n/,
  su('appdb', 'SELECT id, queue FROM mqtx.dead_letter');
my %failed = map { $_ => 1 } split /\n/,
  su('appdb', "SELECT id FROM mqtx.outbox WHERE status = 'failed'");
my @secrets = ($card, 'declined', 'orders', 'lonely', 'nobody.listens', 'any.key',
	'order.created', 'NO_ROUTE', 'unroutable', 'permission', 'superuser',
	'security-restricted', 'attack', 'lost',
	split(/\n/, su('appdb',
		"SELECT message_id FROM mqtx.dead_letter UNION ALL "
		  . "SELECT message_id::text FROM mqtx.outbox WHERE status = 'failed'")));

my (%seen_dead, %seen_failed);
my $all_clean = 1;
for my $n (@notes)
{
	my $p = eval { decode_json($n->{payload}) };
	if (!ok(ref $p eq 'HASH', "$n->{channel} payload is a JSON object"))
	{
		diag($n->{payload});
		next;
	}
	if ($n->{channel} eq 'mqtx_dead_letter')
	{
		is(join(',', sort keys %$p), 'database,event,id,queue',
			'a dead-letter payload has exactly event, database, id, queue');
		is_deeply([ @$p{qw(event database)} ], [ 'dead_letter', 'appdb' ],
			'  event dead_letter, database appdb');
		ok(defined $p->{id} && defined $dead_letters{ $p->{id} }
			  && $dead_letters{ $p->{id} } eq ($p->{queue} // ''),
			"  id $p->{id} is a dead letter of queue " . ($p->{queue} // 'undef'));
		$seen_dead{ $p->{id} } = 1 if defined $p->{id};
	}
	else
	{
		is(join(',', sort keys %$p), 'database,event,id',
			'an alert payload has exactly event, database, id');
		is_deeply([ @$p{qw(event database)} ], [ 'outbox_message_failed', 'appdb' ],
			'  event outbox_message_failed, database appdb');
		ok(defined $p->{id} && $failed{ $p->{id} }, "  id $p->{id} is a failed outbox row");
		$seen_failed{ $p->{id} } = 1 if defined $p->{id};
	}
	for my $s (@secrets)
	{
		if (index($n->{payload}, $s) >= 0)
		{
			$all_clean = 0;
			diag("$n->{channel} payload contains '$s': $n->{payload}");
		}
	}
}
ok($all_clean, 'no payload contains the card number, a message id, an exchange, '
	  . 'a routing key or error text');
is_deeply([ sort keys %seen_dead ], [ sort keys %dead_letters ],
	'one dead-letter notification per dead letter');
is_deeply([ sort keys %seen_failed ], [ sort keys %failed ],
	'one alert per failed outbox row');
$spy->quit;

# ------------------------------------------------------------------
# the end state

is(su('postgres', "SELECT rolsuper FROM pg_roles WHERE rolname = 'app'"), 'f',
	'app is not a superuser');
is(trap_rows(), '', 'public.trap is empty: no look-alike ever ran');
is( su('appdb',
		"SELECT count(*), count(DISTINCT payload->>'order_id'), min((payload->>'order_id')::int), "
		  . "max((payload->>'order_id')::int), count(*) FILTER (WHERE who <> 'app' OR path <> 'app, public') "
		  . "FROM app.handled"),
	"$ordinary|$ordinary|1|$ordinary|0",
	"all $ordinary ordinary orders were applied exactly once, as app");
# (and one per dead letter: a later copy of it is a duplicate)
is( su('appdb',
		"SELECT count(*) - (SELECT count(*) FROM mqtx.dead_letter WHERE queue = 'app.q') "
		  . "FROM mqtx.inbox WHERE queue = 'app.q'"),
	$ordinary, 'the inbox holds one row per ordinary order');
# the probe, the replaced handler's message and the card (3), and the attacks
my $published_others = 3 + scalar(@attacks);
wait_for($node, 'appdb',
	"SELECT count(*) FILTER (WHERE status = 'published') = $ordinary + $published_others "
	  . "AND count(*) FILTER (WHERE status = 'pending') = 0 FROM mqtx.outbox",
	't', 'every other outbox row was published');
wait_until("orders.audit received the $ordinary orders once each", sub {
	my $n = queue_count($url, 'orders.audit');
	defined $n && $n == $ordinary;
});
my $now = worker_pids();
is_deeply($now, $pids, 'the relay and the consumer still run, with the pids of the restart');

ok(!$node->log_contains(qr/a library loaded after mqtx sees statements/),
	'no warning about library order with pg_stat_statements listed before mqtx');

# listed the other way round, the server says so at start
my $log_offset = -s $node->logfile;
$node->stop;
$node->append_conf('postgresql.conf', "shared_preload_libraries = 'mqtx,pg_stat_statements'\n");
$node->start;
ok( $node->log_contains(
		qr/WARNING:  mqtx: a library loaded after mqtx sees statements before mqtx masks broker passwords in them/,
		$log_offset),
	'with mqtx listed before pg_stat_statements, a WARNING is logged at server start');
ok(!$node->log_contains(qr/\Q$password\E/), 'the server log does not contain the password');
$node->stop;

done_testing();
