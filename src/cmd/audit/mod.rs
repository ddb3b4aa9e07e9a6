//! `qcowfs audit`: every instance disk of a host (nova's `DIR/UUID/disk` and its `disk.local`,
//! `disk.swap`, `disk.eph*`; every qcow2 of a CloudStack KVM pool), its encryption, its backing
//! chain and the share of its guest data that is not encrypted; then every base image (any layer
//! below a disk) with the instances relying on it and the plaintext it holds. Read-only, no
//! passphrase, no locks: a running VM's disk is audited and marked in use.
//!
//! `discover` finds the disks; `scan` measures each one with `info`'s coverage computation and
//! QEMU's lock probe; `report` prints the two tables and the summary, or JSON Lines. One bad disk
//! is a row saying why, never the end of the audit; the exit status is 1 when any disk could not
//! be audited (a disk in use is audited).

mod discover;
mod report;
mod scan;

use std::io::Write;
use std::path::PathBuf;

use crate::chain::OpenOptions;
use crate::error::{Error, Problem, Result};

/// Where nova keeps instance folders (`UUID/disk`) and their bases (`_base/`).
pub const NOVA_INSTANCES: &str = "/var/lib/nova/instances";

/// The end of `qcowfs audit --help`.
pub const AFTER_HELP: &str = "\
In each DIR, finds every qcow2 image (by its magic) down to DIR/*/*, and nova's instance disks
whatever they hold: DIR/*/disk, disk.local, disk.swap, disk.eph0... (as nova lays out
/var/lib/nova/instances; DIR/_base is not searched, links inside DIR are not followed). So a
CloudStack KVM primary storage pool (UUID-named volumes and templates in one folder) is audited
as it is. An image that another disk leans on (a template, an older snapshot) is a base, not a
disk. Raw files are not disks: a raw base is found through the disk that names it. An image
file named directly is audited as it is.

For each disk: the encryption of its top layer (none, aes, luks), its guest data and the share
of it that is not encrypted, whether it is in use, and its backing chain. For each base image
(any layer below a disk, by canonical path): how many instances rely on it, how many of those
are encrypted, and the plaintext it holds (the data of an unencrypted base: written extents of
a raw file, space reserved but never written not counted; data clusters of a qcow2 image). The
last line sums it up:
  N of M encrypted instances keep X% of their guest data in plaintext bases
(X over those N instances together).

Example:
  qcowfs audit
  qcowfs audit --json /var/lib/nova/instances > $(hostname).jsonl
  qcowfs audit /mnt/<pool-uuid>

--json prints JSON Lines: one object per line, first one per disk (\"kind\": \"disk\": path,
in_use, encryption, chain, data_bytes, unencrypted_bytes, unencrypted_share,
plaintext_base_bytes; or \"error\"), then one per base (\"kind\": \"base\": path, instances,
encrypted_instances, plaintext_bytes, ...); each names the \"host\", so the files of many hosts
can simply be concatenated.

No passphrase is needed, and no lock is taken: only metadata is read, as `qemu-img info -U`
does, so --force-share (-U) is the default. A disk a running VM holds for writing (QEMU's lock
probe) is audited and marked in use (IN USE yes, \"in_use\": true): its numbers are read as
they are and may be changing. A disk that cannot be audited (not an image, unreadable, its base
gone) gets a row saying why and the others are still audited; the exit status is then 1 (0 when
every disk was audited, in use or not).";

/// What `qcowfs audit` is asked to do.
#[derive(Debug, Default)]
pub struct AuditOptions {
    /// JSON Lines instead of tables.
    pub json: bool,
    /// `-U`: accepted for scripts written before it became the default; the audit never takes
    /// locks.
    pub force_share: bool,
    /// Backing files must lie in these folders (canonical).
    pub backing_within: Vec<PathBuf>,
    /// Folders to search (nova instance folders, storage pools) or image files.
    pub paths: Vec<PathBuf>,
}

/// `qcowfs audit [--json] [DIR|IMAGE...]`.
pub fn run(args: &AuditOptions) -> Result<()> {
    let opts = OpenOptions {
        writable: false,
        // Metadata only, like `qemu-img info -U`: a writer's disk is read and marked in use.
        force_share: true,
        without_keys: true,
        keep_rejected_keys: false,
        backing_within: args.backing_within.clone(),
        record: None,
        faults: None,
    };
    let found = discover::discover(&args.paths);
    for problem in &found.problems {
        eprintln!("qcowfs: {problem}");
    }
    let audit = scan::audit(found.disks, &opts);
    let host = hostname();
    let out = if args.json {
        report::json_lines(&audit, &host)
    } else {
        report::text(&audit, &host, &args.paths)
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| Error::new("<stdout>", e))?;
    let failed = audit.failed();
    let problems = found.problems.len();
    if failed == 0 && problems == 0 {
        return Ok(());
    }
    let mut what = Vec::new();
    if failed > 0 {
        what.push(format!(
            "{failed} of {} disks could not be audited (their rows say why)",
            audit.disks.len()
        ));
    }
    if problems > 0 {
        what.push(format!(
            "{problems} {} could not be searched",
            if problems == 1 { "path" } else { "paths" }
        ));
    }
    Err(Error::new("", Problem::Incomplete(what.join("; "))))
}

/// This machine's name (`gethostname`), so that reports of many hosts can be told apart.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
