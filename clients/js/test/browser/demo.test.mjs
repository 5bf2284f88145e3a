// The demo page and the client in real Chromium, against real gateway nodes on one Redis:
// ticker updates over each transport (WebSocket, SSE forced, long-poll forced), a page reload
// that resumes without loss, a node draining (the page follows the reconnect hint to another
// node), and the page's node killed with SIGKILL while publications keep coming: the page moves
// to the other node and misses nothing. A screenshot is kept at
// target/artifacts/demo.png.
//
//   cargo build -p gateway && cd clients/js && npm ci && npm run test:browser

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';

import {
  artifactPath,
  eventually,
  killAll,
  launchBrowser,
  metric,
  publish,
  startGateway,
  startRedis,
  WAIT_MS,
} from './harness.mjs';

const CHAT = 'chat:lobby';
let redis;
let nodeA;
let nodeB;
let browser;

before(async () => {
  redis = await startRedis();
  // A serves the pages; B feeds the tickers (its prices reach A's pages through Redis).
  nodeA = await startGateway('A', ['--redis-url', redis.url]);
  nodeB = await startGateway('B', ['--redis-url', redis.url, '--demo-publisher'], {
    GATEWAY__DEMO__PUBLISHER_INTERVAL: '100ms',
  });
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await nodeA?.kill();
  await nodeB?.kill();
  await redis?.stop();
  killAll();
});

/**
 * Opens the demo page and waits until the client is connected over `transport` and holds a
 * position on the chat channel: only then is a publication sure to be after its starting point.
 */
async function openDemo(base, query, transport, endpoint = base) {
  const page = await browser.context.newPage();
  const problems = [];
  page.on('pageerror', (e) => problems.push(String(e)));
  await page.goto(`${base}/?${query}`);
  await waitConnected(page, transport, endpoint);
  await waitSubscribed(page);
  page.problems = problems;
  return page;
}

async function waitSubscribed(page) {
  await page.waitForFunction((c) => window.demo.client.position(c) !== null, CHAT, { timeout: WAIT_MS });
}

async function waitConnected(page, transport, endpoint) {
  await page.waitForFunction(
    ([t, e]) => {
      const s = window.demo && window.demo.states.at(-1);
      return s && s.state === 'connected' && s.transport === t && s.endpoint === e;
    },
    [transport, endpoint],
    { timeout: WAIT_MS },
  );
}

/** The offsets the page received on `channel`, in order. */
function received(page, channel) {
  return page.evaluate((c) => window.demo.received[c] || [], channel);
}

async function waitReceived(page, channel, predicate, what) {
  return eventually(`${what} (${channel})`, async () => {
    const offsets = await received(page, channel);
    return predicate(offsets) ? offsets : null;
  });
}

function assertConsecutive(offsets, what) {
  for (let i = 1; i < offsets.length; i++) {
    assert.equal(offsets[i], offsets[i - 1] + 1, `${what}: offsets ${JSON.stringify(offsets)}`);
  }
}

/** Tickers move, the chat round-trips through the client's publish, the page shows it all. */
async function checkDemo(page, transport) {
  const prices = await waitReceived(page, 'prices:ACME', (o) => o.length >= 3, 'three ticker updates');
  assertConsecutive(prices, `${transport} ticker`);
  const price = await page.textContent('#price-ACME');
  assert.match(price, /^\d+\.\d\d$/, 'the widget shows a price');
  assert.equal(await page.textContent('#transport'), transport);
  assert.equal(await page.textContent('#state'), 'connected');

  const text = `hello over ${transport} ${Date.now()}`;
  await page.fill('#name', 'tester');
  await page.fill('#text', text);
  await page.click('button[type=submit]');
  await page.waitForFunction((t) => document.querySelector('#messages').textContent.includes(t), text, {
    timeout: WAIT_MS,
  });
  const chat = await received(page, CHAT);
  assertConsecutive(chat, `${transport} chat`);
  // The positions table lists every channel with the position the page holds.
  const rows = await page.$$eval('#positions tr', (trs) => trs.map((tr) => tr.textContent));
  assert.ok(rows.some((r) => r.startsWith(CHAT)), JSON.stringify(rows));
  assert.deepEqual(page.problems, []);
}

