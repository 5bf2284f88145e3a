//! The client transports: WebSocket (`ws/`), SSE and long-poll. Each turns a connection into a
//! session's commands and writes the session's outputs in its own framing; the query of the two
//! plain-HTTP ones is read once (`stream_query`); their writes are bounded in time (`bounded`).

pub(crate) mod bounded;
pub(crate) mod poll;
pub(crate) mod sse;
pub(crate) mod sse_sink;
pub(crate) mod stream_query;
pub(crate) mod ws;
