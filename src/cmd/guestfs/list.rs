//! `qcowfs ls` and `qcowfs cat`: one line per directory entry (mode, owner, size, mtime, name,
//! a symlink's target; or one JSON object), folders below with `-R`, and a guest file's bytes
//! streamed to stdout in bounded chunks.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;

use super::data::GuestData;
use super::error::GuestError;
use super::open::GuestFs;
use super::tree::shown;
use super::tree::{GuestPath, Kind, Meta};
use super::walk::MAX_DEPTH;
use crate::error::{Error, Result};

/// Bytes gathered from the guest file before each write to stdout.
pub(crate) const CHUNK: usize = 1 << 20;

/// How `ls` prints.
#[derive(Debug, Default, Clone, Copy)]
pub struct LsOptions {
    /// One JSON object per entry and line instead of `ls -l` text.
    pub json: bool,
    /// Every folder below too, as `ls -lR` lists them (each folder once, at most
    /// [`MAX_DEPTH`] deep).
    pub recursive: bool,
}

/// An entry to print: its name (or path) as given, its metadata, a symlink's target.
type Line = (Vec<u8>, GuestPath, Meta, Option<Vec<u8>>);

/// Write `ls -l`-style lines (or JSON Lines) for guest `path` to `out`: the entries of a
/// directory (sorted by name, dot files included, `.` and `..` left out), or the one entry a file
/// or symlink is. A symlink is shown as itself unless the path ends with `/`.
pub fn ls(gfs: &GuestFs, path: &OsStr, opts: LsOptions, out: &mut dyn Write) -> Result<()> {
    // One write per line would be a system call per entry.
    let out = &mut std::io::BufWriter::with_capacity(CHUNK, out);
    let bytes = path.as_bytes();
    let (p, meta) = gfs.resolve(bytes, bytes.ends_with(b"/"))?;
    if !meta.is_dir() {
        let target = link_target(gfs, &p, &meta)?;
        let line = (bytes.to_vec(), p, meta, target);
        if write_line(out, opts, None, &line)? {
            flush_stdout(out)?;
        }
        return Ok(());
    }
    let mut listing = Listing {
        gfs,
        opts,
        folders: meta.id.into_iter().collect(),
        dirs_left: gfs.tree().max_dirs().max(1),
        entries_left: gfs.fs_bytes() / 12,
    };
    let shown_dir = match bytes.len() > 1 && bytes.ends_with(b"/") {
        true => &bytes[..bytes.len() - 1],
        false => bytes,
    };
    if listing.folder(shown_dir, &p, &meta, 0, out)? {
        flush_stdout(out)?;
    }
    Ok(())
}

/// One `ls` of a folder (and, with `recursive`, those below it).
struct Listing<'a> {
    gfs: &'a GuestFs,
    opts: LsOptions,
    /// Numbers of the folders listed: a folder met again (a loop in a damaged or hostile file
    /// system) is named and not listed twice, as GNU ls does.
    folders: HashSet<u64>,
    /// Folders that may still be listed: no sound file system has more (where entries have no
    /// number, as on FAT, this and the depth bound a loop).
    dirs_left: u64,
    /// Entries that may still be listed: no more than the file system's bytes can hold.
    entries_left: u64,
}

