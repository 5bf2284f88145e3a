-- Rotate a channel's epoch after Redis lost acknowledged writes but kept the epoch (a restart
-- from an RDB snapshot, a crash with appendfsync everysec, a failover to a replica that lagged):
-- the offsets after the loss are being reused, so (epoch, offset) would name two publications.
-- Compare-and-set: only if the epoch is still the one the caller saw and the loss still shows,
-- so of all the nodes that notice it, exactly one rotates. History and top stay; the retained
-- entries belong to the new epoch from now on.
--
-- KEYS[1]  meta hash   {e = epoch, t = top offset}
-- KEYS[2]  history stream
-- ARGV[1]  epoch the caller delivered under
-- ARGV[2]  offset the caller delivered last
-- ARGV[3]  publish time (ms) of that publication as delivered, 0 if unknown
-- ARGV[4]  new epoch
-- ARGV[5]  tag of that publication as delivered, '' if unknown
-- Returns {1 if this call rotated else 0, the channel's epoch now ('' if it has none)}.

local epoch = redis.call('HGET', KEYS[1], 'e')
if epoch ~= ARGV[1] then
  return {0, epoch or ''}
end
local top = tonumber(redis.call('HGET', KEYS[1], 't') or '0')
local delivered = tonumber(ARGV[2])
local lost = top < delivered
if not lost then
  -- The same test as the link's: another publish time or another tag at the delivered offset.
  local entry = redis.call('XRANGE', KEYS[2], delivered .. '-0', delivered .. '-0')
  if #entry > 0 then
    local ms = entry_time(entry[1]) or 0
    local tag = ''
    local fields = entry[1][2]
    for i = 1, #fields, 2 do
      if fields[i] == 'g' then tag = fields[i + 1] end
    end
    local seen_ms = tonumber(ARGV[3])
    lost = (seen_ms > 0 and ms > 0 and ms ~= seen_ms)
      or (ARGV[5] ~= '' and tag ~= '' and tag ~= ARGV[5])
  end
end
if not lost then
  return {0, epoch}
end
redis.call('HSET', KEYS[1], 'e', ARGV[4])
return {1, ARGV[4]}
