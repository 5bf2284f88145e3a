//! What the test modules import with `use crate::support::*`: the whole `testkit`, the
//! in-process node and the Redis scenarios both Redis test modules run.

mod node;
mod scenarios;

pub use node::*;
pub use scenarios::*;
pub use testkit::*;
