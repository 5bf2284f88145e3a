// The realtime gateway's JavaScript client: one ES module, no dependencies, no build step.
//
// It owns what makes a client lossless across reconnects: each channel's position (epoch and
// offset of the last publication handed to the application), resuming every subscription from
// it on whatever node and transport comes next, dropping duplicates, and telling the
// application when history could not cover a gap (a `reset` event, `recovered: false` on the
// wire). Positions can be persisted (sessionStorage/localStorage) so a reloaded page resumes.
//
// Transports, in a fallback order: WebSocket (the full protocol), Server-Sent Events with
// publish over HTTP, and long-poll (GET /poll). Reconnects use exponential backoff with full
// jitter and honour the server's drain hint. Protocol: docs/protocol.md in the repository.

/** The transports, in the default fallback order. */
export const TRANSPORTS = Object.freeze(['websocket', 'sse', 'poll']);

const DEFAULTS = Object.freeze({
  transports: TRANSPORTS,
  backoff: { initialMs: 500, maxMs: 15000 },
  pollTimeout: 25,
  persist: false,
  storageKey: 'realtime-gateway',
  publishRetries: 3,
  connectTimeoutMs: 10000,
});

// ------------------------------------------------------------------------------------------
// Pure pieces (unit-tested on their own)
// ------------------------------------------------------------------------------------------

/**
 * Delay before reconnect attempt `attempt` (0-based): exponential backoff with full jitter, a
 * uniform draw from [0, min(maxMs, initialMs * 2^attempt)), so clients dropped together do not
 * come back together.
 */
