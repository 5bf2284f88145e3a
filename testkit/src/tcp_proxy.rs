//! A TCP proxy a fault test puts between two processes (a replica and its master, the gateway
//! and Redis) to freeze or cut the link: [`TcpProxy::pause`] stops forwarding in both directions
//! (what arrives meanwhile waits, unread, in the proxy's sockets), [`TcpProxy::cut`] closes every
//! connection and drops whatever waited, and [`TcpProxy::retarget`] sends new connections
//! elsewhere (a failover behind a fixed address, as a Kubernetes Service or a VIP does).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A listening proxy on 127.0.0.1; stops (and closes its connections) when dropped.
pub struct TcpProxy {
    pub port: u16,
    target: Arc<Mutex<SocketAddr>>,
    paused: watch::Sender<bool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free port and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let port = listener.local_addr().expect("proxy addr").port();
        let target = Arc::new(Mutex::new(target));
        let (paused, _) = watch::channel(false);
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let (target, paused, connections) =
                (target.clone(), paused.clone(), connections.clone());
            tokio::spawn(async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    let to = *target.lock().unwrap();
                    let paused = paused.subscribe();
                    let task = tokio::spawn(async move {
                        if let Ok(outbound) = TcpStream::connect(to).await {
                            forward_both(inbound, outbound, paused).await;
                        }
                    });
                    let mut connections = connections.lock().unwrap();
                    connections.retain(|t| !t.is_finished());
                    connections.push(task);
                }
            })
        };
        TcpProxy {
            port,
            target,
            paused,
            connections,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Stops forwarding on every connection, open or new, until [`TcpProxy::resume`].
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Closes every connection; what waited in the proxy is lost. New connections are taken.
    pub fn cut(&self) {
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// New connections go to `target` from now on (open ones stay where they are).
    pub fn retarget(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = target;
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Copies both ways until either side closes, then closes both.
async fn forward_both(inbound: TcpStream, outbound: TcpStream, paused: watch::Receiver<bool>) {
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    tokio::select! {
        _ = forward(in_read, out_write, paused.clone()) => {}
        _ = forward(out_read, in_write, paused) => {}
    }
}

async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        // A read is cancel-safe: when a pause starts first, nothing read is lost.
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = paused.wait_for(|p| *p) => continue,
        };
        // Read just as a pause began: held until it ends (or dropped by a cut).
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
