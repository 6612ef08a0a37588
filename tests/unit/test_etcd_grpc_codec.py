"""The gRPC transport sends exactly the transactions the HTTP gateway would.

Every Txn is built as the JSON gateway's dicts (``cmp_*``/``op_*``); the
codec turns them into protobuf by hand for speed. ``json_format`` (what
grpc-gateway does with the same JSON) is the reference: any field the
codec drops, mis-encodes or puts in the wrong oneof makes the messages
differ.
"""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from ares_celery.clients import etcd_grpc_codec as codec
from ares_celery.clients.etcd import (
    KeyValue,
    b64,
    cmp_create_revision,
    cmp_value,
    cmp_version,
    op_delete,
    op_put,
    op_range,
    prefix_end,
)
from ares_celery.clients.etcd_grpc_runtime import kv_pb2, rpc_pb2

COMPARES = [
    cmp_create_revision("/ares/lock/job-1", 0),
    cmp_create_revision("/ares/lock/job-1", 9_007_199_254_740_993),  # > 2**53
    cmp_version("/ares/job/job-1", 3),
    cmp_value("/ares/lock/job-1", '{"nonce": "abc"}'),
    cmp_value("/ares/bin", bytes(range(256))),
    {"key": b64("/k"), "target": "MOD", "result": "GREATER",
     "mod_revision": "7"},
    {"key": b64("/k"), "target": "LEASE", "result": "NOT_EQUAL",
     "lease": "42", "range_end": b64(prefix_end("/k"))},
]

OPS = [
    op_put("/ares/lock/job-1", '{"holder": 1}'),
    op_put("/ares/lock/job-1", "v", lease=7_587_882_745_137_264_123),
    op_put("/ares/job/job-1", b"\x00\xff record", lease=5, prev_kv=True),
    op_range("/ares/released/job-1"),
    op_range("/ares/lock/", prefix=True),
    op_delete("/ares/lock/job-0"),
    {"request_range": {"key": b64("/a"), "range_end": b64("/b"),
                       "keys_only": True, "count_only": False,
                       "limit": "10", "revision": "4"}},
    {"request_delete_range": {"key": b64("/a"), "range_end": b64("/b"),
                              "prev_kv": True}},
]


def _reference(message_class, body):
    return json_format.ParseDict(body, message_class())


@pytest.mark.parametrize("compare", COMPARES, ids=repr)
def test_compares_match_what_the_gateway_would_send(compare):
    assert codec.compare_message(compare) == \
        _reference(rpc_pb2.Compare, compare)


@pytest.mark.parametrize("op", OPS, ids=repr)
def test_ops_match_what_the_gateway_would_send(op):
    assert codec.op_message(op) == _reference(rpc_pb2.RequestOp, op)


def test_the_lock_txn_matches_field_for_field():
    """The hot path's Txn as ``JobLocks.acquire`` builds it: create the
    lock on the session lease, put the record with its previous value,
    read the released key and the commit marker, drop committed locks."""
    lock, record = "/ares/lock/job-1", "/ares/job/job-1"
    body = {
        "compare": [cmp_create_revision(lock, 0)],
        "success": [op_put(lock, '{"pid": 1}', 7587882745137264123),
                    op_put(record, '{"holder": {}}', 99, prev_kv=True),
                    op_range("/ares/released/job-1"),
                    op_range("/ares/done/job-1"),
                    op_delete("/ares/lock/job-0")],
        "failure": [op_range(lock), op_range("/ares/done/job-1")],
    }
    message = codec.txn_message(body["compare"], body["success"],
                                body["failure"])
    assert message == _reference(rpc_pb2.TxnRequest, body)
    assert message.success[0].request_put.lease == 7587882745137264123
    assert message.success[1].request_put.prev_kv is True
    # Same bytes on the wire as grpc-gateway would produce from the JSON.
    assert message.SerializeToString(deterministic=True) == _reference(
        rpc_pb2.TxnRequest, body).SerializeToString(deterministic=True)


