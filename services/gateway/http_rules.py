"""REST routes derived from the `google.api.http` annotations of a service, and the router over them.

Template syntax (google/api/http.proto):

    Template = "/" Segments [ ":" Verb ]     Segment  = "*" | "**" | LITERAL | Variable
    Variable = "{" FieldPath [ "=" Segments ] "}"

Templates are matched against the raw (still percent-encoded) path, so an encoded "/" inside an id
cannot shift segment boundaries; captured values are decoded afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote

from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import Descriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

_TOKEN = re.compile(r"\{(?P<var>[A-Za-z_][\w.]*)(?:=(?P<sub>[^{}]+))?\}|(?P<lit>[^/{}]+)")
_SEGMENT = "[^/]+"
_SEGMENTS = "(?:[^/]+(?:/[^/]+)*)?"  # `**`: zero or more segments
# Request headers that stand for a field of the request message, where it has one: the IETF
# Idempotency-Key header is AIP-155's request_id.
HEADER_FIELDS = {"Idempotency-Key": "request_id"}


@dataclass(frozen=True)
class PathTemplate:
    template: str
    regex: re.Pattern[str]
    variables: tuple[str, ...]  # field paths, in the order of their capture groups
    verb: str | None

    def match(self, path: str) -> dict[str, str] | None:
        found = self.regex.fullmatch(path)
        if found is None:
            return None
        return {field: unquote(value) for field, value in zip(self.variables, found.groups(), strict=True)}


def _segments_regex(segments: str, template: str) -> str:
    parts = []
    for seg in segments.split("/"):
        if not seg or "{" in seg or "}" in seg:
            raise ValueError(f"bad segment {seg!r} in path template {template!r}")
        parts.append(_SEGMENT if seg == "*" else _SEGMENTS if seg == "**" else re.escape(seg))
    return "/".join(parts)


def compile_template(template: str) -> PathTemplate:
    if not template.startswith("/"):
        raise ValueError(f"path template {template!r} must start with '/'")
    body, verb = template[1:], None
    # The verb is a ':' in the last segment, after any variable.
    colon = body.find(":", max(body.rfind("}"), body.rfind("/")) + 1)
    if colon != -1:
        body, verb = body[:colon], body[colon + 1 :]
    pattern, variables, pos = [], [], 0
    while pos < len(body):
        token = _TOKEN.match(body, pos)
        if token is None:
            raise ValueError(f"cannot parse path template {template!r} at {body[pos:]!r}")
        if token["var"]:
            variables.append(token["var"])
            pattern.append(f"({_segments_regex(token['sub'] or '*', template)})")
        else:
            pattern.append(_segments_regex(token["lit"], template))
        pos = token.end()
        if pos < len(body):
            if body[pos] != "/":
                raise ValueError(f"expected '/' in path template {template!r} at {body[pos:]!r}")
            pos += 1
            pattern.append("/")
    regex = "/" + "".join(pattern) + (re.escape(":" + verb) if verb else "")
    return PathTemplate(template, re.compile(regex), tuple(variables), verb)


@dataclass(frozen=True)
class Route:
    http_method: str  # upper case: GET, POST, ... or a custom kind
    path: PathTemplate
    body: str  # "", "*" or a top-level request field name
    response_body: str  # "" or a top-level response field name
    method: MethodDescriptor
    input_type: type[Message]
    output_type: type[Message]
    server_streaming: bool


def _check_path_variable(method: MethodDescriptor, path: str) -> None:
    """Rules that name no field fail when the app is built, not on the first request."""
    message: Descriptor | None = method.input_type
    for name in path.split("."):
        field = message.fields_by_name.get(name) if message is not None else None
        if field is None or field.is_repeated:
            raise ValueError(f"{method.full_name}: path variable {path!r} names no singular field")
        message = field.message_type
    if message is not None:
        raise ValueError(f"{method.full_name}: path variable {path!r} names a message, not a scalar")


def _route(method: MethodDescriptor, rule: http_pb2.HttpRule) -> Route:
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise ValueError(f"{method.full_name}: http rule without a pattern")
    if kind == "custom":
        verb, template = rule.custom.kind.upper(), rule.custom.path
    else:
        verb, template = kind.upper(), getattr(rule, kind)
    path = compile_template(template)
    for variable in path.variables:
        _check_path_variable(method, variable)
    # http.proto: `body` and `response_body` name top-level fields.
    if rule.body not in ("", "*") and rule.body not in method.input_type.fields_by_name:
        raise ValueError(f"{method.full_name}: body {rule.body!r} is no top-level field of the request")
    if rule.response_body and rule.response_body not in method.output_type.fields_by_name:
        raise ValueError(f"{method.full_name}: response_body {rule.response_body!r} is no top-level field")
    return Route(
        http_method=verb,
        path=path,
        body=rule.body,
        response_body=rule.response_body,
        method=method,
        input_type=GetMessageClass(method.input_type),
        output_type=GetMessageClass(method.output_type),
        server_streaming=method.server_streaming,
    )


def routes_for(service: ServiceDescriptor) -> list[Route]:
    """Every binding of every annotated method, primary binding first; unannotated methods are skipped."""
    routes = []
    for method in service.methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        if rule.WhichOneof("pattern") is None:
            continue
        routes.append(_route(method, rule))
        routes.extend(_route(method, extra) for extra in rule.additional_bindings)
    return routes


class Router:
    """Finds the route for a request; `allowed` tells a 405 (path known, other verbs) from a 404."""

    def __init__(self, routes: Iterable[Route]) -> None:
        # Templates with a verb go first: "/v1/jobs/1:watch" also fits "/v1/{name=jobs/*}".
        self.routes = sorted(routes, key=lambda r: r.path.verb is None)

    def _path_matches(self, path: str) -> list[tuple[Route, dict[str, str]]]:
        matches = [(r, v) for r in self.routes if (v := r.path.match(path)) is not None]
        with_verb = [m for m in matches if m[0].path.verb is not None]
        return with_verb or matches

    def match(self, http_method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        for route, variables in self._path_matches(path):
            if route.http_method == http_method.upper():
                return route, variables
        return None

    def allowed(self, path: str) -> list[str]:
        """The verbs some route accepts on this path; empty when no route has the path at all."""
        return sorted({route.http_method for route, _ in self._path_matches(path)})
