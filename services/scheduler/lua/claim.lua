-- Hands the next queued job of the given models to a worker under a new lease and attempt.
-- KEYS: leases, lease_owners, attempts, queue...
-- ARGV: worker_id, lease_ms, rotation (which queue to look at first)
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nqueues = #KEYS - 3
for i = 0, nqueues - 1 do
  local q = KEYS[4 + (i + tonumber(ARGV[3])) % nqueues]
  local entry = redis.call("LPOP", q)
  if entry then
    local attempt = redis.call("HINCRBY", KEYS[3], entry, 1)
    local expires = now + tonumber(ARGV[2])
    redis.call("ZADD", KEYS[1], expires, entry)
    redis.call("HSET", KEYS[2], entry, ARGV[1] .. " " .. attempt)
    return {entry, attempt, expires}
  end
end
return false
