//! The shipped nginx front (`deploy/nginx/nginx.conf`) in front of real gateway nodes: Redis, two
//! `gateway` processes and `/usr/sbin/nginx` with a certificate made here, all on loopback.
//! Through nginx: WebSocket over TLS (HTTP/1.1, as browsers do: nginx has no WebSocket over
//! HTTP/2) and its `since` resume; SSE over HTTP/2 (ALPN h2), streamed unbuffered, and its
//! `Last-Event-ID` resume, also with cursors far above nginx's default header size; publishes,
//! which nginx must never resend to another node once sent, while idempotent requests are
//! retried; and an SSE stream whose node drains, resumed through nginx on the other node.
//!
//! The config is the shipped file with only ports, upstream addresses and file paths rewritten
//! (see [`render_config`]); a change to the file's shape that the rewrite no longer recognises
//! fails the test instead of testing something else. nginx is required: without it the test
//! fails (set `NGINX` to use another binary than /usr/sbin/nginx).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;

/// The name the test certificate is issued for; clients resolve it to nginx's loopback address.
const HOST: &str = "gateway.test";

/// The API key of the nodes behind nginx: the API is published through the proxy only with keys
/// (a keyless node refuses proxied `/api/*`, see
/// `the_shipped_config_keeps_a_keyless_api_off_the_public_side`).
const API_KEY: &str = "nginx-test-api-key";

fn api_auth() -> String {
    format!("apikey {API_KEY}")
}

/// `POST /api/publish` straight to a node, with the key; asserts 200 and returns the ack.
async fn publish(node: &impl Endpoint, channel: &str, data: Value) -> Value {
    let resp = within(
        "POST /api/publish",
        http()
            .post(node.url("/api/publish"))
            .header("authorization", api_auth())
            .body(json!({"channel": channel, "data": data}).to_string())
            .send(),
    )
    .await
    .expect("POST /api/publish");
    let (status, body) = json_response(resp).await;
    assert_eq!(status, 200, "publish to {channel:?} failed: {body}");
    body
}

/// The whole history of `channel` straight from a node, with the key, paged.
async fn full_history(node: impl Endpoint, channel: &str) -> (String, u64, Vec<Pub>) {
    let mut since = 0;
    let mut out = Vec::new();
    loop {
        let path = format!(
            "/api/history?channel={}&since={since}&limit=1000",
            enc(channel)
        );
        let resp = within(
            "GET /api/history",
            http()
                .get(node.url(&path))
                .header("authorization", api_auth())
                .send(),
        )
        .await
        .expect("GET /api/history");
        let (status, body) = json_response(resp).await;
        assert_eq!(status, 200, "history of {channel}: {body}");
        let epoch = body["epoch"].as_str().expect("history epoch").to_string();
        let top = body["top"].as_u64().expect("history top");
        let page = body["publications"].as_array().expect("publications");
        for p in page {
            out.push(Pub {
                epoch: p["epoch"].as_str().expect("publication epoch").to_string(),
                offset: p["offset"].as_u64().expect("publication offset"),
                data: p["data"].clone(),
            });
        }
        match out.last() {
            Some(last) if !page.is_empty() && last.offset < top => since = last.offset,
            _ => return (epoch, top, out),
        }
    }
}

fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../nginx/nginx.conf")
}

fn nginx_binary() -> PathBuf {
    let bin = PathBuf::from(std::env::var("NGINX").unwrap_or_else(|_| "/usr/sbin/nginx".into()));
    assert!(
        bin.is_file(),
        "nginx not found at {}: install it (`apt-get install -y nginx`) or set NGINX to the \
         binary. This test does not skip without it.",
        bin.display()
    );
    bin
}

// ---------------------------------------------------------------------------------------------
// Config rendering
// ---------------------------------------------------------------------------------------------

/// Where the rendered config differs from the shipped one.
struct Render<'a> {
    https: u16,
    http: u16,
    /// Replaces every `server` line of `upstream gateway`.
    upstreams: &'a [String],
    dir: &'a Path,
}

