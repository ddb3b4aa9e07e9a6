//! Crash states from a recorded log, in the manner of CrashMonkey and ALICE: everything before a
//! barrier reached the disk; of the writes after it (until the next barrier began) a power cut may
//! have kept any subset, in any order, each write possibly torn at a 512-byte sector boundary.
//! Each state is checked by QEMU: the image opens, `qemu-img check` finds no corruption (leaks are
//! allowed), and every byte fsynced before the crash point reads back as written.

use std::path::Path;

use qcowfs::io::HostEvent;

use crate::common::{qemu_check_json, Image, Rng};
use crate::record::{GuestOp, Recording};

const SECTOR: u64 = 512;

/// Which state to build: the barrier it follows, where in the next epoch the power went, and how
/// the writes in between fared.
#[derive(Debug, Clone, Copy)]
pub struct CrashState {
    /// Index into `events` of the first event not known durable (where the last barrier that
    /// returned began, or 0).
    pub epoch_start: usize,
    /// Events [epoch_start, crash_at) were issued before the power went.
    pub crash_at: usize,
    pub fate: Fate,
}

#[derive(Debug, Clone, Copy)]
pub enum Fate {
    /// None of the epoch's writes arrived.
    NoneKept,
    /// All of them arrived whole.
    AllKept,
    /// Each kept, lost or torn, drawn from this seed.
    Sampled(u64),
}

/// The windows a power cut can fall in: (durable end, window end). Events before the durable end
/// are on the disk: it is where the last barrier that returned began (0 before the first). The
/// window reaches to where the next barrier returned: everything issued in it, including during
/// either barrier, may or may not have arrived.
pub fn epochs(events: &[HostEvent]) -> Vec<(usize, usize)> {
    let mut began = std::collections::HashMap::new();
    let mut done = Vec::new(); // (began at, returned at), in the order they returned
    for (i, e) in events.iter().enumerate() {
        match e {
            HostEvent::Barrier(id) => {
                began.insert(*id, i);
            }
            HostEvent::BarrierDone(id) => {
                if let Some(&start) = began.get(id) {
                    done.push((start, i));
                }
            }
            _ => {}
        }
    }
    let mut epochs = Vec::with_capacity(done.len() + 1);
    let mut durable_end = 0;
    for &(start, returned) in &done {
        epochs.push((durable_end, returned));
        durable_end = durable_end.max(start);
    }
    epochs.push((durable_end, events.len()));
    epochs
}

/// Whether an epoch holds a write into the image's first cluster (header fields: the refcount
/// table moving, a backing file dropped, autoclear bits): such epochs are always enumerated.
pub fn touches_header(events: &[HostEvent], (start, end): (usize, usize), cluster: u64) -> bool {
    events[start..end]
        .iter()
        .any(|e| matches!(e, HostEvent::Write { offset, .. } if *offset < cluster))
}

fn apply(file: &mut Vec<u8>, event: &HostEvent) {
    match event {
        HostEvent::Write { offset, data } => write(file, *offset, data),
        HostEvent::Punch { offset, len } => {
            let start = (*offset as usize).min(file.len());
            let end = ((offset + len) as usize).min(file.len());
            file[start..end].fill(0);
        }
        HostEvent::SetLen(len) => file.resize(*len as usize, 0),
        HostEvent::Barrier(_) | HostEvent::BarrierDone(_) | HostEvent::Mark(_) => {}
    }
}

fn write(file: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if file.len() < end {
        file.resize(end, 0);
    }
    file[offset as usize..end].copy_from_slice(data);
}

/// The initial file with every event applied (the recorder's own check).
pub fn replay_all(rec: &Recording) -> Vec<u8> {
    let mut file = std::fs::read(&rec.initial).expect("read the initial image");
    for e in &rec.events {
        apply(&mut file, e);
    }
    file
}

/// The durable prefix of `state` (events before `epoch_start`), built from `prefix`, which holds
/// the events before `prefix_at` (states come in epoch order, so this only moves forward).
pub fn advance_prefix(rec: &Recording, prefix: &mut Vec<u8>, prefix_at: &mut usize, to: usize) {
    for e in &rec.events[*prefix_at..to] {
        apply(prefix, e);
    }
    *prefix_at = to;
}

/// The file a power cut in `state` leaves, from its durable prefix.
pub fn build(rec: &Recording, prefix: &[u8], state: &CrashState) -> Vec<u8> {
    let mut file = prefix.to_vec();
    let in_flight = &rec.events[state.epoch_start..state.crash_at];
    match state.fate {
        Fate::NoneKept => {}
        Fate::AllKept => in_flight.iter().for_each(|e| apply(&mut file, e)),
        Fate::Sampled(seed) => {
            let mut rng = Rng::new(seed);
            // Writes that reach the disk land in the order issued (the page cache holds the last
            // version of each page), so a kept subset is applied in log order. Three ways to draw
            // it: each write kept, lost or torn at random; the later writes kept and the earlier
            // lost (the device reordered them: what a missing barrier exposes); all but one kept.
            let writes = in_flight.len() as u64;
            let (mode, cut) = (rng.below(3), rng.below(writes.max(1)));
            for (i, e) in in_flight.iter().enumerate() {
                let keep = match mode {
                    0 => rng.below(4),
                    1 if (i as u64) < cut => 0,
                    1 => 2 + rng.below(2),
                    _ if i as u64 == cut => 0,
                    _ => 3,
                };
                match (e, keep) {
                    (_, 0) => {}
                    (HostEvent::Write { offset, data }, 1) if data.len() as u64 > SECTOR => {
                        torn(&mut file, *offset, data, &mut rng)
                    }
                    _ => apply(&mut file, e),
                }
            }
        }
    }
    file
}

