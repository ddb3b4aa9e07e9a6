//! `qcowfs copy-out IMAGE GUESTPATH -`: the walk (walk.rs) written to stdout as a tar stream
//! (GNU headers: long names and targets, the guest's uid/gid, whole modes, mtimes).
//! File bytes are streamed a chunk at a time; nothing is made on the host. A file with holes is
//! a GNU sparse entry (sparse.rs) holding only its data; a file's second name a hard link entry.

use std::ffi::OsStr;
use std::io::{BufWriter, IsTerminal, Read, Write};
use std::os::unix::ffi::OsStrExt;

use super::copy::top_entry;
use super::data::{GuestData, Range};
use super::list::CHUNK;
use super::open::GuestFs;
use super::sparse::sparse_header;
use super::tree::{GuestPath, Meta, Xattr};
use super::walk::{CopyReport, Sink, Walker};
use super::xattrs::pax_records;
use crate::error::{Error, Result};

/// Stream guest `path` (a final symlink followed only when it ends in `/`) to `out` as a tar
/// archive whose names start with the path's last name (`.` for the root).
pub fn copy_out_tar(
    gfs: &GuestFs,
    path: &OsStr,
    out: &mut dyn Write,
    progress: bool,
) -> Result<CopyReport> {
    let (p, meta, name) = top_entry(gfs, path)?;
    let name = name.unwrap_or_else(|| b".".to_vec());
    let mut sink = TarSink {
        builder: tar::Builder::new(BufWriter::with_capacity(1 << 20, out)),
    };
    let mut walker = Walker::new(gfs, &meta, progress && std::io::stderr().is_terminal());
    // The top name is checked by the walk like any other; the root's "." is the one exception.
    let result = if name == b"." {
        root(&mut walker, &mut sink, &p, &meta)
    } else {
        walker.entry(&mut sink, &Vec::new(), &name, &p, &meta, 0)
    };
    let report = walker.finish();
    result?;
    let mut w = sink.builder.into_inner().map_err(stdout_error)?;
    w.flush().map_err(stdout_error)?;
    Ok(report)
}

/// The root folder as `.`, its entries as `./NAME`.
fn root(walker: &mut Walker, sink: &mut TarSink, p: &GuestPath, meta: &Meta) -> Result<()> {
    let gfs = walker.gfs();
    let top = b".".to_vec();
    walker.folder(p, meta)?;
    let attrs = walker.attrs(p, meta);
    sink.pax(&attrs)?;
    sink.append(
        &top,
        header(meta, tar::EntryType::Directory, 0),
        &mut std::io::empty(),
    )?;
    gfs.for_each_child(p, meta, p.as_bytes(), |name, child, child_meta| {
        walker.entry(sink, &top, &name, &child, &child_meta, 1)
    })
}

fn stdout_error(e: std::io::Error) -> Error {
    Error::new("<stdout>", e)
}

fn header(meta: &Meta, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    // The whole mode, as GNU tar records it: extracting, tar itself decides what a caller keeps
    // (setuid and setgid only for root with --same-permissions).
    h.set_mode(meta.mode & 0o7777);
    h.set_uid(u64::from(meta.uid));
    h.set_gid(u64::from(meta.gid));
    h.set_mtime(meta.mtime.secs.max(0) as u64);
    h.set_size(size);
    h
}

/// A guest file's data ranges, back to back, as `Read`, keeping our error to report it as is.
struct RangesReader<'a, 'r> {
    reader: &'a mut GuestData<'r>,
    ranges: &'a [Range],
    /// The range being read, and the next byte of it.
    index: usize,
    at: u64,
    error: &'a mut Option<Error>,
    progress: &'a mut dyn FnMut(u64),
}

impl Read for RangesReader<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(r) = self.ranges.get(self.index) else {
            return Ok(0);
        };
        let n = (r.offset + r.len - self.at).min(buf.len().min(CHUNK) as u64) as usize;
        if let Err(e) = self.reader.read_at(self.at, &mut buf[..n]) {
            *self.error = Some(e);
            return Err(std::io::Error::other("the guest file cannot be read"));
        }
        self.at += n as u64;
        let mut done = n as u64;
        if self.at == r.offset + r.len {
            self.index += 1;
            if let Some(next) = self.ranges.get(self.index) {
                // The hole before the next range counts as copied.
                done += next.offset - self.at;
                self.at = next.offset;
            }
        }
        (self.progress)(done);
        Ok(n)
    }
}

