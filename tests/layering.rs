//! The shape of the code: the pure core imports no adapter and no I/O crate.
//! A new pure module (e.g. the routes computation) joins the list below.

use std::path::Path;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Modules that decide without I/O: a file, or a directory of files.
const PURE: &[&str] = &[
    "src/mutate.rs",
    "src/mutate",
    "src/envoy_template.rs",
    // The routes computation; its controller, index and offline front end
    // (src/routes/{controller,index,offline}.rs) are adapters.
    "src/routes.rs",
    "src/routes/names.rs",
    "src/routes/objects.rs",
    "src/routes/plan.rs",
    // What to keep, renew or replace of the webhook's certificates, and the
    // CA that issues them (PEM in, PEM out).
    "src/certs/plan.rs",
    "src/certs/ca.rs",
    // check's rules; its cluster reader and -f front end are adapters.
    "src/check.rs",
    "src/check/routing.rs",
    "src/check/native.rs",
    // The backfill decision; its controller (src/backfill.rs) is an adapter.
    "src/backfill/plan.rs",
    // The owner chains; the cache that fills them (src/owners.rs) is an
    // adapter.
    "src/owners/index.rs",
    // The native admission policy generated from the configuration.
    "src/policy.rs",
    "src/policy",
];

/// Pure modules that live inside adapter modules: naming them is fine.
const PURE_PATHS: &[&str] = &[
    "crate::certs::plan",
    "crate::certs::ca",
    "crate::owners::index",
];

/// What pure code must not name: our adapters and I/O crates.
const FORBIDDEN: &[&str] = &[
    "crate::admission",
    "crate::app",
    "crate::backfill",
    "crate::certs",
    "crate::cluster",
    "crate::config",
    "crate::copier",
    "crate::istio",
    "crate::metrics",
    "crate::offline",
    "crate::owners",
    "crate::routes::controller",
    "crate::routes::index",
    "crate::routes::offline",
    "crate::check::cluster",
    "crate::check::manifests",
    "crate::server",
    "kube",
    "k8s_openapi",
    "hyper",
    "tokio",
    "prometheus",
    "tracing",
    "std::fs",
    "std::net",
    "std::env",
    "std::process",
];

fn rust_files(path: &Path, out: &mut Vec<std::path::PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            rust_files(&entry.unwrap().path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_owned());
    }
}

/// The module path of a file under src/: `src/mutate/bootstrap.rs` is
/// `crate::mutate::bootstrap`, `src/mutate.rs` is `crate::mutate`.
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(Path::new(ROOT).join("src")).unwrap();
    let mut path = vec!["crate".to_owned()];
    for part in rel.with_extension("").iter() {
        path.push(part.to_str().unwrap().to_owned());
    }
    path
}

/// The code of a file without comments, string literals and its test module.
fn code_of(text: &str) -> String {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    let mut out = String::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or_default();
        // Drop string literals (a message may mention `kube` or `std::fs`).
        let mut in_str = false;
        for c in line.chars() {
            match c {
                '"' => in_str = !in_str,
                _ if in_str => {}
                _ => out.push(c),
            }
        }
        out.push('\n');
    }
    out
}

/// Expands one `use` tree (`a::{b, c::{d, e}}`) into its paths.
fn expand(tree: &str, prefix: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head = tree[..open].trim().trim_end_matches("::");
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let base = join(prefix, head);
        let (mut depth, mut from) = (0, 0);
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&inner[from..i], &base, out);
                    from = i + 1;
                }
                _ => {}
            }
        }
        expand(&inner[from..], &base, out);
    } else if !tree.is_empty() {
        let path = tree.split(" as ").next().unwrap().trim();
        out.push(join(prefix, path.trim_end_matches("::self")));
    }
}

fn join(prefix: &str, path: &str) -> String {
    match (prefix.is_empty(), path.is_empty() || path == "self") {
        (true, _) => path.to_owned(),
        (false, true) => prefix.to_owned(),
        (false, false) => format!("{prefix}::{path}"),
    }
}

