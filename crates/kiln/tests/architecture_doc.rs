//! ARCHITECTURE.md names the files to open for each kind of change; this
//! keeps it true: every backticked repository path in it must exist.

use std::path::Path;

/// The backticked spans of `text` that look like repository paths: they
/// start with a top-level folder of the repository and contain a slash.
fn paths(text: &str) -> Vec<&str> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            ["crates/", "scripts/", ".ci/"]
                .iter()
                .any(|root| s.starts_with(root))
        })
        .filter(|s| !s.contains(' '))
        .collect()
}

#[test]
fn every_path_architecture_md_names_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md"))
        .expect("ARCHITECTURE.md at the repository root");
    let named = paths(&doc);
    // The page names every crate and the main files of a request's path.
    assert!(
        named.len() >= 30,
        "only {} paths found: {named:?}",
        named.len()
    );
    let missing: Vec<&str> = named
        .iter()
        .copied()
        .filter(|p| !root.join(p.trim_end_matches('/')).exists())
        .collect();
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names paths that do not exist: {missing:?}"
    );
}

#[test]
fn a_path_that_does_not_exist_is_found_missing() {
    let doc = "see `crates/kiln/src/nowhere.rs` and `scripts/test.sh`, not `Engine::submit`";
    let named = paths(doc);
    assert_eq!(named, ["crates/kiln/src/nowhere.rs", "scripts/test.sh"]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    assert!(!root.join(named[0]).exists());
    assert!(root.join(named[1]).exists());
}
