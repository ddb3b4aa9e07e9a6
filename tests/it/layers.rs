//! The shape of `src/`, read from its `use` paths: the layers call downward only, no two files
//! import each other (directly or round a circle), and only `cli/` and `main.rs` know the
//! command line. A change that breaks the shape fails here, with the files named.
//!
//! The files are parsed, not compiled: every `crate::a::b`, `super::a` and `self::a` path in a file
//! (test modules aside), and every `use` of the module's own children (`mod copy; pub use
//! copy::copy_out;`), is an arrow to the file that defines the longest prefix of it. So a module
//! file that re-exports its children must define nothing they import (a facade), or the two
//! make a circle.

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
    for start in ["crate::", "super::", "self::"] {
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

/// The paths of every `use` statement, whatever they start with (`crate`, `super`, `self`, a child
/// module of the file's own, or another crate: `arrows` tells them apart), each with whether the
/// statement re-exports (`pub use`).
fn use_paths(code: &str) -> Vec<(bool, Vec<String>)> {
    let mut out = Vec::new();
    let mut at = 0;
    for line in code.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let body = [
            ("pub(crate) ", true),
            ("pub(super) ", true),
            ("pub ", true),
            ("", false),
        ]
        .iter()
        .find_map(|(vis, public)| {
            Some((trimmed.strip_prefix(vis)?.strip_prefix("use ")?, *public))
        });
        if let Some((body, public)) = body {
            let start = at + (line.len() - body.len());
            out.extend(tree(&code[start..]).0.into_iter().map(|t| (public, t)));
        }
        at += line.len();
    }
    out
}

/// `segments` as written in module `own` (after `crate`, `super` or `self`, or a child's name
/// when `root` is "self"), made absolute: `super::super::x` from `a::b::c` is `a::x`.
fn absolute(own: &[String], root: &str, segments: &[String]) -> Vec<String> {
    let mut base: Vec<String> = match root {
        "crate" => Vec::new(),
        "self" => own.to_vec(),
        _ => own[..own.len().saturating_sub(1)].to_vec(),
    };
    let mut rest = segments;
    while rest.first().is_some_and(|s| s == "super") {
        base.pop();
        rest = &rest[1..];
    }
    base.extend(rest.iter().cloned());
    base
}

/// A use path split into its root (`crate`, `super`, `self`) and the rest; a path that starts
/// with a name is relative to the module itself.
fn rooted(segments: Vec<String>) -> (String, Vec<String>) {
    match segments.first().map(String::as_str) {
        Some("crate" | "super" | "self") => {
            let mut rest = segments;
            let root = rest.remove(0);
            (root, rest)
        }
        _ => ("self".to_string(), segments),
    }
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

/// Each module's own path segments (the crate root's are none).
fn own_path(module: &str) -> Vec<String> {
    match module {
        "lib" | "main" => Vec::new(),
        m => m.split("::").map(String::from).collect(),
    }
}

/// The file an absolute path names: the longest prefix that is a file, through re-exports
/// (`pub use error::FormatError` in qcow2/mod.rs makes `qcow2::FormatError` name qcow2/error.rs).
fn target(
    files: &BTreeMap<String, PathBuf>,
    reexports: &BTreeMap<(String, String), Vec<String>>,
    mut full: Vec<String>,
) -> Option<String> {
    for _ in 0..16 {
        let n = (1..=full.len())
            .rev()
            .find(|&n| files.contains_key(&full[..n].join("::")))
            .unwrap_or(0);
        let module = full[..n].join("::");
        if let Some(via) = full
            .get(n)
            .and_then(|name| reexports.get(&(module.clone(), name.clone())))
        {
            let mut next = via.clone();
            next.extend(full[n + 1..].iter().cloned());
            if next != full {
                full = next;
                continue;
            }
        }
        return (n > 0).then_some(module);
    }
    None
}

/// The file-to-file arrows of `src/`.
fn arrows(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let files = modules(src);
    let texts: BTreeMap<&String, String> = files
        .iter()
        .filter(|(module, _)| !is_test_file(module))
        .map(|(module, path)| (module, code(path)))
        .collect();
    // What each module re-exports, by name, as the absolute path it names.
    let mut reexports = BTreeMap::new();
    for (module, text) in &texts {
        let own = own_path(module);
        for (_, segments) in use_paths(text).into_iter().filter(|(public, _)| *public) {
            let (root, rest) = rooted(segments);
            let full = absolute(&own, &root, &rest);
            if let Some(name) = full.last() {
                reexports.insert((own.join("::"), name.clone()), full.clone());
            }
        }
    }
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in &texts {
        let own = own_path(module);
        let written = use_paths(text).into_iter().map(|(_, s)| rooted(s));
        for (root, segments) in paths(text).into_iter().chain(written) {
            let full = absolute(&own, &root, &segments);
            if let Some(t) = target(&files, &reexports, full) {
                if &t != *module {
                    out.entry((*module).clone()).or_default().insert(t);
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
        .unwrap_or_else(|| panic!("src/{top}: in no layer of tests/it/layers.rs; add it"))
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
        // A facade's use of its own children: `pub use open::{GuestFs, GuestOptions};`.
        ("cmd::guestfs", "cmd::guestfs::open"),
        // Through re-exports to the defining file: `use super::{CryptoError, SectorCipher, ..}`
        // in crypto/luks.rs names crypto/cipher.rs and crypto/error.rs, not crypto/mod.rs.
        ("crypto::luks", "crypto::cipher"),
        ("crypto::luks", "crypto::error"),
        // `super::super::` climbs two levels: qcow2/header/record.rs names qcow2/error.rs.
        ("qcow2::header::record", "qcow2::error"),
    ] {
        assert!(
            graph.get(from).is_some_and(|t| t.contains(to)),
            "{from} -> {to} not seen: {:?}",
            graph.get(from)
        );
    }
    // A re-export is not where the thing lives.
    assert!(
        !graph["crypto::luks"].contains("crypto"),
        "{:?}",
        graph["crypto::luks"]
    );
}

#[test]
fn use_statements_are_read_whatever_they_start_with() {
    let found =
        use_paths("pub use copy::copy_out;\n    use std::fs;\npub(crate) use self::a::{b, c};\n");
    let found: Vec<(bool, String)> = found
        .into_iter()
        .map(|(public, s)| (public, s.join("::")))
        .collect();
    assert_eq!(
        found,
        [
            (true, "copy::copy_out".to_string()),
            (false, "std::fs".to_string()),
            (true, "self::a::b".to_string()),
            (true, "self::a::c".to_string()),
        ]
    );
    let own = ["a".to_string(), "b".to_string(), "c".to_string()];
    let seg = |s: &str| s.split("::").map(String::from).collect::<Vec<_>>();
    assert_eq!(absolute(&own, "super", &seg("super::x")), seg("a::x"));
    assert_eq!(absolute(&own, "self", &seg("d")), seg("a::b::c::d"));
    assert_eq!(absolute(&own, "crate", &seg("e::f")), seg("e::f"));
}
