//! Proof against host failures, the crash states' twin: each workload of tests/crash_states (and a
//! discard-heavy one) is recorded once, run again with no fault to count the top layer's host
//! operations, then once per fault state: host operation number k fails with EIO, ENOSPC, a short
//! write or a failed barrier (src/io/fault.rs), k spread evenly over the operations that fault can
//! strike. Each run is judged (verdict.rs): the failure reached the caller, the open disk never
//! served stale bytes, the image reopened holds every byte a successful fsync acknowledged (and
//! each byte nothing acknowledged reads old or new), QEMU reads the same, and `qemu-img check`
//! finds no corruption.
//!
//! The suite runs QCOWFS_FAULT_STATES states (default 60) spread over the workloads by weight;
//! `scripts/fault-states.sh N` runs N. QCOWFS_FAULT_STATES_SEED picks the workloads' data and the
//! sampled operations, QCOWFS_FAULT_STATES_WORKLOADS (comma-separated names) limits the run, and
//! QCOWFS_FAULT_STATES_KEEP=DIR keeps the image of every failed state there. It ends with one line:
//! `N fault states, M failed`.

#[allow(dead_code, unused_imports)] // each harness uses some of the shared helpers
#[path = "../it/common/mod.rs"]
mod common;
#[path = "../crash_states/workloads.rs"]
mod crash_workloads;
mod model;
#[path = "../crash_states/record.rs"]
mod record;
mod replay;
#[path = "../crash_states/states.rs"]
#[allow(dead_code)] // only the recorder's own check (`replay_all`) is used here
mod states;
mod verdict;
mod workloads;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use common::Rng;
use qcowfs::io::fault::{Fault, FaultPlan, HostOp, Struck};
use record::Recording;

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
        Err(_) => default,
    }
}

/// One fault state: the fault, and the number of the operation it strikes among those it can.
#[derive(Debug, Clone, Copy)]
struct State {
    fault: Fault,
    nth: u64,
}

/// How many operations each fault can strike, from the counting run's `seen` (HostOp::ALL order).
fn strikable(seen: [u64; 4], fault: Fault) -> u64 {
    HostOp::ALL
        .iter()
        .zip(seen)
        .filter(|(op, _)| fault.strikes(**op))
        .map(|(_, n)| n)
        .sum()
}

/// `budget` states shared between the faults (evenly, a fault with fewer operations than its
/// share giving the rest to the others), each fault's operations sampled evenly from a random
/// phase: every operation when there are few.
fn plan(seen: [u64; 4], budget: usize, rng: &mut Rng) -> Vec<State> {
    let sizes = Fault::ALL.map(|f| strikable(seen, f));
    let mut shares = [0u64; 4];
    let mut left = budget as u64;
    loop {
        let open: Vec<usize> = (0..4).filter(|&i| shares[i] < sizes[i]).collect();
        if open.is_empty() || left == 0 {
            break;
        }
        let each = (left / open.len() as u64).max(1);
        for i in open {
            let add = each.min(sizes[i] - shares[i]).min(left);
            shares[i] += add;
            left -= add;
        }
    }
    let mut states = Vec::new();
    for (i, fault) in Fault::ALL.into_iter().enumerate() {
        let (n, count) = (sizes[i], shares[i]);
        if count == 0 {
            continue;
        }
        let phase = rng.below(n);
        states.extend((0..count).map(|j| State {
            fault,
            nth: (j * n + phase) / count,
        }));
    }
    states
}

/// `FAULT:N` (as the failure lines name a state), e.g. `short-write:17`.
fn parse_state(text: &str) -> State {
    let (name, nth) = text
        .split_once(':')
        .unwrap_or_else(|| panic!("QCOWFS_FAULT_STATES_ONLY={text}: not FAULT:N"));
    let fault = Fault::ALL
        .into_iter()
        .find(|f| f.name() == name)
        .unwrap_or_else(|| panic!("QCOWFS_FAULT_STATES_ONLY={text}: no fault {name}"));
    let nth = nth
        .parse()
        .unwrap_or_else(|_| panic!("QCOWFS_FAULT_STATES_ONLY={text}: {nth} is not a number"));
    State { fault, nth }
}

struct Failure {
    workload: &'static str,
    /// None: the counting run, with no fault.
    state: Option<State>,
    struck: Option<(Struck, Option<usize>)>,
    problems: Vec<String>,
}

/// Run one state of `rec` and judge it; the image is kept in QCOWFS_FAULT_STATES_KEEP when it
/// failed, then removed.
fn one(rec: &Recording, dir: &Path, plan: &FaultPlan, label: &str) -> (replay::Run, Vec<String>) {
    let path = dir.join(format!("{}.fault", rec.name));
    let run = replay::run(rec, &path, plan);
    let problems = verdict::judge(rec, &run);
    if let (false, Ok(keep)) = (
        problems.is_empty(),
        std::env::var("QCOWFS_FAULT_STATES_KEEP"),
    ) {
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::copy(
            &path,
            Path::new(&keep).join(format!("{}-{label}.qcow2", rec.name)),
        );
    }
    let _ = std::fs::remove_file(&path);
    (run, problems)
}

