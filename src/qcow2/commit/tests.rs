//! Unit tests of the commit pipeline, in memory: images made by qemu-img, opened over a `Recorder`
//! whose log shows the order of writes, barriers and punched holes; the final bytes are judged by
//! `qemu-img check` and read back with `qemu-io read -P`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;
use crate::io::host::Recorder;
use crate::io::{HostEvent, HostFile, MemFile, WriteLog};
use crate::qcow2::qemu_tools::{qemu_check, run};
use crate::qcow2::table::OFFSET_MASK;
use crate::qcow2::words::{decode_words, read_words};
use crate::qcow2::{ClusterSource, Header};

/// An image qemu-img made, opened for writing over a recorder into memory.
struct Fixture {
    dir: tempfile::TempDir,
    /// The file qemu-img made (never written by the image).
    original: PathBuf,
    mem: Arc<MemFile>,
    log: WriteLog,
    image: Qcow2Image,
}

/// `qemu-img create -f qcow2 -o OPTS img SIZE`, then each `qemu-io -c` command on it.
fn fixture(opts: &str, size: &str, io: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("img.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", opts],
        &original,
        &[size],
    );
    for cmd in io {
        run("qemu-io", &["-f", "qcow2", "-c", cmd], &original, &[]);
    }
    let bytes = std::fs::read(&original).unwrap();
    let mem = Arc::new(MemFile::new(bytes.clone()));
    let log = WriteLog::default();
    let recorder = Recorder::new(mem.clone(), log.clone());
    let file = HostFile::over(&original, Arc::new(recorder));
    let want = Header::bytes_wanted(&bytes).unwrap().min(bytes.len());
    let header = Header::parse(&bytes[..want], bytes.len() as u64).unwrap();
    let image = Qcow2Image::open(file, header, true).unwrap();
    Fixture {
        dir,
        original,
        mem,
        log,
        image,
    }
}

/// `qemu-io read -P pattern offset len`: exit 0 and no failed verification.
fn assert_reads(path: &Path, pattern: u8, offset: u64, len: u64) {
    let cmd = format!("read -P {pattern:#x} {offset} {len}");
    let text = run("qemu-io", &["-f", "qcow2", "-c", &cmd], path, &[]);
    assert!(
        !text.contains("Pattern verification failed"),
        "{cmd} on {}:\n{text}",
        path.display()
    );
}

/// One step of the log, named for what it touched.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Write(String),
    Barrier,
    Punch(u64),
}

impl Fixture {
    fn cs(&self) -> u64 {
        self.image.layout().cluster_size()
    }

    /// A whole cluster of `byte` at `guest`, where `write_target` says.
    fn whole(&self, guest: u64, byte: u8) -> ClusterWrite {
        ClusterWrite {
            guest,
            target: self.image.write_target(guest).unwrap(),
            pieces: vec![(0, vec![byte; self.cs() as usize])],
        }
    }

    /// Where the data of `guest` lives now.
    fn host_of(&self, guest: u64) -> u64 {
        match self.image.map(guest, 1).unwrap().0 {
            ClusterSource::Data { host } => host,
            other => panic!("guest {guest:#x} maps to {other:?}"),
        }
    }

    /// The L2 table the active L1 table names for `guest`.
    fn l2_of(&self, guest: u64) -> u64 {
        let meta = self.image.meta.lock();
        let index = self.image.layout().l1_index(guest) as usize;
        meta.l1[index] & OFFSET_MASK
    }

    /// Refcount blocks the current refcount table names.
    fn refcount_blocks(&self) -> Vec<u64> {
        let header = self.image.header();
        let entries = u64::from(header.refcount_table_clusters) * self.cs() / 8;
        read_words(
            self.image.file(),
            header.refcount_table_offset,
            entries as usize,
        )
        .unwrap()
        .into_iter()
        .map(|e| e & OFFSET_MASK)
        .filter(|&b| b != 0)
        .collect()
    }

