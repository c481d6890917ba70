//! The walls of `docs/architecture.md`, checked from the imports of `src/`: no import
//! cycle between sibling modules at any level, nothing below the crate root importing the
//! root, leaf modules importing nothing of the crate, observability importing only the
//! outcome vocabulary, and config reading files only through its one loader.
//!
//! Imports are read from the text (a `crate::`, `super::` or `self::` path, `use` groups
//! expanded), outside `#[cfg(test)]` code and comments: what the compiler builds for the
//! release binary.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// Every `.rs` file of `src/` with its module path (`src/a/mod.rs` and `src/a.rs` → `a`).
fn modules() -> BTreeMap<Module, PathBuf> {
    let mut out = BTreeMap::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir:?}: {e}"));
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let Ok(rel) = path.strip_prefix(&root) else {
                continue;
            };
            let Some(rel) = rel.to_str().and_then(|r| r.strip_suffix(".rs")) else {
                continue;
            };
            let mut module: Module = rel.split('/').map(str::to_owned).collect();
            if module.last().is_some_and(|m| m == "mod") {
                module.pop();
            }
            if module == ["lib"] || module == ["main"] {
                module.clear();
            }
            out.insert(module, path);
        }
    }
    out
}

/// The file's release code: cut at its test module, comments dropped.
fn release_code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let text = match text.find("#[cfg(test)]") {
        Some(at) => &text[..at],
        None => &text[..],
    };
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path the code names from `crate`, `super` or `self`, made absolute.
fn references(code: &str, me: &Module) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    for start in ["crate::", "super::", "self::"] {
        for (at, _) in code.match_indices(start) {
            if at > 0 && is_ident(bytes[at - 1] as char) {
                continue;
            }
            let rest = &code[at..];
            let end = rest
                .find(|c: char| !(is_ident(c) || c == ':'))
                .unwrap_or(rest.len());
            let path: Vec<&str> = rest[..end].split("::").filter(|s| !s.is_empty()).collect();
            // `use crate::a::{b, c::d}`: one path per item of the group.
            if rest[end..].starts_with('{') {
                let group = rest[end + 1..].split('}').next().unwrap_or("");
                for item in group.split(',') {
                    let item = item.split(" as ").next().unwrap_or("").trim();
                    let mut full = path.clone();
                    full.extend(item.split("::").filter(|s| !s.is_empty() && *s != "self"));
                    out.push(absolute(&full, me));
                }
            } else {
                out.push(absolute(&path, me));
            }
        }
    }
    out
}

fn absolute(path: &[&str], me: &Module) -> Vec<String> {
    let mut at: Vec<String> = me.clone();
    let mut rest = path;
    match rest.first() {
        Some(&"crate") => {
            at.clear();
            rest = &rest[1..];
        }
        _ => {
            while let Some((&first, tail)) = rest.split_first() {
                match first {
                    "super" => {
                        at.pop();
                    }
                    "self" => {}
                    _ => break,
                }
                rest = tail;
            }
        }
    }
    at.extend(rest.iter().map(|s| s.to_string()));
    at
}

/// The module a path lands in: its longest prefix that is a module.
fn module_of(path: &[String], modules: &BTreeMap<Module, PathBuf>) -> Module {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|m| modules.contains_key(m))
        .unwrap_or_default()
}

/// Edges between sibling modules: `a::x` using `a::y::z` is an edge x → y under `a`.
/// A module using its own ancestors or descendants is not an edge (a parent declares and
/// re-exports its children).
fn sibling_edges() -> BTreeMap<Module, BTreeSet<(String, String)>> {
    let modules = modules();
    let mut edges: BTreeMap<Module, BTreeSet<(String, String)>> = BTreeMap::new();
    for (me, path) in &modules {
        let test_only = path.ends_with("tests.rs") || path.ends_with("testing.rs");
        if me.is_empty() || test_only {
            continue;
        }
        for r in references(&release_code(path), me) {
            let to = module_of(&r, &modules);
            let shared = me.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if shared == me.len() || shared == to.len() {
                continue;
            }
            edges
                .entry(me[..shared].to_vec())
                .or_default()
                .insert((me[shared].clone(), to[shared].clone()));
        }
    }
    edges
}

