-- Shared prelude of the presence scripts: announcing a join or leave on the channel's pub/sub
-- channel, placed after the channel's top publication as read in the same script (so it keeps its
-- place among the publications: the publish script cannot run in between).
--
-- Message: "J <after> <epoch or -> <channel>\n<member JSON>" for a join, "L ..." for a leave;
-- publication messages start with a digit, so the link tells them apart by the first byte.
-- A member's stored value is "<a><user JSON>\n<member JSON>" (see keys.rs).

-- meta: the channel's meta hash; pubsub: its pub/sub channel; sharded: "1" for SPUBLISH;
-- channel: the name that goes into the message.
local function presence_announcer(meta, pubsub, sharded, channel)
  local position = redis.call('HMGET', meta, 'e', 't')
  local head = ' ' .. (position[2] or '0') .. ' ' .. (position[1] or '-') .. ' ' .. channel .. '\n'
  local command = 'PUBLISH'
  if sharded == '1' then command = 'SPUBLISH' end
  return function(kind, value)
    local member = string.sub(value, string.find(value, '\n', 1, true) + 1)
    redis.call(command, pubsub, kind .. head .. member)
  end
end

-- Whether a stored member's namespace announces joins and leaves.
local function announces(value)
  return string.sub(value, 1, 1) == '1'
end

-- A stored member's user, as JSON ('null' for an anonymous member).
local function user_of(value)
  return string.sub(value, 2, string.find(value, '\n', 1, true) - 1)
end

-- Counts a member of `user` in (by = 1) or out (by = -1) of the node's user counts (a hash
-- user JSON -> members, next to the node's members and changed in the same step, so a presence
-- read counts distinct users without reading every member). Anonymous members are not counted.
local function count_user(users, user, by)
  if user == 'null' then return end
  if redis.call('HINCRBY', users, user, by) <= 0 then redis.call('HDEL', users, user) end
end
