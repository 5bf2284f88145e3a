// Unit tests of the client with node's test runner: backoff, cursors and positions, the
// fallback order, reconnect and resume decisions. Transports are driven through small fakes of
// WebSocket, EventSource and fetch; the real thing runs in Chromium (test/browser/).

import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  applyMergePatch,
  attemptPlan,
  backoffDelay,
  connect,
  decodeCursor,
  encodeCursor,
  Positions,
  TRANSPORTS,
} from '../../index.js';

const A = 'http://a.test';
const B = 'http://b.test';

/**
 * Resolves once `predicate()` holds. Checked after every macrotask (timers that fall due fire in
 * between); fails only after a generous wall-clock deadline, never after a count of turns: a busy
 * machine can run any number of turns before a 7 ms timer is due.
 */
async function until(predicate, what, deadlineMs = 10_000) {
  const deadline = Date.now() + deadlineMs;
  while (!predicate()) {
    if (Date.now() > deadline) assert.fail(`never happened within ${deadlineMs} ms: ${what}`);
    await new Promise((r) => setImmediate(r));
  }
}

// ---------------------------------------------------------------------------------------------

test('backoff: full jitter below an exponential cap', () => {
  const opts = { initialMs: 100, maxMs: 1000 };
  assert.equal(backoffDelay(0, opts, () => 0), 0);
  const top = () => 0.999999;
  assert.deepEqual(
    [0, 1, 2, 3, 4, 10, 5000].map((n) => backoffDelay(n, opts, top)),
    [99, 199, 399, 799, 999, 999, 999],
  );
  for (let i = 0; i < 200; i++) {
    const d = backoffDelay(3, opts);
    assert.ok(Number.isInteger(d) && d >= 0 && d < 800, `${d}`);
  }
});

test('fallback order: every endpoint on a transport before the next transport', () => {
  assert.deepEqual(TRANSPORTS, ['websocket', 'sse', 'poll']);
  assert.deepEqual(
    attemptPlan(TRANSPORTS, [A, B]).map((p) => `${p.transport}@${p.endpoint}`),
    [`websocket@${A}`, `websocket@${B}`, `sse@${A}`, `sse@${B}`, `poll@${A}`, `poll@${B}`],
  );
  assert.throws(() => attemptPlan(['carrier-pigeon'], [A]), /unknown transport/);
  assert.throws(() => attemptPlan([], [A]), /at least one/);
});

test('cursor: the server form, channels without a position left out', () => {
  // The example of docs/protocol.md: [["chat:a","7a2ded1609588a1d",3]].
  const positions = new Map([
    ['chat:a', { epoch: '7a2ded1609588a1d', offset: 3 }],
    ['new', null],
  ]);
  assert.equal(encodeCursor(positions), 'W1siY2hhdDphIiwiN2EyZGVkMTYwOTU4OGExZCIsM11d');
  assert.equal(encodeCursor(new Map([['x', null]])), '');
  const odd = new Map([['prix/€,"x"', { epoch: 'e', offset: 12345678901 }]]);
  const cursor = encodeCursor(odd);
  assert.match(cursor, /^[A-Za-z0-9_-]+$/);
  assert.deepEqual(decodeCursor(cursor), odd);
});

test('positions: duplicates dropped, epochs followed, persisted to storage', () => {
  const storage = new Map();
  const store = {
    getItem: (k) => storage.get(k) ?? null,
    setItem: (k, v) => storage.set(k, v),
    removeItem: (k) => storage.delete(k),
  };
  const p = new Positions(store, 'k');
  assert.equal(p.accept({ channel: 'c', epoch: 'e1', offset: 5 }), true);
  assert.equal(p.accept({ channel: 'c', epoch: 'e1', offset: 5 }), false);
  assert.equal(p.accept({ channel: 'c', epoch: 'e1', offset: 4 }), false);
  assert.equal(p.accept({ channel: 'c', epoch: 'e1', offset: 6 }), true);
  assert.equal(p.accept({ channel: 'c', epoch: 'e2', offset: 1 }), true);
  assert.deepEqual(p.get('c'), { epoch: 'e2', offset: 1 });

  // A new page (a reload) reads them back; a corrupt entry means starting live.
  assert.deepEqual(new Positions(store, 'k').get('c'), { epoch: 'e2', offset: 1 });
  p.delete('c');
  assert.equal(new Positions(store, 'k').get('c'), null);
  storage.set('k', '{not json');
  assert.equal(new Positions(store, 'k').get('c'), null);
});

