//! The README stays a README: short, and its test command is the one CI
//! runs. (Links and anchors are checked by `.ci/check_links.py`, run by
//! `.ci/run`; the pages under docs/ are checked against the code by the
//! tests next to what they describe.)

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The first command of the first `sh` block after `marker` in the README.
fn readme_command_after(marker: &str) -> String {
    let readme = read("README.md");
    let rest = &readme[readme
        .find(marker)
        .unwrap_or_else(|| panic!("README lacks {marker:?}"))..];
    let block = &rest[rest.find("```sh\n").expect("a sh block") + "```sh\n".len()..];
    block.lines().next().unwrap().trim().to_string()
}

/// The README's "Test it" command is the one `.ci/run` runs as its test step.
#[test]
fn the_readme_test_command_is_what_ci_runs() {
    let run = read(".ci/run");
    let ci = run
        .lines()
        .find(|l| l.starts_with("cargo test"))
        .expect(".ci/run runs cargo test");
    let ci = ci.split(" 2>&1").next().unwrap().trim();
    assert_eq!(readme_command_after("Test it"), ci);
    assert_eq!(
        readme_command_after("Run it"),
        "cargo run --release -- serve"
    );
}

/// The README is the short way in (about 300 lines at most); the rest
/// lives in docs/, one page per topic.
#[test]
fn the_readme_is_short() {
    let lines = read("README.md").lines().count();
    assert!(
        lines <= 300,
        "README.md has {lines} lines: move detail into docs/"
    );
}