test('ticker and chat over WebSocket (screenshot: target/artifacts/demo.png)', async () => {
  const page = await openDemo(nodeA.url, 'transport=websocket', 'websocket');
  await checkDemo(page, 'websocket');
  assert.ok((await metric(nodeA.url, 'gateway_connections', { transport: 'ws' })) >= 1);
  await page.screenshot({ path: artifactPath('demo.png'), fullPage: true });
  await page.close();
});

test('ticker and chat over SSE (forced)', async () => {
  const page = await openDemo(nodeA.url, 'transport=sse', 'sse');
  await checkDemo(page, 'sse');
  assert.ok((await metric(nodeA.url, 'gateway_connections', { transport: 'sse' })) >= 1);
  await page.screenshot({ path: artifactPath('demo-sse.png') });
  await page.close();
});

test('ticker and chat over long-poll (forced)', async () => {
  const page = await openDemo(nodeA.url, 'transport=poll', 'poll');
  await checkDemo(page, 'poll');
  assert.ok((await metric(nodeA.url, 'gateway_deliveries_total', { transport: 'poll' })) >= 3);
  await page.screenshot({ path: artifactPath('demo-poll.png') });
  await page.close();
});

test('a reload resumes from the stored positions without loss or duplicates', async () => {
  const page = await openDemo(nodeA.url, '', 'websocket');
  const first = await publish(nodeB.url, CHAT, { name: 'bot', text: 'before' });
  await waitReceived(page, CHAT, (o) => o.includes(first.offset), 'the first message');
  const before = await page.evaluate((c) => window.demo.client.position(c), CHAT);
  assert.equal(before.offset, first.offset);

  // The page goes away; what is published meanwhile must arrive after the reload.
  await page.evaluate(() => window.demo.client.close());
  const missed = [];
  for (let i = 0; i < 5; i++) missed.push((await publish(nodeB.url, CHAT, { name: 'bot', text: `away ${i}` })).offset);
  await page.reload();
  await waitConnected(page, 'websocket', nodeA.url);
  const after = [];
  for (let i = 0; i < 3; i++) after.push((await publish(nodeB.url, CHAT, { name: 'bot', text: `back ${i}` })).offset);
  const top = after.at(-1);
  const got = await waitReceived(page, CHAT, (o) => o.at(-1) === top, 'every message after the reload');
  assert.deepEqual(got, [...missed, ...after], 'exactly the publications after the stored position');
  assert.equal(got[0], before.offset + 1);
  assert.deepEqual(await page.evaluate(() => window.demo.resets), []);
  await page.close();
});

/** The client ids the page lists as online. */
function online(page) {
  return page.evaluate(() => [...window.demo.online.keys()].sort());
}

test('the chat shows who is online, across nodes, and who left', async () => {
  const first = await openDemo(nodeA.url, 'transport=websocket&persist=off', 'websocket');
  const before = await eventually('the first page lists itself', async () => {
    const ids = await online(first);
    return ids.length >= 1 ? ids : null;
  });
  // A second visitor, on the other node and over SSE: both pages list the same people.
  const second = await openDemo(nodeB.url, 'transport=sse&persist=off', 'sse', nodeB.url);
  const both = await eventually('both pages list both visitors', async () => {
    const [a, b] = [await online(first), await online(second)];
    return a.length === before.length + 1 && JSON.stringify(a) === JSON.stringify(b) ? a : null;
  });
  const newcomer = both.find((id) => !before.includes(id));
  assert.ok(newcomer, JSON.stringify({ before, both }));
  assert.equal(await first.$$eval('#online li', (lis) => lis.length), both.length);
  assert.match(await first.textContent('#online-count'), new RegExp(`\\(${both.length}\\)`));

  await second.close();
  await eventually('the first page shows the second visitor left', async () => {
    const ids = await online(first);
    return ids.length === before.length && !ids.includes(newcomer);
  });
  const events = await first.evaluate(() => window.demo.presenceEvents);
  assert.deepEqual(
    events.filter(([, client]) => client === newcomer).map(([kind]) => kind),
    ['join', 'leave'],
  );
  assert.match(await first.textContent('#messages'), /left/);
  await first.screenshot({ path: artifactPath('demo-online.png') });
  assert.deepEqual(first.problems, []);
  await first.close();
});

