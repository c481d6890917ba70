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

/// The file's release code: comments and string literals blanked out, `#[cfg(test)]` items
/// (a `mod tests;` line, a test module's block, a test-only function) removed.
fn release_code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    without_test_items(&without_comments_and_strings(&text))
}

/// Comments and the insides of string and char literals become spaces (so `"https://…"`
/// or `"crate::x"` in a string neither hides nor adds code).
fn without_comments_and_strings(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                out.push(if chars[i] == '\n' { '\n' } else { ' ' });
                i += 1;
            }
            i += 2;
        } else if c == 'r' && matches!(next, Some('"') | Some('#')) && !prev_ident(&chars, i) {
            // A raw string: r"…", r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            let closes = |k: usize| {
                chars.get(k) == Some(&'"') && (1..=hashes).all(|h| chars.get(k + h) == Some(&'#'))
            };
            while j < chars.len() && !closes(j) {
                j += 1;
            }
            out.push_str("\"\"");
            i = j + 1 + hashes;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    i += 1;
                }
                if chars.get(i) == Some(&'\n') {
                    out.push('\n');
                }
                i += 1;
            }
            out.push_str("\"\"");
            i += 1;
        } else if c == '\'' && is_char_literal(&chars, i) {
            let end = chars[i + 1..]
                .iter()
                .position(|&c| c == '\'')
                .map_or(i, |p| i + 1 + p);
            let escaped_quote = chars.get(i + 1) == Some(&'\\') && chars.get(i + 2) == Some(&'\'');
            i = if escaped_quote { i + 4 } else { end + 1 };
            out.push_str("' '");
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prev_ident(chars: &[char], i: usize) -> bool {
    i > 0 && is_ident(chars[i - 1])
}

/// `'a'`, `'\n'`, `'\''`, as opposed to a lifetime `'a`.
fn is_char_literal(chars: &[char], i: usize) -> bool {
    matches!(
        (chars.get(i + 1), chars.get(i + 2)),
        (Some('\\'), _) | (Some(_), Some('\''))
    )
}

/// Removes each item behind `#[cfg(test)]`: up to its `;` or through its `{…}` block.
fn without_test_items(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at..];
        let semi = item.find(';');
        let brace = item.find('{');
        let end = match (semi, brace) {
            (Some(s), Some(b)) if s < b => s + 1,
            (_, Some(b)) => block_end(item, b),
            (Some(s), None) => s + 1,
            (None, None) => item.len(),
        };
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// The index just past the `}` that closes the `{` at `open`.
fn block_end(text: &str, open: usize) -> usize {
    let mut depth = 0usize;
    for (i, c) in text[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return open + i + 1;
                }
            }
            _ => {}
        }
    }
    text.len()
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path the code names from `crate`, `super` or `self`, made absolute; `use` groups
/// are expanded at every depth (`use crate::{a::{b, c}, d::e}` names `a::b`, `a::c`, `d::e`).
fn references(code: &str, me: &Module) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    for start in ["crate::", "super::", "self::"] {
        for (at, _) in code.match_indices(start) {
            if at > 0 && (is_ident(bytes[at - 1] as char) || bytes[at - 1] == b':') {
                continue;
            }
            for path in expand(&code[at..]) {
                let path: Vec<&str> = path.iter().map(String::as_str).collect();
                out.push(absolute(&path, me));
            }
        }
    }
    out
}

/// The paths one path expression names, its `{…}` groups expanded recursively.
fn expand(text: &str) -> Vec<Vec<String>> {
    let end = text
        .find(|c: char| !(is_ident(c) || c == ':'))
        .unwrap_or(text.len());
    let prefix: Vec<String> = text[..end]
        .split("::")
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if !text[end..].starts_with('{') {
        return vec![prefix];
    }
    let close = block_end(text, end);
    let inner = &text[end + 1..close.saturating_sub(1).max(end + 1)];
    let mut out = Vec::new();
    for item in split_top_level(inner) {
        let item = item.split(" as ").next().unwrap_or("").trim();
        if item.is_empty() {
            continue;
        }
        if item == "self" {
            out.push(prefix.clone());
            continue;
        }
        for tail in expand(item) {
            let mut full = prefix.clone();
            full.extend(tail);
            out.push(full);
        }
    }
    out
}

/// `a::{b, c}, d` → [`a::{b, c}`, `d`]: commas inside braces do not split.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut from) = (0usize, 0);
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(&text[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[from..]);
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
        "fleet",
    ] {
        let got = imports.get(low).cloned().unwrap_or_default();
        for high in ["handshake", "listener", "gateway", "admin"] {
            assert!(!got.contains(high), "`{low}` imports `{high}`");
        }
    }
    // The relay never touches the fleet store (SPEC §10), nor do the rules beneath it.
    for low in ["relay", "admission", "upstream", "config", "observe", "ops"] {
        let got = imports.get(low).cloned().unwrap_or_default();
        assert!(!got.contains("fleet"), "`{low}` imports `fleet`");
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
    // Validation reads through config's reader, and calls into `tls` and `admission` to
    // build what it validates: none of them may open a file themselves.
    let checked = ["config", "tls", "admission"];
    let io = [
        "std::fs",
        "fs::read",
        "File::open",
        "File::create",
        "OpenOptions",
        "read_to_string(",
        ".exists()",
        "metadata(",
    ];
    for (me, path) in modules() {
        if me.first().is_none_or(|m| !checked.contains(&m.as_str())) {
            continue;
        }
        let code = release_code(&path);
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
    let me: Module = vec!["relay".into(), "deadlines".into()];
    let code = without_test_items(&without_comments_and_strings(
        "#[cfg(test)] mod testing;\nuse crate::{outcome::{Ending, Side}, handshake::Accepted};\n\
         const U: &str = \"https://crate::x\"; // crate::y\nuse super::pump;\n\
         #[cfg(test)]\nmod tests { use crate::gateway; }\nfn f() { crate::ids::next(); }",
    ));
    let got: Vec<String> = references(&code, &me)
        .iter()
        .map(|r| r.join("::"))
        .collect();
    assert_eq!(
        got,
        [
            "outcome::Ending",
            "outcome::Side",
            "handshake::Accepted",
            "ids::next",
            "relay::pump"
        ]
    );
    let mut cyclic = BTreeSet::new();
    cyclic.insert(("a".to_owned(), "b".to_owned()));
    cyclic.insert(("b".to_owned(), "a".to_owned()));
    assert!(find_cycle(&cyclic).is_some());
}
