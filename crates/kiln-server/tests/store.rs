//! The model store: which directories become which models, and what is
//! skipped with which warning.

use std::fs;
use std::path::{Path, PathBuf};

use kiln_server::store::{self, HfModel, StoreEntry, StoreError};

fn mkdir(path: &Path) {
    fs::create_dir_all(path).expect("mkdir");
}

fn touch(path: &Path) {
    if let Some(parent) = path.parent() {
        mkdir(parent);
    }
    fs::write(path, b"x").expect("write");
}

/// A model directory with a weight file in it.
fn model(dir: &Path) {
    touch(&dir.join("model.gguf"));
}

fn names(scan: &store::StoreScan) -> Vec<&str> {
    scan.models.iter().map(|m| m.name.as_str()).collect()
}

#[test]
fn each_subdirectory_is_a_model_sorted_by_name() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    model(&root.join("zeta"));
    touch(&root.join("opt13b/serving.properties"));
    touch(&root.join("opt13b/config.json"));
    model(&root.join("alpha"));
    touch(&root.join("alpha/model.py"));

    let scan = store::scan(root).expect("scans");
    assert_eq!(names(&scan), ["alpha", "opt13b", "zeta"]);
    assert_eq!(
        scan.models[1],
        StoreEntry {
            name: "opt13b".into(),
            dir: root.join("opt13b"),
            has_properties: true,
            has_model_py: false,
        }
    );
    assert!(scan.models[0].has_model_py);
    assert!(!scan.models[0].has_properties);
    assert_eq!(scan.warnings.len(), 1, "{:#?}", scan.warnings);
}

#[test]
fn model_py_is_warned_exactly_once_per_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("models");
    for name in ["a", "b"] {
        touch(&root.join(name).join("model.py"));
        touch(&root.join(name).join("serving.properties"));
    }
    model(&root.join("c"));

    let scan = store::scan(&root).expect("scans");
    assert_eq!(names(&scan), ["a", "b", "c"]);
    let about_model_py: Vec<&String> = scan
        .warnings
        .iter()
        .filter(|w| w.contains("model.py"))
        .collect();
    assert_eq!(about_model_py.len(), 2, "{:#?}", scan.warnings);
    assert_eq!(
        about_model_py[0],
        &format!(
            "{}: custom Python handlers cannot run in kiln; serving the model with the built-in handler",
            root.join("a/model.py").display()
        )
    );
}

#[test]
fn hidden_entries_are_skipped_silently() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    model(&root.join(".cache"));
    touch(&root.join(".DS_Store"));
    model(&root.join("m"));
    let scan = store::scan(root).expect("scans");
    assert_eq!(names(&scan), ["m"]);
    assert!(scan.warnings.is_empty(), "{:#?}", scan.warnings);
}

#[test]
fn archives_and_loose_files_are_skipped_with_a_warning() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    touch(&root.join("opt-13b.tar.gz"));
    touch(&root.join("other.zip"));
    touch(&root.join("legacy.mar"));
    touch(&root.join("README.md"));
    model(&root.join("m"));

    let scan = store::scan(root).expect("scans");
    assert_eq!(names(&scan), ["m"]);
    assert_eq!(scan.warnings.len(), 4, "{:#?}", scan.warnings);
    assert!(scan.warnings.contains(&format!(
        "{}: kiln does not unpack archives; extract it into {} to serve it as the model 'opt_13b'",
        root.join("opt-13b.tar.gz").display(),
        root.join("opt-13b").display()
    )));
    assert!(scan
        .warnings
        .iter()
        .any(|w| w.starts_with(&root.join("other.zip").display().to_string())));
    assert!(scan
        .warnings
        .iter()
        .any(|w| w.starts_with(&root.join("legacy.mar").display().to_string())));
    assert!(scan.warnings.contains(&format!(
        "{}: not a directory, skipped (each model is a subdirectory of the store)",
        root.join("README.md").display()
    )));
}

#[test]
fn names_follow_djl_and_the_change_is_said() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    model(&root.join("opt-13b"));
    model(&root.join("Qwen2.5-0.5B"));
    let scan = store::scan(root).expect("scans");
    assert_eq!(names(&scan), ["Qwen2_5_0_5B", "opt_13b"]);
    assert!(scan.warnings.contains(&format!(
        "{}: served as the model 'opt_13b' (DJL Serving's naming: characters other than letters, digits and '_' become '_')",
        root.join("opt-13b").display()
    )));
    for m in &scan.models {
        assert!(store::is_valid_model_name(&m.name));
    }
}

#[test]
fn a_name_taken_twice_keeps_the_first() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    model(&root.join("opt-13b"));
    model(&root.join("opt.13b"));
    let scan = store::scan(root).expect("scans");
    assert_eq!(names(&scan), ["opt_13b"]);
    assert_eq!(scan.models[0].dir, root.join("opt-13b"));
    assert!(scan.warnings.contains(&format!(
        "{}: its model name 'opt_13b' is already taken by {}; skipped",
        root.join("opt.13b").display(),
        root.join("opt-13b").display()
    )));
}

