-- Publish one message to a channel, atomically: epoch, offset, history append, trims, expiry and
-- fan-out happen together or not at all.
--
-- KEYS[1]  meta hash   {e = epoch, t = top offset, g = tag of the top publication,
--                       v = version of the last versioned publish stored}
-- KEYS[2]  history stream, entry id "<offset>-0", fields d = data, t = publish time (ms), g = tag,
--          p = tag of the previous publication (so the tag at a trimmed offset is still known)
-- KEYS[3]  idempotency key (used only when ARGV[9] > 0), already in its scope (client or server)
-- ARGV[1]  data (compact JSON)
-- ARGV[2]  epoch to use if the channel has none (new channel, or its history was lost)
-- ARGV[3]  history max count
-- ARGV[4]  history max age (ms)
-- ARGV[5]  expiry of the history stream (ms)
-- ARGV[6]  expiry of the meta hash (ms)
-- ARGV[7]  pub/sub channel
-- ARGV[8]  "1": SPUBLISH (Redis Cluster sharded pub/sub), "0": PUBLISH
-- ARGV[9]  idempotency window (ms), 0 for none
-- ARGV[10] channel name (goes into the pub/sub message)
-- ARGV[11] publication tag, 8 lowercase hex digits (random, drawn by the caller)
-- ARGV[12] version: a decimal u64 without leading zeros, '' for an unversioned publish
-- Returns {offset, epoch, tag, status}: status 0 published, 1 the idempotency key's first
-- publication (same data; nothing stored), 2 conflict (the key's first publication had other
-- data; nothing stored, offset/epoch/tag are the first publication's), 3 suppressed (the version
-- is not greater than the channel's last one; nothing stored, offset/epoch/tag are the top's).
-- Pub/sub message: "<offset> <epoch> <publish time, us> <tag> <channel>\n<data>" (channel names
-- have no whitespace; the channel stays last).
-- Idempotency record: "<offset> <epoch> <tag> <sha1 of data>".

local idem_ms = tonumber(ARGV[9])
if idem_ms > 0 then
  local previous = redis.call('GET', KEYS[3])
  if previous then
    local offset, epoch, tag, digest = string.match(previous, '^(%d+) (%S+) (%S+) (%S+)$')
    if offset then
      local status = 1
      if digest ~= redis.sha1hex(ARGV[1]) then status = 2 end
      return {tonumber(offset), epoch, tag, status}
    end
  end
end

-- Versions are compared as decimal strings: Lua numbers are doubles, exact only up to 2^53.
local version = ARGV[12] or ''
if version ~= '' then
  local last = redis.call('HGET', KEYS[1], 'v')
  if last and (#version < #last or (#version == #last and version <= last)) then
    local top = redis.call('HMGET', KEYS[1], 'e', 't', 'g')
    return {tonumber(top[2]), top[1], top[3] or '', 3}
  end
  redis.call('HSET', KEYS[1], 'v', version)
end

local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[2]
  redis.call('HSET', KEYS[1], 'e', epoch)
end
local tag = ARGV[11]
local prev_tag = redis.call('HGET', KEYS[1], 'g') or ''
local offset = redis.call('HINCRBY', KEYS[1], 't', 1)
redis.call('HSET', KEYS[1], 'g', tag)
local now_us = now_micros()
local now = math.floor(now_us / 1000)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], offset .. '-0', 'd', ARGV[1], 't', now, 'g', tag,
  'p', prev_tag)
trim_by_age(KEYS[2], now - tonumber(ARGV[4]))
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])

local message = offset .. ' ' .. epoch .. ' ' .. string.format('%.0f', now_us) .. ' ' .. tag
  .. ' ' .. ARGV[10] .. '\n' .. ARGV[1]
if ARGV[8] == '1' then
  redis.call('SPUBLISH', ARGV[7], message)
else
  redis.call('PUBLISH', ARGV[7], message)
end
if idem_ms > 0 then
  redis.call('SET', KEYS[3], offset .. ' ' .. epoch .. ' ' .. tag .. ' ' .. redis.sha1hex(ARGV[1]),
    'PX', idem_ms)
end
return {offset, epoch, tag, 0}
