//! What the guest may read after a run in which a host operation failed, from the guest operations
//! and what each returned. A byte is *certain* when the last operation that wrote it is one the disk
//! must show: on the live disk, any write or discard that returned success; after the image is
//! reopened, one that returned success and was followed by a flush that returned success. Every
//! other operation is *uncertain*: it failed (and may have been partly applied) or was never made
//! durable, so each of its bytes may read as its new value or as what was there before, until a
//! later certain operation covers it. Checked per byte, as the crash states are: a write that was
//! never acknowledged by a flush may be torn across clusters.

use crate::record::GuestOp;

/// An uncertain operation and the ranges of it no later certain operation has covered.
struct Maybe {
    index: usize,
    live: Vec<(u64, u64)>,
}

/// The bytes a view must hold and the uncertain values it may hold instead.
pub struct Expectation<'a> {
    ops: &'a [GuestOp],
    results: &'a [Result<(), String>],
    certain: Vec<u8>,
    maybe: Vec<Maybe>,
    /// Which view this is, for messages.
    view: &'static str,
}

/// The guest byte range an operation changes (none for a flush).
fn span(op: &GuestOp) -> Option<(u64, u64)> {
    match op {
        GuestOp::Write { offset, data } => Some((*offset, offset + data.len() as u64)),
        GuestOp::Discard { offset, len } => Some((*offset, offset + len)),
        GuestOp::Durable => None,
    }
}

/// The value `op` gives guest byte `at` (inside its span).
fn value(op: &GuestOp, at: u64) -> u8 {
    match op {
        GuestOp::Write { offset, data } => data[(at - offset) as usize],
        GuestOp::Discard { .. } | GuestOp::Durable => 0,
    }
}

/// [a, b) minus [cut_a, cut_b).
fn subtract(ranges: &mut Vec<(u64, u64)>, (cut_a, cut_b): (u64, u64)) {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for &(a, b) in ranges.iter() {
        if cut_b <= a || b <= cut_a {
            out.push((a, b));
            continue;
        }
        if a < cut_a {
            out.push((a, cut_a));
        }
        if cut_b < b {
            out.push((cut_b, b));
        }
    }
    *ranges = out;
}

impl<'a> Expectation<'a> {
    fn new(
        initial: &[u8],
        ops: &'a [GuestOp],
        results: &'a [Result<(), String>],
        view: &'static str,
    ) -> Self {
        Expectation {
            ops,
            results,
            certain: initial.to_vec(),
            maybe: Vec::new(),
            view,
        }
    }

    fn certain(&mut self, index: usize) {
        let Some((a, b)) = span(&self.ops[index]) else {
            return;
        };
        match &self.ops[index] {
            GuestOp::Write { data, .. } => {
                self.certain[a as usize..b as usize].copy_from_slice(data)
            }
            _ => self.certain[a as usize..b as usize].fill(0),
        }
        for m in &mut self.maybe {
            subtract(&mut m.live, (a, b));
        }
        self.maybe.retain(|m| !m.live.is_empty());
    }

    fn uncertain(&mut self, index: usize) {
        if let Some(range) = span(&self.ops[index]) {
            self.maybe.push(Maybe {
                index,
                live: vec![range],
            });
        }
    }

    /// The disk as it must read while it is still open, after the first `results.len()`
    /// operations: every one that returned success is certain.
    pub fn live(initial: &[u8], ops: &'a [GuestOp], results: &'a [Result<(), String>]) -> Self {
        let mut e = Expectation::new(initial, ops, results, "the open disk");
        for (i, r) in results.iter().enumerate() {
            match r {
                Ok(()) => e.certain(i),
                Err(_) => e.uncertain(i),
            }
        }
        e
    }

    /// The image as it must read once reopened: what the last flush that returned success covers
    /// is certain (the operations before it that returned success); everything else is not.
    pub fn durable(initial: &[u8], ops: &'a [GuestOp], results: &'a [Result<(), String>]) -> Self {
        let flushed = results
            .iter()
            .enumerate()
            .rposition(|(i, r)| r.is_ok() && matches!(ops[i], GuestOp::Durable))
            .unwrap_or(0);
        let mut e = Expectation::new(initial, ops, results, "the image reopened");
        for (i, r) in results.iter().enumerate() {
            match (i < flushed, r) {
                (true, Ok(())) => e.certain(i),
                _ => e.uncertain(i),
            }
        }
        e
    }

