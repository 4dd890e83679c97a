-- Fair dispatch, all in the {sched} hash slot (keys built here share the prefix's tag).
-- Per model m, weighted fair queuing by virtual finish time on two levels, in compute units (CU):
--   <P>tiers:<m>              zset  active tiers, scored by the finish tag of their next job
--   <P>tenants:<m>:<tier>     zset  active tenants of a tier, scored the same way within the tier
--   <P>q:<m>:<tier>:<tenant>  list  the tenant's FIFO of "<job id> <cost>"
--   <P>vt:<m>                 hash  F:/S:<tier>, F:/S:<tier>:<tenant> (last finish, current start
--                                   tags) and V, V:<tier>
--                                   (virtual time: the start tag of the last job served there);
--                                   queued_cu; served/served_ms (CU served, decayed over RATE_TAU_MS);
--                                   busy_since (when its queue last went from empty to not)
-- A tier's next job finishes at max(F_tier, V) + cost / weight; a tenant's at max(F_tenant,
-- V_tier) + cost. Serving the smallest finish tag shares CU by weight across tiers and equally
-- across a tier's tenants; starting from V means idling banks no credit and a newcomer goes
-- within one round. Whichever replica runs it, a claim is one step.
--   <P>lane:<m>               zset  retries that need a worker with more free VRAM, scored by the
--                                   bytes they need: "<tier>|<tenant>|<job id> <cost>"
-- KEYS: leases, lease_owners, attempts, deadlines, delayed (retries waiting out their backoff),
-- intents (cross-slot changes in progress, for the reaper to finish), dead_letters
-- ARGV[1] op, [2] key prefix, [3] n tier weights,
-- [4 .. 3+2n] tier/weight pairs, then the op's arguments
local P = ARGV[2]
local weights = {}
local nw = tonumber(ARGV[3])
for i = 4, 3 + 2 * nw, 2 do weights[ARGV[i]] = tonumber(ARGV[i + 1]) end
local A = 4 + 2 * nw  -- the op's first argument

local RATE_TAU_MS = 60000
local BUSY_MIN_MS = 2000

local function now_ms()
  local t = redis.call("TIME")
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function names(model, tier, tenant)
  return P .. "tiers:" .. model, P .. "tenants:" .. model .. ":" .. tier,
    P .. "q:" .. model .. ":" .. tier .. ":" .. tenant, P .. "vt:" .. model
end

local function num(value) return tonumber(value or "0") or 0 end

local function head_cost(list)
  local head = redis.call("LINDEX", list, 0)
  return head and tonumber(string.match(head, " (%S+)$"))
end

local function deadline_member(model, tier, tenant, item)
  return model .. "|" .. tier .. "|" .. tenant .. "|" .. item
end

-- A tier's or tenant's start tag S is fixed when it becomes active (max(F, V): no banked credit)
-- and after each job it is served (its last finish tag F). Its score, the finish tag of its next
-- job, is S + cost (/ weight for tiers). Later arrivals and head changes re-place it from that
-- same S, so newcomers elsewhere never push back work already waiting.
local function place(set, member, vt, s_field, f_field, v_field, cost)
  local start
  if redis.call("ZSCORE", set, member) then
    start = num(redis.call("HGET", vt, s_field))
  else
    start = math.max(num(redis.call("HGET", vt, f_field)), num(redis.call("HGET", vt, v_field)))
    redis.call("HSET", vt, s_field, start)
  end
  redis.call("ZADD", set, start + cost, member)
end

-- Re-place a tenant by its head job, or drop it from the active set when it has none.
local function rescore_tenant(model, tier, tenant)
  local _, tenants, list, vt = names(model, tier, tenant)
  local cost = head_cost(list)
  if not cost then
    redis.call("ZREM", tenants, tenant)
    return
  end
  local id = tier .. ":" .. tenant
  place(tenants, tenant, vt, "S:" .. id, "F:" .. id, "V:" .. tier, cost)
end

-- Re-place a tier by the head job of its first tenant, or drop it when no tenant is active.
local function rescore_tier(model, tier)
  local tiers, tenants, _, vt = names(model, tier, "")
  local first = redis.call("ZRANGE", tenants, 0, 0)
  if #first == 0 then
    redis.call("ZREM", tiers, tier)
    return
  end
  local _, _, list = names(model, tier, first[1])
  place(tiers, tier, vt, "S:" .. tier, "F:" .. tier, "V", head_cost(list) / (weights[tier] or 1))
end

-- Compute units served, as an exponentially decayed sum: sum / tau is the recent rate in CU/ms.
local function served(vt, now, cost)
  local sum = num(redis.call("HGET", vt, "served"))
  local at = num(redis.call("HGET", vt, "served_ms"))
  sum = sum * math.exp(-math.max(0, now - at) / RATE_TAU_MS) + cost
  redis.call("HSET", vt, "served", sum, "served_ms", now)
  return sum
end

local function take_out(model, tier, tenant, item)
  local _, _, list, vt = names(model, tier, tenant)
  local removed = redis.call("LREM", list, 1, item)
  redis.call("ZREM", KEYS[4], deadline_member(model, tier, tenant, item))
  if removed > 0 then
    redis.call("HINCRBY", vt, "queued_cu", -tonumber(string.match(item, " (%S+)$")))
    rescore_tenant(model, tier, tenant)
    rescore_tier(model, tier)
  end
  return removed
end

local op = ARGV[1]

local function push(model, tier, tenant, item, front)
  local _, _, list, vt = names(model, tier, tenant)
  if num(redis.call("HGET", vt, "queued_cu")) <= 0 then
    redis.call("HSET", vt, "busy_since", now_ms())  -- a busy spell starts: see "stats"
  end
  if front then redis.call("LPUSH", list, item) else redis.call("RPUSH", list, item) end
  redis.call("HINCRBY", vt, "queued_cu", tonumber(string.match(item, " (%S+)$")))
  rescore_tenant(model, tier, tenant)
  rescore_tier(model, tier)
end

-- Drops the lease of `entry` if `attempt` holds it (any attempt when "").
local function drop_lease(entry, attempt)
  local owner = redis.call("HGET", KEYS[2], entry)
  if not owner or (attempt ~= "" and string.match(owner, "%S+$") ~= attempt) then return false end
  redis.call("ZREM", KEYS[1], entry)
  redis.call("HDEL", KEYS[2], entry)
  return true
end

if op == "enqueue" then
  -- model, tier, tenant, job id, cost, front (0/1), queue timeout ms (0: none), intent ("": none).
  -- With an intent, only whoever removes it pushes: the submitter and the reaper race safely.
  local model, tier, tenant = ARGV[A], ARGV[A + 1], ARGV[A + 2]
  local item = ARGV[A + 3] .. " " .. ARGV[A + 4]
  if ARGV[A + 7] ~= "" and redis.call("ZREM", KEYS[6], ARGV[A + 7]) == 0 then return 0 end
  push(model, tier, tenant, item, ARGV[A + 5] == "1")
  if ARGV[A + 6] ~= "0" then
    redis.call("ZADD", KEYS[4], now_ms() + tonumber(ARGV[A + 6]), deadline_member(model, tier, tenant, item))
  end
  return 1
end

if op == "requeue" then
  -- entry, attempt, model, tier, cost, delay ms, min VRAM bytes: hands a leased job back in one step,
  -- to the head of its tenant's line, or after a backoff (delayed), or to the larger-GPU lane.
  local entry, attempt = ARGV[A], ARGV[A + 1]
  local model, tier, cost, delay, vram = ARGV[A + 2], ARGV[A + 3], ARGV[A + 4], tonumber(ARGV[A + 5]), ARGV[A + 6]
  if not drop_lease(entry, attempt) then return 0 end
  local tenant, job_id = string.match(entry, "^(%S+) (%S+)$")
  local item = job_id .. " " .. cost
  if delay > 0 or vram ~= "0" then
    redis.call("ZADD", KEYS[5], now_ms() + delay, model .. "|" .. tier .. "|" .. tenant .. "|" .. item .. "|" .. vram)
  else
    push(model, tier, tenant, item, true)
  end
  return 1
end

if op == "promote" then
  -- most: retries whose backoff is over go to the head of their tenant's line (or to the lane)
  local due = redis.call("ZRANGEBYSCORE", KEYS[5], "-inf", now_ms(), "LIMIT", 0, tonumber(ARGV[A]))
  for _, member in ipairs(due) do
    redis.call("ZREM", KEYS[5], member)
    local model, tier, tenant, item, vram = string.match(member, "^(.*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$")
    if vram ~= "0" then
      redis.call("ZADD", P .. "lane:" .. model, tonumber(vram), tier .. "|" .. tenant .. "|" .. item)
    else
      push(model, tier, tenant, item, true)
    end
  end
  return #due
end

if op == "reap" then
  -- most, grace ms: leases expired at least the grace ago (heartbeats that queued up while Redis
  -- was away renew theirs first), each put off by the grace so that one replica at a time works
  -- on it; returns entry, owner pairs
  local now = now_ms()
  local grace = tonumber(ARGV[A + 1])
  local due = redis.call("ZRANGEBYSCORE", KEYS[1], "-inf", now - grace, "LIMIT", 0, tonumber(ARGV[A]))
  local out = {}
  for _, entry in ipairs(due) do
    redis.call("ZADD", KEYS[1], now + grace, entry)
    out[#out + 1] = entry
    out[#out + 1] = redis.call("HGET", KEYS[2], entry) or ""
  end
  return out
end

if op == "due_intents" then
  -- most, grace ms: intents past their grace, each put off by the grace so that one replica at a
  -- time finishes it
  local now = now_ms()
  local due = redis.call("ZRANGEBYSCORE", KEYS[6], "-inf", now, "LIMIT", 0, tonumber(ARGV[A]))
  for _, member in ipairs(due) do redis.call("ZADD", KEYS[6], now + tonumber(ARGV[A + 1]), member) end
  return due
end

if op == "bury" then
  -- entry, attempt ("" any): the job ended FAILED after its retries; onto the dead-letter list
  local entry = ARGV[A]
  local owner = redis.call("HGET", KEYS[2], entry)
  if owner and ARGV[A + 1] ~= "" and string.match(owner, "%S+$") ~= ARGV[A + 1] then return 0 end
  drop_lease(entry, "")
  -- The attempt counter stays: a requeued dead letter goes on from the job's last attempt.
  redis.call("ZADD", KEYS[7], now_ms(), entry)
  return 1
end

if op == "unbury" then
  -- entry, intent, due ms from now: off the dead-letter list, with an intent to enqueue it again
  if redis.call("ZREM", KEYS[7], ARGV[A]) == 0 then return 0 end
  redis.call("ZADD", KEYS[6], now_ms() + tonumber(ARGV[A + 2]), ARGV[A + 1])
  return 1
end

if op == "remove" then
  -- model, tier, tenant, job id, cost: out of its line, its backoff or the lane, wherever it waits
  local model, tier, tenant = ARGV[A], ARGV[A + 1], ARGV[A + 2]
  local item = ARGV[A + 3] .. " " .. ARGV[A + 4]
  local removed = take_out(model, tier, tenant, item)
  removed = removed + redis.call("ZREM", P .. "lane:" .. model, tier .. "|" .. tenant .. "|" .. item)
  local prefix = model .. "|" .. tier .. "|" .. tenant .. "|" .. item .. "|"
  for _, member in ipairs(redis.call("ZRANGE", KEYS[5], 0, -1)) do
    if string.sub(member, 1, #prefix) == prefix then removed = removed + redis.call("ZREM", KEYS[5], member) end
  end
  return removed
end

if op == "drop_model" then
  -- model, intent kind, intent due ms from now: takes every waiting job of the model out (its lines,
  -- the lane and backoffs), each with an intent to end it; returns "<tenant> <job id>" of each
  local model, kind, due = ARGV[A], ARGV[A + 1], now_ms() + tonumber(ARGV[A + 2])
  local dropped = {}
  local function note(tenant, item)
    local entry = tenant .. " " .. string.match(item, "^(%S+)")
    redis.call("ZADD", KEYS[6], due, kind .. "|" .. entry)
    dropped[#dropped + 1] = entry
  end
  for _, tier in ipairs(redis.call("ZRANGE", P .. "tiers:" .. model, 0, -1)) do
    local _, tenants = names(model, tier, "")
    for _, tenant in ipairs(redis.call("ZRANGE", tenants, 0, -1)) do
      local _, _, list = names(model, tier, tenant)
      for _, item in ipairs(redis.call("LRANGE", list, 0, -1)) do
        take_out(model, tier, tenant, item)
        note(tenant, item)
      end
    end
  end
  for _, member in ipairs(redis.call("ZRANGE", P .. "lane:" .. model, 0, -1)) do
    local _, tenant, item = string.match(member, "^([^|]*)|([^|]*)|(.*)$")
    note(tenant, item)
  end
  redis.call("DEL", P .. "lane:" .. model)
  local prefix = model .. "|"
  for _, member in ipairs(redis.call("ZRANGE", KEYS[5], 0, -1)) do
    if string.sub(member, 1, #prefix) == prefix then
      local _, _, tenant, item = string.match(member, "^(.*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$")
      redis.call("ZREM", KEYS[5], member)
      note(tenant, item)
    end
  end
  return dropped
end

if op == "waiting" then
  -- model: whether any job of it waits in a line or the lane (backoffs come back to those)
  local model = ARGV[A]
  return (redis.call("EXISTS", P .. "tiers:" .. model) == 1 or redis.call("EXISTS", P .. "lane:" .. model) == 1) and 1 or 0
end

if op == "expire" then
  -- most to expire, intent due ms from now; returns "<tenant> <job id>" of each job taken out
  local due = redis.call("ZRANGEBYSCORE", KEYS[4], "-inf", now_ms(), "LIMIT", 0, tonumber(ARGV[A]))
  local expired = {}
  for _, member in ipairs(due) do
    local model, tier, tenant, item = string.match(member, "^(.*)|([^|]*)|([^|]*)|([^|]*)$")
    if take_out(model, tier, tenant, item) > 0 then
      local entry = tenant .. " " .. string.match(item, "^(%S+)")
      -- Until the job is marked failed (another hash slot), the intent keeps it from being lost.
      redis.call("ZADD", KEYS[6], now_ms() + tonumber(ARGV[A + 1]), "expire|" .. entry)
      expired[#expired + 1] = entry
    end
    redis.call("ZREM", KEYS[4], member)
  end
  return expired
end

if op == "stats" then
  -- model: its queued CU, and the CU per second served over about the last minute
  -- The decayed sum only reaches sum = rate * tau after serving for a while: early in a busy spell
  -- it is divided by the part of tau that has passed (an EWMA's start-up correction), and within
  -- the first BUSY_MIN_MS there is no estimate at all (0), rather than one far too low.
  local _, _, _, vt = names(ARGV[A], "", "")
  local now = now_ms()
  local sum = num(redis.call("HGET", vt, "served")) * math.exp(-math.max(0, now - num(redis.call("HGET", vt, "served_ms"))) / RATE_TAU_MS)
  local busy = now - num(redis.call("HGET", vt, "busy_since"))
  local rate = 0
  if busy >= BUSY_MIN_MS then rate = sum * 1000 / (RATE_TAU_MS * (1 - math.exp(-busy / RATE_TAU_MS))) end
  return {tostring(num(redis.call("HGET", vt, "queued_cu"))), string.format("%.6f", rate)}
end

if op == "claim" then
  -- worker id, lease ms, rotation, free VRAM bytes, n models, models...
  local worker, lease_ms, rotation = ARGV[A], tonumber(ARGV[A + 1]), tonumber(ARGV[A + 2])
  local free_vram, nm = tonumber(ARGV[A + 3]), tonumber(ARGV[A + 4])
  local function lease(tenant, job_id)
    local entry = tenant .. " " .. job_id
    local attempt = redis.call("HINCRBY", KEYS[3], entry, 1)
    local expires = now_ms() + lease_ms
    redis.call("ZADD", KEYS[1], expires, entry)
    redis.call("HSET", KEYS[2], entry, worker .. " " .. attempt)
    return {entry, attempt, expires}
  end
  for i = 0, nm - 1 do
    local model = ARGV[A + 5 + (i + rotation) % nm]
    -- Retries that ran out of memory elsewhere come first, on a worker big enough for them.
    local big = redis.call("ZRANGEBYSCORE", P .. "lane:" .. model, "-inf", free_vram, "LIMIT", 0, 1)
    if #big > 0 then
      redis.call("ZREM", P .. "lane:" .. model, big[1])
      local _, tenant, job_id = string.match(big[1], "^([^|]*)|([^|]*)|(%S+) ")
      return lease(tenant, job_id)
    end
    local tiers = P .. "tiers:" .. model
    for _ = 1, 16 do  -- a few repairs at most, should a set point at an emptied line
      local top = redis.call("ZRANGE", tiers, 0, 0, "WITHSCORES")
      if #top == 0 then break end
      local tier, tier_finish = top[1], tonumber(top[2])
      local _, tenants, _, vt = names(model, tier, "")
      local first = redis.call("ZRANGE", tenants, 0, 0, "WITHSCORES")
      if #first == 0 then
        redis.call("ZREM", tiers, tier)
      else
        local tenant, tenant_finish = first[1], tonumber(first[2])
        local _, _, list = names(model, tier, tenant)
        local item = redis.call("LPOP", list)
        if not item then
          rescore_tenant(model, tier, tenant)
          rescore_tier(model, tier)
        else
          local job_id, cost = string.match(item, "^(%S+) (%S+)$")
          cost = tonumber(cost)
          local id = tier .. ":" .. tenant
          redis.call("HSET", vt, "F:" .. tier, tier_finish, "S:" .. tier, tier_finish,
            "V", tier_finish - cost / (weights[tier] or 1),
            "F:" .. id, tenant_finish, "S:" .. id, tenant_finish, "V:" .. tier, tenant_finish - cost)
          redis.call("HINCRBY", vt, "queued_cu", -cost)
          served(vt, now_ms(), cost)
          rescore_tenant(model, tier, tenant)
          rescore_tier(model, tier)
          redis.call("ZREM", KEYS[4], deadline_member(model, tier, tenant, item))
          return lease(tenant, job_id)
        end
      end
    end
  end
  return false
end

return redis.error_reply("unknown op " .. tostring(op))