fn find_cycle(edges: &BTreeSet<(String, String)>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeSet<(String, String)>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_owned(), 1);
        stack.push(node.to_owned());
        for (_, next) in edges.iter().filter(|(from, _)| from == node) {
            match state.get(next.as_str()) {
                Some(1) => {
                    let at = stack.iter().position(|n| n == next).unwrap_or(0);
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(next, edges, state, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        state.insert(node.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for (from, _) in edges {
        if !state.contains_key(from.as_str())
            && let Some(c) = visit(from, edges, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

#[test]
fn no_import_cycle_between_sibling_modules() {
    let edges = sibling_edges();
    assert!(
        edges.contains_key(&Vec::new()),
        "the root's edges were read"
    );
    for (parent, edges) in &edges {
        if let Some(cycle) = find_cycle(edges) {
            panic!(
                "import cycle under `crate::{}`: {}",
                parent.join("::"),
                cycle.join(" → ")
            );
        }
    }
}

/// Imports of each top-level module.
fn top_level_imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in sibling_edges().remove(&Vec::new()).unwrap_or_default() {
        out.entry(from).or_default().insert(to);
    }
    out
}

#[test]
fn leaves_import_nothing_and_observability_only_the_vocabulary() {
    let imports = top_level_imports();
    let allowed: [(&str, &[&str]); 5] = [
        ("outcome", &[]),
        ("http_util", &[]),
        ("log_budget", &[]),
        ("ids", &[]),
        ("observe", &["outcome"]),
    ];
    for (module, may) in allowed {
        let got = imports.get(module).cloned().unwrap_or_default();
        let extra: Vec<&String> = got.iter().filter(|m| !may.contains(&m.as_str())).collect();
        assert!(extra.is_empty(), "`{module}` imports {extra:?}");
    }
    // The relay, admission and upstreams sit below the HTTP driver and the listener.
    for low in [
        "relay",
        "admission",
        "upstream",
        "config",
        "observe",
        "ops",
        "shared",
    ] {
        let got = imports.get(low).cloned().unwrap_or_default();
        for high in ["handshake", "listener", "gateway", "admin"] {
            assert!(!got.contains(high), "`{low}` imports `{high}`");
        }
    }
}

#[test]
fn nothing_below_the_root_imports_the_root() {
    let modules = modules();
    let tops: BTreeSet<&String> = modules.keys().filter_map(|m| m.first()).collect();
    for (me, path) in &modules {
        if me.is_empty() {
            continue;
        }
        for r in references(&release_code(path), me) {
            // `crate::Name` or `crate::function`: an item of lib.rs, not a module.
            let upward = r.first().is_some_and(|m| !tops.contains(m));
            assert!(
                !upward,
                "{path:?} imports the crate root: crate::{}",
                r.join("::")
            );
        }
    }
}

#[test]
fn config_reads_files_only_through_its_loader() {
    for (me, path) in modules() {
        if me.first().is_none_or(|m| m != "config") {
            continue;
        }
        let code = release_code(&path);
        let io = ["std::fs", "File::open", "read_to_string(", "fs::read("];
        let loader = path.ends_with("config/files.rs") || path.ends_with("config/mod.rs");
        for call in io {
            if code.contains(call) {
                assert!(loader, "{path:?} does file I/O ({call})");
            }
        }
    }
}

/// The checks above would pass on an empty tree: make sure they see real imports.
#[test]
fn the_reader_finds_known_imports() {
    let imports = top_level_imports();
    let has = |a: &str, b: &str| imports.get(a).is_some_and(|s| s.contains(b));
    assert!(has("handshake", "upstream"));
    assert!(has("relay", "outcome"));
    assert!(has("listener", "handshake"));
    let mut cyclic = BTreeSet::new();
    cyclic.insert(("a".to_owned(), "b".to_owned()));
    cyclic.insert(("b".to_owned(), "a".to_owned()));
    assert!(find_cycle(&cyclic).is_some());
}
