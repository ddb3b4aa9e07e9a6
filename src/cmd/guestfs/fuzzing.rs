//! The guest file system paths for the fuzzer (fuzz/fuzz_targets/guest.rs): bytes taken as an
//! ext2/3/4 file system in memory, then listed, read and copied out as `ls`, `cat` and
//! `copy-out` (to a tar stream and to a host folder) do it. Each step is bounded by the walk's
//! own bounds; output goes to a sink that refuses more than [`MAX_OUTPUT`] bytes, so a hostile
//! `cat` of a huge hole ends. Errors are the expected outcome of most inputs; only a panic, a
//! hang or unbounded memory is a finding.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use super::choose::{choose, Wanted};
use super::open::GuestFs;
use crate::disk::BlockDevice;
use crate::error::Result;

/// Most bytes one command may write before its output refuses more.
pub const MAX_OUTPUT: u64 = 64 << 20;

/// Files whose bytes `cat` reads, at most.
const CAT_FILES: usize = 8;

/// A file system image held in memory, read-only.
struct Memory(Vec<u8>);

impl BlockDevice for Memory {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let range = usize::try_from(offset)
            .ok()
            .and_then(|o| Some(o..o.checked_add(buf.len())?))
            .filter(|r| r.end <= self.0.len());
        match range {
            Some(r) => {
                buf.copy_from_slice(&self.0[r]);
                Ok(())
            }
            None => Err(crate::Error::new(
                "<fuzz>",
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            )),
        }
    }
    fn write_at(&self, _: u64, _: &[u8]) -> Result<()> {
        Err(crate::Error::new(
            "<fuzz>",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        ))
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn is_read_only(&self) -> bool {
        true
    }
    fn allocated_bytes(&self) -> Result<u64> {
        Ok(self.0.len() as u64)
    }
    fn seek(&self, _: u64, _: bool) -> Result<Option<u64>> {
        Ok(None)
    }
    fn discard(&self, _: u64, _: u64) -> Result<()> {
        Ok(())
    }
}

/// A writer that takes at most [`MAX_OUTPUT`] bytes, then fails.
#[derive(Default)]
struct Bounded(u64);

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        match self.0 > MAX_OUTPUT {
            true => Err(std::io::Error::other("fuzz output bound reached")),
            false => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `data` as a guest file system: `ls /`, `cat` of some files, `copy-out / -` and `copy-out /`
/// into a new folder under `scratch` (removed after). The first error of opening it, or of
/// the commands, is returned.
pub fn guest_bytes(data: &[u8], scratch: &Path) -> Result<()> {
    let gfs = memory_fs(data)?;
    let root = OsStr::new("/");
    let listed = super::list::ls(
        &gfs,
        root,
        super::list::LsOptions {
            json: true,
            recursive: true,
        },
        &mut Bounded::default(),
    );
    let mut files = Vec::new();
    if let Ok((top, meta)) = gfs.resolve(b"/", false) {
        let _ = gfs.for_each_child(&top, &meta, b"/", |_, child, meta| {
            if files.len() < CAT_FILES && meta.is_file() {
                files.push(child);
            }
            Ok(())
        });
    }
    for f in &files {
        let name = OsStr::from_bytes(f.as_bytes());
        let _ = super::list::cat(&gfs, name, &mut Bounded::default());
    }
    let tar = super::tar::copy_out_tar(&gfs, root, &mut Bounded::default(), false);
    let out = tempfile_dir(scratch)?;
    let copied = super::copy::copy_out(&gfs, root, &out.join("copy"), false);
    let _ = std::fs::remove_dir_all(&out);
    listed?;
    tar?;
    copied.map(|_| ())
}

/// The guest file system on `data` (a file system, a partitioned disk, an LVM2 volume group),
/// chosen as the commands choose it, named `<fuzz>` in errors.
pub(crate) fn memory_fs(data: &[u8]) -> Result<GuestFs> {
    let image = Path::new("<fuzz>");
    let device: Arc<dyn BlockDevice> = Arc::new(Memory(data.to_vec()));
    let volume = choose(&device, Wanted::default(), false).map_err(|e| e.at_image(image))?;
    GuestFs::load(image, volume, None, "")
}

/// A new empty folder under `scratch`, unique to this process and call.
fn tempfile_dir(scratch: &Path) -> Result<std::path::PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = scratch.join(format!("qcowfs-guest-fuzz-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| crate::Error::new(&dir, e))?;
    Ok(dir)
}
