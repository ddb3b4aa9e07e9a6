//! The editing commands over a [`GuestEditor`]: `write` (stdin into a guest file), `edit`
//! (`$EDITOR` on a private copy, written back only if it changed), `copy-in` (host files and
//! trees into a guest folder, never over an existing name), `rm` and `mkdir`. Each checks what
//! the path names first, so a refusal changes nothing.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;

use super::super::error::GuestError;
use super::super::tree::shown;
use super::super::tree::Kind;
use super::editor::{split, Entry};
use super::open::GuestEditor;
use crate::error::{Error, Result};

/// Most bytes `edit` holds in memory (and `write` takes in one transaction).
const EDIT_LIMIT: u64 = 64 << 20;

/// Bytes read from a host file or stdin per write into the guest.
const CHUNK: usize = 1 << 20;

/// Deepest host tree `copy-in` copies (a bound, since it never follows host symlinks anyway).
const MAX_DEPTH: usize = 256;

/// A guest path as given: absolute, or refused.
fn absolute<'a>(ed: &GuestEditor, path: &'a OsStr) -> Result<&'a [u8]> {
    let bytes = path.as_bytes();
    match bytes.starts_with(b"/") {
        true => Ok(bytes),
        false => Err(ed.guest_error(GuestError::NotAbsolute(shown(bytes)))),
    }
}

fn stat(ed: &GuestEditor, path: &[u8]) -> Result<Option<Entry>> {
    ed.editor().stat(path).map_err(|e| ed.error(path, e))
}

/// The folder `path` is in must exist and be a folder.
fn require_parent(ed: &GuestEditor, path: &[u8]) -> Result<()> {
    let Some((parent, _)) = split(path) else {
        return Err(ed.guest_error(GuestError::AlreadyExists(shown(path))));
    };
    match stat(ed, parent)? {
        Some(e) if e.kind == Kind::Dir => Ok(()),
        Some(_) => Err(ed.guest_error(GuestError::NotADirectory(shown(parent)))),
        None => Err(ed.guest_error(GuestError::NotFound(shown(parent)))),
    }
}

/// `qcowfs write IMAGE GUESTPATH < data`: the file's contents become `input` (a new file is
/// made, mode 0644); the bytes written.
pub fn write(ed: &GuestEditor, path: &OsStr, input: &mut dyn Read) -> Result<u64> {
    let p = absolute(ed, path)?;
    let existing = stat(ed, p)?;
    match existing {
        Some(e) if e.kind != Kind::File => {
            return Err(ed.guest_error(GuestError::NotRegular(shown(p))))
        }
        Some(_) => {}
        None => require_parent(ed, p)?,
    }
    if existing.is_none() {
        ed.editor().create(p, 0o644).map_err(|e| ed.error(p, e))?;
    }
    fill(ed, p, input, "<stdin>".as_ref())
}

/// Guest file `p`'s contents made `input`'s bytes; how many. Up to [`EDIT_LIMIT`] they go in
/// as one replacement (one transaction on ext4, one allocation on XFS); a longer input is
/// written a chunk at a time after the first (which XFS refuses: it grows a file only whole).
fn fill(ed: &GuestEditor, p: &[u8], input: &mut dyn Read, from: &Path) -> Result<u64> {
    let mut head = Vec::new();
    input
        .take(EDIT_LIMIT + 1)
        .read_to_end(&mut head)
        .map_err(|e| Error::new(from, e))?;
    let e = |err| ed.error(p, err);
    if head.len() as u64 <= EDIT_LIMIT {
        ed.editor().replace(p, &head).map_err(e)?;
        return Ok(head.len() as u64);
    }
    ed.editor().truncate(p, 0).map_err(e)?;
    ed.editor().write(p, 0, &head).map_err(e)?;
    let mut at = head.len() as u64;
    stream(ed, p, input, &mut at, from)?;
    Ok(at)
}

/// The rest of `input` into guest file `p` from `at` (advanced), a chunk at a time.
fn stream(
    ed: &GuestEditor,
    p: &[u8],
    input: &mut dyn Read,
    at: &mut u64,
    from: &Path,
) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = input.read(&mut buf).map_err(|e| Error::new(from, e))?;
        if n == 0 {
            return Ok(());
        }
        ed.editor()
            .write(p, *at, &buf[..n])
            .map_err(|e| ed.error(p, e))?;
        *at += n as u64;
    }
}

/// `qcowfs rm IMAGE GUESTPATH`: a file, a symlink or an empty folder.
pub fn remove(ed: &GuestEditor, path: &OsStr) -> Result<()> {
    let p = absolute(ed, path)?;
    if split(p).is_none() {
        return Err(ed.guest_error(GuestError::NotAName));
    }
    if stat(ed, p)?.is_none() {
        return Err(ed.guest_error(GuestError::NotFound(shown(p))));
    }
    ed.editor().remove(p).map_err(|e| ed.error(p, e))
}

/// `qcowfs mkdir IMAGE GUESTPATH`: a new folder, mode 0755.
pub fn mkdir(ed: &GuestEditor, path: &OsStr) -> Result<()> {
    let p = absolute(ed, path)?;
    if stat(ed, p)?.is_some() {
        return Err(ed.guest_error(GuestError::AlreadyExists(shown(p))));
    }
    require_parent(ed, p)?;
    ed.editor().mkdir(p, 0o755).map_err(|e| ed.error(p, e))
}

