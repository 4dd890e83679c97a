"""Tracing: one trace per job.

The gateway's CreateJob span starts the trace; its W3C `traceparent` is stored with the job, so the
scheduler's queue-wait span and the worker's run span (taken from the job, not from whichever
request happens to be running) join the same trace however long the job waited.
"""

from __future__ import annotations

from opentelemetry import context, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
EXPORTERS = ("none", "console", "otlp")


def tracer(name: str) -> trace.Tracer:
    # Looked up per use, so a provider installed after import (tests, late setup) still applies.
    return trace.get_tracer(name)


def current_traceparent() -> str:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


def traceparent_of(span: trace.Span) -> str:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def context_from(traceparent: str) -> context.Context:
    return _PROPAGATOR.extract({"traceparent": traceparent} if traceparent else {})


def setup_tracing(service: str, exporter: str) -> None:
    """Installs the process's tracer provider; "none" leaves OpenTelemetry's no-op in place."""
    if exporter == "none":
        return
    span_exporter: SpanExporter
    if exporter == "console":
        span_exporter = ConsoleSpanExporter()
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter,
            )
        except ImportError:
            raise SystemExit("otel_exporter=otlp needs: pip install 'kiln[otlp]'") from None
        span_exporter = OTLPSpanExporter()  # endpoint from the standard OTEL_EXPORTER_OTLP_* variables
    else:
        raise SystemExit(f"otel_exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
