//! The Debian package: `scripts/package.sh` builds it from the binary under test, `dpkg -i`
//! installs it, and it is checked as a user would meet it (`qcowfs --version`, `man qcowfs`, the
//! mount(8) helper, a binary without debug info), then `dpkg -r` must take away every file it
//! installed.
//!
//! It changes the host's package database, so it runs as root and only where no qcowfs package is
//! installed already (it fails rather than remove someone's package); its own package is removed
//! even when a check fails. A qcowfs installed by `scripts/install.sh` under /usr/local is neither
//! touched nor relied on. One test, so it never runs beside itself.

use crate::common;

use common::*;
use flate2::read::GzDecoder;
use std::collections::BTreeMap;
use std::fs;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Only a guard against a hung dpkg or build: on a busy machine packaging takes what it takes.
const HANG_GUARD: Duration = Duration::from_secs(3600);

const INSTALLED_BIN: &str = "/usr/bin/qcowfs";
/// The helper mount(8) runs for `-t fuse.qcowfs`, where fuse3 keeps mount.fuse3.
const HELPER: &str = "/sbin/mount.fuse.qcowfs";
const MAN_DIR: &str = "/usr/share/man";
/// What scripts/install.sh leaves when run with its default PREFIX: must be as it was.
const LOCAL_INSTALL: &[&str] = &[
    "/usr/local/bin/qcowfs",
    "/usr/local/share/man/man1/qcowfs.1",
];

fn slow(cmd: &mut Command) -> Run {
    let r = run_with(cmd, None, HANG_GUARD);
    r.assert_success();
    r
}

/// dpkg's state of the qcowfs package: "install ok installed", or None when dpkg knows no qcowfs
/// (or only that it is gone: "not-installed").
fn package_status() -> Option<String> {
    let r = run("dpkg-query", ["-W", "-f=${Status}", "qcowfs"]);
    let status = r.stdout_str().trim().to_string();
    (r.status.success() && !status.ends_with("not-installed")).then_some(status)
}

/// The test's package on the host: removed on drop unless `remove` was called (a failed check
/// must not leave it installed), and the mount helper a local install had put where the package
/// puts its own (`/sbin/mount.fuse.qcowfs -> /usr/local/bin/qcowfs`; dpkg replaces a file no
/// package owns, and removes it with the package) linked back.
struct Installed {
    removed: bool,
    helper_before: Option<PathBuf>,
}

impl Installed {
    fn remove(&mut self) {
        self.removed = true;
        slow(Command::new("dpkg").args(["-r", "qcowfs"]));
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if !self.removed {
            let _ = run_with(
                Command::new("dpkg").args(["-r", "qcowfs"]),
                None,
                HANG_GUARD,
            );
        }
        if let Some(target) = &self.helper_before {
            if fs::symlink_metadata(HELPER).is_err() {
                // No panic here (it may run while unwinding): the test's last check reports it.
                if let Err(e) = std::os::unix::fs::symlink(target, HELPER) {
                    eprintln!("cannot link {HELPER} back to {target:?}: {e}");
                }
            }
        }
    }
}

/// Size and modification time of what a local install left, or None for each path that is absent.
fn local_install_state() -> BTreeMap<&'static str, Option<(u64, i64)>> {
    use std::os::unix::fs::MetadataExt;
    LOCAL_INSTALL
        .iter()
        .map(|p| {
            (
                *p,
                fs::symlink_metadata(p).ok().map(|m| (m.len(), m.mtime())),
            )
        })
        .collect()
}

/// The text `man` printed to a pipe, with its overstruck bold ("M\x08M") made plain.
fn plain_man_text(bytes: &[u8]) -> String {
    let mut plain = String::new();
    for c in String::from_utf8_lossy(bytes).chars() {
        if c == '\u{8}' {
            plain.pop();
        } else {
            plain.push(c);
        }
    }
    plain
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    GzDecoder::new(fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("{} is not gzip: {e}", path.display()));
    out
}