test('the page node drains (SIGTERM): the page follows its reconnect hint to the other node', async () => {
  const nodeC = await startGateway('C', ['--redis-url', redis.url], {
    GATEWAY__DRAIN__RECONNECT_JITTER: '300ms',
  });
  try {
    const page = await openDemo(nodeC.url, `endpoints=${nodeC.url},${nodeB.url}&persist=off`, 'websocket', nodeC.url);
    const before = await publish(nodeB.url, CHAT, { name: 'bot', text: 'before the drain' });
    await waitReceived(page, CHAT, (o) => o.includes(before.offset), 'the message before the drain');
    nodeC.child.kill('SIGTERM');
    await waitConnected(page, 'websocket', nodeB.url);
    const afterDrain = await publish(nodeB.url, CHAT, { name: 'bot', text: 'after the drain' });
    const got = await waitReceived(page, CHAT, (o) => o.at(-1) === afterDrain.offset, 'the message after the drain');
    assertConsecutive(got, 'chat across the drain');
    const states = await page.evaluate(() => window.demo.states);
    const wait = states.find((s) => s.state === 'disconnected');
    assert.ok(wait && wait.endpoint === nodeB.url, `straight to the next node: ${JSON.stringify(states)}`);
    assert.ok(wait.retryInMs < 300, `the hint (below drain.reconnect_jitter) is the delay: ${wait.retryInMs}`);
    assert.equal(states.filter((s) => s.state === 'connecting' && s.endpoint === nodeC.url).length, 1, 'no retry on the draining node');
    await page.close();
    await nodeC.exited;
  } finally {
    await nodeC.kill();
  }
});

test('the page node is killed: the page resumes on the other node and misses nothing', async () => {
  const page = await openDemo(nodeA.url, `endpoints=${nodeA.url},${nodeB.url}&persist=off`, 'websocket', nodeA.url);

  // Publish continuously through B, before, during and after the kill — but no more than the
  // channel's history holds (1,000 by default): on a slow machine an unbounded publisher outran
  // it during the failover, and the resume then rightly reported a reset instead of the gap.
  const MAX_PUBLISHED = 900;
  let publishing = true;
  const acks = [];
  const publisher = (async () => {
    while (publishing && acks.length < MAX_PUBLISHED) {
      acks.push((await publish(nodeB.url, CHAT, { name: 'bot', text: `n${acks.length}` })).offset);
    }
  })();
  await waitReceived(page, CHAT, (o) => o.length >= 5, 'messages before the kill');
  await nodeA.kill('SIGKILL');
  await waitConnected(page, 'websocket', nodeB.url);
  const countAtMove = acks.length;
  await eventually('messages published after the move', () => acks.length >= Math.min(countAtMove + 10, MAX_PUBLISHED));
  publishing = false;
  await publisher;

  const top = acks.at(-1);
  const got = await waitReceived(page, CHAT, (o) => o.at(-1) === top, 'every message');
  assert.deepEqual(await page.evaluate(() => window.demo.resets), [], 'no reset: history covered the failover');
  assertConsecutive(got, 'chat across the kill');
  assert.ok(got[0] <= acks[0], `the page had subscribed before the first publication (${got[0]} vs ${acks[0]})`);
  const states = await page.evaluate(() => window.demo.states);
  assert.ok(states.some((s) => s.state === 'disconnected'), 'the page saw the connection drop');
  await page.screenshot({ path: artifactPath('demo-failover.png') });
  await page.close();
});