/// A path as seen from `module`, made absolute (`super::x` in
/// `crate::certs::plan` is `crate::certs::x`).
fn resolve(path: &str, module: &[String]) -> String {
    let mut segments: Vec<&str> = path.split("::").map(str::trim).collect();
    let mut base: Vec<String> = Vec::new();
    match segments.first().copied() {
        Some("super") => {
            base = module.to_vec();
            while segments.first() == Some(&"super") {
                base.pop();
                segments.remove(0);
            }
        }
        Some("self") => {
            base = module.to_vec();
            segments.remove(0);
        }
        _ => {}
    }
    base.extend(segments.iter().map(|s| (*s).to_owned()));
    base.join("::")
}

/// Every path a file names: its `use` trees and the paths written in its
/// code, with `super::` / `self::` made absolute.
fn named_paths(code: &str, module: &[String]) -> Vec<String> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before = rest[..at].chars().last();
        let after = &rest[at + 4..];
        rest = after;
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let end = after.find(';').unwrap_or(after.len());
        expand(&after[..end], "", &mut paths);
    }
    for word in code.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')) {
        // `crate::x::y`, `super::x`, `std::fs::read`, `tokio::spawn`, ...
        // (a leading `::` is an absolute path).
        let word = word.trim_start_matches("::").trim_end_matches(':');
        if word.contains("::") {
            paths.push(word.to_owned());
        }
    }
    paths.iter().map(|p| resolve(p, module)).collect()
}

fn forbidden(path: &str) -> Option<&'static str> {
    if PURE_PATHS
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}::")))
    {
        return None;
    }
    FORBIDDEN
        .iter()
        .copied()
        .find(|bad| path == *bad || path.starts_with(&format!("{bad}::")))
}

#[test]
fn the_pure_core_imports_no_adapter_and_does_no_io() {
    let mut files = Vec::new();
    for p in PURE {
        rust_files(&Path::new(ROOT).join(p), &mut files);
    }
    assert!(files.len() >= 5, "found the core: {files:?}");
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let module = module_of(file);
        for path in named_paths(&code_of(&text), &module) {
            if let Some(bad) = forbidden(&path) {
                found.push(format!("{}: {path} ({bad})", file.display()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "the core reaches an adapter or I/O:\n{}",
        found.join("\n")
    );
}

/// The checker itself: grouped, nested, renamed and relative imports are
/// all seen (a check that misses them passes whatever the code does).
#[test]
fn imports_are_resolved_whatever_their_spelling() {
    let module: Vec<String> = ["crate", "certs", "plan"].map(String::from).to_vec();
    let code = code_of(
        "use crate::{mutate::Kind, config::{Config, ConfigError as E}};\n\
         use super::{ca::Ca, write_file};\n\
         use self::inner::X; // use crate::server::Ignored\n\
         let e = \"std::fs::read\";\n\
         fn f() { super::super::istio::detect(); tokio::spawn(x); }\n",
    );
    let paths = named_paths(&code, &module);
    for expected in [
        "crate::mutate::Kind",
        "crate::config::Config",
        "crate::config::ConfigError",
        "crate::certs::ca::Ca",
        "crate::certs::write_file",
        "crate::certs::plan::inner::X",
        "crate::istio::detect",
        "tokio::spawn",
    ] {
        assert!(
            paths.iter().any(|p| p == expected),
            "{expected} in {paths:?}"
        );
    }
    assert!(
        !paths.iter().any(|p| p.contains("server")),
        "comments are not code"
    );
    assert!(
        !paths.iter().any(|p| p.contains("std::fs")),
        "strings are not code"
    );
    assert_eq!(forbidden("crate::certs::write_file"), Some("crate::certs"));
    assert_eq!(forbidden("crate::certs::ca::Ca"), None);
    assert_eq!(forbidden("crate::istio::detect"), Some("crate::istio"));
    assert_eq!(forbidden("crate::mutate::Kind"), None);
    assert_eq!(forbidden("kube::Api"), Some("kube"));
    assert_eq!(forbidden("kubed::x"), None, "a prefix is a whole segment");
}
