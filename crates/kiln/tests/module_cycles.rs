//! Keeps two folders free of import loops (issue 22's "done when"): the CPU
//! kernels (`kiln-backend/src/cpu`), where no file may import another that
//! imports it back, and the HTTP crate (`kiln-server/src`), where the only
//! module others may import back is the shared application state (`state.rs`
//! holds every other module's long-lived parts, so each reads it).
//!
//! The graph is read from the source text: every `crate::…`, `super::…` and
//! `self::…` path (in `use` items and in expressions, test code included, doc
//! comments and `//` comments left out) is an edge to the file that path
//! names. It is a text reading, not the compiler's, so it errs towards more
//! edges (a name inside an inline `mod tests` that happens to match a sibling
//! file counts), never fewer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A source tree: every `.rs` file under `root`, by its module path relative
/// to the crate (`["cpu", "x86"]` for `src/cpu/x86.rs`).
struct Tree {
    files: BTreeMap<Vec<String>, PathBuf>,
}

impl Tree {
    fn read(src: &Path) -> Tree {
        let mut files = BTreeMap::new();
        let mut stack = vec![src.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).expect("readable source folder") {
                let path = entry.expect("folder entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    files.insert(module_path(src, &path), path);
                }
            }
        }
        Tree { files }
    }

    /// The file that holds the item at module path `path`: its longest
    /// prefix that is a file of the tree.
    fn file_of(&self, path: &[String]) -> Option<&Vec<String>> {
        (1..=path.len())
            .rev()
            .find_map(|n| self.files.get_key_value(&path[..n]).map(|(k, _)| k))
    }
}

/// `src/cpu/mod.rs` → `["cpu"]`, `src/cpu/x86.rs` → `["cpu", "x86"]`,
/// `src/lib.rs` → `[]`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file
        .strip_prefix(src)
        .expect("file under its source folder");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_string());
    }
    parts
}

