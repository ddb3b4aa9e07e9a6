//! The workloads the fault states run: every workload of tests/crash_states, and one that is
//! heavy on discards over data not yet stored (writes, then a discard over them before any fsync,
//! then writes into the discarded range again): a failure in the discard's commit must neither
//! lose the writes it superseded nor let the next fsync claim them durable.

use std::path::Path;

use crate::common::{qcow2, Rng, MIB};
use crate::crash_workloads::{Spec, ALL};
use crate::record::{record, Recording};
use crate::replay::CACHE;

/// Every workload, the slowest first (growth writes 140 MiB in 512-byte clusters per run), so the
/// two workers finish together; then the crash states' in their order, then the extra ones.
pub fn all() -> Vec<&'static Spec> {
    let mut all: Vec<&Spec> = ALL.iter().chain(EXTRA).collect();
    all.sort_by_key(|s| !s.name.starts_with("growth"));
    all
}

const EXTRA: &[Spec] = &[Spec {
    name: "discard-heavy",
    weight: 3,
    run: discard_heavy,
    suite: true,
}];

/// 64 KiB clusters over data everywhere (a lost write or a lost discard shows), in rounds: a few
/// writes into a region of up to eight clusters, a discard over part of it (whole clusters with
/// ragged ends), sometimes a write back into the discarded range, an fsync every other round.
fn discard_heavy(dir: &Path, seed: u64) -> Recording {
    const CLUSTER: u64 = 64 << 10;
    let size = 16 * MIB;
    let image = qcow2(dir.join("discard-heavy.qcow2"), size).create();
    image.write_random(0, size as usize, seed + 11);
    let mut rng = Rng::new(seed + 11);
    record("discard-heavy", image, dir, CACHE, |w| {
        for round in 0..24 {
            let region = rng.below(size / CLUSTER - 8) * CLUSTER;
            let span = rng.range(2, 8) * CLUSTER;
            for _ in 0..rng.range(1, 4) {
                let len = rng.range(1, span / 512) * 512;
                let at = region + rng.below(span - len + 1) / 512 * 512;
                let bytes = random(&mut rng, len);
                w.write(at, bytes);
            }
            let start = region + rng.below(CLUSTER / 512) * 512;
            let end = region + span - rng.below(CLUSTER / 512) * 512;
            w.discard(start, end - start);
            if rng.below(2) == 0 {
                let len = rng.range(1, 2 * CLUSTER / 512) * 512;
                let at = start + rng.below(end - start - len.min(end - start) + 1) / 512 * 512;
                let len = len.min(region + span - at);
                let bytes = random(&mut rng, len);
                w.write(at, bytes);
            }
            if round % 2 == 1 {
                w.fsync();
            }
        }
    })
}

fn random(rng: &mut Rng, len: u64) -> Vec<u8> {
    let mut d = vec![0u8; len as usize];
    rng.fill(&mut d);
    d
}