#[test]
fn a_directory_holding_only_a_directory_is_that_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    model(&root.join("opt13b/opt-13b-hf"));
    touch(&root.join("opt13b/.hidden"));
    let scan = store::scan(root).expect("scans");
    assert_eq!(names(&scan), ["opt_13b_hf"]);
    assert_eq!(scan.models[0].dir, root.join("opt13b/opt-13b-hf"));
    assert!(scan
        .warnings
        .iter()
        .any(|w| w.contains("holds only the directory opt-13b-hf")));
}

#[test]
fn empty_directories_are_skipped_with_a_warning() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    mkdir(&root.join("empty"));
    model(&root.join("m"));
    let scan = store::scan(root).expect("scans");
    assert_eq!(names(&scan), ["m"]);
    assert_eq!(
        scan.warnings,
        [format!(
            "{}: empty directory, skipped",
            root.join("empty").display()
        )]
    );
}

#[test]
fn a_store_holding_a_model_is_that_one_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("model");
    touch(&root.join("serving.properties"));
    model(&root.join("weights"));
    let scan = store::scan(&root).expect("scans");
    assert_eq!(names(&scan), ["model"]);
    assert_eq!(scan.models[0].dir, root);
    assert!(scan.models[0].has_properties);
    assert!(scan.warnings[0]
        .contains("the store itself holds a model (it contains serving.properties)"));
}

#[test]
fn a_missing_store_is_an_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let missing = tmp.path().join("nope");
    let err = store::scan(&missing).expect_err("missing");
    assert!(matches!(err, StoreError::Missing { .. }));
    assert_eq!(
        err.to_string(),
        format!("model store {} does not exist", missing.display())
    );
}

#[test]
fn a_file_as_store_is_an_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("store.txt");
    touch(&file);
    let err = store::scan(&file).expect_err("not a directory");
    assert!(matches!(err, StoreError::NotADirectory { .. }));
    assert_eq!(
        err.to_string(),
        format!("model store {} is not a directory", file.display())
    );
}

#[test]
fn an_empty_store_has_no_models() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let scan = store::scan(tmp.path()).expect("scans");
    assert!(scan.models.is_empty());
    assert!(scan.warnings.is_empty());
}

#[cfg(unix)]
#[test]
fn symlinked_models_are_followed_and_broken_links_warned() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("store");
    let elsewhere = tmp.path().join("elsewhere");
    model(&elsewhere);
    mkdir(&root);
    std::os::unix::fs::symlink(&elsewhere, root.join("linked")).expect("symlink");
    std::os::unix::fs::symlink(tmp.path().join("gone"), root.join("broken")).expect("symlink");
    let scan = store::scan(&root).expect("scans");
    assert_eq!(names(&scan), ["linked"]);
    assert!(scan
        .warnings
        .iter()
        .any(|w| w.starts_with(&format!("{}: cannot read", root.join("broken").display()))));
}

#[test]
fn hf_model_id_adds_a_model() {
    let none = |_: &str| None;
    assert_eq!(store::hf_model(&none).expect("ok"), None);

    let id = |_: &str| Some("facebook/opt-13b".to_string());
    assert_eq!(
        store::hf_model(&id).expect("ok"),
        Some(HfModel::ModelId {
            name: "facebook_opt_13b".into(),
            model_id: "facebook/opt-13b".into()
        })
    );

    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("my-model");
    model(&dir);
    touch(&dir.join("model.py"));
    let path = dir.display().to_string();
    let local = move |name: &str| (name == "HF_MODEL_ID").then(|| path.clone());
    match store::hf_model(&local).expect("ok") {
        Some(HfModel::Directory { entry, warnings }) => {
            assert_eq!(entry.name, "my_model");
            assert_eq!(entry.dir, PathBuf::from(&dir));
            assert!(entry.has_model_py);
            assert!(warnings
                .iter()
                .any(|w| w.contains("custom Python handlers cannot run in kiln")));
        }
        other => panic!("expected a directory model, got {other:?}"),
    }
}

/// Issue 21, point 4: a directory with no model in it (a log directory, a
/// folder of notes) is not a model; DJL registers it and fails to load it.
#[test]
fn directories_without_model_files_are_skipped_with_a_warning() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    touch(&root.join("notes/README.md"));
    touch(&root.join("notes/tokenizer.json"));
    model(&root.join("m"));
    let scan = store::scan(root).expect("scans");
    assert_eq!(names(&scan), ["m"]);
    assert_eq!(scan.warnings.len(), 1, "{:#?}", scan.warnings);
    assert!(
        scan.warnings[0].starts_with(&format!("{}: holds no model", root.join("notes").display())),
        "{:#?}",
        scan.warnings
    );
}

/// kiln's own log directory inside the store is left out without a warning.
#[test]
fn the_log_directory_is_left_out_silently() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    touch(&root.join("logs/serving.log"));
    touch(&root.join("logs/access.log"));
    model(&root.join("m"));
    let scan = store::scan_except(root, Some(&root.join("logs"))).expect("scans");
    assert_eq!(names(&scan), ["m"]);
    assert!(scan.warnings.is_empty(), "{:#?}", scan.warnings);
    // Named relative to the store's parent, it is still the same directory.
    let scan = store::scan_except(root, Some(&root.join("m/../logs"))).expect("scans");
    assert!(scan.warnings.is_empty(), "{:#?}", scan.warnings);
}
