use std::time::Duration;

use super::*;
use crate::FileRecord;

fn parts(source: &str, quantize: &str) -> KeyParts {
    KeyParts {
        source: source.into(),
        identity: vec![FileRecord {
            name: "model.safetensors".into(),
            size: 10,
            etag: Some("\"abc\"".into()),
        }],
        quantize: quantize.into(),
        dtype: "auto".into(),
        artifact_version: 1,
        layout: None,
        packed: None,
    }
}

fn cache(tmp: &Path, max: Option<u64>) -> PreparedCache {
    PreparedCache::new(&DownloadDir::new(tmp), max)
}

/// An entry as another process would have left it (not in use here), of
/// `size` bytes, last used `age` ago.
fn foreign_entry(c: &PreparedCache, p: &KeyParts, size: u64, age: Duration) -> String {
    let key = p.key();
    let dir = c.root().join(&key);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(PREPARED_FILE), vec![0u8; size as usize]).unwrap();
    let record = Record {
        key: key.clone(),
        parts: p.clone(),
        size,
        layout_size: None,
        created: 0,
    };
    let path = dir.join(RECORD_FILE);
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
    let f = File::options().write(true).open(&path).unwrap();
    f.set_modified(SystemTime::now() - age).unwrap();
    key
}

#[test]
fn keys_change_with_every_part_and_are_stable() {
    let base = parts("s3://b/m", "q8_0");
    assert_eq!(base.key(), parts("s3://b/m", "q8_0").key());
    assert_eq!(base.key().len(), 32);
    let mut variants = vec![parts("s3://b/other", "q8_0"), parts("s3://b/m", "q4_k")];
    let mut v = base.clone();
    v.identity[0].etag = Some("\"abd\"".into());
    variants.push(v);
    let mut v = base.clone();
    v.identity[0].size = 11;
    variants.push(v);
    let mut v = base.clone();
    v.dtype = "f16".into();
    variants.push(v);
    let mut v = base.clone();
    v.artifact_version = 2;
    variants.push(v);
    for v in variants {
        assert_ne!(v.key(), base.key(), "{v:?}");
    }
}

#[test]
fn local_identity_follows_size_and_mtime_and_skips_hidden_files() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("config.json"), b"{}").unwrap();
    std::fs::write(m.join(".hidden"), b"x").unwrap();
    let (source, files) = local_identity(&m).unwrap();
    assert_eq!(
        source,
        std::fs::canonicalize(&m).unwrap().display().to_string()
    );
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].name, "config.json");
    assert_eq!(files[0].size, 2);
    let f = File::options()
        .write(true)
        .open(m.join("config.json"))
        .unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    let (_, touched) = local_identity(&m).unwrap();
    assert_ne!(touched, files, "a new mtime is a new identity");
    let (_, one) = local_identity(&m.join("config.json")).unwrap();
    assert_eq!(one, touched);
}

#[test]
fn an_entry_is_built_once_then_used_and_kept_while_in_use() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cache(tmp.path(), None);
    let p = parts("/m", "q8_0");
    let Begin::Build(b) = c.begin(&p).unwrap() else {
        panic!("an empty cache has it ready")
    };
    assert!(b.file().starts_with(c.root()));
    std::fs::write(b.file(), b"GGUF....").unwrap();
    let built = b.commit(&c).unwrap();
    assert_eq!(built.key(), p.key());
    assert_eq!(built.record.size, 8);
    assert!(!c.root().join(format!("{}.partial", p.key())).exists());
    let Begin::Ready(again) = c.begin(&p).unwrap() else {
        panic!("built twice")
    };
    assert_eq!(again.file(), built.file());
    assert!(matches!(
        c.remove(&p.key()),
        Err(PreparedError::InUse { .. })
    ));
    assert!(matches!(
        c.remove("0123456789abcdef0123456789abcdef"),
        Err(PreparedError::NotFound { .. })
    ));
    assert!(matches!(
        c.remove("../x"),
        Err(PreparedError::NotFound { .. })
    ));
}

#[test]
fn an_abandoned_build_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cache(tmp.path(), None);
    let p = parts("/m", "q4_0");
    let Begin::Build(b) = c.begin(&p).unwrap() else {
        panic!("ready")
    };
    std::fs::write(b.file(), b"half").unwrap();
    drop(b);
    assert!(c.list().is_empty());
    assert!(!c.root().join(format!("{}.partial", p.key())).exists());
    assert!(matches!(c.begin(&p).unwrap(), Begin::Build(_)));
}

#[test]
fn eviction_removes_the_least_recently_used_entries_not_in_use() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cache(tmp.path(), Some(250));
    let hour = Duration::from_secs(3600);
    let oldest = foreign_entry(&c, &parts("/a", "q8_0"), 100, 4 * hour);
    let old = foreign_entry(&c, &parts("/b", "q8_0"), 100, 3 * hour);
    let used = foreign_entry(&c, &parts("/c", "q8_0"), 100, 2 * hour);
    let newer = foreign_entry(&c, &parts("/d", "q8_0"), 100, hour);
    assert_eq!(c.total_bytes(), 400);
    // Another process maps the oldest.
    let held = lock::shared(&c.lock_path(&oldest)).unwrap();
    let evicted = c.evict().unwrap();
    assert_eq!(evicted, vec![old.clone(), used.clone()]);
    let left: Vec<String> = c.list().iter().map(|e| e.key().to_string()).collect();
    assert_eq!(left, vec![oldest.clone(), newer.clone()]);
    drop(held);
    // Using an entry makes it the most recent.
    let Begin::Ready(_) = c.begin(&parts("/a", "q8_0")).unwrap() else {
        panic!("not ready")
    };
    let left: Vec<String> = c.list().iter().map(|e| e.key().to_string()).collect();
    assert_eq!(left, vec![newer.clone(), oldest.clone()]);
    let (removed, in_use) = c.remove_all().unwrap();
    assert_eq!(removed, vec![newer]);
    assert_eq!(in_use, vec![oldest]);
}