    /// The log from event `from` on, each write named by the cluster it went to: `names`, else
    /// "L1[i]", "header", "refblock", else its offset.
    fn steps(&self, from: usize, names: &[(u64, &str)]) -> Vec<Step> {
        let cs = self.cs();
        let header = self.image.header();
        let l1 = header.l1_table_offset;
        let l1_end = l1 + u64::from(header.l1_size) * 8;
        let blocks = self.refcount_blocks();
        self.log.events()[from..]
            .iter()
            .filter_map(|e| match e {
                HostEvent::Write { offset, .. } => {
                    let cluster = offset & !(cs - 1);
                    let name = if let Some((_, n)) = names.iter().find(|(c, _)| *c == cluster) {
                        n.to_string()
                    } else if (l1..l1_end).contains(offset) {
                        format!("L1[{}]", (offset - l1) / 8)
                    } else if cluster == 0 {
                        "header".into()
                    } else if blocks.contains(&cluster) {
                        "refblock".into()
                    } else {
                        format!("{offset:#x}")
                    };
                    Some(Step::Write(name))
                }
                // A step after a barrier must come after it returned, not merely began.
                HostEvent::BarrierDone(_) => Some(Step::Barrier),
                HostEvent::Barrier(_) => None,
                HostEvent::Punch { offset, .. } => Some(Step::Punch(*offset)),
                HostEvent::SetLen(_) | HostEvent::Mark(_) => None,
            })
            .collect()
    }

    /// The in-memory file written out for qemu.
    fn save(&self) -> PathBuf {
        let path = self.dir.path().join("after.qcow2");
        std::fs::write(&path, self.mem.contents()).unwrap();
        path
    }

    /// Read `len` guest bytes at `guest` through the image (nothing below it).
    fn read(&self, guest: u64, len: u64) -> Vec<u8> {
        let mut buf = vec![0xeeu8; len as usize];
        let zeros = |_: u64, b: &mut [u8]| -> crate::Result<()> {
            b.fill(0);
            Ok(())
        };
        self.image.read(guest, &mut buf, &zeros).unwrap();
        buf
    }
}

fn w(name: &str) -> Step {
    Step::Write(name.into())
}

/// Index of the first step equal to `step` at or after `from`.
fn find(steps: &[Step], from: usize, step: &Step) -> usize {
    from + steps[from..]
        .iter()
        .position(|s| s == step)
        .unwrap_or_else(|| panic!("no {step:?} from {from} in {steps:?}"))
}

#[test]
fn an_allocating_write_orders_data_then_l2_then_l1_each_behind_a_barrier() {
    let f = fixture("cluster_size=65536", "4M", &[]);
    assert_eq!(f.image.write_target(0).unwrap(), WriteTarget::Allocate);
    f.image
        .commit(vec![f.whole(0, 0x11)], Durability::Synced)
        .unwrap();
    let (data, l2) = (f.host_of(0), f.l2_of(0));
    assert_ne!(l2, 0);
    assert_eq!(
        f.steps(0, &[(data, "data"), (l2, "L2")]),
        vec![
            w("data"),
            w("refblock"),
            Step::Barrier,
            w("L2"),
            Step::Barrier,
            w("L1[0]"),
            Step::Barrier,
        ]
    );
    let path = f.save();
    assert_eq!(qemu_check(&path), (0, 0));
    assert_reads(&path, 0x11, 0, 65536);
    assert_reads(&path, 0, 65536, (4 << 20) - 65536);
}

#[test]
fn a_new_l2_table_is_known_as_metadata_after_its_commit() {
    let f = fixture("cluster_size=65536", "4M", &[]);
    f.image
        .commit(vec![f.whole(0, 0x11)], Durability::Synced)
        .unwrap();
    let l2 = f.l2_of(0);
    assert!(
        f.image.meta.lock().metadata.contains(l2),
        "L2 table at {l2:#x}"
    );
    // And stays known when a later batch rewrites it in place.
    f.image
        .commit(vec![f.whole(f.cs(), 0x12)], Durability::Synced)
        .unwrap();
    assert!(
        f.image.meta.lock().metadata.contains(l2),
        "L2 table at {l2:#x}"
    );
}