test('tags: kept with positions, persisted, carried in cursors; old cursors still read', () => {
  const storage = new Map();
  const store = {
    getItem: (k) => storage.get(k) ?? null,
    setItem: (k, v) => storage.set(k, v),
    removeItem: (k) => storage.delete(k),
  };
  const p = new Positions(store, 'k');
  assert.equal(p.accept({ channel: 'c', epoch: 'e1', offset: 5, tag: '00c0ffee' }), true);
  assert.deepEqual(p.get('c'), { epoch: 'e1', offset: 5, tag: '00c0ffee' });
  assert.deepEqual(new Positions(store, 'k').get('c'), { epoch: 'e1', offset: 5, tag: '00c0ffee' });
  // A reset names no publication: no tag.
  p.set('c', 'e2', 0);
  assert.deepEqual(p.get('c'), { epoch: 'e2', offset: 0 });

  const tagged = new Map([['a', { epoch: 'e', offset: 3, tag: '0000abcd' }], ['b', { epoch: 'e', offset: 1 }]]);
  const cursor = encodeCursor(tagged);
  assert.deepEqual(JSON.parse(Buffer.from(cursor, 'base64url').toString()), [['a', 'e', 3, '0000abcd'], ['b', 'e', 1]]);
  assert.deepEqual(decodeCursor(cursor), tagged);
});

// ---------------------------------------------------------------------------------------------
// Fakes

/** A fake WebSocket: `FakeWs.reachable` decides which URLs open; a tiny server answers ops. */
function fakeWebSocket() {
  class FakeWs {
    static instances = [];
    static reachable = new Set();
    /** channel → {epoch, top} the fake server reports on subscribe. */
    static channels = new Map();

    constructor(url) {
      this.url = url;
      this.sent = [];
      FakeWs.instances.push(this);
      setImmediate(() => {
        if (FakeWs.reachable.has(url)) this.onopen?.();
        else this.onclose?.({ code: 1006, reason: '' });
      });
    }

    send(text) {
      const msg = JSON.parse(text);
      this.sent.push(msg);
      if (msg.op === 'subscribe') {
        const ch = FakeWs.channels.get(msg.channel) || { epoch: 'e', top: 0 };
        const latest = msg.since === 'latest';
        const recovered = !latest && !!msg.since && msg.since.epoch === ch.epoch && msg.since.offset <= ch.top;
        const result = { channel: msg.channel, epoch: ch.epoch, offset: ch.top, recovered };
        if (latest) result.latest = ch.top > 0;
        else if (msg.since && !recovered) result.reason = 'epoch_changed';
        setImmediate(() => this.push({ id: msg.id, result }));
      }
    }

    push(obj) {
      this.onmessage?.({ data: JSON.stringify(obj) });
    }

    drop(code = 1006, reason = '') {
      this.onclose?.({ code, reason });
    }

    close() {}
  }
  return FakeWs;
}

/** A fake EventSource that connects to every URL of `reachable`. */
function fakeEventSource(reachable) {
  return class FakeEs {
    static instances = [];
    constructor(url) {
      this.url = url;
      this.listeners = {};
      FakeEs.instances.push(this);
      setImmediate(() => {
        if (reachable.some((r) => url.startsWith(r))) {
          const channels = new URL(url).searchParams.getAll('channel');
          this.emit('connected', { channels: channels.map((channel) => ({ channel, epoch: 'e', offset: 0, recovered: false })) });
        } else {
          this.emit('error', undefined);
        }
      });
    }
    addEventListener(type, fn) {
      (this.listeners[type] ||= []).push(fn);
    }
    emit(type, data) {
      for (const fn of this.listeners[type] || []) fn({ data: data === undefined ? undefined : JSON.stringify(data) });
    }
    close() {
      this.closed = true;
    }
  };
}

const fast = { backoff: { initialMs: 1, maxMs: 1 }, random: () => 0, connectTimeoutMs: 60000 };