    /// Whether uncertain operations allow `byte` at `at`.
    fn allows(&self, at: u64, byte: u8) -> bool {
        self.maybe.iter().any(|m| {
            m.live.iter().any(|&(a, b)| a <= at && at < b) && value(&self.ops[m.index], at) == byte
        })
    }

    /// Err names the first byte `actual` holds that no operation allows, the operations that
    /// touched it and what each returned, and how many bytes are wrong.
    pub fn check(&self, actual: &[u8]) -> Result<(), String> {
        if actual.len() != self.certain.len() {
            return Err(format!(
                "{} reads {} bytes, expected {}",
                self.view,
                actual.len(),
                self.certain.len()
            ));
        }
        let mut wrong = actual
            .iter()
            .zip(&self.certain)
            .enumerate()
            .filter(|&(i, (&a, &c))| a != c && !self.allows(i as u64, a))
            .map(|(i, _)| i);
        let Some(first) = wrong.next() else {
            return Ok(());
        };
        let (count, last) = wrong.fold((1, first), |(n, _), i| (n + 1, i));
        Err(format!(
            "{} reads {:#04x} at guest byte {first}, where it must read {:#04x}{} ({count} wrong \
             bytes in [{first}, {}]); operations on that byte: {}",
            self.view,
            actual[first],
            self.certain[first],
            if self.maybe.is_empty() {
                ""
            } else {
                " or what an uncertain operation put there"
            },
            last + 1,
            self.history(first as u64)
        ))
    }

    /// The operations that touched guest byte `at`, with what each returned.
    fn history(&self, at: u64) -> String {
        let mut out = Vec::new();
        for (i, r) in self.results.iter().enumerate() {
            let op = &self.ops[i];
            let touched = match span(op) {
                Some((a, b)) => a <= at && at < b,
                None => !out.is_empty(),
            };
            if !touched {
                continue;
            }
            let what = match op {
                GuestOp::Write { offset, data } => format!(
                    "#{i} write {offset}+{} (byte {:#04x})",
                    data.len(),
                    value(op, at)
                ),
                GuestOp::Discard { offset, len } => format!("#{i} discard {offset}+{len}"),
                GuestOp::Durable => format!("#{i} fsync"),
            };
            let how = match r {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("Err({e})"),
            };
            out.push(format!("{what} {how}"));
        }
        if out.is_empty() {
            "none (the image held it before the run)".into()
        } else {
            out.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(offset: u64, data: &[u8]) -> GuestOp {
        GuestOp::Write {
            offset,
            data: data.to_vec(),
        }
    }

    fn err() -> Result<(), String> {
        Err("EIO".into())
    }

    #[test]
    fn a_range_minus_a_cut_keeps_what_lies_outside_it() {
        let mut r = vec![(0, 10), (20, 30)];
        subtract(&mut r, (5, 25));
        assert_eq!(r, vec![(0, 5), (25, 30)]);
        subtract(&mut r, (0, 100));
        assert!(r.is_empty());
    }

    #[test]
    fn only_what_a_successful_fsync_covered_is_certain_after_reopen() {
        let ops = [
            write(0, b"aa"),
            GuestOp::Durable,
            write(1, b"bb"),
            GuestOp::Durable,
        ];
        let results = [Ok(()), Ok(()), Ok(()), err()];
        let durable = Expectation::durable(b"....", &ops, &results);
        assert!(durable.check(b"aa..").is_ok());
        assert!(
            durable.check(b"abb.").is_ok(),
            "the unflushed write may have landed"
        );
        assert!(durable.check(b"ab..").is_ok(), "or part of it: per byte");
        assert!(
            durable.check(b".a..").is_err(),
            "the flushed write must be there"
        );
        assert!(durable.check(b"aaa").is_err(), "the size is fixed");
        // The open disk shows every write that returned success.
        let live = Expectation::live(b"....", &ops, &results);
        assert!(live.check(b"abb.").is_ok());
        assert!(live.check(b"aa..").is_err());
    }

    #[test]
    fn a_failed_operation_may_show_until_a_certain_one_covers_it() {
        let ops = [
            GuestOp::Discard { offset: 0, len: 4 },
            write(2, b"cc"),
            GuestOp::Durable,
        ];
        let results = [err(), Ok(()), Ok(())];
        let durable = Expectation::durable(b"abcd", &ops, &results);
        assert!(durable.check(b"abcc").is_ok());
        assert!(durable.check(b"\0\0cc").is_ok());
        assert!(
            durable.check(b"ab\0c").is_err(),
            "the later write covers the discard"
        );
        assert!(durable.check(b"xbcc").is_err());
    }
}
