// The Socket.IO peer: one node of a Socket.IO 4 cluster (the driver starts three), joined through
// @socket.io/redis-streams-adapter, with connection-state recovery.
//
//   node socketio-server.mjs --port P --redis-port R
//
// /socket.io/          Engine.IO v4, WebSocket transport only. A client subscribes by connecting
//                      with auth {"channel": C} and is joined to room C, unless its session was
//                      recovered (then recovery restores its rooms and replays what it missed).
// POST /publish        {"channel": C, "data": D} -> offset = ++counter[C] in this process (the
//                      driver publishes through one node only), io.to(C).emit("pub",
//                      {channel, offset, data}); replies {"channel":C,"offset":N}.
//
// Sessions are persisted when a socket connects, not only when it disconnects: stock Socket.IO
// persists a session in the disconnect handler of the node that held it, which a node killed with
// SIGKILL never runs, and the storm scenario kills nodes.

import http from "node:http";
import { parseArgs } from "node:util";
import { createAdapter } from "@socket.io/redis-streams-adapter";
import { createClient } from "redis";
import { Server } from "socket.io";
import { Counters, MALFORMED, readPublish, replyJson } from "./publish.mjs";

const MAX_DISCONNECTION_MS = 2 * 60 * 1000;

const { values } = parseArgs({
  options: { port: { type: "string" }, "redis-port": { type: "string" } },
});
const port = Number(values.port ?? 3000);
const redisPort = Number(values["redis-port"] ?? 6379);

// The adapter's duplicates of this client inherit its name: see streamReaderBlocked.
const clientName = `sio-peer-${process.pid}`;
const redis = createClient({ url: `redis://127.0.0.1:${redisPort}`, name: clientName });
let listening = false;
redis.on("error", (e) => {
  console.error(`redis: ${e.message}`);
  // Before listening, fail fast (the client would retry forever); after, keep reconnecting.
  if (!listening) process.exit(1);
});
await redis.connect();

const counters = new Counters();

const server = http.createServer(async (req, res) => {
  // Engine.IO takes /socket.io/ requests before this handler sees them.
  if (req.method !== "POST" || req.url !== "/publish") {
    return replyJson(res, 404, { error: "not found" });
  }
  const body = await readPublish(req);
  if (!body) return replyJson(res, 400, { error: MALFORMED });
  const offset = counters.next(body.channel);
  io.to(body.channel).emit("pub", { channel: body.channel, offset, data: body.data });
  replyJson(res, 200, { channel: body.channel, offset });
});

const io = new Server(server, {
  transports: ["websocket"],
  serveClient: false,
  adapter: createAdapter(redis),
  connectionStateRecovery: {
    maxDisconnectionDuration: MAX_DISCONNECTION_MS,
    skipMiddlewares: true,
  },
});

io.on("connection", (socket) => {
  if (!socket.recovered) {
    const channel = socket.handshake.auth?.channel;
    if (typeof channel !== "string" || channel === "") {
      socket.disconnect(true);
      return;
    }
    socket.join(channel);
  }
  persistSession(socket);
});

// A persisted session lives maxDisconnectionDuration; keep every live one fresh.
setInterval(() => {
  for (const socket of io.of("/").sockets.values()) persistSession(socket);
}, MAX_DISCONNECTION_MS / 2).unref();

/** Stores what recovery needs (the adapter's own persistSession, as on a disconnect). */
function persistSession(socket) {
  socket.nsp.adapter.persistSession({
    sid: socket.id,
    pid: socket.pid,
    rooms: [...socket.rooms],
    data: socket.data,
  });
}

/**
 * Whether the adapter's stream reader is blocked in XREAD. It reads from "$" (entries added after
 * its first XREAD), so a node that took subscribers before that would miss the first broadcasts.
 */
async function streamReaderBlocked() {
  const clients = await redis.sendCommand(["CLIENT", "LIST", "TYPE", "normal"]);
  return clients.split("\n").some((line) =>
    line.includes(` name=${clientName} `) && line.includes(" cmd=xread"));
}

while (!(await streamReaderBlocked())) {
  await new Promise((resolve) => setTimeout(resolve, 10));
}
// Idle keep-alive connections outlive the HTTP client's pool timeout (reqwest: 90 s), so the
// publisher never sends on a connection the server is closing.
server.keepAliveTimeout = 120_000;
server.listen(port, "127.0.0.1", () => {
  listening = true;
  console.log(`listening on ${port}`);
});
