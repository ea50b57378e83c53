"""bench.txn_probe's arithmetic and its reading of librdkafka's debug log (no broker)."""

from __future__ import annotations

import logging

from bench.txn_probe import EosLog, Result, Timings, _variant, pct, summary


def test_percentiles_and_the_summary_of_a_run() -> None:
    timings = Timings()
    timings.steps["txn_commit"].extend([0.002, 0.004, 0.1])
    result = Result(
        latencies_ms=[float(v) for v in range(1, 101)],
        after_stage_ms=[1.0] * 100,
        timings=timings,
        sent=100,
        cpu_s={"stage": 0.003},
    )
    row = summary(result)
    assert (row["p50"], row["p99"], row["max"]) == (51.0, 100.0, 100.0)
    assert row["txn_commit.n"] == 3 and row["txn_commit.max"] == 100.0
    assert row["cpu.stage_us_per_record"] == 30.0 and row["cpu.stage_us_per_txn"] == 1000.0
    assert pct([], 0.5) != pct([], 0.5), "NaN when there is nothing"


def test_a_variant_names_its_environment() -> None:
    assert _variant("drain:A=1,B=x=y") == ("drain", {"A": "1", "B": "x=y"})
    assert _variant("base:") == ("base", {})


def test_the_debug_log_counts_retried_transactional_requests() -> None:
    timings = Timings()
    handler = EosLog(timings)
    lines = [
        "SEND [rdkafka#producer-1] [thrd:x]: Sent AddOffsetsToTxnRequest (v0, 80 bytes)",
        "SEND [rdkafka#producer-1] [thrd:x]: Sent AddOffsetsToTxnRequest (v0, 80 bytes)",
        "ADDOFFSETS [rdkafka#producer-1] [thrd:main]: AddOffsetsToTxn response from x: "
        "CONCURRENT_TRANSACTIONS (RETRY)",
        "ADDPARTS [rdkafka#producer-1] [thrd:main]: AddPartitionsToTxn response: partition "
        '"t": [0]: Broker: Producer attempted to update a transaction while another '
        "concurrent operation on the same transaction was ongoing",
        "TXNAPI [rdkafka#producer-1] [thrd:app]: Transactional API commit_transaction",
    ]
    for line in lines:
        handler.emit(logging.LogRecord("l", logging.DEBUG, "", 0, line, None, None))
    assert timings.events == {
        "sent[AddOffsetsToTxn]": 2,
        "concurrent[AddOffsetsToTxn]": 1,
        "concurrent[AddPartitionsToTxn]": 1,
    }
