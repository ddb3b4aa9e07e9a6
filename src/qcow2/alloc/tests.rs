//! Unit tests of the allocator, in memory: images made by qemu-img, loaded into a `MemFile`, and
//! the refcounts the allocator stores judged by `qemu-img check` (every cluster it hands out and
//! nothing references is exactly one leak, so the leak count checks every refcount it wrote).

use std::path::PathBuf;
use std::sync::Arc;

use super::*;
use crate::io::MemFile;
use crate::qcow2::header::HeaderUpdate;
use crate::qcow2::qemu_tools::{qemu_check, run};
use crate::qcow2::words::read_words;

/// An image qemu-img made, held in memory, with an allocator whose refcounts are loaded.
struct Fixture {
    dir: tempfile::TempDir,
    mem: Arc<MemFile>,
    file: HostFile,
    header: Header,
    metadata: MetadataMap,
    alloc: Allocator,
}

/// `qemu-img create -f qcow2 -o cluster_size=CS,refcount_bits=BITS img SIZE`, loaded in memory.
fn fixture(cluster_size: u32, refcount_bits: u32, size: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    let opts = format!("cluster_size={cluster_size},refcount_bits={refcount_bits}");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", &opts],
        &path,
        &[size],
    );
    let bytes = std::fs::read(&path).unwrap();
    let mem = Arc::new(MemFile::new(bytes.clone()));
    let file = HostFile::over(&path, mem.clone());
    let want = Header::bytes_wanted(&bytes).unwrap().min(bytes.len());
    let header = Header::parse(&bytes[..want], bytes.len() as u64).unwrap();
    let l1 = read_words(&file, header.l1_table_offset, header.l1_size as usize).unwrap();
    let metadata = MetadataMap::build(&file, &header, &l1, &[]).unwrap();
    let mut alloc = Allocator::new(&header, bytes.len() as u64);
    alloc.ensure_loaded(&file, &header).unwrap();
    Fixture {
        dir,
        mem,
        file,
        header,
        metadata,
        alloc,
    }
}

impl Fixture {
    fn cs(&self) -> u64 {
        self.header.cluster_size()
    }

    fn refcount(&mut self, cluster: u64) -> u64 {
        let file = &self.file;
        self.alloc
            .refcounts(file)
            .unwrap()
            .get(file, cluster)
            .unwrap()
    }

    fn alloc(&mut self) -> u64 {
        self.alloc.alloc(&self.file, &self.metadata).unwrap()
    }

    fn release(&mut self, cluster: u64) -> Vec<u64> {
        let mut freed = Vec::new();
        let cs = self.cs();
        self.alloc
            .release(&self.file, cluster * cs, cs, &mut freed)
            .unwrap();
        freed
    }

    /// What `prepare` does before storing: the metadata map tracks clusters up to the new end.
    fn track_end(&mut self) {
        self.metadata.set_end(self.alloc.end_cluster());
    }

    /// Store the refcounts and write the in-memory file out for qemu-img, as long as the clusters
    /// handed out (their data would have been written; qemu-img counts no cluster past the end).
    fn save(&mut self) -> PathBuf {
        self.track_end();
        let end = self.alloc.end_cluster() * self.cs();
        if self.file.len().unwrap() < end {
            self.file.set_len(end).unwrap();
        }
        assert!(store(&mut self.alloc, &self.file, &mut self.metadata).is_none());
        let path = self.dir.path().join("after.qcow2");
        std::fs::write(&path, self.mem.contents()).unwrap();
        path
    }
}

#[test]
fn reuses_a_freed_cluster_before_growing_the_file() {
    let mut f = fixture(512, 16, "1M");
    let a = f.alloc();
    let b = f.alloc();
    let c = f.alloc();
    assert_eq!((b, c), (a + 1, a + 2), "new clusters come from the end");
    let end = f.alloc.end_cluster();
    assert_eq!(f.release(b), vec![b]);
    assert_eq!(f.alloc(), b, "the freed cluster comes back first");
    assert_eq!(f.alloc.end_cluster(), end, "the file did not grow for it");
    assert_eq!(f.refcount(b), 1);
    assert_eq!(f.alloc(), end, "with nothing free, the file grows");
    let path = f.save();
    // a, b, c and the last one: allocated, counted, referenced by nothing.
    assert_eq!(qemu_check(&path), (0, 4));
}

