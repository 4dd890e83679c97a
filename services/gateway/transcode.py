"""REST requests into proto messages and proto messages into JSON, by the proto3 JSON mapping.

json_format does the conversion. A strict pass over the JSON runs first, because json_format
accepts "512" for an int32 and its errors read like Python; here every problem becomes an
`InvalidArgument` naming the snake_case field path from the request message's root.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from libs.errors import FieldViolation, InvalidArgument
from services.gateway.http_rules import Route

Json = Any  # a value as json.loads returns it

F = FieldDescriptor
_INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}
# JavaScript numbers lose precision past 2**53, so 64-bit integers may also come as strings.
_WIDE_INTS = {F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64, F.TYPE_UINT64, F.TYPE_FIXED64}
_FLOAT_LIMITS = {F.TYPE_FLOAT: 3.4028234663852886e38, F.TYPE_DOUBLE: 1.7976931348623157e308}
_DECIMAL = re.compile(r"-?[0-9]+")
WRAPPERS = frozenset(
    f"google.protobuf.{kind}Value"
    for kind in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)
_STRING_FORMS = {
    "google.protobuf.Timestamp": 'an RFC 3339 timestamp string such as "2024-05-01T12:00:00Z"',
    "google.protobuf.Duration": 'a duration string such as "1.5s"',
    "google.protobuf.FieldMask": 'a comma-separated list of field paths such as "name,state"',
}
# Message types whose JSON form is a scalar, so that a URL can carry them.
SCALAR_FORMS = WRAPPERS | _STRING_FORMS.keys()
_FREE_FORMS: dict[str, tuple[type, str]] = {
    "google.protobuf.Struct": (dict, "a JSON object"),
    "google.protobuf.ListValue": (list, "a JSON array"),
    "google.protobuf.Value": (object, "any JSON value"),
    "google.protobuf.Any": (dict, 'a JSON object with an "@type" member naming a known message'),
}


def invalid(field: str, description: str, reason: str = "INVALID_FIELD") -> InvalidArgument:
    if field:
        return InvalidArgument.field(field, description, reason)
    return InvalidArgument(description, reason=reason, violations=[FieldViolation("", description)])


def show(value: Json) -> str:
    """How an offending value reads in an error: its JSON type and a short rendering."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {json.dumps(value)}"
    if isinstance(value, str):
        return f"string {json.dumps(value if len(value) <= 40 else value[:40] + '...')}"
    if isinstance(value, int | float):
        return f"number {json.dumps(value)}"
    return "an array" if isinstance(value, list) else "an object"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _check_int(value: Json, field: FieldDescriptor, path: str) -> None:
    wide = field.type in _WIDE_INTS
    expected = "an integer (JSON number or decimal string)" if wide else "an integer (JSON number)"
    if isinstance(value, str) and wide and _DECIMAL.fullmatch(value):
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    else:
        raise invalid(path, f"must be {expected}, got {show(value)}")
    low, high = _INT_RANGES[field.type]
    if not low <= number <= high:
        raise invalid(path, f"must be between {low} and {high}, got {number}")


def _check_scalar(value: Json, field: FieldDescriptor, path: str) -> None:
    if field.type in _INT_RANGES:
        _check_int(value, field, path)
    elif field.type in _FLOAT_LIMITS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid(path, f"must be a number (JSON number), got {show(value)}")
        if not (math.isfinite(value) and abs(value) <= _FLOAT_LIMITS[field.type]):
            limit = f"{_FLOAT_LIMITS[field.type]:.7g}"
            raise invalid(path, f"must be a finite number within +/-{limit}, got {value}")
    elif field.type == F.TYPE_BOOL and not isinstance(value, bool):
        raise invalid(path, f"must be a boolean (true or false), got {show(value)}")
    elif field.type in (F.TYPE_STRING, F.TYPE_BYTES) and not isinstance(value, str):
        raise invalid(path, f"must be a string, got {show(value)}")
    elif field.type == F.TYPE_STRING and not _valid_unicode(value):
        raise invalid(path, "must be valid Unicode: it contains an unpaired surrogate (\\ud800-\\udfff)")
    elif field.type == F.TYPE_BYTES:
        try:
            text = value.rstrip("=").replace("-", "+").replace("_", "/")
            base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except binascii.Error:
            raise invalid(path, "must be base64-encoded bytes") from None
    elif field.enum_type is not None:
        names = field.enum_type.values_by_name
        if isinstance(value, str) and value in names:
            return
        if not (isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value < 2**31):
            raise invalid(path, f"must be one of {', '.join(names)}, got {show(value)}")


