-- Read a channel's presence across every node at one instant.
--
-- KEYS[1]  the nodes with members in the channel: set
-- ARGV[1]  the members hashes' key up to the node id ("{prefix}:{<tag>}:pn:"), same slot
-- ARGV[2]  the user counts hashes' key up to the node id ("{prefix}:{<tag>}:pu:"), same slot
-- ARGV[3]  "1": return every member's JSON too, "0": counts only
-- Returns {members, distinct users (anonymous members count as none), {member JSON, ...}}.
-- Counts read no member: HLEN per node, and the users are the node's user counts' fields (one
-- node: their number; several: their union).

local nodes = redis.call('SMEMBERS', KEYS[1])
local count, users, members = 0, 0, {}
for _, node in ipairs(nodes) do
  count = count + redis.call('HLEN', ARGV[1] .. node)
end
if #nodes == 1 then
  users = redis.call('HLEN', ARGV[2] .. nodes[1])
else
  local seen = {}
  for _, node in ipairs(nodes) do
    for _, user in ipairs(redis.call('HKEYS', ARGV[2] .. node)) do
      if not seen[user] then
        seen[user] = true
        users = users + 1
      end
    end
  end
end
if ARGV[3] == '1' then
  for _, node in ipairs(nodes) do
    for _, value in ipairs(redis.call('HVALS', ARGV[1] .. node)) do
      members[#members + 1] = string.sub(value, string.find(value, '\n', 1, true) + 1)
    end
  end
end
return {count, users, members}
