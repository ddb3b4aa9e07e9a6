//! The operations and their seeded generator. Operation `i` depends only on the seed and the
//! operations before it, never on how many follow, so a run of `i + 1` operations replays a
//! failure at `i` exactly.

use std::fmt;

use crate::common::{Rng, KIB, MIB};
use crate::ptable::{Layout, SLOT};

/// Which file an operation goes through: `disk`, or `disk-partN` (offsets relative to it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Disk,
    Part(u32),
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Via::Disk => write!(f, "disk"),
            Via::Part(n) => write!(f, "disk-part{n}"),
        }
    }
}

/// One operation, applied to the mount and to the raw reference.
#[derive(Clone, Debug)]
pub enum Op {
    /// `pwrite` of `len` seeded bytes; a write that runs past the file's end stores what fits.
    Write {
        via: Via,
        off: u64,
        len: u64,
        seed: u64,
    },
    /// `pread` compared with the reference.
    Read { via: Via, off: u64, len: u64 },
    /// `fsync` of every open file.
    Fsync,
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: the range reads as zeros.
    Punch { via: Via, off: u64, len: u64 },
    /// `fallocate(ZERO_RANGE [| KEEP_SIZE])`.
    ZeroRange {
        via: Via,
        off: u64,
        len: u64,
        keep_size: bool,
    },
    /// A shared writable mapping of the range's pages, `len` bytes changed, `msync(MS_SYNC)`.
    Mmap {
        via: Via,
        off: u64,
        len: u64,
        seed: u64,
    },
    /// 2–4 threads writing disjoint ranges of `disk` at once: (offset, length, seed).
    Threaded { writes: Vec<(u64, u64, u64)> },
    /// Rewrites the partition table through `disk` so partition `part` is `len` bytes; the
    /// `disk-partN` files must follow.
    Resize { part: u32, len: u64 },
    /// `pread` of `snapshots/snap1` compared with `qemu-img convert -l snap1`.
    ReadSnapshot { off: u64, len: u64 },
    /// `qcowfs umount`, `qemu-img check` + `compare`, `qcowfs mount` again.
    Remount,
    /// `qcowfs umount`, `qcowfs seal`, checks, `qcowfs mount` again.
    Seal,
}

impl Op {
    /// The name `QCOWFS_DIFFTEST_EXCLUDE` matches (besides `part`, any op through a partition).
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Write { .. } => "write",
            Op::Read { .. } => "read",
            Op::Fsync => "fsync",
            Op::Punch { .. } => "punch",
            Op::ZeroRange { .. } => "zero",
            Op::Mmap { .. } => "mmap",
            Op::Threaded { .. } => "threads",
            Op::Resize { part, .. } if *part >= 5 => "resize-logical",
            Op::Resize { .. } => "resize",
            Op::ReadSnapshot { .. } => "snapshot-read",
            Op::Remount => "remount",
            Op::Seal => "seal",
        }
    }

    fn via(&self) -> Option<Via> {
        match self {
            Op::Write { via, .. }
            | Op::Read { via, .. }
            | Op::Punch { via, .. }
            | Op::ZeroRange { via, .. }
            | Op::Mmap { via, .. } => Some(*via),
            _ => None,
        }
    }

    fn excluded(&self, exclude: &[String]) -> bool {
        exclude.iter().any(|e| {
            e == self.kind()
                || (e == "resize" && matches!(self, Op::Resize { .. }))
                || (e == "part" && matches!(self.via(), Some(Via::Part(_))))
        })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Write {
                via,
                off,
                len,
                seed,
            } => {
                write!(f, "write {via} off={off:#x} len={len} seed={seed:#x}")
            }
            Op::Read { via, off, len } => write!(f, "read {via} off={off:#x} len={len}"),
            Op::Fsync => write!(f, "fsync"),
            Op::Punch { via, off, len } => write!(f, "punch-hole {via} off={off:#x} len={len}"),
            Op::ZeroRange {
                via,
                off,
                len,
                keep_size,
            } => write!(
                f,
                "zero-range {via} off={off:#x} len={len}{}",
                if *keep_size { " keep-size" } else { "" }
            ),
            Op::Mmap {
                via,
                off,
                len,
                seed,
            } => {
                write!(f, "mmap-write {via} off={off:#x} len={len} seed={seed:#x}")
            }
            Op::Threaded { writes } => {
                write!(f, "threaded-writes disk")?;
                for (off, len, seed) in writes {
                    write!(f, " [off={off:#x} len={len} seed={seed:#x}]")?;
                }
                Ok(())
            }
            Op::Resize { part, len } => {
                write!(
                    f,
                    "table-rewrite disk-part{part} len={len} ({} sectors)",
                    len / 512
                )
            }
            Op::ReadSnapshot { off, len } => {
                write!(f, "read snapshots/snap1 off={off:#x} len={len}")
            }
            Op::Remount => write!(f, "remount"),
            Op::Seal => write!(f, "umount + seal + mount"),
        }
    }
}