def _check_value(value: Json, field: FieldDescriptor, path: str) -> None:
    """One value of a field: the field itself, or one element of a repeated or map field."""
    message = field.message_type
    if value is None and not (message and message.full_name == "google.protobuf.Value"):
        raise invalid(path, "must not be null")
    if message is not None:
        check_message(value, message, path)
    else:
        _check_scalar(value, field, path)


def check_field(value: Json, field: FieldDescriptor, path: str) -> None:
    message = field.message_type
    if message is not None and message.GetOptions().map_entry:
        if not isinstance(value, dict):
            raise invalid(path, f"must be a JSON object (a map), got {show(value)}")
        key_field, value_field = message.fields_by_name["key"], message.fields_by_name["value"]
        for key, item in value.items():
            where = f"{path}[{json.dumps(key)}]"
            if key_field.type in _INT_RANGES:
                _check_int(int(key) if _DECIMAL.fullmatch(key) else key, key_field, where)
            elif key_field.type == F.TYPE_BOOL and key not in ("true", "false"):
                raise invalid(where, 'map key must be "true" or "false"')
            _check_value(item, value_field, where)
    elif field.is_repeated:
        if not isinstance(value, list):
            raise invalid(path, f"must be a JSON array, got {show(value)}")
        for i, item in enumerate(value):
            _check_value(item, field, f"{path}[{i}]")
    elif value is not None:  # null leaves a singular field unset
        _check_value(value, field, path)


def _parses_as(value: Json, message: Descriptor) -> bool:
    try:
        json_format.ParseDict(value, GetMessageClass(message)())
    except Exception:  # json_format raises ParseError, TypeError or ValueError; all mean "not this form"
        return False
    return True


def check_message(value: Json, message: Descriptor, path: str) -> None:
    """Checks a JSON value against a message type, more strictly than json_format would."""
    name = message.full_name
    if name in WRAPPERS:
        return _check_scalar(value, message.fields_by_name["value"], path)
    if name in _STRING_FORMS or name in _FREE_FORMS:
        kind, form = _FREE_FORMS.get(name, (str, _STRING_FORMS.get(name, "")))
        if not isinstance(value, kind) or not _parses_as(value, message):
            raise invalid(path, f"must be {form}, got {show(value)}")
        return None
    if not isinstance(value, dict):
        raise invalid(path, f"must be a JSON object ({name}), got {show(value)}")
    seen: dict[str, str] = {}
    oneofs: dict[str, str] = {}
    for key, item in value.items():
        if not _valid_unicode(key):
            raise invalid(
                path, f"has a member name that is not valid Unicode: {key.encode('utf-8', 'replace')!r}"
            )
        field = message.fields_by_name.get(key) or _by_json_name(message).get(key)
        if field is None:
            raise invalid(_join(path, key), f"unknown field of {name}")
        where = _join(path, field.name)
        if field.name in seen:
            raise invalid(where, f"given twice, as {json.dumps(seen[field.name])} and {json.dumps(key)}")
        seen[field.name] = key
        group = field.containing_oneof
        if group is not None and item is not None:
            if group.name in oneofs:
                other = _join(path, oneofs[group.name])
                raise invalid(where, f"cannot be set together with {other} (oneof {group.name})")
            oneofs[group.name] = field.name
        check_field(item, field, where)
    return None


