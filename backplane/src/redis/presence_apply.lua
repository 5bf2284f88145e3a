-- Apply one node's presence changes to one channel, in the order the node made them, announcing
-- each join and leave in the same step.
--
-- KEYS[1]  the node's members of the channel: hash client id -> "<a><user JSON>\n<member JSON>"
-- KEYS[2]  the nodes with members in the channel: set
-- KEYS[3]  the channel's meta hash {e = epoch, t = top offset} (read only)
-- KEYS[4]  the node's user counts in the channel: hash user JSON -> members
-- ARGV[1]  node id
-- ARGV[2]  the channel's pub/sub channel
-- ARGV[3]  "1": SPUBLISH (Redis Cluster), "0": PUBLISH
-- ARGV[4]  channel name (goes into the messages)
-- ARGV[5]  expiry of the two presence keys (ms): a backstop should every node be gone; live
--          nodes re-assert their members well within it
-- ARGV[6..] changes, three arguments each: op, client id, value
--   "j"  join: set the member (value); announced if new and its namespace announces (<a> = 1)
--   "r"  refresh: set the member (value), never announced
--   "l"  leave: remove the member; announced if it was there and value is "1"
-- Returns how many members the node has in the channel now.

local announce = presence_announcer(KEYS[3], ARGV[2], ARGV[3], ARGV[4])
for i = 6, #ARGV, 3 do
  local op, client, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local was = redis.call('HGET', KEYS[1], client)
  if op == 'l' then
    if was then
      redis.call('HDEL', KEYS[1], client)
      count_user(KEYS[4], user_of(was), -1)
      if value == '1' then announce('L', was) end
    end
  else
    redis.call('HSET', KEYS[1], client, value)
    if not was then
      count_user(KEYS[4], user_of(value), 1)
      if op == 'j' and announces(value) then announce('J', value) end
    elseif user_of(was) ~= user_of(value) then
      count_user(KEYS[4], user_of(was), -1)
      count_user(KEYS[4], user_of(value), 1)
    end
  end
end
local count = redis.call('HLEN', KEYS[1])
if count == 0 then
  redis.call('SREM', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[4])
else
  redis.call('SADD', KEYS[2], ARGV[1])
  -- The members and their user counts expire at the same instant (time stands still in a script).
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  redis.call('PEXPIRE', KEYS[4], ARGV[5])
end
return count
