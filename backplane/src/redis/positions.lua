-- The pub/sub link's position read after SUBSCRIBE, for a batch of channels in one round trip.
-- Creates nothing: a channel nobody published to has no epoch yet (its first one is delivered
-- from its start).
--
-- KEYS[2i-1]  meta hash of the i-th channel   {e = epoch, t = top offset}
-- KEYS[2i]    history stream of the i-th channel
-- Returns {{epoch or nil, top, publish time (ms) of the top entry or 0, tag of the top
-- publication or ''}, ...}.

local positions = {}
for i = 1, #KEYS, 2 do
  local meta = redis.call('HMGET', KEYS[i], 'e', 't', 'g')
  local top = tonumber(meta[2] or '0')
  local ms = 0
  if top > 0 then
    local entry = redis.call('XRANGE', KEYS[i + 1], top .. '-0', top .. '-0')
    if #entry > 0 then ms = entry_time(entry[1]) or 0 end
  end
  positions[#positions + 1] = {meta[1] or false, top, ms, meta[3] or ''}
end
return positions
