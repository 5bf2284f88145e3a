// WebSocket over HTTP/2 (RFC 8441) in real Chromium: a page loaded over HTTPS from the node
// (ALPN h2) opens `new WebSocket("wss://<same origin>/ws")`; Chromium sends it as an extended
// CONNECT stream of the page's HTTP/2 connection. The page subscribes and receives a
// publication, and the node's gateway_websocket_connections{http_version="2"} proves the
// WebSocket ran over HTTP/2 (and none over HTTP/1.1). The demo page's shipped client does the
// same.
//
//   cargo build -p gateway && cd clients/js && npm ci && node --test test/browser/ws_h2.test.mjs

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';

import {
  eventually,
  killAll,
  launchBrowser,
  metric,
  publish,
  startGateway,
  testCertificate,
  WAIT_MS,
} from './harness.mjs';

let tls;
let node;
let browser;

before(async () => {
  tls = testCertificate();
  node = await startGateway('h2', [], {}, { tls });
  // The certificate is self-signed; Chromium is told to accept it rather than given a CA.
  browser = await launchBrowser(['--ignore-certificate-errors']);
});

after(async () => {
  await browser?.close();
  await node?.kill();
  tls?.remove();
  killAll();
});

const websockets = (version) => metric(node.url, 'gateway_websocket_connections', { http_version: version }, node.fetch);

test('a page served over h2 opens its WebSocket as a stream of the same connection', async () => {
  const page = await browser.context.newPage();
  await page.goto(`${node.url}/healthz`);
  const protocol = await page.evaluate(() => performance.getEntriesByType('navigation')[0].nextHopProtocol);
  assert.equal(protocol, 'h2', 'the page itself came over HTTP/2');

  // A plain `new WebSocket`, as any page would; messages are kept for the test to look at.
  await page.evaluate(
    (channel) =>
      new Promise((resolve, reject) => {
        const ws = new WebSocket(`wss://${location.host}/ws`);
        window.messages = [];
        window.ws = ws;
        ws.onmessage = (e) => window.messages.push(JSON.parse(e.data));
        ws.onerror = () => reject(new Error('WebSocket error'));
        ws.onopen = () => {
          ws.send(JSON.stringify({ id: 1, op: 'subscribe', channel }));
          resolve();
        };
      }),
    'h2:browser',
  );
  await page.waitForFunction(() => window.messages.some((m) => m.id === 1 && m.result), null, { timeout: WAIT_MS });

  await eventually('the WebSocket counted over HTTP/2', async () => (await websockets('2')) === 1);
  assert.equal(await websockets('1.1'), 0, 'no WebSocket over HTTP/1.1');

  const ack = await publish(node.url, 'h2:browser', { text: 'over h2' }, node.fetch);
  const pushed = await page.waitForFunction(
    (offset) => window.messages.find((m) => m.channel === 'h2:browser' && m.offset === offset),
    ack.offset,
    { timeout: WAIT_MS },
  );
  assert.deepEqual((await pushed.jsonValue()).data, { text: 'over h2' });

  // A clean close from the page: the node echoes it and the stream is gone.
  const closed = await page.evaluate(
    () =>
      new Promise((resolve) => {
        window.ws.onclose = (e) => resolve({ code: e.code, wasClean: e.wasClean });
        window.ws.close(1000, 'done');
      }),
  );
  assert.deepEqual(closed, { code: 1000, wasClean: true });
  await eventually('the WebSocket gone from the gauge', async () => (await websockets('2')) === 0);
  await page.close();
});

test('the shipped client on the demo page connects over h2 as well', async () => {
  const page = await browser.context.newPage();
  const problems = [];
  page.on('pageerror', (e) => problems.push(String(e)));
  await page.goto(`${node.url}/?transport=websocket`);
  await page.waitForFunction(
    (endpoint) => {
      const s = window.demo && window.demo.states.at(-1);
      return s && s.state === 'connected' && s.transport === 'websocket' && s.endpoint === endpoint;
    },
    node.url,
    { timeout: WAIT_MS },
  );
  await eventually('the demo WebSocket counted over HTTP/2', async () => (await websockets('2')) === 1);
  assert.equal(await websockets('1.1'), 0, 'no WebSocket over HTTP/1.1');
  assert.deepEqual(problems, []);
  await page.close();
  await eventually('the demo WebSocket gone', async () => (await websockets('2')) === 0);
});
