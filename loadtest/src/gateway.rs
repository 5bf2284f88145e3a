//! Finding the gateway binary for a run; starting and signalling it is testkit's
//! `GatewayProcess` (port 0, the port read from the process's own `listening on` line).

use std::path::{Path, PathBuf};

/// The gateway binary: the given path, else target/release/gateway, else target/debug/gateway
/// (relative to the current directory, then to the workspace this tool was built in).
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(format!("gateway binary {} not found", p.display()))
        };
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for root in [Path::new("."), workspace.as_path()] {
        for profile in ["release", "debug"] {
            let p = root.join("target").join(profile).join("gateway");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(
        "no gateway binary in target/release or target/debug; build it \
         (cargo build --release -p gateway) or pass --gateway-bin"
            .to_string(),
    )
}
