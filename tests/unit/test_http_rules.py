"""Routes come from the `google.api.http` annotations; the router tells a 404 from a 405."""

from __future__ import annotations

import re

import pytest
from google.api import annotations_pb2  # noqa: F401  (registers the google.api.http extension)
from google.protobuf import descriptor_pb2, descriptor_pool, text_format
from google.protobuf.descriptor import ServiceDescriptor
from kiln.v1 import job_service_pb2

from services.gateway.http_rules import Router, compile_template, routes_for

JOB_SERVICE = job_service_pb2.DESCRIPTOR.services_by_name["JobService"]

# A service with what JobService does not use: dotted variables, `**`, custom kinds, extra bindings.
RULES_PROTO = """
name: "kilntest/rules.proto" package: "kilntest.rules" syntax: "proto3"
dependency: "google/api/annotations.proto"
message_type { name: "Inner" field { name: "id" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL } }
message_type { name: "Item"
  field { name: "name" number: 1 type: TYPE_STRING label: LABEL_OPTIONAL }
  field { name: "inner" number: 2 label: LABEL_OPTIONAL
          type: TYPE_MESSAGE type_name: ".kilntest.rules.Inner" }
}
service { name: "Items"
  method { name: "GetItem" input_type: ".kilntest.rules.Item" output_type: ".kilntest.rules.Item"
    options { [google.api.http] {
      get: "/v1/{name=shelves/*/items/*}"
      additional_bindings { get: "/v1/{inner.id=inners/*}/item" }
      additional_bindings { custom { kind: "SEARCH" path: "/v1/items" } body: "*" }
    } } }
  method { name: "ReadFile" input_type: ".kilntest.rules.Item" output_type: ".kilntest.rules.Item"
    options { [google.api.http] { get: "/v1/{name=files/**}:read" } } }
  method { name: "Unmapped" input_type: ".kilntest.rules.Item" output_type: ".kilntest.rules.Item" }
}
"""


def rules_service() -> ServiceDescriptor:
    pool = descriptor_pool.Default()
    pool.Add(text_format.Parse(RULES_PROTO, descriptor_pb2.FileDescriptorProto()))
    return pool.FindServiceByName("kilntest.rules.Items")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("template", "path", "expected"),
    [
        ("/v1/jobs", "/v1/jobs", {}),
        ("/v1/jobs", "/v1/jobs/x", None),
        ("/v1/{name=jobs/*}", "/v1/jobs/abc", {"name": "jobs/abc"}),
        ("/v1/{name=jobs/*}", "/v1/jobs/a/b", None),
        ("/v1/{name=jobs/*}", "/v1/jobs/", None),
        ("/v1/{name=jobs/*}", "/v1/jobs/a%2Fb", {"name": "jobs/a/b"}),
        ("/v1/{name=jobs/*}:cancel", "/v1/jobs/abc:cancel", {"name": "jobs/abc"}),
        ("/v1/{name=jobs/*}:cancel", "/v1/jobs/abc", None),
        ("/v1/{name=jobs/*/artifacts/*}:read", "/v1/jobs/j/artifacts/0:read", {"name": "jobs/j/artifacts/0"}),
        ("/v1/{id}", "/v1/abc", {"id": "abc"}),
        ("/v1/{a.b}/{c=x/*}", "/v1/1/x/2", {"a.b": "1", "c": "x/2"}),
        ("/v1/{path=files/**}", "/v1/files/a/b/c", {"path": "files/a/b/c"}),
        ("/v1/*/items", "/v1/shelf/items", {}),
    ],
)
def test_templates_match_paths(template: str, path: str, expected: dict[str, str] | None) -> None:
    assert compile_template(template).match(path) == expected


@pytest.mark.timeout(30)
def test_template_verb_and_variables() -> None:
    compiled = compile_template("/v1/{name=jobs/*/artifacts/*}:read")
    assert compiled.verb == "read"
    assert compiled.variables == ("name",)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("template", ["v1/jobs", "/v1/{name=jobs/*", "/v1//jobs", "/v1/{name=jobs/{x}}"])