#[test]
fn never_hands_out_a_free_cluster_the_metadata_map_marks_as_metadata() {
    let mut f = fixture(512, 16, "1M");
    let a = f.alloc();
    let b = f.alloc();
    f.release(a);
    f.release(b);
    let cs = f.cs();
    f.track_end();
    // Refcount 0 but known to hold an L2 table (a damaged refcount, or one not yet stored).
    f.metadata.add(MetaKind::L2Table, a * cs, cs);
    assert_eq!(f.refcount(a), 0);
    assert_eq!(f.alloc(), b, "the free cluster that is not metadata");
    let next = f.alloc();
    assert_ne!(next, a);
    assert_eq!(next, b + 1, "past b only the end is left");
    assert_eq!(f.refcount(a), 0);
}

#[test]
fn creates_a_refcount_block_when_the_file_grows_past_what_one_block_covers() {
    // 512-byte clusters with 1-bit refcounts: one block covers 4096 clusters.
    let mut f = fixture(512, 1, "4M");
    assert_eq!(f.alloc.refcounts(&f.file).unwrap().per_block(), 4096);
    let first = f.alloc.end_cluster();
    let mut last = first;
    while last < 4095 {
        last = f.alloc();
    }
    assert!(!f.alloc.refcounts(&f.file).unwrap().has_block_for(4096));
    assert_eq!(f.alloc(), 4096);
    // The new block went to the end, right after the cluster that needed it, and counts itself.
    let cs = f.cs();
    let rc = f.alloc.refcounts(&f.file).unwrap();
    assert_eq!(rc.block_offsets().collect::<Vec<_>>()[1], 4097 * cs);
    assert!(rc.table_dirty());
    assert_eq!(f.alloc.end_cluster(), 4098);
    assert_eq!(f.refcount(4097), 1);
    assert_eq!(f.refcount(4096), 1);
    f.track_end();
    assert!(!f.metadata.contains(4097 * cs), "known only once stored");
    let path = f.save();
    assert!(f.metadata.contains(4097 * cs));
    assert_eq!(
        f.alloc.committed_table,
        (f.header.refcount_table_offset, 1),
        "a new block does not move the table"
    );
    // Every cluster handed out is a leak; the block is referenced by the table.
    assert_eq!(qemu_check(&path), (0, 4096 - first + 1));
}

#[test]
fn moves_the_refcount_table_when_it_grows_and_commits_it_only_when_told() {
    // 512-byte clusters with 64-bit refcounts: 64 clusters per block, 64 blocks per table
    // cluster, so cluster 4096 needs a second table cluster.
    let mut f = fixture(512, 64, "1M");
    let cs = f.cs();
    let old = (f.header.refcount_table_offset, 1);
    assert_eq!(f.alloc.committed_table, old);
    let first = f.alloc.end_cluster();
    let mut data = Vec::new();
    while f.alloc.refcounts(&f.file).unwrap().table_place().0 == old.0 {
        data.push(f.alloc());
    }
    assert_eq!(
        data.last(),
        Some(&4096),
        "the cluster the old table cannot cover"
    );
    assert_eq!(f.alloc.committed_table, old, "placed, not committed");
    f.track_end();
    assert!(
        f.alloc.store_blocks(&f.file, &mut f.metadata).unwrap(),
        "new blocks and a new place change the table"
    );
    let moved = f
        .alloc
        .store_table(&f.file)
        .unwrap()
        .expect("the table moved");
    // The table (doubled) went to the end after that cluster, then the block it needed.
    assert_eq!((moved.offset, moved.clusters), (4097 * cs, 2));
    assert_eq!(moved.old, old);
    assert_eq!(f.refcount(4097), 1);
    assert_eq!(f.refcount(4098), 1);
    assert_eq!(f.alloc.committed_table, old, "store does not commit it");
    assert!(!f.metadata.contains(moved.offset));
    // The new table is on the file already, the header still names the old one.
    let mut entry = [0u8; 8];
    f.file.read_at(moved.offset + 64 * 8, &mut entry).unwrap();
    assert_eq!(
        u64::from_be_bytes(entry),
        4099 * cs,
        "block 64, after the table"
    );
    let mut header_field = [0u8; 8];
    f.file.read_at(0x30, &mut header_field).unwrap();
    assert_eq!(u64::from_be_bytes(header_field), old.0);
    // The move is reported once.
    assert!(store(&mut f.alloc, &f.file, &mut f.metadata).is_none());

    f.alloc.table_committed(&moved, &mut f.metadata);
    assert_eq!(f.alloc.committed_table, (moved.offset, 2));
    assert!(f.metadata.contains(moved.offset) && f.metadata.contains(moved.offset + cs));
    // What the commit pipeline does next: point the header to it, release the old table.
    let (at, fields) = HeaderUpdate::RefcountTable {
        offset: moved.offset,
        clusters: 2,
    }
    .encode();
    f.file.write_at(at, &fields).unwrap();
    f.metadata.remove_range(old.0, cs);
    assert_eq!(f.release(old.0 / cs), vec![old.0 / cs]);
    let path = f.save();
    // Every data cluster leaks; the 63 blocks placed among them (one per 64 clusters) do not.
    assert_eq!(data.len() as u64 + 63, 4096 - first + 1);
    assert_eq!(qemu_check(&path), (0, data.len() as u64));
}