impl Listing<'_> {
    /// List folder `dir` (shown as `shown`); false when the reader went away.
    fn folder(
        &mut self,
        shown_dir: &[u8],
        dir: &GuestPath,
        meta: &Meta,
        depth: usize,
        out: &mut dyn Write,
    ) -> Result<bool> {
        let gfs = self.gfs;
        let mut lines: Vec<Line> = Vec::new();
        let mut left = self.entries_left;
        gfs.for_each_child(dir, meta, shown_dir, |name, child, meta| {
            if left == 0 {
                return Err(gfs.guest_error(GuestError::TooManyEntries {
                    path: shown(shown_dir),
                    limit: gfs.fs_bytes() / 12,
                    fs_bytes: gfs.fs_bytes(),
                }));
            }
            left -= 1;
            let target = link_target(gfs, &child, &meta)?;
            lines.push((name, child, meta, target));
            Ok(())
        })?;
        self.entries_left = left;
        lines.sort_by(|a, b| a.0.cmp(&b.0));
        let recursive = self.opts.recursive;
        if recursive && !self.opts.json {
            let head = format!(
                "{}{}:\n",
                if depth > 0 { "\n" } else { "" },
                shown(shown_dir)
            );
            if !write_stdout(out, head.as_bytes())? {
                return Ok(false);
            }
        }
        for line in &lines {
            if !write_line(out, self.opts, Some(shown_dir), line)? {
                return Ok(false);
            }
        }
        if !recursive {
            return Ok(true);
        }
        // Only the folders are kept while the ones below are listed.
        let folders: Vec<Line> = lines.into_iter().filter(|l| l.2.is_dir()).collect();
        for (name, child, meta, _) in folders {
            let mut path = shown_dir.to_vec();
            if !path.ends_with(b"/") {
                path.push(b'/');
            }
            path.extend_from_slice(&name);
            if depth + 1 >= MAX_DEPTH || self.dirs_left == 0 {
                return Err(gfs.guest_error(GuestError::TooDeep {
                    path: shown(&path),
                    max: MAX_DEPTH,
                }));
            }
            if let Some(id) = meta.id {
                if !self.folders.insert(id) {
                    eprintln!(
                        "qcowfs: warning: {}: {}: not listing a folder already listed (a \
                         damaged file system; its fsck repairs it)",
                        crate::error::escaped(gfs.image()),
                        shown(&path)
                    );
                    continue;
                }
            }
            self.dirs_left -= 1;
            if !self.folder(&path, &child, &meta, depth + 1, out)? {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Print one entry, `ls -l` style or as a JSON object (`parent` given: the entry's path is
/// PARENT/NAME); false when the reader went away.
fn write_line(
    out: &mut dyn Write,
    opts: LsOptions,
    parent: Option<&[u8]>,
    line: &Line,
) -> Result<bool> {
    let (name, _, meta, target) = line;
    let text = match opts.json {
        true => {
            let path = match parent {
                Some(dir) if dir.ends_with(b"/") => [dir, name.as_slice()].concat(),
                Some(dir) => [dir, b"/", name.as_slice()].concat(),
                None => name.clone(),
            };
            let name = path
                .rsplit(|&b| b == b'/')
                .find(|n| !n.is_empty())
                .unwrap_or(&path);
            let mut o = serde_json::json!({
                "path": json_text(&path),
                "name": json_text(name),
                "kind": kind_name(meta.kind),
                "mode": format!("{:04o}", meta.mode),
                "uid": meta.uid,
                "gid": meta.gid,
                "size": meta.len,
                "links": meta.links,
                "mtime": meta.mtime.secs,
                "mtime_utc": format!("{}Z", utc_time(meta.mtime.secs).replace(' ', "T")),
            });
            if let Some(t) = target {
                o["target"] = serde_json::Value::String(json_text(t));
            }
            // A name that is not UTF-8 has no exact JSON string: its bytes go beside the text.
            for (key, bytes) in [
                ("path_base64", Some(&path)),
                ("target_base64", target.as_ref()),
            ] {
                if let Some(b) = bytes.filter(|b| std::str::from_utf8(b).is_err()) {
                    use base64::Engine;
                    let text = base64::engine::general_purpose::STANDARD.encode(b);
                    o[key] = serde_json::Value::String(text);
                }
            }
            format!("{o}\n")
        }
        false => {
            let mut text = format!(
                "{} {:>6} {:>6} {:>12} {} {}",
                mode_string(meta),
                meta.uid,
                meta.gid,
                meta.len,
                utc_time(meta.mtime.secs),
                shown(name)
            );
            if let Some(t) = target {
                text.push_str(" -> ");
                text.push_str(&shown(t));
            }
            text.push('\n');
            text
        }
    };
    write_stdout(out, text.as_bytes())
}

/// A guest name as a JSON string: as it is when it is UTF-8 (JSON escapes what needs it, so two
/// names never print alike), else escaped as the text output shows it (and its bytes given in
/// base64 beside it).
fn json_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(_) => shown(bytes),
    }
}

/// The word JSON gives a kind of entry (as `find -printf %y` spells them out).
fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::File => "file",
        Kind::Dir => "dir",
        Kind::Symlink => "symlink",
        Kind::CharDevice => "char-device",
        Kind::BlockDevice => "block-device",
        Kind::Fifo => "fifo",
        Kind::Socket => "socket",
    }
}

/// The target of a symlink (as stored, never resolved), None for anything else.
fn link_target(gfs: &GuestFs, path: &GuestPath, meta: &Meta) -> Result<Option<Vec<u8>>> {
    match meta.is_symlink() {
        true => gfs.read_link(path, meta).map(Some),
        false => Ok(None),
    }
}

/// Stream guest file `path` (symlinks followed inside the guest) to `out`, a chunk at a time.
pub fn cat(gfs: &GuestFs, path: &OsStr, out: &mut dyn Write) -> Result<()> {
    let bytes = path.as_bytes();
    let (p, meta) = gfs.resolve(bytes, true)?;
    if meta.is_dir() {
        return Err(gfs.guest_error(GuestError::IsADirectory(shown(bytes))));
    }
    if !meta.is_file() {
        return Err(gfs.guest_error(GuestError::NotAFile(shown(bytes))));
    }
    // The same bounds as copy-out's: a file longer than its file system must have known holes.
    let mut data = GuestData::open(gfs, &p, &meta)?;
    data.ranges()?;
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0;
    while at < meta.len {
        let n = (meta.len - at).min(CHUNK as u64) as usize;
        data.read_at(at, &mut buf[..n])?;
        if !write_stdout(out, &buf[..n])? {
            break;
        }
        at += n as u64;
    }
    flush_stdout(out)
}

/// Write to stdout; false when the reader went away (a closed pipe: `qcowfs cat ... | head`).
fn write_stdout(out: &mut dyn Write, data: &[u8]) -> Result<bool> {
    match out.write_all(data) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(Error::new("<stdout>", e)),
    }
}

fn flush_stdout(out: &mut dyn Write) -> Result<()> {
    match out.flush() {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::new("<stdout>", e)),
        _ => Ok(()),
    }
}

/// `drwxr-xr-x`, as ls prints a mode.
pub fn mode_string(meta: &Meta) -> String {
    let kind = match meta.kind {
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::CharDevice => 'c',
        Kind::BlockDevice => 'b',
        Kind::Fifo => 'p',
        Kind::Socket => 's',
        Kind::File => '-',
    };
    let m = meta.mode;
    let mut s = String::with_capacity(10);
    s.push(kind);
    for (shift, special, set, unset) in [
        (6, 0o4000, 's', 'S'),
        (3, 0o2000, 's', 'S'),
        (0, 0o1000, 't', 'T'),
    ] {
        let bits = (m >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(match (bits & 1 != 0, m & special != 0) {
            (true, true) => set,
            (false, true) => unset,
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of seconds since the epoch.
pub fn utc_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_printed_as_utc_dates() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_time(1_796_190_655), "2026-12-02 05:50:55");
        assert_eq!(utc_time(-1), "1969-12-31 23:59:59");
    }
}