/// The shipped config with: `listen 443`/`listen 80` on loopback test ports (IPv6 listens
/// dropped), no `user` line, the upstream servers replaced, certificate and log paths inside
/// `dir`, and nginx's temporary directories (compiled in under /var/lib/nginx) moved into `dir`.
fn render_config(shipped: &str, r: &Render) -> String {
    let dir = r.dir.display();
    let mut out = Vec::new();
    let (mut https, mut http, mut upstream_servers, mut user) = (0, 0, 0, 0);
    let mut in_upstream = false;
    for line in shipped.lines() {
        let t = line.trim_start();
        let indent = &line[..line.len() - t.len()];
        if t.starts_with("listen [::]:") {
            continue;
        }
        // Workers keep the test's user (as root: `nobody`, which can read the temp dir).
        if t.starts_with("user ") {
            user += 1;
            continue;
        }
        if let Some(rest) = t.strip_prefix("listen 443 ") {
            https += 1;
            out.push(format!("{indent}listen 127.0.0.1:{} {rest}", r.https));
            continue;
        }
        if let Some(rest) = t.strip_prefix("listen 80 ") {
            http += 1;
            out.push(format!("{indent}listen 127.0.0.1:{} {rest}", r.http));
            continue;
        }
        if t.starts_with("upstream gateway {") {
            in_upstream = true;
        } else if in_upstream && t.starts_with('}') {
            in_upstream = false;
        } else if in_upstream && t.starts_with("server ") {
            if upstream_servers == 0 {
                for s in r.upstreams {
                    out.push(format!("{indent}server {s};"));
                }
            }
            upstream_servers += 1;
            continue;
        }
        let mut line = line
            .replace("/etc/nginx/certs/", &format!("{dir}/certs/"))
            .replace("/var/log/nginx/", &format!("{dir}/logs/"));
        if t.starts_with("http {") {
            line.push_str(&format!(
                "\n    client_body_temp_path {dir}/tmp/body;\n    proxy_temp_path {dir}/tmp/proxy;\
                 \n    fastcgi_temp_path {dir}/tmp/fastcgi;\n    uwsgi_temp_path {dir}/tmp/uwsgi;\
                 \n    scgi_temp_path {dir}/tmp/scgi;"
            ));
        }
        out.push(line);
    }
    assert_eq!(
        user, 1,
        "expected one `user ...;` line in the shipped config"
    );
    assert_eq!(
        https, 1,
        "expected one `listen 443 ...` line in the shipped config"
    );
    assert_eq!(
        http, 1,
        "expected one `listen 80 ...` line in the shipped config"
    );
    assert!(
        upstream_servers > 0,
        "expected `server` lines in `upstream gateway {{}}` of the shipped config"
    );
    let text = out.join("\n") + "\n";
    for path in ["/etc/", "/var/"] {
        assert!(
            !text.contains(path),
            "rendered config still refers to {path}:\n{text}"
        );
    }
    text
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

struct Tls {
    cert_pem: String,
    key_pem: String,
    cert_der: rustls::pki_types::CertificateDer<'static>,
}

fn self_signed() -> Tls {
    let ck = rcgen::generate_simple_self_signed(vec![HOST.to_string()]).expect("rcgen");
    Tls {
        cert_pem: ck.cert.pem(),
        key_pem: ck.key_pair.serialize_pem(),
        cert_der: ck.cert.der().clone(),
    }
}

/// A rustls client trusting only the test certificate, offering `alpn`.
fn rustls_client(tls: &Tls, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(tls.cert_der.clone()).expect("add test root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

// ---------------------------------------------------------------------------------------------
// nginx process
// ---------------------------------------------------------------------------------------------

/// `nginx` in the foreground (master + workers) with its prefix, config, logs and temporary
/// files in a temporary directory. Stopped on drop (also on panic): SIGTERM to the master, which
/// stops its workers; SIGKILL to the master and the workers it had if it does not exit.
struct Nginx {
    /// `https://gateway.test:<port>` (resolve [`HOST`] to `https_addr`).
    https_addr: SocketAddr,
    http_addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Option<Child>,
    workers: Vec<libc::pid_t>,
    stderr: Arc<Mutex<Vec<String>>>,
    tls: Tls,
}

impl Nginx {
    async fn start(upstreams: &[String]) -> Nginx {
        let bin = nginx_binary();
        let dir = tempfile::tempdir().expect("tempdir for nginx");
        // Workers run as `nobody` when the test runs as root: let them into the directory.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        for sub in ["certs", "logs", "tmp"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let tls = self_signed();
        std::fs::write(dir.path().join("certs/tls.crt"), &tls.cert_pem).unwrap();
        std::fs::write(dir.path().join("certs/tls.key"), &tls.key_pem).unwrap();

        let (https, http) = (free_port(false), free_port(false));
        let shipped = std::fs::read_to_string(shipped_config()).expect("read nginx.conf");
        let conf = render_config(
            &shipped,
            &Render {
                https,
                http,
                upstreams,
                dir: dir.path(),
            },
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, &conf).unwrap();

        let mut cmd = Command::new(bin);
        cmd.arg("-p")
            .arg(format!("{}/", dir.path().display()))
            .arg("-c")
            .arg(&conf_path)
            .arg("-g")
            .arg(format!(
                "daemon off; pid {}/nginx.pid; error_log stderr;",
                dir.path().display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // The master gets SIGTERM (a fast shutdown that also stops its workers) if the test
        // process dies without running destructors.
        signal_with_parent(&mut cmd, libc::SIGTERM);
        let mut child = cmd.spawn().expect("spawn nginx");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        {
            let pipe = child.stderr.take().unwrap();
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    stderr.lock().unwrap().push(line);
                }
            });
        }
        let mut nginx = Nginx {
            https_addr: SocketAddr::from(([127, 0, 0, 1], https)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], http)),
            dir,
            child: Some(child),
            workers: Vec::new(),
            stderr,
            tls,
        };
        // Ready when a request goes all the way through TLS, nginx and a node.
        let client = nginx.client();
        let url = nginx.url("/healthz");
        let child = nginx.child.as_mut().unwrap();
        let stderr = nginx.stderr.clone();
        let conf_for_panic = conf.clone();
        poll_until("nginx to proxy /healthz", WAIT, || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nginx exited ({status}) at startup:\n{}\n---- rendered config ----\n{conf_for_panic}",
                    stderr.lock().unwrap().join("\n")
                );
            }
            let req = client.get(&url).send();
            async move {
                match req.await {
                    Ok(r) if r.status() == 200 => Some(()),
                    _ => None,
                }
            }
        })
        .await;
        nginx.workers = children_of(nginx.child.as_ref().unwrap().id());
        nginx
    }

    fn url(&self, path: &str) -> String {
        format!("https://{HOST}:{}{path}", self.https_addr.port())
    }

    /// An HTTPS client trusting the test certificate, offering h2 and http/1.1 (ALPN), with
    /// no whole-request timeout (streams are long-lived; every wait is bounded by `within`).
    fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.tls.cert_pem.as_bytes()).unwrap(),
            )
            .resolve(HOST, self.https_addr)
            .connect_timeout(WAIT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("https client")
    }

    fn access_log(&self) -> Vec<AccessLine> {
        std::fs::read_to_string(self.dir.path().join("logs/access.log"))
            .unwrap_or_default()
            .lines()
            .map(AccessLine::parse)
            .collect()
    }

    /// Waits until the access log has `n` lines matching `pred` (nginx writes a line when it
    /// finishes a request, which may be just after the client has the whole response).
    async fn wait_access(&self, what: &str, n: usize, pred: impl Fn(&AccessLine) -> bool) {
        let pred = &pred;
        poll_until(what, WAIT, || async move {
            (self.access_log().iter().filter(|l| pred(l)).count() >= n).then_some(())
        })
        .await
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let err = self.stderr.lock().unwrap().clone();
            let access: Vec<String> = self.access_log().into_iter().map(|l| l.raw).collect();
            eprintln!(
                "---- nginx stderr tail ----\n{}\n---- nginx access log tail ----\n{}",
                err[err.len().saturating_sub(30)..].join("\n"),
                access[access.len().saturating_sub(30)..].join("\n")
            );
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            // SAFETY: kill(2) on the pid of our own unreaped child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Ok(None) = child.try_wait() {
            // The master did not stop its workers in time: kill it and them, one by one.
            // SAFETY: kill(2) on our unreaped child and on the workers it forked, still its
            // children while it is unreaped (their pids cannot have been reused).
            unsafe {
                for &w in &self.workers {
                    libc::kill(w, libc::SIGKILL);
                }
                libc::kill(child.id() as libc::pid_t, libc::SIGKILL);
            }
        }
        let _ = child.wait();
    }
}

