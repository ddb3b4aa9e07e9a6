//! LVM2 logical volumes inside a physical volume of the guest disk (RHEL, CentOS and Rocky cloud
//! images keep their root there), read by the lamlvm crate once lvm_bounds.rs has bounded what
//! it would trust. Each visible LV is a candidate file system like a partition: its linear
//! segments on this PV become an [`LvDevice`], the disk seen through the LV's map, readable and
//! (for the editing commands) writable. What lamlvm does not read, or what lies elsewhere —
//! RAID, thin, snapshot and striped segments, extents on another PV — is named, never guessed.

use std::sync::Arc;

use embedded_io::{ErrorKind, ErrorType, Read, Seek, SeekFrom};
use lamlvm::metadata::LVDesc;
use lamlvm::Lvm2;

use super::lvm_bounds::{self, PvError, PvLayout};
use super::tree::shown;
use crate::disk::BlockDevice;
use crate::error::{Error, Result};

/// The longest of lamlvm's messages kept (a parse error can quote the metadata at length).
const MESSAGE_LIMIT: usize = 120;

/// One visible logical volume of a PV: its `VG/LV` name (terminal-safe), its map or why it is
/// not read, and whether it may be changed.
pub(crate) struct LogicalVolume {
    pub name: String,
    pub map: std::result::Result<Arc<LvDevice>, LvError>,
    /// Why writing it would be wrong, when it would.
    pub read_only: Option<LvError>,
}

/// Why a logical volume is not read, or not changed.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum LvError {
    #[error("a {0} volume")]
    Kind(String),
    #[error("its extents lie on another physical volume (a VG over several disks)")]
    OtherPv,
    #[error("its segments are damaged ({0})")]
    Segments(&'static str),
    #[error("it is not writable in its volume group (status without WRITE)")]
    NotWritable,
    #[error("its volume group holds snapshots, which writing an origin would corrupt")]
    Snapshots,
}

/// The logical volumes of the PV in `len` bytes of `disk` from `start`, by name; Err: why the
/// PV cannot be read (damaged, hostile, or a layout lamlvm does not read).
pub(crate) fn volumes(
    disk: &Arc<dyn BlockDevice>,
    start: u64,
    len: u64,
) -> std::result::Result<Vec<LogicalVolume>, PvError> {
    let layout = lvm_bounds::check(disk.as_ref(), start, len)?;
    let reader = PvReader {
        disk: disk.as_ref(),
        start,
        len,
        at: 0,
    };
    let lvm = Lvm2::open(reader).map_err(|e| {
        let m: String = e.to_string().chars().take(MESSAGE_LIMIT).collect();
        PvError::Metadata(shown(m.as_bytes()))
    })?;
    // Old-style snapshots keep their copy-on-write in a segment of their own: writing the
    // origin without it would change what the snapshot shows.
    let snapshots = lvm.lvs().any(|lv| {
        let desc = lv.raw_metadata();
        desc.segments.0.values().any(|s| s.r#type == "snapshot")
    });
    let extent = lvm.extent_size();
    let mut out = Vec::new();
    for lv in lvm.lvs() {
        let desc = lv.raw_metadata();
        // Sub-volumes (RAID legs, thin pools' data) are not VISIBLE: only what `lvs` lists.
        if !desc.status.iter().any(|s| s == "VISIBLE") {
            continue;
        }
        let name = shown(format!("{}/{}", lvm.vg_name(), lv.name()).as_bytes());
        let map = runs(desc, lvm.pv_name(), extent, &layout, len).map(|(runs, size)| {
            Arc::new(LvDevice {
                disk: disk.clone(),
                start,
                runs,
                size,
            })
        });
        let read_only = match (desc.status.iter().any(|s| s == "WRITE"), snapshots) {
            (false, _) => Some(LvError::NotWritable),
            (true, true) => Some(LvError::Snapshots),
            (true, false) => None,
        };
        out.push(LogicalVolume {
            name,
            map,
            read_only,
        });
    }
    Ok(out)
}

/// `len` bytes of the LV from byte `lv` lie at byte `pv` of the PV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    lv: u64,
    pv: u64,
    len: u64,
}

/// The runs of the LV `desc` in LV order, and its size: every segment linear on the PV named
/// `pv_name` (extents of `extent` bytes), inside its data area and clear of its label and
/// metadata areas; Err names what is not.
fn runs(
    desc: &LVDesc,
    pv_name: &str,
    extent: u64,
    layout: &PvLayout,
    pv_len: u64,
) -> std::result::Result<(Vec<Run>, u64), LvError> {
    // lamlvm keeps segments by name: a duplicate or unreadable one would be missing.
    if desc.segments.0.len() != desc.segment_count {
        return Err(LvError::Segments("fewer segments than it declares"));
    }
    let mut segments: Vec<_> = desc.segments.0.values().collect();
    segments.sort_by_key(|s| s.start_extent);
    let mut out = Vec::with_capacity(segments.len());
    let mut next = 0u64;
    for s in segments {
        let linear = s.r#type == "striped" && s.stripe_count == Some(1);
        let Some((pv, first)) = s.stripes.as_ref().filter(|_| linear) else {
            return Err(LvError::Kind(match s.r#type.as_str() {
                "striped" => "striped".to_string(),
                other => shown(other.as_bytes()),
            }));
        };
        if pv != pv_name {
            return Err(LvError::OtherPv);
        }
        let bytes = |extents: u64| extents.checked_mul(extent);
        let pv_at = bytes(*first).and_then(|b| b.checked_add(layout.data_start));
        let (Some(lv), Some(pv_at), Some(len)) =
            (bytes(s.start_extent), pv_at, bytes(s.extent_count))
        else {
            return Err(LvError::Segments("they overflow"));
        };
        if lv != next || len == 0 {
            return Err(LvError::Segments("they leave a gap or overlap"));
        }
        let Some(end) = pv_at.checked_add(len).filter(|&e| e <= pv_len) else {
            return Err(LvError::Segments(
                "they lie past the end of the physical volume",
            ));
        };
        let clear = |(o, n): &(u64, u64)| end <= *o || pv_at >= o.saturating_add(*n);
        if pv_at < LABEL_BYTES || !layout.metadata.iter().all(clear) {
            return Err(LvError::Segments(
                "they overlap the volume's label or metadata",
            ));
        }
        out.push(Run { lv, pv: pv_at, len });
        next = lv
            .checked_add(len)
            .ok_or(LvError::Segments("they overflow"))?;
    }
    if next == 0 {
        return Err(LvError::Segments("it has no extents"));
    }
    Ok((out, next))
}

