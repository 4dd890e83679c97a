"""The OpenAPI document is generated from the descriptors, and it is valid OpenAPI 3.0."""

from __future__ import annotations

from typing import Any

import pytest
from google.api import annotations_pb2  # noqa: F401  (registers the google.api.http extension)
from google.protobuf import (  # noqa: F401  (the test proto uses them)
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    struct_pb2,
    text_format,
    wrappers_pb2,
)
from kiln.v1 import job_service_pb2
from openapi_spec_validator import validate

from services.gateway.openapi import build_openapi

JOB_SERVICE = job_service_pb2.DESCRIPTOR.services_by_name["JobService"]

NODES_PROTO = """
name: "kilntest/openapi.proto" package: "kilntest.openapi" syntax: "proto3"
dependency: "google/api/annotations.proto"
dependency: "google/protobuf/duration.proto"
dependency: "google/protobuf/struct.proto"
dependency: "google/protobuf/wrappers.proto"
message_type { name: "Node"
  field { name: "name" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
  field { name: "child" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".kilntest.openapi.Node" }
  field { name: "kids" number: 3 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".kilntest.openapi.Node" }
  field { name: "named" number: 4 label: LABEL_REPEATED type: TYPE_MESSAGE
          type_name: ".kilntest.openapi.Node.NamedEntry" }
  field { name: "meta" number: 5 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".google.protobuf.Struct" }
  field { name: "any_value" number: 6 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".google.protobuf.Value" }
  field { name: "big" number: 7 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".google.protobuf.Int64Value" }
  field { name: "raw" number: 8 label: LABEL_OPTIONAL type: TYPE_BYTES }
  field { name: "u" number: 9 label: LABEL_OPTIONAL type: TYPE_UINT32 }
  field { name: "ttl" number: 10 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".google.protobuf.Duration" }
  nested_type { name: "NamedEntry" options { map_entry: true }
    field { name: "key" number: 1 label: LABEL_OPTIONAL type: TYPE_STRING }
    field { name: "value" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE
          type_name: ".kilntest.openapi.Node" } }
}
service { name: "Nodes"
  method { name: "GetNode" input_type: ".kilntest.openapi.Node" output_type: ".kilntest.openapi.Node"
    options { [google.api.http] {
      get: "/v1/{name=trees/*/nodes/*}"
      additional_bindings { post: "/v1/nodes:lookup" body: "*" }
      additional_bindings { custom { kind: "SEARCH" path: "/v1/nodes" } }
    } } }
}
"""


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return build_openapi(JOB_SERVICE, title="Kiln API", version="v1")