#[test]
fn a_write_in_place_with_its_l2_table_unchanged_costs_one_barrier_when_durable_and_none_otherwise()
{
    let f = fixture("cluster_size=65536", "4M", &["write -P 0x22 0 64k"]);
    let host = f.host_of(0);
    assert_eq!(
        f.image.write_target(0).unwrap(),
        WriteTarget::InPlace { host }
    );
    let part = |byte: u8| ClusterWrite {
        guest: 0,
        target: WriteTarget::InPlace { host },
        pieces: vec![(0, vec![byte; 4096])],
    };
    let syncs = f.mem.syncs();
    f.image
        .commit(vec![part(0x33)], Durability::Synced)
        .unwrap();
    assert_eq!(
        f.steps(0, &[(host, "data")]),
        vec![w("data"), Step::Barrier]
    );
    assert_eq!(f.mem.syncs(), syncs + 1);

    let from = f.log.events().len();
    f.image
        .commit(vec![part(0x44)], Durability::Ordered)
        .unwrap();
    assert_eq!(f.steps(from, &[(host, "data")]), vec![w("data")]);
    assert_eq!(f.mem.syncs(), syncs + 1, "no barrier in the background");
    f.image.sync_pending().unwrap();
    assert_eq!(
        f.steps(from, &[(host, "data")]),
        vec![w("data"), Step::Barrier]
    );
    f.image.sync_pending().unwrap();
    assert_eq!(f.mem.syncs(), syncs + 2, "only one barrier was pending");

    let path = f.save();
    assert_eq!(qemu_check(&path), (0, 0));
    assert_reads(&path, 0x44, 0, 4096);
    assert_reads(&path, 0x22, 4096, 65536 - 4096);
}

#[test]
fn a_second_batch_stages_its_data_before_the_first_completes_but_its_l2_waits_for_its_barrier() {
    let f = fixture("cluster_size=65536", "4M", &[]);
    let cs = f.cs();
    let mut pipeline = f.image.pipeline();
    assert_eq!(pipeline.submit(vec![f.whole(0, 0xa1)], 1).unwrap(), None);
    assert_eq!(
        pipeline.submit(vec![f.whole(cs, 0xb2)], 2).unwrap(),
        Some(1)
    );
    assert_eq!(pipeline.finish(Durability::Synced).unwrap(), Some(2));
    let (d1, d2, l2) = (f.host_of(0), f.host_of(cs), f.l2_of(0));
    assert_eq!(l2, f.l2_of(cs), "one L2 table for both");
    let steps = f.steps(0, &[(d1, "data 1"), (d2, "data 2"), (l2, "L2")]);
    // Both batches write the same table: the first write holds only batch 1's entry.
    let l2_writes: Vec<Vec<u64>> = f
        .log
        .events()
        .iter()
        .filter_map(|e| match e {
            HostEvent::Write { offset, data } if *offset == l2 => Some(decode_words(data)),
            _ => None,
        })
        .collect();
    assert_eq!(l2_writes.len(), 2, "{steps:?}");
    assert_eq!(l2_writes[0][0] & OFFSET_MASK, d1);
    assert_eq!(l2_writes[0][1], 0);
    assert_eq!(l2_writes[1][1] & OFFSET_MASK, d2);

    let data2 = find(&steps, 0, &w("data 2"));
    let l2_first = find(&steps, 0, &w("L2"));
    let l2_second = find(&steps, l2_first + 1, &w("L2"));
    assert!(data2 < l2_first, "batch 2 is staged meanwhile: {steps:?}");
    // Each batch's L2 write follows a barrier that follows its data and refcounts.
    let data1 = find(&steps, 0, &w("data 1"));
    assert!(steps[data1..l2_first].contains(&Step::Barrier), "{steps:?}");
    let before_l2_second = steps[..l2_second]
        .iter()
        .rposition(|s| matches!(s, Step::Write(n) if n != "L2"))
        .unwrap();
    assert!(before_l2_second >= data2);
    assert!(
        steps[before_l2_second..l2_second].contains(&Step::Barrier),
        "{steps:?}"
    );
    assert_eq!(steps.last(), Some(&Step::Barrier), "durable: {steps:?}");

    let path = f.save();
    assert_eq!(qemu_check(&path), (0, 0));
    assert_reads(&path, 0xa1, 0, cs);
    assert_reads(&path, 0xb2, cs, cs);
}

