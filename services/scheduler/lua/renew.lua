-- Extends the leases that this worker still holds: a heartbeat keeps a job's lease only while the
-- attempt it names is the current one. KEYS: leases, lease_owners
-- ARGV: worker_id, lease_ms, then "<entry>|<attempt>" for each job it holds
-- Returns the "<entry>|<attempt>" items whose lease is gone (re-leased, reaped or ended).
local t = redis.call("TIME")
local expires = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
local lost = {}
for i = 3, #ARGV do
  local sep = string.find(ARGV[i], "|", 1, true)
  local entry = string.sub(ARGV[i], 1, sep - 1)
  if redis.call("HGET", KEYS[2], entry) == ARGV[1] .. " " .. string.sub(ARGV[i], sep + 1) then
    redis.call("ZADD", KEYS[1], "XX", expires, entry)
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