def _valid_unicode(text: str) -> bool:
    """JSON's \\uXXXX escapes can spell lone surrogates, which no UTF-8 string (or proto) can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _by_json_name(message: Descriptor) -> dict[str, FieldDescriptor]:
    return {field.json_name: field for field in message.fields}


class _Malformed(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Json]]) -> dict[str, Json]:
    result: dict[str, Json] = {}
    for key, value in pairs:
        if key in result:
            raise _Malformed(f"duplicate key {json.dumps(key)}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Json:
    raise _Malformed(f"{name} is not JSON")


def parse_json(body: bytes, where: str) -> Json:
    """The body as JSON, or an InvalidArgument on `where` that says what is wrong with it."""
    try:
        text = body.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise invalid(where, "request body must be UTF-8 encoded JSON", "INVALID_JSON") from None
    except json.JSONDecodeError as exc:
        problem = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        raise invalid(where, f"request body is not valid JSON: {problem}", "INVALID_JSON") from None
    except _Malformed as exc:
        raise invalid(where, f"request body is not valid JSON: {exc}", "INVALID_JSON") from None
    except RecursionError:
        raise invalid(where, "request body is nested too deeply", "INVALID_JSON") from None
    except ValueError as exc:  # e.g. an integer literal past Python's digit limit
        raise invalid(where, f"request body is not valid JSON: {exc}", "INVALID_JSON") from None


def _resolve(message: Descriptor, dotted: str) -> list[FieldDescriptor] | None:
    """The fields along a dotted path whose parts are original or lowerCamel names."""
    fields: list[FieldDescriptor] = []
    for part in dotted.split("."):
        field = message.fields_by_name.get(part) or _by_json_name(message).get(part)
        if field is None:
            return None
        fields.append(field)
        nested = field.message_type
        if nested is None or field.is_repeated or nested.full_name in SCALAR_FORMS | _FREE_FORMS.keys():
            break  # a leaf: nothing in it has a name of its own in the JSON mapping
        message = nested
    return fields if len(fields) == dotted.count(".") + 1 else None


_MAX_INT_DIGITS = 21  # a sign and the 20 digits of the largest uint64


def _from_text(text: str, field: FieldDescriptor, path: str) -> Json:
    """A URL string as the JSON value it stands for, so that the JSON checks then apply to it."""
    if field.message_type and field.message_type.full_name not in WRAPPERS:
        return text  # Timestamp, Duration, FieldMask: their JSON form is a string
    kind = field.message_type.fields_by_name["value"] if field.message_type else field
    if kind.type in _INT_RANGES or (kind.enum_type is not None and _DECIMAL.fullmatch(text)):
        if not _DECIMAL.fullmatch(text) or len(text) > _MAX_INT_DIGITS:
            raise invalid(path, f"must be an integer, got {json.dumps(text[:40])}")
        return int(text)
    if kind.type in _FLOAT_LIMITS:
        try:
            return float(text)
        except ValueError:
            raise invalid(path, f"must be a number, got {json.dumps(text)}") from None
    if kind.type == F.TYPE_BOOL:
        if text not in ("true", "false"):
            raise invalid(path, f"must be true or false, got {json.dumps(text)}")
        return text == "true"
    return text


def _url_fields(route: Route, values: Mapping[str, list[str]], from_path: bool) -> dict[str, Json]:
    """Path variables or query parameters as a JSON object keyed by original field names."""
    root: dict[str, Json] = {}
    body = route.body
    for key, texts in values.items():
        fields = _resolve(route.method.input_type, key)
        if fields is None:
            raise invalid(key, "unknown query parameter")
        path = ".".join(field.name for field in fields)
        leaf = fields[-1]
        scalar_form = leaf.message_type is None or leaf.message_type.full_name in SCALAR_FORMS
        if not from_path:
            if body and (body == "*" or path == body or path.startswith(body + ".")):
                raise invalid(path, "belongs in the request body, not the query string")
            if path in route.path.variables:
                raise invalid(path, "is set by the URL path, not the query string")
        if not scalar_form or (leaf.message_type is not None and leaf.message_type.GetOptions().map_entry):
            raise invalid(path, "cannot be given as a query parameter")
        if len(texts) > 1 and not leaf.is_repeated:
            raise invalid(path, "must be given at most once")
        node = root
        for field in fields[:-1]:
            node = node.setdefault(field.name, {})
        if leaf.name in node:
            raise invalid(path, "must be given at most once")
        converted = [_from_text(text, leaf, path) for text in texts]
        node[leaf.name] = converted if leaf.is_repeated else converted[0]
    check_message(root, route.method.input_type, "")
    return root


def _body_fields(route: Route, body: bytes) -> dict[str, Json]:
    if not route.body or not body.strip():
        return {}
    where = "" if route.body == "*" else route.body
    value = parse_json(body, where)
    if route.body == "*":
        if not isinstance(value, dict):
            raise invalid("", f"request body must be a JSON object, got {show(value)}")
        check_message(value, route.method.input_type, "")
        return value
    check_field(value, route.method.input_type.fields_by_name[route.body], route.body)
    return {route.body: value}


def decode_request(
    route: Route, path_vars: Mapping[str, str], query: Mapping[str, list[str]], body: bytes
) -> Message:
    """Body first, then query, then path: a field named in the path wins over the same field in a body."""
    request = route.input_type()
    parts = (
        _body_fields(route, body),
        _url_fields(route, query, from_path=False),
        _url_fields(route, {name: [value] for name, value in path_vars.items()}, from_path=True),
    )
    for part in parts:
        try:
            json_format.ParseDict(part, request)
        except (json_format.ParseError, ValueError, TypeError):  # the checks above should leave none
            where = route.body if route.body != "*" else ""
            raise invalid(where, "does not match the request message") from None
    return request


def encode_response(route: Route, message: Message) -> Json:
    """The proto3 JSON form of the response, or of its `response_body` field when the rule names one."""
    if not route.response_body:
        return json_format.MessageToDict(message)
    field = route.method.output_type.fields_by_name[route.response_body]
    if field.message_type is not None and not field.is_repeated:
        return json_format.MessageToDict(getattr(message, field.name))
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)[field.json_name]
