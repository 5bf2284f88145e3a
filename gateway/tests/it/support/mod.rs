//! What the test modules import with `use crate::support::*`: the whole `testkit`, the
//! in-process node, the Redis scenarios both Redis test modules run, and SSE over raw HTTP/2.

mod h2;
mod node;
mod scenarios;

pub use h2::*;
pub use node::*;
pub use scenarios::*;
pub use testkit::*;
