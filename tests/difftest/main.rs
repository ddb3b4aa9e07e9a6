//! The differential random-operation tester: for every configuration of [`config::CONFIGS`], a
//! seeded random mix of writes, reads, fsyncs, hole punches, zeroings, mmap writes, threaded
//! writes, writes through `disk-partN`, partition table rewrites, remounts and seals, applied to
//! a qcowfs mount and to a raw reference; QEMU checks the image after every umount.
//!
//! Bounded for CI (a few operations per configuration); `scripts/difftest.sh SEED OPS [CONFIG]`
//! runs long. Environment:
//! - `QCOWFS_DIFFTEST_SEED` (default 1), `QCOWFS_DIFFTEST_OPS` (default [`CI_OPS`]),
//! - `QCOWFS_DIFFTEST_CONFIG` — comma-separated names (default: all),
//! - `QCOWFS_DIFFTEST_JOBS` — configurations run at once (default 2),
//! - `QCOWFS_DIFFTEST_EXCLUDE` — operation kinds never drawn (`part`, `resize`, `resize-logical`,
//!   `mmap`, ...), for hunting bugs past a known one; printed loudly, part of the replay command.
//!
//! A failure names the seed, the configuration, the operation's index and every operation before
//! it, and the command that replays it.

#[allow(dead_code, unused_imports)] // each harness uses some of the shared helpers
#[path = "../it/common/mod.rs"]
mod common;

mod build;
mod config;
mod engine;
mod ops;
mod ptable;

use std::panic;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use config::{Config, CONFIGS};
use engine::{Progress, Shared};

/// Operations per configuration in the CI run.
const CI_OPS: usize = 100;
/// How long one operation (or one check phase) may run before the run counts as hung.
const PHASE_TIMEOUT: Duration = Duration::from_secs(180);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

/// FNV-1a of a name: each configuration gets its own stream from the one seed.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

struct Outcome {
    name: &'static str,
    busy_retries: u32,
    elapsed: Duration,
    failure: Option<String>,
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else {
        "(a panic without a message)".into()
    }
}

/// Aborts the FUSE connection of a hung mount, so its blocked requests fail and the run unwinds.
fn abort_fuse(dev: u64) {
    let minor = (dev & 0xff) | ((dev >> 12) & 0xffff_ff00);
    let _ = std::fs::write(format!("/sys/fs/fuse/connections/{minor}/abort"), "1");
}

/// Runs one configuration on its own thread under a watchdog; the report of a failure.
fn run_one(cfg: &'static Config, seed: u64, ops: usize, exclude: &[String]) -> Outcome {
    let progress: Shared = Arc::new(Mutex::new(Progress::default()));
    let start = Instant::now();
    let p = progress.clone();
    let ex = exclude.to_vec();
    let cfg_seed = seed ^ name_hash(cfg.name);
    let handle = thread::Builder::new()
        .name(format!("difftest-{}", cfg.name))
        .spawn(move || engine::run(cfg, cfg_seed, ops, ex, p))
        .expect("spawn a configuration thread");
    let mut hung = None;
    while !handle.is_finished() {
        thread::sleep(Duration::from_millis(100));
        let g = progress.lock().unwrap_or_else(|e| e.into_inner());
        if hung.is_none() && g.since.is_some_and(|s| s.elapsed() > PHASE_TIMEOUT) {
            hung = Some(g.phase.clone());
            if let Some(dev) = g.fuse_dev {
                abort_fuse(dev);
            }
        }
        if hung.is_some() && start.elapsed() > 4 * PHASE_TIMEOUT {
            break; // still stuck after the abort: leave the thread, report
        }
    }
    let result = if handle.is_finished() {
        handle.join().map_err(|e| panic_text(&*e))
    } else {
        Err("the run did not end even after its FUSE connection was aborted".into())
    };
    let g = progress.lock().unwrap_or_else(|e| e.into_inner());
    let failure = match (result, hung) {
        (Ok(()), None) => None,
        (r, hung) => {
            let mut msg = String::new();
            if let Some(phase) = hung {
                msg.push_str(&format!(
                    "HUNG for more than {PHASE_TIMEOUT:?} in {phase} (the FUSE connection was \
                     aborted)\n"
                ));
            }
            if let Err(e) = r {
                msg.push_str(&e);
            }
            Some(report(cfg, seed, ops, exclude, &g, &msg))
        }
    };
    Outcome {
        name: cfg.name,
        busy_retries: g.busy_retries,
        elapsed: start.elapsed(),
        failure,
    }
}

