#!/usr/bin/env bash
# bench.sh: smallmsg's throughput against the loopback ceiling, all figures from one run.
#
#   bash bench.sh                  # full run (a few minutes at most)
#   bash bench.sh --quick          # short run, for a quick look
#   bash bench.sh --json FILE      # also write the table as JSON
#
# Cases (server and client are separate processes, on 127.0.0.1):
#   ceiling   one Python process streams bytes to another: large sendall into large recv_into
#             (best of 3)
#   series    client.py -> smallmsg.py, 17-byte frames ("hello"), median of 3 rounds
#   mixed     payloads of 0-100 bytes (random, fixed seed), median of 3 rounds
#   handler   a server whose handler copies out every payload and counts its bytes
#   inline    --ack inline (the reader parses and ACKs) against the default ACK thread
#   memory    a 100M-message run: the server's resident memory after 10M and at its peak
# Run it alone: on 2 cores, anything else running at the same time skews every figure.
set -euo pipefail
cd "$(dirname "$0")"

quick=0
json_file=""
while (($#)); do
  case "$1" in
    --quick) quick=1 ;;
    --json) json_file="${2:?--json needs a file name}"; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

exec python3 - "$quick" "$json_file" <<'PYTHON'
import json, os, platform, signal, socket, statistics, subprocess, sys, time
sys.path.insert(0, os.getcwd())     # this folder: the smallmsg.py beside bench.sh
import smallmsg

quick, json_file = sys.argv[1] == "1", sys.argv[2]
PY = sys.executable
COUNT = 10_000_000 if quick else 40_000_000       # messages per round (a round takes ~0.2 s)
ROUNDS = 3
CEILING_BYTES = (1 if quick else 4) << 30
MIXED_COUNT = 3_000_000 if quick else 10_000_000  # mixed sizes take the per-frame path
MEMORY_COUNT = 10_000_000                          # messages per round of the memory case...
MEMORY_ROUNDS = 2 if quick else 10                 # ...100M in a full run

HANDLER_SERVER = r'''
import signal, sys, smallmsg
total = 0
def count_bytes(batch):
    global total
    total += len(batch.payloads())     # copies every payload out of the block
server = smallmsg.Server(("127.0.0.1", 0), handler=count_bytes)
signal.signal(signal.SIGTERM, lambda *_: server.stop_serving())
print(smallmsg.LISTENING + "%s:%d" % server.address, flush=True)
server.serve_forever(); server.shutdown(); server.close()
print("payload bytes counted:", total, flush=True)
'''

CEILING_SENDER = r'''
import os, socket, sys
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, range(os.cpu_count()))     # not the receiver's CPU alone
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
block, left = memoryview(bytes(4 << 20)), int(sys.argv[2])
while left > 0:
    n = min(left, len(block)); sock.sendall(block[:n]); left -= n
sock.close()
'''


