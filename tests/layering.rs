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
    "crate::task",
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

// === The arrows point one way ===
//
// Every file of the library (the module tree from src/lib.rs, without test
// modules) and the files it names form a graph that must have no circle:
// what several layers share lives in the lowest of them (`task::TaskError`,
// `limits::Limits`, `mutate::version`), never in the module that wires them.
// A module may use its own parent's items (`super::X`, the Rust idiom for a
// module and its files); a name the parent only re-exports (`pub use
// child::X`) counts as the child's, so a re-export cannot hide an arrow.

use std::collections::{BTreeMap, BTreeSet};

/// The library's files: module path -> code (without comments, strings and
/// test modules), walked from src/lib.rs through its `mod` declarations.
fn library() -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    let mut todo = vec![(vec!["crate".to_owned()], Path::new(ROOT).join("src/lib.rs"))];
    while let Some((module, file)) = todo.pop() {
        let code = code_of(&std::fs::read_to_string(&file).unwrap());
        for child in declared_modules(&code) {
            let dir = if module.len() == 1 {
                Path::new(ROOT).join("src")
            } else {
                file.with_extension("")
            };
            let path = [
                dir.join(format!("{child}.rs")),
                dir.join(&child).join("mod.rs"),
            ]
            .into_iter()
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("no file for mod {child} of {}", module.join("::")));
            let mut m = module.clone();
            m.push(child);
            todo.push((m, path));
        }
        files.insert(module.join("::"), code);
    }
    files
}

/// `mod x;` and `pub mod x;` declarations (test modules are already cut).
fn declared_modules(code: &str) -> Vec<String> {
    code.lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line
                .strip_prefix("pub(crate) mod ")
                .or_else(|| line.strip_prefix("pub mod "))
                .or_else(|| line.strip_prefix("mod "))?;
            let name = rest.strip_suffix(';')?.trim();
            name.chars()
                .all(|c| c.is_alphanumeric() || c == '_')
                .then(|| name.to_owned())
        })
        .collect()
}

/// Absolute paths a file names: [`named_paths`], plus paths that start at a
/// child module (`bootstrap::decide` in `crate::mutate`).
fn absolute_paths(code: &str, module: &str, modules: &BTreeSet<String>) -> Vec<String> {
    let segments: Vec<String> = module.split("::").map(str::to_owned).collect();
    named_paths(code, &segments)
        .into_iter()
        .map(|p| {
            let first = p.split("::").next().unwrap_or_default();
            if first != "crate" && modules.contains(&format!("{module}::{first}")) {
                format!("{module}::{p}")
            } else {
                p
            }
        })
        .collect()
}

/// `(module, name) -> absolute path` of every `pub use` in the library.
fn reexports(files: &BTreeMap<String, String>) -> BTreeMap<(String, String), String> {
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    let mut out = BTreeMap::new();
    for (module, code) in files {
        let mut rest = code.as_str();
        while let Some(at) = rest.find("pub use ") {
            let after = &rest[at + "pub use ".len()..];
            let end = after.find(';').unwrap_or(after.len());
            let tree = &after[..end];
            rest = &after[end..];
            let mut leaves = Vec::new();
            expand(tree, "", &mut leaves);
            // The names as exported (`x as y` exports y); `expand` keeps x.
            let mut names = Vec::new();
            for part in tree.split([',', '{', '}']) {
                let part = part.trim();
                if part.is_empty() {
                    continue;
                }
                let name = part.rsplit(" as ").next().unwrap().trim();
                names.push(name.rsplit("::").next().unwrap().to_owned());
            }
            for leaf in leaves {
                let path = absolute_paths(&format!("use {leaf};"), module, &modules)
                    .into_iter()
                    .next()
                    .unwrap_or(leaf.clone());
                let last = leaf.rsplit("::").next().unwrap().to_owned();
                let name = names.iter().find(|n| **n == last).cloned().unwrap_or(last);
                out.insert((module.clone(), name), path);
            }
        }
    }
    out
}

/// The library module a path names, through re-exports; `None` outside it.
fn module_named(
    path: &str,
    modules: &BTreeSet<String>,
    reexports: &BTreeMap<(String, String), String>,
) -> Option<String> {
    let mut path = path.to_owned();
    for _ in 0..8 {
        let segments: Vec<&str> = path.split("::").collect();
        let depth = (1..=segments.len())
            .rev()
            .find(|n| modules.contains(&segments[..*n].join("::")))?;
        let module = segments[..depth].join("::");
        let Some(next) = segments.get(depth) else {
            return Some(module);
        };
        match reexports.get(&(module.clone(), (*next).to_owned())) {
            Some(target) => {
                let mut followed = target.clone();
                for s in &segments[depth + 1..] {
                    followed.push_str("::");
                    followed.push_str(s);
                }
                path = followed;
            }
            None => return Some(module),
        }
    }
    None
}