/// Some of the write's sectors (cut at absolute 512-byte boundaries) arrive, the others do not.
fn torn(file: &mut Vec<u8>, offset: u64, data: &[u8], rng: &mut Rng) {
    let end = offset + data.len() as u64;
    let mut at = offset;
    while at < end {
        let next = ((at / SECTOR + 1) * SECTOR).min(end);
        if rng.below(2) == 0 {
            let piece = &data[(at - offset) as usize..(next - offset) as usize];
            write(file, at, piece);
        }
        at = next;
    }
}

/// What the guest may read after a crash at `crash_at`: the bytes as of the last fsync that
/// returned before it, and the operations issued after that fsync (any of which may show).
struct Expectation<'r> {
    durable: Vec<u8>,
    maybe: Vec<&'r GuestOp>,
    /// Guest operations whose fsync had returned.
    fsynced_ops: usize,
}

fn expectation<'r>(rec: &'r Recording, crash_at: usize) -> Expectation<'r> {
    let issued = rec.events[..crash_at]
        .iter()
        .filter_map(|e| match e {
            HostEvent::Mark(id) => Some(*id as usize + 1),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let fsynced = rec.ops[..issued]
        .iter()
        .rposition(|op| matches!(op, GuestOp::Durable))
        .map_or(0, |i| i + 1);
    let mut durable = rec.initial_guest.clone();
    for op in &rec.ops[..fsynced] {
        match op {
            GuestOp::Write { offset, data } => write(&mut durable, *offset, data),
            GuestOp::Discard { offset, len } => {
                durable[*offset as usize..(offset + len) as usize].fill(0)
            }
            GuestOp::Durable => {}
        }
    }
    Expectation {
        durable,
        maybe: rec.ops[fsynced..issued].iter().collect(),
        fsynced_ops: fsynced,
    }
}

/// Whether `byte` at guest offset `at` is something an operation after the last fsync put there.
fn maybe_holds(maybe: &[&GuestOp], at: u64, byte: u8) -> bool {
    maybe.iter().any(|op| match op {
        GuestOp::Write { offset, data } => {
            at >= *offset && at < offset + data.len() as u64 && data[(at - offset) as usize] == byte
        }
        GuestOp::Discard { offset, len } => at >= *offset && at < offset + len && byte == 0,
        GuestOp::Durable => false,
    })
}

/// Check one crash state with QEMU; Err says what is wrong.
pub fn check(rec: &Recording, file: &[u8], state: &CrashState, dir: &Path) -> Result<(), String> {
    let path = dir.join(format!("{}.crash", rec.name));
    std::fs::write(&path, file).map_err(|e| format!("write crash state: {e}"))?;
    let image = Image {
        path: path.clone(),
        ..rec.image.clone()
    };
    let result = check_image(rec, &image, state, dir);
    // QCOWFS_CRASH_STATES_KEEP=DIR keeps each failed state's image there, named after its state.
    if let (Err(_), Ok(keep)) = (&result, std::env::var("QCOWFS_CRASH_STATES_KEEP")) {
        let name = format!(
            "{}-{}-{}.qcow2",
            rec.name, state.epoch_start, state.crash_at
        );
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::copy(&path, Path::new(&keep).join(name));
    }
    let _ = std::fs::remove_file(&path);
    result
}

fn check_image(
    rec: &Recording,
    image: &Image,
    state: &CrashState,
    dir: &Path,
) -> Result<(), String> {
    let (r, v) = qemu_check_json(image, &[]);
    let corruptions = v.get("corruptions").and_then(|c| c.as_u64()).unwrap_or(0);
    let errors = v.get("check-errors").and_then(|c| c.as_u64()).unwrap_or(0);
    // Exit 0: clean; 3: leaked clusters only.
    if corruptions > 0 || errors > 0 || !matches!(r.status.code(), Some(0) | Some(3)) {
        return Err(format!(
            "qemu-img check: {corruptions} corruptions, {errors} check errors, {}:\n{}{}",
            crate::common::describe_status(r.status),
            r.stdout_str(),
            r.stderr
        ));
    }
    let raw = dir.join(format!("{}.raw", rec.name));
    image.convert_raw(&raw);
    let actual = std::fs::read(&raw).map_err(|e| format!("read converted state: {e}"));
    let guest = match (&actual, rec.guest_check) {
        (Ok(_), Some(check)) => check(&raw).map_err(|e| format!("the guest: {e}")),
        _ => Ok(()),
    };
    let _ = std::fs::remove_file(&raw);
    let actual = actual?;
    let want = expectation(rec, state.crash_at);
    if actual.len() != want.durable.len() {
        return Err(format!(
            "the guest reads {} bytes, expected {}",
            actual.len(),
            want.durable.len()
        ));
    }
    for (i, (&a, &d)) in actual.iter().zip(&want.durable).enumerate() {
        if a != d && !maybe_holds(&want.maybe, i as u64, a) {
            return Err(format!(
                "guest byte {i} reads {a:#04x}; after fsync of the first {} guest operations it \
                 must read {d:#04x} (or what one of the {} operations after that fsync wrote)",
                want.fsynced_ops,
                want.maybe.len()
            ));
        }
    }
    guest
}
