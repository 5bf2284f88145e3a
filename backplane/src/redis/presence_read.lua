-- Read a channel's presence across every node at one instant.
--
-- KEYS[1]  the nodes with members in the channel: set
-- ARGV[1]  the members hashes' key up to the node id ("{prefix}:{<tag>}:pn:"), same slot
-- ARGV[2]  "1": return every member's JSON too, "0": counts only
-- Returns {members, distinct users (anonymous members count as none), {member JSON, ...}}.

local count, users, seen, members = 0, 0, {}, {}
local list = ARGV[2] == '1'
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  for _, value in ipairs(redis.call('HVALS', ARGV[1] .. node)) do
    count = count + 1
    local newline = string.find(value, '\n', 1, true)
    local user = string.sub(value, 2, newline - 1)
    if user ~= 'null' and not seen[user] then
      seen[user] = true
      users = users + 1
    end
    if list then members[#members + 1] = string.sub(value, newline + 1) end
  end
end
return {count, users, members}