#[test]
fn a_replaced_cluster_is_punched_only_after_the_barrier_behind_the_new_reference() {
    let f = fixture("cluster_size=65536", "4M", &["write -c -P 0x55 0 64k"]);
    let cs = f.cs();
    let compressed = match f.image.map(0, 1).unwrap().0 {
        ClusterSource::Compressed { host, .. } => host & !(cs - 1),
        other => panic!("not compressed: {other:?}"),
    };
    assert_eq!(f.image.write_target(0).unwrap(), WriteTarget::Allocate);
    f.image
        .commit(vec![f.whole(0, 0x66)], Durability::Synced)
        .unwrap();
    let (data, l2) = (f.host_of(0), f.l2_of(0));
    let steps = f.steps(0, &[(data, "data"), (l2, "L2")]);
    assert_eq!(
        steps,
        vec![
            w("data"),
            w("refblock"),
            Step::Barrier,
            w("L2"),
            Step::Barrier,
            w("refblock"),
            Step::Barrier,
            Step::Punch(compressed),
        ]
    );

    // Discarding the new cluster: the zero entry is durable before its cluster is punched.
    let from = f.log.events().len();
    let discard = ClusterWrite {
        guest: 0,
        target: WriteTarget::Discard,
        pieces: Vec::new(),
    };
    f.image.commit(vec![discard], Durability::Synced).unwrap();
    let steps = f.steps(from, &[(l2, "L2")]);
    let l2_write = find(&steps, 0, &w("L2"));
    let punch = find(&steps, 0, &Step::Punch(data));
    assert!(l2_write < punch, "{steps:?}");
    assert!(steps[l2_write..punch].contains(&Step::Barrier), "{steps:?}");

    let path = f.save();
    assert_eq!(qemu_check(&path), (0, 0));
    assert_reads(&path, 0, 0, 4 << 20);
}

#[test]
fn dropping_a_pipeline_with_a_batch_in_flight_leaves_the_image_as_it_was() {
    let f = fixture("cluster_size=65536", "4M", &["write -P 0x77 0 64k"]);
    let cs = f.cs();
    let before = f.read(0, 4 * cs);
    {
        let mut pipeline = f.image.pipeline();
        assert_eq!(pipeline.submit(vec![f.whole(cs, 0x88)], ()).unwrap(), None);
        // Dropped without finish: an error on the caller's side.
    }
    assert_eq!(f.read(0, 4 * cs), before);
    assert_eq!(f.image.map(cs, 1).unwrap().0, ClusterSource::Backing);
    let path = f.save();
    // The data cluster's refcount was stored before its barrier: one leak, nothing worse.
    assert_eq!(qemu_check(&path), (0, 1));
    run(
        "qemu-img",
        &["compare", "-q"],
        &f.original,
        &[path.to_str().unwrap()],
    );
    assert_reads(&path, 0x77, 0, cs);
    assert_reads(&path, 0, cs, (4 << 20) - cs);

    // The image commits again from what the disk holds; the leaked cluster is not reused.
    f.image
        .commit(vec![f.whole(cs, 0x99)], Durability::Synced)
        .unwrap();
    let path = f.save();
    assert_eq!(qemu_check(&path), (0, 1));
    assert_reads(&path, 0x77, 0, cs);
    assert_reads(&path, 0x99, cs, cs);
}

#[test]
fn batches_that_outgrow_the_refcount_table_move_it_and_leave_a_clean_image() {
    // 512-byte clusters with 64-bit refcounts: the table's one cluster covers 4096 clusters.
    let f = fixture("cluster_size=512,refcount_bits=64", "4M", &[]);
    let cs = f.cs();
    let old_table = f.image.header().refcount_table_offset;
    let per_batch = 512;
    let mut pipeline = f.image.pipeline();
    let mut completed = Vec::new();
    for b in 0..9u64 {
        let batch = (0..per_batch)
            .map(|i| f.whole((b * per_batch + i) * cs, 0x10 + b as u8))
            .collect();
        completed.extend(pipeline.submit(batch, b).unwrap());
    }
    completed.extend(pipeline.finish(Durability::Synced).unwrap());
    assert_eq!(completed, (0..9).collect::<Vec<_>>(), "in order, each once");
    let header = f.image.header();
    assert_ne!(header.refcount_table_offset, old_table, "the table moved");
    assert!(header.refcount_table_clusters >= 2);

    // The header names the new table only after a barrier behind the table, and the old table
    // is punched only after a barrier behind the header.
    let table = header.refcount_table_offset;
    let names: Vec<(u64, &str)> = (0..u64::from(header.refcount_table_clusters))
        .map(|i| (table + i * cs, "new table"))
        .collect();
    let steps = f.steps(0, &names);
    let header_write = find(&steps, 0, &w("header"));
    let table_write = steps[..header_write]
        .iter()
        .rposition(|s| s == &w("new table"))
        .expect("the new table is written before the header names it");
    assert!(steps[table_write..header_write].contains(&Step::Barrier));
    let punch = find(&steps, header_write, &Step::Punch(old_table));
    assert!(steps[header_write..punch].contains(&Step::Barrier));

    let path = f.save();
    assert_eq!(qemu_check(&path), (0, 0));
    for b in 0..9u64 {
        assert_reads(&path, 0x10 + b as u8, b * per_batch * cs, per_batch * cs);
    }
}

