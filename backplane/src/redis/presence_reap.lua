-- Remove the members a dead node held in one channel and announce a leave for each that was
-- there and whose namespace announces. Reading and deleting happen in one step, so of several
-- survivors reaping the same node at once, exactly one announces each leave.
--
-- KEYS[1]  the dead node's members of the channel: hash client id -> "<a><user JSON>\n<member JSON>"
-- KEYS[2]  the nodes with members in the channel: set
-- KEYS[3]  the channel's meta hash {e = epoch, t = top offset} (read only)
-- KEYS[4]  the dead node's user counts in the channel: hash user JSON -> members
-- ARGV[1]  the dead node's id
-- ARGV[2]  the channel's pub/sub channel
-- ARGV[3]  "1": SPUBLISH (Redis Cluster), "0": PUBLISH
-- ARGV[4]  channel name (goes into the messages)
-- Returns how many members were removed.

local values = redis.call('HVALS', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[4])
if #values == 0 then
  return 0
end
redis.call('DEL', KEYS[1])
local announce = presence_announcer(KEYS[3], ARGV[2], ARGV[3], ARGV[4])
for _, value in ipairs(values) do
  if announces(value) then announce('L', value) end
end
return #values
