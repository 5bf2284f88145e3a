-- Read a page of a channel's history together with its epoch and top offset, atomically.
--
-- KEYS[1]  meta hash   {e = epoch, t = top offset, g = tag of the top publication}
-- KEYS[2]  history stream
-- ARGV[1]  since: return entries with offset > since
-- ARGV[2]  limit (0: only epoch, top and the tag at since)
-- ARGV[3]  epoch to record if the channel has none, so every node and reader agrees on it
-- ARGV[4]  history max age (ms)
-- ARGV[5]  expiry of the meta hash (ms), refreshed when the meta is created
-- Returns {epoch, top, {{id, {field, value, ...}}, ...}, since_tag}: since_tag is the tag of the
-- publication at offset `since` (the meta's when since == top, else its history entry's, else the
-- `p` field of the entry after it), or '' when the channel no longer knows it.

local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[3]
  redis.call('HSET', KEYS[1], 'e', epoch)
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
local top = tonumber(redis.call('HGET', KEYS[1], 't') or '0')
local since = tonumber(ARGV[1])
local entries = {}
local limit = tonumber(ARGV[2])
if limit > 0 then
  trim_by_age(KEYS[2], now_ms() - tonumber(ARGV[4]))
  entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[1] .. '-0', '+', 'COUNT', limit)
end
local since_tag = ''
if since > 0 and since == top then
  since_tag = redis.call('HGET', KEYS[1], 'g') or ''
elseif since > 0 and since < top then
  -- The entry at since carries its tag; once trimmed, the entry after it still names it.
  local at = redis.call('XRANGE', KEYS[2], ARGV[1] .. '-0', (since + 1) .. '-0')
  for _, entry in ipairs(at) do
    local want = 'g'
    if entry[1] ~= ARGV[1] .. '-0' then want = 'p' end
    local fields = entry[2]
    for i = 1, #fields, 2 do
      if fields[i] == want and since_tag == '' then since_tag = fields[i + 1] end
    end
    if since_tag ~= '' then break end
  end
end
return {epoch, top, entries, since_tag}