def test_nested_txn_ops_are_translated():
    inner = {"compare": [cmp_version("/k", 0)], "success": [op_put("/k", "v")],
             "failure": [op_range("/k")]}
    op = {"request_txn": inner}
    assert codec.op_message(op) == _reference(rpc_pb2.RequestOp, op)


@pytest.mark.parametrize("op", [
    {"request_put": {"key": b64("/k"), "value": b64("v"), "lesae": "1"}},
    {"request_compact": {"revision": "1"}},
])
def test_an_unknown_field_or_op_is_refused_not_dropped(op):
    with pytest.raises(ValueError, match="not supported over gRPC"):
        codec.op_message(op)


def _kv(key: bytes, value: bytes, create: int, lease: int = 0) -> kv_pb2.KeyValue:
    return kv_pb2.KeyValue(key=key, value=value, create_revision=create,
                           mod_revision=create + 1, version=2, lease=lease)


def _gateway_reply(response: rpc_pb2.TxnResponse) -> dict:
    """The reply the JSON gateway would give for ``response``."""
    return json_format.MessageToDict(response,
                                     preserving_proto_field_name=True)


def test_replies_read_the_same_as_the_gateways():
    prev = _kv(b"/ares/job/job-1", b'{"holder": 1}', 40, lease=77)
    held = _kv(b"/ares/lock/job-1", bytes(range(256)), 41, lease=1 << 62)
    response = rpc_pb2.TxnResponse(
        header=rpc_pb2.ResponseHeader(revision=1 << 55), succeeded=True,
        responses=[
            rpc_pb2.ResponseOp(response_put=rpc_pb2.PutResponse()),
            rpc_pb2.ResponseOp(response_put=rpc_pb2.PutResponse(prev_kv=prev)),
            rpc_pb2.ResponseOp(response_range=rpc_pb2.RangeResponse(
                kvs=[held], count=1)),
            rpc_pb2.ResponseOp(response_range=rpc_pb2.RangeResponse()),
            rpc_pb2.ResponseOp(response_delete_range=rpc_pb2.
                               DeleteRangeResponse(deleted=3)),
        ])
    result = codec.txn_result(response)
    reference = _gateway_reply(response)
    assert result.succeeded is True and result.revision == 1 << 55
    assert result.previous() == [None, KeyValue(
        "/ares/job/job-1", b'{"holder": 1}', 40, 41, 2, 77)]
    assert result.ranges() == [[KeyValue(
        "/ares/lock/job-1", bytes(range(256)), 41, 42, 2, 1 << 62)], []]
    # Whatever TxnResult reads, it reads alike from the gateway's JSON.
    for ours, theirs in zip(result.responses, reference["responses"],
                            strict=True):
        assert ours.keys() == theirs.keys()
        (kind, body), = ours.items()
        for field in ("prev_kv",):
            if field in theirs[kind]:
                assert KeyValue.from_json(body[field]) == \
                    KeyValue.from_json(theirs[kind][field])
        assert [KeyValue.from_json(kv) for kv in body.get("kvs", [])] == \
            [KeyValue.from_json(kv) for kv in theirs[kind].get("kvs", [])]
        assert int(body.get("deleted", 0)) == \
            int(theirs[kind].get("deleted", 0))


def test_failed_txn_reads_the_holder():
    held = _kv(b"/ares/lock/job-1", b'{"nonce": "n"}', 12, lease=5)
    response = rpc_pb2.TxnResponse(
        header=rpc_pb2.ResponseHeader(revision=13), succeeded=False,
        responses=[rpc_pb2.ResponseOp(
            response_range=rpc_pb2.RangeResponse(kvs=[held], count=1))])
    result = codec.txn_result(response)
    assert result.succeeded is False and result.revision == 13
    assert result.ranges() == [[codec.key_value(held)]]
    assert codec.key_value(held) == KeyValue.from_json(
        json_format.MessageToDict(held, preserving_proto_field_name=True))
