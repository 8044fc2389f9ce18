"""Tests of smallmsg: the parser (sans-IO), the server and client end to end, the command lines.

Every network test uses 127.0.0.1 and ephemeral ports; every loop is bounded in count and time.
Speed is never asserted here: bench.sh measures it.
"""

import collections
import contextlib
import inspect
import json
import logging
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

import smallmsg
from smallmsg import ACK_SIZE, HEADER_SIZE, FrameParser, ProtocolError

HERE = os.path.dirname(os.path.abspath(__file__))
LOOPBACK = ("127.0.0.1", 0)


# ------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------

def stream_of(payloads, first_id=0, mode=smallmsg.MODE_ACK):
    """The bytes of frames carrying `payloads`, numbered from `first_id`."""
    return b"".join(smallmsg.encode_frame(first_id + i, p, mode) for i, p in enumerate(payloads))


def reference_frames(data, max_payload=smallmsg.MAX_PAYLOAD, size_format="<I"):
    """An independent, obvious reading of a stream: (frames, bytes left over, error?)."""
    frames, pos = [], 0
    while len(data) - pos >= HEADER_SIZE:
        (frame_id,) = struct.unpack_from("<Q", data, pos)
        (size,) = struct.unpack_from(size_format, data, pos + 8)
        if size > max_payload:
            return frames, data[pos:], True
        if len(data) - pos - HEADER_SIZE < size:
            break
        frames.append((frame_id, bytes(data[pos + HEADER_SIZE:pos + HEADER_SIZE + size])))
        pos += HEADER_SIZE + size
    return frames, data[pos:], False


def parse(chunks, parser=None, ack_each=True):
    """Feed `chunks` through a parser, handling every batch: (frames, ACK bytes, parser, error)."""
    parser = parser or FrameParser()
    frames, acks, error = [], [], None
    for chunk in chunks:
        batch = parser.feed(chunk)
        frames.extend((frame_id, bytes(payload)) for frame_id, payload in batch)
        assert len(batch) == batch.count
        parser.handled(batch)
        if ack_each:
            acks.append(parser.take_ack())
        if batch.error is not None:
            error = batch.error
            break
    acks.append(parser.take_ack())
    return frames, b"".join(acks), parser, error


def acks_of(data):
    """ACK bytes as (id, skipped) records; the byte count must be whole records."""
    assert len(data) % ACK_SIZE == 0, f"{len(data)} bytes of ACKs is not whole records"
    return [smallmsg.ACK_RECORD.unpack_from(data, pos) for pos in range(0, len(data), ACK_SIZE)]


def check_ack_coverage(records, count):
    """The arithmetic check of the reference clients; returns the frames covered."""
    previous = -1
    for frame_id, skipped in records:
        assert previous + skipped + 1 == frame_id, (previous, skipped, frame_id)
        previous = frame_id
    assert previous + 1 == count
    return previous + 1


def chunked(data, size):
    return [data[i:i + size] for i in range(0, len(data), size)]


@contextlib.contextmanager
def running_server(handler=None, **options):
    """A Server on an ephemeral loopback port, serving in the background."""
    with smallmsg.Server(LOOPBACK, handler=handler, **options) as server:
        server.start()
        yield server


def recv_exactly(sock, n, timeout=5.0):
    sock.settimeout(timeout)
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def wait_for(condition, timeout=5.0, interval=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


ACK_STYLES = smallmsg.ACK_STYLES
MiB = 1 << 20


@pytest.fixture(autouse=True)
def no_crashed_threads():
    """Fail the test if any thread (a server thread above all) dies of an uncaught exception."""
    crashes = []
    previous = threading.excepthook

    def hook(args):
        crashes.append(f"{args.thread.name if args.thread else '?'}: "
                       f"{args.exc_type.__name__}: {args.exc_value}")
        previous(args)

    threading.excepthook = hook
    try:
        yield crashes
    finally:
        threading.excepthook = previous
    assert not crashes, f"threads crashed: {crashes}"


def peer_of(sock):
    """How the server names this client socket's end: 'host:port'."""
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


class Recorder:
    """A handler that keeps the frames it gets: all in order of arrival (`frames`), and per
    connection (`of(peer)`).

    The handler runs in the connection's own thread, named after the peer
    ('smallmsg-ack-127.0.0.1:PORT' or 'smallmsg-reader-127.0.0.1:PORT'), so the peer is read off
    the thread name.
    """

    def __init__(self):
        self.frames = []
        self.by_peer = collections.defaultdict(list)
        self.lock = threading.Lock()

    def __call__(self, batch):
        peer = threading.current_thread().name.rsplit("-", 1)[-1]
        frames = [(frame_id, bytes(payload)) for frame_id, payload in batch]
        with self.lock:
            self.frames.extend(frames)
            self.by_peer[peer].extend(frames)

    def of(self, peer):
        with self.lock:
            return list(self.by_peer.get(peer, ()))

    def pop(self, peer):
        with self.lock:
            return self.by_peer.pop(peer, [])


def read_until_closed(sock, timeout=5.0):
    """(bytes received, how it ended): 'eof', 'reset', or 'open' if still open at `timeout`."""
    sock.settimeout(0.2)
    data = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return bytes(data), "reset"
        if not chunk:
            return bytes(data), "eof"
        data += chunk
    return bytes(data), "open"


def read_acks_covering(sock, count, timeout=5.0):
    """Read ACK records until they cover `count` frames; returns the records."""
    sock.settimeout(0.2)
    data = bytearray()
    covered = 0
    deadline = time.monotonic() + timeout
    while covered < count and time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            break
        data += chunk
        whole = len(data) - len(data) % ACK_SIZE
        covered = sum(skipped + 1 for _, skipped in acks_of(bytes(data[:whole])))
    return acks_of(bytes(data))


def reset(sock):
    """Close with SO_LINGER 0: the peer gets a RST, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def messages(caplog, peer=None, min_level=logging.DEBUG):
    return [r.getMessage() for r in caplog.records
            if r.name == "smallmsg" and r.levelno >= min_level
            and (peer is None or peer in r.getMessage())]


def still_serves(server, count=1000):
    """A fresh client gets every frame acknowledged."""
    with smallmsg.Client(server.address) as client:
        client.send_many(b"hello", count)
        client.wait_acked(timeout=10)
        return client.acked == count


def serving(server):
    return server._thread is not None and server._thread.is_alive()


def small_rcvbuf_socket(address, rcvbuf=4096):
    """A client socket whose receive buffer is small (set before connecting, so it sticks)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(address)
    return sock


def push(sock, chunk, limit, deadline, stall=1.0, on_tick=None):
    """Send `chunk` again and again without ever reading, until `limit` bytes are sent,
    `deadline` (monotonic) passes, or the socket takes nothing for `stall` seconds.
    Returns (bytes pushed, True if it stalled: TCP backpressure)."""
    sock.setblocking(False)
    view = memoryview(chunk)
    pos = pushed = 0
    last_progress = time.monotonic()
    while pushed < limit and time.monotonic() < deadline:
        if on_tick is not None:
            on_tick()
        _, writable, _ = select.select([], [sock], [], 0.05)
        n = 0
        if writable:
            try:
                n = sock.send(view[pos:])
            except BlockingIOError:
                n = 0
        if n:
            pushed += n
            pos = (pos + n) % len(chunk)
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > stall:
            return pushed, True
    return pushed, False


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS line")


def kill(process):
    if process.poll() is None:
        process.kill()
    with contextlib.suppress(Exception):
        process.communicate(timeout=10)


def start_server(*args, **popen_options):
    """smallmsg.py on a free port: (process, host, port) once it says it listens. A server
    that does not start as expected is killed before the test fails, never waited on."""
    options = {"stderr": subprocess.PIPE, **popen_options}
    process = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "smallmsg.py"), "--port", "0", *args],
        stdout=subprocess.PIPE, text=True, **options)
    line = process.stdout.readline()
    address = smallmsg.listening_address(line)
    if address is None:
        kill(process)
        raise AssertionError(f"the server did not start: {line!r}")
    return process, *address


