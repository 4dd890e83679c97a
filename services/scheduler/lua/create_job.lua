-- Creates a job, its first event and its index entry in one step, honouring request_id.
-- KEYS: job, events, tenant_jobs, request (may be a dummy when no request_id)
-- ARGV: job_id, request_ttl_s ("0" = no request_id), fingerprint, field/value pairs...
if ARGV[2] ~= "0" then
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
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call("HSET", KEYS[1], "create_ms", now, unpack(ARGV, 4))
redis.call("ZADD", KEYS[3], 0, ARGV[1])
if ARGV[2] ~= "0" then
  redis.call("HSET", KEYS[4], "job_id", ARGV[1], "fingerprint", ARGV[3])
  redis.call("EXPIRE", KEYS[4], tonumber(ARGV[2]))
end
redis.call("XADD", KEYS[2], "*", unpack(redis.call("HGETALL", KEYS[1])))
return {"CREATED", ARGV[1]}
