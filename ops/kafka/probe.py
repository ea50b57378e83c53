"""Is a Kafka broker answering on HOST:PORT? Exit 0 if a Metadata request lists >= 1 broker
(>= N with ``--brokers N``: ops/kafka/cluster.sh waits until every node has registered).

Used by ops/kafka/kafka.sh as its readiness check (one attempt per call; the script loops).
With confluent_kafka importable it asks through the real client the project uses; otherwise it
sends a Metadata v4 request over a plain socket (standard library only), so the check also works
before the project's virtualenv exists. A broker only serves client listeners once it has
caught up with the metadata log, so an answer means it is ready for clients.

usage: probe.py HOST PORT [TIMEOUT_S] [-v] [--brokers N]
"""

from __future__ import annotations

import socket
import struct
import sys


def probe_confluent(host: str, port: int, timeout: float, min_brokers: int = 1) -> str:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": f"{host}:{port}", "log_level": 0})
    md = admin.list_topics(timeout=timeout)
    if len(md.brokers) < min_brokers:
        raise RuntimeError(f"metadata lists {len(md.brokers)} brokers, want {min_brokers}")
    brokers = ", ".join(f"{b.id}@{b.host}:{b.port}" for b in md.brokers.values())
    return f"cluster {md.cluster_id}, brokers {brokers} (confluent_kafka)"


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        buf += chunk
    return buf


def probe_raw(host: str, port: int, timeout: float, min_brokers: int = 1) -> str:
    # Metadata (api key 3) v4: the oldest version Kafka 4.x still serves (KIP-896 removed v0-3),
    # and the newest one without the "flexible" (tagged-field) encoding. Header v1, body:
    # topics = null (all topics), allow_auto_topic_creation = false.
    client_id = b"streaminfer-probe"
    correlation_id = 0x5F1
    header = struct.pack(">hhih", 3, 4, correlation_id, len(client_id)) + client_id
    body = struct.pack(">ib", -1, 0)
    request = header + body
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        resp = _recv_exact(sock, size)
    # Response header v0 (correlation id), then throttle_time_ms and the brokers array.
    got_id, _throttle, n_brokers = struct.unpack_from(">iii", resp, 0)
    if got_id != correlation_id:
        raise RuntimeError(f"correlation id {got_id} != {correlation_id}")
    if n_brokers < min_brokers:
        raise RuntimeError(f"metadata lists {n_brokers} brokers, want {min_brokers}")
    off = 12
    brokers = []
    for _ in range(n_brokers):
        node_id, host_len = struct.unpack_from(">ih", resp, off)
        off += 6
        b_host = resp[off : off + host_len].decode()
        off += host_len
        b_port, rack_len = struct.unpack_from(">ih", resp, off)
        off += 6 + max(rack_len, 0)
        brokers.append(f"{node_id}@{b_host}:{b_port}")
    (cid_len,) = struct.unpack_from(">h", resp, off)
    cluster_id = resp[off + 2 : off + 2 + cid_len].decode() if cid_len >= 0 else None
    return f"cluster {cluster_id}, brokers {', '.join(brokers)} (raw Metadata v4)"


def main(argv: list[str]) -> int:
    verbose = "-v" in argv
    args = [a for a in argv if a != "-v"]
    min_brokers = 1
    if "--brokers" in args:
        at = args.index("--brokers")
        min_brokers = int(args[at + 1])
        del args[at : at + 2]
    if len(args) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    host, port = args[0], int(args[1])
    timeout = float(args[2]) if len(args) == 3 else 3.0
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        probe = probe_raw
    else:
        probe = probe_confluent
    try:
        summary = probe(host, port, timeout, min_brokers)
    except Exception as exc:  # any failure just means "not ready (yet)"
        if verbose:
            print(f"not ready: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if verbose:
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
