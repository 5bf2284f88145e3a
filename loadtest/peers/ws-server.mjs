// The `ws` peer: one Node process, the `ws` library on Node's http server.
//
//   node ws-server.mjs --port P
//
// GET /ws?channel=C   WebSocket subscribed to C at once.
// POST /publish       {"channel": C, "data": D} -> offset = ++counter[C]; the frame
//                     {"channel":C,"offset":N,"data":D} is encoded once into one Buffer and that
//                     Buffer is sent to every subscriber of C; replies {"channel":C,"offset":N}.
// GET /echo           WebSocket echoing every message with its opcode.
//
// Backpressure: `ws` queues without bound, so a subscriber whose unsent bytes (bufferedAmount)
// exceed MAX_BUFFERED is terminated instead of being sent more: the gateway's slow-consumer rule
// (1 MiB outbound queue, then close).

import http from "node:http";
import { parseArgs } from "node:util";
import { WebSocketServer } from "ws";
import { Counters, MALFORMED, publicationFrame, readPublish, replyJson } from "./publish.mjs";

const MAX_BUFFERED = 1024 * 1024;

const { values } = parseArgs({ options: { port: { type: "string" } } });
const port = Number(values.port ?? 8080);

/** Channel name -> Set of subscribed sockets. */
const subscribers = new Map();
const counters = new Counters();

const wss = new WebSocketServer({ noServer: true, maxPayload: 16 * 1024 * 1024 });

const server = http.createServer(async (req, res) => {
  if (req.method !== "POST" || req.url !== "/publish") {
    return replyJson(res, 404, { error: "not found" });
  }
  const body = await readPublish(req);
  if (!body) return replyJson(res, 400, { error: MALFORMED });
  const offset = counters.next(body.channel);
  const frame = Buffer.from(publicationFrame(body.channel, offset, body.data));
  const sockets = subscribers.get(body.channel);
  if (sockets) {
    for (const ws of sockets) {
      if (ws.bufferedAmount > MAX_BUFFERED) {
        ws.terminate();
        continue;
      }
      ws.send(frame, { binary: false });
    }
  }
  replyJson(res, 200, { channel: body.channel, offset });
});

server.on("upgrade", (req, socket, head) => {
  const url = new URL(req.url, "http://peer");
  if (url.pathname === "/ws") {
    const channel = url.searchParams.get("channel");
    if (!channel) return socket.destroy();
    wss.handleUpgrade(req, socket, head, (ws) => subscribe(ws, channel));
  } else if (url.pathname === "/echo") {
    wss.handleUpgrade(req, socket, head, (ws) => {
      ws.on("message", (data, isBinary) => ws.send(data, { binary: isBinary }));
    });
  } else {
    socket.destroy();
  }
});

function subscribe(ws, channel) {
  let sockets = subscribers.get(channel);
  if (!sockets) subscribers.set(channel, (sockets = new Set()));
  sockets.add(ws);
  ws.on("close", () => {
    sockets.delete(ws);
    if (sockets.size === 0 && subscribers.get(channel) === sockets) subscribers.delete(channel);
  });
  // Nothing is expected from subscribers; errors end in "close".
  ws.on("error", () => {});
}

// Idle keep-alive connections outlive the HTTP client's pool timeout (reqwest: 90 s), so the
// publisher never sends on a connection the server is closing.
server.keepAliveTimeout = 120_000;
server.listen(port, "127.0.0.1", () => console.log(`listening on ${port}`));
