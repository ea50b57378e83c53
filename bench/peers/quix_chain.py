"""The chain with Quix Streams: one Application (consumer group) per stage, a
StreamingDataFrame per stage, the product's guarantee (exactly-once = Kafka transactions).
Quix's DataFrame works record by record, so validate and infer ``apply`` per record (as its
ML examples do); persist is a ``BatchingSink``: Redis written per checkpoint in one pipeline,
then the stored notices produced.

    .cache/peers-venv/bin/python bench/peers/quix_chain.py --stage infer --bootstrap ... ...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # chain.py next to this file

import chain
import redis
from confluent_kafka import Producer
from quixstreams import Application
from quixstreams.sinks import BatchingSink, SinkBatch

# Quix commits a checkpoint every 5 s by default; under exactly-once nothing is visible
# downstream before that. 0.1 s keeps its latency comparable (ours commits every 20 ms).
COMMIT_INTERVAL_S = 0.1


class RedisNoticeSink(BatchingSink):
    """Redis first (one pipeline per checkpoint batch), then the stored notices."""

    def __init__(self, args, notice_topic: str) -> None:
        super().__init__()
        self._prefix = args.prefix
        self._topic = notice_topic
        self._redis = redis.Redis.from_url(args.redis_url)
        self._producer = Producer(
            {
                "bootstrap.servers": args.bootstrap,
                "enable.idempotence": True,
                "linger.ms": 5,
                "compression.type": "lz4",
            }
        )

    def write(self, batch: SinkBatch) -> None:
        commands, results = chain.store_commands(self._prefix, [item.value for item in batch])
        pipe = self._redis.pipeline(transaction=False)
        for key, value in commands:
            pipe.set(key, value, ex=chain.TTL_S)
        pipe.publish(*chain.notification(self._prefix, results))
        pipe.execute()
        for notice in chain.notices(self._prefix, results):
            self._producer.produce(self._topic, value=notice)
        self._producer.flush(30)


def main() -> None:
    args = chain.parse_args()
    source_name, sink_name = chain.topics(args.prefix, args.stage)
    app = Application(
        broker_address=args.bootstrap,
        consumer_group=f"{args.prefix}peer-quix.{args.stage}",
        auto_offset_reset="earliest",
        processing_guarantee=args.guarantee,
        commit_interval=COMMIT_INTERVAL_S,
        use_changelog_topics=False,
        producer_extra_config={"linger.ms": 5, "compression.type": "lz4"},
    )
    source = app.topic(source_name, value_deserializer="bytes", key_deserializer="bytes")
    sdf = app.dataframe(source)
    if args.stage == "persist":
        sdf.sink(RedisNoticeSink(args, sink_name))
    else:
        sink = app.topic(sink_name, value_serializer="bytes", key_serializer="bytes")
        if args.stage == "validate":
            sdf = sdf.apply(chain.validate).filter(lambda value: value is not None)
        else:
            session = chain.load_session(args.model)
            sdf = sdf.apply(lambda value: chain.infer(session, [value])[0])
        sdf.to_topic(sink)
    app.run()


if __name__ == "__main__":
    main()