/// module -> the library modules it names (its own ancestors left out).
fn import_graph(files: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    let reexports = reexports(files);
    let mut graph = BTreeMap::new();
    for (module, code) in files {
        let mut to = BTreeSet::new();
        for path in absolute_paths(code, module, &modules) {
            if let Some(target) = module_named(&path, &modules, &reexports)
                && target != *module
                && !module.starts_with(&format!("{target}::"))
            {
                to.insert(target);
            }
        }
        graph.insert(module.clone(), to);
    }
    graph
}

/// A circle of the graph, if it has one (a depth-first search).
fn find_circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut circle = stack[at..].to_vec();
            circle.push(node.to_owned());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, stack, done) {
                return Some(circle);
            }
        }
        stack.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

/// The modules that name `target` (or anything inside it).
fn importers_of<'a>(graph: &'a BTreeMap<String, BTreeSet<String>>, target: &str) -> Vec<&'a str> {
    graph
        .iter()
        .filter(|(_, to)| {
            to.iter()
                .any(|t| t == target || t.starts_with(&format!("{target}::")))
        })
        .map(|(from, _)| from.as_str())
        .collect()
}

#[test]
fn the_library_imports_form_no_circle() {
    let files = library();
    assert!(files.len() >= 40, "found the library: {:?}", files.keys());
    let graph = import_graph(&files);
    if let Some(circle) = find_circle(&graph) {
        panic!(
            "the imports go round in a circle: {}\nmove what they share down to the lowest module \
             that uses it (CONTRIBUTING.md \"Which way the arrows point\")",
            circle.join(" -> ")
        );
    }
    for module in ["crate::task", "crate::limits", "crate::mutate::version"] {
        assert!(files.contains_key(module), "{module} is walked");
    }
}

#[test]
fn nothing_below_app_imports_app() {
    // app wires every adapter for `serve`; what they share lives below them.
    let graph = import_graph(&library());
    let back: Vec<&str> = importers_of(&graph, "crate::app")
        .into_iter()
        .filter(|m| *m != "crate::app" && !m.starts_with("crate::app::"))
        .collect();
    assert!(back.is_empty(), "these import crate::app: {back:?}");
}

#[test]
fn the_configuration_does_not_import_the_server() {
    let graph = import_graph(&library());
    let config = &graph["crate::config"];
    assert!(
        !config.iter().any(|m| m.starts_with("crate::server")),
        "crate::config imports {config:?}"
    );
    assert!(
        config.contains("crate::limits"),
        "config builds the server's limits from the crate::limits module: {config:?}"
    );
}

#[test]
fn the_files_of_mutate_form_no_circle() {
    let graph = import_graph(&library());
    let inside = |m: &str| m.starts_with("crate::mutate::");
    let mutate: BTreeMap<String, BTreeSet<String>> = graph
        .iter()
        .filter(|(m, _)| inside(m))
        .map(|(m, to)| {
            let to = to.iter().filter(|t| inside(t)).cloned().collect();
            (m.clone(), to)
        })
        .collect();
    assert!(mutate.len() >= 6, "{:?}", mutate.keys());
    assert_eq!(find_circle(&mutate), None, "{mutate:#?}");
    assert!(
        mutate["crate::mutate::policy"].contains("crate::mutate::version"),
        "the checker sees the policy's use of the version leaf: {mutate:?}"
    );
}

/// The checker itself, on made-up files: a re-export does not hide an arrow,
/// a child module is found from its parent's relative paths, a circle is
/// found and named, and an ancestor's items do not count.
#[test]
fn the_circle_check_sees_through_reexports() {
    let files: BTreeMap<String, String> = [
        (
            "crate::m",
            "pub mod a;\npub mod b;\npub use a::{Warn, Other as Renamed};\npub struct View;",
        ),
        (
            "crate::m::a",
            "use super::View;\npub enum Warn {}\npub struct Other;",
        ),
        // Names a's type through the parent's re-export only.
        (
            "crate::m::b",
            "use super::{Renamed, View};\nfn f() { super::Warn::x(); }",
        ),
        ("crate::top", "fn g() { crate::m::b::h(); }"),
    ]
    .into_iter()
    .map(|(m, c)| (m.to_owned(), code_of(c)))
    .collect();
    let graph = import_graph(&files);
    assert_eq!(
        graph["crate::m::b"],
        BTreeSet::from(["crate::m::a".to_owned()]),
        "through `pub use a::{{Warn, Other as Renamed}}`, not to the parent"
    );
    assert_eq!(
        graph["crate::m"],
        BTreeSet::from(["crate::m::a".to_owned()])
    );
    assert!(
        graph["crate::m::a"].is_empty(),
        "a parent's items do not count"
    );
    assert_eq!(find_circle(&graph), None);
    assert_eq!(importers_of(&graph, "crate::m::b"), ["crate::top"]);

    let mut circular = files.clone();
    circular.insert(
        "crate::m::a".into(),
        code_of("use crate::m::b::B;\npub enum Warn {}"),
    );
    let circle = find_circle(&import_graph(&circular)).expect("a -> b -> a");
    assert_eq!(circle.first(), circle.last());
    assert!(
        circle.contains(&"crate::m::a".to_owned()) && circle.contains(&"crate::m::b".to_owned())
    );
}
