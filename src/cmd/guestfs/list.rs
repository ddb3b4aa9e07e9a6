//! `qcowfs ls` and `qcowfs cat`: one line per directory entry (mode, owner, size, mtime, name,
//! a symlink's target), and a guest file's bytes streamed to stdout in bounded chunks.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;

use super::data::GuestData;
use super::error::GuestError;
use super::open::GuestFs;
use super::tree::shown;
use super::tree::{GuestPath, Kind, Meta};
use crate::error::{Error, Result};

/// Bytes gathered from the guest file before each write to stdout.
pub(crate) const CHUNK: usize = 1 << 20;

/// Write `ls -l`-style lines for guest `path` to `out`: the entries of a directory (sorted by
/// name, dot files included, `.` and `..` left out), or the one entry a file or symlink is. A
/// symlink is shown as itself unless the path ends with `/`.
pub fn ls(gfs: &GuestFs, path: &OsStr, out: &mut dyn Write) -> Result<()> {
    // One write per line would be a system call per entry.
    let out = &mut std::io::BufWriter::with_capacity(CHUNK, out);
    let bytes = path.as_bytes();
    let (p, meta) = gfs.resolve(bytes, bytes.ends_with(b"/"))?;
    let mut lines = Vec::new();
    if meta.is_dir() {
        gfs.for_each_child(&p, &meta, bytes, |name, child, meta| {
            let target = link_target(gfs, &child, &meta)?;
            lines.push((name, meta, target));
            Ok(())
        })?;
        lines.sort_by(|a, b| a.0.cmp(&b.0));
    } else {
        let target = link_target(gfs, &p, &meta)?;
        lines.push((bytes.to_vec(), meta, target));
    }
    for (name, meta, target) in &lines {
        let mut line = format!(
            "{} {:>6} {:>6} {:>12} {} {}",
            mode_string(meta),
            meta.uid,
            meta.gid,
            meta.len,
            utc_time(meta.mtime.secs),
            shown(name)
        );
        if let Some(t) = target {
            line.push_str(" -> ");
            line.push_str(&shown(t));
        }
        line.push('\n');
        if !write_stdout(out, line.as_bytes())? {
            return Ok(());
        }
    }
    flush_stdout(out)
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
