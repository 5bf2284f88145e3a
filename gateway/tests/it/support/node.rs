//! A gateway node running inside the test process (for tests that build a `gateway::Config` in
//! code or shut a node down in-process); everything else drives gateway processes through
//! `testkit`. Implements [`Endpoint`], so every testkit client talks to it like to a process.

use std::net::SocketAddr;
use std::time::Duration;

use gateway::{Config, Gateway, RunningGateway};
use testkit::{within, Endpoint};

/// A configuration listening on an ephemeral loopback port.
pub fn test_config() -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.shutdown_timeout = Duration::from_secs(5);
    config
}

/// A node running in this process; shut down gracefully with [`Node::shutdown`], or simply
/// dropped at the end of the test.
pub struct Node {
    pub addr: SocketAddr,
    running: Option<RunningGateway>,
}

impl Node {
    pub async fn start(config: Config) -> Node {
        let running = within("Gateway::start", Gateway::start(config))
            .await
            .expect("gateway failed to start");
        let addr = running.local_addr();
        Node {
            addr,
            running: Some(running),
        }
    }

    pub async fn default() -> Node {
        Node::start(test_config()).await
    }

    pub async fn with(f: impl FnOnce(&mut Config)) -> Node {
        let mut config = test_config();
        f(&mut config);
        Node::start(config).await
    }

    /// Takes the running gateway out, e.g. to shut it down from another task.
    pub fn take(&mut self) -> RunningGateway {
        self.running.take().expect("node already shut down")
    }

    pub async fn shutdown(mut self) {
        let running = self.take();
        within("graceful shutdown", running.shutdown()).await;
    }
}

impl Endpoint for Node {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
}
