#!/usr/bin/python3
"""publish_raw.py: publish raw AMQP messages, with publisher confirms, for
the mqtx TAP tests.  Unlike amqp_tool it can send what a well-behaved
client would not: message ids, routing keys, exchange names and header keys
and values that are arbitrary bytes (invalid UTF-8, NUL bytes), header
tables nested to any depth, and bodies of any bytes.

  publish_raw.py --url URL FILE          (FILE: one JSON object per line)

Each line describes one message; a "bytes" value below is either a JSON
string (sent as its UTF-8) or {"hex": "ff00..."} (sent as those bytes):

  exchange     bytes, default ""           routing_key  bytes (required)
  message_id   bytes, absent: no message_id property
  body         bytes (required)
  headers      a table: a list of [key, value] pairs, key bytes; a value is
               a JSON string (long string, UTF-8), {"hex": ...} (long string
               'S' of those raw bytes), {"bytes": hex} (byte array 'x'),
               {"table": [[k, v], ...]}, {"nest": [depth, key, leaf]} (depth
               nested tables, as for headers_nest), an integer, true/false,
               null, or a list (array)
  headers_nest [depth, key, leaf]: the headers are depth nested tables
               (the headers table itself counts as one), the innermost
               {"leaf": leaf}, each outer one {key: inner}

All messages go out on one channel in file order (persistent, mandatory),
pipelined; the tool exits 0 once every one is confirmed (basic.ack) and none
was returned, 1 on a nack, a return, a connection failure or a timeout.
"""
import argparse
import json
import struct
import sys

import pika
import pika.data
import pika.exceptions


class LongString(bytes):
    """Raw bytes sent as an AMQP long string ('S'), not a byte array."""


_encode_value = pika.data.encode_value


def encode_value(pieces, value):
    if isinstance(value, LongString):
        pieces.append(struct.pack('>cI', b'S', len(value)))
        pieces.append(bytes(value))
        return 5 + len(value)
    return _encode_value(pieces, value)


# encode_table looks encode_value up in its module at every call
pika.data.encode_value = encode_value


class Table(dict):
    """An AMQP table whose keys may be bytes (pika encodes keys with
    as_bytes, which passes bytes through)."""


def raw(spec):
    if isinstance(spec, dict):
        return bytes.fromhex(spec['hex'])
    return spec.encode('utf-8')


def nest(depth, key, leaf):
    table = Table({'leaf': value(leaf)})
    for _ in range(depth - 1):
        table = Table({key: table})
    return table


def table(pairs):
    return Table((raw(k), value(v)) for k, v in pairs)


def value(spec):
    if isinstance(spec, str):
        return spec
    if isinstance(spec, bool) or spec is None or isinstance(spec, int):
        return spec
    if isinstance(spec, list):
        return [value(v) for v in spec]
    if 'hex' in spec:
        return LongString(bytes.fromhex(spec['hex']))
    if 'bytes' in spec:
        return bytes.fromhex(spec['bytes'])
    if 'table' in spec:
        return table(spec['table'])
    if 'nest' in spec:
        return nest(*spec['nest'])
    raise ValueError('unknown header value %r' % (spec,))


def message(line):
    m = json.loads(line)
    headers = None
    if 'headers_nest' in m:
        headers = nest(*m['headers_nest'])
    elif 'headers' in m:
        headers = table(m['headers'])
    props = pika.BasicProperties(
        delivery_mode=2, content_type='application/json',
        message_id=raw(m['message_id']) if 'message_id' in m else None,
        headers=headers)
    return (raw(m.get('exchange', '')), raw(m['routing_key']),
            raw(m['body']), props)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--url', required=True)
    ap.add_argument('--timeout', type=float, default=120.0)
    ap.add_argument('file')
    args = ap.parse_args()
    with open(args.file, encoding='utf-8') as f:
        messages = [message(l) for l in f if l.strip()]

    # confirms of messages routed to different queues can come out of
    # order: keep the set of delivery tags (1 .. total) not yet confirmed
    total = len(messages)
    state = {'unconfirmed': set(range(1, total + 1)), 'failed': [], 'done': False}

    def finish(conn, failure=None):
        if state['done']:
            return      # e.g. the channel closing as the connection closes
        if failure:
            state['failed'].append(failure)
        state['done'] = True
        if conn.is_open:
            conn.close()
        else:
            conn.ioloop.stop()

    def on_confirm(frame):
        method = frame.method
        tag = method.delivery_tag
        if isinstance(method, pika.spec.Basic.Nack):
            finish(conn, 'nack for delivery tag %d' % tag)
            return
        if method.multiple:
            state['unconfirmed'] = {t for t in state['unconfirmed'] if t > tag}
        else:
            state['unconfirmed'].discard(tag)
        if not state['unconfirmed']:
            finish(conn)

    def on_return(channel, method, props, body):
        state['failed'].append('returned: %s (exchange %r, routing key %r, message_id %r)'
                               % (method.reply_text, method.exchange,
                                  method.routing_key, props.message_id))

    def on_confirm_mode(frame):
        for exchange, routing_key, body, props in messages:
            state['channel'].basic_publish(exchange, routing_key, body, props,
                                           mandatory=True)

    def on_channel(ch):
        state['channel'] = ch
        ch.add_on_return_callback(on_return)
        ch.add_on_close_callback(
            lambda c, reason: finish(conn, 'channel closed: %s' % (reason,)))
        ch.confirm_delivery(ack_nack_callback=on_confirm, callback=on_confirm_mode)

    def on_open(c):
        if total == 0:
            finish(c)
            return
        c.channel(on_open_callback=on_channel)

    def on_open_error(c, err):
        state['failed'].append('cannot connect: %s' % (err,))
        c.ioloop.stop()

    def on_close(c, reason):
        if not state['done']:
            state['failed'].append('connection closed: %s' % (reason,))
        c.ioloop.stop()

    conn = pika.SelectConnection(pika.URLParameters(args.url),
                                 on_open_callback=on_open,
                                 on_open_error_callback=on_open_error,
                                 on_close_callback=on_close)
    conn.ioloop.call_later(args.timeout, lambda: finish(
        conn, 'timed out waiting for confirms'))
    conn.ioloop.start()
    if state['failed'] or state['unconfirmed']:
        for f in state['failed']:
            print('publish_raw.py: ' + f, file=sys.stderr)
        print('publish_raw.py: %d of %d messages confirmed'
              % (total - len(state['unconfirmed']), total), file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
