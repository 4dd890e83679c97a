"""One trace per job: the gateway's request, the queue wait and the worker's run share one trace."""

from __future__ import annotations

import aiohttp
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.conftest import Stack
from tests.helpers import auth, rest_wait

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


def _by_job(spans: InMemorySpanExporter, name: str) -> dict[str, ReadableSpan]:
    found = {}
    for span in spans.get_finished_spans():
        if span.attributes is not None and span.attributes.get("kiln.job") == name:
            found[span.name] = span
    return found


async def test_request_queue_wait_and_run_are_one_trace(stack: Stack, spans: InMemorySpanExporter) -> None:
    async with aiohttp.ClientSession() as http:
        body = {"model": "tiny-sd", "textToImage": {"prompt": "traced", "steps": 3, "seed": "5"}}
        async with http.post(f"{stack.http_base}/v1/jobs", json=body, headers=auth(stack.key_a)) as resp:
            name = (await resp.json())["name"]
        done = await rest_wait(http, stack.http_base, stack.key_a, name)
    assert done["state"] == "STATE_SUCCEEDED"
    found = _by_job(spans, name)
    assert set(found) == {"CreateJob", "queued", "run"}
    create, queued, run = found["CreateJob"], found["queued"], found["run"]
    assert create.context is not None and queued.context is not None and run.context is not None
    assert len({create.context.trace_id, queued.context.trace_id, run.context.trace_id}) == 1
    assert queued.parent is not None and queued.parent.span_id == create.context.span_id
    assert run.parent is not None and run.parent.span_id == queued.context.span_id
    assert run.attributes is not None
    assert run.attributes["kiln.outcome"] == "succeeded"
    assert run.attributes["kiln.attempt"] == 1
    assert run.attributes["kiln.steps"] == 3
    assert queued.start_time is not None and create.start_time is not None
    assert queued.start_time >= create.start_time - 50_000_000  # Redis clock vs. ours: within 50 ms
