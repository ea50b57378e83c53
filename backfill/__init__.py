"""Backfills: files (CSV, JSON lines, Parquet) or a window of stored requests, sent through
the pipeline on ``inference.requests.backfill``; resumable, rate-limited, every row
accounted for.

* :mod:`backfill.readers` -- streaming file readers and row numbering
* :mod:`backfill.mapping` -- which columns feed which model input (the rules)
* :mod:`backfill.convert` -- file values to arrays per input, and rejects
* :mod:`backfill.ids` -- deterministic request ids
* :mod:`backfill.checkpoint` -- the checkpoint, its atomic writes, the done prefix
* :mod:`backfill.engine` -- the send loop (acknowledgements, Ctrl-C, rate, progress)
* :mod:`backfill.files`, :mod:`backfill.replay` -- the two kinds of source
* :mod:`backfill.plan`, :mod:`backfill.cli` -- the commands
* :mod:`backfill.topics` -- bounded reads of Kafka partitions, DLQ counts
* :mod:`backfill.completeness`, :mod:`backfill.export` -- ``streaminfer export``: results
  back to a file, and the completeness check

Nothing is imported here, so the CLI's parser does not pull in pyarrow.
"""
