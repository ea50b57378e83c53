"""Backfills: files (CSV, JSON lines, Parquet) or a window of stored requests, sent through
the pipeline on ``inference.requests.backfill``; resumable, rate-limited, every row
accounted for.

* :mod:`ingest.backfill.readers` -- streaming file readers and row numbering
* :mod:`ingest.backfill.mapping` -- which columns feed which model input (the rules)
* :mod:`ingest.backfill.convert` -- file values to arrays per input, and rejects
* :mod:`ingest.backfill.ids` -- deterministic request ids
* :mod:`ingest.backfill.checkpoint` -- the checkpoint, its atomic writes, the done prefix
* :mod:`ingest.backfill.engine` -- the send loop (acknowledgements, Ctrl-C, rate, progress)
* :mod:`ingest.backfill.files`, :mod:`ingest.backfill.replay` -- the two kinds of source
* :mod:`ingest.backfill.plan`, :mod:`ingest.backfill.cli` -- the commands
* :mod:`ingest.backfill.topics` -- bounded reads of Kafka partitions, DLQ counts
* :mod:`ingest.backfill.completeness`, :mod:`sinks.files` -- ``streaminfer export``: results
  back to a file, and the completeness check

Nothing is imported here, so the CLI's parser does not pull in pyarrow.
"""