#[test]
fn a_new_refcount_block_is_durable_before_the_table_entry_that_names_it() {
    // 512-byte clusters with 1-bit refcounts: a block covers 4096 clusters, so 5000 clusters of
    // data need a second block, written at the end of the file, and a new table entry for it.
    let f = fixture("cluster_size=512,refcount_bits=1", "4M", &[]);
    let cs = f.cs();
    let header = f.image.header();
    let table = header.refcount_table_offset;
    assert_eq!(f.refcount_blocks().len(), 1, "qemu-img made one block");
    let batch = (0..5000u64).map(|i| f.whole(i * cs, 0x5a)).collect();
    f.image.commit(batch, Durability::Synced).unwrap();
    let blocks = f.refcount_blocks();
    assert_eq!(blocks.len(), 2, "a second block was added");
    assert_eq!(
        f.image.header().refcount_table_offset,
        table,
        "the table stays"
    );
    let names = [(blocks[1], "new block"), (table, "table")];
    let steps = f.steps(0, &names);
    let table_write = find(&steps, 0, &w("table"));
    let block_write = steps[..table_write]
        .iter()
        .rposition(|s| s == &w("new block"))
        .expect("the new block is written before the table names it");
    assert!(
        steps[block_write..table_write].contains(&Step::Barrier),
        "no barrier between the new block and the table entry: {steps:?}"
    );
    let path = f.save();
    assert_eq!(qemu_check(&path), (0, 0));
    assert_reads(&path, 0x5a, 0, 5000 * cs);
}

/// A file whose next barrier fails once (as fdatasync does after a lost write-back).
#[derive(Debug)]
struct FailingSync {
    inner: Arc<MemFile>,
    fail_next: std::sync::atomic::AtomicBool,
}

impl crate::io::HostIo for FailingSync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_all_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_all_at(data, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        if self
            .fail_next
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.sync_data()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn start_writeback(&self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn after_a_failed_barrier_every_commit_and_barrier_fails_even_when_the_disk_works_again() {
    let f = fixture("cluster_size=65536", "4M", &[]);
    let io = Arc::new(FailingSync {
        inner: Arc::new(MemFile::new(f.mem.contents())),
        fail_next: std::sync::atomic::AtomicBool::new(false),
    });
    let file = HostFile::over(&f.original, io.clone());
    let bytes = io.inner.contents();
    let header = Header::parse(&bytes[..4096], bytes.len() as u64).unwrap();
    let image = Qcow2Image::open(file, header, true).unwrap();
    let cs = image.layout().cluster_size() as usize;
    let write = |guest: u64| ClusterWrite {
        guest,
        target: image.write_target(guest).unwrap(),
        pieces: vec![(0, vec![0x33; cs])],
    };
    image.commit(vec![write(0)], Durability::Synced).unwrap();
    io.fail_next
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let err = image
        .commit(vec![write(cs as u64)], Durability::Synced)
        .unwrap_err();
    assert_eq!(err.errno(), libc::EIO, "{err}");
    // The disk would sync now, but what the kernel dropped is gone: refuse, do not pretend.
    let again = image
        .commit(vec![write(2 * cs as u64)], Durability::Synced)
        .unwrap_err();
    assert_eq!(again.errno(), libc::EIO, "{again}");
    assert_eq!(image.sync_pending().unwrap_err().errno(), libc::EIO);
}
