#!/usr/bin/python3
"""delay_proxy: a TCP proxy on loopback that delays the bytes of each
direction by a fixed time, keeping their order.  The mqtx TAP tests put it
between PostgreSQL and RabbitMQ to make a slow broker (late confirms).

  delay_proxy.py --target PORT [--target-host 127.0.0.1] [--port 0]
                 [--down-delay-ms 300] [--up-delay-ms 0] [--max-seconds 900]

"down" is broker -> client (what the target sends), "up" client -> broker.
Once listening it prints "PORT=N" (the port it bound; --port 0 picks a free
one) on stdout and flushes.  It stops, closing every connection, on SIGTERM
or SIGINT, when its standard input reaches end of file (the test that
started it is gone), or after --max-seconds.  Stdlib only.

While it runs, a line "down MS" or "up MS" on standard input changes that
direction's delay for the bytes that arrive from then on (the order of
the bytes is kept: a shorter delay never overtakes a longer one).
"""

import argparse
import os
import queue
import signal
import socket
import sys
import threading
import time

CHUNK = 65536


# the current delay of each direction, in seconds; stdin may change them
DELAYS = {'down': 0.0, 'up': 0.0}


class Pipe:
    """One direction of one connection: bytes read from src are written to
    dst DELAYS[direction] seconds after they arrived, in order."""

    def __init__(self, src, dst, direction, on_done):
        self.src = src
        self.dst = dst
        self.direction = direction
        self.on_done = on_done
        self.pending = queue.Queue()

    def start(self):
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self):
        try:
            while True:
                data = self.src.recv(CHUNK)
                if not data:
                    break
                self.pending.put((time.monotonic() + DELAYS[self.direction], data))
        except OSError:
            pass
        self.pending.put((time.monotonic() + DELAYS[self.direction], None))

    def _write(self):
        try:
            while True:
                due, data = self.pending.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if data is None:
                    # the sender finished: pass the end of file on
                    self.dst.shutdown(socket.SHUT_WR)
                    break
                self.dst.sendall(data)
        except OSError:
            pass
        self.on_done()


class Connection:
    def __init__(self, client, target, registry):
        self.client = client
        self.registry = registry
        self.lock = threading.Lock()
        self.open_pipes = 2
        self.upstream = socket.create_connection(target, timeout=10)
        self.upstream.settimeout(None)
        for s in (self.client, self.upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pipes = [Pipe(client, self.upstream, 'up', self._pipe_done),
                      Pipe(self.upstream, client, 'down', self._pipe_done)]

    def start(self):
        for p in self.pipes:
            p.start()

    def _pipe_done(self):
        with self.lock:
            self.open_pipes -= 1
            last = self.open_pipes == 0
        # a failed write ends the connection; a clean end of file waits for
        # the other direction
        if last:
            self.close()

    def close(self):
        for s in (self.client, self.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.registry.discard(self)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--target', type=int, required=True, help='target port')
    ap.add_argument('--target-host', default='127.0.0.1')
    ap.add_argument('--host', default='127.0.0.1', help='address to listen on')
    ap.add_argument('--port', type=int, default=0, help='port to listen on (0: any free)')
    ap.add_argument('--down-delay-ms', type=float, default=300.0,
                    help='delay of target -> client bytes')
    ap.add_argument('--up-delay-ms', type=float, default=0.0,
                    help='delay of client -> target bytes')
    ap.add_argument('--max-seconds', type=float, default=900.0,
                    help='stop after this long, whatever happens')
    args = ap.parse_args()
    if args.host not in ('127.0.0.1', 'localhost', '::1') or \
            args.target_host not in ('127.0.0.1', 'localhost', '::1'):
        ap.error('loopback addresses only')

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(64)
    connections = set()
    stop = threading.Event()

    def shut_down(*_):
        stop.set()

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)

    DELAYS['down'] = args.down_delay_ms / 1000.0
    DELAYS['up'] = args.up_delay_ms / 1000.0

    def watch_stdin():
        try:
            for line in sys.stdin:
                words = line.split()
                if len(words) == 2 and words[0] in DELAYS:
                    DELAYS[words[0]] = float(words[1]) / 1000.0
                    print('DELAY %s=%s' % (words[0], words[1]), flush=True)
        except (OSError, ValueError):
            pass
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()

    def accept_loop():
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                break
            try:
                conn = Connection(client, (args.target_host, args.target),
                                  connections)
            except OSError as e:
                print('delay_proxy: cannot reach the target: %s' % e,
                      file=sys.stderr, flush=True)
                client.close()
                continue
            connections.add(conn)
            conn.start()

    threading.Thread(target=accept_loop, daemon=True).start()
    print('PORT=%d' % listener.getsockname()[1], flush=True)
    stop.wait(args.max_seconds)
    listener.close()
    for conn in list(connections):
        conn.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
