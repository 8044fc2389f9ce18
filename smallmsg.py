#!/usr/bin/env python3
"""smallmsg: millions of small messages per second over TCP, with coalesced ACKs.

A zero-dependency server and client for the wire protocol of the "small TCP messages in Elixir"
experiment series: a client streams frames (8-byte id, u32 size, payload) and the server answers
with ACK records that each cover a run of frames. One file, standard library only: copy it into
any project and it works.

Run a server and load it::

    python smallmsg.py --port 8005          # listens on 127.0.0.1:8005
    python client.py --count 2000000        # the series' load client, built on smallmsg.Client

Use it as a library::

    import smallmsg

    def handle(batch):                      # called in the connection's ACK thread
        for frame_id, payload in batch:     # payload is bytes-like, valid during the call only
            ...

    with smallmsg.Server(("127.0.0.1", 0), handler=handle) as srv:
        srv.start()                         # background threads; serve_forever() blocks instead
        with smallmsg.Client(srv.address) as c:
            c.send(b"hello")                # returns the frame's id: 0, 1, 2, ...
            c.wait_acked(timeout=5)         # flushes, then waits for the ACKs

Why it is fast: the server reads as much as the socket has into large preallocated blocks,
checks whole runs of equal-sized frames with a few strided slices (C loops over the block, no
Python work per frame), and answers a whole block with one ACK. Frames of varying sizes take an
exact per-frame path. The client writes the ids of a whole batch with the same strided trick.
"""

import argparse
import array
import logging
import math
import os
import queue
import select
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections import namedtuple

__all__ = [
    "Server", "Client", "FrameBlock", "FrameParser", "Batch", "Segment",
    "SmallmsgError", "ProtocolError", "ConnectionLost", "AckTimeout",
    "encode_frame", "encode_ack", "main",
    "DEFAULT_PORT", "MAX_PAYLOAD", "HEADER_SIZE", "ACK_SIZE", "DEFAULT_ACK_TIMEOUT",
    "MODE_ACK", "MODE_REQUEST_REPLY", "MODES", "ACK_THREAD", "ACK_INLINE", "ACK_STYLES",
]
__version__ = "0.1.0"

log = logging.getLogger("smallmsg")


# ###########################################################################################
# Wire format (see PROTOCOL.md)
# ###########################################################################################

DEFAULT_PORT = 8005          # the series' step-5 port
MAX_PAYLOAD = 1 << 20        # default limit: a header announcing more is a protocol error

FRAME_ID = struct.Struct("<Q")       # frame: id | size | payload; ids as u64, as the reference
SIZE_LE = struct.Struct("<I")        # clients number them; the size is a u32, little-endian...
SIZE_BE = struct.Struct(">I")        # ...or big-endian in request-reply mode
ACK_RECORD = struct.Struct("<QI")    # ACK: id of the last frame covered | skipped (u32)

ID_SIZE = FRAME_ID.size
SIZE_OFFSET = ID_SIZE
HEADER_SIZE = ID_SIZE + SIZE_LE.size
ACK_SIZE = ACK_RECORD.size
MAX_SIZE_FIELD = 0xFFFFFFFF  # the largest u32
MAX_SKIPPED = 0xFFFFFFFF     # one ACK covers at most MAX_SKIPPED + 1 frames

MODE_ACK = "ack"                       # coalesced ACKs, little-endian size (steps 2 to 5)
MODE_REQUEST_REPLY = "request-reply"   # each frame answered with its id, big-endian size (step 1)
MODES = (MODE_ACK, MODE_REQUEST_REPLY)
ACK_THREAD = "thread"        # a reader thread hands whole blocks to an ACK thread (step 5)
ACK_INLINE = "inline"        # the reader parses, calls the handler and ACKs itself (step 4)
ACK_STYLES = (ACK_THREAD, ACK_INLINE)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")


def _check_max_payload(max_payload):
    if not 0 <= max_payload <= MAX_SIZE_FIELD:
        raise ValueError(f"max_payload must be between 0 and {MAX_SIZE_FIELD}, "
                         f"not {max_payload}")


def size_struct(mode):
    """The struct of the size field in `mode`: little-endian, big-endian for request-reply."""
    _check_choice("mode", mode, MODES)
    return SIZE_BE if mode == MODE_REQUEST_REPLY else SIZE_LE


def frame_header(frame_id, payload_size, size_field=SIZE_LE):
    """The 12 header bytes of a frame (`size_field`: the struct of the mode's size field)."""
    return FRAME_ID.pack(frame_id) + size_field.pack(payload_size)


def encode_frame(frame_id, payload, mode=MODE_ACK):
    """One frame as bytes: `frame_id` (an int, u64) and the payload."""
    return frame_header(frame_id, len(payload), size_struct(mode)) + bytes(payload)


def encode_ack(last_id, skipped):
    """One ACK record: covers the frame `last_id` (int) and the `skipped` frames before it."""
    return ACK_RECORD.pack(last_id, skipped)


class SmallmsgError(Exception):
    """Base of smallmsg's errors. A client's error carries its counts (else None)."""

    def __init__(self, message, *, sent=None, acked=None):
        super().__init__(message)
        self.sent = sent
        self.acked = acked

    @property
    def unacked(self):
        """Frames sent but not acknowledged when the error happened."""
        if self.sent is None or self.acked is None:
            return None
        return self.sent - self.acked


class ProtocolError(SmallmsgError):
    """Bytes on the wire broke PROTOCOL.md: a bad frame header, or a bad ACK."""


class ConnectionLost(SmallmsgError, ConnectionError):
    """The peer closed or reset the connection while frames were unacknowledged."""


class AckTimeout(SmallmsgError, TimeoutError):
    """The ACKs for the frames sent did not all arrive in time."""


# ###########################################################################################
# Frame parser (sans-IO: bytes in; frames, ACK records and protocol errors out)
# ###########################################################################################

# Runs of equal-sized frames are checked whole: the size fields of a run sit at a fixed stride, so
# four strided slices of the block (one per byte of the u32) compared with the expected bytes prove
# every frame of the run at C speed. A run check is tried with a window that starts small and
# doubles while the run holds, so its cost is proportional to the frames it proves. When the
# sizes vary the check is tried again only after a number of exact frames that doubles on each
# failure, so mixed traffic pays a bounded, small cost per frame and never a quadratic one.
RUN_MIN = 8                  # a uniform segment must hold at least this many frames
RUN_WINDOW_START = 64        # frames proven by the first strided check of a run
RUN_BACKOFF_MIN = 4          # exact frames before the next run check after a failed one...
RUN_BACKOFF_MAX = 256        # ...doubling up to this