/// What the generator may draw from.
pub struct Gen {
    rng: Rng,
    /// Ranges of `disk` that writes may touch: (start, length).
    windows: Vec<(u64, u64)>,
    disk_size: u64,
    layout: Layout,
    snapshot: bool,
    sealable: bool,
    sealed: bool,
    /// The last range read or written, in `disk` offsets, for reads (and overlapping writes) that follow
    /// it, through any file that shows those bytes.
    last: Option<(u64, u64)>,
    exclude: Vec<String>,
}

/// Relative weights of the operation kinds.
const WEIGHTS: &[(&str, u64)] = &[
    ("write", 24),
    ("part-write", 12),
    ("read", 18),
    ("part-read", 8),
    ("fsync", 5),
    ("punch", 4),
    ("zero", 4),
    ("mmap", 5),
    ("threads", 5),
    ("resize", 3),
    ("remount", 3),
    ("seal", 2),
    ("snapshot-read", 3),
];

/// The largest single write, punch or zeroing (the brief: up to 3 MiB).
const MAX_IO: u64 = 3 * MIB;

impl Gen {
    pub fn new(
        seed: u64,
        windows: Vec<(u64, u64)>,
        disk_size: u64,
        layout: Layout,
        snapshot: bool,
        sealable: bool,
        exclude: Vec<String>,
    ) -> Gen {
        assert!(!windows.is_empty(), "no window to operate in");
        Gen {
            rng: Rng::new(seed),
            windows,
            disk_size,
            layout,
            snapshot,
            sealable,
            sealed: false,
            last: None,
            exclude,
        }
    }

