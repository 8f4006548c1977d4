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
    // What to keep, renew or replace of the webhook's certificates.
    "src/certs/plan.rs",
    // check's rules; its cluster reader and -f front end are adapters.
    "src/check.rs",
    "src/check/routing.rs",
    // The backfill decision; its controller (src/backfill.rs) is an adapter.
    "src/backfill/plan.rs",
];

/// Pure modules that live inside adapter modules: naming them is fine.
const PURE_PATHS: &[&str] = &["crate::certs::plan"];

/// What pure code must not name: our adapters and I/O crates.
const FORBIDDEN: &[&str] = &[
    "crate::admission",
    "crate::app",
    "crate::backfill",
    "crate::certs",
    "crate::cluster",
    "crate::config",
    "crate::copier",
    "crate::metrics",
    "crate::offline",
    "crate::routes::controller",
    "crate::routes::index",
    "crate::routes::offline",
    "crate::server",
    "kube::",
    "k8s_openapi::",
    "hyper::",
    "tokio::",
    "prometheus::",
    "tracing::",
    "std::fs",
    "std::net",
    "std::env",
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
        // Test modules may use anything.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (n, line) in code.lines().enumerate() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            let mut line = line.to_owned();
            for allowed in PURE_PATHS {
                line = line.replace(allowed, "");
            }
            for bad in FORBIDDEN {
                if line.contains(bad) {
                    found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "the core reaches an adapter or I/O:\n{}",
        found.join("\n")
    );
}
