//! The shape of `src/`, read from its `use` paths: the layers call downward only, no two files
//! import each other (directly or round a circle), and only `cli/` and `main.rs` know the
//! command line. A change that breaks the shape fails here, with the files named.
//!
//! The files are parsed, not compiled: every `crate::a::b` and `super::a` path in a file (test
//! modules aside) is an arrow to the file that defines the longest prefix of it. Paths relative to
//! a module's own children (`mod copy; pub use copy::copy_out;`) are not read: a module file that
//! re-exports its children is their facade, not another job (cmd/guestfs/mod.rs still defines
//! `GuestFs` beside re-exporting the commands that use it; the guest file rework splits it).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The layers, lowest first: a file may import files of its own layer or lower ones. `error`
/// files (the crate's `Error` and each layer's `error.rs`) are vocabulary every layer may name.
const LAYERS: &[&[&str]] = &[
    &["error"],
    &["io", "crypto"],
    &["qcow2"],
    &["chain"],
    &["disk", "keys"],
    &["mount", "cmd"],
    &["fuzz"],
    &["cli"],
    &["main", "lib"],
];

/// Module path (`mount::fs`) of every source file, with its path.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path
                    .strip_prefix(src)
                    .expect("under src")
                    .with_extension("");
                let mut parts: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                if parts.last().is_some_and(|p| p == "mod") {
                    parts.pop();
                }
                out.insert(parts.join("::"), path);
            }
        }
    }
    out
}

/// A file's text without its `#[cfg(test)] mod tests { ... }` (always last) and without comments.
fn code(path: &Path) -> String {
    let text = fs::read_to_string(path).expect("read source");
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(at) => &text[..at],
        None => &text[..],
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_test_file(module: &str) -> bool {
    module
        .split("::")
        .any(|p| p == "tests" || p.ends_with("_tests"))
}

/// Every path in `code` that starts with `crate::` or `super::`, as its segments: a group
/// (`crate::{a::b, c}`, nested too) gives one path per member, and `super::super::` counts its
/// levels (each `super` segment is kept, for `arrows` to resolve).
fn paths(code: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(found) = code[from..].find(start) {
            let at = from + found;
            from = at + start.len();
            let before = code[..at].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue; // part of a longer path (`super::super::`), read with its start
            }
            let root = start.trim_end_matches("::").to_string();
            for segments in tree(&code[from..]).0 {
                out.push((root.clone(), segments));
            }
        }
    }
    out
}

/// The paths of a use tree at the start of `text` (`a::b`, `a::{b, c::d}`, `{a, b}`) and the bytes
/// it took.
fn tree(text: &str) -> (Vec<Vec<String>>, usize) {
    let ident_end = |t: &str| {
        t.find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(t.len())
    };
    let mut prefix = Vec::new();
    let mut at = 0;
    loop {
        let t = &text[at..];
        if let Some(inner) = t.strip_prefix('{') {
            // A group: each member, comma separated, is a tree of its own.
            let mut out = Vec::new();
            let mut used = 1;
            let mut rest = inner;
            loop {
                let trimmed = rest.trim_start();
                used += rest.len() - trimmed.len();
                rest = trimmed;
                if rest.is_empty() {
                    return (out, at + used);
                }
                if rest.starts_with('}') {
                    return (out, at + used + 1);
                }
                if let Some(after) = rest.strip_prefix(',') {
                    used += 1;
                    rest = after;
                    continue;
                }
                let (members, n) = tree(rest);
                if n == 0 {
                    // Not a path (`self`, `*`, `Name as Other`): skip one character.
                    used += 1;
                    rest = &rest[rest.chars().next().map_or(1, char::len_utf8)..];
                    continue;
                }
                for m in members {
                    let mut full = prefix.clone();
                    full.extend(m);
                    out.push(full);
                }
                used += n;
                rest = &rest[n..];
            }
        }
        let n = ident_end(t);
        if n == 0 {
            return (
                vec![prefix].into_iter().filter(|p| !p.is_empty()).collect(),
                at,
            );
        }
        prefix.push(t[..n].to_string());
        at += n;
        if text[at..].starts_with("::") {
            at += 2;
        } else {
            return (vec![prefix], at);
        }
    }
}

/// The file-to-file arrows of `src/`.
fn arrows(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let files = modules(src);
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, path) in &files {
        if is_test_file(module) {
            continue;
        }
        let own: Vec<String> = if module == "lib" || module == "main" {
            Vec::new()
        } else {
            module.split("::").map(String::from).collect()
        };
        // `super` from `a/b.rs` and from `a/b/mod.rs` (module a::b) both mean `a`.
        let parent = own[..own.len().saturating_sub(1)].to_vec();
        for (root, segments) in paths(&code(path)) {
            let mut full = if root == "crate" {
                Vec::new()
            } else {
                parent.clone()
            };
            full.extend(segments);
            let target = (1..=full.len())
                .rev()
                .map(|n| full[..n].join("::"))
                .find(|m| files.contains_key(m));
            if let Some(t) = target {
                if &t != module {
                    out.entry(module.clone()).or_default().insert(t);
                }
            }
        }
    }
    out
}

