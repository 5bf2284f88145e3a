//! HTTPS on the main listener: ALPN picks HTTP/2, many SSE streams share one HTTP/2 connection,
//! HTTP/1.1 clients still work, and a replaced certificate is served without a restart.

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

pub(crate) struct Certs {
    dir: tempfile::TempDir,
    pub(crate) der: Vec<u8>,
    pub(crate) pem: String,
}

impl Certs {
    pub(crate) fn new() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let mut certs = Certs {
            dir,
            der: Vec::new(),
            pem: String::new(),
        };
        certs.replace();
        certs
    }

    /// Writes a fresh self-signed certificate for `localhost` over the files.
    fn replace(&mut self) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        self.der = ck.cert.der().to_vec();
        self.pem = ck.cert.pem();
        // The key first: a reload between the two writes fails and keeps the old pair.
        std::fs::write(self.dir.path().join("key.pem"), ck.key_pair.serialize_pem()).unwrap();
        std::fs::write(self.dir.path().join("cert.pem"), &self.pem).unwrap();
    }

    pub(crate) fn configure(&self, config: &mut gateway::Config) {
        config.tls.cert_file = Some(self.dir.path().join("cert.pem"));
        config.tls.key_file = Some(self.dir.path().join("key.pem"));
        config.tls.reload_interval = Duration::from_millis(50);
    }
}

/// A TLS connection to the node offering `alpn`, trusting `trusted` (DER).
pub(crate) async fn tls_connect(
    node: &Node,
    trusted: &[u8],
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(trusted.to_vec())).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(node.addr).await.unwrap();
    within(
        "TLS handshake",
        TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("TLS handshake")
}

pub(crate) fn https_client(certs: &Certs, node: &Node, http1_only: bool) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(certs.pem.as_bytes()).unwrap())
        .resolve("localhost", node.addr)
        .timeout(WAIT);
    if http1_only {
        builder = builder.http1_only();
    }
    builder.build().unwrap()
}

pub(crate) fn https(node: &Node, path: &str) -> String {
    format!("https://localhost:{}{path}", node.addr.port())
}

/// Reads a streaming body until `needle` has arrived; returns everything read.
async fn read_until(body: &mut hyper::body::Incoming, needle: &str) -> String {
    let mut text = String::new();
    within(&format!("{needle:?} on the stream"), async {
        while !text.contains(needle) {
            let frame = body
                .frame()
                .await
                .expect("stream ended")
                .expect("body error");
            if let Some(data) = frame.data_ref() {
                text.push_str(&String::from_utf8_lossy(data));
            }
        }
    })
    .await;
    text
}

#[tokio::test]
async fn many_sse_streams_multiplex_over_one_http2_connection() {
    let certs = Certs::new();
    let node = Node::with(|c| certs.configure(c)).await;
    let tls = tls_connect(&node, &certs.der, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);

    const STREAMS: usize = 40;
    let mut bodies = Vec::new();
    for i in 0..STREAMS {
        let uri = https(&node, &format!("/sse?channel=tls-{i}"));
        let mut body = open_h2_stream(&mut sender, uri).await;
        read_until(&mut body, "event: connected").await;
        bodies.push(body);
    }
    // Every stream is open at once on the one connection.
    let client = https_client(&certs, &node, false);
    let metrics = client
        .get(https(&node, "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let open = metric(&metrics, "gateway_connections", &[("transport", "sse")]).unwrap();
    assert_eq!(open as usize, STREAMS, "{metrics}");

    // A publication reaches its stream through the shared connection.
    for i in [0, STREAMS / 2, STREAMS - 1] {
        let resp = client
            .post(https(&node, "/api/publish"))
            .json(&json!({"channel": format!("tls-{i}"), "data": {"n": i}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        let text = read_until(&mut bodies[i], "\"n\":").await;
        assert!(text.contains(&format!("\"n\":{i}")), "{text}");
    }
}

#[tokio::test]
async fn http1_clients_work_over_tls_too() {
    let certs = Certs::new();
    let node = Node::with(|c| certs.configure(c)).await;
    let client = https_client(&certs, &node, true);
    let resp = client.get(https(&node, "/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    let tls = tls_connect(&node, &certs.der, &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    // Plain HTTP on the TLS port gets no answer but a closed connection.
    let plain = reqwest::Client::new()
        .get(node.url("/healthz"))
        .timeout(WAIT)
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
}

#[tokio::test]
async fn a_replaced_certificate_is_served_without_restart() {
    let mut certs = Certs::new();
    let node = Node::with(|c| certs.configure(c)).await;
    let old = certs.der.clone();
    let client = https_client(&certs, &node, false);
    let reloads = |client: reqwest::Client, node_url: String| async move {
        let text = client
            .get(node_url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric(&text, "gateway_tls_reloads_total", &[("result", "ok")]).unwrap_or(0.0)
    };
    let before = reloads(client.clone(), https(&node, "/metrics")).await;
    certs.replace();
    assert_ne!(old, certs.der);
    // The old client still trusts the old certificate only; wait for the reload through it
    // (kept-alive connection), then a new handshake must present the new certificate.
    within("certificate reload", async {
        while reloads(client.clone(), https(&node, "/metrics")).await <= before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let tls = tls_connect(&node, &certs.der, &[b"h2"]).await;
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(presented, certs.der);
}

#[tokio::test]
async fn unusable_certificate_files_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
    std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
    let mut config = test_config();
    config.tls.cert_file = Some(dir.path().join("cert.pem"));
    config.tls.key_file = Some(dir.path().join("key.pem"));
    let err = gateway::Gateway::start(config)
        .await
        .err()
        .expect("must not start");
    assert!(err.to_string().contains("tls"), "{err}");
}
