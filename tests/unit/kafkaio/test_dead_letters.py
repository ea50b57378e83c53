"""The DLQ reader survives any record and reads back exactly what a stage wrote."""

from __future__ import annotations

import msgspec
from confluent_kafka import Message
from hypothesis import given
from hypothesis import strategies as st

from kafkaio.dead_letters import decode_head, read_dead_letter
from schemas import Headers
from stages.dlq import dlq_output
from stages.records import Record, Rejection
from tests.helpers import REQUESTS, digits_request, encode_raw, holdout

HeaderPairs = list[tuple[str, str | bytes | None]]


def message(
    value: bytes | None, headers: HeaderPairs | None = None, key: bytes | None = None
) -> Message:
    return Message(topic="dlq", partition=0, offset=9, key=key, value=value, headers=headers)


class UnreadableHeaders(Message):
    """What confluent-kafka does with a header *name* that is not UTF-8: ``headers()`` raises."""

    def headers(self) -> HeaderPairs:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


def test_reads_back_what_a_stage_wrote() -> None:
    request = digits_request(holdout()[0][0], request_id="r-1", attributes={"backfill_id": "b"})
    source = Record(
        topic="inference.requests",
        partition=3,
        offset=42,
        key=b"customer-7",
        value=REQUESTS.encode(request),
        headers=((Headers.TENANT, b"acme"),),
    )
    out = dlq_output(
        Rejection(source, "unknown_model", "no model 'x' ✗"), stage="validate", dlq_topic="dlq"
    )
    letter = read_dead_letter(message(out.value, out.headers, out.key))
    assert (letter.stage, letter.reason, letter.error) == (
        "validate",
        "unknown_model",
        "no model 'x' ✗",
    )
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        "inference.requests",
        3,
        42,
    )
    assert letter.value == source.value and letter.key == b"customer-7"
    assert letter.request_id == "r-1" and letter.tenant == "acme"
    assert letter.head is not None and letter.head.attributes == {"backfill_id": "b"}
    assert letter.truncated_from is None


def test_a_record_without_headers_is_an_unknown_dead_letter_named_by_its_key() -> None:
    letter = read_dead_letter(message(b"\x00not msgpack", None, key=b"k-1"))
    assert (letter.stage, letter.reason, letter.error) == ("", "unknown", "")
    assert (letter.source_partition, letter.source_offset, letter.tenant) == (None, None, None)
    assert letter.head is None and letter.request_id == "k-1"


def test_garbage_header_values_become_replacement_text_or_none() -> None:
    headers: HeaderPairs = [
        (Headers.DLQ_REASON, b"\xff\xfe"),
        (Headers.DLQ_ERROR, None),
        (Headers.DLQ_SOURCE_PARTITION, b"-1"),
        (Headers.DLQ_SOURCE_OFFSET, b"9" * 40),  # more than an int64 holds
        (Headers.DLQ_TRUNCATED, b"12abc"),
        (Headers.DLQ_STAGE, "infer"),  # a str value, as a Python producer may hand it over
    ]
    letter = read_dead_letter(message(None, headers))
    assert letter.reason == "\ufffd\ufffd" and letter.error == "" and letter.stage == "infer"
    assert (letter.source_partition, letter.source_offset, letter.truncated_from) == (
        None,
        None,
        None,
    )
    assert letter.value == b"" and letter.request_id is None


def test_the_last_of_repeated_headers_wins() -> None:
    # A record that already carried dlq.* headers (a hostile producer, a re-sent dead
    # letter): the stage appends its own after them.
    headers: HeaderPairs = [(Headers.DLQ_REASON, b"forged"), (Headers.DLQ_REASON, b"malformed")]
    assert read_dead_letter(message(b"", headers)).reason == "malformed"


def test_unreadable_header_names_leave_the_rest_readable() -> None:
    value = REQUESTS.encode(digits_request(holdout()[0][0], request_id="r-2"))
    letter = read_dead_letter(UnreadableHeaders(topic="dlq", value=value, key=b"k"))
    assert letter.reason == "unknown" and letter.headers == {}
    assert letter.request_id == "r-2"


def test_a_value_nested_a_thousand_deep_has_no_head() -> None:
    deep = b"\x82\xa2id\xa1x\xa5other" + b"\x91" * 100_000 + b"\xc0"
    assert decode_head(deep) is None
    assert read_dead_letter(message(deep, key=b"k")).request_id == "k"


def test_attributes_that_are_not_strings_still_give_the_id() -> None:
    head = decode_head(encode_raw({"id": "r-3", "attributes": {"row": 7, "x": [1]}}))
    assert head is not None and (head.id, head.attributes) == ("r-3", {})


@given(
    value=st.one_of(st.none(), st.binary(max_size=200)),
    key=st.one_of(st.none(), st.binary(max_size=20)),
    headers=st.lists(
        st.tuples(
            st.sampled_from([*vars(Headers).values(), "x"]).filter(lambda n: isinstance(n, str)),
            st.one_of(st.none(), st.binary(max_size=30), st.text(max_size=10)),
        ),
        max_size=12,
    ),
)
def test_no_record_makes_the_reader_raise(
    value: bytes | None, key: bytes | None, headers: HeaderPairs
) -> None:
    letter = read_dead_letter(message(value, headers, key))
    assert letter.value == (value or b"")
    assert letter.reason  # always something to count
    msgspec.json.encode(letter.error)  # text, whatever the bytes were
