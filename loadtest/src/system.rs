//! The system under test: gateway nodes (embedded, or several on a Redis this tool starts), a peer
//! server (`ws`, uWebSockets, Socket.IO nodes on their own Redis), or servers already running.
//! Everything started here is stopped when the `System` is dropped.

use std::path::PathBuf;

use testkit::{GatewayProcess, RedisOpts, RedisServer};

use crate::gateway;
use crate::peers::{PeerKind, Peers};

/// Which server the load goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SystemKind {
    /// This project's gateway.
    Gateway,
    /// The Node `ws` library's broadcast server (loadtest/peers).
    Ws,
    /// uWebSockets.js (loadtest/peers).
    Uws,
    /// Socket.IO 4 with the Redis streams adapter (loadtest/peers).
    Socketio,
}

impl SystemKind {
    pub fn name(self) -> &'static str {
        match self {
            SystemKind::Gateway => "gateway",
            SystemKind::Ws => "ws",
            SystemKind::Uws => "uws",
            SystemKind::Socketio => "socketio",
        }
    }
}

/// How to start a system.
#[derive(Clone, Debug)]
pub struct Spec {
    pub kind: SystemKind,
    pub nodes: usize,
    /// Gateway only: run on a Redis backplane even with one node.
    pub redis: bool,
    /// Gateway only: enable `/ws/echo`.
    pub echo: bool,
    pub gateway_bin: Option<PathBuf>,
}

/// One server of the system, by its HTTP origin.
#[derive(Clone, Debug)]
pub struct Node {
    pub http: String,
    pub pid: Option<u32>,
}

pub struct System {
    pub kind: SystemKind,
    pub nodes: Vec<Node>,
    gateways: Vec<GatewayProcess>,
    peers: Option<Peers>,
    // Dropped last: the nodes go before their Redis.
    _redis: Option<RedisServer>,
}

impl System {
    /// Starts what `spec` describes on free loopback ports and waits until every node serves.
    pub async fn start(spec: &Spec) -> Result<System, String> {
        let nodes = spec.nodes.max(1);
        match spec.kind {
            SystemKind::Gateway => {
                let bin = gateway::find_binary(spec.gateway_bin.as_deref())?;
                let redis = if spec.redis || nodes > 1 {
                    Some(RedisServer::try_start(RedisOpts::default()).await?)
                } else {
                    None
                };
                let mut args = Vec::new();
                if let Some(r) = &redis {
                    args.push("--redis-url".to_string());
                    args.push(r.url());
                }
                if spec.echo {
                    args.push("--ws-echo".to_string());
                }
                let mut gateways = Vec::with_capacity(nodes);
                for i in 0..nodes {
                    let name = format!("gateway{i}");
                    gateways.push(GatewayProcess::try_start(&bin, &name, &args, &[]).await?);
                }
                Ok(System {
                    kind: spec.kind,
                    nodes: gateways
                        .iter()
                        .map(|g| Node {
                            http: g.url(""),
                            pid: Some(g.pid()),
                        })
                        .collect(),
                    gateways,
                    peers: None,
                    _redis: redis,
                })
            }
            SystemKind::Ws | SystemKind::Uws | SystemKind::Socketio => {
                let (kind, redis) = match spec.kind {
                    SystemKind::Ws => (PeerKind::Ws, None),
                    SystemKind::Uws => (PeerKind::Uws, None),
                    _ => (
                        PeerKind::SocketIo,
                        Some(RedisServer::try_start(RedisOpts::default()).await?),
                    ),
                };
                let nodes = if spec.kind == SystemKind::Socketio {
                    nodes
                } else {
                    1
                };
                let peers = Peers::start(kind, nodes, redis.as_ref().map(|r| r.port)).await?;
                Ok(System {
                    kind: spec.kind,
                    nodes: peers
                        .nodes()
                        .iter()
                        .map(|n| Node {
                            http: format!("http://127.0.0.1:{}", n.port),
                            pid: Some(n.pid),
                        })
                        .collect(),
                    gateways: Vec::new(),
                    peers: Some(peers),
                    _redis: redis,
                })
            }
        }
    }

    /// Servers started by someone else, by origin (`http://host:port` or `ws://host:port`).
    pub fn external(kind: SystemKind, origins: &[String]) -> System {
        System {
            kind,
            nodes: origins
                .iter()
                .map(|o| Node {
                    http: o
                        .replacen("ws://", "http://", 1)
                        .trim_end_matches('/')
                        .to_string(),
                    pid: None,
                })
                .collect(),
            gateways: Vec::new(),
            peers: None,
            _redis: None,
        }
    }

    /// Kills node `index` with `signal` (SIGKILL or SIGTERM). Only for systems started here.
    pub fn signal(&mut self, index: usize, signal: libc::c_int) -> Result<(), String> {
        if let Some(g) = self.gateways.get_mut(index) {
            g.raw_signal(signal);
            return Ok(());
        }
        if let Some(p) = self.peers.as_mut() {
            if index < p.nodes().len() {
                p.kill(index, signal);
                return Ok(());
            }
        }
        Err(format!("node {index} was not started by this run"))
    }

    /// Process ids of the nodes (those known).
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(|n| n.pid).collect()
    }

    /// Where publications are posted on node `index`: the gateway's API or the peers' endpoint.
    pub fn publish_url(&self, index: usize) -> String {
        let path = match self.kind {
            SystemKind::Gateway => "/api/publish",
            _ => "/publish",
        };
        format!("{}{path}", self.nodes[index].http)
    }

    /// The WebSocket echo endpoint of node `index`.
    pub fn echo_url(&self, index: usize) -> String {
        let path = match self.kind {
            SystemKind::Gateway => "/ws/echo",
            _ => "/echo",
        };
        format!("{}{path}", self.nodes[index].http.replacen("http", "ws", 1))
    }
}