/// Direct children of `pid` (nginx's workers), from /proc.
fn children_of(pid: u32) -> Vec<libc::pid_t> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// One line of the `gateway` log_format.
#[derive(Debug, Clone)]
struct AccessLine {
    raw: String,
    /// `POST /api/publish HTTP/2.0`
    request: String,
    status: u16,
    /// `$upstream_addr` split on ", " (every node the request was sent to, in order).
    upstreams: Vec<String>,
}

impl AccessLine {
    fn parse(raw: &str) -> AccessLine {
        let quoted = |from: usize| -> (String, usize) {
            let start = raw[from..]
                .find('"')
                .map(|i| from + i + 1)
                .unwrap_or(raw.len());
            let end = raw[start..]
                .find('"')
                .map(|i| start + i)
                .unwrap_or(raw.len());
            (raw[start..end].to_string(), end + 1)
        };
        let (request, after) = quoted(0);
        let status = raw
            .get(after..)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let upstreams = raw
            .find("upstream=")
            .map(|i| quoted(i).0)
            .unwrap_or_default()
            .split(", ")
            .filter(|s| !s.is_empty() && *s != "-")
            .map(String::from)
            .collect();
        AccessLine {
            raw: raw.to_string(),
            request,
            status,
            upstreams,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The stack
// ---------------------------------------------------------------------------------------------

struct Stack {
    // Dropped first: nginx, then the nodes, then Redis.
    nginx: Nginx,
    nodes: Vec<GatewayProcess>,
    _redis: RedisServer,
}

impl Stack {
    /// Redis, two nodes with API keys and `env`, and nginx whose upstream is the two nodes plus
    /// `extra`.
    async fn start(env: &[(&str, &str)], extra: &[String]) -> Stack {
        let mut keyed = vec![("GATEWAY__AUTH__API_KEYS", API_KEY)];
        keyed.extend_from_slice(env);
        Stack::start_nodes_with(&keyed, extra).await
    }

    /// As [`Stack::start`], the nodes configured by `env` alone (no API key unless it sets one).
    async fn start_nodes_with(env: &[(&str, &str)], extra: &[String]) -> Stack {
        nginx_binary();
        let redis = RedisServer::start(RedisOpts::default()).await;
        let mut env_all: Vec<(&str, &str)> = PATIENT.to_vec();
        env_all.extend_from_slice(env);
        let nodes = start_nodes(&Backend::standalone(&redis), 2, &env_all).await;
        let mut upstreams: Vec<String> = nodes
            .iter()
            .map(|n| format!("{} max_fails=3 fail_timeout=10s", n.addr))
            .collect();
        upstreams.extend_from_slice(extra);
        let nginx = Nginx::start(&upstreams).await;
        Stack {
            nginx,
            nodes,
            _redis: redis,
        }
    }

    /// The index of the only node with one open connection of `transport` ("ws", "sse").
    async fn node_holding(&self, transport: &str) -> usize {
        let addrs: Vec<SocketAddr> = self.nodes.iter().map(|n| n.addr).collect();
        let addrs = &addrs;
        poll_until(
            &format!("one node to hold the {transport} connection"),
            WAIT,
            || async move {
                let mut counts = Vec::new();
                for addr in addrs {
                    let text = metrics_text(*addr).await;
                    counts.push(
                        metric(&text, "gateway_connections", &[("transport", transport)])
                            .unwrap_or(0.0),
                    );
                }
                (counts.iter().sum::<f64>() == 1.0)
                    .then(|| counts.iter().position(|c| *c == 1.0).unwrap())
            },
        )
        .await
    }
}

/// `POST /api/publish` through nginx: status, HTTP version, body.
async fn publish_via(
    client: &reqwest::Client,
    nginx: &Nginx,
    channel: &str,
    data: &Value,
) -> (u16, reqwest::Version, Value) {
    let resp = within(
        "POST /api/publish through nginx",
        client
            .post(nginx.url("/api/publish"))
            .header("content-type", "application/json")
            .header("authorization", api_auth())
            .body(json!({"channel": channel, "data": data}).to_string())
            .send(),
    )
    .await
    .expect("POST /api/publish through nginx");
    let (status, version) = (resp.status().as_u16(), resp.version());
    let body = within("publish response body", resp.bytes())
        .await
        .expect("publish response body");
    (
        status,
        version,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", rand::random::<u32>())
}

// ---------------------------------------------------------------------------------------------
// WebSocket over TLS and SSE through nginx: the testkit clients, with nginx's own checks
// ---------------------------------------------------------------------------------------------

type Wss = WsClient<tokio_rustls::client::TlsStream<TcpStream>>;

/// TLS with ALPN `http/1.1` only (what browsers offer for a WebSocket), then the upgrade.
async fn connect_wss(nginx: &Nginx) -> Wss {
    let config = rustls_client(&nginx.tls, &[b"http/1.1"]);
    let ws = within("wss handshake through nginx", async {
        let tcp = TcpStream::connect(nginx.https_addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from(HOST).unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .expect("TLS handshake with nginx");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let url = format!("wss://{HOST}:{}/ws", nginx.https_addr.port());
        let (ws, resp) = tokio_tungstenite::client_async(url, tls)
            .await
            .expect("WebSocket upgrade through nginx");
        assert_eq!(resp.status().as_u16(), 101);
        ws
    })
    .await;
    WsClient::from_ws(ws)
}

/// Subscribes (from `since` if given) and returns the result.
async fn subscribe_wss(ws: &mut Wss, channel: &str, since: Option<(&Value, u64)>) -> Value {
    let mut op = json!({"op": "subscribe", "channel": channel});
    if let Some((epoch, offset)) = since {
        op["since"] = json!({"epoch": epoch, "offset": offset});
    }
    ws.ok(op).await
}

/// The next publication push.
async fn publication_wss(ws: &mut Wss) -> Value {
    let msg = ws.push().await;
    assert!(
        msg.get("offset").is_some() && msg.get("data").is_some(),
        "expected a publication, got {msg}"
    );
    msg
}

async fn close_wss(mut ws: Wss) {
    let _ = within("WebSocket close", ws.ws.close(None)).await;
}

/// An SSE stream through nginx, read by the testkit parser; every block is checked for what a
/// proxy could break (an unknown field, an error instead of a clean end, a cut block).
struct Sse {
    version: reqwest::Version,
    inner: testkit::Sse,
    /// Heartbeat comments seen so far.
    heartbeats: usize,
}

impl Sse {
    /// `GET /sse?<query>` through nginx, asserting a 200 event stream.
    async fn open(
        client: &reqwest::Client,
        nginx: &Nginx,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Sse {
        let mut req = client
            .get(nginx.url(&format!("/sse?{query}")))
            .header("accept", "text/event-stream")
            // As browsers send it: a compressed event stream would be held back by the
            // compressor, so nginx must not compress it.
            .header("accept-encoding", "gzip, deflate, br");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = within("SSE response headers through nginx", req.send())
            .await
            .expect("SSE request through nginx");
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if status != 200 {
            let body = within("SSE error body", resp.text())
                .await
                .unwrap_or_default();
            panic!("SSE through nginx: status {status}: {body}");
        }
        assert!(ct.starts_with("text/event-stream"), "content-type {ct:?}");
        let ce = resp.headers().get("content-encoding");
        assert!(ce.is_none(), "event stream compressed: {ce:?}");
        Sse {
            version: resp.version(),
            inner: testkit::Sse::from_response(resp),
            heartbeats: 0,
        }
    }

    /// The next block (lines up to a blank line); panics if the stream ends first.
    async fn block(&mut self) -> SseBlock {
        match self.try_block().await {
            Some(b) => b,
            None => panic!("SSE stream ended"),
        }
    }

    /// The next block, or None when the response ended cleanly (an error panics).
    async fn try_block(&mut self) -> Option<SseBlock> {
        let Some(b) = self.inner.next_block().await else {
            if let Some(e) = self.inner.stream_error() {
                panic!("SSE stream error (not a clean end): {e}");
            }
            assert!(
                self.inner.unparsed().is_empty(),
                "SSE stream ended inside a block: {:?}",
                String::from_utf8_lossy(self.inner.unparsed())
            );
            return None;
        };
        assert!(b.unknown.is_empty(), "unknown SSE field in {:?}", b.unknown);
        self.heartbeats += b.comments.iter().filter(|c| *c == "heartbeat").count();
        Some(b)
    }

    /// The next event with data (skipping `retry:` and comment blocks).
    async fn event(&mut self) -> SseBlock {
        loop {
            let b = self.block().await;
            if b.data.is_some() {
                return b;
            }
        }
    }

    /// `retry:` first, then the `connected` event; returns it.
    async fn connected(&mut self) -> SseBlock {
        let first = self.block().await;
        assert!(
            first.retry.is_some(),
            "first block is not `retry:`: {first:?}"
        );
        let b = self.event().await;
        assert_eq!(b.event.as_deref(), Some("connected"), "{b:?}");
        assert!(b.id.is_some(), "connected without id: {b:?}");
        b
    }

    /// The next publication event: (id, publication).
    async fn publication(&mut self) -> (String, Value) {
        let b = self.event().await;
        assert_eq!(b.event, None, "expected a publication: {b:?}");
        (b.id.clone().expect("publication without id"), b.json())
    }

    async fn heartbeat(&mut self) {
        let seen = self.heartbeats;
        while self.heartbeats == seen {
            let b = self.block().await;
            assert!(
                b.data.is_none(),
                "unexpected event while waiting for a heartbeat: {b:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// WebSocket over TLS through nginx: subscribe, receive what another node published, resume
/// with `since` after missing publications; plus the port-80 server and body limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_through_nginx_receives_and_resumes() {
    let stack = Stack::start(&[], &[]).await;
    let nginx = &stack.nginx;
    let client = nginx.client();
    let ch = unique("nginx-ws");

    let mut ws = connect_wss(nginx).await;
    let r = subscribe_wss(&mut ws, &ch, None).await;
    assert_eq!(
        (r["offset"].as_u64(), &r["recovered"]),
        (Some(0), &json!(false)),
        "{r}"
    );
    // A channel with no publication has no epoch yet; its first publication brings one.
    assert_eq!(r["epoch"], "", "{r}");
    let held = stack.node_holding("ws").await;
    let other = &stack.nodes[1 - held];

    // (a) published through the other node's own address, delivered through nginx.
    publish(other, &ch, json!({"n": 1})).await;
    let p = publication_wss(&mut ws).await;
    let epoch = p["epoch"].clone();
    assert_tag(&p);
    assert_eq!(
        p,
        json!({"channel": ch, "offset": 1, "epoch": epoch, "tag": p["tag"], "data": {"n": 1}})
    );
    assert_ne!(epoch, "", "{p}");
    // ... and published through nginx (HTTP/2), delivered.
    let (status, version, ack) = publish_via(&client, nginx, &ch, &json!({"n": 2})).await;
    assert_eq!((status, version), (200, reqwest::Version::HTTP_2), "{ack}");
    assert_eq!(ack["offset"], 2);
    let p = publication_wss(&mut ws).await;
    assert_eq!((&p["offset"], &p["data"]), (&json!(2), &json!({"n": 2})));
    let last = p["offset"].as_u64().unwrap();
    close_wss(ws).await;

    // (c) missed while away, published on both nodes.
    for n in 3..=5 {
        publish(&stack.nodes[n % 2], &ch, json!({"n": n})).await;
    }
    let mut ws = connect_wss(nginx).await;
    let r = subscribe_wss(&mut ws, &ch, Some((&epoch, last))).await;
    assert_eq!(
        r["recovered"], true,
        "resume through nginx not recovered: {r}"
    );
    assert_eq!(r["epoch"], epoch);
    for n in 3..=5u64 {
        let p = publication_wss(&mut ws).await;
        assert_eq!(
            (&p["offset"], &p["data"]),
            (&json!(n), &json!({"n": n})),
            "{p}"
        );
    }
    // Then live, with nothing in between.
    publish(&stack.nodes[0], &ch, json!({"n": 6})).await;
    let p = publication_wss(&mut ws).await;
    assert_eq!(
        (&p["offset"], &p["data"]),
        (&json!(6), &json!({"n": 6})),
        "{p}"
    );
    close_wss(ws).await;

    // Port 80: probes are proxied, everything else is redirected to HTTPS (method kept).
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = within(
        "GET :80/healthz",
        plain
            .get(format!("http://{}/healthz", nginx.http_addr))
            .send(),
    )
    .await
    .expect("GET /healthz on port 80");
    assert_eq!(resp.status().as_u16(), 200);
    let resp = within(
        "POST :80/api/publish",
        plain
            .post(format!("http://{}/api/publish", nginx.http_addr))
            .send(),
    )
    .await
    .expect("POST on port 80");
    assert_eq!(resp.status().as_u16(), 308);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    assert!(
        location.starts_with("https://") && location.ends_with("/api/publish"),
        "{location}"
    );

    // Bodies: over the gateway's 64 KiB limit → the gateway's own JSON 413 (nginx's cap is
    // higher and the body is buffered to nginx's temp dir first); far over → nginx's 413.
    let big = "x".repeat(80 * 1024);
    let (status, _, body) = publish_via(&client, nginx, &ch, &json!(big)).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (413, &json!("payload_too_large")),
        "{body}"
    );
    let huge = "x".repeat(200 * 1024);
    let (status, _, body) = publish_via(&client, nginx, &ch, &json!(huge)).await;
    assert_eq!(
        (status, &body),
        (413, &Value::Null),
        "nginx's own 413 expected"
    );
    // Metrics are per node, not served through the load balancer.
    let resp = within("GET /metrics", client.get(nginx.url("/metrics")).send())
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
}

/// SSE over HTTP/2 through nginx, unbuffered, and `Last-Event-ID` resume, also with a cursor
/// and a query far above nginx's default 8 KiB header limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_over_http2_through_nginx_streams_and_resumes() {
    let stack = Stack::start(&[("GATEWAY__SSE__HEARTBEAT_INTERVAL", "1s")], &[]).await;
    let nginx = &stack.nginx;
    let client = nginx.client();
    let a = unique("nginx-sse-a");
    let b = unique("nginx-sse-b");
    let query = channel_query(&[&a, &b]);

    // (b) the stream over HTTP/2 delivers `connected` while the response is open, then
    // publications made after that, then heartbeats: nothing waits for the end of the response.
    let mut sse = Sse::open(&client, nginx, &query, &[]).await;
    assert_eq!(
        sse.version,
        reqwest::Version::HTTP_2,
        "SSE through nginx not over HTTP/2"
    );
    let connected = sse.connected().await;
    let chans = connected_channels(&connected);
    assert_eq!(chans[&a]["offset"], 0, "{chans:?}");
    assert_eq!(
        chans[&a]["epoch"], "",
        "no publication yet, no epoch: {chans:?}"
    );
    let held = stack.node_holding("sse").await;
    let other = &stack.nodes[1 - held];

    publish(other, &a, json!("a1")).await;
    let (id1, p) = sse.publication().await;
    let epoch_a = p["epoch"].clone();
    assert_tag(&p);
    assert_eq!(
        p,
        json!({"channel": a, "offset": 1, "epoch": epoch_a, "tag": p["tag"], "data": "a1"})
    );
    assert_ne!(epoch_a, "", "{p}");
    let (status, _, ack) = publish_via(&client, nginx, &b, &json!("b1")).await;
    assert_eq!(status, 200, "{ack}");
    let (id2, p) = sse.publication().await;
    assert_eq!(
        (p["channel"].as_str(), &p["data"]),
        (Some(b.as_str()), &json!("b1"))
    );
    assert_ne!(id1, id2);
    sse.heartbeat().await;
    drop(sse);

    // (c) missed while away, on both channels and both nodes.
    for n in 2..=4 {
        publish(&stack.nodes[n % 2], &a, json!(format!("a{n}"))).await;
    }
    for n in 2..=3 {
        publish(&stack.nodes[n % 2], &b, json!(format!("b{n}"))).await;
    }
    let mut sse = Sse::open(&client, nginx, &query, &[("Last-Event-ID", &id2)]).await;
    assert_eq!(sse.version, reqwest::Version::HTTP_2);
    let connected = sse.connected().await;
    let chans = connected_channels(&connected);
    assert_eq!(
        (&chans[&a]["recovered"], &chans[&b]["recovered"]),
        (&json!(true), &json!(true)),
        "{chans:?}"
    );
    let mut got: HashMap<String, Vec<Value>> = HashMap::new();
    let mut last_id = String::new();
    for _ in 0..5 {
        let (id, p) = sse.publication().await;
        got.entry(p["channel"].as_str().unwrap().to_string())
            .or_default()
            .push(json!([p["offset"], p["data"]]));
        last_id = id;
    }
    assert_eq!(
        got[&a],
        vec![json!([2, "a2"]), json!([3, "a3"]), json!([4, "a4"])]
    );
    assert_eq!(got[&b], vec![json!([2, "b2"]), json!([3, "b3"])]);
    publish(&stack.nodes[0], &b, json!("b4")).await;
    let (_, p) = sse.publication().await;
    assert_eq!(
        (p["channel"].as_str(), &p["offset"]),
        (Some(b.as_str()), &json!(4)),
        "{p}"
    );
    drop(sse);

    // The query-parameter form of the cursor passes through nginx too.
    let q = format!("{query}&last_event_id={}", enc(&last_id));
    let mut sse = Sse::open(&client, nginx, &q, &[]).await;
    let chans = connected_channels(&sse.connected().await);
    assert_eq!(chans[&b]["recovered"], true, "{chans:?}");
    // b4 was after `last_id`: it comes first, then nothing else until the next live one.
    let (_, p) = sse.publication().await;
    assert_eq!(
        (p["channel"].as_str(), &p["data"]),
        (Some(b.as_str()), &json!("b4")),
        "{p}"
    );
    publish(&stack.nodes[1], &a, json!("a5")).await;
    let (_, p) = sse.publication().await;
    assert_eq!(
        (p["channel"].as_str(), &p["data"]),
        (Some(a.as_str()), &json!("a5")),
        "{p}"
    );
    drop(sse);

    // Many channels with long names: a ~13 KiB query and a ~20 KiB cursor (the full form).
    let many: Vec<String> = (0..60)
        .map(|i| format!("{}-{i:02}-{}", unique("nginx-long"), "x".repeat(180)))
        .collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let query = channel_query(&refs);
    let mut sse = Sse::open(&client, nginx, &query, &[]).await;
    let results = connected_channels(&sse.connected().await);
    assert_eq!(results.len(), 60);
    publish(&stack.nodes[0], &many[0], json!("first")).await;
    let (_, p) = sse.publication().await;
    assert_eq!(p["data"], "first");
    drop(sse);
    // The full cursor a client holding these positions sends (event ids are compact).
    let positions: Vec<_> = many
        .iter()
        .map(|c| {
            let at = if *c == many[0] { &p } else { &results[c] };
            let tag = at["tag"].as_str().map(str::to_string);
            (
                c.clone(),
                at["epoch"].as_str().unwrap().to_string(),
                at["offset"].as_u64().unwrap(),
                tag,
            )
        })
        .collect();
    let cursor = full_cursor(&positions);
    assert!(
        cursor.len() > 16 * 1024,
        "cursor only {} bytes",
        cursor.len()
    );
    publish(&stack.nodes[1], &many[59], json!("missed")).await;
    let mut sse = Sse::open(&client, nginx, &query, &[("Last-Event-ID", &cursor)]).await;
    let chans = connected_channels(&sse.connected().await);
    assert!(
        chans.values().all(|c| c["recovered"] == true),
        "not all recovered"
    );
    let (_, p) = sse.publication().await;
    assert_eq!(
        (p["channel"].as_str(), &p["data"]),
        (Some(many[59].as_str()), &json!("missed"))
    );
}

/// A TCP peer in the upstream list that reads a whole request and closes without answering, as
/// a node that dies after receiving it would. Records `(method, path, body)` of each request.
struct Blackhole {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(String, String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    async fn start() -> Blackhole {
        let listener = TcpListener::bind(("127.0.0.1", free_port(false)))
            .await
            .expect("bind blackhole");
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<(String, String, String)>>> = Arc::default();
        let record = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let mut first = head.lines().next().unwrap_or("").split(' ');
                    let method = first.next().unwrap_or("").to_string();
                    let path = first.next().unwrap_or("").to_string();
                    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).to_string();
                    record.lock().unwrap().push((method, path, body));
                    let _ = conn.shutdown().await;
                });
            }
        });
        Blackhole { addr, seen, task }
    }

    fn seen(&self) -> Vec<(String, String, String)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// (d) Publishes through nginx succeed and are never sent to a second node: with a peer in the
/// pool that takes requests and dies, a publish it took fails with 502 (and is not stored),
/// every other one is stored exactly once; a publish whose connection attempt was refused is
/// moved on (nothing was sent). Idempotent requests are retried past the dying peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_through_nginx_is_never_retried_on_another_node() {
    let blackhole = Blackhole::start().await;
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port(false)));
    let extra = [
        format!("{} max_fails=0", blackhole.addr),
        format!("{dead} max_fails=0"),
    ];
    let stack = Stack::start(&[], &extra).await;
    let nginx = &stack.nginx;
    let client = nginx.client();
    let ch = unique("nginx-pub");
    let nodes: Vec<String> = stack.nodes.iter().map(|n| n.addr.to_string()).collect();
    let (hole, dead) = (blackhole.addr.to_string(), dead.to_string());

