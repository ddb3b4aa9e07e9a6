//! `qcowfs seal`: copy every guest cluster a backing layer provides up into the (encrypted) top image,
//! through the normal write path, then drop the backing file from the header. The result is one
//! self-contained image; a crash before the header change leaves a consistent image that still has
//! its backing file (at most leaked clusters), so sealing can simply be run again.
//!
//! # Clusters that read as zeros stay unallocated
//!
//! A cluster whose bytes, as the guest reads them through the whole chain, are all zero is not
//! written (ext4's journal and inode tables in a nova base are zeros the raw file still stores).
//! Such a cluster reads the same at every moment, so skipping it changes neither the guest view
//! nor the crash-safety argument above:
//!
//! - before the header change its top-layer L2 entry sends the read down the chain, which
//!   yields zeros (that is how it was chosen); after the change, a qcow2 image without a backing
//!   file reads an unallocated cluster (or subcluster) as zeros — in QEMU and in qcowfs alike. A
//!   crash in between leaves one of those two states, both all zeros; nothing was written for it,
//!   so nothing can leak or tear.
//! - **more than two layers**: the zero test is on the bytes read through every layer below the
//!   top (a middle layer's zero cluster over a base's data reads zeros, and so does the sealed
//!   image), never on one layer's stored bytes alone.
//! - **partially allocated clusters** (extended L2): a planned cluster may hold subclusters of
//!   its own. It is skipped only if those read zeros too; they stay as they are, and the
//!   subclusters that read from below become "unallocated, no backing file": zeros. Verification
//!   compares exactly the ranges the top sent down the chain with what the chain holds there.
//! - **compressed and zero-flagged clusters** of the top (and zero subclusters) are never
//!   planned: the top provides all of their bytes itself (a compressed cluster covers all its
//!   subclusters), so dropping the backing file cannot change them, zero-filled or not.
//! - **internal snapshots** of the top are refused before anything is read: their L1 tables may
//!   send reads to the backing file where the active one does not, so dropping it would change
//!   them, zeros or not. Without snapshots the active L1 table is the only one that reads it.
//!
//! The zero test runs on the decrypted guest bytes, before encryption (an encrypted zero cluster
//! is noise, and comparing it would be meaningless).

use std::path::Path;

use crate::chain::{Chain, KeyRing, OpenOptions};
use crate::disk::{BlockDevice, Disk, DiskOptions};
use crate::error::{Error, Problem, Result};
use crate::keys::check::{KeyCheck, KeyPolicy};
use crate::qcow2::{ClusterSource, Qcow2Image};

/// Memory for the copy; dirty data is stored whenever a quarter of it is used. With the metadata
/// budget below, a seal peaks near 45 MiB whatever the image size (a 256 MiB cache made it 268
/// MiB for a 10% faster copy of 1 GiB; qemu-img convert of the same chain takes longer still).
const CACHE: u64 = 32 << 20;
/// Memory for the chain's metadata (L2 tables, refcount blocks), all layers together: a seal
/// walks the disk once, so a few tables at a time serve it.
const METADATA: u64 = 8 << 20;
/// Room kept free beyond the data: new L2 tables and refcount blocks.
const METADATA_SLACK: u64 = 64 << 20;

/// What sealing did.
#[derive(Debug, Default, Clone, Copy)]
pub struct SealReport {
    /// Bytes written into the image: `clusters` whole clusters.
    pub copied_bytes: u64,
    pub clusters: u64,
    /// Clusters that read from the backing chain as all zeros, left unallocated.
    pub zero_clusters: u64,
    /// False when the image had no backing file to begin with.
    pub dropped_backing: bool,
}