#[test]
fn releasing_the_last_reference_frees_the_cluster_and_moves_the_cursor_back() {
    let mut f = fixture(512, 16, "1M");
    let a = f.alloc();
    let b = f.alloc();
    assert_eq!(f.alloc.free_cursor, b + 1);
    assert_eq!(f.release(a), vec![a]);
    assert_eq!(f.refcount(a), 0);
    assert_eq!(f.alloc.free_cursor, a);
    // A second reference: dropping one leaves the cluster in use, the cursor where it was.
    let file = &f.file;
    f.alloc.refcounts(file).unwrap().set(file, b, 2).unwrap();
    assert_eq!(f.release(b), Vec::<u64>::new());
    assert_eq!(f.refcount(b), 1);
    assert_eq!(f.alloc.free_cursor, a);
    // A range releases every cluster it overlaps, here b's last byte and one of the next.
    let c = f.alloc();
    assert_eq!(c, a);
    let d = f.alloc();
    let cs = f.cs();
    let mut freed = Vec::new();
    f.alloc
        .release(&f.file, b * cs + cs - 1, 2, &mut freed)
        .unwrap();
    assert_eq!(freed, vec![b, d]);
    assert_eq!(f.alloc.free_cursor, b);
}

/// Warnings logged while the tests run (the only logger of the library's tests).
struct Warnings(std::sync::Mutex<Vec<String>>);

static WARNINGS: Warnings = Warnings(std::sync::Mutex::new(Vec::new()));

impl log::Log for Warnings {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            self.0.lock().unwrap().push(record.args().to_string());
        }
    }

    fn flush(&self) {}
}

fn warnings_containing(text: &str) -> Vec<String> {
    let all = WARNINGS.0.lock().unwrap();
    all.iter().filter(|w| w.contains(text)).cloned().collect()
}

#[test]
fn releasing_a_cluster_with_refcount_zero_only_warns() {
    if log::set_logger(&WARNINGS).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let mut f = fixture(512, 16, "1M");
    let a = f.alloc();
    let b = f.alloc();
    assert_eq!(f.release(a), vec![a]);
    f.alloc.free_cursor = b + 1;
    assert_eq!(f.release(a), Vec::<u64>::new(), "not freed twice");
    assert_eq!(f.refcount(a), 0, "no underflow");
    assert_eq!(f.alloc.free_cursor, b + 1, "the cursor stays");
    let path = f.file.path().display().to_string();
    let expected = format!("{path}: cluster {:#x} already has refcount 0", a * f.cs());
    assert_eq!(warnings_containing(&expected), vec![expected]);
    let saved = f.save();
    assert_eq!(qemu_check(&saved), (0, 1), "b leaks; a is free");
}

#[test]
fn a_second_reference_overflows_one_bit_refcounts() {
    let mut f = fixture(512, 1, "1M");
    let a = f.alloc();
    let file = &f.file;
    let err = f
        .alloc
        .refcounts(file)
        .unwrap()
        .set(file, a, 2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("overflow"), "{err}");
    assert!(err.contains("img.qcow2"), "{err}");
    assert_eq!(f.refcount(a), 1, "unchanged");
    let path = f.save();
    assert_eq!(qemu_check(&path), (0, 1));
}

/// Both halves of storing the refcounts, as the pipeline runs them (the barrier between them is
/// the pipeline's business).
fn store(alloc: &mut Allocator, file: &HostFile, metadata: &mut MetadataMap) -> Option<TableMove> {
    alloc.store_blocks(file, metadata).unwrap();
    alloc.store_table(file).unwrap()
}