function recordStates(client) {
  const states = [];
  client.on('state', (s) => states.push(s));
  return states;
}

// ---------------------------------------------------------------------------------------------

test('fallback: a dead node moves to the next node, a broken transport to the next transport', async () => {
  const WebSocket = fakeWebSocket();
  const EventSource = fakeEventSource([B]);
  // WebSocket is broken everywhere (a proxy that refuses upgrades); SSE works on B only.
  const client = connect([A, B], { ...fast, WebSocket, EventSource });
  const states = recordStates(client);
  client.subscribe('c', () => {});
  await until(() => client.currentState === 'connected', 'connected');
  const tried = states.filter((s) => s.state === 'connecting').map((s) => `${s.transport}@${s.endpoint}`);
  assert.deepEqual(tried, [`websocket@${A}`, `websocket@${B}`, `sse@${A}`, `sse@${B}`]);
  assert.deepEqual(client.currentTransport, { transport: 'sse', endpoint: B });
  client.close();
  assert.equal(client.currentState, 'closed');
});

test('reconnect: a drop retries the same node; a drain hint moves on after the hinted delay', async () => {
  const WebSocket = fakeWebSocket();
  WebSocket.reachable = new Set(['ws://a.test/ws', 'ws://b.test/ws']);
  const client = connect([A, B], { ...fast, WebSocket });
  const states = recordStates(client);
  await until(() => client.currentState === 'connected', 'connected');

  WebSocket.instances.at(-1).drop(1006);
  await until(() => WebSocket.instances.length === 2 && client.currentState === 'connected', 'reconnected');
  assert.equal(WebSocket.instances[1].url, 'ws://a.test/ws', 'same node after a plain drop');

  WebSocket.instances.at(-1).drop(1001, JSON.stringify({ reason: 'shutting_down', reconnect_ms: 7 }));
  const waiting = states.at(-1);
  assert.equal(waiting.state, 'disconnected');
  assert.equal(waiting.retryInMs, 7, 'the server hint is the delay');
  await until(() => WebSocket.instances.length === 3 && client.currentState === 'connected', 'moved');
  assert.equal(WebSocket.instances[2].url, 'ws://b.test/ws', 'a draining node is left for the next');
  client.close();
});

test('resume: every subscription resumes from its position, duplicates dropped, resets surfaced', async () => {
  const WebSocket = fakeWebSocket();
  WebSocket.reachable = new Set(['ws://a.test/ws']);
  WebSocket.channels.set('keep', { epoch: 'e1', top: 2 });
  WebSocket.channels.set('lost', { epoch: 'e1', top: 0 });
  const client = connect(A, { ...fast, WebSocket });
  const got = [];
  const resets = [];
  client.on('reset', (r) => resets.push(r));
  client.subscribe('keep', (p) => got.push(`keep${p.offset}`));
  client.subscribe('lost', (p) => got.push(`lost${p.offset}`));
  await until(() => client.position('keep') && client.position('lost'), 'subscribed');
  const ws = WebSocket.instances[0];
  assert.deepEqual(ws.sent.map((m) => [m.op, m.channel, m.since]), [
    ['subscribe', 'keep', undefined],
    ['subscribe', 'lost', undefined],
  ]);
  // First subscription without a position: starts live, no reset.
  assert.deepEqual(client.position('keep'), { epoch: 'e1', offset: 2 });
  ws.push({ channel: 'keep', offset: 3, epoch: 'e1', data: 'x' });
  ws.push({ channel: 'keep', offset: 3, epoch: 'e1', data: 'x' });
  ws.push({ channel: 'lost', offset: 1, epoch: 'e1', data: 'y' });
  assert.deepEqual(got, ['keep3', 'lost1']);

  // The server restarted 'lost' with a new epoch while the client was away.
  WebSocket.channels.set('keep', { epoch: 'e1', top: 3 });
  WebSocket.channels.set('lost', { epoch: 'e2', top: 9 });
  ws.drop(1006);
  await until(() => WebSocket.instances.length === 2 && WebSocket.instances[1].sent.length === 2, 'resubscribed');
  await until(() => resets.length === 1, 'reset');
  assert.deepEqual(WebSocket.instances[1].sent.map((m) => [m.channel, m.since]), [
    ['keep', { epoch: 'e1', offset: 3 }],
    ['lost', { epoch: 'e1', offset: 1 }],
  ]);
  // The new epoch follows from its start: the position is its offset 0, and its publications
  // from 1 are delivered, not dropped as already seen.
  assert.deepEqual(resets, [{ channel: 'lost', reason: 'epoch_changed', epoch: 'e2', offset: 0 }]);
  assert.deepEqual(client.position('lost'), { epoch: 'e2', offset: 0 });
  WebSocket.instances[1].push({ channel: 'lost', offset: 1, epoch: 'e2', data: 'z' });
  assert.deepEqual(got, ['keep3', 'lost1', 'lost1']);
  assert.deepEqual(client.position('lost'), { epoch: 'e2', offset: 1 });
  client.close();
});