/// The crate's `Error` (`error`) and each layer's `error` file: the vocabulary every layer names.
fn is_vocabulary(module: &str) -> bool {
    module.rsplit("::").next() == Some("error")
}

fn layer_of(module: &str) -> usize {
    let top = module.split("::").next().unwrap_or(module);
    if is_vocabulary(module) {
        return 0;
    }
    LAYERS
        .iter()
        .position(|l| l.contains(&top))
        .unwrap_or_else(|| panic!("src/{top}: in no layer of tests/layers.rs; add it"))
}

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn only_the_command_line_knows_the_command_line() {
    let is_cli = |m: &str| m == "cli" || m.starts_with("cli::");
    let offenders: Vec<String> = arrows(&src())
        .into_iter()
        .filter(|(from, _)| from != "main" && !is_cli(from))
        .flat_map(|(from, to)| {
            to.into_iter()
                .filter(|t| is_cli(t))
                .map(move |t| format!("{from} -> {t}"))
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "these modules import the command line (commands take plain options; cli converts): \
         {offenders:?}"
    );
}

#[test]
fn layers_call_downward_only() {
    let mut upward = Vec::new();
    for (from, targets) in arrows(&src()) {
        for to in targets {
            if layer_of(&to) > layer_of(&from) {
                upward.push(format!("{from} -> {to}"));
            }
        }
    }
    assert!(upward.is_empty(), "arrows to a higher layer: {upward:#?}");
}

#[test]
fn error_files_are_leaves() {
    // What lets every layer name them: they name nothing of the crate but each other.
    let mut wrong = Vec::new();
    for (from, targets) in arrows(&src()) {
        if is_vocabulary(&from) {
            wrong.extend(
                targets
                    .into_iter()
                    .filter(|t| !is_vocabulary(t))
                    .map(|t| format!("{from} -> {t}")),
            );
        }
    }
    assert!(
        wrong.is_empty(),
        "error files that import a layer: {wrong:?}"
    );
}

#[test]
fn no_files_import_each_other() {
    let graph = arrows(&src());
    // Tarjan's strongly connected components: any with two or more files is a circle.
    struct Walk<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        circles: Vec<Vec<&'a str>>,
    }
    fn visit<'a>(w: &mut Walk<'a>, v: &'a str) {
        let n = w.index.len();
        w.index.insert(v, n);
        w.low.insert(v, n);
        w.stack.push(v);
        let graph = w.graph;
        for t in graph.get(v).into_iter().flatten() {
            let t = t.as_str();
            if !w.index.contains_key(t) {
                visit(w, t);
                let low = w.low[v].min(w.low[t]);
                w.low.insert(v, low);
            } else if w.stack.contains(&t) {
                let low = w.low[v].min(w.index[t]);
                w.low.insert(v, low);
            }
        }
        if w.low[v] == w.index[v] {
            let mut circle = Vec::new();
            while let Some(x) = w.stack.pop() {
                circle.push(x);
                if x == v {
                    break;
                }
            }
            if circle.len() > 1 {
                w.circles.push(circle);
            }
        }
    }
    let mut w = Walk {
        graph: &graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        circles: Vec::new(),
    };
    for v in graph.keys() {
        if !w.index.contains_key(v.as_str()) {
            visit(&mut w, v);
        }
    }
    assert!(
        w.circles.is_empty(),
        "files that import each other: {:?}",
        w.circles
    );
}

#[test]
fn the_parser_reads_groups_and_nested_supers() {
    let found =
        paths("use crate::{cli::Args, mount::{fs::QcowFs, inodes}};\nuse super::super::x::Y;");
    let found: Vec<String> = found
        .into_iter()
        .map(|(root, s)| format!("{root}::{}", s.join("::")))
        .collect();
    assert_eq!(
        found,
        [
            "crate::cli::Args",
            "crate::mount::fs::QcowFs",
            "crate::mount::inodes",
            "super::super::x::Y",
        ]
    );
}

#[test]
fn the_parser_sees_the_arrows_it_should() {
    // A sanity check of the reading itself, on arrows that must exist.
    let graph = arrows(&src());
    for (from, to) in [
        ("mount::fs", "mount::inodes"),
        ("qcow2::image", "qcow2::alloc"),
        ("cmd::seal", "keys::check"),
    ] {
        assert!(
            graph.get(from).is_some_and(|t| t.contains(to)),
            "{from} -> {to} not seen: {:?}",
            graph.get(from)
        );
    }
}
