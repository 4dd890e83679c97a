"""Every Redis key and channel Kiln uses, named in this one module.

Hash tags keep the keys one script touches in one Redis Cluster slot:
- `{t:<tenant>}`: a tenant's jobs, their event streams, artifacts and job index;
- `{sched}`: the dispatch state shared by every scheduler (queues, leases, attempts);
- `{k:<key id>}`: one API key.
"""

from __future__ import annotations

PREFIX = "kiln"


def _tenant(tenant: str) -> str:
    return f"{PREFIX}:{{t:{tenant}}}"


def job(tenant: str, job_id: str) -> str:
    return f"{_tenant(tenant)}:job:{job_id}"


def job_events(tenant: str, job_id: str) -> str:
    return f"{_tenant(tenant)}:job:{job_id}:events"


def artifact(tenant: str, job_id: str, index: int) -> str:
    return f"{_tenant(tenant)}:job:{job_id}:artifact:{index}"


def request_id(tenant: str, api_key_id: str, request_id: str) -> str:
    """The job a `request_id` sent with one API key created, kept for a day so that retries with
    that key return the same job. (Key ids are fixed-length hex, so the two parts cannot blur.)"""
    return f"{_tenant(tenant)}:request:{api_key_id}:{request_id}"


def usage(tenant: str) -> str:
    """Hash of the tenant's live counters: `in_flight` jobs and `queued_cu`."""
    return f"{_tenant(tenant)}:usage"


def rate_policy(tenant: str, policy: str) -> str:
    """A rate policy's state, `<units in use>:<ms, Redis clock>`, expiring once they have drained."""
    return f"{_tenant(tenant)}:gcra:{policy}"


def tenant_jobs(tenant: str) -> str:
    """Sorted set of the tenant's job ids, all at score 0 so ZRANGE BYLEX orders them by id (age)."""
    return f"{_tenant(tenant)}:jobs"


DISPATCH_PREFIX = f"{PREFIX}:{{sched}}:"
"""The dispatch script builds its per-model keys under this prefix (see lua/dispatch.lua):
`tiers:<model>`, `tenants:<model>:<tier>`, `q:<model>:<tier>:<tenant>`, `vt:<model>`, and
`lane:<model>` (retries that need a worker with more free VRAM)."""


def queue_deadlines() -> str:
    """Sorted set of queued jobs by the time their queue timeout ends (ms, Redis clock)."""
    return f"{PREFIX}:{{sched}}:deadlines"


def leases() -> str:
    """Sorted set of `<tenant> <job id>` scored by lease expiry (ms, Redis clock)."""
    return f"{PREFIX}:{{sched}}:leases"


def lease_owners() -> str:
    """Hash `<tenant> <job id>` -> `<worker id> <attempt>` of the current lease holder."""
    return f"{PREFIX}:{{sched}}:lease_owners"


def attempts() -> str:
    """Hash `<tenant> <job id>` -> attempts handed out so far (the fencing token)."""
    return f"{PREFIX}:{{sched}}:attempts"


def delayed() -> str:
    """Sorted set of retries waiting out their backoff, by due time (ms, Redis clock):
    `<model>|<tier>|<tenant>|<job id> <cost>|<min free VRAM bytes>`."""
    return f"{PREFIX}:{{sched}}:delayed"


def intents() -> str:
    """Sorted set of changes that span two hash slots and are not yet finished, by when the reaper
    should finish them (ms, Redis clock): `<kind>|<tenant> <job id>`, kind enqueue, expire or
    load_failed."""
    return f"{PREFIX}:{{sched}}:intents"


def dead_letters() -> str:
    """Sorted set of `<tenant> <job id>` that ended FAILED after their retries, by when (ms)."""
    return f"{PREFIX}:{{sched}}:dead_letters"


def workers() -> str:
    """Hash worker id -> JSON of what it last reported (models, failed models, VRAM, when seen)."""
    return f"{PREFIX}:{{sched}}:workers"


def api_key(key_id: str) -> str:
    return f"{PREFIX}:{{k:{key_id}}}:apikey"


def api_key_index() -> str:
    """Set of all key ids, for listing keys."""
    return f"{PREFIX}:apikeys"


# Pub/sub channels. Messages are hints only: every receiver re-reads the state they point at.
WAKE_CHANNEL = f"{PREFIX}:wake"
CANCEL_CHANNEL = f"{PREFIX}:cancel"


def queue_entry(tenant: str, job_id: str) -> str:
    return f"{tenant} {job_id}"


def parse_queue_entry(entry: str) -> tuple[str, str]:
    tenant, job_id = entry.split(" ", 1)
    return tenant, job_id