test('unsubscribed: a channel the server ended is surfaced and not resubscribed', async () => {
  const WebSocket = fakeWebSocket();
  WebSocket.reachable = new Set(['ws://a.test/ws']);
  const client = connect(A, { ...fast, WebSocket });
  const ended = [];
  const told = [];
  client.on('unsubscribed', (u) => ended.push(u));
  client.subscribe('private', () => {}, { onUnsubscribed: (u) => told.push(u.reason) });
  client.subscribe('public', () => {});
  await until(() => client.position('private') && client.position('public'), 'subscribed');
  const ws = WebSocket.instances[0];
  ws.push({ unsubscribed: { channel: 'private', reason: 'permission_revoked' } });
  assert.deepEqual(ended, [{ channel: 'private', reason: 'permission_revoked' }]);
  assert.deepEqual(told, ['permission_revoked']);
  assert.equal(client.position('private'), null);
  // A reconnect resubscribes only what is left.
  ws.drop(1006);
  await until(() => WebSocket.instances.length === 2 && WebSocket.instances[1].sent.length === 1, 'resubscribed');
  assert.deepEqual(WebSocket.instances[1].sent.map((m) => m.channel), ['public']);
  client.close();
});

test('long-poll: positions first, then each poll from the cursor the last one left', async () => {
  const requests = [];
  const answers = [
    { cursor: 'x', positions: [{ channel: 'c', epoch: 'e', offset: 4 }], events: [] },
    {
      cursor: 'y',
      positions: [{ channel: 'c', epoch: 'e', offset: 6 }],
      events: [
        { channel: 'c', offset: 5, epoch: 'e', data: 5 },
        { channel: 'c', offset: 6, epoch: 'e', data: 6 },
      ],
    },
  ];
  const fetch = async (url, init) => {
    requests.push(new URL(url));
    const answer = answers.shift();
    if (!answer) {
      // The third poll waits until the client is closed.
      await new Promise((_, reject) => init.signal.addEventListener('abort', () => reject(new Error('aborted'))));
    }
    return { ok: true, status: 200, json: async () => answer };
  };
  const client = connect(A, { ...fast, transports: ['poll'], fetch, pollTimeout: 20 });
  const got = [];
  client.subscribe('c', (p) => got.push(p.data));
  await until(() => requests.length === 3, 'three polls');
  assert.deepEqual(got, [5, 6]);
  assert.equal(requests[0].pathname, '/poll');
  assert.deepEqual(requests[0].searchParams.getAll('channel'), ['c']);
  assert.equal(requests[0].searchParams.get('timeout'), '20');
  assert.equal(requests[0].searchParams.get('cursor'), null, 'no position yet');
  assert.deepEqual(decodeCursor(requests[1].searchParams.get('cursor')), new Map([['c', { epoch: 'e', offset: 4 }]]));
  assert.deepEqual(decodeCursor(requests[2].searchParams.get('cursor')), new Map([['c', { epoch: 'e', offset: 6 }]]));
  client.close();
});