/// Seal `image`. `progress` is called with (work done, work total): copying, then reading every
/// copied cluster back to verify it, each counts as half; when it returns false (Ctrl-C) the seal
/// stops there, what it copied made durable and the backing file kept, as an error saying so. `open` gives `backing_within` and
/// `record`; the image is always opened for writing, with locks and keys.
/// Every key of the chain is checked first (`keycheck`): what is copied up is read with the
/// backing layers' keys and written with the image's, so a wrong one would leave an image that
/// no key reads, with its backing file gone. An image whose key cannot be verified (legacy AES,
/// no data yet) is refused unless `policy` lets it through.
pub fn seal(
    image: &Path,
    keys: &KeyRing,
    open: OpenOptions,
    policy: KeyPolicy,
    progress: &dyn Fn(u64, u64) -> bool,
) -> Result<SealReport> {
    let chain = Chain::open(
        image,
        keys,
        OpenOptions {
            writable: true,
            force_share: false,
            without_keys: false,
            keep_rejected_keys: false,
            ..open
        },
    )?;
    KeyCheck::of(&chain)?.enforce_for_writing(policy)?;
    crate::qcow2::share_metadata_budget(
        chain.layers().iter().filter_map(|l| match l {
            crate::chain::Layer::Qcow2(q) => Some(&**q),
            crate::chain::Layer::Raw(_) => None,
        }),
        METADATA,
    );
    if chain.layers().len() == 1 {
        return Ok(SealReport::default());
    }
    let top = chain.image();
    // Snapshots may read from the backing file too; sealing would silently change them.
    if !top.snapshots().is_empty() {
        return Err(Error::new(
            image,
            Problem::Refused(format!(
                "the image has {} internal snapshot(s) that may read from the backing file; delete them first (qemu-img snapshot -d)",
                top.snapshots().len()
            )),
        ));
    }
    let cs = top.layout().cluster_size();
    let plan = Plan::of(&chain, top, cs)?;
    let total = plan.clusters.len() as u64 * cs;
    // Which clusters read as zeros is known only once they are read: room for all of them.
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
    // Parallel to `plan.clusters`: true where the cluster read as zeros and was not written.
    let mut skipped = Vec::with_capacity(plan.clusters.len());
    for &guest in &plan.clusters {
        let len = cs.min(size - guest) as usize;
        disk.read_at(guest, &mut buf[..len])?;
        let zeros = is_zero(&buf[..len]);
        if !zeros {
            disk.write_at(guest, &buf[..len])?;
        }
        skipped.push(zeros);
        done += cs;
        if !progress(done, 2 * total) {
            disk.flush()?;
            return Err(interrupted(image));
        }
    }
    disk.flush()?;
    let zero_clusters = skipped.iter().filter(|&&s| s).count() as u64;
    let top = disk.chain().image();
    let left = Plan::of(disk.chain(), top, cs)?.clusters;
    if !left
        .iter()
        .all(|c| plan.clusters.binary_search(c).is_ok_and(|i| skipped[i]))
    {
        return Err(Error::new(
            image,
            Problem::Refused(
                "some clusters still come from the backing file; nothing was changed in the header"
                    .into(),
            ),
        ));
    }
    verify_copy(disk.chain(), top, &plan, &skipped, cs, progress)?;
    top.drop_backing_file()?;
    let clusters = plan.clusters.len() as u64 - zero_clusters;
    Ok(SealReport {
        copied_bytes: clusters * cs,
        clusters,
        zero_clusters,
        dropped_backing: true,
    })
}

