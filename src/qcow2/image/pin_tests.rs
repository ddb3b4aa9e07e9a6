//! What a commit does to readers and after a failure: a read racing a commit that releases the
//! cluster it mapped must get the bytes it mapped, never the punched (or reused) cluster (the host
//! file holds the read inside its `read_at` until the test lets it go, so the interleaving is
//! exact); and the reload after a failed commit trusts the disk no more than `open` does.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::*;
use crate::io::{HostIo, MemFile};
use crate::qcow2::tiny::{self, TinyImage, PATH};
use crate::qcow2::Durability;
use crate::qcow2::{ClusterWrite, WriteTarget};

/// A memory file whose first read at `held` waits until `release` (it says when it began).
#[derive(Debug)]
struct Gate {
    mem: MemFile,
    held: u64,
    /// (a read is waiting at `held`, the read may go on)
    state: Mutex<(bool, bool)>,
    changed: Condvar,
}

impl Gate {
    fn wait_for_reader(&self) {
        let mut s = self.state.lock();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !s.0 {
            assert!(
                !self.changed.wait_until(&mut s, deadline).timed_out(),
                "the reader never read the cluster"
            );
        }
    }

    fn release(&self) {
        self.state.lock().1 = true;
        self.changed.notify_all();
    }
}

impl HostIo for Gate {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset == self.held {
            let mut s = self.state.lock();
            s.0 = true;
            self.changed.notify_all();
            while !s.1 {
                self.changed.wait(&mut s);
            }
        }
        self.mem.read_at(buf, offset)
    }
    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.mem.write_all_at(data, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.mem.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        self.mem.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.mem.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mem.punch_hole(offset, len)
    }
    fn start_writeback(&self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_cluster_a_read_has_mapped_is_released_only_once_the_read_is_done() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    let host = t.data(0, &[0x71; CS as usize]);
    let gate = Arc::new(Gate {
        mem: MemFile::new(t.bytes()),
        held: host,
        state: Mutex::new((false, false)),
        changed: Condvar::new(),
    });
    let file = crate::io::HostFile::over(std::path::Path::new(PATH), gate.clone());
    let img = Arc::new(tiny::open_file(file, true).unwrap());
    let reader = {
        let img = img.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; CS as usize];
            img.read(0, &mut buf, &|_, b| {
                b.fill(0xee);
                Ok(())
            })
            .map(|_| buf)
        })
    };
    gate.wait_for_reader();
    // The guest discards the cluster meanwhile: the commit releases and punches it.
    let committer = {
        let img = img.clone();
        std::thread::spawn(move || {
            let discard = ClusterWrite {
                guest: 0,
                target: WriteTarget::Discard,
                pieces: Vec::new(),
            };
            img.commit(vec![discard], Durability::Synced)
        })
    };
    // Unhindered, the commit is done in far less; held back by the read, it waits for it.
    let deadline = Instant::now() + Duration::from_millis(300);
    while !committer.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    gate.release();
    let got = reader.join().unwrap().unwrap();
    committer.join().unwrap().unwrap();
    assert!(
        got.iter().all(|&b| b == 0x71),
        "the read returned bytes of a released cluster (first byte {:#x})",
        got[0]
    );
    // And the release did happen: the cluster reads as zeros now.
    let mut after = vec![0xeeu8; CS as usize];
    img.read(0, &mut after, &|_, _| {
        panic!("a discarded cluster reads zeros")
    })
    .unwrap();
    assert!(after.iter().all(|&b| b == 0));
}

#[test]
fn reloading_after_a_failed_commit_checks_what_open_checks_and_poisons_when_it_fails() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    t.data(0, &[0x71; CS as usize]);
    let (img, probe) = t.open_probed(true).unwrap();
    img.reload().unwrap();
    // What a failed commit could leave on disk: an L1 entry naming an L2 table off its cluster.
    let l1 = tiny::L1_TABLE * CS;
    let mut word = [0u8; 8];
    probe.mem.read_at(&mut word, l1).unwrap();
    let bad = u64::from_be_bytes(word) + 512;
    probe.mem.write_all_at(&bad.to_be_bytes(), l1).unwrap();
    let err = img.reload().unwrap_err();
    assert!(
        matches!(
            format_error(&err),
            FormatError::Misaligned {
                what: "L2 table",
                ..
            }
        ),
        "{err}"
    );
    // `abandon` (the failed commit's path) then refuses every later commit.
    img.abandon();
    let write = ClusterWrite {
        guest: 0,
        target: WriteTarget::Discard,
        pieces: Vec::new(),
    };
    assert_eq!(
        img.commit(vec![write], Durability::Synced)
            .unwrap_err()
            .errno(),
        libc::EIO
    );
}
