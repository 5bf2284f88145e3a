//! The HTTP layer: listeners and routing (`server`), the checks every request passes before its
//! route (`gate`), the server API (`api`; its management of users and channels: `manage`) and
//! its contract (`openapi`), the compiled-in client
//! and demo page (`assets`), the response and error shape (`response`), TLS (`tls`) and the
//! HTTP/1.1 connection of a plain-text SSE stream (`sse_h1`), whose events go
//! straight to the socket (`sse_socket`).

pub(crate) mod api;
pub(crate) mod assets;
pub(crate) mod gate;
pub(crate) mod manage;
pub(crate) mod openapi;
pub(crate) mod response;
pub(crate) mod server;
pub(crate) mod sse_h1;
pub(crate) mod sse_socket;
pub(crate) mod tls;
