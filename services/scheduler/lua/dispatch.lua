-- Fair dispatch, all in the {sched} hash slot (keys built here share the prefix's tag).
-- Per model m, weighted fair queuing by virtual finish time on two levels, in compute units (CU):
--   <P>tiers:<m>              zset  active tiers, scored by the finish tag of their next job
--   <P>tenants:<m>:<tier>     zset  active tenants of a tier, scored the same way within the tier
--   <P>q:<m>:<tier>:<tenant>  list  the tenant's FIFO of "<job id> <cost>"
--   <P>vt:<m>                 hash  F:/S:<tier>, F:/S:<tier>:<tenant> (last finish, current start
--                                   tags) and V, V:<tier>
--                                   (virtual time: the start tag of the last job served there);
--                                   queued_cu; served/served_ms (CU served, decayed over RATE_TAU_MS)
-- A tier's next job finishes at max(F_tier, V) + cost / weight; a tenant's at max(F_tenant,
-- V_tier) + cost. Serving the smallest finish tag shares CU by weight across tiers and equally
-- across a tier's tenants; starting from V means idling banks no credit and a newcomer goes
-- within one round. Whichever replica runs it, a claim is one step.
-- KEYS: leases, lease_owners, attempts, deadlines
-- ARGV[1] op (enqueue | claim | remove | expire), [2] key prefix, [3] n tier weights,
-- [4 .. 3+2n] tier/weight pairs, then the op's arguments
local P = ARGV[2]
local weights = {}
local nw = tonumber(ARGV[3])
for i = 4, 3 + 2 * nw, 2 do weights[ARGV[i]] = tonumber(ARGV[i + 1]) end
local A = 4 + 2 * nw  -- the op's first argument

local RATE_TAU_MS = 60000

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

if op == "enqueue" then
  -- model, tier, tenant, job id, cost, front (0/1), queue timeout ms (0: none)
  local model, tier, tenant = ARGV[A], ARGV[A + 1], ARGV[A + 2]
  local item = ARGV[A + 3] .. " " .. ARGV[A + 4]
  local _, _, list, vt = names(model, tier, tenant)
  if ARGV[A + 5] == "1" then redis.call("LPUSH", list, item) else redis.call("RPUSH", list, item) end
  redis.call("HINCRBY", vt, "queued_cu", tonumber(ARGV[A + 4]))
  rescore_tenant(model, tier, tenant)
  rescore_tier(model, tier)
  if ARGV[A + 6] ~= "0" then
    redis.call("ZADD", KEYS[4], now_ms() + tonumber(ARGV[A + 6]), deadline_member(model, tier, tenant, item))
  end
  return 1
end

if op == "remove" then
  -- model, tier, tenant, job id, cost
  return take_out(ARGV[A], ARGV[A + 1], ARGV[A + 2], ARGV[A + 3] .. " " .. ARGV[A + 4])
end

if op == "expire" then
  -- most to expire; returns "<tenant> <job id>" of each job taken out of its queue
  local due = redis.call("ZRANGEBYSCORE", KEYS[4], "-inf", now_ms(), "LIMIT", 0, tonumber(ARGV[A]))
  local expired = {}
  for _, member in ipairs(due) do
    local model, tier, tenant, item = string.match(member, "^(.*)|([^|]*)|([^|]*)|([^|]*)$")
    if take_out(model, tier, tenant, item) > 0 then
      expired[#expired + 1] = tenant .. " " .. string.match(item, "^(%S+)")
    end
    redis.call("ZREM", KEYS[4], member)
  end
  return expired
end

if op == "stats" then
  -- model: its queued CU, and the CU per second served over about the last minute
  local _, _, _, vt = names(ARGV[A], "", "")
  local now = now_ms()
  local sum = num(redis.call("HGET", vt, "served")) * math.exp(-math.max(0, now - num(redis.call("HGET", vt, "served_ms"))) / RATE_TAU_MS)
  return {tostring(num(redis.call("HGET", vt, "queued_cu"))), string.format("%.6f", sum * 1000 / RATE_TAU_MS)}
end

if op == "claim" then
  -- worker id, lease ms, rotation, n models, models...
  local worker, lease_ms, rotation, nm = ARGV[A], tonumber(ARGV[A + 1]), tonumber(ARGV[A + 2]), tonumber(ARGV[A + 3])
  for i = 0, nm - 1 do
    local model = ARGV[A + 4 + (i + rotation) % nm]
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
          local entry = tenant .. " " .. job_id
          local attempt = redis.call("HINCRBY", KEYS[3], entry, 1)
          local expires = now_ms() + lease_ms
          redis.call("ZADD", KEYS[1], expires, entry)
          redis.call("HSET", KEYS[2], entry, worker .. " " .. attempt)
          return {entry, attempt, expires}
        end
      end
    end
  end
  return false
end

return redis.error_reply("unknown op " .. tostring(op))