def operations(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {op["operationId"]: op for item in document["paths"].values() for op in item.values()}


@pytest.mark.timeout(30)
def test_the_document_is_valid_openapi(doc: dict[str, Any]) -> None:
    validate(doc)
    assert doc["openapi"] == "3.0.3"
    assert doc["info"] == {"title": "Kiln API", "version": "v1"}


@pytest.mark.timeout(30)
def test_one_operation_per_http_rule_with_slash_free_path_parameters(doc: dict[str, Any]) -> None:
    paths = doc["paths"].items()
    found = {(op["operationId"], verb, path) for path, item in paths for verb, op in item.items()}
    assert found == {
        ("CreateJob", "post", "/v1/jobs"),
        ("EstimateJob", "post", "/v1/jobs:estimate"),
        ("ListJobs", "get", "/v1/jobs"),
        ("GetJob", "get", "/v1/jobs/{job}"),
        ("CancelJob", "post", "/v1/jobs/{job}:cancel"),
        ("WatchJob", "get", "/v1/jobs/{job}:watch"),
        ("ReadArtifact", "get", "/v1/jobs/{job}/artifacts/{artifact}:read"),
    }
    read = operations(doc)["ReadArtifact"]
    assert [(p["name"], p["in"], p["required"]) for p in read["parameters"]] == [
        ("job", "path", True),
        ("artifact", "path", True),
    ]
    assert "jobs/{job}/artifacts/{artifact}" in read["parameters"][0]["description"]


@pytest.mark.timeout(30)
def test_query_parameters_are_the_fields_outside_path_and_body(doc: dict[str, Any]) -> None:
    ops = operations(doc)

    def query(name: str) -> dict[str, Any]:
        return {p["name"]: p["schema"] for p in ops[name]["parameters"] if p["in"] == "query"}

    page_size = {"type": "integer", "format": "int32"}
    assert query("ListJobs") == {"pageSize": page_size, "pageToken": {"type": "string"}}
    assert query("CreateJob") == {"requestId": {"type": "string"}}
    assert query("WatchJob") == {"afterEventId": {"type": "string"}}
    assert query("GetJob") == {} and query("CancelJob") == {}


@pytest.mark.timeout(30)
def test_bodies_and_responses(doc: dict[str, Any]) -> None:
    ops = operations(doc)
    job_ref = {"$ref": "#/components/schemas/kiln.v1.Job"}
    create_body = {"required": True, "content": {"application/json": {"schema": job_ref}}}
    assert ops["CreateJob"]["requestBody"] == create_body
    cancel_body = ops["CancelJob"]["requestBody"]["content"]["application/json"]["schema"]
    assert cancel_body == {"type": "object", "properties": {}}  # `name` travels in the path
    assert "requestBody" not in ops["GetJob"]

    assert ops["GetJob"]["responses"]["200"]["content"]["application/json"]["schema"] == job_ref
    listed = ops["ListJobs"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert listed == {"$ref": "#/components/schemas/kiln.v1.ListJobsResponse"}
    events = ops["WatchJob"]["responses"]["200"]["content"]["text/event-stream"]
    assert events["x-event-data"] == {"$ref": "#/components/schemas/kiln.v1.WatchJobResponse"}
    read = ops["ReadArtifact"]["responses"]["200"]["content"]
    assert read == {"*/*": {"schema": {"type": "string", "format": "binary"}}}
    for op in ops.values():
        assert op["responses"]["default"] == {"$ref": "#/components/responses/Error"}
        assert op["security"] == [{"bearerAuth": []}]
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


@pytest.mark.timeout(30)
def test_schemas_follow_the_proto3_json_mapping(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    job = schemas["kiln.v1.Job"]
    assert job["required"] == ["model"]
    assert job["properties"]["name"] == {"type": "string", "readOnly": True}
    state_ref = {"$ref": "#/components/schemas/kiln.v1.Job.State"}
    assert job["properties"]["state"] == {"allOf": [state_ref], "readOnly": True}
    assert job["properties"]["createTime"] == {"type": "string", "format": "date-time", "readOnly": True}
    assert job["properties"]["artifacts"]["items"] == {"$ref": "#/components/schemas/kiln.v1.Artifact"}
    assert schemas["kiln.v1.Job.State"]["enum"][:2] == ["STATE_UNSPECIFIED", "STATE_QUEUED"]
    t2i = schemas["kiln.v1.TextToImage"]["properties"]
    assert t2i["seed"] == {"type": "string", "format": "int64"}
    assert t2i["width"] == {"type": "integer", "format": "int32"}
    assert t2i["guidanceScale"] == {"type": "number", "format": "float"}
    assert schemas["kiln.v1.Artifact"]["properties"]["sizeBytes"] == {"type": "string", "format": "int64"}
    details = schemas["google.rpc.Status"]["properties"]["details"]["items"]
    assert details["properties"]["@type"]["type"] == "string"
    error = schemas["ErrorResponse"]["properties"]["error"]["properties"]
    assert set(error) == {"code", "status", "message", "details"}


@pytest.mark.timeout(30)
def test_recursive_messages_maps_and_well_known_types() -> None:
    pool = descriptor_pool.Default()
    pool.Add(text_format.Parse(NODES_PROTO, descriptor_pb2.FileDescriptorProto()))
    document = build_openapi(pool.FindServiceByName("kilntest.openapi.Nodes"), title="t", version="1")
    validate(document)
    assert set(operations(document)) == {"GetNode", "GetNode_1"}  # OpenAPI has no SEARCH
    assert "/v1/trees/{tree}/nodes/{node}" in document["paths"]
    node = document["components"]["schemas"]["kilntest.openapi.Node"]["properties"]
    ref = {"$ref": "#/components/schemas/kilntest.openapi.Node"}
    assert node["child"] == ref and node["kids"] == {"type": "array", "items": ref}
    assert node["named"] == {"type": "object", "additionalProperties": ref}
    assert node["meta"] == {"type": "object", "additionalProperties": True}
    assert node["big"] == {"type": "string", "format": "int64", "nullable": True}
    assert node["raw"] == {"type": "string", "format": "byte"}
    assert node["u"]["minimum"] == 0
    assert node["ttl"]["type"] == "string"
    lookup = operations(document)["GetNode_1"]["requestBody"]["content"]["application/json"]["schema"]
    assert lookup == ref
    # Query parameters stop at the recursion and skip what a URL cannot carry.
    query = {p["name"] for p in operations(document)["GetNode"]["parameters"] if p["in"] == "query"}
    assert query == {"big", "raw", "u", "ttl"}
