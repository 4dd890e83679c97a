"""An OpenAPI 3.0.3 document built from the same descriptors and http rules that the REST edge serves.

Path parameters: OpenAPI cannot express a parameter that holds "/", so each wildcard inside a
variable becomes its own parameter, named after the collection before it (singular):
`/v1/{name=jobs/*/artifacts/*}:read` is documented as `/v1/jobs/{job}/artifacts/{artifact}:read`.
It is the very URL the edge matches; the request's `name` is then "jobs/{job}/artifacts/{artifact}".

Schemas follow the proto3 JSON mapping, keyed by the message's full name. The generated stubs keep
no source comments, so operations and schemas carry no prose descriptions.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, ServiceDescriptor

from services.gateway.http_rules import HEADER_FIELDS, Route, routes_for
from services.gateway.transcode import SCALAR_FORMS, WRAPPERS

Schema = dict[str, Any]
F = FieldDescriptor
_INT32: Schema = {"type": "integer", "format": "int32"}
_UINT32: Schema = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
# 64-bit integers are JSON strings in the proto3 mapping: JavaScript numbers stop at 2**53.
_INT64: Schema = {"type": "string", "format": "int64"}
_UINT64: Schema = {"type": "string", "format": "uint64"}
_SCALARS: dict[int, Schema] = {
    F.TYPE_INT32: _INT32,
    F.TYPE_SINT32: _INT32,
    F.TYPE_SFIXED32: _INT32,
    F.TYPE_UINT32: _UINT32,
    F.TYPE_FIXED32: _UINT32,
    F.TYPE_INT64: _INT64,
    F.TYPE_SINT64: _INT64,
    F.TYPE_SFIXED64: _INT64,
    F.TYPE_UINT64: _UINT64,
    F.TYPE_FIXED64: _UINT64,
    F.TYPE_FLOAT: {"type": "number", "format": "float"},
    F.TYPE_DOUBLE: {"type": "number", "format": "double"},
    F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_STRING: {"type": "string"},
    F.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_ANY: Schema = {
    "type": "object",
    "properties": {"@type": {"type": "string", "description": "A type URL naming the message."}},
    "required": ["@type"],
    "additionalProperties": True,
}
_WELL_KNOWN: dict[str, Schema] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {"type": "string", "description": "Comma-separated field paths."},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {"description": "Any JSON value."},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": _ANY,
}
_ERROR_BODY: Schema = {  # what libs.rpc_status.to_json renders
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "status", "message"],
            "properties": {
                "code": {"type": "integer", "format": "int32", "description": "The HTTP status code."},
                "status": {"type": "string", "description": "The canonical code, e.g. INVALID_ARGUMENT."},
                "message": {"type": "string"},
                "details": {"type": "array", "items": _ANY},
            },
        }
    },
}
_OPERATIONS = {"GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"}
_WILDCARD_VARIABLE = re.compile(r"\{([\w.]+)=([^}]*)\}")


def _behaviors(field: FieldDescriptor) -> set[int]:
    return set(field.GetOptions().Extensions[field_behavior_pb2.field_behavior])


class _Schemas:
    """components/schemas, filled as messages are reached; a type is registered before its fields
    are, so recursive messages end in a $ref instead of recursing forever."""

    def __init__(self) -> None:
        self.components: dict[str, Schema] = {}

    def _ref(self, name: str) -> Schema:
        return {"$ref": f"#/components/schemas/{name}"}

    def enum(self, enum: EnumDescriptor) -> Schema:
        self.components.setdefault(enum.full_name, {"type": "string", "enum": list(enum.values_by_name)})
        return self._ref(enum.full_name)

    def message(self, message: Descriptor) -> Schema:
        name = message.full_name
        if name in _WELL_KNOWN:
            return copy.deepcopy(_WELL_KNOWN[name])
        if name in WRAPPERS:
            return {**self.value(message.fields_by_name["value"]), "nullable": True}
        if name not in self.components:
            self.components[name] = {"type": "object"}
            properties = {field.json_name: self.field(field) for field in message.fields}
            required = [f.json_name for f in message.fields if field_behavior_pb2.REQUIRED in _behaviors(f)]
            self.components[name] = {"type": "object", "properties": properties}
            if required:
                self.components[name]["required"] = required
        return self._ref(name)

    def value(self, field: FieldDescriptor) -> Schema:
        """One value of the field, ignoring repetition."""
        if field.message_type is not None:
            return self.message(field.message_type)
        if field.enum_type is not None:
            return self.enum(field.enum_type)
        return dict(_SCALARS[field.type])

    def field(self, field: FieldDescriptor) -> Schema:
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            values = self.value(entry.fields_by_name["value"])
            schema: Schema = {"type": "object", "additionalProperties": values}
        elif field.is_repeated:
            schema = {"type": "array", "items": self.value(field)}
        else:
            schema = self.value(field)
        if field_behavior_pb2.OUTPUT_ONLY in _behaviors(field):
            # OpenAPI 3.0 ignores siblings of $ref, so the reference is wrapped.
            schema = {"allOf": [schema]} if "$ref" in schema else schema
            schema["readOnly"] = True
        return schema


def _singular(collection: str) -> str:
    if collection.endswith("ies"):
        return collection[:-3] + "y"
    return collection[:-1] if collection.endswith("s") and len(collection) > 1 else f"{collection}_id"


def _path_and_parameters(route: Route) -> tuple[str, list[Schema]]:
    parameters: list[Schema] = []

    def expand(variable: re.Match[str]) -> str:
        field, segments = variable[1], variable[2].split("/")
        names: list[str] = []
        for i, segment in enumerate(segments):
            if segment in ("*", "**"):
                taken = {p["name"] for p in parameters} | set(names)
                names.append(_unused(_singular(segments[i - 1]) if i else field, taken))
                segments[i] = "{" + names[-1] + "}"
        value = "/".join(segments)
        for name in names:
            parameters.append(
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": f"A segment of `{field}`, which is `{value}`.",
                }
            )
        return value

    # `{field}` alone is short for `{field=*}`.
    template = re.sub(r"\{([\w.]+)\}", r"{\1=*}", route.path.template)
    return _WILDCARD_VARIABLE.sub(expand, template), parameters


def _unused(name: str, taken: set[str]) -> str:
    return next(f"{name}{n or ''}" for n in range(len(taken) + 1) if f"{name}{n or ''}" not in taken)


def _query_parameters(route: Route, schemas: _Schemas) -> list[Schema]:
    """Fields neither in the path nor in the body, flattened to dotted lowerCamel names."""
    if route.body == "*":
        return []
    bound = {*route.path.variables, route.body}
    parameters: list[Schema] = []

    def walk(message: Descriptor, path: str, json_path: str, outer: tuple[str, ...]) -> None:
        for field in message.fields:
            name, json_name = f"{path}{field.name}", f"{json_path}{field.json_name}"
            if name in bound or field_behavior_pb2.OUTPUT_ONLY in _behaviors(field):
                continue
            nested = field.message_type
            if nested is None or nested.full_name in SCALAR_FORMS:
                parameters.append({"name": json_name, "in": "query", "schema": schemas.field(field)})
            elif not field.is_repeated and nested.full_name not in (*outer, *_WELL_KNOWN):
                walk(nested, f"{name}.", f"{json_name}.", (*outer, nested.full_name))

    walk(route.method.input_type, "", "", (route.method.input_type.full_name,))
    return parameters


def _header_parameters(route: Route) -> list[Schema]:
    """Request headers that stand for a field of the request (`Idempotency-Key`: `request_id`)."""
    return [
        {
            "name": header,
            "in": "header",
            "schema": {"type": "string"},
            "description": f"The same as `{name}`; when both are given they must be equal.",
        }
        for header, name in HEADER_FIELDS.items()
        if name in route.method.input_type.fields_by_name
    ]


def _request_body(route: Route, schemas: _Schemas) -> Schema | None:
    if not route.body:
        return None
    request = route.method.input_type
    if route.body == "*":
        schema = schemas.message(request)
        in_path = {request.fields_by_name[v].json_name for v in route.path.variables if "." not in v}
        if in_path:  # the path already carries these, so the body shows the rest
            schema = copy.deepcopy(schemas.components[request.full_name])
            for json_name in in_path:
                schema["properties"].pop(json_name, None)
            schema["required"] = [r for r in schema.get("required", []) if r not in in_path]
            if not schema["required"]:
                del schema["required"]
        return {"required": False, "content": {"application/json": {"schema": schema}}}
    field = request.fields_by_name[route.body]
    required = field_behavior_pb2.REQUIRED in _behaviors(field)
    return {"required": required, "content": {"application/json": {"schema": schemas.field(field)}}}


def _success(route: Route, schemas: _Schemas) -> Schema:
    output = route.method.output_type
    if route.server_streaming and output.full_name == "google.api.HttpBody":
        binary = {"schema": {"type": "string", "format": "binary"}}
        return {"description": "The bytes, with their own Content-Type.", "content": {"*/*": binary}}
    if route.response_body:
        schema = schemas.field(output.fields_by_name[route.response_body])
    else:
        schema = schemas.message(output)
    if not route.server_streaming:
        return {"description": "OK", "content": {"application/json": {"schema": schema}}}
    return {
        "description": (
            f"Server-Sent Events. Each `event: message` has one {output.full_name} as JSON in `data:`,"
            " and its `event_id` (if any) as `id:`; send `Last-Event-ID` to resume. A failure after"
            " the stream began ends it with an `event: error` whose `data:` is the error body."
        ),
        "content": {"text/event-stream": {"schema": {"type": "string"}, "x-event-data": schema}},
    }


def build_openapi(service: ServiceDescriptor, *, title: str, version: str) -> dict[str, Any]:
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    bindings: dict[str, int] = {}
    for route in routes_for(service):
        if route.http_method not in _OPERATIONS:
            continue  # a custom kind such as SEARCH has no place in an OpenAPI path item
        path, parameters = _path_and_parameters(route)
        n = bindings[route.method.name] = bindings.get(route.method.name, -1) + 1
        operation: dict[str, Any] = {
            "operationId": route.method.name + (f"_{n}" if n else ""),
            "tags": [service.name],
            "parameters": parameters + _query_parameters(route, schemas) + _header_parameters(route),
            "responses": {
                "200": _success(route, schemas),
                "default": {"$ref": "#/components/responses/Error"},
            },
            "security": [{"bearerAuth": []}],
        }
        body = _request_body(route, schemas)
        if body is not None:
            operation["requestBody"] = body
        paths.setdefault(path, {})[route.http_method.lower()] = operation
    error_body = copy.deepcopy(_ERROR_BODY)
    return {
        "openapi": "3.0.3",
        "info": {"title": title, "version": version},
        "tags": [{"name": service.name, "description": f"gRPC service {service.full_name}."}],
        "paths": paths,
        "components": {
            "schemas": {**dict(sorted(schemas.components.items())), "ErrorResponse": error_body},
            "responses": {
                "Error": {
                    "description": "An error: a google.rpc.Status as JSON, with the matching HTTP status.",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                    },
                }
            },
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key: `Authorization: Bearer <key>`.",
                }
            },
        },
    }
