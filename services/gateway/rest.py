"""The REST/JSON edge of a gRPC service, routed by its `google.api.http` annotations.

Each request: find the route, authenticate, decode, call `api.<Method>(principal, request)`, encode.
Unary answers are JSON; server streams are Server-Sent Events, or raw bytes when they stream
`google.api.HttpBody`. Every error leaves as Google's JSON error body through `libs.rpc_status`.
Headers the method adds through `reply_metadata` go out with its answer. Once the `Drain` has
begun, new requests get 503 `SHUTTING_DOWN` while those in flight finish.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

from aiohttp import web
from google.api import httpbody_pb2
from google.protobuf.descriptor import FieldDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from libs.errors import InvalidArgument, KilnError, NotFound
from libs.rpc_status import as_kiln_error, to_json
from services.gateway import reply_metadata
from services.gateway.drain import Drain, shutting_down
from services.gateway.http_rules import HEADER_FIELDS, Route, Router, routes_for
from services.gateway.transcode import decode_request, encode_response

P = TypeVar("P")
HTTP_BODY = "google.api.HttpBody"
EVENT_ID_FIELD = "event_id"  # a streamed item with this field gives the SSE `id:`
RESUME_FIELD = "after_event_id"  # a streaming request with this field resumes from `Last-Event-ID`
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class RequestTooLarge(InvalidArgument):
    http_status = 413  # gRPC has no code of its own for this; HTTP does


class MethodNotAllowed(KilnError):
    code = "UNIMPLEMENTED"
    http_status = 405
    default_reason = "METHOD_NOT_ALLOWED"

    def __init__(self, message: str, allow: list[str]) -> None:
        super().__init__(message, metadata={"allow": ", ".join(allow)})
        self.allow = allow


def error_response(exc: BaseException) -> web.Response:
    err = as_kiln_error(exc)
    headers = {}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
    if isinstance(err, MethodNotAllowed):
        headers["Allow"] = ", ".join(err.allow)
    return web.json_response(to_json(err), status=err.http_status, headers=headers)


def sse_event(route: Route, item: Message) -> bytes:
    """`id:` (when the item has an `event_id`), `event: message`, and the item as one line of JSON."""
    lines = []
    id_field = item.DESCRIPTOR.fields_by_name.get(EVENT_ID_FIELD)
    if id_field is not None:
        event_id = str(getattr(item, id_field.name))
        if event_id and not any(c in event_id for c in "\r\n\0"):  # those would break the framing
            lines.append(f"id: {event_id}")
    lines += ["event: message", "data: " + json.dumps(encode_response(route, item), separators=(",", ":"))]
    return ("\n".join(lines) + "\n\n").encode()


def sse_error(exc: BaseException) -> bytes:
    body = json.dumps(to_json(as_kiln_error(exc)), separators=(",", ":"))
    return f"event: error\ndata: {body}\n\n".encode()


async def _close(stream: AsyncIterator[Message]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


class _RestEdge:
    def __init__(
        self,
        router: Router,
        api: object,
        authenticate: Callable[[str | None], Awaitable[object]],
        max_body: int,
        response_headers: Callable[[Any], Awaitable[dict[str, str]]] | None,
        drain: Drain,
    ) -> None:
        self._router, self._api, self._authenticate, self._max_body = router, api, authenticate, max_body
        self._response_headers = response_headers
        self._drain = drain

    async def _headers_for(self, principal: object) -> dict[str, str]:
        if principal is None or self._response_headers is None:
            return {}
        return await self._response_headers(principal)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._drain.begun:
            response = error_response(shutting_down("retry"))
            response.force_close()  # so that the retry opens a connection, perhaps to another replica
            return response
        with self._drain.track():
            return await self._handle(request)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        principal: object = None
        try:
            route, path_vars = self._find(request)
            principal = await self._authenticate(request.headers.get("Authorization"))
            body = await self._read_body(request) if route.body else b""
            query = {key: request.query.getall(key) for key in request.query}
            message = decode_request(route, path_vars, query, body)
            _resume_from(request, message)
            _fields_from_headers(request, message)
            call: Callable[[object, Message], Any] = getattr(self._api, route.method.name)
            if not route.server_streaming:
                with reply_metadata.collect() as added:
                    reply = await call(principal, message)
                response = web.json_response(encode_response(route, reply), headers=added)
                with contextlib.suppress(Exception):  # the call succeeded; headers are a courtesy
                    response.headers.update(await self._headers_for(principal))
                return response
            stream: AsyncIterator[Message] = call(principal, message)
        except Exception as exc:  # the boundary: every failure becomes a JSON error
            response = error_response(exc)
            with contextlib.suppress(Exception):  # headers are a courtesy; the error is the answer
                response.headers.update(await self._headers_for(principal))
            return response
        return await _stream(request, route, stream, await self._headers_for(principal))

    def _find(self, request: web.Request) -> tuple[Route, dict[str, str]]:
        raw_path = request.rel_url.raw_path  # still percent-encoded: "%2F" must not split a segment
        found = self._router.match(request.method, raw_path)
        if found is not None:
            return found
        allow = self._router.allowed(raw_path)
        if allow:
            raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}", allow)
        raise NotFound(f"no API method at {request.method} {request.path}", reason="ROUTE_NOT_FOUND")

    async def _read_body(self, request: web.Request) -> bytes:
        too_large = RequestTooLarge(
            f"request body exceeds the limit of {self._max_body} bytes",
            reason="REQUEST_TOO_LARGE",
            metadata={"limit_bytes": str(self._max_body)},
        )
        if (request.content_length or 0) > self._max_body:
            raise too_large
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:  # a chunked body without Content-Length
            raise too_large from None


def _resume_from(request: web.Request, message: Message) -> None:
    field = message.DESCRIPTOR.fields_by_name.get(RESUME_FIELD)
    last_event_id = request.headers.get("Last-Event-ID")
    if field is None or field.type != FieldDescriptor.TYPE_STRING or not last_event_id:
        return
    if not last_event_id.isascii():
        raise InvalidArgument.field(
            RESUME_FIELD, "the Last-Event-ID header must be an event id from this stream"
        )
    if not getattr(message, RESUME_FIELD):
        setattr(message, RESUME_FIELD, last_event_id)


def _fields_from_headers(request: web.Request, message: Message) -> None:
    """Fills a field from its header; a header and a field that disagree are refused, naming it."""
    for header, name in HEADER_FIELDS.items():
        field = message.DESCRIPTOR.fields_by_name.get(name)
        raw = request.headers.get(header)
        if field is None or field.type != FieldDescriptor.TYPE_STRING or raw is None:
            continue
        value = _sf_string(raw.strip())
        current = getattr(message, name)
        if current and current != value:
            raise InvalidArgument.field(
                name, f"the {header} header ({value!r}) and {name} ({current!r}) differ; send one of them"
            )
        setattr(message, name, value)


def _sf_string(value: str) -> str:
    """An RFC 8941 string (`"abc"`, as the Idempotency-Key draft sends it) unquoted; a bare token
    (as most clients send it) as it is."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return value


