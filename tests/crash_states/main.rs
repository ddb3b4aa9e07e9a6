//! Proof against power loss: record every host write and barrier of real workloads through the I/O
//! seam, build the crash states a power cut could leave (states.rs), and have QEMU check each one.
//! The suite runs QCOWFS_CRASH_STATES states (default 600) spread over the workloads by weight;
//! `scripts/crash-states.sh N` runs N. QCOWFS_CRASH_STATES_SEED picks the workloads' data and the
//! sampled states, QCOWFS_CRASH_STATES_WORKLOADS (comma-separated names) limits the run, and
//! QCOWFS_CRASH_STATES_KEEP=DIR keeps the image of every failed state there (a recording depends a
//! little on thread timing, so a seed replays the same workload but not always the same log).
//! It ends with one line: `N crash states, M failed`.

#[allow(dead_code, unused_imports)] // each harness uses some of the shared helpers
#[path = "../it/common/mod.rs"]
mod common;
mod record;
mod states;
mod workloads;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use common::Rng;
use qcowfs::io::HostEvent;
use record::Recording;
use states::{CrashState, Fate};

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
        Err(_) => default,
    }
}

/// The states to check for one recording, in epoch order: every epoch that writes the header,
/// enumerated (nothing kept, all kept, two samples); then every barrier's prefix (an epoch with all
/// its writes kept), evenly spaced when the budget is smaller; then epochs drawn at random, each
/// with nothing kept or a sampled subset.
fn plan(rec: &Recording, budget: usize, seed: u64) -> Vec<CrashState> {
    let events = &rec.events;
    // Epochs without a write make the same state as the one before.
    let epochs: Vec<(usize, usize)> = states::epochs(events)
        .into_iter()
        .filter(|&(start, end)| {
            events[start..end].iter().any(|e| {
                matches!(
                    e,
                    HostEvent::Write { .. } | HostEvent::Punch { .. } | HostEvent::SetLen(_)
                )
            })
        })
        .collect();
    let cluster = 1u64 << common::read_be_u32(&rec.initial, 20);
    let mut rng = Rng::new(seed);
    let mut plan = Vec::new();
    let whole = |(start, end): (usize, usize), fate: Fate| CrashState {
        epoch_start: start,
        crash_at: end,
        fate,
    };
    let sampled = |rng: &mut Rng, (start, end): (usize, usize)| CrashState {
        epoch_start: start,
        crash_at: if end > start && rng.below(2) == 0 {
            start + 1 + rng.below((end - start) as u64) as usize
        } else {
            end
        },
        fate: Fate::Sampled(rng.next_u64()),
    };
    for &epoch in epochs
        .iter()
        .filter(|&&e| states::touches_header(events, e, cluster))
    {
        if plan.len() + 4 > budget / 2 {
            break;
        }
        plan.push(whole(epoch, Fate::NoneKept));
        plan.push(whole(epoch, Fate::AllKept));
        plan.push(sampled(&mut rng, epoch));
        plan.push(sampled(&mut rng, epoch));
    }
    let room = (budget - plan.len()) * 2 / 3;
    let every = epochs.len().div_ceil(room.max(1)).max(1);
    for &epoch in epochs.iter().step_by(every) {
        plan.push(whole(epoch, Fate::AllKept));
    }
    let mut turn = 0;
    while plan.len() < budget {
        let epoch = epochs[rng.below(epochs.len() as u64) as usize];
        plan.push(match turn % 4 {
            0 => whole(epoch, Fate::NoneKept),
            _ => sampled(&mut rng, epoch),
        });
        turn += 1;
    }
    plan.truncate(budget);
    plan.sort_by_key(|s| (s.epoch_start, s.crash_at));
    plan
}

struct Failure {
    workload: &'static str,
    state: CrashState,
    message: String,
}

#[test]
fn every_crash_state_opens_checks_clean_and_keeps_what_was_fsynced() {
    let total = env_number("QCOWFS_CRASH_STATES", 600) as usize;
    let seed = env_number("QCOWFS_CRASH_STATES_SEED", 1);
    let only = std::env::var("QCOWFS_CRASH_STATES_WORKLOADS").unwrap_or_default();
    let chosen: Vec<&workloads::Spec> = workloads::ALL
        .iter()
        .filter(|s| match only.is_empty() {
            true => s.suite,
            false => only.split(',').any(|n| n == s.name),
        })
        .collect();
    assert!(
        !chosen.is_empty(),
        "QCOWFS_CRASH_STATES_WORKLOADS={only}: no such workload"
    );
    let weights: u64 = chosen.iter().map(|s| s.weight).sum();
    let dir = common::workdir();
    let next = AtomicUsize::new(0);
    let checked = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::<Failure>::new());
    let summary = Mutex::new(Vec::<String>::new());
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(spec) = chosen.get(i) else { break };
                // Whatever is left after rounding goes to the first workload.
                let mut budget = (total as u64 * spec.weight / weights) as usize;
                if i == 0 {
                    let all: u64 = chosen
                        .iter()
                        .map(|s| total as u64 * s.weight / weights)
                        .sum();
                    budget += total - all as usize;
                }
                let sub = dir.path().join(spec.name);
                std::fs::create_dir_all(&sub).expect("workload folder");
                let rec = (spec.run)(&sub, seed);
                let epochs = states::epochs(&rec.events).len();
                let plan = plan(&rec, budget, seed ^ 0x5eed);
                let mut prefix = std::fs::read(&rec.initial).expect("read the initial image");
                let mut prefix_at = 0;
                let mut failed = 0;
                for state in &plan {
                    states::advance_prefix(&rec, &mut prefix, &mut prefix_at, state.epoch_start);
                    let file = states::build(&rec, &prefix, state);
                    if let Err(message) = states::check(&rec, &file, state, &sub) {
                        failed += 1;
                        failures.lock().unwrap().push(Failure {
                            workload: spec.name,
                            state: *state,
                            message,
                        });
                    }
                    checked.fetch_add(1, Ordering::Relaxed);
                }
                summary.lock().unwrap().push(format!(
                    "  {}: {} host events, {epochs} barriers, {} guest operations, {} states, {failed} failed",
                    spec.name,
                    rec.events.len(),
                    rec.ops.len(),
                    plan.len()
                ));
                let _ = std::fs::remove_dir_all(&sub);
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    for line in summary.into_inner().unwrap() {
        eprintln!("{line}");
    }
    for f in failures.iter().take(10) {
        eprintln!(
            "FAILED {} {:?} (QCOWFS_CRASH_STATES_SEED={seed}): {}",
            f.workload, f.state, f.message
        );
    }
    let n = checked.load(Ordering::Relaxed);
    eprintln!("{n} crash states, {} failed", failures.len());
    assert!(n >= total, "only {n} of {total} crash states were checked");
    assert!(
        failures.is_empty(),
        "{n} crash states, {} failed",
        failures.len()
    );
}
