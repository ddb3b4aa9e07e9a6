//! The new L2 tables of a batch, computed in memory: each staged cluster's entry points at its host
//! cluster (or reads as zeros), tables are created or copied from a snapshot's as needed, and every
//! reference the new state drops is collected for release once it is durable.

use std::collections::BTreeMap;

use super::image::{Meta, Qcow2Image};
use super::layout::SUBCLUSTERS;
use super::table::{L1Entry, L2Entry};
use super::WriteTarget;
use crate::error::Result;

/// New L2 tables by L1 index: (host offset, decoded words).
pub(super) type NewTables = BTreeMap<u64, (u64, Vec<u64>)>;

/// Host ranges whose references a commit drops once the new metadata is durable: every cluster
/// overlapping one loses one reference.
#[derive(Debug, Default)]
pub(super) struct Releases(pub Vec<(u64, u64)>);

/// One staged cluster: where its data went and which parts of it were written.
#[derive(Debug)]
pub(super) struct StagedCluster {
    pub guest: u64,
    pub target: WriteTarget,
    pub host: u64,
    /// (offset in the cluster, length) of each piece written.
    pub spans: Vec<(u64, u64)>,
}

impl Qcow2Image {
    /// Point the L2 entry of `w` at its host cluster, copying or creating its L2 table as needed.
    pub(super) fn update_l2(
        &self,
        meta: &mut Meta,
        l2_new: &mut NewTables,
        releases: &mut Releases,
        w: &StagedCluster,
    ) -> Result<()> {
        let cs = self.layout.cluster_size();
        let l1_index = self.layout.l1_index(w.guest);
        let i = self.layout.l2_index(w.guest) as usize;
        let ext = self.layout.extended_l2;
        if let std::collections::btree_map::Entry::Vacant(slot) = l2_new.entry(l1_index) {
            let l1 = L1Entry(meta.l1[l1_index as usize]);
            let old = l1.l2_offset();
            let (offset, table) = if old == 0 {
                let fresh = self.alloc_cluster(meta)? * cs;
                (fresh, vec![0u64; (cs / 8) as usize])
            } else if l1.is_copied() {
                (old, self.l2_table(meta, old)?.as_ref().clone())
            } else {
                // Shared with a snapshot: copy the table; the snapshot keeps the old one.
                let copy = self.l2_table(meta, old)?.as_ref().clone();
                let fresh = self.alloc_cluster(meta)? * cs;
                releases.0.push((old, cs));
                (fresh, copy)
            };
            slot.insert((offset, table));
        }
        let Some((_, table)) = l2_new.get_mut(&l1_index) else {
            return Ok(());
        };
        let (_, old) = L2Entry::at(table, i, ext);
        let new = match w.target {
            WriteTarget::Allocate | WriteTarget::Discard => {
                // What it names is released below: never metadata, whatever the entry says.
                let table = L1Entry(meta.l1[l1_index as usize]).l2_offset();
                self.checked_for_write(meta, table, old, w.guest)?;
                if old.is_compressed() {
                    releases.0.push(old.compressed_range(&self.layout));
                } else if old.host_cluster() != 0 {
                    releases.0.push((old.host_cluster(), cs));
                }
                if w.target == WriteTarget::Allocate {
                    L2Entry::data(w.host, &self.layout)
                } else {
                    L2Entry::zero(&self.layout)
                }
            }
            WriteTarget::InPlace { .. } if ext => {
                let sc = self.layout.subcluster_size();
                let mut bits = 0u32;
                for &(off, len) in &w.spans {
                    let first = off / sc;
                    let last = (off + len - 1) / sc;
                    for s in first..=last.min(u64::from(SUBCLUSTERS) - 1) {
                        bits |= 1 << s;
                    }
                }
                old.with_subclusters_written(bits)
            }
            WriteTarget::InPlace { .. } => old.without_zero_flag(&self.layout),
        };
        new.store_at(table, i, ext);
        Ok(())
    }

    /// A new host cluster (index) for data or an L2 table.
    pub(super) fn alloc_cluster(&self, meta: &mut Meta) -> Result<u64> {
        let Meta {
            alloc, metadata, ..
        } = meta;
        alloc.alloc(&self.file, metadata)
    }

    /// Load the refcounts before the first allocation (see `Allocator::ensure_loaded`).
    pub(super) fn ensure_refcounts(&self, meta: &mut Meta) -> Result<()> {
        let Meta { alloc, header, .. } = meta;
        alloc.ensure_loaded(&self.file, header)
    }
}