    // Sequential publishes: every one finds all four peers idle, so least_conn rotates through
    // them all (the shared zone makes that so across workers too).
    let total = 24u64;
    let mut outcome: Vec<(u64, u16, Value)> = Vec::new();
    for n in 0..total {
        let (status, version, body) = publish_via(&client, nginx, &ch, &json!({"n": n})).await;
        assert_eq!(version, reqwest::Version::HTTP_2);
        assert!(
            status == 200 || status == 502,
            "publish {n}: {status} {body}"
        );
        outcome.push((n, status, body));
    }
    let failed: Vec<u64> = outcome.iter().filter(|o| o.1 == 502).map(|o| o.0).collect();
    let ok: Vec<&(u64, u16, Value)> = outcome.iter().filter(|o| o.1 == 200).collect();
    let swallowed: Vec<u64> = blackhole
        .seen()
        .iter()
        .filter(|(m, p, _)| m == "POST" && p == "/api/publish")
        .map(|(_, _, body)| {
            let v: Value = serde_json::from_str(body).expect("publish body");
            v["data"]["n"].as_u64().unwrap()
        })
        .collect();
    assert!(
        !swallowed.is_empty() && !ok.is_empty(),
        "the pool rotation never reached the dying peer or never a node: {outcome:?}"
    );
    assert_eq!(
        failed, swallowed,
        "502s are exactly the publishes the dying peer took"
    );