def ceiling():
    """Bytes/s of raw loopback TCP between two Python processes: the best of 3 runs, since a
    ceiling is what the machine can do, and a lower one would flatter every ratio. The receiver
    keeps to one CPU, as smallmsg's connection threads do."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    rates = []
    for _ in range(3):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            sender = subprocess.Popen([PY, "-c", CEILING_SENDER,
                                       str(listener.getsockname()[1]), str(CEILING_BYTES)])
            conn, _ = listener.accept()
            buf, got = bytearray(1 << 20), 0
            start = time.perf_counter()
            with conn:
                while True:
                    n = conn.recv_into(buf)
                    if not n:
                        break
                    got += n
            rates.append(got / (time.perf_counter() - start))
            sender.wait()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, range(os.cpu_count()))
    return max(rates)


def start_server(command):
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    address = smallmsg.listening_address(line)
    if address is None:
        process.kill()
        sys.exit(f"bench.sh: the server did not start: {line!r}")
    return process, address[1]


def stop_server(process):
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=30)
    return out


def rss_kib(pid, field):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def run_client(port, payload, rounds, count, on_round=None):
    command = [PY, "client.py", "--port", str(port), "--count", str(count),
               "--iterations", str(rounds), "--payload-size", payload, "--json"]
    client = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    records = []
    for line in client.stdout:
        records.append(json.loads(line))
        if on_round:
            on_round(len(records))
    if client.wait() != 0:
        sys.exit(f"bench.sh: client.py failed (exit {client.returncode})")
    return records


def case(name, server_command, payload="5", rounds=ROUNDS, count=COUNT, on_round=None):
    process, port = start_server(server_command)
    try:
        records = run_client(port, payload, rounds, count,
                             on_round and (lambda n: on_round(process.pid, n)))
        peak = rss_kib(process.pid, "VmHWM")
    finally:
        out = stop_server(process)
    return {"case": name, "messages_per_sec": statistics.median(r["messages_per_sec"] for r in records),
            "bytes_per_sec": statistics.median(r["bytes_per_sec"] for r in records),
            "rounds": len(records), "messages_per_round": count, "payload_size": payload,
            "server_peak_rss_kib": peak, "server_output": out.strip().splitlines()[-1:]}


SERVER = [PY, "smallmsg.py", "--port", "0", "--log-level", "warning"]
print(f"bench.sh: {'quick' if quick else 'full'} run, {COUNT:,} messages per round, "
      f"{os.cpu_count()} cores, Python {platform.python_version()}", flush=True)
ceiling_bps = ceiling()
results = [{"case": "ceiling (raw TCP, Python to Python)", "messages_per_sec": ceiling_bps / 17,
            "bytes_per_sec": ceiling_bps}]
results.append(case("series: 17-byte frames, ACK thread", SERVER))
results.append(case("mixed: payloads 0-100 bytes", SERVER, payload="0-100",
                    count=MIXED_COUNT))
handler = case("handler: copies every payload", [PY, "-c", HANDLER_SERVER])
expected = ROUNDS * COUNT * 5
counted = int(handler["server_output"][0].split()[-1]) if handler["server_output"] else -1
if counted != expected:
    sys.exit(f"bench.sh: the handler counted {counted} payload bytes, expected {expected}")
results.append(handler)
results.append(case("inline: 17-byte frames, --ack inline", SERVER + ["--ack", "inline"]))

after_first = {}
memory = case(f"memory: {MEMORY_ROUNDS * MEMORY_COUNT // 1_000_000}M messages", SERVER,
              rounds=MEMORY_ROUNDS, count=MEMORY_COUNT,
              on_round=lambda pid, n: after_first.setdefault("rss", rss_kib(pid, "VmRSS")))
memory["server_rss_after_first_round_kib"] = after_first.get("rss")
results.append(memory)

for r in results:
    r["ratio_to_ceiling"] = r["bytes_per_sec"] / ceiling_bps

print(f"\n{'case':42} {'messages/s':>14} {'MB/s':>9} {'ratio':>6}")
for r in results:
    print(f"{r['case']:42} {r['messages_per_sec']:14,.0f} {r['bytes_per_sec'] / 1e6:9,.0f} "
          f"{r['ratio_to_ceiling']:6.2f}")
print(f"\nserver peak RSS: {memory['server_peak_rss_kib'] / 1024:.1f} MiB over "
      f"{MEMORY_ROUNDS * MEMORY_COUNT:,} messages (RSS after the first round: "
      f"{(memory['server_rss_after_first_round_kib'] or 0) / 1024:.1f} MiB)")
print(f"targets: series >= 0.50 of the ceiling: {results[1]['ratio_to_ceiling']:.2f}; "
      f"mixed >= 4M msg/s: {results[2]['messages_per_sec'] / 1e6:.1f}M; "
      f"handler >= 0.25: {results[3]['ratio_to_ceiling']:.2f}")
if json_file:
    with open(json_file, "w") as out:
        json.dump({"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cores": os.cpu_count(),
                   "python": platform.python_version(), "quick": quick,
                   "messages_per_round": COUNT, "results": results}, out, indent=2)
    print(f"wrote {json_file}")
PYTHON
