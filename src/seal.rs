//! `qcowfs seal`: copy every guest cluster a backing layer provides up into the (encrypted) top image,
//! through the normal write path, then drop the backing file from the header. The result is one
//! self-contained image; a crash before the header change leaves a consistent image that still has
//! its backing file (at most leaked clusters), so sealing can simply be run again.

use std::path::Path;

use crate::chain::{Chain, KeyRing, Layer, OpenOptions};
use crate::disk::{BlockDevice, Disk, DiskOptions};
use crate::error::{Error, Problem, Result};

/// Memory for the copy; dirty data is flushed whenever a quarter of it is used.
const CACHE: u64 = 256 << 20;
/// Room kept free beyond the data: new L2 tables and refcount blocks.
const METADATA_SLACK: u64 = 64 << 20;

/// What sealing did.
#[derive(Debug, Default, Clone, Copy)]
pub struct SealReport {
    pub copied_bytes: u64,
    pub clusters: u64,
    /// False when the image had no backing file to begin with.
    pub dropped_backing: bool,
}

/// Seal `image`. `progress` is called with (work done, work total): copying, then reading every
/// copied cluster back to verify it, each counts as half. `open` gives `backing_within` and
/// `record`; the image is always opened for writing, with locks and keys.
pub fn seal(
    image: &Path,
    keys: &KeyRing,
    open: OpenOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<SealReport> {
    let chain = Chain::open(
        image,
        keys,
        OpenOptions {
            writable: true,
            force_share: false,
            without_keys: false,
            ..open
        },
    )?;
    if chain.layers().len() == 1 {
        return Ok(SealReport::default());
    }
    let Layer::Qcow2(top) = chain.top() else {
        return Err(Error::new(
            image,
            Problem::Usage("only a qcow2 image can be sealed".into()),
        ));
    };
    // Snapshots may read from the backing file too; sealing would silently change them.
    if !top.snapshots().is_empty() {
        return Err(Error::new(
            image,
            Problem::Usage(format!(
                "the image has {} internal snapshot(s) that may read from the backing file; delete them first (qemu-img snapshot -d)",
                top.snapshots().len()
            )),
        ));
    }
    let cs = top.layout().cluster_size();
    let plan = clusters_from_below(&chain, cs)?;
    let total = plan.len() as u64 * cs;
    check_room(image, total + METADATA_SLACK)?;
    let disk = Disk::new(
        chain,
        DiskOptions {
            cache_size: CACHE,
            read_only: false,
        },
    );
    let size = disk.size();
    let mut buf = vec![0u8; cs as usize];
    let mut done = 0;
    for &guest in &plan {
        let len = cs.min(size - guest) as usize;
        disk.read_at(guest, &mut buf[..len])?;
        disk.write_at(guest, &buf[..len])?;
        done += cs;
        progress(done, 2 * total);
    }
    disk.flush()?;
    if !clusters_from_below(disk.chain(), cs)?.is_empty() {
        return Err(Error::new(
            image,
            Problem::Usage(
                "some clusters still come from the backing file; nothing was changed in the header"
                    .into(),
            ),
        ));
    }
    verify_copy(disk.chain(), &plan, cs, progress)?;
    if let Layer::Qcow2(top) = disk.chain().top() {
        top.drop_backing_file()?;
    }
    Ok(SealReport {
        copied_bytes: total,
        clusters: plan.len() as u64,
        dropped_backing: true,
    })
}

/// Guest offsets of the top-layer clusters that read (in part) from a backing layer's data.
fn clusters_from_below(chain: &Chain, cs: u64) -> Result<Vec<u64>> {
    let size = chain.size();
    let mut out = Vec::new();
    let mut at = 0;
    while at < size {
        let (provider, n) = chain.provider(at, size - at)?;
        if matches!(provider, Some(level) if level > 0) {
            let first = at / cs * cs;
            let last = (at + n - 1) / cs * cs;
            let mut c = first;
            while c <= last {
                if out.last() != Some(&c) {
                    out.push(c);
                }
                c += cs;
            }
        }
        at += n;
    }
    Ok(out)
}

/// Before the backing file is dropped: every copied cluster, read back from the image file alone
/// (a read that would fall through to a backing layer fails), equals what the backing layers hold.
/// A mismatch leaves the header untouched.
fn verify_copy(chain: &Chain, plan: &[u64], cs: u64, progress: &dyn Fn(u64, u64)) -> Result<()> {
    let Layer::Qcow2(top) = chain.top() else {
        return Ok(());
    };
    let path = top.path();
    let still_below = |_: u64, _: &mut [u8]| -> Result<()> {
        Err(Error::new(
            path,
            Problem::Usage(
                "a copied cluster still reads from the backing file; nothing was changed in the header"
                    .into(),
            ),
        ))
    };
    let size = chain.size();
    let total = plan.len() as u64 * cs;
    let mut ours = vec![0u8; cs as usize];
    let mut theirs = vec![0u8; cs as usize];
    for (i, &guest) in plan.iter().enumerate() {
        let len = cs.min(size - guest) as usize;
        // Whole sectors from the image (the cipher's unit); the disk's size may end inside one.
        let sectors = len.div_ceil(512) * 512;
        let ours = &mut ours[..sectors.min(cs as usize)];
        top.read(guest, ours, &still_below)?;
        chain.read_level(1, guest, &mut theirs[..len])?;
        if ours[..len] != theirs[..len] {
            return Err(Error::new(
                path,
                Problem::Usage(format!(
                    "verification failed: guest bytes at {guest:#x} differ from the backing file after \
                     copying; nothing was changed in the header"
                )),
            ));
        }
        progress(total + (i as u64 + 1) * cs, 2 * total);
    }
    Ok(())
}

/// Is there room for `need` more bytes where the image lives?
fn check_room(image: &Path, need: u64) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let dir = image
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| Error::new(dir, Problem::Usage("path contains a NUL byte".into())))?;
    // SAFETY: statvfs is plain old data; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::new(dir, std::io::Error::last_os_error()));
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    if free < need {
        return Err(Error::new(
            dir,
            Problem::Usage(format!(
                "not enough free space to seal: {} needed, {} free",
                crate::size::human(need),
                crate::size::human(free)
            )),
        ));
    }
    Ok(())
}
