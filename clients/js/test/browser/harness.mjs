// Harness of the browser tests: a redis-server and gateway nodes on free loopback ports (the
// gateway binary of this checkout, target/debug/gateway unless GATEWAY_BIN says otherwise), and
// Debian's Chromium driven by playwright-core. Every process started here is killed at exit,
// also when a test fails.

import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import https from 'node:https';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

import { chromium } from 'playwright-core';

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), '../../../..');
/** Where screenshots are kept for CI to pick up. */
export const ARTIFACTS = join(REPO, 'target', 'artifacts');
const GATEWAY_BIN = process.env.GATEWAY_BIN || join(REPO, 'target', 'debug', 'gateway');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

/** Upper bound of any awaited condition: only there to fail instead of hanging. */
export const WAIT_MS = 20000;

const children = new Set();
/** Kills every process this harness started that is still running. */
export function killAll() {
  for (const child of children) child.kill('SIGKILL');
}
process.on('exit', killAll);

export function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

/** Resolves with `check()`'s first truthy value, retrying on failure or falsy. */
export async function eventually(what, check, limitMs = WAIT_MS) {
  const deadline = Date.now() + limitMs;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${last}` : ''}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function track(child, name) {
  children.add(child);
  const log = [];
  const collect = (chunk) => {
    for (const line of chunk.toString().split('\n')) if (line) log.push(line);
    if (log.length > 400) log.splice(0, log.length - 400);
  };
  child.stdout.on('data', collect);
  child.stderr.on('data', collect);
  child.on('exit', () => children.delete(child));
  return {
    name,
    child,
    log,
    exited: new Promise((r) => child.once('exit', r)),
    async kill(signal = 'SIGKILL') {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill(signal);
      await this.exited;
    },
  };
}

function ping(port) {
  return new Promise((resolvePing) => {
    const socket = net.connect(port, '127.0.0.1');
    socket.once('error', () => resolvePing(false));
    socket.once('data', (data) => {
      socket.destroy();
      resolvePing(data.toString().startsWith('+PONG'));
    });
    socket.once('connect', () => socket.write('*1\r\n$4\r\nPING\r\n'));
  });
}

/** A redis-server without persistence on a free port. */
export async function startRedis() {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'gateway-browser-redis-'));
  const proc = track(
    spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir], {
      stdio: ['ignore', 'pipe', 'pipe'],
    }),
    'redis',
  );
  await eventually('redis PONG', () => ping(port));
  return {
    ...proc,
    url: `redis://127.0.0.1:${port}`,
    async stop() {
      await proc.kill();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** The test's environment without RUST_LOG (it would override the node's log level), plus `extra`. */
function gatewayEnv(extra) {
  const env = { ...process.env, NO_COLOR: '1', ...extra };
  delete env.RUST_LOG;
  return env;
}

/**
 * A gateway node on a free port; resolves once it announced its address and /readyz is 200.
 * With `tls` (from `testCertificate`) the node serves HTTPS (ALPN h2, http/1.1), its `url` is
 * `https://localhost:PORT` and its `fetch` trusts the certificate.
 */
export async function startGateway(name, args = [], env = {}, { tls } = {}) {
  if (tls) env = { ...env, GATEWAY__TLS__CERT_FILE: tls.cert, GATEWAY__TLS__KEY_FILE: tls.key };
  const fetchNode = tls ? tls.fetch : fetch;
  const proc = track(
    spawn(GATEWAY_BIN, ['--listen', '127.0.0.1:0', '--log-json', ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: gatewayEnv(env),
    }),
    name,
  );
  try {
    const addr = await eventually(`${name}: "listening on"`, () => {
      if (proc.child.exitCode !== null) throw new Error(`${name} exited`);
      for (const line of proc.log) {
        const m = /listening on (\d+\.\d+\.\d+\.\d+:\d+)/.exec(line);
        if (m) return m[1];
      }
      return null;
    });
    const url = tls ? `https://localhost:${addr.split(':')[1]}` : `http://${addr}`;
    await eventually(`${name}: /readyz 200`, async () => (await fetchNode(`${url}/readyz`)).ok);
    return { ...proc, url, fetch: fetchNode };
  } catch (e) {
    await proc.kill();
    throw new Error(`${e.message}\n${name} log:\n${proc.log.slice(-40).join('\n')}`);
  }
}

/**
 * A self-signed certificate for `localhost` and 127.0.0.1 (openssl), and a `fetch` for Node that
 * trusts it: enough of `fetch` for these tests (method, headers, body; ok, status, text, json).
 */
export function testCertificate() {
  const dir = mkdtempSync(join(tmpdir(), 'gateway-browser-tls-'));
  const cert = join(dir, 'cert.pem');
  const key = join(dir, 'key.pem');
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=localhost',
    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
  ], { stdio: 'ignore' });
  const ca = readFileSync(cert);
  const fetchTls = (url, { method = 'GET', headers = {}, body } = {}) =>
    new Promise((resolveFetch, reject) => {
      const request = https.request(url, { method, headers, ca }, (response) => {
        const chunks = [];
        response.on('data', (c) => chunks.push(c));
        response.on('error', reject);
        response.on('end', () => {
          const text = Buffer.concat(chunks).toString();
          resolveFetch({
            ok: response.statusCode >= 200 && response.statusCode < 300,
            status: response.statusCode,
            text: async () => text,
            json: async () => JSON.parse(text),
          });
        });
      });
      request.on('error', reject);
      request.end(body);
    });
  return { cert, key, fetch: fetchTls, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/** `POST /api/publish`; the ack. `fetchNode`: the node's `fetch` for an HTTPS node. */
export async function publish(base, channel, data, fetchNode = fetch) {
  const response = await fetchNode(`${base}/api/publish`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ channel, data }),
  });
  const body = await response.json();
  if (!response.ok) throw new Error(`publish to ${channel} on ${base}: ${response.status} ${JSON.stringify(body)}`);
  return body;
}

/** The value of one sample of a node's /metrics, or undefined. */
export async function metric(base, name, labels = {}, fetchNode = fetch) {
  const text = await (await fetchNode(`${base}/metrics`)).text();
  const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`);
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    if (want.every((l) => line.includes(l))) return Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return undefined;
}

/**
 * Headless Chromium with a fresh profile and nothing that reaches for the internet; `args` are
 * added to its command line.
 */
export async function launchBrowser(args = []) {
  const profile = mkdtempSync(join(tmpdir(), 'gateway-browser-profile-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1100, height: 760 },
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      ...args,
    ],
  });
  return {
    context,
    async close() {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

export function artifactPath(name) {
  mkdirSync(ARTIFACTS, { recursive: true });
  return join(ARTIFACTS, name);
}
