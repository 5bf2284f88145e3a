// The uWebSockets peer (the physical-limit proxy): one Node process, uWS.js's native binary
// through @trufflesuite/uws-js-unofficial.
//
//   node uws-server.mjs --port P
//
// GET /ws?channel=C   WebSocket subscribed to topic C at once.
// POST /publish       {"channel": C, "data": D} -> offset = ++counter[C]; the frame
//                     {"channel":C,"offset":N,"data":D} is built once and handed to
//                     app.publish(C, ...), uWS's own topic fan-out; replies {"channel":C,"offset":N}.
// GET /echo           WebSocket echoing every message with its opcode.
//
// Backpressure: maxBackpressure 1 MiB with closeOnBackpressureLimit, so a subscriber that falls
// 1 MiB behind is closed rather than silently skipped: the gateway's slow-consumer rule.

import { createRequire } from "node:module";
import { parseArgs } from "node:util";
import { Counters, MALFORMED, parsePublish, publicationFrame } from "./publish.mjs";

const uWS = loadNative();

const MAX_BACKPRESSURE = 1024 * 1024;

const { values } = parseArgs({ options: { port: { type: "string" } } });
const port = Number(values.port ?? 8080);
const counters = new Counters();

// No idle timeout and no server pings, like the ws peer: idle-connection scenarios hold
// connections without reading them.
const common = {
  compression: uWS.DISABLED,
  maxPayloadLength: 16 * 1024 * 1024,
  idleTimeout: 0,
  sendPingsAutomatically: false,
  maxBackpressure: MAX_BACKPRESSURE,
  closeOnBackpressureLimit: true,
};

const app = uWS
  .App()
  .ws("/ws", {
    ...common,
    upgrade: (res, req, context) => {
      const channel = req.getQuery("channel");
      if (!channel) {
        res.writeStatus("400 Bad Request").end("channel query parameter required");
        return;
      }
      res.upgrade(
        { channel }, // getQuery has already percent-decoded it
        req.getHeader("sec-websocket-key"),
        req.getHeader("sec-websocket-protocol"),
        req.getHeader("sec-websocket-extensions"),
        context,
      );
    },
    open: (ws) => {
      ws.subscribe(ws.getUserData().channel);
    },
  })
  .ws("/echo", {
    ...common,
    message: (ws, message, isBinary) => {
      ws.send(message, isBinary);
    },
  })
  .post("/publish", (res) => {
    let aborted = false;
    res.onAborted(() => {
      aborted = true;
    });
    readBody(res, (text) => {
      if (aborted) return;
      const body = parsePublish(text);
      res.cork(() => {
        if (!body) {
          res
            .writeStatus("400 Bad Request")
            .writeHeader("content-type", "application/json")
            .end(JSON.stringify({ error: MALFORMED }));
          return;
        }
        const offset = counters.next(body.channel);
        app.publish(body.channel, publicationFrame(body.channel, offset, body.data), false);
        res
          .writeHeader("content-type", "application/json")
          .end(JSON.stringify({ channel: body.channel, offset }));
      });
    });
  })
  .any("/*", (res) => {
    res.writeStatus("404 Not Found").end();
  })
  .listen("127.0.0.1", port, (listenSocket) => {
    if (!listenSocket) {
      console.error(`cannot listen on 127.0.0.1:${port}`);
      process.exit(1);
    }
    console.log(`listening on ${port}`);
  });

/** Collects a uWS request body (its chunks are only valid inside the callback, hence the copy). */
function readBody(res, done) {
  const chunks = [];
  res.onData((chunk, isLast) => {
    chunks.push(Buffer.from(chunk.slice(0)));
    if (isLast) done(Buffer.concat(chunks).toString("utf8"));
  });
}

/** The native uWS binary; the package's pure-JS fallback would not be the physical limit. */
function loadNative() {
  const require = createRequire(import.meta.url);
  const binary = `@trufflesuite/uws-js-unofficial/binaries/uws_${process.platform}_${process.arch}_${process.versions.modules}.node`;
  try {
    return require(binary);
  } catch (e) {
    console.error(`no native uWS binary for this Node (${binary}): ${e.message}`);
    process.exit(1);
  }
}