def test_bad_templates_are_refused(template: str) -> None:
    with pytest.raises(ValueError, match="template"):
        compile_template(template)


@pytest.mark.timeout(30)
def test_job_service_routes_come_from_annotations() -> None:
    routes = {route.method.name: route for route in routes_for(JOB_SERVICE)}
    assert set(routes) == {
        "CreateJob",
        "EstimateJob",
        "GetJob",
        "ListJobs",
        "CancelJob",
        "WatchJob",
        "ReadArtifact",
    }
    create = routes["CreateJob"]
    assert (create.http_method, create.path.template, create.body, create.response_body) == (
        "POST",
        "/v1/jobs",
        "job",
        "job",
    )
    assert create.input_type is job_service_pb2.CreateJobRequest
    assert create.output_type is job_service_pb2.CreateJobResponse
    assert not create.server_streaming
    assert routes["CancelJob"].body == "*"
    assert routes["WatchJob"].server_streaming
    assert routes["ReadArtifact"].output_type.DESCRIPTOR.full_name == "google.api.HttpBody"


@pytest.mark.timeout(30)
def test_router_prefers_the_custom_verb_and_tells_405_from_404() -> None:
    router = Router(routes_for(JOB_SERVICE))
    watch = router.match("GET", "/v1/jobs/j1:watch")
    assert watch is not None and watch[0].method.name == "WatchJob" and watch[1] == {"name": "jobs/j1"}
    get = router.match("get", "/v1/jobs/j1")
    assert get is not None and get[0].method.name == "GetJob"
    listed = router.match("GET", "/v1/jobs")
    assert listed is not None and listed[0].method.name == "ListJobs"

    assert router.match("GET", "/v1/jobs/j1:cancel") is None
    assert router.allowed("/v1/jobs/j1:cancel") == ["POST"]
    assert router.match("DELETE", "/v1/jobs") is None
    assert router.allowed("/v1/jobs") == ["GET", "POST"]
    assert router.match("GET", "/v2/jobs") is None
    assert router.allowed("/v2/jobs") == []


@pytest.mark.timeout(30)
def test_additional_bindings_custom_kinds_and_deep_wildcards() -> None:
    routes = routes_for(rules_service())
    assert [(r.method.name, r.http_method, r.path.template, r.body) for r in routes] == [
        ("GetItem", "GET", "/v1/{name=shelves/*/items/*}", ""),
        ("GetItem", "GET", "/v1/{inner.id=inners/*}/item", ""),
        ("GetItem", "SEARCH", "/v1/items", "*"),
        ("ReadFile", "GET", "/v1/{name=files/**}:read", ""),
    ]
    router = Router(routes)
    found = router.match("GET", "/v1/inners/7/item")
    assert found is not None and found[1] == {"inner.id": "inners/7"}
    found = router.match("SEARCH", "/v1/items")
    assert found is not None and found[0].body == "*"
    found = router.match("GET", "/v1/files/a/b.png:read")
    assert found is not None and found[1] == {"name": "files/a/b.png"}


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("n", "rule", "problem"),
    [
        (1, 'get: "/v1/{nope=files/*}"', "path variable 'nope' names no singular field"),
        (2, 'get: "/v1/{inner=files/*}"', "path variable 'inner' names a message, not a scalar"),
        (3, 'post: "/v1/files" body: "inner.id"', "body 'inner.id' is no top-level field"),
        (4, 'get: "/v1/files" response_body: "nope"', "response_body 'nope' is no top-level field"),
    ],
)
def test_rules_that_name_no_usable_field_fail_when_routes_are_built(n: int, rule: str, problem: str) -> None:
    proto = RULES_PROTO.replace("rules", f"badrules{n}").replace('get: "/v1/{name=files/**}:read"', rule)
    pool = descriptor_pool.Default()
    pool.Add(text_format.Parse(proto, descriptor_pb2.FileDescriptorProto()))
    with pytest.raises(ValueError, match=re.escape(problem)):
        routes_for(pool.FindServiceByName(f"kilntest.badrules{n}.Items"))
