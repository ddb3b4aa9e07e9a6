//! Finding the disks to audit under the folders named: every qcow2 image file (by its magic)
//! down to `MAX_DEPTH` levels, which covers nova (`DIR/UUID/disk`, `disk.local`, `disk.swap`,
//! `disk.eph0`...) and a CloudStack KVM primary storage pool (UUID-named volumes and templates
//! side by side in one folder); plus nova's disk names whatever they hold, so that a damaged
//! instance disk gets a row saying why. Links inside a folder are not followed, only regular files
//! are opened, and nova's `_base` is skipped (its images are bases, reached through the disks).
//! Raw files are left out: nothing tells a raw disk from any other file; a raw base is found
//! through the disk that names it. Image files named directly are taken as they are.
//!
//! Which found images are only bases of others (a pool's templates) is decided after they are
//! opened (`scan::audit`).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, DirEntry};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::Error;

/// Nova's folder of base images beside the instance folders; never searched.
const BASE_FOLDER: &str = "_base";
/// The name of a nova instance's root disk in its folder.
const DISK_NAME: &str = "disk";
/// How far below a folder named files are looked at: `DIR/UUID/disk` (nova), `DIR/UUID` (a pool).
const MAX_DEPTH: usize = 2;
/// The first bytes of every qcow2 image.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

const LINKED_DISK: &str = "is a symbolic link; audit does not follow links inside a folder \
                           (name the image as an argument to audit it)";
const LINKED_FOLDER: &str = "lies in a linked instance folder; audit does not follow links \
                             inside DIR (name the image as an argument to audit it)";

/// A disk to audit, or one found but refused before opening it (with the reason).
#[derive(Debug)]
pub(crate) struct Candidate {
    pub path: PathBuf,
    pub refused: Option<String>,
}

/// What discovery found: the disks in order, and paths that could not be searched at all.
#[derive(Debug, Default)]
pub(crate) struct Found {
    pub disks: Vec<Candidate>,
    pub problems: Vec<Error>,
    /// Disks already listed, by canonical path (a disk named twice is audited once).
    seen: HashSet<PathBuf>,
}

impl Found {
    fn add(&mut self, path: PathBuf, refused: Option<String>) {
        // A refused link is known by its own name: following it to dedupe would be following it.
        let key = match refused {
            Some(_) => path.clone(),
            None => fs::canonicalize(&path).unwrap_or_else(|_| path.clone()),
        };
        if self.seen.insert(key) {
            self.disks.push(Candidate { path, refused });
        }
    }
}

/// The disks named by `paths`: a folder is searched, anything else is a disk.
pub(crate) fn discover(paths: &[PathBuf]) -> Found {
    let mut found = Found::default();
    for path in paths {
        // The paths the user names are followed (/var/lib/nova/instances is often a link).
        match fs::metadata(path) {
            Err(e) => found.problems.push(Error::new(path, e)),
            Ok(meta) if meta.is_dir() => search_folder(path, 1, &mut found),
            Ok(_) => found.add(path.clone(), None),
        }
    }
    found
}

/// A name nova gives an instance's disks: `disk`, `disk.local`, `disk.swap`, `disk.eph<N>`.
fn is_nova_disk(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    match name.strip_prefix("disk") {
        Some("" | ".local" | ".swap") => true,
        Some(rest) => rest
            .strip_prefix(".eph")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        None => false,
    }
}

/// Whether the regular file at `path` starts with the qcow2 magic. Opened without following a
/// link and without blocking (it was a regular file when listed; it may not be now).
fn is_qcow2(path: &Path) -> std::io::Result<bool> {
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Ok(false);
    }
    let mut magic = [0u8; 4];
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == QCOW2_MAGIC),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// `dir`'s entries in name order, depth first: nova disk names and qcow2 files are disks.
fn search_folder(dir: &Path, depth: usize, found: &mut Found) {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => return found.problems.push(Error::new(dir, e)),
    };
    let mut listed = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => listed.push(entry),
            Err(e) => found.problems.push(Error::new(dir, e)),
        }
    }
    listed.sort_by_key(|e| e.file_name());
    for entry in listed {
        if entry.file_name() != BASE_FOLDER {
            look_at(&entry, depth, found);
        }
    }
}

