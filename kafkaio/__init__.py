"""Small Kafka helpers shared by the stages, ingest, backfill and the CLI: one copy of each.

* :mod:`kafkaio.produce` -- produce and wait for room in the local queue; the request
  producer (a ``RequestV1`` with its ``content-type``, ``schema`` and ``traceparent`` headers).
* :mod:`kafkaio.offsets` -- a topic's partitions, watermarks, end offsets and the offsets at a
  time.
* :mod:`kafkaio.dead_letters` -- reading a dead letter: its ``dlq.*`` headers and the original
  record, from any record whatever its bytes.

Only ``schemas`` is imported from here: these helpers sit under every package that talks to
Kafka (``stages`` included), never over one.
"""
