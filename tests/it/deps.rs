//! Every external program the tests and scripts run is one `scripts/lib/install-deps.sh` installs
//! (its `QCOWFS_DEPS`), or part of every Debian/Ubuntu system (coreutils, util-linux's essentials,
//! bash, grep, sed, ...). A test that calls a new tool without adding it there fails here, on the
//! developer's machine, instead of on a fresh CI machine that lacks it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Programs of Debian's Essential packages (coreutils, bash, dash, grep, sed, findutils, diffutils,
/// util-linux, mount, procps is not Essential and so is not here) and the toolchain CI already has.
const BASE_SYSTEM: &[&str] = &[
    "awk",
    "basename",
    "bash",
    "cat",
    "chmod",
    "chown",
    "cmp",
    "cp",
    "cut",
    "date",
    "dd",
    "df",
    "diff",
    "dirname",
    "du",
    "env",
    "find",
    "getconf",
    "grep",
    "head",
    "id",
    "install",
    "ln",
    "ls",
    "mkdir",
    "mkfifo",
    "mktemp",
    "mv",
    "nproc",
    "od",
    "readlink",
    "realpath",
    "rm",
    "rmdir",
    "sed",
    "seq",
    "sh",
    "sha256sum",
    "sleep",
    "sort",
    "stat",
    "sync",
    "tail",
    "tee",
    "timeout",
    "touch",
    "tr",
    "truncate",
    "uname",
    "uniq",
    "wc",
    "xargs",
    "yes",
    "numfmt",
    "sha1sum",
    "cargo",
    "rustup",
    "git",
    "apt-get",
    "dpkg",
    "modprobe",
    "sudo",
    "gzip",
    "tar",
];

/// Shell words that come before a command: the command follows them.
const KEYWORDS: &[&str] = &[
    "if", "then", "else", "elif", "while", "until", "do", "exec", "time", "!", "{", "nice",
    "nohup", "sudo",
];

/// Shell words whose arguments are not commands: the rest of the simple command is skipped.
const BUILTINS: &[&str] = &[
    "fi", "for", "done", "case", "esac", "in", "function", "return", "local", "export", "set",
    "unset", "shift", "source", ".", "eval", "read", "printf", "echo", "cd", "pwd", "test", "true",
    "false", "trap", "wait", "kill", "exit", "break", "continue", "declare", "typeset", "readonly",
    "let", "command", "type", "hash", "ulimit", "umask", "getopts", "mapfile", "}", "[", "[[",
    "]]", "]", ":", "select", "shopt", "builtin", "disown", "jobs", "pushd", "popd",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files_under(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, ext, out);
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
}

/// The commands of `QCOWFS_DEPS=( cmd:package ... )` in install-deps.sh.
fn declared_deps() -> BTreeSet<String> {
    let text = fs::read_to_string(repo().join("scripts/lib/install-deps.sh")).expect("read deps");
    let start = text.find("QCOWFS_DEPS=(").expect("QCOWFS_DEPS array");
    let body = &text[start + "QCOWFS_DEPS=(".len()..];
    let body = &body[..body.find(')').expect("end of QCOWFS_DEPS")];
    body.split_whitespace()
        .filter(|w| !w.starts_with('#'))
        .map(|w| w.split(':').next().unwrap_or(w).to_string())
        .collect()
}

/// Program names the Rust test sources start: the string literal right after `Command::new(`,
/// `run(`, `run_ok(` or `tool_exists(` (whitespace and line breaks allowed before it).
fn programs_in_rust(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for call in ["Command::new(", "run(", "run_ok(", "tool_exists("] {
        let mut from = 0;
        while let Some(at) = text[from..].find(call) {
            let begin = from + at;
            from = begin + call.len();
            // `fn run(`, `x.run(`, `cargo_run(`: not a call of the helper.
            let before = text[..begin].chars().next_back().unwrap_or(' ');
            if call != "Command::new("
                && (before.is_alphanumeric() || before == '_' || before == '.')
            {
                continue;
            }
            if text[..begin].ends_with("fn ") {
                continue;
            }
            let rest = text[from..].trim_start();
            if let Some(lit) = rest.strip_prefix('"') {
                if let Some(end) = lit.find('"') {
                    out.insert(lit[..end].to_string());
                }
            }
        }
    }
    out
}