def client_py(*args):
    return subprocess.Popen([sys.executable, os.path.join(HERE, "client.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ------------------------------------------------------------------------------------------
# Parser
# ------------------------------------------------------------------------------------------

MIXED = [bytes([i % 251]) * (i % 37) for i in range(120)]


def test_whole_stream_in_one_feed_gives_every_frame_and_one_ack():
    data = stream_of(MIXED)
    frames, acks, parser, error = parse([data])
    assert error is None
    assert frames == list(enumerate(MIXED))
    assert acks_of(acks) == [(len(MIXED) - 1, len(MIXED) - 1)]
    assert parser.pending_bytes == 0


def test_split_at_every_byte_offset_gives_the_same_frames_and_acks():
    data = stream_of(MIXED[:40])
    for cut in range(len(data) + 1):
        frames, acks, _, error = parse([data[:cut], data[cut:]])
        assert error is None
        assert frames == list(enumerate(MIXED[:40])), cut
        before = len(reference_frames(data[:cut])[0])     # whole frames in the first part
        expected = [(before - 1, before - 1)] if before else []
        if before < 40:
            expected.append((39, 39 - before))
        assert acks_of(acks) == expected, cut


def test_byte_by_byte_feed():
    data = stream_of(MIXED[:30])
    frames, acks, _, error = parse([data[i:i + 1] for i in range(len(data))])
    assert error is None
    assert frames == list(enumerate(MIXED[:30]))
    check_ack_coverage(acks_of(acks), 30)


def test_empty_feeds_change_nothing_even_inside_a_header():
    data = stream_of([b"hello", b"world"])
    for cut in range(len(data) + 1):
        frames, _, _, error = parse([data[:cut], b"", data[cut:], b""])
        assert error is None and frames == [(0, b"hello"), (1, b"world")], cut


def test_zero_length_payloads():
    payloads = [b""] * 500 + [b"x"] + [b""] * 3
    frames, acks, _, _ = parse([stream_of(payloads)])
    assert frames == list(enumerate(payloads))
    check_ack_coverage(acks_of(acks), len(payloads))


def test_exactly_max_payload_is_accepted():
    payloads = [b"a" * 100, b"b" * 99, b"", b"c" * 100]
    frames, _, _, error = parse(chunked(stream_of(payloads), 7), FrameParser(max_payload=100))
    assert error is None
    assert frames == list(enumerate(payloads))


@pytest.mark.parametrize("chunk", [1, 5, 13, 1000])
def test_one_byte_over_max_payload_is_an_error_after_the_frames_before(chunk):
    good = [b"ok"] * 20
    data = stream_of(good) + smallmsg.encode_frame(20, b"x" * 101) + stream_of([b"late"], 21)
    frames, acks, parser, error = parse(chunked(data, chunk), FrameParser(max_payload=100))
    assert isinstance(error, ProtocolError)
    assert "101" in str(error) and "100" in str(error)
    assert frames == list(enumerate(good))
    check_ack_coverage(acks_of(acks), len(good))
    with pytest.raises(ProtocolError):
        parser.feed(b"more")


def test_garbage_is_an_error_not_a_crash():
    rng = random.Random(1)
    errors = 0
    for _ in range(200):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        expected, _, bad = reference_frames(data, 1000)
        frames, _, _, error = parse(chunked(data, rng.randrange(1, 50)), FrameParser(1000))
        assert frames == expected
        assert (error is not None) == bad
        errors += bad
    assert errors > 100    # random headers mostly announce huge payloads


def test_carried_bytes_never_exceed_max_payload_plus_a_header():
    """What a peer can make the parser hold: one frame of at most max_payload, nothing more."""
    limit = 5000
    parser = FrameParser(max_payload=limit)
    frame = smallmsg.encode_frame(0, b"z" * limit)
    held = 0
    for piece in chunked(frame[:-1], 333):
        assert not parser.feed(piece)
        held = max(held, parser.pending_bytes)
    assert held == len(frame) - 1 <= limit + HEADER_SIZE
    assert list(parser.feed(frame[-1:])) and parser.pending_bytes == 0
    # A header announcing more is refused as soon as it is whole, before any payload arrives.
    for size in (limit + 1, 0xFFFFFFFF):
        parser = FrameParser(max_payload=limit)
        batch = parser.feed(struct.pack("<QI", 0, size))
        assert batch.error is not None and parser.pending_bytes == 0


def test_request_reply_mode_reads_big_endian_sizes_and_answers_each_id():
    payloads = [b"hello", b"", b"x" * 300]
    data = stream_of(payloads, first_id=7, mode=smallmsg.MODE_REQUEST_REPLY)
    assert data[8:12] == b"\x00\x00\x00\x05"
    frames, acks, _, error = parse(chunked(data, 3), FrameParser(mode="request-reply"))
    assert error is None
    assert frames == [(7, b"hello"), (8, b""), (9, b"x" * 300)]
    assert acks == struct.pack("<3Q", 7, 8, 9)


def test_ack_splits_when_skipped_would_pass_its_limit():
    parser = FrameParser()
    parser.max_ack_cover = 10       # stands for 2**32 frames
    data = stream_of([b"m"] * 25 + [b"odd size"] + [b"m"] * 9)
    _, acks, _, _ = parse([data[:100], data[100:]], parser, ack_each=False)
    records = acks_of(acks)
    assert records == [(9, 9), (19, 9), (29, 9), (34, 4)]
    check_ack_coverage(records, 35)


def test_batch_bulk_views_match_frame_by_frame():
    payloads = [b"hello"] * 300 + [b"odd"] + [b"hello"] * 50 + MIXED[:20]
    parser = FrameParser()
    batch = parser.feed(stream_of(payloads, first_id=1000))
    assert any(seg.frame_size for seg in batch.segments)     # a uniform run was found
    assert list(batch.ids) == list(range(1000, 1000 + len(payloads)))
    assert batch.payloads() == b"".join(payloads)
    assert batch.payload_nbytes == len(b"".join(payloads))
    assert batch.id_bytes() == struct.pack(f"<{len(payloads)}Q", *batch.ids)
    assert batch.last_id == struct.pack("<Q", 1000 + len(payloads) - 1)
    assert batch.frame_id_bytes(300) == struct.pack("<Q", 1300)
    run = next(seg for seg in batch.segments if seg.frame_size)
    assert run.raw.nbytes == run.count * run.frame_size == run.end - run.start
    assert run.rows().shape == (run.count, 17)
    first = bytes(run.rows().tolist()[0])
    assert first == smallmsg.encode_frame(struct.unpack_from("<Q", first)[0], b"hello")
    mixed = next(seg for seg in batch.segments if not seg.frame_size)
    with pytest.raises(ValueError):
        mixed.rows()


# Fast paths against the exact path, on the same bytes -------------------------------------

def exact_and_fast(data, chunks):
    """Parse `chunks` with run checks and without: both must give the same frames and ACKs."""
    fast = parse(chunks, FrameParser())
    exact = parse(chunks, FrameParser(fast_runs=False))
    assert fast[0] == exact[0]
    assert fast[1] == exact[1]
    assert fast[3] is None and exact[3] is None
    return fast


@pytest.mark.parametrize("size", [0, 1, 5, 100, 255, 256, 70000])
def test_uniform_run_fast_equals_exact(size):
    count = 40 if size > 1000 else 2000
    payloads = [bytes([i % 256]) * size for i in range(count)]
    data = stream_of(payloads)
    frames, acks, _, _ = exact_and_fast(data, [data])
    assert frames == list(enumerate(payloads))


def test_run_broken_by_one_odd_frame_at_every_position():
    count = 150
    for odd in range(count):
        payloads = [b"hello"] * count
        payloads[odd] = b"hello!"
        data = stream_of(payloads)
        frames, _, _, _ = exact_and_fast(data, [data])
        assert frames == list(enumerate(payloads)), odd


def test_run_broken_by_a_size_differing_in_each_byte_of_the_field():
    for odd_size in (5 + 1, 5 + 256, 5 + 65536, 5 + (1 << 24)):
        payloads = [b"hello"] * 200
        data = bytearray(stream_of(payloads))
        # Corrupt one size field deep in the run: only one byte of it differs.
        struct.pack_into("<I", data, 100 * 17 + 8, odd_size)
        fast = parse([bytes(data)], FrameParser(max_payload=1 << 25))
        exact = parse([bytes(data)], FrameParser(max_payload=1 << 25, fast_runs=False))
        assert fast[0] == exact[0] == reference_frames(bytes(data), 1 << 25)[0]
        assert fast[1] == exact[1]


def test_run_cut_at_every_offset_by_the_read_boundary():
    payloads = [b"hello"] * 120 + [b"12345678"] * 60
    data = stream_of(payloads)
    for cut in range(len(data) + 1):
        frames, _, parser, _ = exact_and_fast(data, [data[:cut], data[cut:]])
        assert frames == list(enumerate(payloads)), cut
        assert parser.pending_bytes == 0


def test_random_mixtures_fast_equals_exact():
    rng = random.Random(7)
    for _ in range(60):
        payloads = []
        while len(payloads) < 2000:
            size = rng.choice([0, 5, 5, 5, rng.randrange(300)])
            payloads += [b"p" * size] * rng.choice([1, 2, 9, 70, 500])
        data = stream_of(payloads)
        cuts = sorted(rng.sample(range(len(data)), 5))
        chunks = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        frames, acks, _, _ = exact_and_fast(data, chunks)
        assert frames == list(enumerate(payloads))


def test_mixed_sizes_do_not_make_run_checks_quadratic():
    """Alternating sizes: each run check fails at once; the work stays linear in the frames."""
    calls = []
    parser = FrameParser()
    original = parser._run_length
    parser._run_length = lambda *args: calls.append(1) or original(*args)
    payloads = [b"a" * (i % 2) for i in range(20000)]
    parser.feed(stream_of(payloads))
    assert len(calls) < len(payloads) / 50


@pytest.mark.parametrize("first_id, count", [
    (0, 1), (0, 65536), (65530, 20), (65536 * 255 - 3, 9), ((1 << 40) - 5, 10),
    ((1 << 64) - 300, 300), (123, 7),
])
def test_frame_block_ids_written_in_columns_equal_frame_by_frame(first_id, count):
    """The client's bulk id writes (8 strided byte columns, most skipped when unchanged) give
    the same bytes as encoding each frame, across the low-16-bit wrap and high-byte carries."""
    block = smallmsg.FrameBlock.uniform(b"hello", 65536)
    block.number(0)                                  # columns left from an earlier use
    data = bytes(block.number(first_id, count))
    assert data == stream_of([b"hello"] * count, first_id)


def test_frame_block_of_mixed_payloads_and_partial_counts():
    payloads = [b"a" * (i % 13) for i in range(100)]
    block = smallmsg.FrameBlock(payloads)
    assert bytes(block.number(500)) == stream_of(payloads, 500)
    assert bytes(block.number(7, 10)) == stream_of(payloads[:10], 7)
    with pytest.raises(ValueError):
        block.number(0, 101)


def test_client_send_paths_give_one_numbered_stream():
    """send, send_batch, send_many and send_block number frames as one sequence."""
    recorder = Recorder()
    with running_server(recorder) as server, smallmsg.Client(server.address) as client:
        assert client.send(b"one") == 0
        assert client.send_batch([b"two", b"three"]) == 1
        assert client.send_many(b"four", 3) == 3
        assert client.send_block(smallmsg.FrameBlock([b"five", b""])) == 6
        client.wait_acked(timeout=5)
        assert client.acked == client.sent == 8
    assert recorder.frames == list(enumerate(
        [b"one", b"two", b"three", b"four", b"four", b"four", b"five", b""]))


# ------------------------------------------------------------------------------------------
# Server and client end to end
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ack", smallmsg.ACK_STYLES)
def test_handler_sees_every_payload_once_in_order(ack):
    recorder = Recorder()
    payloads = [b"p%d" % i * (i % 7) for i in range(5000)]
    with running_server(recorder, ack=ack) as server:
        with smallmsg.Client(server.address) as client:
            for payload in payloads:
                client.send(payload)
            first = client.send_many(b"hello", 100_000)
            assert first == len(payloads)
            client.wait_acked(timeout=20)
            assert client.acked == client.sent == len(payloads) + 100_000
    assert recorder.frames[:len(payloads)] == list(enumerate(payloads))
    assert recorder.frames[len(payloads):] == [(i, b"hello") for i in range(5000, 105_000)]


def test_library_example_from_the_issue():
    seen = []
    with smallmsg.Server(("127.0.0.1", 0), handler=lambda b: seen.extend(b)) as srv:
        srv.start()
        host, port = srv.address
        assert host == "127.0.0.1" and port > 0
        with smallmsg.Client(srv.address) as c:
            assert c.send(b"hello") == 0
            c.flush()
            c.wait_acked(timeout=5)
            assert c.acked == c.sent == 1
    assert len(seen) == 1


def reference_style_client(address, rounds, batch=150, payload=b"hello"):
    """What the series' C++ client does: 150 frames of 17 bytes per write, no TCP_NODELAY,
    reads of up to 24,576 bytes taken as whole 12-byte ACKs, the arithmetic check."""
    sock = socket.create_connection(address)
    sock.setblocking(True)
    previous, sent = -1, 0
    frame = struct.Struct("<QI")
    try:
        def take_acks():
            nonlocal previous
            data = sock.recv(24576)
            assert len(data) >= 12, f"read of {len(data)} bytes"
            assert len(data) % 12 == 0, f"read of {len(data)} bytes is not whole ACKs"
            for pos in range(0, len(data), 12):
                frame_id, skipped = struct.unpack_from("<QI", data, pos)
                assert previous + skipped + 1 == frame_id
                previous = frame_id

        for _ in range(rounds):
            sock.sendall(b"".join(frame.pack(sent + i, len(payload)) + payload
                                  for i in range(batch)))
            sent += batch
            sock.settimeout(0.001)
            with contextlib.suppress(socket.timeout):
                take_acks()
            sock.settimeout(None)
        deadline = time.monotonic() + 20
        while previous + 1 < sent:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            take_acks()
        return sent, previous + 1
    finally:
        sock.close()


@pytest.mark.parametrize("ack", smallmsg.ACK_STYLES)
def test_reference_style_cpp_client_passes(ack):
    with running_server(ack=ack) as server:
        sent, acked = reference_style_client(server.address, rounds=400)
    assert sent == acked == 60_000


# The series' step-5 client, as PROTOCOL.md describes it, in C++ like the original.
REFERENCE_CLIENT_CPP = r"""
// Like the series' step-5 client: batches of 150 frames of 17 bytes in one writev, no
// TCP_NODELAY; every few ms a 1 ms select and a read of up to 24,576 bytes taken as whole ACKs.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

static int fd;
static int64_t last_acked = -1;

static bool check_acks(long wait_us) {
  fd_set r; FD_ZERO(&r); FD_SET(fd, &r);
  timeval tv{0, wait_us};
  if (select(fd + 1, &r, nullptr, nullptr, &tv) <= 0) return true;
  static char buf[24576];
  ssize_t n = read(fd, buf, sizeof buf);
  if (n < 12) { fprintf(stderr, "short read: %zd\n", n); return false; }
  if (n % 12) { fprintf(stderr, "read of %zd bytes is not whole ACKs\n", n); return false; }
  for (ssize_t p = 0; p < n; p += 12) {
    uint64_t id; uint32_t skipped;
    memcpy(&id, buf + p, 8); memcpy(&skipped, buf + p + 8, 4);
    if (last_acked + (int64_t)skipped + 1 != (int64_t)id) {
      fprintf(stderr, "bad ACK: id %llu skipped %u after %lld\n", (unsigned long long)id,
              skipped, (long long)last_acked);
      return false;
    }
    last_acked = (int64_t)id;
  }
  return true;
}

int main(int argc, char** argv) {
  if (argc != 4) { fprintf(stderr, "usage: ref PORT ROUNDS PER_ROUND\n"); return 2; }
  int port = atoi(argv[1]); long rounds = atol(argv[2]); long per_round = atol(argv[3]);
  fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{}; a.sin_family = AF_INET; a.sin_port = htons(port);
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  if (connect(fd, (sockaddr*)&a, sizeof a)) { perror("connect"); return 2; }
  const int BATCH = 150;
  struct __attribute__((packed)) Header { uint64_t id; uint32_t size; } headers[BATCH];
  iovec iov[2 * BATCH];
  static char payload[] = "hello";
  uint64_t next_id = 0;
  using clock = std::chrono::steady_clock;
  for (long round = 0; round < rounds; ++round) {
    auto start = clock::now(), last_check = start;
    uint64_t end_id = next_id + per_round;
    while (next_id < end_id) {
      int n = (int)((end_id - next_id) < BATCH ? end_id - next_id : BATCH);
      for (int i = 0; i < n; ++i) {
        headers[i].id = next_id + i; headers[i].size = 5;
        iov[2 * i] = {&headers[i], 12}; iov[2 * i + 1] = {payload, 5};
      }
      ssize_t want = 17L * n, sent = writev(fd, iov, 2 * n);
      if (sent != want) { fprintf(stderr, "writev: %zd of %zd\n", sent, want); return 1; }
      next_id += n;
      auto now = clock::now();
      if (now - last_check > std::chrono::milliseconds(3)) {
        if (!check_acks(1000)) return 1;
        last_check = now;
      }
    }
    auto deadline = clock::now() + std::chrono::seconds(20);
    while (last_acked + 1 < (int64_t)end_id) {
      if (clock::now() > deadline) { fprintf(stderr, "last ACK missing after 20 s\n"); return 1; }
      if (!check_acks(1000)) return 1;
    }
    double usec = std::chrono::duration<double, std::micro>(clock::now() - start).count();
    printf("elapsed usec=%.0f avg(usec/call)=%g avg(call/msec)=%g avg(call/sec)=%g\n", usec,
           usec / per_round, per_round / usec * 1000, per_round / usec * 1e6);
    fflush(stdout);
  }
  close(fd);
  return 0;
}
"""


@pytest.fixture(scope="session")
def reference_client(tmp_path_factory):
    """The C++ client above, built with the machine's g++ (the test is skipped without one)."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    folder = tmp_path_factory.mktemp("cpp")
    source, binary = folder / "reference_client.cpp", folder / "reference_client"
    source.write_text(REFERENCE_CLIENT_CPP)
    subprocess.run([compiler, "-O2", "-o", str(binary), str(source)], check=True, timeout=120)
    return str(binary)


@pytest.mark.parametrize("ack", smallmsg.ACK_STYLES)
def test_a_cpp_client_like_the_series_one_passes_unchanged(reference_client, ack):
    with running_server(ack=ack) as server:
        result = subprocess.run([reference_client, str(server.address[1]), "3", "1000000"],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("elapsed usec=") for line in lines)


@pytest.mark.parametrize("ack", smallmsg.ACK_STYLES)
def test_last_ack_arrives_without_more_input(ack):
    """One small write, then wait: the ACK comes although nothing more arrives."""
    with running_server(ack=ack) as server:
        with smallmsg.Client(server.address) as client:
            for _ in range(5):
                client.send(b"ping")
                client.wait_acked(timeout=5)
            assert client.acked == 5
            # ACKs are tiny writes: without TCP_NODELAY, Nagle and a delayed ACK hold them back.
            (conn,) = server._connections
            assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest.mark.parametrize("ack", smallmsg.ACK_STYLES)
def test_last_ack_arrives_when_a_read_exactly_fills_the_block(ack):
    """A full read does not mean more is waiting: the ACK must not wait for more input."""
    with running_server(ack=ack, block_size=4096) as server:
        with smallmsg.Client(server.address) as client:
            client.send_many(b"abcd", 4096 // 16)        # 4096 bytes: one block exactly
            client.wait_acked(timeout=3)
            assert client.acked == 256


def test_ack_coverage_equals_frames_sent_over_raw_socket():
    payloads = [b"x" * (i % 50) for i in range(3000)]
    with running_server() as server:
        with socket.create_connection(server.address) as sock:
            for chunk in chunked(stream_of(payloads), 999):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
            records = acks_of(read_until_closed(sock)[0])
    assert check_ack_coverage(records, len(payloads)) == len(payloads)


def test_request_reply_mode_end_to_end():
    recorder = Recorder()
    with running_server(recorder, mode="request-reply") as server:
        with socket.create_connection(server.address) as sock:
            for i in range(50):
                sock.sendall(smallmsg.encode_frame(i, b"hello", "request-reply"))
                assert recv_exactly(sock, 8) == struct.pack("<Q", i)
        with smallmsg.Client(server.address, mode="request-reply") as client:
            client.send_many(b"hi", 1000)
            client.wait_acked(timeout=10)
            assert client.acked == 1000
    assert recorder.frames[:50] == [(i, b"hello") for i in range(50)]


def test_handler_exception_closes_that_connection_only(caplog):
    def handler(batch):
        for _, payload in batch:
            if bytes(payload) == b"boom":
                raise ValueError("bad payload")

    with running_server(handler) as server:
        with socket.create_connection(server.address) as bad:
            bad.sendall(stream_of([b"fine"] * 10))
            records = acks_of(recv_exactly(bad, 12))
            assert check_ack_coverage(records, 10) == 10
            with caplog.at_level(logging.ERROR, logger="smallmsg"):
                bad.sendall(smallmsg.encode_frame(10, b"boom"))
                assert read_until_closed(bad)[0] == b""          # no ACK for the failed frame
        assert wait_for(lambda: "handler raised" in caplog.text)
        assert "127.0.0.1:" in caplog.text
        with smallmsg.Client(server.address) as good:
            good.send_many(b"hello", 1000)
            good.wait_acked(timeout=5)


@pytest.mark.parametrize("ack", smallmsg.ACK_STYLES)
def test_handler_exception_still_acks_the_frames_handled_before(ack):
    """Frames handled in earlier blocks, whose ACK was still being coalesced, are acknowledged
    before the connection closes; the frames of the failing block are not."""
    first_call = threading.Event()

    def handler(batch):
        if not first_call.is_set():
            first_call.set()
            time.sleep(0.3)     # the next block, with the bad frame, is read meanwhile
        for _, payload in batch:
            if bytes(payload) == b"boom":
                raise ValueError("bad payload")

    with running_server(handler, ack=ack, block_size=256) as server:
        with socket.create_connection(server.address) as sock:
            sock.sendall(stream_of([b"fine"] * 10))
            assert first_call.wait(5)
            sock.sendall(smallmsg.encode_frame(10, b"boom"))
            records = acks_of(read_until_closed(sock)[0])
        assert check_ack_coverage(records, 10) == 10
        assert still_serves(server)


@pytest.mark.parametrize("ack", smallmsg.ACK_STYLES)
def test_a_handler_that_exits_ends_its_connection_not_the_server(ack):
    """Even a BaseException from a handler (SystemExit) closes that connection cleanly; the
    server still serves, and shuts down in time."""
    def handler(batch):
        if any(bytes(payload) == b"exit" for _, payload in batch):
            raise SystemExit(3)

    server = smallmsg.Server(LOOPBACK, handler=handler, ack=ack, block_size=4096)
    server.start()
    try:
        with socket.create_connection(server.address) as sock:
            sock.sendall(smallmsg.encode_frame(0, b"exit"))
            assert read_until_closed(sock, timeout=5)[1] in ("eof", "reset")
        assert wait_for(lambda: server.connections == 0)
        assert still_serves(server)
    finally:
        started = time.monotonic()
        server.shutdown(grace=0.5)
        server.close()
    assert time.monotonic() - started < 3


def test_a_connection_whose_threads_cannot_start_is_dropped(monkeypatch, caplog):
    """No more threads for one connection: it is closed with a log line, the server goes on."""
    original = smallmsg.AckWorker.start
    failures = []

    def start(self):
        if not failures:
            failures.append(self)
            raise RuntimeError("can't start new thread")
        original(self)

    monkeypatch.setattr(smallmsg.AckWorker, "start", start)
    with running_server() as server:
        with socket.create_connection(server.address) as sock:
            assert read_until_closed(sock, timeout=5)[1] in ("eof", "reset")
        assert failures and "cannot serve this connection" in caplog.text
        assert wait_for(lambda: server.connections == 0)
        assert still_serves(server)


def test_a_silent_connection_holds_no_block():
    """Blocks are taken when data arrives: connections that send nothing cost no buffer."""
    with running_server() as server:
        socks = [socket.create_connection(server.address) for _ in range(5)]
        try:
            assert wait_for(lambda: server.connections == 5)
            time.sleep(0.2)
            assert all(conn._blocks == 0 for conn in server._connections)
            socks[0].sendall(stream_of([b"hello"]))
            assert acks_of(recv_exactly(socks[0], ACK_SIZE)) == [(0, 0)]
            assert sorted(conn._blocks for conn in server._connections) == [0, 0, 0, 0, 1]
        finally:
            for sock in socks:
                sock.close()


@pytest.mark.parametrize("ack", smallmsg.ACK_STYLES)
def test_close_with_unread_input_keeps_the_acks_already_written(ack):
    """A close with unread input must not send a RST that makes the peer drop ACKs: a peer that
    reads nothing while it sends frames one by one (about an ACK each, piling up unread), then a
    bad header and more, still gets every ACK once it reads."""
    good = 1500
    with running_server(ack=ack, max_payload=100) as server:
        sock = small_rcvbuf_socket(server.address)
        with sock:
            for i in range(good):
                sock.sendall(smallmsg.encode_frame(i, b"hello"))
                time.sleep(0.0002)
            time.sleep(0.2)
            sock.sendall(smallmsg.encode_frame(good, b"x" * 101)[:HEADER_SIZE] + bytes(200_000))
            time.sleep(0.3)         # the server has closed by now, with input it never read
            data, how = read_until_closed(sock, timeout=10)
        assert check_ack_coverage(acks_of(data), good) == good, how


@pytest.mark.parametrize("ack", smallmsg.ACK_STYLES)
def test_idle_timeout_is_about_reading_not_about_a_peer_slow_to_read(ack, caplog):
    """A peer that keeps sending but does not read its replies is not idle: the idle timeout
    must not cut it because the server's writes wait."""
    caplog.set_level(logging.INFO, logger="smallmsg")
    idle = 0.3
    with running_server(mode="request-reply", ack=ack, idle_timeout=idle) as server:
        sock = small_rcvbuf_socket(server.address)
        with sock:
            frame = smallmsg.encode_frame(0, b"hello", smallmsg.MODE_REQUEST_REPLY)
            limit = 64 * MiB
            pushed, stalled = push(sock, frame * 4096, limit,
                                   time.monotonic() + idle + smallmsg.CLOSE_LINGER + 1.0,
                                   stall=idle + smallmsg.CLOSE_LINGER + 0.5)
            # The server stopped reading because its replies wait (TCP pushed back), well past
            # the idle timeout, and still the connection is not being closed.
            assert stalled and pushed < limit
            (conn,) = server._connections
            assert conn.close_reason is None and not conn.closing
        assert "timed out" not in caplog.text and "idle" not in caplog.text


@pytest.mark.parametrize("ack", smallmsg.ACK_STYLES)
def test_a_handler_that_never_returns_cannot_hold_up_shutdown(ack, caplog):
    """shutdown() gives up on a stuck handler within its bound; once the handler does return,
    after close(), its connection ends without an error."""
    release = threading.Event()

    def handler(batch):
        release.wait(10)

    server = smallmsg.Server(LOOPBACK, handler=handler, ack=ack, block_size=4096)
    server.start()
    sock = socket.create_connection(server.address)
    try:
        sock.sendall(stream_of([b"abcd"] * 256))        # exactly one block
        assert wait_for(lambda: server.stats["messages"] == 256)
        started = time.monotonic()
        server.shutdown(grace=0.3)
        assert time.monotonic() - started < 0.3 + smallmsg.CUT_WAIT + 1.0
        assert "does not return" in caplog.text
        server.close()
    finally:
        release.set()
        sock.close()
    assert wait_for(lambda: server.connections == 0)


@pytest.mark.parametrize("ack", smallmsg.ACK_STYLES)
def test_a_write_cut_by_a_timeout_goes_on_whole_next_time(ack):
    """A send that times out part-way leaves part of a frame at the server: the rest must go
    out first, whole, so that no frame is corrupted and the stream goes on."""
    release = threading.Event()
    seen = {"next": 0, "bad": 0}

    def handler(batch):
        release.wait(10)
        ids = batch.ids
        if (list(ids) != list(range(seen["next"], seen["next"] + len(ids)))
                or batch.payloads() != b"hello" * len(ids)):
            seen["bad"] += 1
        seen["next"] += len(ids)

    with running_server(handler, ack=ack) as server:
        with smallmsg.Client(server.address, timeout=0.3) as client:
            with pytest.raises(smallmsg.AckTimeout):
                client.send_many(b"hello", 20_000_000)
            release.set()
            client.send_many(b"hello", 1000)
            client.wait_acked(timeout=20)
            assert client.acked == client.sent
    assert seen == {"next": client.sent, "bad": 0}


def test_client_raises_on_a_bad_ack():
    listener = socket.create_server(LOOPBACK)
    with listener:
        def fake_server():
            conn, _ = listener.accept()
            with conn:
                recv_exactly(conn, 17 * 3)
                conn.sendall(smallmsg.encode_ack(5, 0))     # acks a frame never sent
                time.sleep(0.5)

        thread = threading.Thread(target=fake_server, daemon=True)
        thread.start()
        with smallmsg.Client(listener.getsockname()) as client:
            with pytest.raises(ProtocolError) as info:
                client.send_many(b"hello", 3)
                client.wait_acked(timeout=5)
        thread.join(5)
    assert "expected id 0" in str(info.value) and "got id 5" in str(info.value)
    assert info.value.sent == 3 and info.value.acked == 0 and info.value.unacked == 3


def test_client_refuses_an_ack_for_a_frame_not_yet_written():
    """A frame still in the client's buffer cannot have reached the server: an ACK for it is
    a protocol error, not a success."""
    listener = socket.create_server(LOOPBACK)
    with listener, smallmsg.Client(listener.getsockname()) as client:
        conn, _ = listener.accept()
        with conn:
            client.send_many(b"x", 1)              # frame 0: written
            assert recv_exactly(conn, 13) == smallmsg.encode_frame(0, b"x")
            client.send(b"y")                      # frame 1: buffered only
            conn.sendall(smallmsg.encode_ack(1, 1))
            with pytest.raises(ProtocolError) as info:
                assert wait_for(lambda: client.poll_acks() and False, timeout=2)
    assert "got id 1" in str(info.value) and "1 frames on the wire" in str(info.value)


def test_wait_acked_times_out_with_counts():
    listener = socket.create_server(LOOPBACK)
    with listener, smallmsg.Client(listener.getsockname()) as client:
        client.send(b"never acked")
        started = time.monotonic()
        with pytest.raises(smallmsg.AckTimeout) as info:
            client.wait_acked(timeout=0.3)
        assert time.monotonic() - started < 2
        assert isinstance(info.value, TimeoutError)
        assert info.value.unacked == 1


def test_client_reports_a_server_that_closes_with_frames_unacked():
    listener = socket.create_server(LOOPBACK)
    with listener:
        def fake_server():
            conn, _ = listener.accept()
            recv_exactly(conn, 17)
            conn.close()

        thread = threading.Thread(target=fake_server, daemon=True)
        thread.start()
        with smallmsg.Client(listener.getsockname()) as client:
            with pytest.raises(smallmsg.ConnectionLost) as info:
                client.send_many(b"hello", 2)
                client.wait_acked(timeout=5)
        thread.join(5)
    assert info.value.unacked == 2
    assert "2 of 2 frames unacknowledged" in str(info.value)


def test_client_refuses_a_payload_over_max_payload():
    with running_server() as server, smallmsg.Client(server.address, max_payload=4) as client:
        with pytest.raises(ValueError):
            client.send(b"12345")
        assert client.sent == 0


# ------------------------------------------------------------------------------------------
# Command lines
# ------------------------------------------------------------------------------------------

def streaming_client_py(host, port, timeout):
    """client.py sending far more than it can in the test's time, checked to be under way."""
    client = client_py("--host", host, "--port", str(port), "--count", "200000000",
                       "--iterations", "100", "--timeout", str(timeout))
    time.sleep(1.0)
    assert client.poll() is None, client.communicate()
    return client


def run_client(*args, timeout=60):
    """client.py to its end: (exit code, stdout, stderr)."""
    process = client_py(*args)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        kill(process)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_cli_server_serves_and_stops_cleanly_on_signal(signum):
    process, _, port = start_server()
    try:
        result = run_client("--port", str(port), "--count", "100000", "--iterations", "2")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 2
        for line in lines:
            assert line.startswith("elapsed usec=") and "avg(call/sec)=" in line
        process.send_signal(signum)
        out, err = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "1 connections, 200000 messages, 3400000 bytes" in out
    assert "Traceback" not in err
    assert re.search(r"INFO 127\.0\.0\.1:\d+: connected", err)   # logged at info level


def test_cli_port_in_use_is_one_line_and_nonzero():
    with socket.create_server(LOOPBACK) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, os.path.join(HERE, "smallmsg.py"),
                                 "--port", str(port)], capture_output=True, text=True, timeout=10)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0
    assert "address already in use" in result.stderr.lower()


@pytest.mark.parametrize("args", [["--port", "70000"], ["--port", "x"], ["--mode", "nope"],
                                  ["--max-payload", "-1"], ["--max-payload", "5000000000"],
                                  ["--idle-timeout", "0"]])
def test_cli_bad_option_is_one_line_and_nonzero(args):
    result = subprocess.run([sys.executable, os.path.join(HERE, "smallmsg.py"), *args],
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "error" in result.stderr
    assert "Traceback" not in result.stderr


def test_client_spawn_runs_rounds_and_leaves_nothing():
    result = run_client("--spawn", "--count", "50000", "--iterations", "3", "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["first_id"] for r in records] == [0, 50000, 100000]
    assert all(r["bytes"] == 50000 * 17 for r in records)


def test_client_mixed_sizes_spawn():
    result = run_client("--spawn", "--count", "30000", "--payload-size", "0-100")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("elapsed usec=")


def test_client_without_server_is_one_line_and_nonzero():
    with socket.create_server(LOOPBACK) as probe:
        port = probe.getsockname()[1]     # free once closed: nobody listens there
    result = run_client("--port", str(port), "--count", "10", timeout=20)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot connect" in result.stderr


# ------------------------------------------------------------------------------------------
# Reliability: bad input, slow and stuck peers, many connections, shutdown, client failures
# ------------------------------------------------------------------------------------------

# ------------------------------------------------------------------------------------------
# 1. Bad input on one connection
# ------------------------------------------------------------------------------------------

GOOD = [b"good %d" % i for i in range(20)]
LIMIT = 100                  # max_payload of these servers


def garbage():
    """Random bytes whose first header announces more than LIMIT (checked, not assumed)."""
    data = random.Random(4).randbytes(500)
    frames, _, bad = reference_frames(data, LIMIT)
    assert frames == [] and bad
    return data


def send_bad_input(kind, sock):
    """Send GOOD, then the bad input of `kind`. Returns (the ACK records the socket could still
    read, the words the log line must give as the reason)."""
    good = stream_of(GOOD)
    if kind == "over_max_payload":
        too_big = smallmsg.encode_frame(20, b"x" * (LIMIT + 1))
        sock.sendall(good + too_big + stream_of([b"late"], 21))
        data, _ = read_until_closed(sock)
        return acks_of(data), "over"
    if kind == "over_max_payload_split":
        # The bad header straddles two reads: the parser meets it while completing a carry.
        bad = smallmsg.encode_frame(20, b"x" * (LIMIT + 1))
        sock.sendall(good + bad[:6])
        records = read_acks_covering(sock, len(GOOD))     # proves those bytes were read
        sock.sendall(bad[6:])
        data, _ = read_until_closed(sock)
        return records + acks_of(data), "over"
    if kind == "garbage":
        sock.sendall(good + garbage())
        data, _ = read_until_closed(sock)
        return acks_of(data), "protocol error"
    if kind == "cut_off":
        sock.sendall(good + smallmsg.encode_frame(20, b"y" * 50)[:40])
        sock.shutdown(socket.SHUT_WR)
        data, how = read_until_closed(sock)
        assert how == "eof"
        return acks_of(data), "inside a frame"
    if kind == "reset":
        sock.sendall(good + smallmsg.encode_frame(20, b"y" * 50)[:40])
        records = read_acks_covering(sock, len(GOOD))
        reset(sock)
        return records, "reset"
    raise AssertionError(kind)


def bad_connection(server, kind):
    """A connection that sends the bad input of `kind`: (its peer name, the ACK records it
    could read, the words its log line must give)."""
    with socket.create_connection(server.address) as bad:
        peer = peer_of(bad)
        return (peer, *send_bad_input(kind, bad))


BAD_INPUTS = ["over_max_payload", "over_max_payload_split", "garbage", "cut_off", "reset"]


@pytest.mark.parametrize("ack", ACK_STYLES)
@pytest.mark.parametrize("kind", [k for k in BAD_INPUTS if k != "over_max_payload_split"])
def test_bad_input_delivers_frames_before_logs_closes_and_spares_others(kind, ack, caplog):
    caplog.set_level(logging.INFO, logger="smallmsg")
    recorder = Recorder()
    with running_server(recorder, ack=ack, max_payload=LIMIT) as server:
        with smallmsg.Client(server.address) as other:      # open before, during and after
            other.send_many(b"hello", 500)
            other.wait_acked(timeout=5)
            peer, records, reason = bad_connection(server, kind)
            # The frames before the bad input were delivered, in order, and acknowledged.
            assert wait_for(lambda: len(recorder.of(peer)) >= len(GOOD))
            assert check_ack_coverage(records, len(GOOD)) == len(GOOD)
            # One log line names the peer and the reason; the connection is gone.
            assert wait_for(lambda: any(reason in m for m in messages(caplog, peer))), \
                messages(caplog)
            assert wait_for(lambda: server.connections == 1)
            # The other connection goes on, new ones are served, the server still runs.
            other.send_many(b"hello", 500)
            other.wait_acked(timeout=5)
            assert other.acked == 1000
            assert still_serves(server)
            assert serving(server)
        assert recorder.of(peer) == list(enumerate(GOOD))       # nothing after the bad input


def warnings_after_bad_input(kind, ack, caplog):
    """The WARNING (or worse) log lines that name the peer, once its connection is over."""
    caplog.set_level(logging.INFO, logger="smallmsg")
    with running_server(ack=ack, max_payload=LIMIT) as server:
        peer, records, reason = bad_connection(server, kind)
        assert check_ack_coverage(records, len(GOOD)) == len(GOOD)
        assert wait_for(lambda: server.connections == 0)
        assert wait_for(lambda: any("disconnected" in m for m in messages(caplog, peer)))
    return messages(caplog, peer, logging.WARNING), messages(caplog, peer), reason


@pytest.mark.parametrize("ack", ACK_STYLES)
@pytest.mark.parametrize("kind", [k for k in BAD_INPUTS if k != "over_max_payload_split"])
def test_bad_input_gives_exactly_one_warning_naming_the_peer(kind, ack, caplog):
    """'one log line names the peer and the reason': not a second, misleading one."""
    warnings, lines, reason = warnings_after_bad_input(kind, ack, caplog)
    if kind == "reset":
        # A reset is the peer's doing: logged at info with its reason; the dropped partial
        # frame is the one warning.
        assert any("reset" in m.lower() for m in lines), lines
        assert len(warnings) == 1 and "inside a frame" in warnings[0], warnings
    else:
        assert len(warnings) == 1 and reason in warnings[0], warnings


@pytest.mark.parametrize("ack", ACK_STYLES)
def test_bad_header_split_across_reads_gives_exactly_one_warning(ack, caplog):
    warnings, _, reason = warnings_after_bad_input("over_max_payload_split", ack, caplog)
    assert any(reason in m for m in warnings), warnings
    assert len(warnings) == 1, warnings


# ------------------------------------------------------------------------------------------
# 2. Fuzz: random and mutated streams
# ------------------------------------------------------------------------------------------

FUZZ_SEED = 20261204
FUZZ_MAX_STREAMS = 4000      # per server
FUZZ_BUDGET = 5.0            # seconds per server
FUZZ_WORKERS = 4             # connections open at once
FUZZ_LIMIT = 3000            # max_payload
FUZZ_BLOCK = 1024            # tiny blocks: frames straddle reads all the time


def fuzz_stream(rng):
    """A random stream: valid, mutated, truncated, or pure garbage."""
    sizes = [0, 1, 5, 17, 255, 256, FUZZ_LIMIT, FUZZ_LIMIT - 1]
    payloads = [rng.randbytes(rng.choice(sizes) if rng.random() < 0.7 else
                              rng.randrange(FUZZ_LIMIT + 1))
                for _ in range(rng.randrange(0, 40))]
    data = bytearray(stream_of(payloads, first_id=rng.randrange(1 << 40)))
    kind = rng.randrange(8)
    if kind == 0 or not data:                       # pure random
        return rng.randbytes(rng.randrange(1, 600))
    if kind == 1:                                   # flipped bytes
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 2:                                 # truncated anywhere
        del data[rng.randrange(len(data)):]
    elif kind == 3:                                 # random bytes inserted
        at = rng.randrange(len(data) + 1)
        data[at:at] = rng.randbytes(rng.randrange(1, 40))
    elif kind == 4:                                 # a size field set near or over the limit
        at = rng.randrange(0, max(1, len(data) - 12))
        size = rng.choice([FUZZ_LIMIT, FUZZ_LIMIT + 1, 0xFFFFFFFF, rng.randrange(1 << 32)])
        struct.pack_into("<I", data, at + 8, size)
    elif kind == 5:                                 # random tail
        data += rng.randbytes(rng.randrange(1, 100))
    elif kind == 6:                                 # a slice repeated
        a = rng.randrange(len(data))
        b = rng.randrange(a, len(data) + 1)
        data[b:b] = data[a:b] * rng.randrange(1, 4)
    # kind 7: valid, unchanged
    return bytes(data)


def fuzz_one(rng, address, recorder, failures):
    data = fuzz_stream(rng)
    sock = socket.create_connection(address, timeout=5)
    try:
        peer = peer_of(sock)
        sent_all = True
        try:
            pos = 0
            while pos < len(data):                  # random write boundaries
                n = rng.randrange(1, len(data) - pos + 1)
                sock.sendall(data[pos:pos + n])
                pos += n
            sock.shutdown(socket.SHUT_WR)
        except OSError:                             # the server closed on a protocol error
            sent_all = False
        received, how = read_until_closed(sock, timeout=5)
        # Once the server has closed, its handler calls for this connection are over.
        delivered = recorder.pop(peer)
    finally:
        sock.close()
    expected, _, bad = reference_frames(data, FUZZ_LIMIT)

    def fail(message):
        failures.append(f"{message} (stream {data[:64].hex()}..., {len(data)} bytes)")

    if how == "open":
        return fail("server did not close after the stream ended")
    if len(received) % ACK_SIZE:
        return fail(f"{len(received)} bytes of ACKs: not whole records")
    if delivered != expected[:len(delivered)] or (sent_all and delivered != expected):
        return fail(f"handler got {len(delivered)} frames, expected {len(expected)}")
    covered = 0
    for last_id, skipped in acks_of(received):
        covered += skipped + 1
        if covered > len(delivered):
            return fail(f"ACKs cover {covered} frames, only {len(delivered)} delivered")
        if last_id != delivered[covered - 1][0]:
            return fail(f"ACK id {last_id} is not that of frame {covered - 1}")
    if how == "eof" and covered != len(delivered):
        return fail(f"ACKs cover {covered} of {len(delivered)} delivered frames")
    return bad


@pytest.mark.slow
@pytest.mark.parametrize("ack", ACK_STYLES)
def test_fuzz_never_crashes_never_acks_undelivered_frames(ack):
    recorder = Recorder()
    failures = []
    counts = collections.Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + FUZZ_BUDGET
    with running_server(recorder, ack=ack, max_payload=FUZZ_LIMIT,
                        block_size=FUZZ_BLOCK) as server:
        def worker(index):
            rng = random.Random(FUZZ_SEED + index)
            for _ in range(FUZZ_MAX_STREAMS // FUZZ_WORKERS):
                if time.monotonic() > deadline or len(failures) > 10:
                    return
                bad = fuzz_one(rng, server.address, recorder, failures)
                with lock:
                    counts["streams"] += 1
                    counts["protocol errors"] += bool(bad)

        workers = [threading.Thread(target=worker, args=(i,), daemon=True)
                   for i in range(FUZZ_WORKERS)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(FUZZ_BUDGET + 30)
        assert not any(thread.is_alive() for thread in workers)
        assert not failures, failures[:5]
        assert serving(server)
        assert still_serves(server)
        assert wait_for(lambda: server.connections == 0)
    # Enough streams of both kinds to mean something (about 4,000 here in the time budget).
    assert counts["streams"] >= 500, counts
    assert counts["protocol errors"] >= 100 and counts["streams"] - counts["protocol errors"] >= 100


# ------------------------------------------------------------------------------------------
# 3. Slow consumer: memory stays bounded, other connections go on
# ------------------------------------------------------------------------------------------

RSS_BOUND_KIB = 64 * 1024    # above the baseline: 4 blocks of 1 MiB + a 1 MiB carry, and slack
PUSH_LIMIT = 300 * MiB
PUSH_BUDGET = 15.0


def slow_consumer_chunk(mode):
    if mode == smallmsg.MODE_REQUEST_REPLY:
        # Empty frames: 12 bytes in, 8 bytes of reply out that the peer never reads.
        return stream_of([b""] * 40000, mode=mode)
    # Small frames, then one of the maximum payload: it always straddles reads (the carry).
    return stream_of([b"hello"] * 30000) + smallmsg.encode_frame(30000, bytes(smallmsg.MAX_PAYLOAD))


@pytest.mark.slow
@pytest.mark.parametrize("mode", smallmsg.MODES)
def test_slow_consumer_does_not_grow_server_memory(mode):
    process, host, port = start_server("--mode", mode, "--log-level", "warning")
    address = (host, port)
    pusher = other = None
    try:
        # Warm up, so the baseline holds what any connection costs once.
        with smallmsg.Client(address, mode=mode) as client:
            client.send_many(b"hello", 20000)
            client.wait_acked(timeout=10)
        baseline = rss_kib(process.pid)
        peak = baseline
        checks = []
        other = smallmsg.Client(address, mode=mode)
        next_check = [time.monotonic()]

        def tick():
            nonlocal peak
            peak = max(peak, rss_kib(process.pid))
            if time.monotonic() >= next_check[0]:
                other.send_many(b"hello", 1000)
                other.wait_acked(timeout=5)      # another connection is served meanwhile
                checks.append(other.acked)
                next_check[0] = time.monotonic() + 0.1

        pusher = small_rcvbuf_socket(address)
        pushed, stalled = push(pusher, slow_consumer_chunk(mode), PUSH_LIMIT,
                               time.monotonic() + PUSH_BUDGET, stall=1.5, on_tick=tick)
        for _ in range(3):
            tick()
            time.sleep(0.1)
        assert process.poll() is None
        grown = peak - baseline
        assert grown < RSS_BOUND_KIB, \
            f"RSS grew from {baseline} KiB by {grown} KiB after {pushed >> 20} MiB pushed"
        assert len(checks) >= 3 and checks[-1] == 1000 * len(checks)
        if mode == smallmsg.MODE_REQUEST_REPLY:
            # Replies pile up unread: the server stops reading and TCP pushes back.
            assert stalled and pushed < PUSH_LIMIT
        else:
            # ACKs are tiny: the server keeps reading; hundreds of MiB went through.
            assert pushed >= 100 * MiB, f"only {pushed >> 20} MiB pushed"
    finally:
        for sock in (pusher, other):
            if sock is not None:
                sock.close()
        kill(process)


@pytest.mark.parametrize("ack", ACK_STYLES)
def test_a_stalled_handler_pushes_back_through_tcp(ack):
    """A handler that does not return: the server reads no further than its blocks, so the
    sender stalls (TCP backpressure) instead of the server's memory growing."""
    release = threading.Event()

    def handler(batch):
        release.wait(10)

    with running_server(handler, ack=ack) as server:
        try:
            with socket.create_connection(server.address) as sock:
                chunk = stream_of([b"hello"] * 60_000)
                pushed, stalled = push(sock, chunk, 256 * MiB, time.monotonic() + 5, stall=0.5)
                assert stalled, f"pushed {pushed} bytes without backpressure"
                # The pool (2 MiB) plus what the kernel buffers on both sides: far below 64 MiB.
                assert pushed < 64 * MiB
                (conn,) = server._connections
                assert conn._blocks <= server.pool_blocks
        finally:
            release.set()


# ------------------------------------------------------------------------------------------
# 4. Idle and stuck peers
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ack", ACK_STYLES)
def test_idle_timeout_closes_a_silent_connection_not_a_talking_one(ack, caplog):
    caplog.set_level(logging.INFO, logger="smallmsg")
    with running_server(ack=ack, idle_timeout=0.3) as server:
        silent = socket.create_connection(server.address)
        peer = peer_of(silent)
        started = time.monotonic()
        with silent, smallmsg.Client(server.address) as talker:
            for _ in range(12):                  # 1.2 s of traffic, a frame every 0.1 s
                talker.send(b"ping")
                talker.wait_acked(timeout=5)
                time.sleep(0.1)
            assert talker.acked == 12            # still open: idle means silent, not old
            data, how = read_until_closed(silent, timeout=5)
            assert how in ("eof", "reset") and data == b""
            assert time.monotonic() - started >= 0.25
        assert wait_for(lambda: any("idle" in m for m in messages(caplog, peer)))


def test_without_idle_timeout_a_silent_connection_stays_open():
    with running_server() as server:
        with socket.create_connection(server.address) as silent:
            data, how = read_until_closed(silent, timeout=1.2)
            assert how == "open" and data == b""
            silent.sendall(stream_of([b"still here"]))
            assert acks_of(recv_exactly(silent, ACK_SIZE)) == [(0, 0)]


def stuck_request_reply_peer(address):
    """A request-reply peer that sends and never reads, until the server blocks on its replies
    and TCP stops taking more."""
    sock = small_rcvbuf_socket(address)
    pushed, stalled = push(sock, stream_of([b""] * 40000, mode=smallmsg.MODE_REQUEST_REPLY),
                           256 * MiB, time.monotonic() + 15, stall=1.0)
    assert stalled, f"{pushed >> 20} MiB pushed and TCP never pushed back"
    return sock


@pytest.mark.parametrize("ack", ACK_STYLES)
def test_peer_that_stops_reading_cannot_block_shutdown(ack, caplog):
    caplog.set_level(logging.INFO, logger="smallmsg")
    server = smallmsg.Server(LOOPBACK, mode=smallmsg.MODE_REQUEST_REPLY, ack=ack,
                             block_size=1 << 16)
    server.start()
    stuck = None
    try:
        stuck = stuck_request_reply_peer(server.address)
        peer = peer_of(stuck)
        done = threading.Event()
        started = time.monotonic()
        thread = threading.Thread(target=lambda: (server.shutdown(grace=0.5), done.set()),
                                  daemon=True)
        thread.start()
        thread.join(0.5 + 5)
        elapsed = time.monotonic() - started
        assert done.is_set(), "shutdown() still blocked by a peer that does not read"
        assert elapsed < 0.5 + 3
        # It was stuck for real: shutdown had to cut it after the grace.
        assert any("still busy" in m for m in messages(caplog, peer))
        assert server.connections == 0
    finally:
        if stuck is not None:
            stuck.close()
        server.close()


# ------------------------------------------------------------------------------------------
# 5. Many connections, a connection limit, no leaked threads
# ------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("ack", ACK_STYLES)
def test_300_concurrent_connections_are_all_fully_acknowledged(ack):
    count = 300
    recorder = Recorder()
    baseline = threading.active_count()
    clients = []
    with running_server(recorder, ack=ack, block_size=1 << 16) as server:
        serving_threads = threading.active_count()
        try:
            for _ in range(count):
                clients.append(smallmsg.Client(server.address))
            assert wait_for(lambda: server.connections == count, timeout=10)
            for i, client in enumerate(clients):         # all open at once, all sending
                client.send_many(b"c%d" % i, 100 + i)
            for i, client in enumerate(clients):
                client.wait_acked(timeout=20)
                assert client.acked == client.sent == 100 + i
            for i, client in enumerate(clients):
                assert recorder.of(peer_of(client.sock)) == [(n, b"c%d" % i)
                                                             for n in range(100 + i)]
        finally:
            for client in clients:
                client.close()
        assert wait_for(lambda: server.connections == 0, timeout=10)
        assert wait_for(lambda: threading.active_count() <= serving_threads, timeout=10), \
            f"{threading.active_count() - serving_threads} connection threads left"
        assert still_serves(server)
    assert wait_for(lambda: threading.active_count() <= baseline, timeout=10)


@pytest.mark.parametrize("ack", ACK_STYLES)
def test_max_connections_refuses_the_next_one_and_goes_on(ack, caplog):
    caplog.set_level(logging.INFO, logger="smallmsg")
    limit = 3
    with running_server(ack=ack, max_connections=limit) as server:
        clients = [smallmsg.Client(server.address) for _ in range(limit)]
        try:
            for client in clients:
                client.send_many(b"hello", 100)
                client.wait_acked(timeout=5)
            assert wait_for(lambda: server.connections == limit)
            with socket.create_connection(server.address) as extra:
                peer = peer_of(extra)
                data, how = read_until_closed(extra, timeout=5)
                assert how in ("eof", "reset") and data == b""
            assert wait_for(lambda: any("refused" in m for m in messages(caplog, peer)))
            assert server.connections == limit
            for client in clients:                         # the ones in go on
                client.send_many(b"hello", 100)
                client.wait_acked(timeout=5)
            clients.pop().close()                          # room again: accepted
            assert wait_for(lambda: server.connections == limit - 1)
            assert still_serves(server)
            assert serving(server)
        finally:
            for client in clients:
                client.close()


def low_fd_limit():
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))


@pytest.mark.slow
def test_out_of_file_descriptors_neither_floods_the_log_nor_stops_serving(tmp_path):
    """No --max-connections, and more connections than the process may open."""
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log_file:      # a pipe would fill up and block the server
        process, host, port = start_server(stderr=log_file, preexec_fn=low_fd_limit)
    try:
        address = (host, port)
        crowd = []
        try:
            for _ in range(40):                  # more than 32 descriptors' worth
                crowd.append(socket.create_connection(address, timeout=5))
            time.sleep(1.0)
            assert process.poll() is None        # never crash
        finally:
            for sock in crowd:
                sock.close()
        with smallmsg.Client(address) as client:  # descriptors free again: served
            client.send_many(b"hello", 1000)
            client.wait_acked(timeout=10)
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=10)
        assert process.returncode == 0
    finally:
        kill(process)
    failures = log_path.read_text().count("accept failed")
    assert failures >= 1, "the descriptor limit was never reached: the test proves nothing"
    assert failures <= 20, f"{failures} 'accept failed' lines in about a second"


def test_cli_max_connections_and_idle_timeout():
    process, host, port = start_server("--max-connections", "1", "--idle-timeout", "0.5")
    try:
        address = (host, port)
        with socket.create_connection(address) as first:
            first.sendall(stream_of([b"hello"]))
            assert acks_of(recv_exactly(first, ACK_SIZE)) == [(0, 0)]
            with socket.create_connection(address) as second:
                assert read_until_closed(second, timeout=5) in ((b"", "eof"), (b"", "reset"))
            assert read_until_closed(first, timeout=5)[1] in ("eof", "reset")   # idle
        # The slot is free again (once the server has deregistered the closed connection,
        # which may be just after the client sees it close: hence a few tries).
        for attempt in range(20):
            try:
                with smallmsg.Client(address) as client:
                    client.send_many(b"hello", 1000)
                    client.wait_acked(timeout=5)
                break
            except smallmsg.ConnectionLost:
                time.sleep(0.1)
        assert client.acked == 1000
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=10)
        assert process.returncode == 0, err
        assert "refused" in err and "idle" in err and "Traceback" not in err
    finally:
        kill(process)


# ------------------------------------------------------------------------------------------
# 6. Clean shutdown
# ------------------------------------------------------------------------------------------

class Counter:
    def __init__(self):
        self.frames = 0

    def __call__(self, batch):
        self.frames += len(batch)      # one thread per connection: no lock needed for one


@pytest.mark.parametrize("ack", ACK_STYLES)
def test_shutdown_while_streaming_acks_every_handled_frame_in_whole_records(ack):
    counter = Counter()
    server = smallmsg.Server(LOOPBACK, handler=counter, ack=ack)
    server.start()
    received = bytearray()
    ended = []
    sent = [0]
    stop = threading.Event()
    sock = socket.create_connection(server.address)
    try:
        def read():
            data, how = read_until_closed(sock, timeout=15)
            received.extend(data)
            ended.append(how)

        def write():
            block = smallmsg.FrameBlock.uniform(b"hello", 4096)
            deadline = time.monotonic() + 15
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    sock.sendall(block.number(sent[0]))
                except OSError:
                    return
                sent[0] += len(block)

        threads = [threading.Thread(target=f, daemon=True) for f in (read, write)]
        for thread in threads:
            thread.start()
        assert wait_for(lambda: counter.frames > 100_000, timeout=10)
        started = time.monotonic()
        server.shutdown()
        elapsed = time.monotonic() - started
        handled = counter.frames
        stop.set()
        for thread in threads:
            thread.join(20)
    finally:
        stop.set()
        sock.close()
        server.close()
    assert elapsed < smallmsg.SHUTDOWN_GRACE, "a reading peer should not need the grace period"
    assert ended and ended[0] in ("eof", "reset")
    assert len(received) % ACK_SIZE == 0, f"{len(received)} bytes: a partial ACK record"
    # Every frame handed to the handler is acknowledged, exactly, in order; nothing more.
    assert check_ack_coverage(acks_of(bytes(received)), handled) == handled <= sent[0]


@pytest.mark.parametrize("ack", ACK_STYLES)
def test_shutdown_while_a_client_streams_ends_it_with_connection_lost_or_all_acked(ack):
    server = smallmsg.Server(LOOPBACK, ack=ack)
    server.start()
    outcome = []
    stop = threading.Event()
    client = smallmsg.Client(server.address)
    try:
        def stream():
            try:
                deadline = time.monotonic() + 15
                while not stop.is_set() and time.monotonic() < deadline:
                    client.send_many(b"hello", 20000)
                client.wait_acked(timeout=5)
                outcome.append(("all acked", client.sent, client.acked))
            except smallmsg.SmallmsgError as exc:
                outcome.append((type(exc).__name__, exc.sent, exc.acked))

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        assert wait_for(lambda: client.acked > 50_000, timeout=10)
        started = time.monotonic()
        server.shutdown()
        elapsed = time.monotonic() - started
        stop.set()
        thread.join(15)
    finally:
        stop.set()
        client.close()
        server.close()
    assert elapsed < smallmsg.SHUTDOWN_GRACE
    assert len(outcome) == 1
    kind, sent, acked = outcome[0]
    assert kind in ("all acked", "ConnectionLost"), outcome      # never a ProtocolError
    assert 0 < acked <= sent
    if kind == "all acked":
        assert acked == sent


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_signal_while_a_client_streams_exits_0_within_seconds(signum):
    process, host, port = start_server()
    client = None
    try:
        client = streaming_client_py(host, port, timeout=5)
        started = time.monotonic()
        process.send_signal(signum)
        out, err = process.communicate(timeout=15)
        elapsed = time.monotonic() - started
        assert process.returncode == 0, err
        assert elapsed < smallmsg.SHUTDOWN_GRACE, "a reading client should not need the grace"
        assert "Traceback" not in err
        assert "smallmsg stopped: 1 connections" in out
        _, client_err = client.communicate(timeout=15)
        assert client.returncode != 0
        assert client_err.count("\n") == 1 and "unacknowledged" in client_err, client_err
    finally:
        kill(process)
        if client is not None:
            kill(client)


def test_cli_second_signal_exits_at_once():
    process, host, port = start_server("--mode", smallmsg.MODE_REQUEST_REPLY)
    stuck = None
    try:
        stuck = stuck_request_reply_peer((host, port))
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert process.poll() is None, "the first signal should wait for the busy connection"
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=10)
        assert time.monotonic() - started < 2
        assert process.returncode != 0
    finally:
        if stuck is not None:
            stuck.close()
        kill(process)


