//! The gateway's integration tests, in one binary that compiles and links once (the layout of
//! linkerd's `app/integration`): one module per area, the helpers in `testkit` (the workspace
//! crate) plus `support` (what needs the gateway library itself). Every test drives real
//! sockets: in-process nodes, or gateway and redis-server processes. The deploy files' tests
//! (nginx, Prometheus) live in `deploy/tests`.

mod support;

mod cli;
mod config;
mod conflation;
mod delta_updates;
mod demo;
mod drain;
mod fresh_channels;
mod fuzz_corpus;
mod heartbeat;
mod http_api;
mod latest_value;
mod manage_api;
mod namespace_history;
mod poll;
mod presence;
mod redis_catchup;
mod redis_cluster;
mod redis_fanout;
mod redis_faults;
mod redis_outage;
mod redis_poll;
mod redis_publish_batch;
mod redis_pubsub;
mod redis_rollbacks;
mod redis_sentinel;
mod redis_sentinel_auth;
mod resume;
mod rollback_resume;
mod security;
mod security_holes;
mod shutdown;
mod slow_consumer;
mod sse;
mod sse_http1;
mod sse_ids;
mod tls;
mod versioned_publish;
mod websocket;
mod ws_deflate;
mod ws_frames;
mod ws_h2;