test('publish: over the open WebSocket, else over HTTP, retried with one idempotency key', async () => {
  const bodies = [];
  let failures = 1;
  const fetch = async (url, init) => {
    bodies.push({ url, body: JSON.parse(init.body) });
    if (failures-- > 0) throw new TypeError('network down');
    return { ok: true, status: 200, json: async () => ({ channel: 'c', offset: 1, epoch: 'e' }) };
  };
  const EventSource = fakeEventSource([A]);
  const client = connect(A, { ...fast, transports: ['sse'], EventSource, fetch });
  const ack = await client.publish('c', { text: 'hi' });
  assert.deepEqual(ack, { channel: 'c', offset: 1, epoch: 'e' });
  assert.equal(bodies.length, 2);
  assert.equal(bodies[0].url, `${A}/api/publish`);
  assert.deepEqual(bodies[0].body.data, { text: 'hi' });
  assert.ok(bodies[0].body.idempotency_key);
  assert.equal(bodies[1].body.idempotency_key, bodies[0].body.idempotency_key);

  // A refusal that retrying cannot fix is not retried.
  const refusing = async () => ({ ok: false, status: 400, json: async () => ({ error: { code: 'invalid_channel', message: 'no' } }) });
  const other = connect(A, { ...fast, transports: ['sse'], EventSource, fetch: refusing });
  await assert.rejects(other.publish('bad channel', 1), { code: 'invalid_channel' });
  client.close();
  other.close();
});

test('long-poll: a new subscription aborts the waiting poll and polls again with every channel', async () => {
  const requests = [];
  const fetch = (url, init) => {
    const u = new URL(url);
    requests.push(u);
    const channels = u.searchParams.getAll('channel');
    const known = decodeCursor(u.searchParams.get('cursor'));
    if (channels.some((c) => !known.has(c))) {
      // A channel without a position: the server answers at once with positions.
      const positions = channels.map((channel) => ({ channel, epoch: 'e', offset: 0 }));
      return Promise.resolve({ ok: true, status: 200, json: async () => ({ cursor: 'c', positions, events: [] }) });
    }
    // Otherwise the poll waits until aborted.
    return new Promise((_, reject) => init.signal.addEventListener('abort', () => reject(new Error('aborted'))));
  };
  const client = connect(A, { ...fast, transports: ['poll'], fetch });
  client.subscribe('a', () => {});
  await until(() => requests.length === 2, 'a waiting poll');
  client.subscribe('b', () => {});
  await until(() => requests.length >= 3, 'a new poll');
  assert.deepEqual(requests[2].searchParams.getAll('channel'), ['a', 'b']);
  assert.deepEqual(decodeCursor(requests[2].searchParams.get('cursor')), new Map([['a', { epoch: 'e', offset: 0 }]]));
  await until(() => client.position('b'), 'b positioned');
  assert.equal(client.currentState, 'connected', 'a channel change is no reconnect');
  client.close();
});

test('presence: join and leave reach their hooks and listeners, publications untouched', async () => {
  const WebSocket = fakeWebSocket();
  WebSocket.reachable = new Set(['ws://a.test/ws']);
  const client = connect(A, { ...fast, WebSocket });
  const seen = [];
  client.on('join', (e) => seen.push(`event join ${e.join.user}`));
  client.on('leave', (e) => seen.push(`event leave ${e.leave.user}`));
  client.subscribe('room:a', (p) => seen.push(`pub ${p.offset}`), {
    onJoin: (m) => seen.push(`hook join ${m.user}`),
    onLeave: (m) => seen.push(`hook leave ${m.user}`),
  });
  await until(() => client.position('room:a'), 'subscribed');
  const ws = WebSocket.instances[0];
  ws.push({ channel: 'room:a', join: { client: 'c1', user: 'ann' } });
  ws.push({ channel: 'room:a', offset: 1, epoch: 'e', data: {} });
  ws.push({ channel: 'room:a', leave: { client: 'c1', user: 'ann' } });
  ws.push({ channel: 'other', join: { client: 'c2', user: 'bob' } });
  assert.deepEqual(seen, ['hook join ann', 'event join ann', 'pub 1', 'hook leave ann', 'event leave ann']);
  assert.deepEqual(client.position('room:a'), { epoch: 'e', offset: 1 }, 'events move no position');
  client.close();
});