    // Stored exactly once, in order, for every 200 and never for a 502: no resend happened.
    let (_, top, history) = full_history(stack.nodes[0].addr, &ch).await;
    let stored: Vec<u64> = history
        .iter()
        .map(|p| p.data["n"].as_u64().unwrap())
        .collect();
    let acked: Vec<u64> = ok.iter().map(|o| o.0).collect();
    assert_eq!(stored, acked, "history vs 200 answers");
    assert_eq!(top, acked.len() as u64);
    for (i, o) in ok.iter().enumerate() {
        assert_eq!(o.2["offset"], i as u64 + 1, "{:?}", o.2);
    }

    // nginx's own record: a publish went to one node, or to the dead port first (refused,
    // nothing sent) and then one more peer; never to the dying peer and then anywhere else.
    let is_pub = |l: &AccessLine| l.request.starts_with("POST /api/publish ");
    nginx
        .wait_access("every publish in the access log", total as usize, is_pub)
        .await;
    let mut moved_on = 0;
    for l in nginx.access_log().iter().filter(|l| is_pub(l)) {
        let ups = &l.upstreams;
        let (last, before) = ups.split_last().expect("publish without upstream");
        assert!(
            before.iter().all(|u| *u == dead),
            "publish sent to more than one peer: {}",
            l.raw
        );
        moved_on += usize::from(!before.is_empty());
        if *last == hole {
            assert_eq!(l.status, 502, "{}", l.raw);
        } else {
            assert!(nodes.contains(last), "{}", l.raw);
            assert_eq!(l.status, 200, "{}", l.raw);
        }
    }
    assert!(
        moved_on > 0,
        "no publish was moved on from the refused port"
    );