#[test]
fn every_host_failure_is_reported_and_loses_nothing_acknowledged() {
    let total = env_number("QCOWFS_FAULT_STATES", 60) as usize;
    let seed = env_number("QCOWFS_FAULT_STATES_SEED", 1);
    let only = std::env::var("QCOWFS_FAULT_STATES_WORKLOADS").unwrap_or_default();
    let chosen: Vec<&crash_workloads::Spec> = workloads::all()
        .into_iter()
        .filter(|s| match only.is_empty() {
            true => s.suite,
            false => only.split(',').any(|n| n == s.name),
        })
        .collect();
    assert!(
        !chosen.is_empty(),
        "QCOWFS_FAULT_STATES_WORKLOADS={only}: no such workload"
    );
    let pick = std::env::var("QCOWFS_FAULT_STATES_ONLY")
        .ok()
        .map(|v| parse_state(&v));
    let weights: u64 = chosen.iter().map(|s| s.weight).sum();
    let dir = common::workdir();
    let next = AtomicUsize::new(0);
    let checked = AtomicUsize::new(0);
    // States a workload could not give: its budget exceeded every operation of every fault.
    let shortfall = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::<Failure>::new());
    let summary = Mutex::new(Vec::<String>::new());
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(spec) = chosen.get(i) else { break };
                // Whatever is left after rounding goes to the last workload (the first is the
                // slowest); the counting run, itself a state without a fault, is one of each
                // workload's states.
                let mut budget = (total as u64 * spec.weight / weights) as usize;
                if i == chosen.len() - 1 {
                    let all: u64 = chosen
                        .iter()
                        .map(|s| total as u64 * s.weight / weights)
                        .sum();
                    budget += total - all as usize;
                }
                let started = std::time::Instant::now();
                let sub = dir.path().join(spec.name);
                std::fs::create_dir_all(&sub).expect("workload folder");
                let rec = (spec.run)(&sub, seed);
                let counting = FaultPlan::counting();
                let (base, problems) = one(&rec, &sub, &counting, "no-fault");
                let mut failed = 0;
                if !problems.is_empty() {
                    failed += 1;
                    failures.lock().unwrap().push(Failure {
                        workload: spec.name,
                        state: None,
                        struck: None,
                        problems,
                    });
                }
                checked.fetch_add(1, Ordering::Relaxed);
                let mut rng = Rng::new(seed ^ 0xfa17);
                let mut states = plan(base.seen, budget.saturating_sub(1), &mut rng);
                if let Some(pick) = &pick {
                    states = vec![*pick];
                }
                shortfall.fetch_add(
                    budget.saturating_sub(states.len() + 1),
                    Ordering::Relaxed,
                );
                let mut struck = 0;
                for state in &states {
                    let label = format!("{}-{}", state.fault.name(), state.nth);
                    let fault = FaultPlan::new(state.fault, state.nth);
                    let (run, problems) = one(&rec, &sub, &fault, &label);
                    struck += run.struck.is_some() as usize;
                    if !problems.is_empty() {
                        failed += 1;
                        failures.lock().unwrap().push(Failure {
                            workload: spec.name,
                            state: Some(*state),
                            struck: run.struck,
                            problems,
                        });
                    }
                    checked.fetch_add(1, Ordering::Relaxed);
                }
                let [w, s, l, p] = base.seen;
                summary.lock().unwrap().push(format!(
                    "  {}: {} guest operations (a seal is one), host operations: {w} writes, {s} barriers, {l} \
                     length changes, {p} holes punched; {} fault states ({struck} struck), {failed} \
                     failed ({:.1} s)",
                    spec.name,
                    base.ops.len(),
                    states.len() + 1,
                    started.elapsed().as_secs_f64()
                ));
                let _ = std::fs::remove_dir_all(&sub);
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    for line in summary.into_inner().unwrap() {
        eprintln!("{line}");
    }
    for f in &failures {
        let what = match f.state {
            Some(s) => format!("{}:{}", s.fault.name(), s.nth),
            None => "no fault".into(),
        };
        let struck = match f.struck {
            Some((s, Some(during))) => format!("; struck {s:?} during guest operation #{during}"),
            Some((s, None)) => format!("; struck {s:?} while opening"),
            None => String::new(),
        };
        eprintln!(
            "FAILED {} {what}{struck} (QCOWFS_FAULT_STATES_SEED={seed}):",
            f.workload
        );
        for p in &f.problems {
            eprintln!("    {p}");
        }
    }
    let n = checked.load(Ordering::Relaxed);
    eprintln!("{n} fault states, {} failed", failures.len());
    let short = shortfall.load(Ordering::Relaxed);
    if short > 0 {
        eprintln!("  ({short} states fewer than asked: some workloads ran every state they have)");
    }
    assert!(
        n + short >= total,
        "only {n} of {total} fault states were checked"
    );
    assert!(
        failures.is_empty(),
        "{n} fault states, {} failed",
        failures.len()
    );
}
