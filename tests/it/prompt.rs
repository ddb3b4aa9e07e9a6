//! The passphrase prompt on a terminal (a pseudo-terminal here, driven by Python's pty module):
//! a wrong passphrase is asked for again, up to `--tries` times (3 by default), as cryptsetup
//! does; the last wrong one is exit status 3.

use crate::common;

use common::*;
use std::fs;
use std::path::Path;
use std::time::Duration;

const PASS: &str = "typed at the prompt";

/// Runs the command on a new pseudo-terminal, answers each "Passphrase for" prompt with the next
/// line of stdin, and exits with the command's status, its terminal output on stdout.
const DRIVER: &str = r#"
import os, pty, select, sys, time
answers = sys.stdin.read().splitlines()
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
out, asked, deadline = b"", 0, time.time() + 120
while time.time() < deadline:
    r, _, _ = select.select([fd], [], [], 1.0)
    if not r:
        continue
    try:
        chunk = os.read(fd, 4096)
    except OSError:
        break
    if not chunk:
        break
    out += chunk
    while out.count(b"Passphrase for") > asked:
        os.write(fd, (answers[asked] if asked < len(answers) else "").encode() + b"\n")
        asked += 1
_, status = os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
sys.exit(os.waitstatus_to_exitcode(status))
"#;

fn on_terminal(args: &[&str], answers: &[&str]) -> Run {
    let mut argv: Vec<String> = vec![
        "-c".into(),
        DRIVER.into(),
        qcowfs_bin().display().to_string(),
    ];
    argv.extend(args.iter().map(|a| a.to_string()));
    let input = answers.join("\n");
    run_with(
        std::process::Command::new("python3").args(&argv),
        Some(input.as_bytes()),
        Duration::from_secs(180),
    )
}

fn guest(dir: &Path) -> std::path::PathBuf {
    let tree = dir.join("tree/etc");
    fs::create_dir_all(&tree).unwrap();
    fs::write(tree.join("hostname"), b"vm-17\n").unwrap();
    let raw = dir.join("guest.raw");
    mkfs_ext4_from(&dir.join("tree"), &raw, Some("8M"));
    encrypted(&raw, "luks", PASS)
}

#[test]
fn a_wrong_passphrase_at_the_prompt_is_asked_for_again_up_to_tries_times() {
    let dir = workdir();
    let image = guest(dir.path());
    let image = image.to_str().unwrap();
    let r = on_terminal(
        &["cat", image, "/etc/hostname"],
        &["nope", "still wrong", PASS],
    );
    let out = r.stdout_str();
    assert_eq!(r.status.code(), Some(0), "{out}");
    assert_eq!(out.matches("Passphrase for").count(), 3, "{out}");
    assert!(
        out.contains("try again (2 left)") && out.contains("try again (1 left)"),
        "{out}"
    );
    assert!(out.contains("vm-17"), "{out}");

    let r = on_terminal(&["cat", image, "/etc/hostname"], &["a", "b", "c", PASS]);
    let out = r.stdout_str();
    assert_eq!(r.status.code(), Some(3), "{out}");
    assert_eq!(out.matches("Passphrase for").count(), 3, "{out}");
    assert!(!out.contains("vm-17"), "{out}");

    let r = on_terminal(
        &["cat", "--tries", "1", image, "/etc/hostname"],
        &["a", PASS],
    );
    let out = r.stdout_str();
    assert_eq!(r.status.code(), Some(3), "{out}");
    assert_eq!(out.matches("Passphrase for").count(), 1, "{out}");
}
