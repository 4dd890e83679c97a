-- Drops a lease if the given attempt still holds it. With ARGV[3] = "1" the job is finished, so
-- its attempt counter goes too.
-- KEYS: leases, lease_owners, attempts
-- ARGV: entry, attempt, finished
local owner = redis.call("HGET", KEYS[2], ARGV[1])
if not owner or string.match(owner, "%S+$") ~= ARGV[2] then return 0 end
redis.call("ZREM", KEYS[1], ARGV[1])
redis.call("HDEL", KEYS[2], ARGV[1])
if ARGV[3] == "1" then redis.call("HDEL", KEYS[3], ARGV[1]) end
return 1