# ------------------------------------------------------------------------------------------
# 7. Client side
# ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_client_py_reports_a_server_killed_mid_run():
    process, host, port = start_server("--log-level", "warning")
    client = None
    try:
        client = streaming_client_py(host, port, timeout=10)
        process.kill()
        process.wait(10)
        started = time.monotonic()
        _, err = client.communicate(timeout=20)
        assert time.monotonic() - started < 5
        assert client.returncode != 0
        assert err.count("\n") == 1, err
        assert "unacknowledged" in err
        assert any(word in err.lower() for word in ("lost", "closed", "reset")), err
        assert "Traceback" not in err
    finally:
        kill(process)
        if client is not None:
            kill(client)


FRAMES = 1000
GOOD_ACKS = 500


@contextlib.contextmanager
def fake_server(misbehave):
    """A server that reads FRAMES frames of 17 bytes, acknowledges the first GOOD_ACKS
    correctly, then does `misbehave(conn)`."""
    listener = socket.create_server(LOOPBACK)
    done = threading.Event()

    def serve():
        conn, _ = listener.accept()
        try:
            recv_exactly(conn, 17 * FRAMES, timeout=10)
            conn.sendall(smallmsg.encode_ack(GOOD_ACKS - 1, GOOD_ACKS - 1))
            time.sleep(0.05)
            misbehave(conn)
            done.wait(10)
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with listener:
            yield listener.getsockname()
    finally:
        done.set()
        thread.join(15)


