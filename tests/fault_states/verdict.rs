//! Judge one run: the failure reached the caller (no flush returned success after a host operation
//! failed and before any error was returned); the open disk served what it must (replay.rs); the
//! image, reopened fresh by qcowfs, holds every byte a successful flush acknowledged, and QEMU
//! reads exactly the same; `qemu-img check` finds no corruption (leaks are allowed).

use qcowfs::chain::{Chain, OpenOptions};
use qcowfs::disk::{BlockDevice, Disk, DiskOptions};
use qcowfs::io::fault::HostOp;

use crate::common::{describe_status, first_difference, keys_of, qemu_check, Image, Leaks};
use crate::model::Expectation;
use crate::record::{GuestOp, Recording};
use crate::replay::{Run, CACHE};

/// Every problem found in `run`, in the order of the checks; empty when it passed.
pub fn judge(rec: &Recording, run: &Run) -> Vec<String> {
    let mut problems = Vec::new();
    problems.extend(reported(run));
    problems.extend(run.live.iter().cloned());
    let reopened = match reopen(run) {
        Ok(bytes) => {
            if let Err(e) =
                Expectation::durable(&rec.initial_guest, &run.ops, &run.results).check(&bytes)
            {
                problems.push(e);
            }
            Some(bytes)
        }
        Err(e) => {
            problems.push(e);
            None
        }
    };
    if let Err(e) = qemu_check(&run.image, &["-U"], Leaks::Allowed, "after the run") {
        problems.push(e);
        return problems;
    }
    let qemu = match qemu_raw(&run.image) {
        Ok(bytes) => bytes,
        Err(e) => {
            problems.push(e);
            return problems;
        }
    };
    match reopened {
        Some(ours) => {
            if let Some(at) = first_difference(&qemu, &ours) {
                problems.push(format!(
                    "QEMU and qcowfs disagree on the reopened image: guest byte {at} reads {:?} \
                     in QEMU, {:?} in qcowfs",
                    qemu.get(at),
                    ours.get(at)
                ));
            }
        }
        None => {
            if let Err(e) =
                Expectation::durable(&rec.initial_guest, &run.ops, &run.results).check(&qemu)
            {
                problems.push(format!("in QEMU: {e}"));
            }
        }
    }
    problems
}

/// `qemu-img convert -U -O raw` of `image`'s chain: the guest as QEMU reads it (without locks, for
/// the reason `reopen` gives).
fn qemu_raw(image: &Image) -> Result<Vec<u8>, String> {
    let raw = image.path.with_extension("raw");
    let (mut args, target) = image.qemu_open_args();
    args.splice(0..0, ["convert".to_string(), "-U".to_string()]);
    args.extend([target, "-O".into(), "raw".into(), raw.display().to_string()]);
    let r = crate::common::run("qemu-img", &args);
    let bytes = match r.status.success() {
        true => std::fs::read(&raw).map_err(|e| format!("read qemu-img convert's output: {e}")),
        false => Err(format!(
            "QEMU cannot read the image ({}): {}\ncommand: {}",
            describe_status(r.status),
            r.stderr,
            r.command
        )),
    };
    let _ = std::fs::remove_file(&raw);
    bytes
}

/// Check 2: once the fault struck, an error reaches the caller no later than the next flush;
/// and no error comes without a fault. A hole that could not be punched is exempt: punching is
/// best effort by design (`HostFile::punch_hole`), the bytes stay and read as before.
fn reported(run: &Run) -> Vec<String> {
    let first_error = run.results.iter().position(Result::is_err);
    let Some((struck, during)) = run.struck else {
        return match first_error {
            Some(i) => vec![format!(
                "guest operation #{i} returned {:?} though no host operation failed",
                run.results[i]
            )],
            None => Vec::new(),
        };
    };
    if let Some(i) = first_error {
        if during.is_some_and(|d| i < d) {
            return vec![format!(
                "guest operation #{i} returned {:?} before any host operation failed",
                run.results[i]
            )];
        }
    }
    if struck.op == HostOp::Punch {
        return Vec::new();
    }
    let from = during.unwrap_or(0);
    let to = first_error.unwrap_or(run.results.len());
    match (from..to).find(|&i| matches!(run.ops[i], GuestOp::Durable)) {
        Some(i) => vec![format!(
            "fsync (guest operation #{i}) returned success though {:?} failed during guest \
             operation #{from} and no error was returned",
            struck
        )],
        None if first_error.is_none() => vec![format!(
            "{struck:?} failed during guest operation #{from} and no operation returned an error"
        )],
        None => Vec::new(),
    }
}

/// The guest as qcowfs reads it after opening the image again from scratch (for writing, so that
/// every check a writable open makes runs too; nothing is written). Without locks, as QEMU's
/// commands here: the other worker's qemu children may hold, between fork and exec, a copy of the
/// descriptor the run just closed, and an OFD lock lives as long as any copy of its descriptor.
fn reopen(run: &Run) -> Result<Vec<u8>, String> {
    let chain = Chain::open(
        &run.image.path,
        &keys_of(&run.image),
        OpenOptions {
            writable: true,
            force_share: true,
            ..Default::default()
        },
    )
    .map_err(|e| format!("the image no longer opens for writing: {e}"))?;
    let disk = Disk::new(
        chain,
        DiskOptions {
            cache_size: CACHE,
            read_only: true,
        },
    );
    let mut bytes = vec![0u8; disk.size() as usize];
    disk.read_at(0, &mut bytes)
        .map_err(|e| format!("reading the reopened image failed: {e}"))?;
    Ok(bytes)
}
