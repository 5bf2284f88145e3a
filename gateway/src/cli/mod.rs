//! What the `gateway` binary does besides running a node: check a configuration, print the
//! commented defaults, mint a development token.

mod defaults;
mod token;

pub use defaults::defaults_toml;
pub use token::mint;

/// The version line of `gateway --version`: the crate's version and the git commit it was built
/// from (`unknown` when built outside a checkout without `GATEWAY_GIT_COMMIT`).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("GATEWAY_GIT_COMMIT"),
    ")"
);
