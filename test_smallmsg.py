"""Tests of smallmsg: the parser (sans-IO), the server and client end to end, the command lines.

Every network test uses 127.0.0.1 and ephemeral ports; every loop is bounded in count and time.
Speed is never asserted here: bench.sh measures it.
"""

import contextlib
import logging
import os
import random
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


def recv_until_closed(sock, timeout=5.0):
    """Everything the server sends until it closes (bounded by `timeout`)."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
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
    expected_frames, expected_acks, _, _ = parse([data], ack_each=False)
    for cut in range(len(data) + 1):
        frames, acks, _, error = parse([data[:cut], data[cut:]], ack_each=False)
        assert error is None
        assert frames == expected_frames, cut
        assert acks == expected_acks, cut


def test_byte_by_byte_feed():
    data = stream_of(MIXED[:30])
    frames, acks, _, error = parse([data[i:i + 1] for i in range(len(data))])
    assert error is None
    assert frames == list(enumerate(MIXED[:30]))
    check_ack_coverage(acks_of(acks), 30)


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


# ------------------------------------------------------------------------------------------
# Server and client end to end
# ------------------------------------------------------------------------------------------

class Recorder:
    """A handler that keeps every frame it is given."""

    def __init__(self):
        self.frames = []
        self.lock = threading.Lock()

    def __call__(self, batch):
        with self.lock:
            self.frames.extend((frame_id, bytes(payload)) for frame_id, payload in batch)


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


def reference_style_client(address, rounds, batch=150, payload=b"hello", window=None):
    """What the series' C++ client does: 150 frames of 17 bytes per write, no TCP_NODELAY,
    reads of up to 24,576 bytes taken as whole 12-byte ACKs, the arithmetic check."""
    sock = socket.create_connection(address)
    sock.setblocking(True)
    previous, sent = -1, 0
    frame = struct.Struct("<QI")
    try:
        def take_acks(block):
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
                take_acks(False)
            sock.settimeout(None)
        deadline = time.monotonic() + 20
        while previous + 1 < sent:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            take_acks(True)
        return sent, previous + 1
    finally:
        sock.close()


@pytest.mark.parametrize("ack", smallmsg.ACK_STYLES)
def test_reference_style_cpp_client_passes(ack):
    with running_server(ack=ack) as server:
        sent, acked = reference_style_client(server.address, rounds=400)
    assert sent == acked == 60_000


def test_last_ack_arrives_promptly_without_more_input():
    """One small write, then wait: the ACK must not sit behind Nagle or a delayed ACK."""
    with running_server() as server:
        with smallmsg.Client(server.address) as client:
            for _ in range(5):
                client.send(b"ping")
                client.wait_acked(timeout=5)
            assert client.acked == 5


def test_ack_coverage_equals_frames_sent_over_raw_socket():
    payloads = [b"x" * (i % 50) for i in range(3000)]
    with running_server() as server:
        with socket.create_connection(server.address) as sock:
            for chunk in chunked(stream_of(payloads), 999):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
            records = acks_of(recv_until_closed(sock))
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
                assert recv_until_closed(bad) == b""          # no ACK for the failed frame
        assert wait_for(lambda: "handler raised" in caplog.text)
        assert "127.0.0.1:" in caplog.text
        with smallmsg.Client(server.address) as good:
            good.send_many(b"hello", 1000)
            good.wait_acked(timeout=5)


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

def start_cli_server(*args):
    """smallmsg.py on a free port: (process, port), once it says it listens."""
    process = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "smallmsg.py"), "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.startswith("smallmsg listening on 127.0.0.1:"), line + process.stderr.read()
    return process, int(line.split()[3].rsplit(":", 1)[1])


def run_client(*args, timeout=60):
    return subprocess.run([sys.executable, os.path.join(HERE, "client.py"), *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_cli_server_serves_and_stops_cleanly_on_signal(signum):
    process, port = start_cli_server()
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
    assert "connected" in err        # connections are logged at info level


def test_cli_port_in_use_is_one_line_and_nonzero():
    with socket.create_server(LOOPBACK) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, os.path.join(HERE, "smallmsg.py"),
                                 "--port", str(port)], capture_output=True, text=True, timeout=10)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0
    assert "address already in use" in result.stderr.lower()


@pytest.mark.parametrize("args", [["--port", "70000"], ["--port", "x"], ["--mode", "nope"],
                                  ["--max-payload", "-1"]])
def test_cli_bad_option_is_one_line_and_nonzero(args):
    result = subprocess.run([sys.executable, os.path.join(HERE, "smallmsg.py"), *args],
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "error" in result.stderr
    assert "Traceback" not in result.stderr


def test_client_spawn_runs_rounds_and_leaves_nothing():
    result = run_client("--spawn", "--count", "50000", "--iterations", "3", "--json")
    assert result.returncode == 0, result.stderr
    import json
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