/// Whether every byte is zero (by 4 KiB pieces the compiler can vectorize).
fn is_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(4096)
        .all(|piece| piece.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// What the top layer takes from below, before anything is copied.
struct Plan {
    /// Guest offsets of the top-layer clusters that read (in part) a backing layer's data, in
    /// order: the clusters to copy.
    clusters: Vec<u64>,
    /// Guest byte ranges `(start, end)` the top layer sends down the chain (unallocated clusters
    /// or, with extended L2, subclusters), in order and merged: what verification compares with
    /// the backing layers. The rest of a planned cluster is the top's own.
    below: Vec<(u64, u64)>,
}

impl Plan {
    fn of(chain: &Chain, top: &Qcow2Image, cs: u64) -> Result<Plan> {
        let size = chain.size();
        let mut plan = Plan {
            clusters: Vec::new(),
            below: Vec::new(),
        };
        let mut at = 0;
        while at < size {
            let (source, n) = top.map(at, size - at)?;
            if matches!(source, ClusterSource::Backing) {
                match plan.below.last_mut() {
                    Some((_, end)) if *end == at => *end = at + n,
                    _ => plan.below.push((at, at + n)),
                }
                plan.add_data_below(chain, at, n, cs)?;
            }
            at += n;
        }
        Ok(plan)
    }

    /// Add the clusters of `[at, at + n)` (a range the top sends down) where a layer below holds
    /// data.
    fn add_data_below(&mut self, chain: &Chain, at: u64, n: u64, cs: u64) -> Result<()> {
        let end = at + n;
        let mut at = at;
        while at < end {
            let (provider, n) = chain.provider(at, end - at)?;
            if matches!(provider, Some(level) if level > 0) {
                let mut c = at / cs * cs;
                while c < at + n {
                    if self.clusters.last() != Some(&c) {
                        self.clusters.push(c);
                    }
                    c += cs;
                }
            }
            at += n;
        }
        Ok(())
    }
}

/// Before the backing file is dropped: every planned cluster, read back from the image file alone
/// (for a copied cluster, a read that would fall through to a backing layer fails; a skipped one
/// reads zeros there, as it will without a backing file), equals what the backing layers hold
/// wherever the top sent reads down the chain. A mismatch leaves the header untouched.
fn verify_copy(
    chain: &Chain,
    top: &Qcow2Image,
    plan: &Plan,
    skipped: &[bool],
    cs: u64,
    progress: &dyn Fn(u64, u64) -> bool,
) -> Result<()> {
    let path = top.path();
    let still_below = |_: u64, _: &mut [u8]| -> Result<()> {
        Err(Error::new(
            path,
            Problem::Refused(
                "a copied cluster still reads from the backing file; nothing was changed in the header"
                    .into(),
            ),
        ))
    };
    let no_backing = |_: u64, b: &mut [u8]| -> Result<()> {
        b.fill(0);
        Ok(())
    };
    let size = chain.size();
    let total = plan.clusters.len() as u64 * cs;
    let mut ours = vec![0u8; cs as usize];
    let mut theirs = vec![0u8; cs as usize];
    let mut ranges = plan.below.iter().peekable();
    for (i, (&guest, &zeros)) in plan.clusters.iter().zip(skipped).enumerate() {
        let len = cs.min(size - guest) as usize;
        // Whole sectors from the image (the cipher's unit); the disk's size may end inside one.
        let sectors = len.div_ceil(512) * 512;
        let ours = &mut ours[..sectors.min(cs as usize)];
        if zeros {
            top.read(guest, ours, &no_backing)?;
        } else {
            top.read(guest, ours, &still_below)?;
        }
        chain.read_level(1, guest, &mut theirs[..len])?;
        let end = guest + len as u64;
        while ranges.next_if(|&&(_, e)| e <= guest).is_some() {}
        for &(s, e) in ranges.clone().take_while(|&&(s, _)| s < end) {
            let a = (s.max(guest) - guest) as usize;
            let b = (e.min(end) - guest) as usize;
            if ours[a..b] != theirs[a..b] {
                return Err(Error::new(
                    path,
                    Problem::Refused(format!(
                        "verification failed: guest bytes at {:#x} differ from the backing file after \
                         copying; nothing was changed in the header",
                        guest + a as u64
                    )),
                ));
            }
        }
        if !progress(total + (i as u64 + 1) * cs, 2 * total) {
            return Err(interrupted(path));
        }
    }
    Ok(())
}

/// The error of a seal stopped on request: nothing lost, nothing half done.
fn interrupted(image: &Path) -> Error {
    Error::new(
        image,
        Problem::Interrupted(
            "seal interrupted: what was copied is in the image, which still has its backing \
             file and reads as before; run qcowfs seal again to finish"
                .into(),
        ),
    )
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
            Problem::Io(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!(
                    "not enough free space to seal: {} needed, {} free",
                    crate::cmd::size::human(need),
                    crate::cmd::size::human(free)
                ),
            )),
        ));
    }
    Ok(())
}