/// Names of functions a shell script defines (`name() {`).
fn shell_functions(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim_start().trim_start_matches("function ").trim_start();
            let name: String = l
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '-')
                .collect();
            (!name.is_empty() && l[name.len()..].trim_start().starts_with("()")).then_some(name)
        })
        .collect()
}

/// Drop comments (a `#` at a word start outside quotes) and quoted text, which may span lines;
/// keep the line structure. `quote` carries an open quote from one line to the next.
fn strip_line(line: &str, quote: &mut Option<char>) -> String {
    let mut out = String::new();
    let mut prev = ' ';
    for c in line.chars() {
        match *quote {
            Some(q) if c == q && prev != '\\' => *quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => {
                *quote = Some(c);
                out.push('Q'); // a quoted word is a word, never a program name we can check
            }
            None if c == '#' && (prev.is_whitespace() || prev == ';') => break,
            None => out.push(c),
        }
        prev = c;
    }
    out
}

/// Program names at command position in a shell script: the first word of every simple command
/// (after `|`, `&&`, `||`, `;`, `$(`, `(`, and keywords), skipping assignments, paths, variables,
/// builtins and the script's own functions. Here-documents and continuation lines are skipped.
fn programs_in_shell(text: &str, functions: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut heredoc: Option<String> = None;
    let mut continued = false;
    let mut quote: Option<char> = None;
    for raw in text.lines() {
        if let Some(end) = &heredoc {
            if raw.trim() == end {
                heredoc = None;
            }
            continue;
        }
        if let Some(at) = raw.find("<<") {
            let tag: String = raw[at + 2..]
                .trim_start_matches('-')
                .trim_start()
                .trim_matches(|c| c == '\'' || c == '"')
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !tag.is_empty() {
                heredoc = Some(tag);
            }
        }
        let in_quote = quote.is_some();
        let mut line = strip_line(raw, &mut quote);
        // Arithmetic `$(( ... ))` holds variable names, not commands.
        while let Some(at) = line.find("$((") {
            let end = line[at..].find("))").map_or(line.len(), |e| at + e + 2);
            line.replace_range(at..end, "N");
        }
        let was_continued = continued || in_quote;
        continued = line.trim_end().ends_with('\\');
        let mut segments: Vec<String> = Vec::new();
        let mut current = String::new();
        let chars: Vec<char> = line.chars().collect();
        // Open `(` and `$(` on this line, and where the current simple command list began (line
        // start or `;`): a `)` that closes nothing ends a case pattern (`a | b)`), not a command.
        let mut depth = 0usize;
        let mut pattern_from = 0usize;
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            // `${name:-default}` is one word, braces and all.
            if two == "${" {
                let end = chars[i..]
                    .iter()
                    .position(|&c| c == '}')
                    .map_or(chars.len(), |e| i + e + 1);
                current.push('V');
                i = end;
                continue;
            }
            if matches!(two.as_str(), "&&" | "||" | "$(") {
                if two == "$(" {
                    depth += 1;
                }
                segments.push(std::mem::take(&mut current));
                i += 2;
                continue;
            }
            if c == '(' {
                depth += 1;
            }
            if c == ';' {
                pattern_from = segments.len() + 1;
            }
            if c == ')' && depth == 0 {
                segments.truncate(pattern_from);
                current.clear();
                i += 1;
                continue;
            }
            if c == ')' {
                depth -= 1;
            }
            // `$(basename "$x").in`: text right after a `)` continues the word, it is no command.
            let continues = c == ')'
                && chars
                    .get(i + 1)
                    .is_some_and(|n| !n.is_whitespace() && !matches!(n, ';' | '|' | '&' | ')'));
            if continues {
                current.push(' ');
            } else if matches!(c, '|' | ';' | '(' | '`' | '{' | '}' | ')') {
                segments.push(std::mem::take(&mut current));
            } else {
                current.push(c);
            }
            i += 1;
        }
        segments.push(current);
        for (n, segment) in segments.iter().enumerate() {
            if n == 0 && was_continued {
                continue;
            }
            let mut words = segment.split_whitespace().peekable();
            while let Some(&w) = words.peek() {
                let option_of_keyword = w.starts_with('-') || w.chars().all(|c| c.is_ascii_digit());
                if KEYWORDS.contains(&w)
                    || w.contains('=')
                    || w.starts_with('>')
                    || w.starts_with('<')
                    || option_of_keyword
                {
                    words.next();
                    continue;
                }
                break;
            }
            let Some(word) = words.next() else { continue };
            let plain = word
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'));
            if !plain || BUILTINS.contains(&word) || functions.contains(word) || word == "Q" {
                continue;
            }
            out.insert(word.to_string());
        }
    }
    out
}