/// Seed, configuration, the failing operation and the ones before it, and the replay command.
fn report(
    cfg: &Config,
    seed: u64,
    ops: usize,
    exclude: &[String],
    p: &Progress,
    msg: &str,
) -> String {
    let failing_op = p
        .phase
        .strip_prefix("op #")
        .and_then(|rest| rest.split(':').next().and_then(|n| n.parse::<usize>().ok()));
    let replay_ops = failing_op.map_or(ops, |i| i + 1);
    let env = if exclude.is_empty() {
        String::new()
    } else {
        format!("QCOWFS_DIFFTEST_EXCLUDE={} ", exclude.join(","))
    };
    let mut out = format!(
        "=== configuration {} (seed {seed}, {ops} operations): FAILED in {}\n{msg}\n",
        cfg.name, p.phase
    );
    let shown = 200;
    let skip = p.log.len().saturating_sub(shown);
    out.push_str(&format!("operations so far ({}):\n", p.log.len()));
    if skip > 0 {
        out.push_str(&format!(
            "  ... {skip} earlier operations (the replay regenerates them)\n"
        ));
    }
    for (i, op) in p.log.iter().enumerate().skip(skip) {
        out.push_str(&format!("  #{i} {op}\n"));
    }
    out.push_str(&format!(
        "replay: {env}scripts/difftest.sh {seed} {replay_ops} {}\n",
        cfg.name
    ));
    out
}

#[test]
fn random_operations_on_every_configuration_match_a_raw_reference() {
    common::require_fuse();
    let seed: u64 = env_or("QCOWFS_DIFFTEST_SEED", 1);
    let ops: usize = env_or("QCOWFS_DIFFTEST_OPS", CI_OPS);
    let jobs: usize = env_or("QCOWFS_DIFFTEST_JOBS", 2).max(1);
    let exclude: Vec<String> = std::env::var("QCOWFS_DIFFTEST_EXCLUDE")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let selected: Vec<&'static Config> = match std::env::var("QCOWFS_DIFFTEST_CONFIG") {
        Ok(names) if !names.is_empty() => names
            .split(',')
            .map(|n| {
                CONFIGS.iter().find(|c| c.name == n).unwrap_or_else(|| {
                    let all: Vec<&str> = CONFIGS.iter().map(|c| c.name).collect();
                    panic!("no configuration named {n:?}; there are: {}", all.join(" "))
                })
            })
            .collect(),
        _ => CONFIGS.iter().collect(),
    };
    if !exclude.is_empty() {
        eprintln!(
            "\n*** QCOWFS_DIFFTEST_EXCLUDE={}: these operation kinds are NOT tested in this run ***\n",
            exclude.join(",")
        );
    }
    eprintln!(
        "difftest: seed {seed}, {ops} operations, {} configurations, {jobs} at once",
        selected.len()
    );
    let start = Instant::now();
    let queue = Mutex::new(selected.clone().into_iter());
    let outcomes = Mutex::new(vec![]);
    // The engine's panics are reported in the summary; keep the default hook quiet for them.
    let default_hook = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        let here = thread::current();
        if !here.name().is_some_and(|n| n.starts_with("difftest-")) {
            default_hook(info);
        }
    }));
    thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                let Some(cfg) = next else { break };
                let o = run_one(cfg, seed, ops, &exclude);
                eprintln!(
                    "difftest: {:<44} {:>6.1} s  {}{}",
                    o.name,
                    o.elapsed.as_secs_f64(),
                    if o.failure.is_some() { "FAILED" } else { "ok" },
                    if o.busy_retries > 0 {
                        format!(" ({} umount retries: mount busy)", o.busy_retries)
                    } else {
                        String::new()
                    }
                );
                outcomes.lock().unwrap_or_else(|e| e.into_inner()).push(o);
            });
        }
    });
    let _ = panic::take_hook();
    let outcomes = outcomes.into_inner().unwrap_or_else(|e| e.into_inner());
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.failure.is_some()).collect();
    eprintln!(
        "difftest: {} configurations × {ops} operations in {:.1} s: {} failed",
        outcomes.len(),
        start.elapsed().as_secs_f64(),
        failed.len()
    );
    assert_eq!(
        outcomes.len(),
        selected.len(),
        "a configuration did not report"
    );
    if !failed.is_empty() {
        let mut msg = format!(
            "{} of {} configurations failed (seed {seed}, {ops} operations):\n",
            failed.len(),
            outcomes.len()
        );
        for o in &failed {
            msg.push('\n');
            msg.push_str(o.failure.as_deref().unwrap_or_default());
        }
        panic!("{msg}");
    }
}