    /// The next operation.
    pub fn next_op(&mut self) -> Op {
        let total: u64 = WEIGHTS.iter().map(|w| w.1).sum();
        for _ in 0..10_000 {
            let mut pick = self.rng.below(total);
            let kind = WEIGHTS
                .iter()
                .find(|(_, w)| {
                    if pick < *w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .expect("a weight is picked")
                .0;
            let Some(op) = self.draw(kind) else {
                continue;
            };
            if op.excluded(&self.exclude) {
                continue;
            }
            match &op {
                // Reads count too: a range one file has cached, written through another, is
                // where views go stale.
                Op::Write { via, off, len, .. }
                | Op::Mmap { via, off, len, .. }
                | Op::Read { via, off, len } => {
                    let (base, size) = self.span(*via);
                    self.last = Some((base + off, (*len).min(size - off)));
                }
                Op::Resize { part, len } => {
                    self.layout.resize(*part, *len);
                    // Offsets recorded for the old table no longer mean the same bytes.
                    self.last = None;
                }
                Op::Seal => self.sealed = true,
                _ => {}
            }
            return op;
        }
        panic!(
            "QCOWFS_DIFFTEST_EXCLUDE={:?} leaves no operation",
            self.exclude
        );
    }

    fn partitions(&self) -> Vec<u32> {
        self.layout.parts.keys().copied().collect()
    }

    fn draw(&mut self, kind: &str) -> Option<Op> {
        let parts = self.partitions();
        let part_via = |g: &mut Gen| Via::Part(parts[g.rng.below(parts.len() as u64) as usize]);
        Some(match kind {
            "write" => self.write(Via::Disk),
            "part-write" if !parts.is_empty() => {
                let via = part_via(self);
                self.write(via)
            }
            "read" => self.read(Via::Disk),
            "part-read" if !parts.is_empty() => {
                let via = part_via(self);
                self.read(via)
            }
            "fsync" => Op::Fsync,
            "punch" | "zero" => {
                let via = if !parts.is_empty() && self.rng.below(4) == 0 {
                    part_via(self)
                } else {
                    Via::Disk
                };
                let len = self.length(MAX_IO);
                let (off, len) = self.place(via, len, false);
                if kind == "punch" {
                    Op::Punch { via, off, len }
                } else {
                    let keep_size = self.rng.below(2) == 0;
                    Op::ZeroRange {
                        via,
                        off,
                        len,
                        keep_size,
                    }
                }
            }
            "mmap" => {
                let via = if !parts.is_empty() && self.rng.below(3) == 0 {
                    part_via(self)
                } else {
                    Via::Disk
                };
                let len = self.length(256 * KIB);
                let (off, len) = self.place(via, len, false);
                Op::Mmap {
                    via,
                    off,
                    len,
                    seed: self.rng.next_u64(),
                }
            }
            "threads" => self.threaded(),
            "resize" if !parts.is_empty() => {
                let part = parts[self.rng.below(parts.len() as u64) as usize];
                let sectors = self.rng.range(4 * MIB / 512, SLOT / 512);
                Op::Resize {
                    part,
                    len: sectors * 512,
                }
            }
            "remount" => Op::Remount,
            "seal" if self.sealable && !self.sealed => Op::Seal,
            "snapshot-read" if self.snapshot => {
                let len = self.length(MAX_IO);
                let (off, len) = self.place(Via::Disk, len, false);
                Op::ReadSnapshot { off, len }
            }
            _ => return None,
        })
    }

    /// A length in 1..=max: tiny, sector or page multiples, any, or large.
    fn length(&mut self, max: u64) -> u64 {
        let len = match self.rng.below(20) {
            0..=4 => self.rng.range(1, 600),
            5..=9 => 512 * self.rng.range(1, 64),
            10..=13 => 4096 * self.rng.range(1, 128),
            14..=17 => self.rng.range(1, 256 * KIB),
            _ => self.rng.range(256 * KIB, MAX_IO),
        };
        len.clamp(1, max)
    }

    /// The file's size and the windows (relative to it) an operation through `via` may touch.
    fn target(&self, via: Via) -> (u64, Vec<(u64, u64)>) {
        match via {
            Via::Disk => (self.disk_size, self.windows.clone()),
            Via::Part(n) => {
                let len = self.layout.parts[&n].1;
                (len, vec![(0, len)])
            }
        }
    }

    /// An offset for `len` bytes through `via` (len shortened to fit a window): unaligned,
    /// aligned to a sector/page/cluster/MiB, at a window's end, or over the last write. With
    /// `may_cross_end`, sometimes runs past the file's end.
    fn place(&mut self, via: Via, len: u64, may_cross_end: bool) -> (u64, u64) {
        let (size, windows) = self.target(via);
        let (ws, wl) = windows[self.rng.below(windows.len() as u64) as usize];
        let len = len.min(wl);
        let we = ws + wl;
        let last = self.last_in(via);
        let off = match self.rng.below(20) {
            0..=7 => ws + self.rng.below(wl - len + 1),
            8..=13 => {
                let align = [512, 4096, 64 * KIB, MIB][self.rng.below(4) as usize];
                let off = ws + self.rng.below(wl - len + 1);
                (off / align * align)
                    .max(ws.div_ceil(align) * align)
                    .min(we - len)
            }
            14..=16 => we - len,
            _ => match last {
                Some((loff, llen)) => {
                    let lo = loff.saturating_sub(len).max(ws);
                    let hi = (loff + llen).min(we - len).max(lo);
                    self.rng.range(lo, hi)
                }
                None => ws + self.rng.below(wl - len + 1),
            },
        };
        if may_cross_end && we == size && len > 1 && self.rng.below(12) == 0 {
            // Starts before the end and runs past it.
            return (size - self.rng.range(1, len - 1), len);
        }
        (off.clamp(ws, we - len), len)
    }

    /// Where `via` starts on the disk and its size.
    fn span(&self, via: Via) -> (u64, u64) {
        match via {
            Via::Disk => (0, self.disk_size),
            Via::Part(n) => self.layout.parts[&n],
        }
    }

    /// The part of the last write that `via` shows, in its offsets.
    fn last_in(&self, via: Via) -> Option<(u64, u64)> {
        let (off, len) = self.last?;
        let (base, size) = self.span(via);
        let start = off.max(base);
        let end = (off + len).min(base + size);
        (start < end).then(|| (start - base, end - start))
    }

    fn write(&mut self, via: Via) -> Op {
        let len = self.length(MAX_IO);
        let (off, len) = self.place(via, len, true);
        Op::Write {
            via,
            off,
            len,
            seed: self.rng.next_u64(),
        }
    }

    fn read(&mut self, via: Via) -> Op {
        if self.last.is_some() && self.rng.below(2) == 0 {
            // The bytes just written, through a file chosen among all that show them.
            let mut views = vec![Via::Disk];
            views.extend(self.partitions().into_iter().map(Via::Part));
            views.retain(|&v| self.last_in(v).is_some());
            let via = views[self.rng.below(views.len() as u64) as usize];
            let (off, len) = self.last_in(via).expect("the view shows the last write");
            return Op::Read { via, off, len };
        }
        let len = self.length(MAX_IO);
        let (off, len) = self.place(via, len, false);
        Op::Read { via, off, len }
    }

    /// 2–4 disjoint ranges, one after another with small gaps (some share a cluster).
    fn threaded(&mut self) -> Op {
        let n = self.rng.range(2, 4);
        let (ws, wl) = self.windows[self.rng.below(self.windows.len() as u64) as usize];
        let mut lens = vec![];
        let mut total = 0;
        for _ in 0..n {
            let len = self.length(512 * KIB);
            let gap = match self.rng.below(3) {
                0 => 0,
                1 => self.rng.range(1, 600),
                _ => 4096 * self.rng.range(1, 32),
            };
            if total + len + gap > wl {
                break;
            }
            lens.push((gap, len));
            total += len + gap;
        }
        if lens.is_empty() {
            lens.push((0, wl.min(4096)));
            total = wl.min(4096);
        }
        let mut at = ws + self.rng.below(wl - total + 1);
        let mut writes = vec![];
        for (gap, len) in lens {
            at += gap;
            writes.push((at, len, self.rng.next_u64()));
            at += len;
        }
        Op::Threaded { writes }
    }
}

#[test]
fn the_same_seed_draws_the_same_operations() {
    use crate::ptable::Guest;
    let draw = |n: usize| {
        let layout = Layout::new(Guest::Mbr, 64 * MIB);
        let windows = layout.windows();
        let mut g = Gen::new(7, windows, 64 * MIB, layout, true, true, vec![]);
        (0..n).map(|_| g.next_op().to_string()).collect::<Vec<_>>()
    };
    let long = draw(300);
    assert_eq!(draw(300), long);
    assert_eq!(
        draw(40)[..],
        long[..40],
        "op i must not depend on how many follow"
    );
    for kind in [
        "write",
        "read",
        "mmap",
        "threaded",
        "table-rewrite",
        "remount",
        "umount + seal",
    ] {
        assert!(
            long.iter().any(|o| o.starts_with(kind)),
            "no {kind} in 300 operations"
        );
    }
    assert!(
        long.iter().any(|o| o.contains("disk-part")),
        "no partition-file operation"
    );
}
