"""URL, query and JSON body into request messages, strictly; messages back to proto3 JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.api import annotations_pb2  # noqa: F401  (registers the google.api.http extension)
from google.protobuf import (  # noqa: F401  (the test proto uses them)
    descriptor_pb2,
    descriptor_pool,
    struct_pb2,
    text_format,
    timestamp_pb2,
    wrappers_pb2,
)
from google.protobuf.message import Message
from kiln.v1 import job_pb2, job_service_pb2

from libs.errors import InvalidArgument
from services.gateway.http_rules import Route, Router, routes_for
from services.gateway.transcode import decode_request, encode_response

JOBS = Router(routes_for(job_service_pb2.DESCRIPTOR.services_by_name["JobService"]))

KINDS_PROTO = """
name: "kilntest/transcode.proto" package: "kilntest.transcode" syntax: "proto3"
dependency: "google/api/annotations.proto"
dependency: "google/protobuf/timestamp.proto"
dependency: "google/protobuf/wrappers.proto"
dependency: "google/protobuf/struct.proto"
enum_type { name: "Color"
  value { name: "COLOR_UNSPECIFIED" number: 0 } value { name: "COLOR_RED" number: 1 } }
message_type { name: "Kinds"
  field { name: "i32" number: 1 label: LABEL_OPTIONAL type: TYPE_INT32 }
  field { name: "u32" number: 2 label: LABEL_OPTIONAL type: TYPE_UINT32 }
  field { name: "i64" number: 3 label: LABEL_OPTIONAL type: TYPE_INT64 }
  field { name: "u64" number: 4 label: LABEL_OPTIONAL type: TYPE_UINT64 }
  field { name: "f" number: 5 label: LABEL_OPTIONAL type: TYPE_FLOAT }
  field { name: "d" number: 6 label: LABEL_OPTIONAL type: TYPE_DOUBLE }
  field { name: "b" number: 7 label: LABEL_OPTIONAL type: TYPE_BOOL }
  field { name: "s" number: 8 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "raw" number: 9 label: LABEL_OPTIONAL type: TYPE_BYTES }
  field { name: "color" number: 10 label: LABEL_OPTIONAL type: TYPE_ENUM
          type_name: ".kilntest.transcode.Color" }
  field { name: "nums" number: 11 label: LABEL_REPEATED type: TYPE_INT32 }
  field { name: "counts" number: 12 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".kilntest.transcode.Kinds.CountsEntry" }
  field { name: "at" number: 13 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".google.protobuf.Timestamp" }
  field { name: "maybe" number: 14 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".google.protobuf.Int32Value" }
  field { name: "child" number: 15 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".kilntest.transcode.Kinds" }
  field { name: "left" number: 16 label: LABEL_OPTIONAL type: TYPE_STRING oneof_index: 0 }
  field { name: "right" number: 17 label: LABEL_OPTIONAL type: TYPE_STRING oneof_index: 0 }
  field { name: "big_count" number: 18 label: LABEL_OPTIONAL type: TYPE_INT64 }
  field { name: "extra" number: 19 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".google.protobuf.Struct" }
  oneof_decl { name: "pick" }
  nested_type { name: "CountsEntry" options { map_entry: true }
    field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_INT32 } }
}
message_type { name: "Req"
  field { name: "name" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "kinds" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".kilntest.transcode.Kinds" }
}
message_type { name: "Resp"
  field { name: "kinds" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".kilntest.transcode.Kinds" }
  field { name: "names" number: 2 label: LABEL_REPEATED type: TYPE_STRING }
}
service { name: "Things"
  method { name: "Put" input_type: ".kilntest.transcode.Req" output_type: ".kilntest.transcode.Resp"
    options { [google.api.http] { post: "/v1/{name=things/*}" body: "kinds" response_body: "kinds" } } }
  method { name: "Patch" input_type: ".kilntest.transcode.Req" output_type: ".kilntest.transcode.Resp"
    options { [google.api.http] { patch: "/v1/{kinds.s=things/*}" body: "*" response_body: "names" } } }
  method { name: "Query" input_type: ".kilntest.transcode.Req" output_type: ".kilntest.transcode.Resp"
    options { [google.api.http] { get: "/v1/things" } } }
}
"""


def _things() -> Router:
    pool = descriptor_pool.Default()
    pool.Add(text_format.Parse(KINDS_PROTO, descriptor_pb2.FileDescriptorProto()))
    return Router(routes_for(pool.FindServiceByName("kilntest.transcode.Things")))


THINGS = _things()


def route(router: Router, method: str, path: str) -> tuple[Route, dict[str, str]]:
    found = router.match(method, path)
    assert found is not None
    return found


def create_job(body: object) -> job_service_pb2.CreateJobRequest:
    create, variables = route(JOBS, "POST", "/v1/jobs")
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = decode_request(create, variables, {}, raw)
    assert isinstance(request, job_service_pb2.CreateJobRequest)
    return request


def patch(kinds: dict[str, Any]) -> Message:
    patch_route, variables = route(THINGS, "PATCH", "/v1/things/t1")
    return decode_request(patch_route, variables, {}, json.dumps({"kinds": kinds}).encode())


def violation(exc: pytest.ExceptionInfo[InvalidArgument]) -> tuple[str, str]:
    [only] = exc.value.violations
    return only.field, only.description


@pytest.mark.timeout(30)
def test_create_job_reads_the_body_into_the_job_field() -> None:
    text_to_image = {"prompt": "a cat", "width": 512, "seed": "9007199254740993"}
    request = create_job({"model": "tiny-sd", "textToImage": text_to_image})
    assert request.job.model == "tiny-sd"
    assert request.job.text_to_image.width == 512
    assert request.job.text_to_image.seed == 9007199254740993  # beyond 2**53: a string keeps it exact


@pytest.mark.timeout(30)
def test_original_field_names_and_int64_numbers_are_accepted() -> None:
    text_to_image = {"negative_prompt": "blur", "guidance_scale": 7.5, "seed": 42}
    request = create_job({"model": "m", "text_to_image": text_to_image})
    assert request.job.text_to_image.negative_prompt == "blur"
    assert request.job.text_to_image.guidance_scale == 7.5
    assert request.job.text_to_image.seed == 42


@pytest.mark.timeout(30)
def test_a_string_for_an_int32_names_the_field_from_the_request_root() -> None:
    with pytest.raises(InvalidArgument) as exc:
        create_job({"model": "m", "textToImage": {"prompt": "p", "width": "512"}})
    assert violation(exc) == ("job.text_to_image.width", 'must be an integer (JSON number), got string "512"')
    assert exc.value.metadata == {"field": "job.text_to_image.width"}


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("body", "field", "description"),
    [
        (b'{"model": "m",', "job", "request body is not valid JSON: Expecting property name enclosed in"),
        (b'{"model": NaN}', "job", "request body is not valid JSON: NaN is not JSON"),
        (b'{"model": "a", "model": "b"}', "job", 'request body is not valid JSON: duplicate key "model"'),
        (b"\xff\xfe", "job", "request body must be UTF-8 encoded JSON"),
        (b"[1, 2]", "job", "must be a JSON object (kiln.v1.Job), got an array"),
        (b'{"colour": "red"}', "job.colour", "unknown field of kiln.v1.Job"),
        (b'{"state": "STATE_NOPE"}', "job.state", "must be one of STATE_UNSPECIFIED"),
    ],
)
def test_bad_bodies_are_named_clearly(body: bytes, field: str, description: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        create_job(body)
    assert violation(exc)[0] == field
    assert violation(exc)[1].startswith(description)


@pytest.mark.timeout(30)
def test_a_whole_body_must_be_an_object_and_may_be_empty() -> None:
    cancel, variables = route(JOBS, "POST", "/v1/jobs/j1:cancel")
    with pytest.raises(InvalidArgument) as exc:
        decode_request(cancel, variables, {}, b'"jobs/j1"')
    assert violation(exc) == ("", 'request body must be a JSON object, got string "jobs/j1"')
    assert exc.value.message == 'request body must be a JSON object, got string "jobs/j1"'
    request = decode_request(cancel, variables, {}, b"")
    assert request == job_service_pb2.CancelJobRequest(name="jobs/j1")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "kinds",
    [
        {"i32": 5},
        {"i32": 5.0},
        {"i32": None},
        {"i64": "-123"},
        {"i64": -5},
        {"u64": "18446744073709551615"},
        {"f": 1},
        {"d": 1.5},
        {"b": True},
        {"raw": "aGk="},
        {"raw": "aGk"},
        {"color": "COLOR_RED"},
        {"color": 1},
        {"nums": [1, 2]},
        {"counts": {"a": 1}},
        {"at": "2024-01-01T00:00:00Z"},
        {"maybe": 3},
        {"maybe": None},
        {"child": {"child": {"i32": 1}}},
        {"left": "x"},
        {"bigCount": "7"},
        {"extra": {"any": [1, "x", None]}},
    ],
)
def test_values_of_the_proto3_json_mapping_are_accepted(kinds: dict[str, Any]) -> None:
    patch(kinds)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("kinds", "field", "description"),
    [
        ({"i32": "5"}, "kinds.i32", 'must be an integer (JSON number), got string "5"'),
        ({"i32": 1.5}, "kinds.i32", "must be an integer (JSON number), got number 1.5"),
        ({"i32": True}, "kinds.i32", "must be an integer (JSON number), got boolean true"),
        ({"i32": 2**31}, "kinds.i32", "must be between -2147483648 and 2147483647, got 2147483648"),
        ({"u32": -1}, "kinds.u32", "must be between 0 and 4294967295, got -1"),
        ({"i64": "12x"}, "kinds.i64", 'must be an integer (JSON number or decimal string), got string "12x"'),
        ({"i64": str(2**63)}, "kinds.i64", f"must be between {-(2**63)} and {2**63 - 1}, got {2**63}"),
        ({"f": "1.5"}, "kinds.f", 'must be a number (JSON number), got string "1.5"'),
        ({"f": 1e39}, "kinds.f", "must be a finite number within +/-3.402823e+38, got 1e+39"),
        ({"b": "true"}, "kinds.b", 'must be a boolean (true or false), got string "true"'),
        ({"s": 5}, "kinds.s", "must be a string, got number 5"),
        ({"raw": "!!"}, "kinds.raw", "must be base64-encoded bytes"),
        ({"color": "BLUE"}, "kinds.color", 'must be one of COLOR_UNSPECIFIED, COLOR_RED, got string "BLUE"'),
        ({"nums": 1}, "kinds.nums", "must be a JSON array, got number 1"),
        ({"nums": [1, "2"]}, "kinds.nums[1]", 'must be an integer (JSON number), got string "2"'),
        ({"nums": [None]}, "kinds.nums[0]", "must not be null"),
        ({"counts": {"a": "1"}}, 'kinds.counts["a"]', 'must be an integer (JSON number), got string "1"'),
        ({"counts": []}, "kinds.counts", "must be a JSON object (a map), got an array"),
        (
            {"at": "yesterday"},
            "kinds.at",
            'must be an RFC 3339 timestamp string such as "2024-05-01T12:00:00Z", got string "yesterday"',
        ),
        ({"maybe": "3"}, "kinds.maybe", 'must be an integer (JSON number), got string "3"'),
        (
            {"child": {"child": {"i32": "1"}}},
            "kinds.child.child.i32",
            'must be an integer (JSON number), got string "1"',
        ),
        ({"child": 5}, "kinds.child", "must be a JSON object (kilntest.transcode.Kinds), got number 5"),
        ({"left": "a", "right": "b"}, "kinds.right", "cannot be set together with kinds.left (oneof pick)"),
        ({"bogus": 1}, "kinds.bogus", "unknown field of kilntest.transcode.Kinds"),
        ({"bigCount": 1, "big_count": 2}, "kinds.big_count", 'given twice, as "bigCount" and "big_count"'),
        ({"extra": [1]}, "kinds.extra", "must be a JSON object, got an array"),
    ],
)
def test_values_outside_the_mapping_are_refused(kinds: dict[str, Any], field: str, description: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        patch(kinds)
    assert violation(exc) == (field, description)


@pytest.mark.timeout(30)
def test_a_nested_path_variable_wins_over_the_body() -> None:
    request = patch({"s": "from-body", "i32": 3})
    assert request.kinds.s == "things/t1"  # type: ignore[attr-defined]
    assert request.kinds.i32 == 3  # type: ignore[attr-defined]


@pytest.mark.timeout(30)
def test_query_parameters_fill_scalar_repeated_and_nested_fields() -> None:
    query_route, _ = route(THINGS, "GET", "/v1/things")
    query = {
        "name": ["n"],
        "kinds.i32": ["5"],
        "kinds.nums": ["1", "2"],
        "kinds.color": ["COLOR_RED"],
        "kinds.b": ["true"],
        "kinds.at": ["2024-01-01T00:00:00Z"],
        "kinds.maybe": ["4"],
        "kinds.bigCount": ["7"],
        "kinds.child.s": ["deep"],
        "kinds.d": ["2.5"],
        "kinds.i64": ["9007199254740993"],
    }
    request = decode_request(query_route, {}, query, b"")
    kinds = request.kinds  # type: ignore[attr-defined]
    assert request.name == "n"  # type: ignore[attr-defined]
    assert (kinds.i32, list(kinds.nums), kinds.color, kinds.b, kinds.big_count) == (5, [1, 2], 1, True, 7)
    assert (kinds.at.seconds, kinds.maybe.value, kinds.child.s, kinds.d) == (1704067200, 4, "deep", 2.5)
    assert kinds.i64 == 9007199254740993


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("method", "path", "query", "field", "description"),
    [
        ("GET", "/v1/things", {"kinds.i32": ["abc"]}, "kinds.i32", 'must be an integer, got "abc"'),
        (
            "GET",
            "/v1/things",
            {"kinds.i32": ["99999999999"]},
            "kinds.i32",
            "must be between -2147483648 and 2147483647, got 99999999999",
        ),
        ("GET", "/v1/things", {"kinds.i32": ["1", "2"]}, "kinds.i32", "must be given at most once"),
        ("GET", "/v1/things", {"name": ["a"], "Name": ["b"]}, "Name", "unknown query parameter"),
        (
            "GET",
            "/v1/things",
            {"kinds.counts": ["1"]},
            "kinds.counts",
            "cannot be given as a query parameter",
        ),
        ("GET", "/v1/things", {"kinds.b": ["yes"]}, "kinds.b", 'must be true or false, got "yes"'),
        (
            "GET",
            "/v1/things",
            {"kinds.d": ["nan"]},
            "kinds.d",
            "must be a finite number within +/-1.797693e+308, got nan",
        ),
        (
            "POST",
            "/v1/things/t1",
            {"kinds.i32": ["1"]},
            "kinds.i32",
            "belongs in the request body, not the query string",
        ),
        ("POST", "/v1/things/t1", {"name": ["x"]}, "name", "is set by the URL path, not the query string"),
    ],
)
def test_bad_query_parameters_are_named(
    method: str, path: str, query: dict[str, list[str]], field: str, description: str
) -> None:
    found, variables = route(THINGS, method, path)
    with pytest.raises(InvalidArgument) as exc:
        decode_request(found, variables, query, b"")
    assert violation(exc) == (field, description)


@pytest.mark.timeout(30)
def test_list_jobs_query_accepts_camel_and_snake_names() -> None:
    list_route, _ = route(JOBS, "GET", "/v1/jobs")
    request = decode_request(list_route, {}, {"pageSize": ["2"], "page_token": ["x"]}, b"")
    assert request == job_service_pb2.ListJobsRequest(page_size=2, page_token="x")


@pytest.mark.timeout(30)
def test_responses_use_the_proto3_json_mapping_and_response_body() -> None:
    create, _ = route(JOBS, "POST", "/v1/jobs")
    seed = job_pb2.TextToImage(seed=9007199254740993)
    job = job_pb2.Job(name="jobs/1", state=job_pb2.Job.STATE_QUEUED, text_to_image=seed)
    assert encode_response(create, job_service_pb2.CreateJobResponse(job=job)) == {
        "name": "jobs/1",
        "state": "STATE_QUEUED",
        "textToImage": {"seed": "9007199254740993"},
    }
    list_route, _ = route(JOBS, "GET", "/v1/jobs")
    assert encode_response(list_route, job_service_pb2.ListJobsResponse(jobs=[job], next_page_token="t")) == {
        "jobs": [{"name": "jobs/1", "state": "STATE_QUEUED", "textToImage": {"seed": "9007199254740993"}}],
        "nextPageToken": "t",
    }
    patch_route, _ = route(THINGS, "PATCH", "/v1/things/t1")
    response = patch_route.output_type()
    assert encode_response(patch_route, response) == []
    response.names.append("a")  # type: ignore[attr-defined]
    assert encode_response(patch_route, response) == ["a"]
