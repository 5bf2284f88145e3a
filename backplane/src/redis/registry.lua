-- The node registry: every node's last heartbeat on Redis' clock (one clock for every node, so
-- their own clocks' skew does not matter).
--
-- KEYS[1]  registry: sorted set node id -> last heartbeat (ms)
-- ARGV[1]  node id to stamp now, or '' to only read
-- ARGV[2]  a node whose heartbeat is older than this (ms) is dead
-- Returns {{live node, ...}, {dead node, ...}}.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
end
local cutoff = now - tonumber(ARGV[2])
return {
  redis.call('ZRANGEBYSCORE', KEYS[1], cutoff, '+inf'),
  redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. cutoff)
}