MALFORMED = {
    "gap": (lambda conn: conn.sendall(smallmsg.encode_ack(600, 50)), "expected id 550"),
    "repeat": (lambda conn: conn.sendall(smallmsg.encode_ack(GOOD_ACKS - 1, 0)),
               "expected id 500"),
    "beyond_sent": (lambda conn: conn.sendall(smallmsg.encode_ack(FRAMES + 10, 510)),
                    "1000 frames on the wire"),
    "short": (lambda conn: (conn.sendall(smallmsg.encode_ack(600, 100)[:5]),
                            conn.shutdown(socket.SHUT_WR)), "short ACK record"),
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_client_raises_protocol_error_with_counts_on_a_malformed_ack_mid_run(kind):
    misbehave, words = MALFORMED[kind]
    with fake_server(misbehave) as address, smallmsg.Client(address) as client:
        client.send_many(b"hello", FRAMES)
        started = time.monotonic()
        with pytest.raises(smallmsg.ProtocolError) as info:
            client.wait_acked(timeout=5)
        assert time.monotonic() - started < 4
    assert words in str(info.value)
    assert info.value.sent == FRAMES and info.value.acked == GOOD_ACKS
    assert info.value.unacked == FRAMES - GOOD_ACKS
    assert f"{FRAMES - GOOD_ACKS} of {FRAMES} frames unacknowledged" in str(info.value)


def test_client_py_reports_a_malformed_ack_in_one_line():
    misbehave, _ = MALFORMED["gap"]
    with fake_server(misbehave) as (_, port):
        result = subprocess.run([sys.executable, os.path.join(HERE, "client.py"),
                                 "--port", str(port), "--count", str(FRAMES), "--timeout", "5"],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, result.stderr
    assert "bad ACK" in result.stderr
    assert f"{FRAMES - GOOD_ACKS} of {FRAMES} frames unacknowledged" in result.stderr


def test_client_raises_connection_lost_with_counts_on_a_reset_mid_run():
    def misbehave(conn):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    with fake_server(misbehave) as address, smallmsg.Client(address) as client:
        client.send_many(b"hello", FRAMES)
        with pytest.raises(smallmsg.ConnectionLost) as info:
            client.wait_acked(timeout=5)
            client.send_many(b"hello", 10)      # the reset may surface on the next write
            client.wait_acked(timeout=5)
    assert info.value.acked == GOOD_ACKS and info.value.sent >= FRAMES
    assert "unacknowledged" in str(info.value)


def test_wait_acked_stops_at_its_timeout_while_acks_trickle_in():
    listener = socket.create_server(LOOPBACK)
    stop = threading.Event()

    def trickle():
        conn, _ = listener.accept()
        with conn:
            recv_exactly(conn, 17 * FRAMES, timeout=10)
            for frame_id in range(FRAMES):          # one ACK per frame, 20 per second
                if stop.wait(0.05):
                    return
                conn.sendall(smallmsg.encode_ack(frame_id, 0))

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    with listener, smallmsg.Client(listener.getsockname()) as client:
        client.send_many(b"hello", FRAMES)
        started = time.monotonic()
        with pytest.raises(smallmsg.AckTimeout) as info:
            client.wait_acked(timeout=0.5)
        elapsed = time.monotonic() - started
        stop.set()
    thread.join(5)
    assert 0.5 <= elapsed < 1.5
    assert 0 < info.value.acked < FRAMES


@pytest.mark.slow
def test_wait_acked_stops_at_its_timeout_when_the_server_stops_reading():
    listener = socket.create_server(LOOPBACK)
    with listener, smallmsg.Client(listener.getsockname()) as client:
        conn, _ = listener.accept()                 # accepted, never read
        with conn:
            # Fill the socket buffers as earlier frames would have, then buffer one more frame.
            # (MSG_DONTWAIT: the client's socket is left in whatever mode the client uses.)
            filled = 0
            with contextlib.suppress(BlockingIOError):
                for _ in range(10_000):
                    filled += client.sock.send(bytes(65536), socket.MSG_DONTWAIT)
            assert filled > 0
            client.send(b"hello")
            outcome = []

            def wait():
                try:
                    client.wait_acked(timeout=0.5)
                except smallmsg.SmallmsgError as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=wait, daemon=True)
            started = time.monotonic()
            thread.start()
            thread.join(2)
            elapsed = time.monotonic() - started
            blocked = thread.is_alive()
        # Closing `conn` resets the connection and unblocks the thread if it was stuck.
        thread.join(5)
    assert not blocked, f"wait_acked(timeout=0.5) still blocked after {elapsed:.1f} s"
    assert isinstance(outcome[0], smallmsg.AckTimeout)
    assert outcome[0].sent == 1 and outcome[0].acked == 0


@pytest.mark.slow
def test_request_reply_client_streaming_many_frames_does_not_deadlock():
    """Step 1 of the series, streamed in one call. The replies (8 bytes per frame) outgrow any
    socket buffer the kernel may grow to (at most 32 + 4 MiB here), so a client that does not
    read them while it writes always deadlocks; client.py's default 2,000,000 often does."""
    frames = 10_000_000
    with running_server(mode=smallmsg.MODE_REQUEST_REPLY) as server:
        client = smallmsg.Client(server.address, mode=smallmsg.MODE_REQUEST_REPLY)
        outcome = []

        def run():
            try:
                client.send_many(b"hi", frames)
                client.wait_acked(timeout=20)
                outcome.append(client.acked)
            except smallmsg.SmallmsgError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        progress, still_since = None, time.monotonic()
        deadline = time.monotonic() + 30
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(0.1)
            now = (client.sent, client.acked)
            if now != progress:
                progress, still_since = now, time.monotonic()
            elif time.monotonic() - still_since > 2:
                break                       # no progress either way for 2 s: stuck
        stuck = thread.is_alive()
        server.shutdown(grace=0.2)          # cuts the connection: unblocks a stuck client
        thread.join(5)
        client.close()
    assert not stuck, f"no progress for 2 s at (sent, acked) = {progress}"
    assert outcome == [frames]


# ------------------------------------------------------------------------------------------
# 8. Security by default
# ------------------------------------------------------------------------------------------

def test_library_defaults_are_loopback_only():
    address = inspect.signature(smallmsg.Server).parameters["address"].default
    assert address == ("127.0.0.1", smallmsg.DEFAULT_PORT)
    assert inspect.signature(smallmsg.Client).parameters["address"].default[0] == "127.0.0.1"
    assert inspect.signature(smallmsg.Server).parameters["max_payload"].default == \
        smallmsg.MAX_PAYLOAD == 1 << 20


def listening_sockets():
    """(address hex, port) of every IPv4 and IPv6 listening TCP socket, from /proc/net."""
    found = set()
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/net/{name}") as table:
            next(table)
            for line in table:
                fields = line.split()
                local, state = fields[1], fields[3]
                if state == "0A":                  # TCP_LISTEN
                    host, port = local.split(":")
                    found.add((host, int(port, 16)))
    return found


def test_cli_listens_on_loopback_only_by_default():
    process, host, port = start_server()
    try:
        assert host == "127.0.0.1"
        bound = {host for host, p in listening_sockets() if p == port}
        assert bound == {"0100007F"}, bound      # 127.0.0.1, not 0.0.0.0 nor ::
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=10)
        kill(process)
    assert process.returncode == 0