/// What `copy-in` did.
#[derive(Debug, Default, Clone, Copy)]
pub struct CopyInReport {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    /// Host entries not copied (symlinks, devices, FIFOs, sockets), each named in a warning.
    pub skipped: u64,
}

/// `qcowfs copy-in IMAGE SRC... GUESTDIR`: each host file or folder into guest folder `dir`,
/// modes kept, never over an existing name. Host symlinks are never followed (skipped, named).
pub fn copy_in(ed: &GuestEditor, sources: &[&Path], dir: &OsStr) -> Result<CopyInReport> {
    let d = absolute(ed, dir)?;
    match stat(ed, d)? {
        Some(e) if e.kind == Kind::Dir => {}
        Some(_) => return Err(ed.guest_error(GuestError::NotADirectory(shown(d)))),
        None => return Err(ed.guest_error(GuestError::NotFound(shown(d)))),
    }
    let mut report = CopyInReport::default();
    for src in sources {
        let Some(name) = src.file_name() else {
            return Err(Error::new(src, GuestError::NotAName));
        };
        let target = join(d, name.as_bytes());
        copy_one(ed, src, &target, 0, &mut report)?;
    }
    Ok(report)
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if p.last() != Some(&b'/') {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn copy_one(
    ed: &GuestEditor,
    src: &Path,
    target: &[u8],
    depth: usize,
    report: &mut CopyInReport,
) -> Result<()> {
    let meta = std::fs::symlink_metadata(src).map_err(|e| Error::new(src, e))?;
    let mode = meta.mode() & 0o7777;
    if stat(ed, target)?.is_some() {
        return Err(ed.guest_error(GuestError::AlreadyExists(shown(target))));
    }
    let e = |err| ed.error(target, err);
    if meta.is_dir() {
        if depth >= MAX_DEPTH {
            return Err(Error::new(
                src,
                GuestError::TooDeep {
                    path: shown(target),
                    max: MAX_DEPTH,
                },
            ));
        }
        ed.editor().mkdir(target, mode).map_err(e)?;
        report.dirs += 1;
        let mut names: Vec<_> = std::fs::read_dir(src)
            .map_err(|e| Error::new(src, e))?
            .map(|entry| entry.map(|d| d.file_name()))
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::new(src, e))?;
        names.sort();
        for name in names {
            let child = join(target, name.as_bytes());
            copy_one(ed, &src.join(&name), &child, depth + 1, report)?;
        }
    } else if meta.is_file() {
        let mut file = std::fs::File::open(src).map_err(|e| Error::new(src, e))?;
        ed.editor().create(target, mode).map_err(e)?;
        report.bytes += fill(ed, target, &mut file, src)?;
        report.files += 1;
    } else {
        eprintln!(
            "qcowfs: warning: {}: not a regular file or folder (a symlink, device, FIFO or socket); not copied",
            crate::error::escaped(src)
        );
        report.skipped += 1;
    }
    Ok(())
}

/// `qcowfs edit IMAGE GUESTPATH`: `editor` (a shell command, given the copy's path as `$1`) on
/// a private copy of the file; its new contents written back only if they changed. Whether
/// they changed.
pub fn edit(ed: &GuestEditor, path: &OsStr, editor: &str) -> Result<bool> {
    let p = absolute(ed, path)?;
    let entry = match stat(ed, p)? {
        Some(e) if e.kind == Kind::File => e,
        Some(_) => return Err(ed.guest_error(GuestError::NotRegular(shown(p)))),
        None => return Err(ed.guest_error(GuestError::NotFound(shown(p)))),
    };
    if entry.len > EDIT_LIMIT {
        let e = GuestError::TooBigToEdit {
            path: shown(p),
            len: entry.len,
            limit: EDIT_LIMIT,
        };
        return Err(ed.guest_error(e));
    }
    let mut old = vec![0u8; entry.len as usize];
    let mut done = 0;
    while done < old.len() {
        let n = ed
            .editor()
            .read(p, done as u64, &mut old[done..])
            .map_err(|e| ed.error(p, e))?;
        if n == 0 {
            break;
        }
        done += n;
    }
    old.truncate(done);
    // The copy is the guest's plaintext: in a folder only this user can enter, removed after.
    let dir = tempfile::Builder::new()
        .prefix("qcowfs-edit-")
        .tempdir()
        .map_err(|e| Error::new(std::env::temp_dir(), e))?;
    let name = split(p).map_or(&b"file"[..], |(_, n)| n);
    let copy = dir.path().join(OsStr::from_bytes(name));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&copy)
        .map_err(|e| Error::new(&copy, e))?;
    f.write_all(&old).map_err(|e| Error::new(&copy, e))?;
    drop(f);
    let status = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(&copy)
        .status()
        .map_err(|e| Error::new(Path::new("/bin/sh"), e))?;
    if !status.success() {
        return Err(ed.guest_error(GuestError::EditorFailed(format!("{editor}: {status}"))));
    }
    let new = std::fs::read(&copy).map_err(|e| Error::new(&copy, e))?;
    if new.len() as u64 > EDIT_LIMIT {
        let e = GuestError::TooBigToEdit {
            path: shown(p),
            len: new.len() as u64,
            limit: EDIT_LIMIT,
        };
        return Err(ed.guest_error(e));
    }
    if new == old {
        return Ok(false);
    }
    ed.editor().replace(p, &new).map_err(|e| ed.error(p, e))?;
    Ok(true)
}
