-- Shared prelude of the channel scripts: per-entry age trimming of a history stream.
-- Stream entry ids are "<offset>-0"; every entry carries its publish time in field "t" (ms), so
-- age is per entry, not per key. Entries are appended in time order, so expired ones form a
-- prefix; each call removes at most 16 batches of 64 to keep the script short.
local function entry_time(entry)
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 't' then return tonumber(fields[i + 1]) end
  end
  return nil
end

local function trim_by_age(stream, cutoff_ms)
  -- Common case first: the oldest entry is still fresh, so nothing has expired.
  local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if #oldest == 0 then return end
  local t = entry_time(oldest[1])
  if t == nil or t >= cutoff_ms then return end
  for _ = 1, 16 do
    local batch = redis.call('XRANGE', stream, '-', '+', 'COUNT', 64)
    if #batch == 0 then return end
    local keep_from = nil
    for _, entry in ipairs(batch) do
      local t = entry_time(entry)
      if t ~= nil and t >= cutoff_ms then
        keep_from = entry[1]
        break
      end
    end
    if keep_from ~= nil then
      redis.call('XTRIM', stream, 'MINID', keep_from)
      return
    end
    -- The whole batch is expired: drop it and look at the next one.
    local last = batch[#batch][1]
    local offset = tonumber(string.match(last, '^(%d+)-'))
    redis.call('XTRIM', stream, 'MINID', (offset + 1) .. '-0')
  end
end

local function now_micros()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function now_ms()
  return math.floor(now_micros() / 1000)
end