export function backoffDelay(attempt, { initialMs = 500, maxMs = 15000 } = {}, random = Math.random) {
  const cap = Math.min(maxMs, initialMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

/**
 * The order in which (transport, endpoint) pairs are tried: every endpoint with the first
 * transport, then every endpoint with the next one. A dead node moves the client to the next
 * node on the same transport; a network that breaks a transport everywhere moves it to the next
 * transport.
 */
export function attemptPlan(transports, endpoints) {
  const plan = [];
  for (const transport of transports) {
    if (!TRANSPORTS.includes(transport)) throw new Error(`unknown transport ${transport}`);
    for (const endpoint of endpoints) plan.push({ transport, endpoint });
  }
  if (plan.length === 0) throw new Error('at least one transport and one endpoint are needed');
  return plan;
}

function base64urlEncode(text) {
  const bytes = new TextEncoder().encode(text);
  let binary = '';
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

function base64urlDecode(text) {
  const binary = atob(text.replace(/-/g, '+').replace(/_/g, '/'));
  return new TextDecoder().decode(Uint8Array.from(binary, (c) => c.charCodeAt(0)));
}

/**
 * The server's cursor for a set of positions: base64url (no padding) of
 * `[[channel, epoch, offset, tag?], ...]` (the tag of the publication at `offset` when known).
 * Channels without a position are left out (they start live).
 */
export function encodeCursor(positions) {
  const triples = [];
  for (const [channel, p] of positions) {
    if (p) triples.push(p.tag ? [channel, p.epoch, p.offset, p.tag] : [channel, p.epoch, p.offset]);
  }
  return triples.length ? base64urlEncode(JSON.stringify(triples)) : '';
}

/** The positions held by a cursor, as a Map channel → {epoch, offset, tag?}. */
export function decodeCursor(cursor) {
  const out = new Map();
  if (!cursor) return out;
  for (const [channel, epoch, offset, tag] of JSON.parse(base64urlDecode(cursor))) {
    out.set(channel, position(epoch, offset, tag));
  }
  return out;
}

/**
 * A position: `{epoch, offset}` plus the `tag` of the publication at `offset` when known, which
 * lets the server tell a rollback that reused the offset (`history_diverged`).
 */
function position(epoch, offset, tag) {
  return typeof tag === 'string' && tag ? { epoch, offset, tag } : { epoch, offset };
}

/**
 * Each channel's position, optionally mirrored to a Storage (sessionStorage, localStorage or
 * anything with getItem/setItem/removeItem) so that a reloaded page resumes where it was.
 */
export class Positions {
  constructor(storage = null, key = DEFAULTS.storageKey) {
    this.storage = storage;
    this.key = key;
    this.map = new Map();
    if (storage) {
      try {
        const saved = JSON.parse(storage.getItem(key) || '{}');
        for (const [channel, p] of Object.entries(saved)) {
          if (p && typeof p.epoch === 'string' && Number.isInteger(p.offset)) {
            this.map.set(channel, position(p.epoch, p.offset, p.tag));
          }
        }
      } catch {
        // A corrupt entry only means starting live.
      }
    }
  }

  get(channel) {
    return this.map.get(channel) || null;
  }

  set(channel, epoch, offset, tag) {
    this.map.set(channel, position(epoch, offset, tag));
    this.save();
  }

  delete(channel) {
    this.map.delete(channel);
    this.save();
  }

  /**
   * Whether a publication is new for this client: true (and the position advances) unless it is
   * at or before the position of the same epoch, i.e. a duplicate.
   */
  accept(publication) {
    const p = this.map.get(publication.channel);
    if (p && p.epoch === publication.epoch && publication.offset <= p.offset) return false;
    this.map.set(publication.channel, position(publication.epoch, publication.offset, publication.tag));
    this.save();
    return true;
  }

  save() {
    if (!this.storage) return;
    try {
      this.storage.setItem(this.key, JSON.stringify(Object.fromEntries(this.map)));
    } catch {
      // Storage full or denied: positions still live in memory.
    }
  }
}

function resolveStorage(persist) {
  if (!persist) return null;
  if (typeof persist === 'object') return persist;
  const name = persist === 'local' ? 'localStorage' : 'sessionStorage';
  try {
    return globalThis[name] || null;
  } catch {
    return null;
  }
}

function idempotencyKey() {
  if (globalThis.crypto && typeof globalThis.crypto.randomUUID === 'function') {
    return globalThis.crypto.randomUUID();
  }
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}${Math.random().toString(36).slice(2)}`;
}

function trimSlash(url) {
  return url.replace(/\/+$/, '');
}

function channelQuery(channels) {
  return channels.map((c) => `channel=${encodeURIComponent(c)}`).join('&');
}

/** An error the server answered: `code` is its snake_case error code. */
export class GatewayError extends Error {
  constructor(code, message, status) {
    super(message || code);
    this.name = 'GatewayError';
    this.code = code;
    this.status = status;
  }
}

// ------------------------------------------------------------------------------------------
// Transports: each opens one connection to one endpoint, reports to the client through
// `client._opened(this)`, `client._closed(this, info)`, `client._publication(...)`,
// `client._subscribed(...)`, `client._reset(...)`, and is never reused after it closed.
// ------------------------------------------------------------------------------------------

class WebSocketTransport {
  constructor(client, endpoint) {
    this.client = client;
    this.endpoint = endpoint;
    this.name = 'websocket';
    this.nextId = 1;
    this.pending = new Map();
    this.open = false;
    this.done = false;
  }

  start() {
    const Ws = this.client.options.WebSocket || globalThis.WebSocket;
    const url = `${this.endpoint.replace(/^http/, 'ws')}/ws${this.client._tokenQuery('?')}`;
    const ws = new Ws(url);
    this.ws = ws;
    ws.onopen = () => {
      this.open = true;
      this.client._opened(this);
      // The channels as they are now: some may have been added while connecting.
      for (const channel of this.client.channels()) this.subscribe(channel);
    };
    ws.onmessage = (event) => this.onMessage(event.data);
    ws.onerror = () => {};
    ws.onclose = (event) => this.finish(event.code, event.reason);
  }

  onMessage(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return;
    }
    if (msg.id !== undefined && this.pending.has(msg.id)) {
      const { resolve, reject } = this.pending.get(msg.id);
      this.pending.delete(msg.id);
      if (msg.error) reject(new GatewayError(msg.error.code, msg.error.message));
      else resolve(msg.result);
    } else if (msg.reset) {
      this.client._reset(msg.reset);
    } else if (msg.unsubscribed) {
      this.client._unsubscribed(msg.unsubscribed);
    } else if (msg.join || msg.leave) {
      this.client._presenceEvent(msg);
    } else if (msg.channel !== undefined && msg.offset !== undefined) {
      this.client._publication(msg);
    }
  }

  request(op) {
    return new Promise((resolve, reject) => {
      if (!this.open) {
        reject(new GatewayError('disconnected', 'the WebSocket is not open'));
        return;
      }
      const id = this.nextId++;
      this.pending.set(id, { resolve, reject });
      this.ws.send(JSON.stringify({ id, ...op }));
    });
  }

  subscribe(channel) {
    // Before the socket opens, `onopen` subscribes every channel.
    if (!this.open) return;
    const since = this.client.positions.get(channel);
    const op = { op: 'subscribe', channel };
    const wanted = this.client._wants(channel);
    if (since) op.since = since;
    else if (wanted.latest) op.since = 'latest';
    if (wanted.delta) op.delta = true;
    this.request(op).then(
      (result) => this.client._subscribed(result, since),
      (error) => {
        if (error.code === 'disconnected' || error.code === 'already_subscribed') return;
        this.client._emit('error', error);
        // A backplane outage: reconnecting resubscribes once it is back.
        if (error.code === 'backplane_unavailable') this.close();
      },
    );
  }

  unsubscribe(channel) {
    if (!this.open) return;
    this.request({ op: 'unsubscribe', channel }).catch(() => {});
  }

  /** Reads presence over the socket; `null` when the socket is not open (the client uses HTTP). */
  presence(channel, countOnly) {
    if (!this.open) return null;
    return this.request({ op: 'presence', channel, count_only: countOnly });
  }

  /** Publishes over the socket; `null` when the socket is not open (the client uses HTTP). */
  publish(channel, data, key) {
    if (!this.open) return null;
    return this.request({ op: 'publish', channel, data, idempotency_key: key });
  }

  finish(code, reason) {
    if (this.done) return;
    this.done = true;
    const wasOpen = this.open;
    this.open = false;
    for (const { reject } of this.pending.values()) {
      reject(new GatewayError('disconnected', 'the connection closed before the reply'));
    }
    this.pending.clear();
    let reconnectMs = null;
    let final = null;
    if (code >= 4000) {
      // `{"reason":…, "reconnect":false}`: the server wants this client gone (4010).
      try {
        const why = JSON.parse(reason);
        if (why && why.reconnect === false) final = { code, reason: why.reason };
      } catch {
        // A plain-text reason: reconnect as usual.
      }
    }
    if (code === 1001) {
      try {
        const hint = JSON.parse(reason);
        if (Number.isFinite(hint.reconnect_ms)) reconnectMs = hint.reconnect_ms;
      } catch {
        reconnectMs = 0;
      }
    }
    this.client._closed(this, { wasOpen, draining: code === 1001, reconnectMs, final });
  }

  close() {
    if (this.ws) {
      this.ws.onopen = this.ws.onmessage = null;
      try {
        this.ws.close(1000);
      } catch {
        // Already closed.
      }
    }
    this.finish(1000, '');
  }
}

/** SSE: one EventSource per channel set; a change of channels reopens it from the positions. */
class SseTransport {
  constructor(client, endpoint) {
    this.client = client;
    this.endpoint = endpoint;
    this.name = 'sse';
    this.open = false;
    this.done = false;
    this.source = null;
  }

  start(channels) {
    this.connect(channels);
  }

  connect(channels) {
    if (this.source) this.source.close();
    this.source = null;
    if (channels.length === 0) {
      // Nothing to stream: the endpoint is only used for publishing.
      if (!this.open) {
        this.open = true;
        this.client._opened(this);
      }
      return;
    }
    const Es = this.client.options.EventSource || globalThis.EventSource;
    const positions = channels.map((c) => [c, this.client.positions.get(c)]);
    const since = new Map(positions);
    const cursor = encodeCursor(positions);
    let url = `${this.endpoint}/sse?${channelQuery(channels)}${this.client._streamQuery(channels)}${this.client._tokenQuery('&')}`;
    if (cursor) url += `&last_event_id=${cursor}`;
    const source = new Es(url);
    this.source = source;
    source.addEventListener('connected', (event) => {
      if (this.source !== source) return;
      const { channels: results } = JSON.parse(event.data);
      for (const result of results) this.client._subscribed(result, since.get(result.channel));
      if (!this.open) {
        this.open = true;
        this.client._opened(this);
      }
    });
    source.addEventListener('reset', (event) => {
      if (this.source === source) this.client._reset(JSON.parse(event.data));
    });
    source.addEventListener('message', (event) => {
      if (this.source === source) this.client._publication(JSON.parse(event.data));
    });
    for (const name of ['join', 'leave']) {
      source.addEventListener(name, (event) => {
        if (this.source === source) this.client._presenceEvent(JSON.parse(event.data));
      });
    }
    source.addEventListener('disconnect', (event) => {
      if (this.source !== source) return;
      let why = {};
      try {
        why = JSON.parse(event.data);
      } catch {
        // Not ours.
      }
      if (why.reconnect === false) this.finish({ code: 4010, reason: why.reason });
    });
    source.addEventListener('error', (event) => {
      if (this.source !== source) return;
      if (event.data) {
        // `event: error` from the server: a subscription failed.
        try {
          const e = JSON.parse(event.data);
          this.client._emit('error', new GatewayError(e.code, e.message));
        } catch {
          // Not ours.
        }
      }
      // EventSource would reconnect by itself, to the same node and without our positions'
      // channel changes; the client decides where and when instead.
      this.finish();
    });
  }

  subscribe() {
    if (!this.done) this.connect(this.client.channels());
  }

  unsubscribe() {
    if (!this.done) this.connect(this.client.channels());
  }

  publish() {
    return null;
  }

  presence() {
    return null;
  }

  finish(final = null) {
    if (this.done) return;
    this.done = true;
    if (this.source) this.source.close();
    this.source = null;
    const wasOpen = this.open;
    this.open = false;
    this.client._closed(this, { wasOpen, draining: false, reconnectMs: null, final });
  }

  close() {
    this.finish();
  }
}

/** Long-poll: one GET /poll after another, each from the positions the last one left. */
class PollTransport {
  constructor(client, endpoint) {
    this.client = client;
    this.endpoint = endpoint;
    this.name = 'poll';
    this.open = false;
    this.done = false;
    this.abort = null;
  }

  start() {
    this.loop();
  }

  async loop() {
    while (!this.done) {
      const channels = this.client.channels();
      if (channels.length === 0) {
        if (!this.open) {
          this.open = true;
          this.client._opened(this);
        }
        // Idle until a subscribe restarts the loop.
        await new Promise((resolve) => {
          this.wake = resolve;
        });
        continue;
      }
      const controller = new AbortController();
      this.abort = controller;
      const timeout = this.client.options.pollTimeout;
      const cursor = encodeCursor(channels.map((c) => [c, this.client.positions.get(c)]));
      let url = `${this.endpoint}/poll?${channelQuery(channels)}&timeout=${timeout}${this.client._streamQuery(channels)}${this.client._tokenQuery('&')}`;
      if (cursor) url += `&cursor=${cursor}`;
      const guard = setTimeout(() => controller.abort(), timeout * 1000 + this.client.options.connectTimeoutMs);
      let answer;
      try {
        const response = await this.client._fetch(url, { signal: controller.signal, cache: 'no-store' });
        answer = await response.json();
        if (!response.ok) {
          const error = answer && answer.error ? answer.error : { code: 'http_' + response.status };
          // The backend disconnected this user: its token is refused, do not come back.
          const final = error.code === 'user_disconnected' ? { code: 4010, reason: 'disconnected' } : null;
          this.finish(error.code === 'shutting_down', null, final);
          return;
        }
      } catch {
        clearTimeout(guard);
        if (this.done) return;
        if (controller.signal.aborted && this.restarting) {
          // Aborted to change the channel set: poll again at once.
          this.restarting = false;
          continue;
        }
        this.finish(false, null);
        return;
      } finally {
        clearTimeout(guard);
        this.abort = null;
      }
      if (this.done) return;
      // A channel change that came too late to abort this answer: its events are still valid,
      // and the next poll carries the new channel set.
      this.restarting = false;
      this.apply(answer);
      if (!this.open) {
        this.open = true;
        this.client._opened(this);
      }
      if (answer.reconnect_ms !== undefined) {
        this.finish(true, answer.reconnect_ms);
        return;
      }
    }
  }

  apply(answer) {
    const subscribed = new Set(this.client.channels());
    // A channel that starts with publications (its latest value) takes its position from them.
    const delivering = new Set(answer.events.filter((e) => e.offset !== undefined).map((e) => e.channel));
    for (const p of answer.positions) {
      if (subscribed.has(p.channel) && !delivering.has(p.channel) && !this.client.positions.get(p.channel)) {
        this.client._subscribed({ channel: p.channel, epoch: p.epoch, offset: p.offset, tag: p.tag, recovered: false }, null);
      }
    }
    for (const event of answer.events) {
      if (event.reset) this.client._reset(event.reset);
      else if (event.join || event.leave) this.client._presenceEvent(event);
      else this.client._publication(event);
    }
    // The answer's positions are what the server delivered; they agree with ours unless a
    // publication was a duplicate, and then theirs is right too.
    for (const p of answer.positions) {
      if (subscribed.has(p.channel)) this.client.positions.set(p.channel, p.epoch, p.offset, p.tag);
    }
  }

  restart() {
    if (this.done) return;
    if (this.wake) {
      const wake = this.wake;
      this.wake = null;
      wake();
    } else if (this.abort) {
      // A poll is in flight for the old channel set: abort it and poll again at once.
      this.restarting = true;
      this.abort.abort();
    }
    // Otherwise the next poll, about to start, reads the channel set anyway.
  }

  subscribe() {
    this.restart();
  }

  unsubscribe() {
    this.restart();
  }

  presence() {
    return null;
  }

  publish() {
    return null;
  }

  finish(draining, reconnectMs, final = null) {
    if (this.done) return;
    this.done = true;
    const wasOpen = this.open;
    this.open = false;
    if (this.abort) this.abort.abort();
    if (this.wake) this.wake();
    this.client._closed(this, { wasOpen, draining, reconnectMs, final });
  }

  close() {
    this.finish(false, null);
  }
}

const TRANSPORT_CLASSES = { websocket: WebSocketTransport, sse: SseTransport, poll: PollTransport };

// ------------------------------------------------------------------------------------------
// The client
// ------------------------------------------------------------------------------------------

/**
 * A connection to a gateway, kept up across failures. Create with {@link connect}.
 *
 * Events (`on(name, fn)` returns a function that removes the listener):
 * - `state`: `{state, transport, endpoint}`; state is `connecting`, `connected`,
 *   `disconnected` (waiting `retryInMs` before the next attempt) or `closed`.
 * - `reset`: `{channel, reason, epoch, offset}`: publications of `channel` were lost
 *   (`recovered: false`); delivery continues after `offset` of `epoch`.
 * - `unsubscribed`: `{channel, reason}`: the server ended the subscription (e.g.
 *   `permission_revoked` after a `refresh` whose token no longer allows the channel); its
 *   handlers are removed and it is not resubscribed.
 * - `join`, `leave`: `{channel, join|leave: {client, user, info?}}` of channels whose namespace
 *   announces members (`join_leave`); also handed to the subscription's `onJoin`/`onLeave`.
 *   At most once: across a reconnect some may be missed, so read `presence()` again then.
 * - `closed`: `{code, reason}` when the server ended the client for good (4010: the user was
 *   disconnected by the backend); it does not reconnect.
 * - `position`: `{channel, epoch, offset}` after each publication handed to the application.
 * - `error`: a `GatewayError` the application may want to know about.
 */
export class Client {
  constructor(endpoints, options = {}) {
    this.options = { ...DEFAULTS, ...options, backoff: { ...DEFAULTS.backoff, ...(options.backoff || {}) } };
    const list = Array.isArray(endpoints) ? endpoints : [endpoints];
    this.endpoints = list.map(trimSlash);
    this.plan = attemptPlan(this.options.transports, this.endpoints);
    this.positions = new Positions(resolveStorage(this.options.persist), this.options.storageKey);
    this.handlers = new Map();
    /** channel → the full data of its last publication, the base of the next delta. */
    this.lastData = new Map();
    this.listeners = new Map();
    this.planIndex = 0;
    this.attempt = 0;
    this.transport = null;
    this.timer = null;
    this.state = 'connecting';
    this.closedByUser = false;
    this.random = this.options.random || Math.random;
    this._schedule(0);
  }

  /** The current state: `connecting`, `connected`, `disconnected` or `closed`. */
  get currentState() {
    return this.state;
  }

  /** The transport in use (or being tried) and its endpoint. */
  get currentTransport() {
    const { transport, endpoint } = this.plan[this.planIndex];
    return { transport, endpoint };
  }

  /** Channels with at least one handler. */
  channels() {
    return [...this.handlers.keys()];
  }

  on(event, fn) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(fn);
    return () => this.listeners.get(event).delete(fn);
  }

  _emit(event, value) {
    for (const fn of this.listeners.get(event) || []) {
      try {
        fn(value);
      } catch (e) {
        if (event !== 'error') this._emit('error', e);
      }
    }
  }

  /**
   * Calls `handler(publication)` for every publication of `channel` (`{channel, offset, epoch,
   * data}`), exactly once and in order across reconnects. Resumes from a stored position if the
   * client persists positions. Returns `{unsubscribe()}`.
   *
   * `latest: true`: without a stored position, the channel's newest publication comes first
   * (its current value), then live ones. `delta: true`: the server may send a publication as a
   * JSON Merge Patch against the previous one, which the client applies, so `handler` still gets
   * full `data` (treat it as immutable: the next patch is applied to it). Over SSE and long-poll,
   * where one request carries every channel, either option asked by one channel applies to all.
   */
  subscribe(channel, handler, { onReset, onUnsubscribed, onJoin, onLeave, latest = false, delta = false } = {}) {
    if (typeof handler !== 'function') throw new TypeError('subscribe needs a handler function');
    const entry = { handler, onReset, onUnsubscribed, onJoin, onLeave, latest, delta };
    const isNew = !this.handlers.has(channel);
    if (isNew) this.handlers.set(channel, new Set());
    this.handlers.get(channel).add(entry);
    if (isNew && this.transport) this.transport.subscribe(channel);
    return { unsubscribe: () => this._remove(channel, entry) };
  }

  /** Whether any handler of `channel` asked for its latest value, for deltas. */
  _wants(channel) {
    const wanted = { latest: false, delta: false };
    for (const entry of this.handlers.get(channel) || []) {
      wanted.latest ||= entry.latest;
      wanted.delta ||= entry.delta;
    }
    return wanted;
  }

  /** `&latest=true`, `&delta=true` for an SSE or poll request over `channels`. */
  _streamQuery(channels) {
    const latest = channels.some((c) => !this.positions.get(c) && this._wants(c).latest);
    const delta = channels.some((c) => this._wants(c).delta);
    return `${latest ? '&latest=true' : ''}${delta ? '&delta=true' : ''}`;
  }

  /** Removes every handler of `channel` and forgets its position. */
  unsubscribe(channel) {
    if (!this.handlers.delete(channel)) return;
    this.positions.delete(channel);
    this.lastData.delete(channel);
    if (this.transport) this.transport.unsubscribe(channel);
  }

  _remove(channel, entry) {
    const set = this.handlers.get(channel);
    if (!set) return;
    set.delete(entry);
    if (set.size === 0) this.unsubscribe(channel);
  }

  /** The position of `channel`: `{epoch, offset}` of the last publication delivered, or null. */
  position(channel) {
    return this.positions.get(channel);
  }

  /**
   * Publishes `data` (any JSON) on `channel`; resolves with `{channel, offset, epoch}` once the
   * publication is stored. Over the WebSocket when it is open, else `POST /api/publish`. Retried
   * (on the then current endpoint) when the outcome is unknown, with one idempotency key, so a
   * retry never publishes twice.
   */
  async publish(channel, data) {
    const key = idempotencyKey();
    let lastError;
    for (let attempt = 0; attempt <= this.options.publishRetries; attempt++) {
      if (this.closedByUser) throw new GatewayError('closed', 'the client is closed');
      if (attempt > 0) {
        await new Promise((r) => setTimeout(r, backoffDelay(attempt, this.options.backoff, this.random)));
      }
      try {
        const overSocket = this.transport && this.transport.publish(channel, data, key);
        if (overSocket) return await overSocket;
        return await this._publishHttp(channel, data, key);
      } catch (e) {
        lastError = e;
        const retryable = !(e instanceof GatewayError) || ['disconnected', 'backplane_unavailable', 'shutting_down', 'not_ready'].includes(e.code);
        if (!retryable) throw e;
      }
    }
    throw lastError;
  }

  async _publishHttp(channel, data, key) {
    const { endpoint } = this.plan[this.planIndex];
    const response = await this._fetch(`${endpoint}/api/publish`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ channel, data, idempotency_key: key }),
    });
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const error = body && body.error ? body.error : { code: `http_${response.status}` };
      throw new GatewayError(error.code, error.message, response.status);
    }
    return body;
  }

  /**
   * Who is in `channel` (its namespace must keep presence): resolves with `{channel, count,
   * users, clients: [{client, user, info?}]}` (no `clients` with `{countOnly: true}`). Over the
   * WebSocket when it is open, else `GET /presence`.
   */
  async presence(channel, { countOnly = false } = {}) {
    const overSocket = this.transport && this.transport.presence(channel, countOnly);
    if (overSocket) return overSocket;
    const { endpoint } = this.plan[this.planIndex];
    const query = `channel=${encodeURIComponent(channel)}${countOnly ? '&count_only=true' : ''}`;
    const response = await this._fetch(`${endpoint}/presence?${query}${this._tokenQuery('&')}`, { cache: 'no-store' });
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const error = body && body.error ? body.error : { code: `http_${response.status}` };
      throw new GatewayError(error.code, error.message, response.status);
    }
    return body;
  }

  /** `token=…` for a URL (after `sep`), or nothing without a token. */
  _tokenQuery(sep) {
    const token = typeof this.options.token === 'function' ? this.options.token() : this.options.token;
    return token ? `${sep}token=${encodeURIComponent(token)}` : '';
  }

  _fetch(url, init) {
    const f = this.options.fetch || globalThis.fetch;
    return f(url, init);
  }

  /** Stops for good: closes the connection and cancels reconnects. */
  close() {
    this.closedByUser = true;
    clearTimeout(this.timer);
    const transport = this.transport;
    this.transport = null;
    if (transport) transport.close();
    this._setState('closed');
  }

  _setState(state, extra = {}) {
    this.state = state;
    this._emit('state', { state, ...this.currentTransport, ...extra });
  }

  _schedule(delay) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this._open(), delay);
  }

  _open() {
    if (this.closedByUser) return;
    const { transport, endpoint } = this.plan[this.planIndex];
    this._setState('connecting');
    const t = new TRANSPORT_CLASSES[transport](this, endpoint);
    this.transport = t;
    // A connection that neither opens nor fails (a black-holed network) counts as failed.
    t.connectGuard = setTimeout(() => {
      if (this.transport === t && !t.open) t.close();
    }, this.options.connectTimeoutMs);
    t.start(this.channels());
  }

  _opened(t) {
    if (t !== this.transport) return;
    clearTimeout(t.connectGuard);
    this.attempt = 0;
    this._setState('connected');
  }

  _closed(t, { wasOpen, draining, reconnectMs, final }) {
    clearTimeout(t.connectGuard);
    if (t !== this.transport || this.closedByUser) return;
    this.transport = null;
    if (final) {
      // The server said not to come back (e.g. 4010: disconnected by the backend).
      this.closedByUser = true;
      clearTimeout(this.timer);
      this._setState('closed', final);
      this._emit('closed', final);
      return;
    }
    const perTransport = this.endpoints.length;
    let delay;
    if (draining) {
      // The node is going away: the next node, same transport, after the node's hint.
      const base = this.planIndex - (this.planIndex % perTransport);
      this.planIndex = base + ((this.planIndex + 1) % perTransport);
      delay = reconnectMs ?? backoffDelay(0, this.options.backoff, this.random);
      this.attempt = 0;
    } else if (wasOpen) {
      // A drop: the same node first, soon.
      delay = backoffDelay(0, this.options.backoff, this.random);
      this.attempt = 1;
    } else {
      // Could not connect: next in the fallback plan, backing off more each time.
      this.planIndex = (this.planIndex + 1) % this.plan.length;
      delay = backoffDelay(this.attempt, this.options.backoff, this.random);
      this.attempt += 1;
    }
    this._setState('disconnected', { retryInMs: delay });
    this._schedule(delay);
  }

  /** A subscribe result (WebSocket reply, SSE `connected`, or a poll's first position). */
  _subscribed(result, since) {
    if (!this.handlers.has(result.channel)) return;
    if (result.recovered) return;
    // The latest value follows: the position comes with it (the result's offset may be past it).
    if (result.latest) return;
    // Not recovered: delivery starts after `result.offset`. Without a position asked for, that
    // is simply where the subscription starts; with one, what lay between was lost. After
    // `epoch_changed` the server delivers the new epoch from its start, so the position is its
    // offset 0 (which carries no epoch's tag).
    const fromStart = since && result.reason === 'epoch_changed';
    const offset = fromStart ? 0 : result.offset;
    this.positions.set(result.channel, result.epoch, offset, fromStart ? undefined : result.tag);
    if (since && result.reason) {
      this._resetTo({ channel: result.channel, reason: result.reason, epoch: result.epoch, offset });
    } else {
      this._emit('position', { channel: result.channel, epoch: result.epoch, offset: result.offset });
    }
  }

  _reset(reset) {
    if (!this.handlers.has(reset.channel)) return;
    this.positions.set(reset.channel, reset.epoch, reset.offset);
    this._resetTo(reset);
  }

  /** The server ended `channel`'s subscription: tell its handlers, then forget it (no resubscribe). */
  _unsubscribed(ended) {
    const entries = this.handlers.get(ended.channel);
    if (!entries) return;
    this.handlers.delete(ended.channel);
    this.positions.delete(ended.channel);
    this.lastData.delete(ended.channel);
    for (const entry of entries) {
      if (entry.onUnsubscribed) {
        try {
          entry.onUnsubscribed(ended);
        } catch (e) {
          this._emit('error', e);
        }
      }
    }
    this._emit('unsubscribed', ended);
  }

  /** A join or leave of a subscribed channel: to its `onJoin`/`onLeave`, then `join`/`leave`. */
  _presenceEvent(event) {
    const entries = this.handlers.get(event.channel);
    if (!entries) return;
    const kind = event.join ? 'join' : 'leave';
    const hook = kind === 'join' ? 'onJoin' : 'onLeave';
    for (const entry of entries) {
      if (entry[hook]) {
        try {
          entry[hook](event[kind], event);
        } catch (e) {
          this._emit('error', e);
        }
      }
    }
    this._emit(kind, event);
  }

  _resetTo(reset) {
    for (const entry of this.handlers.get(reset.channel) || []) {
      if (entry.onReset) {
        try {
          entry.onReset(reset);
        } catch (e) {
          this._emit('error', e);
        }
      }
    }
    this._emit('reset', reset);
    this._emit('position', { channel: reset.channel, epoch: reset.epoch, offset: reset.offset });
  }

  _publication(p) {
    const entries = this.handlers.get(p.channel);
    if (!entries) return;
    if (p.delta !== undefined) {
      // The server sends a delta only right after the publication it patches.
      const base = this.lastData.get(p.channel);
      if (!base || base.epoch !== p.epoch || base.offset !== p.offset - 1) {
        this._emit('error', new GatewayError('delta_without_base', `no base for the delta at ${p.offset} of ${p.channel}`));
        return;
      }
      const { delta, ...rest } = p;
      p = { ...rest, data: applyMergePatch(base.data, delta) };
    }
    // The position is saved before the handlers run: JavaScript runs them to completion, so a
    // page cannot unload in between, and a handler that throws does not get it again.
    if (!this.positions.accept(p)) return;
    // Kept for every channel: over SSE and long-poll, one channel's `delta` asks for all.
    this.lastData.set(p.channel, { epoch: p.epoch, offset: p.offset, data: p.data });
    for (const entry of entries) {
      try {
        entry.handler(p);
      } catch (e) {
        this._emit('error', e);
      }
    }
    this._emit('position', { channel: p.channel, epoch: p.epoch, offset: p.offset });
  }
}

/**
 * Applies a JSON Merge Patch (RFC 7396) to `target` without changing it: members the patch
 * names are replaced (`null` removes one), objects are patched member by member, everything
 * else is kept (shared with `target`).
 */
export function applyMergePatch(target, patch) {
  if (patch === null || typeof patch !== 'object' || Array.isArray(patch)) return patch;
  const result = target !== null && typeof target === 'object' && !Array.isArray(target) ? { ...target } : {};
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) delete result[key];
    else result[key] = applyMergePatch(result[key], value);
  }
  return result;
}

/**
 * Connects to a gateway. `endpoints` is a base URL (`https://rt.example.com`) or a list of
 * them (nodes to fall over to); in a browser it defaults to the page's origin.
 *
 * Options: `transports` (fallback order, default `['websocket', 'sse', 'poll']`), `backoff`
 * (`{initialMs: 500, maxMs: 15000}`), `persist` (`'session'`, `'local'`, a Storage, or false),
 * `storageKey`, `pollTimeout` (seconds, default 25), `publishRetries` (3), `connectTimeoutMs`
 * (10000), `token` (a connection JWT, or a function returning the current one, sent as
 * `?token=`); `WebSocket`, `EventSource`, `fetch` to supply implementations.
 */
export function connect(endpoints, options = {}) {
  if (endpoints === undefined || endpoints === null || (Array.isArray(endpoints) && endpoints.length === 0)) {
    if (!globalThis.location) throw new Error('connect needs an endpoint outside a browser');
    endpoints = globalThis.location.origin;
  }
  return new Client(endpoints, options);
}