    // Idempotent requests are retried past the dying peer: every one succeeds.
    let before = blackhole.seen().len();
    for _ in 0..8 {
        let resp = within(
            "GET /api/history through nginx",
            client
                .get(nginx.url(&format!("/api/history?channel={}", enc(&ch))))
                .header("authorization", api_auth())
                .send(),
        )
        .await
        .expect("GET /api/history");
        assert_eq!(resp.status().as_u16(), 200);
    }
    assert!(
        blackhole.seen().len() > before,
        "no GET reached the dying peer"
    );
    let is_hist = |l: &AccessLine| l.request.starts_with("GET /api/history");
    nginx
        .wait_access("every history GET in the access log", 8, is_hist)
        .await;
    assert!(
        nginx
            .access_log()
            .iter()
            .filter(|l| is_hist(l))
            .any(|l| l.upstreams.contains(&hole) && nodes.contains(l.upstreams.last().unwrap())),
        "no GET was retried from the dying peer to a node"
    );
}

/// A node drains (SIGTERM) under an SSE stream that goes through nginx: the stream ends cleanly
/// after a `retry:` hint (no error, no hang in nginx), and the client's `Last-Event-ID`
/// reconnect through nginx lands on the other node and misses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_through_nginx_survives_a_node_drain() {
    let drain = [
        ("GATEWAY__DRAIN__DELAY", "300ms"),
        ("GATEWAY__DRAIN__WINDOW", "300ms"),
        ("GATEWAY__DRAIN__RECONNECT_JITTER", "100ms"),
    ];
    let stack = Stack::start(&drain, &[]).await;
    let nginx = &stack.nginx;
    let client = nginx.client();
    let ch = unique("nginx-drain");
    let query = channel_query(&[&ch]);

    let mut sse = Sse::open(&client, nginx, &query, &[]).await;
    sse.connected().await;
    let held = stack.node_holding("sse").await;
    let (draining, staying) = (&stack.nodes[held], &stack.nodes[1 - held]);
    publish(staying, &ch, json!(1)).await;
    let (mut last_id, p) = sse.publication().await;
    assert_eq!(p["data"], 1);
    let mut received = vec![1];

    draining.sigterm();
    for n in 2..=4 {
        publish(staying, &ch, json!(n)).await;
    }
    // Whatever arrives before the node closes the stream, then `retry:` and a clean end.
    let mut retry_hint = false;
    while let Some(b) = sse.try_block().await {
        if b.data.is_some() {
            let p = b.json();
            received.push(p["data"].as_u64().unwrap());
            last_id = b.id.clone().unwrap();
        }
        retry_hint |= b.retry.is_some();
    }
    assert!(
        retry_hint,
        "the draining node ended the stream without a `retry:` hint"
    );
    drop(sse);

    // A client comes back after the hint; by then the node has stopped accepting.
    let addr = draining.addr;
    poll_until("the draining node to stop accepting", WAIT, || async move {
        (readyz(addr).await.0 == 0).then_some(())
    })
    .await;
    let mut sse = Sse::open(&client, nginx, &query, &[("Last-Event-ID", &last_id)]).await;
    let chans = connected_channels(&sse.connected().await);
    assert_eq!(chans[&ch]["recovered"], true, "{chans:?}");
    while received.last() != Some(&4) {
        let (_, p) = sse.publication().await;
        received.push(p["data"].as_u64().unwrap());
    }
    publish(staying, &ch, json!(5)).await;
    let (_, p) = sse.publication().await;
    received.push(p["data"].as_u64().unwrap());
    assert_eq!(received, vec![1, 2, 3, 4, 5], "across the drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_through_nginx_waits_resumes_and_skips_a_draining_node() {
    // A drain delay long enough that the draining node still answers (503) during the test.
    let drain = [
        ("GATEWAY__DRAIN__DELAY", "20s"),
        ("GATEWAY__SERVER__SHUTDOWN_TIMEOUT", "30s"),
    ];
    let stack = Stack::start(&drain, &[]).await;
    let nginx = &stack.nginx;
    let client = nginx.client();
    let ch = unique("nginx-poll");
    let poll = |cursor: String, timeout: u32| {
        let url = nginx.url(&format!(
            "/poll?{}&cursor={cursor}&timeout={timeout}",
            channel_query(&[&ch])
        ));
        let client = client.clone();
        async move {
            let resp = within("GET /poll through nginx", client.get(url).send())
                .await
                .expect("GET /poll through nginx");
            let (status, version) = (resp.status().as_u16(), resp.version());
            let cache = resp.headers().get("cache-control").cloned();
            let body: Value =
                serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap_or(Value::Null);
            assert_eq!(status, 200, "{body}");
            assert_eq!(version, reqwest::Version::HTTP_2);
            assert_eq!(
                cache.as_ref().map(|v| v.to_str().unwrap()),
                Some("no-store")
            );
            body
        }
    };

    let first = poll(String::new(), 0).await;
    let cursor = first["cursor"].as_str().unwrap().to_string();
    // A poll that waits (the answer is not held back by proxy buffering once it comes).
    let waiting = tokio::spawn(poll(cursor.clone(), 10));
    let holder = poll_until("a node to hold the waiting poll", WAIT, || {
        let nodes: Vec<SocketAddr> = stack.nodes.iter().map(|n| n.addr).collect();
        async move {
            for (i, addr) in nodes.iter().enumerate() {
                let text = metrics_text(*addr).await;
                if metric(&text, "gateway_connections", &[("transport", "poll")]) == Some(1.0) {
                    return Some(i);
                }
            }
            None
        }
    })
    .await;
    publish(&stack.nodes[1 - holder], &ch, json!(1)).await;
    let answer = within("the waiting poll", waiting).await.unwrap();
    assert_eq!(poll_offsets(&answer), vec![1]);
    let cursor = answer["cursor"].as_str().unwrap().to_string();

    // Node 0 drains: it answers new polls with 503, and nginx asks node 1 instead.
    stack.nodes[0].sigterm();
    let addr = stack.nodes[0].addr;
    poll_until("node 0 to report not ready", WAIT, || async move {
        (readyz(addr).await.0 == 503).then_some(())
    })
    .await;
    for n in 2..=5 {
        publish(&stack.nodes[1], &ch, json!(n)).await;
    }
    // Polls until nginx has offered one to node 0 (least_conn over idle nodes alternates) and every
    // publication arrived; node 0's 503 is retried on node 1, so the client only sees 200s.
    let retried = |l: &AccessLine| {
        l.request.starts_with("GET /poll") && l.upstreams.len() >= 2 && l.raw.contains("503")
    };
    let mut got = Vec::new();
    let mut cursor = cursor;
    for _ in 0..10 {
        let answer = poll(cursor.clone(), 0).await;
        got.extend(poll_offsets(&answer));
        cursor = answer["cursor"].as_str().unwrap().to_string();
        if got.len() >= 4 && nginx.access_log().iter().any(retried) {
            break;
        }
    }
    assert_eq!(got, vec![2, 3, 4, 5], "every offset once, in order");
    nginx
        .wait_access(
            "a poll answered 503 by node 0 and retried on node 1",
            1,
            retried,
        )
        .await;
}

