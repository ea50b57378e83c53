"""Smoke test: transactions work on the local single-node broker (ops/kafka/kafka.sh).

Creates a throwaway topic, commits one transaction, aborts one, commits another, then checks
that a read_committed consumer sees only the committed records and a read_uncommitted one sees
all of them; deletes the topic. Exit 0 on success.

usage: python ops/kafka/txn_smoke.py [PORT]   (default 9092, host 127.0.0.1)
"""

from __future__ import annotations

import sys
import time
import uuid

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic  # where the type stubs export it

COMMITTED = 11
ABORTED = 5


def consume_all(bootstrap: str, topic: str, isolation: str, expect: int) -> list[str]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"smoke-{isolation}-{topic}",
            "auto.offset.reset": "earliest",
            "isolation.level": isolation,
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    values: list[str] = []
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                if len(values) >= expect:
                    break
                continue
            if msg.error():
                raise KafkaException(msg.error())
            values.append((msg.value() or b"").decode())
    finally:
        consumer.close()
    return values


def main() -> int:
    bootstrap = "127.0.0.1:" + (sys.argv[1] if len(sys.argv) > 1 else "9092")
    topic = f"smoke.txn.{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(15)
    try:
        producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"smoke-{topic}"})
        producer.init_transactions(30)
        producer.begin_transaction()
        for i in range(COMMITTED - 1):
            producer.produce(topic, key=str(i), value=f"committed-{i}")
        producer.commit_transaction(30)
        producer.begin_transaction()
        for i in range(ABORTED):
            producer.produce(topic, key=str(i), value=f"aborted-{i}")
        producer.flush(10)
        producer.abort_transaction(30)
        producer.begin_transaction()
        producer.produce(topic, key="last", value="committed-last")
        producer.commit_transaction(30)

        committed = consume_all(bootstrap, topic, "read_committed", COMMITTED)
        everything = consume_all(bootstrap, topic, "read_uncommitted", COMMITTED + ABORTED)
    finally:
        admin.delete_topics([topic])[topic].result(15)

    ok = (
        len(committed) == COMMITTED
        and not any(v.startswith("aborted") for v in committed)
        and len(everything) == COMMITTED + ABORTED
    )
    print(
        f"read_committed: {len(committed)} records, read_uncommitted: {len(everything)} records"
        f" -> {'OK' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
