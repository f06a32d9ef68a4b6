"""The messages of the one multiplexed stream between an API server (the front end) and a worker: ZMQ DEALER
(one per API server process and worker) to the worker's ROUTER, MessagePack frames.

Front end -> worker: ``EngineRequest`` (tokenized, validated), ``AbortRequest``, ``Ping``. Worker -> front
end: ``Accepted`` or ``Rejected`` once per request (admission: 429 when full, 503 when its engine is down),
then ``Deltas`` (every delta one engine step made for this front end's requests, in one frame), ``Failed`` for
a request the engine ended with an error, and ``Ping``. Either side that hears nothing from the other for its
timeout while requests are open gives them up: the front end fails them (the worker froze or died), the worker
aborts them (the API server is gone).
"""

from __future__ import annotations

import msgspec

from longserve.engine.protocol import AbortRequest, EngineRequest, RequestDelta


class Ping(msgspec.Struct, tag=True, array_like=True):
    pass


class Accepted(msgspec.Struct, tag=True, array_like=True):
    request_id: str


class Rejected(msgspec.Struct, tag=True, array_like=True):
    """Refused before generating (as the worker's HTTP error: ``ErrorInfo``'s fields)."""

    request_id: str
    message: str
    error_type: str = "invalid_request_error"  # ErrorInfo.type
    param: str | None = None
    code: str | None = None
    status: int = 400


class Deltas(msgspec.Struct, tag=True, array_like=True):
    deltas: list[RequestDelta]


class Failed(msgspec.Struct, tag=True, array_like=True):
    """The engine ended a request with an error after accepting it."""

    request_id: str
    message: str
    code: str  # "request_failed" (500) or "worker_shutting_down" (503: another worker may serve a retry)
    status: int


ToWorker = EngineRequest | AbortRequest | Ping
FromWorker = Accepted | Rejected | Deltas | Failed | Ping


def to_worker_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(ToWorker)


def from_worker_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(FromWorker)