#[test]
fn the_debian_package_installs_the_stripped_binary_man_pages_and_helper_and_removes_cleanly() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test installs a Debian package with dpkg and must run as root (scripts/test.sh does)"
    );
    if let Some(status) = package_status() {
        panic!(
            "a qcowfs package is already installed ({status}); this test will not remove it. \
             Remove it (dpkg -r qcowfs) to run this test"
        );
    }
    let local_before = local_install_state();
    // A local install's helper (scripts/install.sh), to link back after the package is gone.
    let helper_before = match fs::symlink_metadata(HELPER) {
        Ok(m) if m.file_type().is_symlink() => Some(fs::read_link(HELPER).unwrap()),
        Ok(_) => panic!("{HELPER} exists and is no symbolic link: not touching it"),
        Err(_) => None,
    };
    let dir = workdir();
    let version = env!("CARGO_PKG_VERSION");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/package.sh");
    let built = slow(
        Command::new("bash")
            .arg(&script)
            .env("QCOWFS_BIN", qcowfs_bin())
            .env("DEB_OUTDIR", dir.path()),
    );
    let deb = PathBuf::from(built.stdout_str().lines().last().unwrap_or("").trim());
    let arch = run_ok("dpkg", ["--print-architecture"]).stdout_str();
    let name = format!("qcowfs_{version}-1_{}.deb", arch.trim());
    assert_eq!(
        deb.file_name().and_then(|n| n.to_str()),
        Some(name.as_str()),
        "package.sh's last line is the .deb's path"
    );
    assert!(
        deb.starts_with(dir.path()) && deb.is_file(),
        "{}",
        deb.display()
    );

    // Armed before dpkg -i: a package it leaves half-configured is removed too.
    let mut installed = Installed {
        removed: false,
        helper_before: helper_before.clone(),
    };
    slow(Command::new("dpkg").arg("-i").arg(&deb));
    assert_eq!(package_status().as_deref(), Some("install ok installed"));

    let r = run_ok(INSTALLED_BIN, ["--version"]);
    assert_eq!(r.stdout_str().trim(), format!("qcowfs {version}"));

    assert_eq!(
        fs::read_link(HELPER).expect("the mount helper is a symbolic link"),
        Path::new(INSTALLED_BIN)
    );
    assert_eq!(
        fs::canonicalize(HELPER).expect("the mount helper resolves"),
        fs::canonicalize(INSTALLED_BIN).unwrap()
    );

    // Stripped: no debug info nor symbol table (`.debug_gdb_scripts`, a loaded section naming
    // the pretty-printers, stays), and smaller than the binary it was made from.
    let sections = run_ok("readelf", ["-S", "-W", INSTALLED_BIN]).stdout_str();
    assert!(sections.contains(".text"), "{sections}");
    for gone in [".debug_info", ".debug_line", ".debug_str", ".symtab"] {
        assert!(
            !sections.contains(gone),
            "{INSTALLED_BIN} still has {gone}:\n{sections}"
        );
    }
    let installed_len = fs::metadata(INSTALLED_BIN).unwrap().len();
    let built_len = fs::metadata(qcowfs_bin()).unwrap().len();
    assert!(
        installed_len < built_len,
        "installed {installed_len} bytes, built {built_len}"
    );

    // The manual pages are exactly the ones `qcowfs generate man` writes, gzipped, one per page.
    let fresh = dir.path().join("man");
    fs::create_dir(&fresh).unwrap();
    qcowfs(["generate".as_ref(), "man".as_ref(), fresh.as_os_str()]).assert_success();
    let mut pages: Vec<String> = fs::read_dir(&fresh)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    assert!(pages.contains(&"qcowfs.1".to_string()), "{pages:?}");
    for page in &pages {
        let packaged = Path::new(MAN_DIR).join("man1").join(format!("{page}.gz"));
        assert!(
            gunzip(&packaged) == fs::read(fresh.join(page)).unwrap(),
            "{} is not what `qcowfs generate man` writes",
            packaged.display()
        );
    }
    // man finds the packaged page (among others: a local install may have one first) ...
    let found = run_ok("man", ["-a", "-w", "qcowfs"]).stdout_str();
    let packaged_main = format!("{MAN_DIR}/man1/qcowfs.1.gz");
    assert!(
        found.lines().any(|l| l.trim() == packaged_main),
        "man -aw qcowfs: {found}"
    );
    // ... and shows it, EXIT STATUS included when the generated page has one.
    let shown = run_with(
        Command::new("man")
            .args(["-M", MAN_DIR, "qcowfs"])
            .env("MANWIDTH", "80")
            .env("MAN_KEEP_FORMATTING", "0"),
        None,
        HANG_GUARD,
    );
    shown.assert_success();
    let text = plain_man_text(&shown.stdout);
    assert!(text.contains("qcowfs"), "{text}");
    let generated = fs::read_to_string(fresh.join("qcowfs.1")).unwrap();
    assert_eq!(
        text.contains("EXIT STATUS"),
        generated.contains("EXIT STATUS"),
        "man qcowfs shows:\n{text}"
    );

    // Every file and link dpkg put there, taken before removal. Folders are shared with other
    // packages, and so are links to folders (/sbin -> usr/sbin on a merged-/usr system).
    let listed = run_ok("dpkg", ["-L", "qcowfs"]).stdout_str();
    let files: Vec<PathBuf> = listed
        .lines()
        .map(PathBuf::from)
        .filter(|p| fs::symlink_metadata(p).is_ok() && !fs::metadata(p).is_ok_and(|m| m.is_dir()))
        .collect();
    for want in [INSTALLED_BIN, HELPER, "/usr/share/doc/qcowfs/copyright"] {
        assert!(
            files.iter().any(|f| f == Path::new(want)),
            "dpkg -L lacks {want}: {listed}"
        );
    }
    for want in [
        "/usr/share/bash-completion/completions/qcowfs",
        "/usr/share/zsh/site-functions/_qcowfs",
        "/usr/share/fish/vendor_completions.d/qcowfs.fish",
    ] {
        assert!(
            fs::metadata(want).is_ok_and(|m| m.len() > 0),
            "{want} missing or empty"
        );
    }

    installed.remove();
    assert_eq!(
        package_status(),
        None,
        "qcowfs is still installed after dpkg -r"
    );
    let left: Vec<&PathBuf> = files
        .iter()
        .filter(|f| !matches!(fs::symlink_metadata(f), Err(e) if e.kind() == ErrorKind::NotFound))
        .collect();
    assert!(left.is_empty(), "dpkg -r left behind: {left:?}");
    drop(installed);
    assert_eq!(
        fs::read_link(HELPER).ok(),
        helper_before,
        "{HELPER} is not as it was"
    );
    assert_eq!(
        local_install_state(),
        local_before,
        "a local install (scripts/install.sh) changed"
    );
}