/// The first four sectors, where the label may lie.
const LABEL_BYTES: u64 = 2048;

/// The PV as lamlvm reads it: `len` bytes of `disk` from `start`.
struct PvReader<'a> {
    disk: &'a dyn BlockDevice,
    start: u64,
    len: u64,
    at: u64,
}

impl ErrorType for PvReader<'_> {
    type Error = ErrorKind;
}

impl Read for PvReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::result::Result<usize, ErrorKind> {
        let n = (self.len.saturating_sub(self.at)).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.disk
            .read_at(self.start + self.at, &mut buf[..n])
            .map_err(|_| ErrorKind::Other)?;
        self.at += n as u64;
        Ok(n)
    }
}

impl Seek for PvReader<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::result::Result<u64, ErrorKind> {
        let to = match pos {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.at.checked_add_signed(d),
        };
        self.at = to.ok_or(ErrorKind::InvalidInput)?;
        Ok(self.at)
    }
}

/// A logical volume as a disk: each byte where the LV's map puts it on the PV.
pub(crate) struct LvDevice {
    disk: Arc<dyn BlockDevice>,
    /// Where the PV starts on the disk.
    start: u64,
    runs: Vec<Run>,
    size: u64,
}

impl LvDevice {
    /// Each piece of [offset, offset + len) of the LV as (disk offset, bytes, offset into the
    /// caller's buffer); Err past the LV's end.
    fn pieces(&self, offset: u64, len: usize) -> Result<Vec<(u64, usize, usize)>> {
        let end = offset.checked_add(len as u64).filter(|&e| e <= self.size);
        if end.is_none() {
            let e = std::io::Error::from_raw_os_error(libc::EINVAL);
            return Err(Error::new("<logical volume>", e));
        }
        let mut out = Vec::new();
        let mut done = 0usize;
        while done < len {
            let at = offset + done as u64;
            // The runs cover [0, size) in order without gaps (checked when they were made).
            let i = self.runs.partition_point(|r| r.lv + r.len <= at);
            let r = self.runs[i];
            let n = ((r.lv + r.len - at) as usize).min(len - done);
            out.push((self.start + r.pv + (at - r.lv), n, done));
            done += n;
        }
        Ok(out)
    }
}

impl BlockDevice for LvDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        for (at, n, from) in self.pieces(offset, buf.len())? {
            self.disk.read_at(at, &mut buf[from..from + n])?;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        for (at, n, from) in self.pieces(offset, data.len())? {
            self.disk.write_at(at, &data[from..from + n])?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.disk.flush()
    }

    fn is_read_only(&self) -> bool {
        self.disk.is_read_only()
    }

    fn allocated_bytes(&self) -> Result<u64> {
        Ok(self.size)
    }

    /// Every byte counts as data: the guest readers do not ask, and an answer that skipped
    /// data would lose it.
    fn seek(&self, offset: u64, want_data: bool) -> Result<Option<u64>> {
        Ok(match (offset < self.size, want_data) {
            (true, true) => Some(offset),
            (true, false) => Some(self.size),
            (false, _) => None,
        })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        for (at, n, _) in self.pieces(offset, len)? {
            self.disk.discard(at, n as u64)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{LvDevice, Run};
    use crate::disk::memory::MemoryDisk;
    use crate::disk::BlockDevice;
    use std::sync::Arc;

    #[test]
    fn reads_and_writes_follow_the_map_across_runs_and_stop_at_the_end() {
        let bytes: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let disk = Arc::new(MemoryDisk::new(bytes.clone()));
        // LV [0, 100) at PV 1000, [100, 300) at PV 200; the PV starts at disk byte 512.
        let lv = LvDevice {
            disk: disk.clone(),
            start: 512,
            runs: vec![
                Run {
                    lv: 0,
                    pv: 1000,
                    len: 100,
                },
                Run {
                    lv: 100,
                    pv: 200,
                    len: 200,
                },
            ],
            size: 300,
        };
        let mut buf = vec![0u8; 20];
        lv.read_at(90, &mut buf).unwrap();
        assert_eq!(&buf[..10], &bytes[1512 + 90..1512 + 100]);
        assert_eq!(&buf[10..], &bytes[712..722]);
        assert!(lv.read_at(290, &mut buf).is_err());
        lv.write_at(95, &[9u8; 10]).unwrap();
        let d = disk.bytes();
        assert_eq!(&d[1512 + 95..1512 + 100], &[9u8; 5]);
        assert_eq!(&d[712..717], &[9u8; 5]);
        assert_eq!(d[717], bytes[717]);
    }
}
