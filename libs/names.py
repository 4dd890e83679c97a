"""Parsing of resource names (`jobs/{job}`, `jobs/{job}/artifacts/{artifact}`) at the door."""

from __future__ import annotations

import re

from libs.errors import InvalidArgument

_JOB = re.compile(r"jobs/([0-9a-z]{26})")
_ARTIFACT = re.compile(r"jobs/([0-9a-z]{26})/artifacts/(0|[1-9]\d{0,2})")


def parse_job(name: str, field: str = "name") -> str:
    match = _JOB.fullmatch(name)
    if match is None:
        raise InvalidArgument.field(field, f"must be a job name like jobs/{{id}}, got {name!r}")
    return match.group(1)


def parse_artifact(name: str, field: str = "name") -> tuple[str, int]:
    match = _ARTIFACT.fullmatch(name)
    if match is None:
        raise InvalidArgument.field(
            field, f"must be an artifact name like jobs/{{id}}/artifacts/{{index}}, got {name!r}"
        )
    return match.group(1), int(match.group(2))