#[test]
fn every_program_the_tests_and_scripts_run_is_installed_by_install_deps() {
    let declared = declared_deps();
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();

    let mut rust = Vec::new();
    files_under(&repo().join("tests"), "rs", &mut rust);
    // This file names programs in its own examples.
    rust.retain(|f| !f.ends_with("tests/it/deps.rs"));
    for file in &rust {
        let text = fs::read_to_string(file).expect("read test source");
        for p in programs_in_rust(&text) {
            used.entry(p)
                .or_default()
                .insert(file.display().to_string());
        }
    }
    let mut shell = Vec::new();
    files_under(&repo().join("scripts"), "sh", &mut shell);
    shell.push(repo().join(".ci/run"));
    let functions: BTreeSet<String> = shell
        .iter()
        .flat_map(|f| shell_functions(&fs::read_to_string(f).unwrap_or_default()))
        .collect();
    for file in &shell {
        let text = fs::read_to_string(file).expect("read script");
        for p in programs_in_shell(&text, &functions) {
            used.entry(p)
                .or_default()
                .insert(file.display().to_string());
        }
    }

    // The scan must see the tools we know are used, or it has gone blind.
    for known in ["qemu-img", "qemu-io", "sfdisk", "mkfs.ext4", "fusermount3"] {
        assert!(
            used.contains_key(known),
            "the scan no longer finds {known}: {used:?}"
        );
    }
    let missing: Vec<String> = used
        .iter()
        .filter(|(p, _)| !declared.contains(*p) && !BASE_SYSTEM.contains(&p.as_str()))
        .map(|(p, files)| {
            format!(
                "{p} (run by {})",
                files.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    assert!(
        missing.is_empty(),
        "programs run by tests or scripts but missing from QCOWFS_DEPS in \
         scripts/lib/install-deps.sh (add `cmd:debian-package`):\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn the_shell_scan_finds_commands_after_pipes_and_in_substitutions_but_not_in_heredocs() {
    let script = "case \"$x\" in a | b) ;; c) die ;; esac\n\tside)\n\tlocal p=${2:-300} state\nset +e\nfor cmd in a b; do\n  nice -n 19 fuzzer x\ndone\ndie \"a long \\\nquoted line\"\n[ $((N % 2)) ]\nout=$(basename x).in\nx=$(sgdisk -p a | partx --show)\nif fio --x; then\n  cat <<EOF\nnotaprogram here\nEOF\nfi\nfoo() {\n  bar \\\n    baz\n}\nfoo\n# comment: wrongtool\necho 'quoted tool' && e2fsck -n x\n";
    let functions = shell_functions(script);
    let found = programs_in_shell(script, &functions);
    let expected: BTreeSet<String> = [
        "fuzzer", "die", "basename", "sgdisk", "partx", "fio", "cat", "bar", "e2fsck",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(found, expected);
}

#[test]
fn the_rust_scan_finds_literal_program_names_of_the_run_helpers() {
    let src = "run_ok(\n    \"sgdisk\",\n [..]);\nCommand::new(\"losetup\");\nfn run(program: &str) {}\nx.run(\"no\");\n";
    let found = programs_in_rust(src);
    let expected: BTreeSet<String> = ["sgdisk", "losetup"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(found, expected);
}