async def _stream(
    request: web.Request, route: Route, stream: AsyncIterator[Message], headers: dict[str, str]
) -> web.StreamResponse:
    """Nothing is sent before the first item, so an error up to then is still a plain JSON error."""
    try:
        try:
            first = await anext(stream, None)
        except Exception as exc:
            response = error_response(exc)
            response.headers.update(headers)
            return response
        return await _pump(request, route, stream, first, headers)
    finally:
        await _close(stream)  # also when the client's disconnect cancelled this handler


async def _pump(
    request: web.Request,
    route: Route,
    stream: AsyncIterator[Message],
    item: Message | None,
    headers: dict[str, str],
) -> web.StreamResponse:
    raw = route.method.output_type.full_name == HTTP_BODY
    content_type = cast(httpbody_pb2.HttpBody, item).content_type if raw and item else ""
    content_type = content_type or "application/octet-stream"
    response = web.StreamResponse(
        headers={**headers, **({"Content-Type": content_type} if raw else SSE_HEADERS)}
    )
    try:
        await response.prepare(request)
        while item is not None:
            await response.write(cast(httpbody_pb2.HttpBody, item).data if raw else sse_event(route, item))
            item = await anext(stream, None)
    except ConnectionError:  # the client left; there is no one to tell
        pass
    except Exception as exc:
        if not raw:
            with contextlib.suppress(ConnectionError):
                await response.write(sse_error(exc))
        else:
            # The status line is long gone: cutting the connection is how the client learns that
            # the body is incomplete. as_kiln_error still logs what was unexpected.
            as_kiln_error(exc)
            if request.transport is not None:
                request.transport.abort()
    return response


def build_rest_app(
    service: ServiceDescriptor,
    api: object,
    authenticate: Callable[[str | None], Awaitable[P]],
    openapi: dict[str, Any],
    *,
    max_body_bytes: int = 1 << 20,
    response_headers: Callable[[P], Awaitable[dict[str, str]]] | None = None,
    drain: Drain | None = None,
) -> web.Application:
    """`response_headers` adds headers (the caller's rate-limit state) to every authenticated answer;
    `drain` refuses new requests once the server begins to shut down."""
    router = Router(routes_for(service))
    names = {route.method.name for route in router.routes}
    missing = sorted(name for name in names if not callable(getattr(api, name, None)))
    if missing:
        raise TypeError(f"the api object lacks {', '.join(missing)}")
    edge = _RestEdge(router, api, authenticate, max_body_bytes, response_headers, drain or Drain())
    # handler_cancellation: a client that disconnects cancels its handler, as a gRPC cancel would,
    # which closes a stream's async generator at once rather than at its next event.
    app = web.Application(client_max_size=max_body_bytes, handler_args={"handler_cancellation": True})

    async def serve_openapi(_: web.Request) -> web.Response:
        return web.json_response(openapi)

    app.router.add_get("/openapi.json", serve_openapi)
    app.router.add_route("*", "/{tail:.*}", edge.handle)
    return app