test('presence: asked over the open WebSocket, else GET /presence with the token', async () => {
  const WebSocket = fakeWebSocket();
  const requests = [];
  const answer = { channel: 'room:a', count: 1, users: 1, clients: [{ client: 'c1', user: 'ann' }] };
  const fetch = async (url) => {
    requests.push(url);
    return { ok: true, status: 200, json: async () => answer };
  };
  // Not reachable: the WebSocket never opens, so presence goes over HTTP.
  const client = connect(A, { ...fast, WebSocket, fetch, transports: ['websocket'], token: 't0k' });
  try {
    await until(() => WebSocket.instances.length > 0, 'a connection attempt');
    assert.equal(WebSocket.instances[0].url, 'ws://a.test/ws?token=t0k');
    assert.deepEqual(await client.presence('room:a', { countOnly: true }), answer);
    assert.deepEqual(requests, [`${A}/presence?channel=room%3Aa&count_only=true&token=t0k`]);
  } finally {
    client.close();
  }

  const Open = fakeWebSocket();
  Open.reachable = new Set(['ws://a.test/ws']);
  const overSocket = connect(A, { ...fast, WebSocket: Open });
  await until(() => overSocket.currentState === 'connected', 'connected');
  const pending = overSocket.presence('room:a');
  const sent = Open.instances[0].sent.at(-1);
  assert.deepEqual([sent.op, sent.channel, sent.count_only], ['presence', 'room:a', false]);
  Open.instances[0].push({ id: sent.id, result: answer });
  assert.deepEqual(await pending, answer);
  overSocket.close();
});

test('disconnect: a close that says reconnect false ends the client for good', async () => {
  const WebSocket = fakeWebSocket();
  WebSocket.reachable = new Set(['ws://a.test/ws']);
  const client = connect(A, { ...fast, WebSocket });
  const closed = [];
  client.on('closed', (c) => closed.push(c));
  const states = recordStates(client);
  await until(() => client.currentState === 'connected', 'connected');
  // A 4000 (slow consumer) reconnects as usual...
  WebSocket.instances[0].drop(4000, 'slow consumer');
  await until(() => WebSocket.instances.length === 2 && client.currentState === 'connected', 'reconnected');
  // ...a 4010 with reconnect:false does not.
  const before = states.length;
  WebSocket.instances[1].drop(4010, JSON.stringify({ reason: 'disconnected', reconnect: false }));
  assert.equal(client.currentState, 'closed');
  assert.deepEqual(closed, [{ code: 4010, reason: 'disconnected' }]);
  // Straight to `closed`: no `disconnected` with a retry, so no reconnect was scheduled.
  assert.deepEqual(states.slice(before).map((s) => s.state), ['closed']);
});

test('merge patch: RFC 7396 applied without changing the target', () => {
  const cases = [
    [{ a: 'b' }, { a: 'c' }, { a: 'c' }],
    [{ a: 'b' }, { b: 'c' }, { a: 'b', b: 'c' }],
    [{ a: 'b' }, { a: null }, {}],
    [{ a: [{ b: 'c' }] }, { a: [1] }, { a: [1] }],
    [['a', 'b'], { a: 'c' }, { a: 'c' }],
    [{ e: null }, { a: 1 }, { e: null, a: 1 }],
    [{}, { a: { bb: { ccc: null } } }, { a: { bb: {} } }],
    [{ a: { b: 1, c: 2 } }, { a: { c: 3 } }, { a: { b: 1, c: 3 } }],
  ];
  for (const [target, patch, result] of cases) {
    const before = JSON.stringify(target);
    assert.deepEqual(applyMergePatch(target, patch), result, `${before} + ${JSON.stringify(patch)}`);
    assert.equal(JSON.stringify(target), before, 'the target is not changed');
  }
});