struct TarSink<'a> {
    builder: tar::Builder<BufWriter<&'a mut dyn Write>>,
}

impl TarSink<'_> {
    /// Append one entry named `path` (relative, bytes).
    fn append(&mut self, path: &[u8], mut h: tar::Header, data: &mut dyn Read) -> Result<()> {
        self.builder
            .append_data(&mut h, std::path::Path::new(OsStr::from_bytes(path)), data)
            .map_err(stdout_error)
    }

    /// A PAX extended header carrying `attrs` for the entry appended next (none when empty).
    fn pax(&mut self, attrs: &[Xattr]) -> Result<()> {
        if attrs.is_empty() {
            return Ok(());
        }
        let records = pax_records(attrs);
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_mode(0o644);
        h.set_size(records.len() as u64);
        // The name GNU tar and libarchive ignore for an extended header.
        h.set_path("././@PaxHeader").map_err(stdout_error)?;
        h.set_cksum();
        self.builder
            .append(&h, records.as_slice())
            .map_err(stdout_error)
    }
}

/// Folders are their path in the archive.
fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        return name.to_vec();
    }
    let mut p = parent.to_vec();
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

impl Sink for TarSink<'_> {
    type Dir = Vec<u8>;

    fn symlink(
        &mut self,
        parent: &Vec<u8>,
        name: &[u8],
        target: &[u8],
        meta: &Meta,
        attrs: &[Xattr],
    ) -> Result<()> {
        let path = join(parent, name);
        self.pax(attrs)?;
        let mut h = header(meta, tar::EntryType::Symlink, 0);
        self.builder
            .append_link(
                &mut h,
                std::path::Path::new(OsStr::from_bytes(&path)),
                std::path::Path::new(OsStr::from_bytes(target)),
            )
            .map_err(stdout_error)
    }

    fn dir(
        &mut self,
        parent: &Vec<u8>,
        name: &[u8],
        meta: &Meta,
        attrs: &[Xattr],
    ) -> Result<Vec<u8>> {
        let path = join(parent, name);
        self.pax(attrs)?;
        self.append(
            &path,
            header(meta, tar::EntryType::Directory, 0),
            &mut std::io::empty(),
        )?;
        Ok(path)
    }

    fn dir_done(&mut self, _dir: Vec<u8>, _meta: &Meta, _attrs: &[Xattr]) -> Result<()> {
        Ok(())
    }

    fn file(
        &mut self,
        parent: &Vec<u8>,
        name: &[u8],
        data: &mut GuestData,
        ranges: &[Range],
        meta: &Meta,
        attrs: &[Xattr],
        progress: &mut dyn FnMut(u64),
    ) -> Result<Vec<u8>> {
        let entry = join(parent, name);
        self.pax(attrs)?;
        let len = data.len();
        let whole = match ranges {
            [] => len == 0,
            [only] => only.offset == 0 && only.len == len,
            _ => false,
        };
        let mut h = header(meta, tar::EntryType::Regular, len);
        let extensions = match whole {
            true => Vec::new(),
            false => sparse_header(&mut h, ranges, len),
        };
        if let Some(first) = ranges.first() {
            progress(first.offset);
        }
        let mut error = None;
        let mut reader = RangesReader {
            reader: data,
            ranges,
            index: 0,
            at: ranges.first().map_or(0, |r| r.offset),
            error: &mut error,
            progress: &mut *progress,
        };
        let mut stream = extensions.as_slice().chain(&mut reader);
        let written = self.append(&entry, h, &mut stream);
        let data_end = ranges.last().map_or(0, |r| r.offset + r.len);
        match error {
            Some(e) => Err(e),
            None => written.map(|()| {
                progress(len - data_end);
                entry
            }),
        }
    }

    fn link(&mut self, parent: &Vec<u8>, name: &[u8], first: &[u8], meta: &Meta) -> Result<()> {
        let path = join(parent, name);
        let mut h = header(meta, tar::EntryType::Link, 0);
        self.builder
            .append_link(
                &mut h,
                std::path::Path::new(OsStr::from_bytes(&path)),
                std::path::Path::new(OsStr::from_bytes(first)),
            )
            .map_err(stdout_error)
    }
}
