//! Nothing: this package only holds the deploy files' tests (`nginx.rs`, `prometheus.rs`, `helm_redis.rs`), kept
//! out of the gateway's test binary because they test `deploy/`, not the gateway's code.
