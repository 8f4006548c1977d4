//! One version everywhere: Cargo.toml's version is the version of the image
//! deploy/ installs, of the certgen Job's name, of the Dockerfile's label
//! and of the top entry of CHANGELOG.md. A release bumps them together
//! (`.ci/set-version`, CONTRIBUTING.md "Releasing"); the release workflow
//! refuses a tag that is not `v` + this version.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const VERSION: &str = env!("CARGO_PKG_VERSION");
const IMAGE: &str = "ghcr.io/canary-injector/canary-injector";

/// The entry points that install the webhook.
const INSTALLS: &[&str] = &[
    "deploy",
    "deploy/overlays/legacy",
    "deploy/overlays/cert-manager",
    "deploy/native-policy",
];

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn kustomize(dir: &str) -> String {
    let out = Command::new("kubectl")
        .args(["kustomize", &format!("{ROOT}/{dir}")])
        .output()
        .expect("kubectl (client only) is needed to build deploy/; see CONTRIBUTING.md");
    assert!(out.status.success(), "kubectl kustomize {dir} failed");
    String::from_utf8(out.stdout).unwrap()
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// Every file under `dir` whose name ends with `suffix`.
fn files(dir: &Path, suffix: &str, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, suffix, out);
        } else if path.to_string_lossy().ends_with(suffix) {
            out.push(path);
        }
    }
}

/// The certgen Job's name for a version: dots (and a build's `+`) as
/// dashes, since pod names become host names.
fn job_name(version: &str) -> String {
    format!(
        "canary-injector-certgen-{}",
        version.to_ascii_lowercase().replace(['.', '+'], "-")
    )
}

/// `## [x] - date` headings of CHANGELOG.md, in order: (x, the rest).
fn changelog_entries(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("## ["))
        .filter_map(|l| l.split_once(']'))
        .map(|(v, rest)| (v.to_owned(), rest.trim().to_owned()))
        .collect()
}

#[test]
fn the_version_is_a_release_version_cargo_lock_agrees() {
    let core = VERSION.split(['-', '+']).next().unwrap();
    assert!(
        core.split('.').count() == 3 && core.split('.').all(|p| p.parse::<u64>().is_ok()),
        "semantic version: {VERSION}"
    );
    let lock = read("Cargo.lock");
    let entry = format!("name = \"canary-injector\"\nversion = \"{VERSION}\"\n");
    assert!(
        lock.contains(&entry),
        "Cargo.lock names canary-injector {VERSION}"
    );
}

#[test]
fn the_changelog_s_top_entry_is_this_version() {
    let text = read("CHANGELOG.md");
    let entries = changelog_entries(&text);
    // Work merged after a release goes under `## [Unreleased]` above it
    // (Keep a Changelog); the top entry with a version is this one.
    let Some((top, rest)) = entries.iter().find(|(v, _)| v != "Unreleased") else {
        panic!("CHANGELOG.md has no `## [version] - date` entry");
    };
    assert_eq!(
        top, VERSION,
        "CHANGELOG.md's top entry is Cargo.toml's version"
    );
    let date = rest.strip_prefix("- ").unwrap_or_default();
    let dated = date.len() == 10
        && date.char_indices().all(|(i, c)| {
            if i == 4 || i == 7 {
                c == '-'
            } else {
                c.is_ascii_digit()
            }
        });
    assert!(
        dated || date == "Unreleased",
        "`## [{top}] - YYYY-MM-DD` (or `- Unreleased` until the tag): {rest:?}"
    );
    assert!(
        text.contains(&format!("\n[{VERSION}]: https://github.com/")),
        "a link reference for [{VERSION}] at the end"
    );
    let mut seen = std::collections::BTreeSet::new();
    for (v, _) in &entries {
        assert!(seen.insert(v), "{v} has one entry");
    }
    assert!(
        !entries.iter().skip(1).any(|(v, _)| v == "Unreleased"),
        "[Unreleased] only at the top"
    );
}

