-- Moves a job between states (or updates it in place), fenced by its attempt, and appends the
-- resulting snapshot to its event stream. Optionally stores artifact blobs in the same step.
-- KEYS: job, events, the tenant's usage counters, blob keys...
-- ARGV[1] attempt condition: "" any, "=N" attempt must be N, "<N" attempt must be below N
-- ARGV[2] allowed current states, comma separated (e.g. "QUEUED,RUNNING")
-- ARGV[3] new state, "" to keep
-- ARGV[4] timestamp field to set to now ("" for none)
-- ARGV[5] TTL (s) for job and events once terminal, "0" for none
-- ARGV[6] "1": refuse (CANCEL_REQUESTED) when the client asked to cancel; a cancel already
--         accepted must not turn into a success
-- ARGV[7] blob TTL (s); ARGV[8..7+#blobs] blob values, then field/value pairs
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
local nblobs = #KEYS - 3
for i = 1, nblobs do
  redis.call("SET", KEYS[3 + i], ARGV[7 + i], "EX", tonumber(ARGV[7]))
end
local fields = {}
for i = 8 + nblobs, #ARGV do fields[#fields + 1] = ARGV[i] end
if ARGV[3] ~= "" then
  fields[#fields + 1] = "state"
  fields[#fields + 1] = ARGV[3]
end
if ARGV[4] ~= "" then
  local t = redis.call("TIME")
  fields[#fields + 1] = ARGV[4]
  fields[#fields + 1] = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
if redis.call("EXISTS", KEYS[2]) == 0 then
  -- The job's first change: its stream starts with the snapshot it was created with.
  redis.call("XADD", KEYS[2], "0-1", unpack(redis.call("HGETALL", KEYS[1])))
end
if #fields > 0 then redis.call("HSET", KEYS[1], unpack(fields)) end
-- The tenant's counters follow the state: queued CU while QUEUED, in flight until terminal.
local new_state = ARGV[3]
local cost = redis.call("HGET", KEYS[1], "cost")
if new_state ~= "" and new_state ~= state and cost then
  if state == "QUEUED" then redis.call("HINCRBY", KEYS[3], "queued_cu", -tonumber(cost)) end
  if new_state == "QUEUED" then redis.call("HINCRBY", KEYS[3], "queued_cu", tonumber(cost)) end
  if new_state == "SUCCEEDED" or new_state == "FAILED" or new_state == "CANCELLED" then
    redis.call("HINCRBY", KEYS[3], "in_flight", -1)
  end
  redis.call("EXPIRE", KEYS[3], 2592000)
end
redis.call("XADD", KEYS[2], "*", unpack(redis.call("HGETALL", KEYS[1])))
if ARGV[5] ~= "0" then
  redis.call("EXPIRE", KEYS[1], tonumber(ARGV[5]))
  redis.call("EXPIRE", KEYS[2], tonumber(ARGV[5]))
end
return {"OK", ARGV[3] ~= "" and ARGV[3] or state}
