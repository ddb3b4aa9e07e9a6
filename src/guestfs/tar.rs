//! `qcowfs copy-out IMAGE GUESTPATH -`: the walk (walk.rs) written to stdout as a tar stream
//! (GNU headers: long names and targets, the guest's uid/gid, modes less setuid/setgid, mtimes).
//! File bytes are streamed a chunk at a time; nothing is made on the host.

use std::ffi::OsStr;
use std::io::{BufWriter, IsTerminal, Read, Write};
use std::os::unix::ffi::OsStrExt;

use ext4_view::{Ext4Error, Metadata, PathBuf as GuestPath};

use super::copy::{last_name, top_metadata, KEPT_MODE};
use super::walk::{CopyReport, Sink, Walker};
use super::GuestFs;
use crate::error::{Error, Result};

/// Stream guest `path` (a final symlink followed only when it ends in `/`) to `out` as a tar
/// archive whose names start with the path's last name (`.` for the root).
pub fn copy_out_tar(
    gfs: &GuestFs,
    path: &OsStr,
    out: &mut dyn Write,
    progress: bool,
) -> Result<CopyReport> {
    let (p, meta) = top_metadata(gfs, path)?;
    let name = last_name(&p).unwrap_or_else(|| b".".to_vec());
    let mut sink = TarSink {
        gfs,
        builder: tar::Builder::new(BufWriter::with_capacity(1 << 20, out)),
    };
    let mut walker = Walker::new(gfs, &meta, progress && std::io::stderr().is_terminal());
    // The top name is checked by the walk like any other; the root's "." is the one exception.
    let result = if name == b"." {
        root(&mut walker, &mut sink, &p, &meta)
    } else {
        walker.entry(&mut sink, &Vec::new(), &name, &p, &meta, 0)
    };
    walker.finish();
    result?;
    let mut w = sink.builder.into_inner().map_err(stdout_error)?;
    w.flush().map_err(stdout_error)?;
    Ok(walker.report)
}

/// The root folder as `.`, its entries as `./NAME`.
fn root(walker: &mut Walker, sink: &mut TarSink, p: &GuestPath, meta: &Metadata) -> Result<()> {
    let gfs = walker.gfs;
    let top = b".".to_vec();
    sink.append(
        &top,
        header(meta, tar::EntryType::Directory, 0),
        &mut std::io::empty(),
    )?;
    gfs.for_each_child(p, p.as_ref(), |name, child, child_meta| {
        walker.entry(sink, &top, &name, &child, &child_meta, 1)
    })
}

fn stdout_error(e: std::io::Error) -> Error {
    Error::new("<stdout>", e)
}

fn header(meta: &Metadata, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(u32::from(meta.mode()) & KEPT_MODE);
    h.set_uid(u64::from(meta.uid()));
    h.set_gid(u64::from(meta.gid()));
    h.set_mtime(meta.modified().seconds().max(0) as u64);
    h.set_size(size);
    h
}

/// A guest file as `Read`, keeping ext4-view's error to report it as the guest's.
struct GuestReader<'a> {
    file: ext4_view::File,
    error: &'a mut Option<Ext4Error>,
    progress: &'a mut dyn FnMut(u64),
}

impl Read for GuestReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.file.read_bytes(buf) {
            Ok(n) => {
                (self.progress)(n as u64);
                Ok(n)
            }
            Err(e) => {
                *self.error = Some(e);
                Err(std::io::Error::other("the guest file cannot be read"))
            }
        }
    }
}

struct TarSink<'a> {
    gfs: &'a GuestFs,
    builder: tar::Builder<BufWriter<&'a mut dyn Write>>,
}

impl TarSink<'_> {
    /// Append one entry named `path` (relative, bytes).
    fn append(&mut self, path: &[u8], mut h: tar::Header, data: &mut dyn Read) -> Result<()> {
        self.builder
            .append_data(&mut h, std::path::Path::new(OsStr::from_bytes(path)), data)
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
        meta: &Metadata,
    ) -> Result<()> {
        let path = join(parent, name);
        let mut h = header(meta, tar::EntryType::Symlink, 0);
        self.builder
            .append_link(
                &mut h,
                std::path::Path::new(OsStr::from_bytes(&path)),
                std::path::Path::new(OsStr::from_bytes(target)),
            )
            .map_err(stdout_error)
    }

    fn dir(&mut self, parent: &Vec<u8>, name: &[u8], meta: &Metadata) -> Result<Vec<u8>> {
        let path = join(parent, name);
        self.append(
            &path,
            header(meta, tar::EntryType::Directory, 0),
            &mut std::io::empty(),
        )?;
        Ok(path)
    }

    fn dir_done(&mut self, _dir: Vec<u8>, _meta: &Metadata) -> Result<()> {
        Ok(())
    }

    fn file(
        &mut self,
        parent: &Vec<u8>,
        name: &[u8],
        path: &GuestPath,
        file: ext4_view::File,
        meta: &Metadata,
        progress: &mut dyn FnMut(u64),
    ) -> Result<()> {
        let entry = join(parent, name);
        let mut error = None;
        let mut reader = GuestReader {
            file,
            error: &mut error,
            progress,
        };
        let h = header(meta, tar::EntryType::Regular, meta.len());
        let written = self.append(&entry, h, &mut reader);
        match error {
            Some(e) => Err(self.gfs.error(path.as_ref(), e)),
            None => written,
        }
    }
}
