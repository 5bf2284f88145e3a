-- Read a page of a channel's history together with its epoch and top offset, atomically.
-- Creates nothing: a channel never published to (or whose meta expired) reads as epoch '' and
-- top 0; its first publication creates its epoch.
--
-- KEYS[1]  meta hash   {e = epoch, t = top offset, g = tag of the top publication}
-- KEYS[2]  history stream
-- ARGV[1]  since: return entries with offset > since
-- ARGV[2]  limit (0: only epoch, top and the tag at since)
-- ARGV[3]  history max age (ms)
-- Returns {epoch, top, {{id, {field, value, ...}}, ...}, since_tag, top_tag}: since_tag is the
-- tag of the publication at offset `since` (the meta's when since == top, else its history
-- entry's, else the `p` field of the entry after it), or '' when the channel no longer knows it;
-- top_tag is the tag of the top publication ('' if none).

local meta = redis.call('HMGET', KEYS[1], 'e', 't', 'g')
local epoch = meta[1] or ''
local top = tonumber(meta[2] or '0')
local top_tag = meta[3] or ''
local since = tonumber(ARGV[1])
local entries = {}
local limit = tonumber(ARGV[2])
if limit > 0 then
  trim_by_age(KEYS[2], now_ms() - tonumber(ARGV[3]))
  entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[1] .. '-0', '+', 'COUNT', limit)
end
local since_tag = ''
if since > 0 and since == top then
  since_tag = top_tag
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
return {epoch, top, entries, since_tag, top_tag}