class Segment(namedtuple("Segment", "buffer start end count frame_size last")):
    """Consecutive whole frames of a Batch inside one buffer.

    `buffer[start:end]` holds `count` frames; `frame_size` is their common size (header included)
    or 0 when their sizes vary; `last` is the offset of the last frame.
    """

    __slots__ = ()

    @property
    def raw(self):
        """The frames' bytes, headers included, as a memoryview (no copy)."""
        return memoryview(self.buffer)[self.start:self.end]

    def rows(self):
        """Frames of one size as a 2-D memoryview, a row per frame (no copy): with numpy,
        ``numpy.asarray(segment.rows())[:, 12:]`` are the payloads as a strided view."""
        if not self.frame_size:
            raise ValueError("the frames of this segment vary in size")
        return self.raw.cast("B", (self.count, self.frame_size))


class Batch:
    """The whole frames that one `FrameParser.feed` found, in order.

    A handler can walk it frame by frame (``for frame_id, payload in batch``: the id as an int, the
    payload as a memoryview valid during the handler call only) or work on the block at C speed:
    ``batch.ids`` (an ``array('Q')``), ``batch.payloads()`` (all payloads, concatenated),
    ``batch.segments`` (the raw frames; runs of equal-sized frames are marked).
    """

    __slots__ = ("segments", "count", "error", "_size")

    def __init__(self, segments, count, error=None, size=SIZE_LE):
        self.segments = segments
        self.count = count
        self.error = error      # a ProtocolError that ended the stream after these frames
        self._size = size

    def __len__(self):
        return self.count

    def __bool__(self):
        return self.count > 0

    def __repr__(self):
        return f"<Batch of {self.count} frames in {len(self.segments)} segments>"

    def __iter__(self):
        unpack_id = FRAME_ID.unpack_from
        unpack_size = self._size.unpack_from
        for seg in self.segments:
            view = memoryview(seg.buffer)
            pos = seg.start
            if seg.frame_size:
                for pos in range(seg.start, seg.end, seg.frame_size):
                    yield unpack_id(view, pos)[0], view[pos + HEADER_SIZE:pos + seg.frame_size]
                continue
            while pos < seg.end:
                (size,) = unpack_size(view, pos + SIZE_OFFSET)
                body = pos + HEADER_SIZE
                yield unpack_id(view, pos)[0], view[body:body + size]
                pos = body + size

    @property
    def nbytes(self):
        """Bytes of all frames, headers included."""
        return sum(seg.end - seg.start for seg in self.segments)

    @property
    def payload_nbytes(self):
        """Bytes of all payloads."""
        return self.nbytes - HEADER_SIZE * self.count

    @property
    def last_id(self):
        """The 8 id bytes of the last frame (None for an empty batch)."""
        if not self.segments:
            return None
        seg = self.segments[-1]
        return bytes(seg.buffer[seg.last:seg.last + ID_SIZE])

    def frame_offsets(self, seg):
        """Offsets of the frames of segment `seg` (a range when they are of one size)."""
        if seg.frame_size:
            return range(seg.start, seg.end, seg.frame_size)
        unpack_size = self._size.unpack_from
        offsets = []
        pos = seg.start
        while pos < seg.end:
            offsets.append(pos)
            pos += HEADER_SIZE + unpack_size(seg.buffer, pos + SIZE_OFFSET)[0]
        return offsets

    def id_bytes(self):
        """The 8 id bytes of every frame, concatenated (what request-reply mode answers)."""
        parts = []
        for seg in self.segments:
            if seg.frame_size:
                parts.append(_gather(seg.buffer, seg.start, seg.end, seg.frame_size, 0, ID_SIZE))
            else:
                buf = seg.buffer
                parts.extend(buf[pos:pos + ID_SIZE] for pos in self.frame_offsets(seg))
        return b"".join(parts)

    @property
    def ids(self):
        """The ids as u64 integers, an ``array('Q')``."""
        ids = array.array("Q")
        ids.frombytes(self.id_bytes())
        if sys.byteorder == "big":
            ids.byteswap()
        return ids

    def frame_id_bytes(self, index):
        """The 8 id bytes of frame number `index` of this batch."""
        for seg in self.segments:
            if index < seg.count:
                if seg.frame_size:
                    pos = seg.start + index * seg.frame_size
                else:
                    pos = self.frame_offsets(seg)[index]
                return bytes(seg.buffer[pos:pos + ID_SIZE])
            index -= seg.count
        raise IndexError("frame index out of range")

    def payloads(self):
        """All payloads concatenated, in order, built with bulk copies."""
        parts = []
        for seg in self.segments:
            buf = seg.buffer
            size = seg.frame_size - HEADER_SIZE
            if seg.frame_size and size < seg.count:
                # Fewer byte columns than frames: copy a column at a time.
                parts.append(_gather(buf, seg.start, seg.end, seg.frame_size, HEADER_SIZE, size))
            else:
                for pos in self.frame_offsets(seg):
                    size = self._size.unpack_from(buf, pos + SIZE_OFFSET)[0]
                    parts.append(buf[pos + HEADER_SIZE:pos + HEADER_SIZE + size])
        return b"".join(parts)


