//! Run a recorded workload again on a fresh copy of its image, on the real write path (chain, disk
//! cache, flush writer, qcow2 commit), with a fault plan wired into the top layer's host I/O: the
//! guest operations are issued in order and what each returns is kept. Nothing stops at an error:
//! the rest of the workload runs against the disk as the failure left it. The open disk is read
//! whole right after the first error and again at the end, and must show what the operations that
//! returned success wrote (model.rs): serving stale bytes is a failure even before any reopen.

use std::path::Path;

use qcowfs::chain::{Chain, OpenOptions};
use qcowfs::disk::{BlockDevice, Disk, DiskOptions};
use qcowfs::io::fault::{FaultPlan, HostOp, Struck};

use crate::common::{keys_of, Image, MIB};
use crate::model::Expectation;
use crate::record::{GuestOp, Recording};

/// The disk cache of every run: small, so write-back runs during the workload, not only at fsync
/// (as in the recordings of tests/crash_states).
pub const CACHE: u64 = 2 * MIB;

/// What one run did.
pub struct Run {
    /// The image the run changed (a copy of the recording's initial image, same chain).
    pub image: Image,
    /// What each guest operation returned, in order (a seal is one operation: `GuestOp::Durable`).
    pub results: Vec<Result<(), String>>,
    /// The guest operations issued (the recording's, or the seal's one).
    pub ops: Vec<GuestOp>,
    /// Where the fault struck, and during which guest operation (None: opening the image).
    pub struck: Option<(Struck, Option<usize>)>,
    /// What was wrong with the open disk's contents (check 4), if anything.
    pub live: Vec<String>,
    /// Host operations the run performed, by kind (`HostOp::ALL` order).
    pub seen: [u64; 4],
}

/// Run `rec`'s guest operations (or its seal) on a copy of its initial image at `path`.
pub fn run(rec: &Recording, path: &Path, plan: &FaultPlan) -> Run {
    std::fs::copy(&rec.initial, path).expect("copy the initial image");
    let image = Image {
        path: path.to_path_buf(),
        ..rec.image.clone()
    };
    let mut run = Run {
        image,
        results: Vec::new(),
        ops: rec.ops.clone(),
        struck: None,
        live: Vec::new(),
        seen: [0; 4],
    };
    let open = OpenOptions {
        writable: true,
        faults: Some(plan.clone()),
        ..Default::default()
    };
    if rec.ops.is_empty() {
        // The seal workload: its one operation is the seal itself.
        let sealed = qcowfs::cmd::seal::seal(
            path,
            &keys_of(&run.image),
            open,
            Default::default(),
            &|_, _| true,
        );
        run.ops = vec![GuestOp::Durable];
        run.results
            .push(sealed.map(|_| ()).map_err(|e| e.to_string()));
        run.struck = plan.struck().map(|s| (s, Some(0)));
    } else {
        match Chain::open(path, &keys_of(&run.image), open) {
            Ok(chain) => drive(rec, &mut run, chain, plan),
            Err(e) => {
                run.results = vec![Err(format!("open: {e}"))];
                run.ops = vec![GuestOp::Durable];
                run.struck = plan.struck().map(|s| (s, None));
            }
        }
    }
    run.seen = HostOp::ALL.map(|op| plan.seen(op));
    run
}

fn drive(rec: &Recording, run: &mut Run, chain: Chain, plan: &FaultPlan) {
    let disk = Disk::new(
        chain,
        DiskOptions {
            cache_size: CACHE,
            read_only: false,
        },
    );
    for (i, op) in rec.ops.iter().enumerate() {
        let result = match op {
            GuestOp::Write { offset, data } => disk.write_at(*offset, data),
            GuestOp::Discard { offset, len } => disk.discard(*offset, *len),
            GuestOp::Durable => disk.flush(),
        };
        let failed = result.is_err();
        run.results.push(result.map_err(|e| e.to_string()));
        if run.struck.is_none() {
            run.struck = plan.struck().map(|s| (s, Some(i)));
        }
        if failed && run.results.iter().filter(|r| r.is_err()).count() == 1 {
            check_live(rec, run, &disk, "right after the first error");
        }
    }
    check_live(rec, run, &disk, "at the end of the workload");
}

/// Read the whole open disk and compare it with what the operations so far must leave.
fn check_live(rec: &Recording, run: &mut Run, disk: &Disk, when: &str) {
    let mut bytes = vec![0u8; disk.size() as usize];
    let n = run.results.len();
    let problem = match disk.read_at(0, &mut bytes) {
        Err(e) => Some(format!("reading the open disk failed: {e}")),
        Ok(()) => Expectation::live(&rec.initial_guest, &rec.ops, &run.results)
            .check(&bytes)
            .err(),
    };
    if let Some(p) = problem {
        run.live
            .push(format!("{when} (after guest operation #{}): {p}", n - 1));
    }
}
