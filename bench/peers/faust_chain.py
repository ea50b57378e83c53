"""The chain with faust-streaming: one app (consumer group) per stage, one agent each, batches
from ``stream.take(batch_size, within=batch_timeout)``; persist writes Redis with
``redis.asyncio`` (pipelined) before sending the stored notices.

    .cache/peers-venv/bin/python bench/peers/faust_chain.py --stage infer --bootstrap ... ...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # chain.py next to this file

import chain
import faust
import redis.asyncio as aioredis


def build_app(args):
    source_name, sink_name = chain.topics(args.prefix, args.stage)
    app = faust.App(
        f"{args.prefix}peer-faust.{args.stage}",
        broker=f"kafka://{args.bootstrap}",
        value_serializer="raw",
        key_serializer="raw",
        web_enabled=False,
        topic_partitions=4,
        topic_allow_declare=False,  # the benchmark created the topics
        consumer_auto_offset_reset="earliest",
        producer_linger=0.005,  # as ours (linger.ms 5)
        producer_compression_type="lz4",
        processing_guarantee=(
            "exactly_once" if args.guarantee == "exactly-once" else "at_least_once"
        ),
    )
    source = app.topic(source_name, value_type=bytes, key_type=bytes)
    sink = app.topic(sink_name, value_type=bytes, key_type=bytes)
    handle = _handlers(args)[args.stage]

    @app.agent(source)
    async def stage(stream):
        async for batch in stream.take(args.batch_size, within=args.batch_timeout):
            for value in await handle(batch):
                await sink.send(value=value)

    return app


def _handlers(args):
    session = chain.load_session(args.model) if args.stage == "infer" else None
    client = aioredis.from_url(args.redis_url) if args.stage == "persist" else None

    async def validate(batch):
        return [out for out in map(chain.validate, batch) if out is not None]

    async def infer(batch):
        return chain.infer(session, list(batch))

    async def persist(batch):
        commands, results = chain.store_commands(args.prefix, list(batch))
        async with client.pipeline(transaction=False) as pipe:
            for key, value in commands:
                pipe.set(key, value, ex=chain.TTL_S)
            pipe.publish(*chain.notification(args.prefix, results))
            await pipe.execute()
        return chain.notices(args.prefix, results)

    return {"validate": validate, "infer": infer, "persist": persist}


if __name__ == "__main__":
    arguments = chain.parse_args()
    application = build_app(arguments)
    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn", "--without-web"]
    application.main()
