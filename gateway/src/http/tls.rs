//! HTTPS on the main listener: rustls with ALPN `h2` and `http/1.1` (so SSE streams multiplex
//! over one HTTP/2 connection), and the certificate and key reloaded when their files change.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::TlsConfig;
use crate::metrics::Metrics;

/// The current TLS acceptor, replaced when the files change.
#[derive(Clone)]
pub struct Tls {
    current: Arc<RwLock<TlsAcceptor>>,
    cert: PathBuf,
    key: PathBuf,
}

/// Builds a server configuration from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<ServerConfig, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read tls.cert_file {}: {e}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls.cert_file {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls.cert_file {} holds no certificate",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("tls.key_file {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls: the certificate and key do not fit: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl Tls {
    /// `None` when TLS is not configured.
    pub fn load(config: &TlsConfig) -> Result<Option<Tls>, String> {
        let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) else {
            return Ok(None);
        };
        let server = server_config(cert, key)?;
        Ok(Some(Tls {
            current: Arc::new(RwLock::new(TlsAcceptor::from(Arc::new(server)))),
            cert: cert.clone(),
            key: key.clone(),
        }))
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.current.read().clone()
    }

    /// Checks the files every `interval` and loads them when their time or size changed; a
    /// change that does not load keeps the previous certificate (and is counted as an error).
    pub fn spawn_reloader(&self, interval: Duration, metrics: Metrics, stop: CancellationToken) {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut seen = (stamp(&tls.cert), stamp(&tls.key));
            let mut tick = tokio::time::interval(interval);
            tick.reset();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let now = (stamp(&tls.cert), stamp(&tls.key));
                if now == seen {
                    continue;
                }
                seen = now;
                match server_config(&tls.cert, &tls.key) {
                    Ok(server) => {
                        *tls.current.write() = TlsAcceptor::from(Arc::new(server));
                        metrics.tls_reloads.with_label_values(&["ok"]).inc();
                        tracing::info!(cert = %tls.cert.display(), "TLS certificate reloaded");
                    }
                    Err(e) => {
                        metrics.tls_reloads.with_label_values(&["error"]).inc();
                        tracing::warn!(error = %e, "TLS files changed but do not load; keeping the previous certificate");
                    }
                }
            }
        });
    }
}