/// A publication's tag: 8 lowercase hex digits.
fn assert_tag(p: &Value) {
    let tag = p["tag"].as_str().unwrap_or_default();
    assert!(
        tag.len() == 8
            && tag
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "publication tag {tag:?}: {p}"
    );
}

/// `#13.5`: the shipped front publishes no open API. Nodes as `deploy/local-cluster.sh` runs them
/// (loopback, no API key — allowed, since loopback callers are local) refuse `/api/*` that came
/// through nginx; nodes with keys answer 401 to a proxied request without one and serve it with
/// one. Direct local callers keep the keyless API.
#[tokio::test]
async fn the_shipped_config_keeps_a_keyless_api_off_the_public_side() {
    let keyless = Stack::start_nodes_with(&[], &[]).await;
    let nginx = &keyless.nginx;
    let client = nginx.client();
    let ch = unique("open-api");
    for key in [None, Some("apikey anything")] {
        let mut req = client
            .post(nginx.url("/api/publish"))
            .header("content-type", "application/json")
            .body(json!({"channel": ch, "data": 1}).to_string());
        if let Some(key) = key {
            req = req.header("authorization", key);
        }
        let got = json_response(within("POST /api/publish", req.send()).await.unwrap()).await;
        assert_error(&got, 401, "invalid_api_key");
        let mut req = client.get(nginx.url(&format!("/api/history?channel={}", enc(&ch))));
        if let Some(key) = key {
            req = req.header("authorization", key);
        }
        let got = json_response(within("GET /api/history", req.send()).await.unwrap()).await;
        assert_error(&got, 401, "invalid_api_key");
    }
    // Nothing was stored; a local caller, straight to the node, still publishes.
    let (_, top, _) = full_history(keyless.nodes[0].addr, &ch).await;
    assert_eq!(top, 0);
    publish(&keyless.nodes[0], &ch, json!(1)).await;
    drop(keyless);

    let keyed = Stack::start(&[], &[]).await;
    let nginx = &keyed.nginx;
    let client = nginx.client();
    let no_key = within(
        "POST /api/publish without a key",
        client
            .post(nginx.url("/api/publish"))
            .header("content-type", "application/json")
            .body(json!({"channel": ch, "data": 1}).to_string())
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(no_key.headers()["www-authenticate"], "apikey");
    assert_error(&json_response(no_key).await, 401, "invalid_api_key");
    let history = within(
        "GET /api/history without a key",
        client
            .get(nginx.url(&format!("/api/history?channel={}", enc(&ch))))
            .send(),
    )
    .await
    .unwrap();
    assert_error(&json_response(history).await, 401, "invalid_api_key");
    let (status, _, body) = publish_via(&client, nginx, &ch, &json!(2)).await;
    assert_eq!(status, 200, "{body}");
}