#[test]
fn a_truncated_entry_is_an_error_naming_its_file_and_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cache(tmp.path(), None);
    let p = parts("/m", "q8_0");
    let key = foreign_entry(&c, &p, 100, Duration::ZERO);
    let file = c.root().join(&key).join(PREPARED_FILE);
    File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(40)
        .unwrap();
    let e = match c.begin(&p) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a truncated entry was used"),
    };
    assert!(e.contains(&file.display().to_string()), "{e}");
    assert!(e.contains("40 bytes where its record says 100"), "{e}");
    assert!(!c.root().join(&key).exists(), "removed");
    assert!(matches!(c.begin(&p).unwrap(), Begin::Build(_)));
}

#[test]
fn a_layout_entry_has_its_own_key_and_file_and_model_keys_are_unchanged() {
    let model = parts("/m.gguf", "none");
    // Without a layout the hashed JSON is what it was before layouts were
    // cached, so existing entries keep their keys.
    let json = serde_json::to_string(&model).unwrap();
    assert!(!json.contains("layout"), "{json}");
    let mut layout = model.clone();
    layout.layout = Some("cpu-interleaved-16-v1".into());
    assert_ne!(layout.key(), model.key());
    let mut v2 = layout.clone();
    v2.layout = Some("cpu-interleaved-16-v2".into());
    assert_ne!(v2.key(), layout.key(), "a new layout version is a new key");

    let tmp = tempfile::tempdir().unwrap();
    let c = cache(tmp.path(), None);
    let Begin::Build(b) = c.begin(&layout).unwrap() else {
        panic!("ready")
    };
    assert!(b.file().ends_with(LAYOUT_FILE));
    std::fs::write(b.file(), b"laid out").unwrap();
    let built = b.commit(&c).unwrap();
    assert_eq!(built.file(), c.root().join(layout.key()).join(LAYOUT_FILE));
    assert_eq!(built.record.size, 8);
    let Begin::Ready(again) = c.begin(&layout).unwrap() else {
        panic!("built twice")
    };
    assert_eq!(again.file(), built.file());
}

#[test]
fn a_discarded_entry_is_rebuilt_unless_another_process_holds_it() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cache(tmp.path(), None);
    let p = parts("/m", "q8_0");
    let Begin::Build(b) = c.begin(&p).unwrap() else {
        panic!("ready")
    };
    std::fs::write(b.file(), b"GGUF....").unwrap();
    b.commit(&c).unwrap();
    // This process uses it (a shared lock it keeps) and finds it corrupt:
    // its own lock does not stand in the way of rebuilding.
    c.discard(&p.key()).unwrap();
    let rebuilt = c.try_rebuild(&p).unwrap().expect("nobody else holds it");
    std::fs::write(rebuilt.file(), b"GGUF!!!!").unwrap();
    rebuilt.commit(&c).unwrap();
    assert_eq!(c.list().len(), 1);

    // Another process maps it: no rebuild (and no wait for that process).
    let held = lock::shared(&c.lock_path(&p.key())).unwrap();
    c.discard(&p.key()).unwrap();
    assert!(c.try_rebuild(&p).unwrap().is_none());
    drop(held);
    assert!(c.try_rebuild(&p).unwrap().is_some());
}

/// A packed entry (model.gguf and weights.layout) records both sizes, is a
/// key of its own, counts both files towards the bound, and a cut layout
/// file is found out at lookup like a cut model file.
#[test]
fn a_packed_entry_records_and_checks_both_files() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cache(tmp.path(), None);
    let whole = parts("/m", "q8_0");
    let p = KeyParts {
        packed: Some("cpu-interleaved-16-v1".into()),
        ..whole.clone()
    };
    assert_ne!(p.key(), whole.key(), "packed and whole entries differ");
    let Begin::Build(b) = c.begin(&p).unwrap() else {
        panic!("an empty cache has it ready")
    };
    let layout = b.packed_file().expect("a packed entry's layout file");
    assert_eq!(layout.file_name().unwrap(), LAYOUT_FILE);
    assert_eq!(b.file().file_name().unwrap(), PREPARED_FILE);
    std::fs::write(b.file(), b"GGUF....").unwrap();
    std::fs::write(&layout, vec![7u8; 100]).unwrap();
    let built = b.commit(&c).unwrap();
    assert_eq!(built.record.size, 8);
    assert_eq!(built.record.layout_size, Some(100));
    assert_eq!(built.record.total_size(), 108);
    assert_eq!(c.total_bytes(), 108);
    let file = built.packed_file().expect("layout file");
    release(&c.lock_path(&p.key()));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(50)
        .unwrap();
    match c.begin(&p) {
        Err(PreparedError::Corrupt { file: f, msg }) => {
            assert_eq!(f, file);
            assert!(msg.contains("truncated"), "{msg}");
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a cut layout file was used"),
    }
    assert!(!built.dir.exists(), "the entry was removed");
    assert!(matches!(c.begin(&p).unwrap(), Begin::Build(_)));
}