def test_server_default_host_binds_loopback():
    """Server() binds its default host: 127.0.0.1 (port 0 here, so the test never collides)."""
    host, _ = inspect.signature(smallmsg.Server).parameters["address"].default
    with smallmsg.Server((host, 0)) as server:
        assert server.address[0] == "127.0.0.1"
        bound = {h for h, p in listening_sockets() if p == server.address[1]}
        assert bound == {"0100007F"}, bound


# ------------------------------------------------------------------------------------------
# Thread placement
# ------------------------------------------------------------------------------------------

def allowed_cpus(thread):
    return os.sched_getaffinity(thread.native_id)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
@pytest.mark.parametrize("ack", smallmsg.ACK_STYLES)
@pytest.mark.parametrize("affinity", [True, False])
def test_a_connections_threads_keep_to_one_cpu(affinity, ack):
    everywhere = os.sched_getaffinity(0)
    seen = {}

    def handler(batch):
        seen["cpus"] = os.sched_getaffinity(0)

    with running_server(handler, affinity=affinity, ack=ack) as server:
        with smallmsg.Client(server.address) as client:
            client.send(b"hello")
            client.wait_acked(timeout=5)
            (conn,) = server._connections
            reader_cpus = allowed_cpus(conn.reader)
    if affinity:
        assert len(seen["cpus"]) == 1 and seen["cpus"] == reader_cpus
        assert seen["cpus"] <= everywhere
    else:
        assert seen["cpus"] == reader_cpus == everywhere
    assert os.sched_getaffinity(0) == everywhere     # the caller's own thread is left alone