fn look_at(entry: &DirEntry, depth: usize, found: &mut Found) {
    let path = entry.path();
    let kind = match entry.file_type() {
        Ok(kind) => kind,
        Err(e) => return found.problems.push(Error::new(&path, e)),
    };
    let nova_name = is_nova_disk(&entry.file_name());
    if kind.is_dir() {
        if depth < MAX_DEPTH {
            search_folder(&path, depth + 1, found);
        }
    } else if kind.is_symlink() {
        // Not followed, but not silently passed over either when it is, or leads to, a nova disk.
        if nova_name {
            found.add(path, Some(LINKED_DISK.to_string()));
        } else if depth < MAX_DEPTH && fs::symlink_metadata(path.join(DISK_NAME)).is_ok() {
            found.add(path.join(DISK_NAME), Some(LINKED_FOLDER.to_string()));
        }
    } else if kind.is_file() {
        if nova_name {
            return found.add(path, None);
        }
        match is_qcow2(&path) {
            Ok(true) => found.add(path, None),
            Ok(false) => {}
            // Cannot tell whether it is an image: said, not passed over.
            Err(e) => found.problems.push(Error::new(&path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(found: &Found, root: &Path) -> Vec<(String, bool)> {
        found
            .disks
            .iter()
            .map(|c| {
                let rel = c.path.strip_prefix(root).unwrap().display().to_string();
                (rel, c.refused.is_some())
            })
            .collect()
    }

    #[test]
    fn discovery_skips_base_and_folders_without_a_disk_and_names_a_linked_disk() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for sub in ["_base", "b-inst", "a-inst", "locks", "linked"] {
            fs::create_dir(root.join(sub)).unwrap();
        }
        fs::write(root.join("_base/disk"), b"not an instance").unwrap();
        fs::write(root.join("_base/image"), b"QFI\xfb a qcow2 base").unwrap();
        fs::write(root.join("a-inst/disk"), b"x").unwrap();
        fs::write(root.join("b-inst/disk"), b"y").unwrap();
        fs::write(root.join("compute_nodes"), b"host").unwrap();
        std::os::unix::fs::symlink(root.join("a-inst/disk"), root.join("linked/disk")).unwrap();
        std::os::unix::fs::symlink(root.join("b-inst"), root.join("z-link")).unwrap();
        let found = discover(&[root.to_path_buf(), root.join("a-inst/disk")]);
        assert_eq!(
            names(&found, root),
            [
                ("a-inst/disk".to_string(), false),
                ("b-inst/disk".to_string(), false),
                ("linked/disk".to_string(), true),
                ("z-link/disk".to_string(), true),
            ]
        );
        assert!(found.problems.is_empty(), "{:?}", found.problems);
        let missing = discover(&[root.join("nowhere")]);
        assert!(missing.disks.is_empty());
        assert_eq!(missing.problems.len(), 1);
    }

    #[test]
    fn nova_extra_disks_and_qcow2_files_two_levels_down_are_found_and_nothing_deeper() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("inst/deeper/deepest")).unwrap();
        for name in [
            "inst/disk",
            "inst/disk.local",
            "inst/disk.eph0",
            "inst/disk.eph12",
            "inst/disk.swap",
            "inst/disk.config",
            "inst/disk.info",
            "inst/disk.ephx",
            "inst/console.log",
            "inst/deeper/deepest/disk",
        ] {
            fs::write(root.join(name), b"not an image").unwrap();
        }
        fs::write(root.join("0b1e-volume"), b"QFI\xfb\0\0\0\x03").unwrap();
        fs::write(root.join("raw-volume"), vec![0u8; 4096]).unwrap();
        fs::write(root.join("tiny"), b"QF").unwrap();
        fs::write(root.join("inst/deeper/vol"), b"QFI\xfb").unwrap();
        std::os::unix::fs::symlink(root.join("0b1e-volume"), root.join("link-volume")).unwrap();
        let found = discover(&[root.to_path_buf()]);
        let want = [
            "0b1e-volume",
            "inst/disk",
            "inst/disk.eph0",
            "inst/disk.eph12",
            "inst/disk.local",
            "inst/disk.swap",
        ];
        assert_eq!(names(&found, root), want.map(|n| (n.to_string(), false)));
        assert!(found.problems.is_empty(), "{:?}", found.problems);
    }
}
