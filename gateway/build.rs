//! Build-time facts for the binary: the git commit it was built from (`gateway --version`), and
//! the doc comments of the configuration structs in `src/config.rs` (`gateway config defaults`
//! prints them above every key, so the commented defaults file can never drift from the code).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    git_commit();
    let config = Path::new("src/config.rs");
    println!("cargo:rerun-if-changed={}", config.display());
    // Missing only in the Dockerfile's dependency layer (placeholder sources): no docs then.
    let source = fs::read_to_string(config).unwrap_or_default();
    fs::write(out.join("config_docs.rs"), config_docs(&source)).expect("write config_docs.rs");
}

/// `GATEWAY_GIT_COMMIT`: the environment's (a Docker build has no .git), else `git rev-parse`,
/// else "unknown".
fn git_commit() {
    println!("cargo:rerun-if-env-changed=GATEWAY_GIT_COMMIT");
    let commit = env::var("GATEWAY_GIT_COMMIT").ok().or_else(|| {
        let git = |args: &[&str]| {
            let out = Command::new("git").args(args).output().ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        // Rebuild when HEAD moves (a commit, a checkout).
        if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
            println!("cargo:rerun-if-changed={dir}/HEAD");
            if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
                println!("cargo:rerun-if-changed={dir}/{head_ref}");
            }
        }
        let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
        let dirty =
            git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
        Some(if dirty {
            format!("{commit}-dirty")
        } else {
            commit
        })
    });
    println!(
        "cargo:rustc-env=GATEWAY_GIT_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".into())
    );
}

/// `CONFIG_DOCS: &[StructDoc]`: every `pub struct` of config.rs with its doc and its `pub`
/// fields (name, type, doc), in source order. rustfmt keeps config.rs in the shape read here:
/// `///` lines, attributes, then `pub struct Name {` or `pub name: Type,`.
fn config_docs(source: &str) -> String {
    let mut out = String::from("pub(crate) static CONFIG_DOCS: &[StructDoc] = &[\n");
    let mut doc: Vec<String> = Vec::new();
    let mut in_struct = false;
    for line in source.lines() {
        let line = line.trim();
        if let Some(text) = line.strip_prefix("///") {
            doc.push(text.trim().to_string());
        } else if line.starts_with("#[") {
            // Attributes sit between a doc comment and its item.
        } else if let Some(rest) = line.strip_prefix("pub struct ") {
            let name = rest.split([' ', '{']).next().unwrap_or_default();
            in_struct = line.ends_with('{');
            if in_struct {
                let _ = writeln!(
                    out,
                    "    StructDoc {{ name: {name:?}, doc: {:?}, fields: &[",
                    doc.join(" ")
                );
            }
            doc.clear();
        } else if in_struct && line == "}" {
            out.push_str("    ] },\n");
            in_struct = false;
            doc.clear();
        } else if let (true, Some(field)) = (in_struct, line.strip_prefix("pub ")) {
            let (name, ty) = field.split_once(':').expect("pub field: Type");
            let ty = ty.trim().trim_end_matches(',');
            let _ = writeln!(
                out,
                "        FieldDoc {{ name: {:?}, ty: {ty:?}, doc: {:?} }},",
                name.trim(),
                doc.join(" ")
            );
            doc.clear();
        } else {
            doc.clear();
        }
    }
    out.push_str("];\n");
    out
}
