//! `gateway config defaults`: a complete `gateway.toml` with every key at its default value and
//! the key's doc comment from `config.rs` above it. Keys without a default (unset options, maps
//! of namespaces) are printed commented out, so the file documents them and still loads as the
//! defaults.

use std::fmt::Write as _;

use crate::config::Config;

/// A configuration struct of `config.rs`, as the build script read it.
pub(crate) struct StructDoc {
    name: &'static str,
    doc: &'static str,
    fields: &'static [FieldDoc],
}

pub(crate) struct FieldDoc {
    name: &'static str,
    ty: &'static str,
    doc: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/config_docs.rs"));

fn struct_doc(name: &str) -> Option<&'static StructDoc> {
    CONFIG_DOCS.iter().find(|s| s.name == name)
}

/// The commented defaults file.
pub fn defaults_toml() -> String {
    let defaults = toml::Table::try_from(Config::default()).expect("the defaults serialise");
    let root = struct_doc("Config").expect("config.rs has `pub struct Config`");
    let mut out = String::from(
        "# gateway.toml: every key at its default (`gateway config defaults`). Keep only what you\n\
         # change. Sources, each overriding the one before: these defaults, this file (--config),\n\
         # GATEWAY__SECTION__KEY environment variables, command-line flags. Durations are\n\
         # humantime strings (\"500ms\", \"40s\", \"1h\"). Check a file: `gateway config check FILE`.\n",
    );
    for section in root.fields {
        let value = defaults.get(section.name).and_then(|v| v.as_table());
        write_table(&mut out, section.name, section, value);
    }
    out
}

/// `[path]` with the doc of its struct, its scalar keys, then its sub-tables.
fn write_table(out: &mut String, path: &str, field: &FieldDoc, value: Option<&toml::Table>) {
    let Some(def) = struct_doc(field.ty) else {
        return write_map(out, path, field);
    };
    out.push('\n');
    comment(
        out,
        if def.doc.is_empty() {
            field.doc
        } else {
            def.doc
        },
    );
    let _ = writeln!(out, "[{path}]");
    let mut tables = Vec::new();
    for key in def.fields {
        if struct_doc(key.ty).is_some() || key.ty.starts_with("BTreeMap<") {
            tables.push(key);
            continue;
        }
        comment(out, key.doc);
        match value.and_then(|t| t.get(key.name)) {
            Some(v) => {
                let _ = writeln!(out, "{} = {v}", key.name);
            }
            None => {
                let _ = writeln!(out, "# {} =   (unset)", key.name);
            }
        }
    }
    for key in tables {
        let sub = value
            .and_then(|t| t.get(key.name))
            .and_then(|v| v.as_table());
        write_table(out, &format!("{path}.{}", key.name), key, sub);
    }
}

/// A map of tables keyed by the user (`channels.namespaces`): documented with a commented entry
/// of its value type.
fn write_map(out: &mut String, path: &str, field: &FieldDoc) {
    out.push('\n');
    comment(out, field.doc);
    let value_ty = field
        .ty
        .trim_start_matches("BTreeMap<String,")
        .trim_end_matches('>')
        .trim();
    let _ = writeln!(out, "# [{path}.NAME]   (none by default; keys as below)");
    if let Some(def) = struct_doc(value_ty) {
        for key in def.fields {
            let _ = writeln!(out, "# {} = …   {}", key.name, key.doc);
        }
    }
}

fn comment(out: &mut String, doc: &str) {
    if doc.is_empty() {
        return;
    }
    let mut line = String::from("#");
    for word in doc.split_whitespace() {
        if line.len() + word.len() > 98 {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file loads (unknown keys are refused) as exactly the built-in defaults.
    #[test]
    fn the_defaults_file_loads_as_the_defaults() {
        let text = defaults_toml();
        let loaded = Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(loaded, Config::default());
    }

    /// Every field of every configuration struct reachable from `Config` is in the file, set or
    /// commented out, with its doc comment when it has one.
    #[test]
    fn the_defaults_file_names_every_key() {
        let text = defaults_toml();
        let mut pending = vec![(String::new(), "Config")];
        let mut seen = 0;
        while let Some((path, ty)) = pending.pop() {
            let def = struct_doc(ty).unwrap_or_else(|| panic!("no docs for {ty}"));
            for field in def.fields {
                let full = if path.is_empty() {
                    field.name.to_string()
                } else {
                    format!("{path}.{}", field.name)
                };
                if struct_doc(field.ty).is_some() {
                    assert!(
                        text.contains(&format!("[{full}]")),
                        "no [{full}] in\n{text}"
                    );
                    pending.push((full, field.ty));
                } else if field.ty.starts_with("BTreeMap<") {
                    assert!(
                        text.contains(&format!("# [{full}.NAME]")),
                        "no {full} in\n{text}"
                    );
                } else {
                    let set = format!("\n{} = ", field.name);
                    let unset = format!("\n# {} =", field.name);
                    assert!(
                        text.contains(&set) || text.contains(&unset),
                        "{full} missing from\n{text}"
                    );
                    if !field.doc.is_empty() {
                        let first = field.doc.split_whitespace().next().unwrap();
                        assert!(text.contains(first), "{full}'s doc missing");
                    }
                }
                seen += 1;
            }
        }
        assert!(
            seen > 60,
            "only {seen} keys found: the build script misread config.rs"
        );
    }
}
