#!/usr/bin/env python3
"""The series' load client, on smallmsg.Client.

    python client.py --count 2000000              # against a server on 127.0.0.1:8005
    python client.py --spawn --count 10000000     # start a local smallmsg.py, load it, stop it

Each round sends --count frames on one connection (ids go on across rounds), waits until every
frame is acknowledged, and prints the series' line:

    elapsed usec=N avg(usec/call)=X avg(call/msec)=Y avg(call/sec)=Z
"""

import argparse
import json
import os
import random
import selectors
import subprocess
import sys
import time

import smallmsg

SEED = 20261204              # mixed payload sizes are random, but the same in every run
MIXED_BLOCK_FRAMES = 1 << 16  # frames of mixed sizes laid out once, then sent again and again
SPAWN_TIMEOUT = 10.0


def payload_of(size):
    """The series' payload, "hello", stretched or cut to `size` bytes."""
    return (b"hello" * (size // 5 + 1))[:size]


def payload_sizes(text):
    """`N` or `A-B` (random sizes from A to B): returns (A, B)."""
    low, sep, high = text.partition("-")
    size = smallmsg.number_in(0, smallmsg.MAX_PAYLOAD, what="payload size")
    try:
        low = size(low)
        high = size(high) if sep else low
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"expected N or A-B: {exc}") from None
    if low > high:
        raise argparse.ArgumentTypeError(f"expected A <= B, not {text!r}")
    return low, high


class Load:
    """Sends one round of frames of the configured sizes."""

    def __init__(self, client, low, high):
        self.client = client
        self.payload = payload_of(low) if low == high else None
        if self.payload is None:
            rng = random.Random(SEED)
            self.block = smallmsg.FrameBlock(
                [payload_of(rng.randint(low, high)) for _ in range(MIXED_BLOCK_FRAMES)],
                client.mode)

    def send(self, count):
        client = self.client
        if self.payload is not None:
            client.send_many(self.payload, count)
            return
        while count:
            n = min(count, len(self.block))
            client.send_block(self.block, n)
            count -= n


class CommandError(Exception):
    """Something the command cannot get past: no server to connect to, or none spawned."""


def spawn_server(args):
    """Start smallmsg.py on a free port; returns (process, (host, port))."""
    here = os.path.dirname(os.path.abspath(__file__))
    command = [sys.executable, os.path.join(here, "smallmsg.py"), "--host", args.host,
               "--port", "0", "--log-level", "warning", "--mode", args.mode]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = ""
    with selectors.DefaultSelector() as selector:    # never wait forever for its first line
        selector.register(process.stdout, selectors.EVENT_READ)
        if selector.select(SPAWN_TIMEOUT):
            line = process.stdout.readline()
    address = smallmsg.listening_address(line)
    if address is None:
        stop_server(process)
        raise CommandError(f"the spawned server did not start (exit code {process.returncode})")
    return process, address


def stop_server(process):
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(SPAWN_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    process.stdout.close()


def connect(address, mode, timeout):
    try:
        return smallmsg.Client(address, mode=mode, timeout=timeout)
    except OSError as exc:
        raise CommandError(f"cannot connect to {address[0]}:{address[1]}: "
                           f"{exc.strerror or exc}") from None


def run_rounds(args, address, out):
    with connect(address, args.mode, args.timeout) as client:
        load = Load(client, *args.payload_size)
        for round_number in range(1, args.iterations + 1):
            start = time.perf_counter()
            first = client.sent
            first_byte = client.bytes_sent
            load.send(args.count)
            client.wait_acked(timeout=args.timeout)
            elapsed = time.perf_counter() - start
            usec = max(1, round(elapsed * 1e6))
            per_sec = args.count / elapsed
            round_bytes = client.bytes_sent - first_byte
            if args.json:
                record = {"round": round_number, "count": args.count, "first_id": first,
                          "elapsed_usec": usec, "messages_per_sec": per_sec,
                          "bytes": round_bytes, "bytes_per_sec": round_bytes / elapsed,
                          "payload_size": "-".join(map(str, args.payload_size))}
                out.write(json.dumps(record) + "\n")
            else:
                out.write(f"elapsed usec={usec} avg(usec/call)={usec / args.count:.7g} "
                          f"avg(call/msec)={per_sec / 1000:.4f} avg(call/sec)={per_sec:.1f}\n")
            out.flush()


def main(argv=None):
    parser = smallmsg.OneLineParser(prog="client.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    parser.add_argument("--port", type=smallmsg.port_number, default=smallmsg.DEFAULT_PORT,
                        help=f"server port (default {smallmsg.DEFAULT_PORT})")
    parser.add_argument("--count", type=smallmsg.number_in(1), default=2_000_000,
                        help="messages per round (default 2000000)")
    parser.add_argument("--iterations", type=smallmsg.number_in(1), default=1,
                        help="rounds on one connection, ids going on (default 1)")
    parser.add_argument("--payload-size", type=payload_sizes, default=(5, 5), metavar="N|A-B",
                        help="payload bytes: N, or A-B for random sizes with a fixed seed "
                             "(default 5: the series' 'hello')")
    parser.add_argument("--mode", choices=smallmsg.MODES, default=smallmsg.MODE_ACK,
                        help="ack (default) or request-reply, as the server runs")
    parser.add_argument("--timeout", type=smallmsg.positive_seconds,
                        default=smallmsg.DEFAULT_ACK_TIMEOUT,
                        help="seconds to wait for the server: to connect, to take more frames, "
                             "for the last ACK of a round (default 20)")
    parser.add_argument("--spawn", action="store_true",
                        help="start a local smallmsg.py on a free port, use it, stop it")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per round instead of the series' line")
    args = parser.parse_args(argv)

    server = None
    address = (args.host, args.port)
    try:
        if args.spawn:
            server, address = spawn_server(args)
        run_rounds(args, address, sys.stdout)
    except (smallmsg.SmallmsgError, CommandError) as exc:
        print(f"client.py: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:              # the output closed, say
        print(f"client.py: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("client.py: interrupted", file=sys.stderr)
        return 130
    finally:
        if server is not None:
            stop_server(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