/// The source with comments blanked (line comments, doc comments and block
/// comments), so paths named in prose make no edge. String literals are
/// left: a path inside a string is rare and would only add an edge.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(b"//") {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
        } else if bytes[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < bytes.len() {
                if bytes[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if bytes[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else {
            out.push(bytes[i] as char);
            i += 1;
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every module path `text` names from `here` (the module path of the
/// file), expanded through `{a, b::c}` groups: `crate::x::y` → `[x, y]`,
/// `super::x` → the parent's `x`, `self::x` → `here`'s `x`.
fn named_paths(text: &str, file_module: &[String], children: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let code = code_only(text);
    let inline = inline_modules(&code);
    // The module a position of the file is in: the file's, plus the inline
    // `mod name { … }` blocks around it (`super` in a file's `mod tests`
    // is the file itself).
    let module_at = |pos: usize| -> Vec<String> {
        let mut m = file_module.to_vec();
        m.extend(
            inline
                .iter()
                .filter(|(_, start, end)| *start <= pos && pos < *end)
                .map(|(name, _, _)| name.clone()),
        );
        m
    };
    // Paths relative to the file's own module start with a child's name
    // (`use x86::Isa;` in `cpu/mod.rs`).
    for child in children {
        let needle = format!("{child}::");
        for (start, _) in code.match_indices(&needle) {
            let before = &code[..start];
            if before.ends_with(is_ident) || before.ends_with("::") {
                continue;
            }
            if module_at(start).len() != file_module.len() {
                continue;
            }
            let mut path = file_module.to_vec();
            path.push(child.clone());
            expand(&code[start + needle.len()..], &path, &mut out);
        }
    }
    for (start, _) in code.match_indices("::") {
        // The path segment before `::` must be a root keyword that starts
        // the path (not `foo::crate`, which cannot occur, or `x::super`).
        let before = &code[..start];
        let word_start = before.rfind(|c: char| !is_ident(c)).map_or(0, |p| p + 1);
        let word = &before[word_start..];
        if word_start > 0 && before[..word_start].ends_with("::") {
            continue;
        }
        // The module the root keyword stands for; `super` chains are
        // handled by walking on while the next segment is `super` again.
        let here = module_at(start);
        let mut base: Vec<String> = match word {
            "crate" => Vec::new(),
            "self" => here,
            "super" => {
                let mut m = here;
                m.pop();
                m
            }
            _ => continue,
        };
        let mut rest = &code[start + 2..];
        while let Some(r) = rest.strip_prefix("super::") {
            base.pop();
            rest = r;
        }
        expand(rest, &base, &mut out);
    }
    out
}

/// The inline modules of `code` (comments already blanked): each
/// `mod name {` with the byte span of its block, in source order (so an
/// outer block comes before the ones it holds).
fn inline_modules(code: &str) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    for (at, _) in code.match_indices("mod ") {
        if code[..at].ends_with(is_ident) {
            continue;
        }
        let rest = &code[at + 4..];
        let end = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
        let name = &rest[..end];
        let after = rest[end..].trim_start();
        if name.is_empty() || !after.starts_with('{') {
            continue;
        }
        let open = code.len() - after.len();
        let mut depth = 0usize;
        let mut close = code.len();
        for (i, c) in code[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        close = open + i;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.push((name.to_string(), open, close));
    }
    out
}

/// Reads one use tree (or expression path) at the start of `rest` under
/// `base`, pushing each full path it names.
fn expand(rest: &str, base: &[String], out: &mut Vec<Vec<String>>) {
    let rest = rest.trim_start();
    if let Some(inner) = rest.strip_prefix('{') {
        // Split the group at its top-level commas.
        let mut depth = 0;
        let mut part_start = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    expand(&inner[part_start..i], base, out);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&inner[part_start..i], base, out);
                    part_start = i + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let end = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
    let ident = &rest[..end];
    if ident.is_empty() {
        if !base.is_empty() {
            out.push(base.to_vec());
        }
        return;
    }
    let mut path = base.to_vec();
    if ident != "self" {
        path.push(ident.to_string());
    }
    match rest[end..].strip_prefix("::") {
        Some(more) => expand(more, &path, out),
        None => out.push(path),
    }
}

/// The file-level import graph of `tree`, restricted to files under
/// `within` (a module path prefix).
fn graph(tree: &Tree, within: &[String]) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, file) in &tree.files {
        if !module.starts_with(within) {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("readable source file");
        let children: Vec<String> = tree
            .files
            .keys()
            .filter(|k| k.len() == module.len() + 1 && k.starts_with(module))
            .map(|k| k[module.len()].clone())
            .collect();
        let targets = edges.entry(module.clone()).or_default();
        for path in named_paths(&text, module, &children) {
            if let Some(target) = tree.file_of(&path) {
                if target != module && target.starts_with(within) {
                    targets.insert(target.clone());
                }
            }
        }
    }
    edges
}

/// Every loop in `edges`, each as the list of files around it (one per
/// strongly connected group of more than one file).
fn loops(edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<String>> {
    // Two files are in one loop when each reaches the other.
    let reach = |from: &Vec<String>| -> BTreeSet<Vec<String>> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(n) = stack.pop() {
            for m in edges.get(&n).into_iter().flatten() {
                if seen.insert(m.clone()) {
                    stack.push(m.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<_, _> = edges.keys().map(|k| (k.clone(), reach(k))).collect();
    let mut placed = BTreeSet::new();
    let mut out = Vec::new();
    for a in edges.keys() {
        if placed.contains(a) || !reaches[a].contains(a) {
            continue;
        }
        let group: Vec<Vec<String>> = edges
            .keys()
            .filter(|b| reaches[a].contains(*b) && reaches[*b].contains(a))
            .cloned()
            .collect();
        for b in &group {
            placed.insert(b.clone());
        }
        out.push(group.iter().map(|m| m.join("::")).collect());
    }
    out
}

/// The edges among the files of `found`'s loops, one `a -> b` per line, for
/// the failure message: what to cut.
fn describe(edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>, found: &[Vec<String>]) -> String {
    let mut out = String::new();
    for group in found {
        for (from, targets) in edges {
            let from = from.join("::");
            if !group.contains(&from) {
                continue;
            }
            for to in targets {
                let to = to.join("::");
                if group.contains(&to) {
                    out.push_str(&format!("\n  {from} -> {to}"));
                }
            }
        }
    }
    out
}

fn crate_src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name)
        .join("src")
}

#[test]
fn the_cpu_kernels_import_each_other_in_no_loop() {
    let tree = Tree::read(&crate_src("kiln-backend"));
    let cpu = vec!["cpu".to_string()];
    let edges = graph(&tree, &cpu);
    assert!(edges.len() > 5, "the cpu folder was not found: {edges:?}");
    let found = loops(&edges);
    assert!(
        found.is_empty(),
        "files in kiln-backend/src/cpu import each other in loops: {found:?}; their edges:{}",
        describe(&edges, &found)
    );
}

#[test]
fn the_server_modules_import_back_only_the_shared_state() {
    let tree = Tree::read(&crate_src("kiln-server"));
    let mut edges = graph(&tree, &[]);
    assert!(edges.len() > 10, "kiln-server's modules were not found");
    // Every module may read the shared state, which holds their parts.
    let state = vec!["state".to_string()];
    for targets in edges.values_mut() {
        targets.remove(&state);
    }
    let found = loops(&edges);
    assert!(
        found.is_empty(),
        "kiln-server modules import each other in loops (other than through state.rs): {found:?}; their edges:{}",
        describe(&edges, &found)
    );
}

/// The reader itself: a loop it is shown is found, and a chain is not.
#[test]
fn the_reader_finds_a_planted_loop_and_passes_a_chain() {
    let dir = std::env::temp_dir().join(format!("kiln-cycles-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("cpu")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod cpu;\n").unwrap();
    std::fs::write(
        src.join("cpu/mod.rs"),
        "mod a; mod b; mod c;\n#[cfg(test)]\nmod d;\n",
    )
    .unwrap();
    std::fs::write(
        src.join("cpu/a.rs"),
        "use super::{b::f, c};\n/// [`super::c`] in prose\n",
    )
    .unwrap();
    std::fs::write(src.join("cpu/b.rs"), "fn g() { crate::cpu::c::h() }\n").unwrap();
    std::fs::write(
        src.join("cpu/c.rs"),
        "// super::a in a comment\n#[cfg(test)]\nmod tests {\n    use super::*;\n    use super::super::d;\n}\n",
    )
    .unwrap();
    std::fs::write(src.join("cpu/d.rs"), "pub fn helper() {}\n").unwrap();
    let cpu = vec!["cpu".to_string()];
    let tree = Tree::read(&src);
    assert!(loops(&graph(&tree, &cpu)).is_empty());
    std::fs::write(src.join("cpu/c.rs"), "use super::super::cpu::a::X;\n").unwrap();
    let tree = Tree::read(&src);
    let found = loops(&graph(&tree, &cpu));
    assert_eq!(found, vec![vec!["cpu::a", "cpu::b", "cpu::c"]]);
    std::fs::remove_dir_all(&dir).unwrap();
}