#[test]
fn every_install_runs_the_image_of_this_version() {
    let image = format!("{IMAGE}:{VERSION}");
    for entry in INSTALLS {
        let objects = docs(&kustomize(entry));
        let text = serde_json::to_string(&objects).unwrap();
        let found = text.matches("\"image\":").count();
        let ours = text.matches(&format!("\"image\":\"{image}\"")).count();
        assert!(found >= 1, "{entry}: {found} images");
        assert_eq!(ours, found, "{entry}: every image is {image}");
        let jobs: Vec<&str> = objects
            .iter()
            .filter(|o| o["kind"] == "Job")
            .map(|o| o["metadata"]["name"].as_str().unwrap())
            .collect();
        if *entry == "deploy/overlays/cert-manager" {
            assert!(jobs.is_empty(), "{entry}: {jobs:?}");
        } else {
            assert_eq!(jobs, [job_name(VERSION)], "{entry}: the certgen Job");
        }
    }
    let install = read("deploy/install.yaml");
    assert!(install.contains(&format!("image: {image}\n")));
    assert!(install.contains(&format!("name: {}\n", job_name(VERSION))));
}

/// The places a release edits, in the sources: a stale one would surface
/// only in an overlay someone builds on it.
#[test]
fn every_image_tag_and_job_name_in_deploy_is_this_version() {
    let mut yaml = Vec::new();
    files(&Path::new(ROOT).join("deploy"), ".yaml", &mut yaml);
    let mut tags = 0;
    for path in &yaml {
        let text = std::fs::read_to_string(path).unwrap();
        let name = path.strip_prefix(ROOT).unwrap().display().to_string();
        for (at, _) in text.match_indices(&format!("{IMAGE}:")) {
            let tag: String = text[at + IMAGE.len() + 1..]
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '"')
                .collect();
            assert_eq!(tag, VERSION, "{name}: image tag");
            tags += 1;
        }
        if path.ends_with("kustomization.yaml") {
            let kustomization: Value = serde_saphyr::from_str(&text).unwrap();
            for image in kustomization["images"].as_array().into_iter().flatten() {
                if image["name"] == IMAGE {
                    assert_eq!(image["newTag"], VERSION, "{name}: images newTag");
                    assert!(image.get("newName").is_none(), "{name}: keeps {IMAGE}");
                    tags += 1;
                }
            }
        }
        for (at, _) in text.match_indices("canary-injector-certgen-") {
            let rest = &text[at..];
            let word: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '-')
                .collect();
            // The Job; the ServiceAccount, Role and NetworkPolicy of that
            // name carry no version.
            if word != "canary-injector-certgen-" && !rest.starts_with("canary-injector-certgen-<")
            {
                assert_eq!(word, job_name(VERSION), "{name}: the certgen Job's name");
            }
        }
    }
    assert!(tags >= 6, "found the image tags ({tags})");
}

#[test]
fn the_dockerfile_labels_this_version() {
    let dockerfile = read("Dockerfile");
    assert!(
        dockerfile.contains(&format!("\nARG VERSION={VERSION}\n")),
        "Dockerfile: ARG VERSION={VERSION} (the image's version label)"
    );
    for (at, _) in dockerfile.match_indices(&format!("{IMAGE}:")) {
        let tag: String = dockerfile[at + IMAGE.len() + 1..]
            .chars()
            .take_while(|c| !c.is_whitespace())
            .collect();
        assert_eq!(tag, VERSION, "Dockerfile: {IMAGE}:{tag}");
    }
}

/// LICENSE is the license Cargo.toml names, in its standard text.
#[test]
fn the_license_file_is_the_one_cargo_toml_names() {
    let cargo = read("Cargo.toml");
    assert!(
        cargo.contains("\nlicense = \"Apache-2.0\"\n"),
        "Cargo.toml: license"
    );
    let license = read("LICENSE");
    let words: Vec<&str> = license.split_whitespace().collect();
    assert_eq!(
        words[..5],
        ["Apache", "License", "Version", "2.0,", "January"],
        "LICENSE: the Apache License 2.0"
    );
    assert!(
        license.contains("END OF TERMS AND CONDITIONS"),
        "the whole text"
    );
    assert!(
        license.lines().count() > 190,
        "the full license, not a summary"
    );
}

/// The checks above read what they claim to: a made-up changelog.
#[test]
fn changelog_entries_are_read_in_order() {
    let text = "# Changelog\n\n## [Unreleased]\n\n## [1.2.0] - 2026-12-01\n### Added\n\n## [1.1.0] - 2026-01-02\n";
    assert_eq!(
        changelog_entries(text),
        [
            ("Unreleased".to_owned(), String::new()),
            ("1.2.0".to_owned(), "- 2026-12-01".to_owned()),
            ("1.1.0".to_owned(), "- 2026-01-02".to_owned()),
        ]
    );
    assert_eq!(
        job_name("0.10.0-rc.1"),
        "canary-injector-certgen-0-10-0-rc-1"
    );
}