test('latest and delta: asked on subscribe, deltas applied so handlers get full data', async () => {
  const WebSocket = fakeWebSocket();
  WebSocket.reachable = new Set(['ws://a.test/ws']);
  WebSocket.channels.set('prices:ACME', { epoch: 'e1', top: 3 });
  const client = connect(A, { ...fast, WebSocket });
  const got = [];
  const errors = [];
  client.on('error', (e) => errors.push(e.code));
  client.subscribe('prices:ACME', (p) => got.push([p.offset, p.data, p.delta]), { latest: true, delta: true });
  client.subscribe('plain', () => {});
  await until(() => client.position('plain'), 'subscribed');
  const ws = WebSocket.instances[0];
  await until(() => ws.sent.length === 2, 'both subscribed');
  assert.equal(client.position('prices:ACME'), null, 'the latest value brings the position');
  assert.deepEqual(ws.sent.map((m) => [m.channel, m.since, m.delta]), [
    ['prices:ACME', 'latest', true],
    ['plain', undefined, undefined],
  ]);
  const quote = { bid: 1, ask: 2, volume: 10 };
  ws.push({ channel: 'prices:ACME', offset: 3, epoch: 'e1', data: quote });
  ws.push({ channel: 'prices:ACME', offset: 4, epoch: 'e1', delta: { bid: 1.5 } });
  ws.push({ channel: 'prices:ACME', offset: 5, epoch: 'e1', delta: { volume: null, last: 1.5 } });
  assert.deepEqual(got, [
    [3, quote, undefined],
    [4, { bid: 1.5, ask: 2, volume: 10 }, undefined],
    [5, { bid: 1.5, ask: 2, last: 1.5 }, undefined],
  ]);
  assert.deepEqual(quote, { bid: 1, ask: 2, volume: 10 }, 'earlier data is not changed');
  // A delta that does not follow the last publication cannot be applied: surfaced, not delivered.
  ws.push({ channel: 'prices:ACME', offset: 7, epoch: 'e1', delta: { bid: 9 } });
  assert.deepEqual(errors, ['delta_without_base']);
  assert.equal(got.length, 3);
  assert.deepEqual(client.position('prices:ACME'), { epoch: 'e1', offset: 5 });
  client.close();
});

test('latest and delta over SSE and long-poll: one query for the stream', async () => {
  const EventSource = fakeEventSource([A]);
  const client = connect(A, { ...fast, transports: ['sse'], EventSource });
  client.subscribe('prices:ACME', () => {}, { latest: true, delta: true });
  client.subscribe('plain', () => {});
  await until(() => client.currentState === 'connected', 'connected');
  const url = new URL(EventSource.instances.at(-1).url);
  assert.equal(url.searchParams.get('latest'), 'true');
  assert.equal(url.searchParams.get('delta'), 'true');
  client.close();
});

test('long-poll with latest: the first answer brings the latest value, then deltas and skips', async () => {
  const requests = [];
  const answers = [
    {
      cursor: 'x',
      positions: [{ channel: 'prices:A', epoch: 'e', offset: 7 }],
      events: [{ channel: 'prices:A', offset: 7, epoch: 'e', data: { bid: 1, ask: 2 } }],
    },
    {
      cursor: 'y',
      positions: [{ channel: 'prices:A', epoch: 'e', offset: 10 }],
      events: [
        { channel: 'prices:A', offset: 8, epoch: 'e', delta: { bid: 1.5 } },
        { channel: 'prices:A', offset: 10, epoch: 'e', skipped: 1, data: { bid: 3, ask: 4 } },
      ],
    },
  ];
  const fetch = async (url, init) => {
    requests.push(new URL(url));
    const answer = answers.shift();
    if (!answer) {
      await new Promise((_, reject) => init.signal.addEventListener('abort', () => reject(new Error('aborted'))));
    }
    return { ok: true, status: 200, json: async () => answer };
  };
  const client = connect(A, { ...fast, transports: ['poll'], fetch, pollTimeout: 20 });
  const got = [];
  client.subscribe('prices:A', (p) => got.push([p.offset, p.data, p.skipped]), { latest: true, delta: true });
  await until(() => requests.length === 3, 'three polls');
  assert.equal(requests[0].searchParams.get('latest'), 'true');
  assert.equal(requests[0].searchParams.get('delta'), 'true');
  assert.equal(requests[1].searchParams.get('latest'), null, 'a position now: no latest');
  assert.deepEqual(got, [
    [7, { bid: 1, ask: 2 }, undefined],
    [8, { bid: 1.5, ask: 2 }, undefined],
    [10, { bid: 3, ask: 4 }, 1],
  ]);
  assert.deepEqual(client.position('prices:A'), { epoch: 'e', offset: 10 });
  client.close();
});
