// The peers' shared POST /publish pieces: parsing the request body, the publication frame, and
// (for the Node-http peers, ws and Socket.IO) reading the body and writing the JSON reply.

/** The publication frame as one string, built once per publish and shared by every delivery. */
export function publicationFrame(channel, offset, data) {
  return `{"channel":${JSON.stringify(channel)},"offset":${offset},"data":${JSON.stringify(data)}}`;
}

/** Parses a publish body; returns {channel, data}, or null when it is malformed. */
export function parsePublish(text) {
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    return null;
  }
  const valid = body !== null && typeof body === "object" && typeof body.channel === "string" &&
    body.channel !== "" && "data" in body;
  return valid ? { channel: body.channel, data: body.data } : null;
}

/** Reads a Node http request's body as a publish request (null when malformed). */
export async function readPublish(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return parsePublish(Buffer.concat(chunks).toString("utf8"));
}

/** Writes a JSON reply on a Node http response. */
export function replyJson(res, status, value) {
  const text = JSON.stringify(value);
  res.writeHead(status, {
    "content-type": "application/json",
    "content-length": Buffer.byteLength(text),
  });
  res.end(text);
}

/** The 400 reply's error text. */
export const MALFORMED = 'expected {"channel": non-empty string, "data": any JSON}';

/** Per-channel offsets: the next offset of a channel is one more than its last, from 1. */
export class Counters {
  #last = new Map();

  next(channel) {
    const offset = (this.#last.get(channel) ?? 0) + 1;
    this.#last.set(channel, offset);
    return offset;
  }
}
