//! Security: what the node knows (`policy`: keys, namespaces, limits, loaded once) and the hooks
//! the HTTP layer and the transports call (`guard`), over JWT and API keys (`auth`), namespace
//! rules (`namespace`), token buckets and connection permits (`limits`), the client's address
//! behind trusted proxies (`client_ip`) and the Origin allow-list and CORS (`origin`).

pub(crate) mod auth;
pub(crate) mod client_ip;
pub(crate) mod guard;
pub(crate) mod limits;
pub(crate) mod namespace;
pub(crate) mod origin;
pub(crate) mod policy;
