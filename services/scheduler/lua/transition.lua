-- Moves a job between states (or updates it in place), fenced by its attempt, and appends the
-- resulting snapshot to its event stream. Optionally stores artifact blobs, records the attempt's
-- history and refunds the job's compute units, all in the same step.
-- KEYS: job, events, the tenant's usage counters, then nr rate-policy keys to refund, then blob keys
-- ARGV[1] attempt condition: "" any, "=N" attempt must be N, "<N" attempt must be below N
-- ARGV[2] allowed current states, comma separated (e.g. "QUEUED,RUNNING")
-- ARGV[3] new state, "" to keep
-- ARGV[4] timestamp field to set to now ("" for none)
-- ARGV[5] TTL (s) for job and events once terminal, "0" for none
-- ARGV[6] "1": refuse (CANCEL_REQUESTED) when the client asked to cancel; a cancel already
--         accepted must not turn into a success
-- ARGV[7] blob TTL (s)
-- ARGV[8] JSON object of an attempt to open (appended to `attempts`, start_ms set), or ""
-- ARGV[9] JSON object to close the open attempt with (merged into it, end_ms set), or ""
-- ARGV[10] nr: how many refund keys follow the usage key; ARGV[11] nb: how many blob keys
-- then nb blob values, then field/value pairs
local state = redis.call("HGET", KEYS[1], "state")
if not state then return {"MISSING", ""} end
local attempt = tonumber(redis.call("HGET", KEYS[1], "attempt") or "0")
local cond = ARGV[1]
if cond ~= "" then
  local n = tonumber(string.sub(cond, 2))
  if (string.sub(cond, 1, 1) == "=" and attempt ~= n) or (string.sub(cond, 1, 1) == "<" and attempt >= n) then
    return {"STALE", tostring(attempt)}
  end
end
local allowed = false
for s in string.gmatch(ARGV[2], "[^,]+") do
  if s == state then allowed = true end
end
if not allowed then return {"STATE", state} end
if ARGV[6] == "1" and redis.call("HGET", KEYS[1], "cancel_requested") == "1" then
  return {"CANCEL_REQUESTED", state}
end
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nr, nb = tonumber(ARGV[10]), tonumber(ARGV[11])
for i = 1, nb do
  redis.call("SET", KEYS[3 + nr + i], ARGV[11 + i], "EX", tonumber(ARGV[7]))
end
local fields = {}
for i = 12 + nb, #ARGV do fields[#fields + 1] = ARGV[i] end
if ARGV[3] ~= "" then
  fields[#fields + 1] = "state"
  fields[#fields + 1] = ARGV[3]
end
if ARGV[4] ~= "" then
  fields[#fields + 1] = ARGV[4]
  fields[#fields + 1] = now
end
if ARGV[8] ~= "" or ARGV[9] ~= "" then
  local attempts = cjson.decode(redis.call("HGET", KEYS[1], "attempts") or "[]")
  local last = attempts[#attempts]
  if ARGV[9] ~= "" and last and not last["end_ms"] then
    for k, v in pairs(cjson.decode(ARGV[9])) do last[k] = v end
    last["end_ms"] = now
  end
  if ARGV[8] ~= "" then
    local opened = cjson.decode(ARGV[8])
    opened["start_ms"] = now
    attempts[#attempts + 1] = opened
  end
  fields[#fields + 1] = "attempts"
  -- cjson writes an empty table as {}; there is always at least one attempt here.
  fields[#fields + 1] = cjson.encode(attempts)
end
if redis.call("EXISTS", KEYS[2]) == 0 then
  -- The job's first change: its stream starts with the snapshot it was created with.
  redis.call("XADD", KEYS[2], "0-1", unpack(redis.call("HGETALL", KEYS[1])))
end
if #fields > 0 then redis.call("HSET", KEYS[1], unpack(fields)) end
-- The tenant's counters follow the state: queued CU while QUEUED, in flight until terminal.
local function terminal(s) return s == "SUCCEEDED" or s == "FAILED" or s == "CANCELLED" end
local new_state = ARGV[3]
local cost = tonumber(redis.call("HGET", KEYS[1], "cost") or "0")
if new_state ~= "" and new_state ~= state then
  if state == "QUEUED" then redis.call("HINCRBY", KEYS[3], "queued_cu", -cost) end
  if new_state == "QUEUED" then redis.call("HINCRBY", KEYS[3], "queued_cu", cost) end
  if terminal(new_state) then redis.call("HINCRBY", KEYS[3], "in_flight", -1) end
  if terminal(state) then
    -- Reopened by an operator (a dead letter requeued): in flight again, and kept.
    redis.call("HINCRBY", KEYS[3], "in_flight", 1)
    redis.call("PERSIST", KEYS[1])
    redis.call("PERSIST", KEYS[2])
  end
  redis.call("EXPIRE", KEYS[3], 2592000)
end
-- Settles the job's charge once. Each compute-unit policy gets back what of this job's charge it
-- still counts as in use (the charge drains one unit per interval since creation), so a refund never
-- gives back more than was spent or frees units charged for other jobs; a second settle is a no-op.
if nr > 0 and terminal(new_state) and redis.call("HGET", KEYS[1], "refunded") == false then
  local charges = cjson.decode(redis.call("HGET", KEYS[1], "charges") or "{}")
  local created = tonumber(redis.call("HGET", KEYS[1], "create_ms") or "0")
  for i = 1, nr do
    local name = string.match(KEYS[3 + i], ":gcra:(.+)$")
    local interval = tonumber(charges[name] or "0")
    local policy = redis.call("GET", KEYS[3 + i])
    if policy and interval > 0 then
      local u, at = string.match(policy, "^(%S+):(%S+)$")
      local held = math.max(0, cost - (tonumber(at) - created) / interval)
      redis.call("SET", KEYS[3 + i], string.format("%.6f:%s", math.max(0, tonumber(u) - held), at), "KEEPTTL")
    end
  end
  redis.call("HSET", KEYS[1], "refunded", "1")
end
redis.call("XADD", KEYS[2], "*", unpack(redis.call("HGETALL", KEYS[1])))
if ARGV[5] ~= "0" then
  redis.call("EXPIRE", KEYS[1], tonumber(ARGV[5]))
  redis.call("EXPIRE", KEYS[2], tonumber(ARGV[5]))
end
return {"OK", ARGV[3] ~= "" and ARGV[3] or state}
