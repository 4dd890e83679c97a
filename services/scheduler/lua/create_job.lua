-- Admits and creates a job in one step: idempotency, the tenant's caps, every rate policy checked
-- before any is spent, then the job, its first event, its index entry and the usage counters.
-- A refusal writes nothing. An empty job id is a dry run: the checks, and nothing written.
-- KEYS: job, events, tenant_jobs, request (a dummy when no request_id), usage, policy keys...
-- ARGV[1] job_id  [2] request_ttl_s ("0" = no request_id)  [3] fingerprint  [4] cost (CU)
-- ARGV[5] max_in_flight  [6] max_queued_cu  [7] number of policies n
-- ARGV[8 ..] per policy: name, emission interval (ms per unit), burst (units), units charged
-- then field/value pairs of the job
local dry = ARGV[1] == ""
if ARGV[2] ~= "0" and not dry then
  local seen = redis.call("HGET", KEYS[4], "job_id")
  if seen then
    if redis.call("HGET", KEYS[4], "fingerprint") ~= ARGV[3] then
      return {"MISMATCH", seen}
    end
    return {"EXISTS", seen}
  end
end
if redis.call("EXISTS", KEYS[1]) == 1 then
  return {"DUPLICATE_ID", ARGV[1]}
end
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local cost = tonumber(ARGV[4])
local in_flight = tonumber(redis.call("HGET", KEYS[5], "in_flight") or "0")
if in_flight >= tonumber(ARGV[5]) then
  return {"IN_FLIGHT", "in_flight", "1000", ARGV[5]}
end
local queued = tonumber(redis.call("HGET", KEYS[5], "queued_cu") or "0")
if queued + cost > tonumber(ARGV[6]) then
  return {"QUEUE_FULL", "queued_cu", "1000", ARGV[6]}
end
-- GCRA, kept as "<units in use>:<ms>": the units drain at one per interval, and a charge of u is
-- allowed while in-use + u stays within the burst. Stored in units, not as a theoretical arrival
-- time, so a key moved to another tier keeps what it spent rather than having it rescaled.
local n = tonumber(ARGV[7])
local used = {}
local base = 8 + 4 * n
local worst = nil  -- the refusing policy that needs the longest wait: after it, all of them pass
for i = 1, n do
  local a = 8 + 4 * (i - 1)
  local interval, burst, units = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local in_use = 0
  local state = redis.call("GET", KEYS[5 + i])
  if state then
    local u, at = string.match(state, "^(%S+):(%S+)$")
    in_use = math.max(0, tonumber(u) - (now - tonumber(at)) / interval)
  end
  local excess = (in_use + units - burst) * interval  -- ms until the charge fits
  if excess > 0 and (not worst or excess > worst[2]) then worst = {a, excess} end
  used[i] = {in_use + units, interval}
end
if worst then
  return {"LIMITED", ARGV[worst[1]], tostring(math.ceil(worst[2])), ARGV[worst[1] + 2]}
end
if dry then return {"ADMISSIBLE", ""} end
for i = 1, n do
  local units, interval = used[i][1], used[i][2]
  redis.call("SET", KEYS[5 + i], string.format("%.6f:%.3f", units, now), "PX", math.max(1, math.ceil(units * interval)))
end
redis.call("HINCRBY", KEYS[5], "in_flight", 1)
redis.call("HINCRBY", KEYS[5], "queued_cu", cost)
redis.call("EXPIRE", KEYS[5], 2592000)  -- idle tenants' counters go after 30 days
redis.call("HSET", KEYS[1], "create_ms", math.floor(now), "cost", cost, unpack(ARGV, base))
redis.call("ZADD", KEYS[3], 0, ARGV[1])
if ARGV[2] ~= "0" then
  redis.call("HSET", KEYS[4], "job_id", ARGV[1], "fingerprint", ARGV[3])
  redis.call("EXPIRE", KEYS[4], tonumber(ARGV[2]))
end
-- No event stream yet: a stream costs ~4 KB, most of a queued job's memory. The first transition
-- writes the QUEUED snapshot as event 0-1 before its own; until then watchers read it from the hash.
return {"CREATED", ARGV[1]}