def _gather(buf, start, end, stride, offset, width):
    """Bytes offset..offset+width of every `stride`-byte record of buf[start:end], concatenated:
    `width` strided copies, one per byte column, at C speed whatever the number of records."""
    out = bytearray(width * ((end - start) // stride))
    for k in range(width):
        out[k::width] = buf[start + offset + k:end:stride]
    return out


def _leading(column, byte):
    """How many items at the start of `column` equal `byte`."""
    return len(column) - len(column.lstrip(byte))


class FrameParser:
    """Turns the bytes of one connection into batches of whole frames and into ACK records.

    ``feed(data)`` returns a `Batch` of the frames completed by `data` (a frame split across
    feeds is carried over, in a buffer of at most ``max_payload + HEADER_SIZE`` bytes). Once the
    frames of a batch are handled, ``handled(batch)`` records them, and ``take_ack()`` returns the
    ACK records to send for everything handled so far (b"" when there is nothing to acknowledge).

    A bad header ends the stream: the batch then holds the whole frames before it and carries the
    `ProtocolError` in ``batch.error``; those frames are still to be handled and acknowledged.
    """

    #: frames one ACK record covers at most; smaller values only serve tests
    max_ack_cover = MAX_SKIPPED + 1

    def __init__(self, max_payload=MAX_PAYLOAD, mode=MODE_ACK, *, fast_runs=True):
        _check_max_payload(max_payload)
        self.max_payload = max_payload
        self.mode = mode
        self.fast_runs = fast_runs      # False: every frame on the exact path (tests compare)
        self._size = size_struct(mode)
        self._partial = bytearray()     # the start of a frame that the next feed completes
        self._error = None
        self._unacked = 0               # frames handled and not yet covered by an ACK record
        self._last_id = None
        self._acks = []                 # ACK records ready to send
        self.frames = 0                 # frames parsed so far
        self.bytes = 0                  # bytes fed so far

    @property
    def pending_bytes(self):
        """Bytes of an incomplete frame held over to the next feed."""
        return len(self._partial)

    @property
    def error(self):
        """The ProtocolError that ended this stream, or None."""
        return self._error

    def feed(self, data, end=None):
        """Parse ``data[:end]`` and return the Batch of the frames it completes.

        Pass a bytes or bytearray to avoid a copy; the batch's payloads point into it.
        """
        if self._error is not None:
            raise self._error
        if not isinstance(data, (bytes, bytearray)):
            data = bytes(data)
        if end is None:
            end = len(data)
        self.bytes += end
        segments = []
        pos = count = 0
        if self._partial:
            pos = self._complete_partial(data, end, segments)
            if pos is None:     # still incomplete, or a bad header
                return self._batch(segments, 0, self._error)
            count = 1
        pos, found, error = self._scan(data, pos, end, segments)
        count += found
        if error is None and pos < end:
            if end - pos >= HEADER_SIZE:
                error = self._check_size(data, pos)
            if error is None:
                self._partial += memoryview(data)[pos:end]
        return self._batch(segments, count, error)

    def _batch(self, segments, count, error=None):
        if error is not None:
            self._error = error
        self.frames += count
        return Batch(segments, count, error, self._size)

    def _check_size(self, data, pos):
        (size,) = self._size.unpack_from(data, pos + SIZE_OFFSET)
        if size > self.max_payload:
            return ProtocolError(
                f"frame announces a {size}-byte payload, over the {self.max_payload}-byte limit")
        return None

    def _complete_partial(self, data, end, segments):
        """Complete the carried frame from the start of `data`; return where `data` goes on."""
        partial = self._partial
        take = 0
        if len(partial) < HEADER_SIZE:
            take = min(HEADER_SIZE - len(partial), end)
            partial += memoryview(data)[:take]
            if len(partial) < HEADER_SIZE:
                return None
            self._error = self._check_size(partial, 0)
            if self._error is not None:
                self._partial = bytearray()     # a bad header, not a frame cut short
                return None
        frame_size = HEADER_SIZE + self._size.unpack_from(partial, SIZE_OFFSET)[0]
        more = min(frame_size - len(partial), end - take)
        partial += memoryview(data)[take:take + more]
        if len(partial) < frame_size:
            return None
        self._partial = bytearray()
        segments.append(Segment(partial, 0, frame_size, 1, frame_size, 0))
        return take + more

    def _scan(self, buf, pos, end, segments):
        """Find the whole frames of ``buf[pos:end]``: returns (next pos, frames, error)."""
        unpack_size = self._size.unpack_from
        max_payload = self.max_payload
        total = 0
        mixed_start = pos       # the frames since the last uniform run, of varying sizes
        mixed_count = 0
        mixed_last = pos
        # Exact frames to take before the next run check (infinity never counts down to 0).
        skip = 0 if self.fast_runs else math.inf
        backoff = RUN_BACKOFF_MIN
        error = None
        while pos + HEADER_SIZE <= end:
            (size,) = unpack_size(buf, pos + SIZE_OFFSET)
            if size > max_payload:
                error = self._check_size(buf, pos)
                break
            frame_end = pos + HEADER_SIZE + size
            if frame_end > end:
                break
            if skip:
                skip -= 1
                mixed_count += 1
                mixed_last = pos
                pos = frame_end
                continue
            frame_size = frame_end - pos
            count = self._run_length(buf, pos, end, frame_size, size)
            if count < RUN_MIN:
                mixed_count += count
                mixed_last = pos + (count - 1) * frame_size
                pos += count * frame_size
                skip = backoff
                backoff = min(2 * backoff, RUN_BACKOFF_MAX)
                continue
            if mixed_count:
                segments.append(Segment(buf, mixed_start, pos, mixed_count, 0, mixed_last))
                total += mixed_count
                mixed_count = 0
            run_end = pos + count * frame_size
            segments.append(Segment(buf, pos, run_end, count, frame_size, run_end - frame_size))
            total += count
            pos = mixed_start = run_end
            backoff = RUN_BACKOFF_MIN
        if mixed_count:
            segments.append(Segment(buf, mixed_start, pos, mixed_count, 0, mixed_last))
            total += mixed_count
        return pos, total, error

    def _run_length(self, buf, pos, end, frame_size, size):
        """How many frames of `frame_size` bytes follow from `pos` (at least the one there)."""
        available = (end - pos) // frame_size
        if available < RUN_MIN:
            return 1
        if self._size.unpack_from(buf, pos + frame_size + SIZE_OFFSET)[0] != size:
            return 1            # the next frame differs: no run here, and no strided work
        expected = self._size.pack(size)
        count = 0
        window = RUN_WINDOW_START
        while count < available:
            n = min(window, available - count)
            first = pos + count * frame_size + SIZE_OFFSET
            stop = first + n * frame_size
            for k in range(SIZE_LE.size):
                column = buf[first + k:stop:frame_size]
                byte = expected[k:k + 1]
                if column != byte * n:
                    # The run ends inside this window, where the first of the columns breaks.
                    return count + min(
                        _leading(buf[first + j:stop:frame_size], expected[j:j + 1])
                        for j in range(k, SIZE_LE.size))
            count += n
            window *= 2
        return count

    def handled(self, batch):
        """Record that the frames of `batch` were handled: they are now to be acknowledged."""
        if not batch.count:
            return
        if self.mode == MODE_REQUEST_REPLY:
            self._acks.append(batch.id_bytes())
            return
        cover = self.max_ack_cover
        index = 0               # frames of the batch already placed in a full ACK record
        while self._unacked + batch.count - index > cover:
            index += cover - self._unacked
            self._acks.append(batch.frame_id_bytes(index - 1) + SIZE_LE.pack(cover - 1))
            self._unacked = 0
        self._unacked += batch.count - index
        self._last_id = batch.last_id

    def take_ack(self):
        """The ACK records for all frames handled and not yet acknowledged (b"" if none)."""
        if self._unacked:
            self._acks.append(self._last_id + SIZE_LE.pack(self._unacked - 1))
            self._unacked = 0
        if not self._acks:
            return b""
        acks = b"".join(self._acks)
        self._acks.clear()
        return acks


# ###########################################################################################
# Server
# ###########################################################################################

BLOCK_SIZE = 1 << 20         # bytes per recv_into: large reads, few system calls
# Blocks per connection: this bounds memory, and a slow handler pushes back through TCP once
# they are all queued.
POOL_BLOCKS = 2
ACK_EVERY_BLOCKS = 16        # under continuous load, still ACK at least this often
DEFAULT_MAX_CONNECTIONS = 1024   # each costs two threads and up to POOL_BLOCKS blocks
SHUTDOWN_GRACE = 5.0         # seconds connections get to finish their blocks at shutdown
CUT_WAIT = 1.5               # then seconds a cut connection gets to end
POLL_INTERVAL = 0.5          # seconds between checks for shutdown in serve_forever
ACCEPT_RETRY = 0.1           # seconds between accepts while accept() fails (no descriptors)
REFUSAL_LOG_INTERVAL = 1.0   # at most one warning a second for refused connections
# At close, how long and how much to read and discard of what the peer still sends: a close
# with unread input sends a RST, which makes the peer drop the ACKs it has not read yet.
CLOSE_LINGER = 1.0
CLOSE_LINGER_BYTES = 16 << 20


def _peer_name(address):
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return str(address)


if hasattr(select, "poll"):
    def _wait_readable(sock, timeout, stop=None):
        """Wait until `sock` (or `stop`) has data, EOF or an error: the ones ready, an empty
        list after `timeout` seconds (None: no limit)."""
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        if stop is not None:
            poller.register(stop, select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000))
        return [fd for fd, _ in poller.poll(ms)]
else:   # pragma: no cover - Windows
    def _wait_readable(sock, timeout, stop=None):
        """Wait until `sock` (or `stop`) has data, EOF or an error: the ones ready, an empty
        list after `timeout` seconds (None: no limit)."""
        ready = select.select([sock] if stop is None else [sock, stop], [], [], timeout)[0]
        return [s.fileno() for s in ready]


class Connection:
    """One client connection: its reader thread and, with ack="thread", its AckWorker thread.

    The reader waits for data before it takes a block, so a silent connection holds none, and
    the idle timeout applies to reading only: a peer slow to read its ACKs is not "idle".
    """

    def __init__(self, server, sock, peer):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.parser = FrameParser(server.max_payload, server.mode)
        self.closing = False
        self._free = queue.SimpleQueue()    # blocks ready for recv_into; None: stop reading
        self._full = queue.SimpleQueue()    # (block, nbytes) for the AckWorker; None at the end
        self._blocks = 0                    # blocks allocated so far, at most pool_blocks
        self.close_reason = None            # why the connection ends, logged when it does...
        self._close_level = logging.INFO    # ...at this level
        self.reader = threading.Thread(target=self._run_reader, name=f"smallmsg-reader-{peer}",
                                       daemon=True)
        self.ack_worker = AckWorker(self) if server.ack == ACK_THREAD else None
        self.cpu = server._next_cpu()       # the CPU this connection's threads keep to, if any

    def start(self):
        if self.ack_worker is not None:
            self.ack_worker.start()
        try:
            self.reader.start()
        except BaseException:
            if self.ack_worker is not None:
                self._full.put(None)    # no reader: the AckWorker ends and closes
            raise

    def join(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in (self.reader, self.ack_worker):
            if thread is not None and thread.ident is not None:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    @property
    def alive(self):
        return any(t is not None and t.is_alive() for t in (self.reader, self.ack_worker))

    def abort(self):
        """Unblock every thread of this connection, even one stuck writing to a peer that
        does not read."""
        self.closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def keep_to_cpu(self):
        """Keep the calling thread on this connection's CPU (see Server's `affinity`)."""
        if self.cpu is not None:
            try:
                os.sched_setaffinity(0, {self.cpu})
            except OSError as exc:
                log.debug("%s: cannot keep to CPU %d: %s", self.peer, self.cpu, exc)

    def _end_because(self, reason, level=logging.INFO):
        """Note why the connection ends (the first reason wins)."""
        if self.close_reason is None:
            self.close_reason = reason
            self._close_level = level

    # -- reading ---------------------------------------------------------------------------

    def _wait_for_data(self):
        """Wait until the socket has something to read: False if the server shuts down (what
        was read still gets handled) or the connection is idle past the timeout."""
        if self.server._reading_stopped:
            self._end_because("server shutting down")
            return False
        stop = self.server._stop_reading_r
        ready = _wait_readable(self.sock, self.server.idle_timeout, stop)
        if stop.fileno() in ready:
            self._end_because("server shutting down")
            return False
        if ready:
            return True
        self._end_because(f"idle for {self.server.idle_timeout:g} s")
        return False

    def _recv(self, block):
        """recv_into `block`: the byte count, or 0 at the end of the stream (reason noted)."""
        try:
            return self.sock.recv_into(block)
        except OSError as exc:
            if not self.closing:
                self._end_because(f"connection error: {exc.strerror or exc}")
        return 0

    def _take_block(self):
        """A block for the next read: a new one while the pool is not full, else a free one
        (None once the AckWorker has stopped)."""
        if self._free.empty() and self._blocks < self.server.pool_blocks:
            self._blocks += 1
            return bytearray(self.server.block_size)
        return self._free.get()

    def _run_reader(self):
        self.keep_to_cpu()
        if self.ack_worker is None:
            self._read_and_ack()
        else:
            self._read_blocks()

    def _read_blocks(self):
        """Reader thread (ack="thread"): whole blocks to the AckWorker, never single frames."""
        full = self._full
        try:
            while self._wait_for_data():
                block = self._take_block()
                if block is None:
                    break
                n = self._recv(block)
                if not n:
                    break
                full.put((block, n))
        finally:
            full.put(None)

    def _read_and_ack(self):
        """Reader thread (ack="inline"): read, parse, handle and acknowledge in one thread."""
        block = None
        since_ack = 0
        try:
            while self._wait_for_data():
                if block is None:
                    block = bytearray(self.server.block_size)
                n = self._recv(block)
                if not n or not self.process(block, n):
                    break
                since_ack += 1
                # Nothing more waiting: acknowledge what was handled. A read that did not fill
                # the block emptied the socket; one that did may have, so look.
                if (n < len(block) or since_ack >= ACK_EVERY_BLOCKS
                        or not _wait_readable(self.sock, 0)):
                    since_ack = 0
                    if not self.send_acks():
                        break
        finally:
            self.finish()

    # -- handling and acknowledging ----------------------------------------------------------

    def process(self, block, n):
        """Parse a block and hand its frames to the handler; False ends the connection."""
        parser = self.parser
        batch = parser.feed(block, n)
        handler = self.server.handler
        if batch.count and handler is not None:
            try:
                handler(batch)
            except BaseException:   # even SystemExit: a handler ends its connection, no more
                # Logged here, with its traceback. These frames are never acknowledged; those
                # handled before them are, now, before the connection closes.
                log.exception("%s: handler raised; closing the connection, "
                              "%d frames of this block not acknowledged", self.peer, batch.count)
                self._end_because("handler error", level=logging.DEBUG)
                self.send_acks()
                return False
        parser.handled(batch)
        if batch.error is not None:
            self.send_acks()
            self._end_because(f"protocol error: {batch.error}", level=logging.WARNING)
            return False
        if self.server.mode == MODE_REQUEST_REPLY:
            return self.send_acks()
        return True

    def send_acks(self):
        """Send the ACK records due, whole; False if the peer no longer takes them."""
        acks = self.parser.take_ack()
        if not acks:
            return True
        try:
            self.sock.sendall(acks)
            return True
        except OSError as exc:
            self._end_because(f"cannot send ACKs: {exc.strerror or exc}")
            return False

    def finish(self):
        """End of the connection: last ACKs, logs, a graceful close, deregister."""
        try:
            self.send_acks()    # frames handled and not yet acknowledged, if the peer listens
            if self.parser.pending_bytes:
                log.warning("%s: connection ended inside a frame; dropped %d bytes of it",
                            self.peer, self.parser.pending_bytes)
            self.closing = True
            if self.close_reason is not None:
                log.log(self._close_level, "%s: closing: %s", self.peer, self.close_reason)
            self._close()
        finally:
            self.server._connection_done(self)

    def _close(self):
        """Close without losing the ACKs already written: send FIN, read and discard what the
        peer still sends (bounded), then close."""
        sock = self.sock
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + CLOSE_LINGER
            discarded = 0
            while discarded < CLOSE_LINGER_BYTES:
                left = deadline - time.monotonic()
                if left <= 0 or not _wait_readable(sock, left):
                    break
                data = sock.recv(65536)
                if not data:
                    break
                discarded += len(data)
        except OSError:
            pass
        finally:
            sock.close()


class AckWorker(threading.Thread):
    """Takes whole blocks from the reader, parses them, calls the handler, sends coalesced ACKs.

    An ACK goes out as soon as no block is waiting (a client waiting for its last ACK is never
    kept waiting for more input), and at least every ACK_EVERY_BLOCKS blocks under load.
    """

    def __init__(self, connection):
        super().__init__(name=f"smallmsg-ack-{connection.peer}", daemon=True)
        self.connection = connection

    def run(self):
        conn = self.connection
        conn.keep_to_cpu()
        reader_ended = False
        try:
            reader_ended = self._handle_blocks()
        except BaseException:       # a bug of ours: say so, acknowledge what was handled
            log.exception("%s: ACK thread failed; closing the connection", conn.peer)
            conn._end_because("internal error", level=logging.DEBUG)
            conn.send_acks()
        finally:
            if not reader_ended:
                reader_ended = self._discard_blocks()
            if not reader_ended:
                conn.abort()                # the reader must not wait for data...
                conn._free.put(None)        # ...nor for a block
                while conn._full.get() is not None:
                    pass
            if conn.reader.ident is not None:
                conn.reader.join()
            conn.finish()

    def _discard_blocks(self):
        """Stopped early (bad input, a handler error, or a bug): go on reading and discarding
        what the peer still sends for a moment, so that it can read the ACKs already written
        (a close with unread input resets the connection and drops them). True if the reader
        saw the end of the stream meanwhile."""
        conn = self.connection
        conn.closing = True
        try:
            conn.sock.shutdown(socket.SHUT_WR)      # the peer sees the end after our ACKs
        except OSError:
            pass
        deadline = time.monotonic() + CLOSE_LINGER
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                item = conn._full.get(timeout=left)
            except queue.Empty:
                return False
            if item is None:
                return True
            conn._free.put(item[0])

    def _handle_blocks(self):
        """Handle blocks until the reader's end (True) or an error ends the connection."""
        conn = self.connection
        full = conn._full
        free = conn._free
        since_ack = 0
        while True:
            item = full.get()
            if item is None:
                return True
            block, n = item
            ok = conn.process(block, n)
            free.put(block)             # only now: the handler's views into it are done
            if not ok:
                return False
            since_ack += 1
            if full.empty() or since_ack >= ACK_EVERY_BLOCKS:
                since_ack = 0
                if not conn.send_acks():
                    return False


class Server:
    """A smallmsg server: listens at once; `serve_forever()` or `start()` accepts connections.

    Every frame a client sends is handed to `handler(batch)` (if any) in order, then
    acknowledged, exactly once. The lifecycle follows `socketserver`: `serve_forever()` blocks
    until `shutdown()`; `with Server(...) as srv:` shuts down and closes on exit.
    """

    def __init__(self, address=("127.0.0.1", DEFAULT_PORT), handler=None, *, mode=MODE_ACK,
                 ack=ACK_THREAD, max_payload=MAX_PAYLOAD,
                 max_connections=DEFAULT_MAX_CONNECTIONS, idle_timeout=None,
                 block_size=BLOCK_SIZE, pool_blocks=POOL_BLOCKS, affinity=True, backlog=128):
        _check_choice("mode", mode, MODES)
        _check_choice("ack", ack, ACK_STYLES)
        _check_max_payload(max_payload)
        if block_size < HEADER_SIZE or pool_blocks < 1:
            raise ValueError("block_size must hold a header and pool_blocks be at least 1")
        self.handler = handler
        self.mode = mode
        self.ack = ack
        self.max_payload = max_payload
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.block_size = block_size
        self.pool_blocks = pool_blocks
        # With ack="thread", each block passes from the reader thread to the ACK thread. When
        # the two run on different cores, every hand-off costs a cross-core wake-up and the
        # block's cache lines move too; when they share one core, the hand-off is nearly free.
        # So a connection's threads keep to one CPU (the one thread of ack="inline" too, which
        # keeps its block in that CPU's cache), connections taking the CPUs in turn.
        self._cpus = None
        if affinity and hasattr(os, "sched_getaffinity"):
            self._cpus = sorted(os.sched_getaffinity(0))
            self._cpu_turn = os.getpid()    # servers on one machine start on different CPUs
        self.connections_total = 0
        self._lock = threading.Lock()
        self._connections = set()
        self._closed_frames = 0
        self._closed_bytes = 0
        self._stop = threading.Event()
        self._serving = threading.Event()
        self._done_serving = threading.Event()
        self._done_serving.set()
        self._thread = None
        self._accept_failing = False
        self._last_refusal_log = -REFUSAL_LOG_INTERVAL
        host = address[0]
        family = socket.AF_INET6 if ":" in str(host) else socket.AF_INET
        self._listener = socket.create_server(address, family=family, backlog=backlog)
        self._listener.setblocking(False)   # a connection gone before accept() must not block
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)     # written from signal handlers: never block there
        # Written once at shutdown and never read: every reader waiting for data wakes and ends.
        self._stop_reading_r, self._stop_reading_w = socket.socketpair()
        self._reading_stopped = False

    @property
    def address(self):
        """The (host, port) actually bound."""
        return self._listener.getsockname()[:2]

    @property
    def connections(self):
        """Open connections now."""
        with self._lock:
            return len(self._connections)

    @property
    def stats(self):
        """Totals: connections accepted, messages and bytes received."""
        with self._lock:
            frames = self._closed_frames + sum(c.parser.frames for c in self._connections)
            nbytes = self._closed_bytes + sum(c.parser.bytes for c in self._connections)
        return {"connections": self.connections_total, "messages": frames, "bytes": nbytes}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.shutdown()
        self.close()

    def start(self):
        """Serve in a background thread; returns at once."""
        self._thread = threading.Thread(target=self.serve_forever, name="smallmsg-server",
                                        daemon=True)
        self._thread.start()
        self._serving.wait()
        return self

    def serve_forever(self, poll_interval=POLL_INTERVAL):
        """Accept connections until `shutdown()` (or `stop_serving()`)."""
        self._done_serving.clear()
        self._serving.set()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self._listener, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while not self._stop.is_set():
                    for key, _ in selector.select(poll_interval):
                        if key.fileobj is self._listener:
                            self._accept()
        finally:
            self._done_serving.set()

    def _accept(self):
        try:
            sock, address = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return                  # gone before we took it: nothing to do
        except OSError as exc:
            # Out of file descriptors, say: the listener stays readable, so pause rather than
            # spin, and say so once per episode rather than thousands of times a second.
            if not self._accept_failing:
                log.error("accept failed: %s; retrying every %g s", exc, ACCEPT_RETRY)
            self._accept_failing = True
            self._stop.wait(ACCEPT_RETRY)
            return
        if self._accept_failing:
            log.info("accepting connections again")
            self._accept_failing = False
        sock.setblocking(True)
        peer = _peer_name(address)
        with self._lock:
            full = (self.max_connections is not None
                    and len(self._connections) >= self.max_connections)
        if full:
            self._refuse(sock, peer)
            return
        conn = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # ACKs are tiny writes
            conn = Connection(self, sock, peer)
            with self._lock:
                self._connections.add(conn)
                self.connections_total += 1
            log.info("%s: connected", peer)
            conn.start()
        except Exception as exc:    # e.g. no more threads: drop this one, go on serving
            log.error("%s: cannot serve this connection: %s", peer, exc)
            if conn is None or not conn.alive:
                with self._lock:
                    self._connections.discard(conn)
                sock.close()
            # else its AckWorker was told to end, and closes it

    def _refuse(self, sock, peer):
        now = time.monotonic()
        level = logging.DEBUG
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL:
            level = logging.WARNING
            self._last_refusal_log = now
        log.log(level, "%s: refused: max_connections (%d) reached", peer, self.max_connections)
        sock.close()

    def _next_cpu(self):
        if not self._cpus:
            return None
        self._cpu_turn += 1
        return self._cpus[self._cpu_turn % len(self._cpus)]

    def _connection_done(self, conn):
        with self._lock:
            if conn in self._connections:
                self._connections.discard(conn)
                self._closed_frames += conn.parser.frames
                self._closed_bytes += conn.parser.bytes
        log.info("%s: disconnected after %d messages", conn.peer, conn.parser.frames)

    def stop_serving(self):
        """Stop accepting connections; returns at once (safe in a signal handler)."""
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def shutdown(self, grace=SHUTDOWN_GRACE):
        """Stop accepting, let every connection finish the blocks it has read, and close them.

        Connections still busy after `grace` seconds (a peer that does not read its ACKs) are
        cut; a handler that never returns is left behind (its threads are daemons) with a log
        line, so shutdown always returns, within `grace` + CUT_WAIT seconds.
        """
        self.stop_serving()
        self._done_serving.wait()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            conns = list(self._connections)
        self._reading_stopped = True
        try:
            self._stop_reading_w.send(b"x")
        except OSError:
            pass
        deadline = time.monotonic() + grace
        for conn in conns:
            conn.join(max(0.0, deadline - time.monotonic()))
        busy = [conn for conn in conns if conn.alive]
        for conn in busy:
            log.warning("%s: still busy after %g s; cutting the connection", conn.peer, grace)
            conn.abort()
        # A cut connection ends at once (its writes fail); only a stuck handler keeps it.
        deadline = time.monotonic() + min(grace, CUT_WAIT)
        for conn in busy:
            conn.join(max(0.0, deadline - time.monotonic()))
            if conn.alive:
                log.error("%s: its handler does not return; leaving it behind", conn.peer)

    def close(self):
        """Close the listening socket (after `shutdown()`)."""
        socks = [self._listener, self._wake_r, self._wake_w]
        with self._lock:
            if not self._connections:   # else a connection left behind may still poll it
                socks += [self._stop_reading_r, self._stop_reading_w]
        for sock in socks:
            sock.close()


# ###########################################################################################
# Client
# ###########################################################################################

SEND_BUFFER = 1 << 20        # send() buffers frames up to this many bytes before writing
# send_many() writes up to this many bytes at once (large writes, still cache-sized), and the
# ids of up to SEND_CHUNK_FRAMES.
SEND_CHUNK_BYTES = 2 << 20
ACK_READ_SIZE = 24576        # like the reference clients: 2,048 ACKs per read
DEFAULT_ACK_TIMEOUT = 20.0   # the series' clients wait up to 20 s for the last ACK

# Column k of a run of ids (byte k of each little-endian u64) for ids n, n+1, ...: the two low
# bytes repeat every ID_LOW_SPAN ids, so they are slices of these patterns (two spans long, so a
# slice may start anywhere in the first); the high bytes are constant but for one step where the
# low part wraps.
ID_LOW_SPAN = 1 << 16
SEND_CHUNK_FRAMES = ID_LOW_SPAN  # a whole span: chunk after chunk, the low id bytes stay put
_LOW_ID_BYTES = (bytes(range(256)) * (2 * ID_LOW_SPAN // 256),
                 b"".join(bytes([b]) * 256 for b in range(256)) * 2)


def _id_columns(first_id, count):
    """The 8 byte columns of the ids first_id .. first_id + count - 1 (count <= ID_LOW_SPAN)."""
    low = first_id % ID_LOW_SPAN
    high = first_id // ID_LOW_SPAN
    before_wrap = min(count, ID_LOW_SPAN - low)
    columns = [_LOW_ID_BYTES[0][low:low + count], _LOW_ID_BYTES[1][low:low + count]]
    for k in range(2, ID_SIZE):
        shift = 8 * (k - 2)
        column = bytes([(high >> shift) & 0xFF]) * before_wrap
        if count > before_wrap:
            column += bytes([((high + 1) >> shift) & 0xFF]) * (count - before_wrap)
        columns.append(column)
    return columns


class FrameBlock:
    """Frames built once and sent many times with fresh ids: what a load generator needs.

    ``FrameBlock(payloads)`` lays out one frame per payload; ``FrameBlock.uniform(payload, n)``
    lays out `n` equal frames, whose ids are then rewritten a byte column at a time (8 strided
    copies per block instead of one write per frame). ``number(first_id, count)`` writes the ids
    of the first `count` frames and returns their bytes. Use it with `Client.send_block`.
    """

    def __init__(self, payloads, mode=MODE_ACK):
        size_field = size_struct(mode)
        offsets = []
        parts = []
        pos = 0
        for payload in payloads:
            offsets.append(pos)
            parts.append(frame_header(0, len(payload), size_field) + bytes(payload))
            pos += HEADER_SIZE + len(payload)
        largest = max((len(part) - HEADER_SIZE for part in parts), default=0)
        self._init(b"".join(parts), offsets, 0, largest)

    @classmethod
    def uniform(cls, payload, frames, mode=MODE_ACK):
        """`frames` equal frames carrying `payload`."""
        self = cls.__new__(cls)
        frame = frame_header(0, len(payload), size_struct(mode)) + bytes(payload)
        self._init(frame * frames, range(0, len(frame) * frames, len(frame)), len(frame),
                   len(payload))
        self.payload = bytes(payload)
        return self

    def _init(self, data, offsets, frame_size, largest_payload):
        self.buffer = bytearray(data)
        self.view = memoryview(self.buffer)
        self.offsets = offsets
        self.frames = len(offsets)
        self.frame_size = frame_size        # 0 when the sizes vary
        self.largest_payload = largest_payload
        self.payload = None
        self._columns = [None] * ID_SIZE    # what each id column holds now (uniform blocks)

    def __len__(self):
        return self.frames

    def number(self, first_id, count=None):
        """Give the first `count` frames (all by default) the ids from `first_id` on."""
        count = self.frames if count is None else count
        if not 0 <= count <= self.frames:
            raise ValueError(f"count must be between 0 and {self.frames}")
        if not count:
            return self.view[:0]
        if not self.frame_size:
            pack_id = FRAME_ID.pack_into
            buffer = self.buffer
            for pos, frame_id in zip(self.offsets, range(first_id, first_id + count)):
                pack_id(buffer, pos, frame_id)
            return self.view[:self._frame_end(count - 1)]
        size = self.frame_size
        stop = count * size
        done = 0
        while done < count:     # ids run in columns of at most ID_LOW_SPAN
            n = min(count - done, ID_LOW_SPAN)
            self._write_columns(done * size, first_id + done, n)
            done += n
        return self.view[:stop]

    def _frame_end(self, index):
        return self.offsets[index + 1] if index + 1 < self.frames else len(self.buffer)

    def _write_columns(self, start, first_id, count):
        size = self.frame_size
        stop = start + count * size
        whole = start == 0 and count == self.frames
        for k, column in enumerate(_id_columns(first_id, count)):
            held = self._columns[k]
            if start == 0 and held is not None and held[:count] == column:
                continue            # most columns do not change between blocks
            self.buffer[start + k:stop:size] = column
            self._columns[k] = column if whole else None


class Client:
    """A smallmsg client: numbers frames 0, 1, 2, ... and checks every ACK.

    ``send(payload)`` buffers one frame and returns its id; ``send_many(payload, count)`` sends
    `count` equal frames at C speed; ``flush()`` writes what is buffered; ``wait_acked()``
    waits until every frame sent is acknowledged. Errors carry ``sent`` and ``acked``.
    """

    def __init__(self, address=("127.0.0.1", DEFAULT_PORT), *, mode=MODE_ACK,
                 max_payload=MAX_PAYLOAD, timeout=DEFAULT_ACK_TIMEOUT):
        self._size = size_struct(mode)
        self.mode = mode
        self.max_payload = max_payload
        self.sent = 0                   # frames given ids so far
        self._handed = 0                # frames whose write has begun
        self.acked = 0
        self.bytes_sent = 0             # bytes written to the socket
        self._last_acked = -1
        self._out = bytearray()
        self._unwritten = b""           # the rest of a write that a timeout interrupted
        self._in = bytearray(ACK_READ_SIZE)
        self._in_partial = b""
        self._uniform = None            # FrameBlock of the last send_many
        self._closed_by_peer = False
        self.timeout = timeout      # the longest any call waits for the server (None: no limit)
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.sock, selectors.EVENT_READ)
        self.address = address

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def unacked(self):
        return self.sent - self.acked

    def _error(self, cls, message):
        """An error that says, and carries, how many frames are still unacknowledged."""
        return cls(f"{message}; {self.unacked} of {self.sent} frames unacknowledged",
                   sent=self.sent, acked=self.acked)

    def _check_payload_size(self, size):
        if size > self.max_payload:
            raise ValueError(f"payload of {size} bytes is over max_payload ({self.max_payload})")

    def send(self, payload):
        """Buffer one frame; returns its id. Writes once SEND_BUFFER bytes are buffered."""
        self._check_payload_size(len(payload))
        frame_id = self.sent
        out = self._out
        out += frame_header(frame_id, len(payload), self._size)
        out += payload
        self.sent = frame_id + 1
        if len(out) >= SEND_BUFFER:
            self.flush()
        return frame_id

    def send_batch(self, payloads):
        """Buffer one frame per payload; returns the id of the first."""
        first = self.sent
        for payload in payloads:
            self.send(payload)
        return first

    def send_many(self, payload, count):
        """Send `count` frames with the same payload, ids written in bulk; returns the first id."""
        self._check_payload_size(len(payload))
        block = self._uniform
        if block is None or block.payload != payload:
            frame_size = HEADER_SIZE + len(payload)
            frames = max(1, min(SEND_CHUNK_FRAMES, SEND_CHUNK_BYTES // frame_size))
            block = self._uniform = FrameBlock.uniform(payload, frames, self.mode)
        first = self.sent
        while self.sent < first + count:
            # Blocks aligned on multiples of their length keep the low id columns as they are.
            n = min(first + count - self.sent, block.frames - self.sent % block.frames)
            self.send_block(block, n)
        return first

    def send_block(self, block, count=None):
        """Send the first `count` frames of a FrameBlock (all by default) with the next ids;
        returns the first id."""
        self._check_payload_size(block.largest_payload)
        self.flush()
        first = self.sent
        data = block.number(first, count)
        self.sent += block.frames if count is None else count
        self._handed = self.sent
        self._sendall(data)
        self.poll_acks()
        return first

    def flush(self, deadline=None):
        """Write every buffered frame (first, what an interrupted write left)."""
        if self._unwritten:
            unwritten, self._unwritten = self._unwritten, b""
            self._sendall(unwritten, deadline)
        if self._out:
            out = self._out
            self._out = bytearray()
            self._handed = self.sent
            self._sendall(out, deadline)

    def _sendall(self, data, deadline=None):
        """Write all of `data`, reading ACKs whenever the socket cannot take more: a server
        blocked on writing ACKs we do not read would otherwise stop reading our frames."""
        view = memoryview(data).cast("B")
        sock = self.sock
        try:
            while view:
                try:
                    sent = sock.send(view)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    raise self._error(ConnectionLost, f"connection lost while sending: "
                                                      f"{exc.strerror or exc}") from None
                self.bytes_sent += sent
                view = view[sent:]
                if view:
                    self._wait(deadline, writing=True)
        finally:
            if view:
                # Stopped part-way (a timeout, say): the server holds part of a frame, so what
                # is left goes out first, whole, before anything else (a copy: `data` may be a
                # FrameBlock that is renumbered next).
                self._unwritten = bytes(view)

    def _wait(self, deadline, writing=False):
        """Wait until the socket is readable (ACKs taken) or, if `writing`, writable.

        Raises AckTimeout once `deadline` (a time.monotonic() value; None: the client's
        timeout, measured from now) passes with nothing happening."""
        if deadline is None and self.timeout is not None:
            deadline = time.monotonic() + self.timeout
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            raise self._error(AckTimeout, "timed out waiting for the server")
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
        if self._selector.get_key(self.sock).events != events:
            self._selector.modify(self.sock, events)
        ready = self._selector.select(timeout)
        if not ready:
            raise self._error(AckTimeout, "timed out waiting for the server")
        if ready[0][1] & selectors.EVENT_READ:     # ACKs, or the end: take what is there
            self._read_acks()

    def poll_acks(self):
        """Take the ACKs that have arrived, without waiting; returns the acked count."""
        self._read_acks()
        return self.acked

    def wait_acked(self, timeout=None):
        """Flush, then wait until every frame sent is acknowledged.

        Raises AckTimeout (a TimeoutError) once `timeout` seconds pass (default: the client's
        `timeout`), ConnectionLost if the server goes away, ProtocolError on a bad ACK.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self.flush(deadline)
            while self.acked < self.sent:
                self._wait(deadline)
        except AckTimeout:
            raise self._error(AckTimeout, f"ACKs missing after {timeout:g} s") from None
        return self.acked

    def _read_acks(self):
        """Take every ACK that has arrived (the socket is non-blocking)."""
        sock = self.sock
        if self._closed_by_peer:
            raise self._error(ConnectionLost, "server closed the connection")
        while True:
            try:
                n = sock.recv_into(self._in)
            except BlockingIOError:
                return
            except OSError as exc:
                raise self._error(ConnectionLost, f"connection lost while reading ACKs: "
                                                  f"{exc.strerror or exc}") from None
            if n == 0:
                self._closed_by_peer = True
                if self._in_partial:
                    raise self._error(ProtocolError, f"short ACK record: "
                                                     f"{len(self._in_partial)} bytes, then the "
                                                     f"connection closed")
                if self.acked < self.sent:
                    raise self._error(ConnectionLost, "server closed the connection")
                return
            data = self._in_partial + self._in[:n] if self._in_partial else self._in[:n]
            self._take_acks(data)
            if n < len(self._in):
                return

    def _take_acks(self, data):
        """Check and count the whole ACK records in `data`; keep a partial one for later."""
        request_reply = self.mode == MODE_REQUEST_REPLY
        record_size = ID_SIZE if request_reply else ACK_SIZE
        whole = len(data) - len(data) % record_size
        self._in_partial = bytes(data[whole:])
        records = (FRAME_ID.iter_unpack(data[:whole]) if request_reply
                   else ACK_RECORD.iter_unpack(data[:whole]))
        for last_id, *skipped in records:
            skipped = skipped[0] if skipped else 0      # request-reply: one id, one frame
            expected = self._last_acked + skipped + 1
            if last_id != expected or last_id >= self._handed:
                raise self._error(ProtocolError, (
                    f"bad ACK: expected id {expected} (after {self._last_acked}, skipped "
                    f"{skipped}), got id {last_id} with {self._handed} frames on the wire"))
            self._last_acked = last_id
            self.acked = last_id + 1

    def close(self):
        """Close the connection (frames still buffered are written first)."""
        try:
            if self._out and not self._closed_by_peer:
                self.flush()
        except SmallmsgError:
            pass
        finally:
            self._selector.close()
            self.sock.close()


# ###########################################################################################
# Command line
# ###########################################################################################

# Shared with client.py, bench.sh and the tests, which start smallmsg.py and read its address.
LISTENING = "smallmsg listening on "


def listening_address(line):
    """The (host, port) in the line smallmsg.py prints once it listens; None for another."""
    if not line.startswith(LISTENING):
        return None
    host, _, port = line[len(LISTENING):].split()[0].rpartition(":")
    return host, int(port)


# Shared with client.py: an option a user gets wrong ends in one line, never a traceback.

class OneLineParser(argparse.ArgumentParser):
    """Reports a bad option in one line, not a usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def number_in(low, high=None, kind=int, what="number"):
    """An argparse type: a `kind` number from `low` to `high` (None: no upper bound)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {what} {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"{what} must be {bounds}, not {text}")
        return value
    return parse


port_number = number_in(0, 65535, what="port")
positive_seconds = number_in(0.001, None, float, "seconds")


def main(argv=None):
    parser = OneLineParser(
        prog="smallmsg", description="smallmsg server: receives frames, sends coalesced ACKs.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only; "
                             "--host 0.0.0.0 exposes the server to the network)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--max-payload", type=number_in(0, MAX_SIZE_FIELD, what="size"),
                        default=MAX_PAYLOAD,
                        help=f"largest payload accepted, in bytes (default {MAX_PAYLOAD})")
    parser.add_argument("--mode", choices=MODES, default=MODE_ACK,
                        help="ack: coalesced ACKs (default); request-reply: step 1 of the "
                             "series, each frame answered with its id")
    parser.add_argument("--ack", choices=ACK_STYLES, default=ACK_THREAD,
                        help="thread: a reader thread hands blocks to an ACK thread (default); "
                             "inline: the reader parses and ACKs itself")
    parser.add_argument("--no-affinity", dest="affinity", action="store_false",
                        help="let the OS place a connection's threads anywhere (default: they "
                             "keep to one CPU, connections taking the CPUs in turn)")
    parser.add_argument("--max-connections", type=number_in(1), default=DEFAULT_MAX_CONNECTIONS,
                        help="refuse connections beyond this many (default "
                             f"{DEFAULT_MAX_CONNECTIONS})")
    parser.add_argument("--idle-timeout", type=positive_seconds, default=None,
                        help="close connections idle this many seconds (default: never)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="logging level (default info)")
    parser.add_argument("--version", action="version", version=f"smallmsg {__version__}")
    args = parser.parse_args(argv)

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        server = Server((args.host, args.port), mode=args.mode, ack=args.ack,
                        max_payload=args.max_payload, max_connections=args.max_connections,
                        idle_timeout=args.idle_timeout, affinity=args.affinity)
    except OSError as exc:
        print(f"smallmsg: error: cannot listen on {args.host}:{args.port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1

    def exit_at_once(signum, frame):
        os._exit(128 + signum)      # the shell's convention for "killed by signal N"

    def stop(signum, frame):
        # A second signal does not wait for connections to finish.
        signal.signal(signal.SIGINT, exit_at_once)
        signal.signal(signal.SIGTERM, exit_at_once)
        server.stop_serving()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    host, port = server.address
    print(f"{LISTENING}{host}:{port} (mode {args.mode}, ack {args.ack})", flush=True)
    try:
        server.serve_forever()
        server.shutdown()
    finally:
        server.close()
    stats = server.stats
    print(f"smallmsg stopped: {stats['connections']} connections, {stats['messages']} messages, "
          f"{stats['bytes']} bytes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
