"""etcd's JSON-gateway shapes to gRPC messages and back.

Every transaction in the package is built with the helpers of
:mod:`ares_celery.clients.etcd` (``cmp_create_revision``, ``op_put``,
``op_range``...), which produce the JSON the HTTP gateway takes: keys and
values base64, 64-bit numbers as strings, enums by name. The gRPC
transport sends the same transactions, so this module turns those dicts
into ``etcdserverpb`` messages and the replies back into the gateway's JSON
shape (so :class:`~ares_celery.clients.etcd.TxnResult` reads both alike).

It is a hand-written subset of ``google.protobuf.json_format`` for the
fields etcd's KV API has: ``ParseDict`` gives the same messages (the unit
tests compare them) but costs several times more per Txn, on every job's
critical path.

Importing this module imports the generated protobuf code and ``grpc``
(through :mod:`~ares_celery.clients.etcd_grpc_runtime`): only a process
that may hold a gRPC channel imports it (see
:mod:`ares_celery.clients.etcd_grpc`).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from .etcd import KeyValue, TxnResult
from .etcd_grpc_runtime import kv_pb2, rpc_pb2

Compare = rpc_pb2.Compare

#: The field of ``Compare`` each target compares, and how the JSON gateway
#: writes it (bytes: base64; numbers: decimal strings).
_TARGET_FIELD = {
    "VERSION": ("version", int),
    "CREATE": ("create_revision", int),
    "MOD": ("mod_revision", int),
    "VALUE": ("value", base64.b64decode),
    "LEASE": ("lease", int),
}

#: Request fields by kind: bytes (base64 in JSON), numbers, flags.
_BYTES = ("key", "range_end", "value")
_NUMBERS = ("lease", "limit", "revision", "min_mod_revision",
            "max_mod_revision", "min_create_revision", "max_create_revision")
_FLAGS = ("prev_kv", "ignore_value", "ignore_lease", "serializable",
          "keys_only", "count_only")


def _fill(message: Any, body: dict[str, Any]) -> Any:
    """Set ``message``'s fields from a gateway JSON request body; a field
    the KV API does not have is an error, never silently dropped."""
    for name, value in body.items():
        if name in _BYTES:
            setattr(message, name, base64.b64decode(value))
        elif name in _NUMBERS:
            setattr(message, name, int(value))
        elif name in _FLAGS:
            setattr(message, name, bool(value))
        elif name in ("sort_order", "sort_target"):
            setattr(message, name, value if isinstance(value, int) else
                    message.DESCRIPTOR.fields_by_name[name].enum_type
                    .values_by_name[value].number)
        else:
            raise ValueError(f"etcd request field {name!r} is not "
                             "supported over gRPC")
    return message


def compare_message(compare: dict[str, Any]) -> rpc_pb2.Compare:
    """One ``compare`` entry (as ``cmp_version``/``cmp_value``... build it)."""
    target = compare.get("target", "VERSION")
    field, convert = _TARGET_FIELD[target]
    message = Compare(
        key=base64.b64decode(compare["key"]),
        target=Compare.CompareTarget.Value(target),
        result=Compare.CompareResult.Value(compare.get("result", "EQUAL")))
    if field in compare:
        setattr(message, field, convert(compare[field]))
    if "range_end" in compare:
        message.range_end = base64.b64decode(compare["range_end"])
    return message


def op_message(op: dict[str, Any]) -> rpc_pb2.RequestOp:
    """One ``success``/``failure`` op (``op_put``, ``op_range``,
    ``op_delete``, or a nested ``request_txn``)."""
    (kind, body), = op.items()
    if kind == "request_put":
        return rpc_pb2.RequestOp(request_put=_fill(rpc_pb2.PutRequest(), body))
    if kind == "request_range":
        return rpc_pb2.RequestOp(
            request_range=_fill(rpc_pb2.RangeRequest(), body))
    if kind == "request_delete_range":
        return rpc_pb2.RequestOp(
            request_delete_range=_fill(rpc_pb2.DeleteRangeRequest(), body))
    if kind == "request_txn":
        return rpc_pb2.RequestOp(request_txn=txn_message(
            body.get("compare", ()), body.get("success", ()),
            body.get("failure", ())))
    raise ValueError(f"etcd txn op {kind!r} is not supported over gRPC")


def txn_message(compare: Sequence[dict[str, Any]],
                success: Sequence[dict[str, Any]],
                failure: Sequence[dict[str, Any]] = ()) -> rpc_pb2.TxnRequest:
    """The ``TxnRequest`` for what :meth:`EtcdGateway.txn` takes."""
    return rpc_pb2.TxnRequest(
        compare=[compare_message(c) for c in compare],
        success=[op_message(o) for o in success],
        failure=[op_message(o) for o in failure])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def kv_json(kv: kv_pb2.KeyValue) -> dict[str, Any]:
    """A key-value as the gateway writes it (what ``KeyValue.from_json``
    reads)."""
    return {"key": _b64(kv.key), "value": _b64(kv.value),
            "create_revision": str(kv.create_revision),
            "mod_revision": str(kv.mod_revision),
            "version": str(kv.version), "lease": str(kv.lease)}


def key_value(kv: kv_pb2.KeyValue) -> KeyValue:
    """A key-value straight from the message (no base64 round trip)."""
    return KeyValue(key=kv.key.decode(), value=kv.value,
                    create_revision=kv.create_revision,
                    mod_revision=kv.mod_revision, version=kv.version,
                    lease=kv.lease)


def _header(header: rpc_pb2.ResponseHeader) -> dict[str, str]:
    return {"revision": str(header.revision)}


def response_json(response: rpc_pb2.ResponseOp) -> dict[str, Any]:
    """One entry of ``TxnResponse.responses`` in the gateway's shape."""
    kind = response.WhichOneof("response")
    if kind == "response_put":
        put = response.response_put
        body: dict[str, Any] = {"header": _header(put.header)}
        if put.HasField("prev_kv"):
            body["prev_kv"] = kv_json(put.prev_kv)
        return {kind: body}
    if kind == "response_range":
        got = response.response_range
        return {kind: {"header": _header(got.header),
                       "kvs": [kv_json(kv) for kv in got.kvs],
                       "count": str(got.count), "more": got.more}}
    if kind == "response_delete_range":
        deleted = response.response_delete_range
        return {kind: {"header": _header(deleted.header),
                       "deleted": str(deleted.deleted),
                       "prev_kvs": [kv_json(kv) for kv in deleted.prev_kvs]}}
    if kind == "response_txn":
        inner = response.response_txn
        return {kind: {"header": _header(inner.header),
                       "succeeded": inner.succeeded,
                       "responses": [response_json(r)
                                     for r in inner.responses]}}
    return {}


def txn_result(response: rpc_pb2.TxnResponse) -> TxnResult:
    """The reply as :meth:`EtcdGateway.txn` returns it."""
    return TxnResult(succeeded=response.succeeded,
                     revision=response.header.revision,
                     responses=[response_json(r) for r in response.responses])
