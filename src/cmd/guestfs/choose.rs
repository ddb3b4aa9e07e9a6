//! Which part of the guest disk holds the file system a command reads or changes: the whole
//! disk, a partition, or a logical volume of an LVM2 physical volume found on either (lvm.rs).
//! `--partition N` and `--lv VG/LV` choose; without them the one readable file system is taken,
//! and several are listed for the user to choose from.

use std::path::Path;
use std::sync::Arc;

use super::detect;
use super::error::{Contents, GuestError};
use super::lvm;
use crate::disk::partition::read_table;
use crate::disk::BlockDevice;
use crate::error::Error;

/// Said when a chain with a legacy AES layer shows no readable file system.
pub(super) const AES_HINT: &str = "; or the passphrase is wrong (legacy AES cannot check it)";

/// An error that does not yet name its image, or one that already names a file.
pub(super) enum Choice {
    Guest(GuestError),
    Disk(Error),
}

impl Choice {
    pub(super) fn at_image(self, image: &Path) -> Error {
        match self {
            Choice::Guest(g) => Error::new(image, g),
            Choice::Disk(e) => e,
        }
    }
}

impl From<Error> for Choice {
    fn from(e: Error) -> Self {
        Choice::Disk(e)
    }
}

/// The file system's place: `len` bytes of `device` from `start`, `view` naming it in messages
/// as the mountpoint does (`disk`, `disk-part2`) or as LVM does (`VG/LV`).
pub(crate) struct Volume {
    pub view: String,
    pub device: Arc<dyn BlockDevice>,
    pub start: u64,
    pub len: u64,
    /// Why changing it would be wrong (a logical volume whose volume group holds snapshots),
    /// when it would.
    pub read_only: Option<String>,
}

/// What the user chose: a partition (Linux numbering), a logical volume (`VG/LV`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Wanted<'a> {
    pub partition: Option<u32>,
    pub lv: Option<&'a str>,
}

/// One place a file system may be, as listed when none or several are readable.
/// Where a candidate lies, as the listings name it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    Disk,
    Partition(u32),
    /// A logical volume, by its (terminal-safe) `VG/LV` name.
    Lv(String),
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Disk => f.write_str("the disk"),
            Place::Partition(n) => write!(f, "partition {n}"),
            Place::Lv(name) => write!(f, "LV {name}"),
        }
    }
}

struct Candidate {
    place: Place,
    volume: Volume,
    /// What it holds, or why a logical volume is not read.
    found: Result<Contents, String>,
}

impl Candidate {
    fn readable(&self) -> bool {
        matches!(self.found, Ok(c) if c.is_supported())
    }

    /// The `VG/LV` name of a logical volume.
    fn lv_name(&self) -> Option<&str> {
        match &self.place {
            Place::Lv(name) => Some(name),
            _ => None,
        }
    }

    fn described(&self) -> String {
        match &self.found {
            Ok(c) => format!("{}: {}", self.place, c.name()),
            Err(why) => format!("{}: not read ({why})", self.place),
        }
    }
}

/// The volume to read on `disk` (see the module's comment). `aes`: a legacy AES layer is in the
/// chain (a wrong passphrase reads as noise).
pub(crate) fn choose(
    disk: &Arc<dyn BlockDevice>,
    wanted: Wanted,
    aes: bool,
) -> std::result::Result<Volume, Choice> {
    let size = disk.size();
    let table = read_table(disk.as_ref());
    let at = |view: String, start, len| Volume {
        view,
        device: disk.clone(),
        start,
        len,
        read_only: None,
    };
    // The places to look: the partition asked for; else the whole disk when it holds a file
    // system or a PV; else every partition.
    let mut places = Vec::new();
    if let Some(n) = wanted.partition {
        let Some(p) = table.partitions.iter().find(|p| p.number == n) else {
            let present = match table.partitions.is_empty() {
                true => "it has no partition table".to_string(),
                false => format!(
                    "it has {}",
                    numbers(table.partitions.iter().map(|p| p.number))
                ),
            };
            return Err(Choice::Guest(GuestError::NoPartition {
                number: n,
                present,
            }));
        };
        places.push((
            Place::Partition(n),
            at(format!("disk-part{n}"), p.start, p.len),
        ));
    } else {
        let whole = detect::detect(disk.as_ref(), 0, size)?;
        if whole.is_supported() || whole == Contents::Lvm2 || table.partitions.is_empty() {
            places.push((Place::Disk, at("disk".into(), 0, size)));
        } else {
            for p in &table.partitions {
                let view = format!("disk-part{}", p.number);
                places.push((Place::Partition(p.number), at(view, p.start, p.len)));
            }
        }
    }
    let single = places.len() == 1;
    let mut candidates = Vec::new();
    for (place, volume) in places {
        let found = detect::detect(volume.device.as_ref(), volume.start, volume.len)?;
        if found != Contents::Lvm2 {
            candidates.push(Candidate {
                place,
                volume,
                found: Ok(found),
            });
            continue;
        }
        let lvs = lvm::volumes(disk, volume.start, volume.len);
        let lvs = match (lvs, wanted.lv, single) {
            (Ok(lvs), _, _) => lvs,
            // A PV that cannot be read, where it was the only place or an LV was asked for.
            (Err(why), Some(_), _) | (Err(why), None, true) => {
                let view = volume.view;
                let why = why.to_string();
                return Err(Choice::Guest(GuestError::LvmUnread { view, why }));
            }
            (Err(why), None, false) => {
                candidates.push(Candidate {
                    place,
                    volume,
                    found: Err(format!("an LVM2 physical volume: {why}")),
                });
                continue;
            }
        };
        for lv in lvs {
            let candidate = match lv.map {
                Ok(dev) => {
                    let len = dev.size();
                    let device: Arc<dyn BlockDevice> = dev;
                    let found = detect::detect(device.as_ref(), 0, len)?;
                    Candidate {
                        place: Place::Lv(lv.name.clone()),
                        volume: Volume {
                            view: lv.name,
                            device,
                            start: 0,
                            len,
                            read_only: lv.read_only.map(|e| e.to_string()),
                        },
                        found: Ok(found),
                    }
                }
                Err(why) => Candidate {
                    place: Place::Lv(lv.name.clone()),
                    volume: at(lv.name, 0, 0),
                    found: Err(why.to_string()),
                },
            };
            candidates.push(candidate);
        }
    }
    if let Some(lv) = wanted.lv {
        return chosen_lv(candidates, lv);
    }
    let readable: Vec<&Candidate> = candidates.iter().filter(|c| c.readable()).collect();
    match readable.len() {
        1 => {}
        0 => {
            return Err(Choice::Guest(match candidates.as_slice() {
                [only] if only.place == Place::Disk || wanted.partition.is_some() => {
                    match only.found {
                        Ok(Contents::Nothing | Contents::PartitionTable)
                            if wanted.partition.is_none() =>
                        {
                            none_found("the disk holds no file system or partition".into(), aes)
                        }
                        Ok(found) => GuestError::Unsupported {
                            view: only.volume.view.clone(),
                            found,
                        },
                        Err(_) => none_found(only.described(), aes),
                    }
                }
                all => none_found(
                    all.iter()
                        .map(Candidate::described)
                        .collect::<Vec<_>>()
                        .join(", "),
                    aes,
                ),
            }));
        }
        _ => {
            let lvs = readable.iter().any(|c| matches!(c.place, Place::Lv(_)));
            let parts = readable
                .iter()
                .any(|c| matches!(c.place, Place::Partition(_)));
            let choose = match (parts && wanted.partition.is_none(), lvs) {
                (true, true) => "--partition N or --lv VG/LV",
                (false, true) => "--lv VG/LV",
                _ => "--partition N",
            };
            let list = match lvs {
                false => format!(
                    "partitions {}",
                    numbers(readable.iter().filter_map(|c| match c.place {
                        Place::Partition(n) => Some(n),
                        _ => None,
                    }))
                ),
                true => readable
                    .iter()
                    .map(|c| c.place.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            return Err(Choice::Guest(GuestError::Ambiguous { list, choose }));
        }
    }
    let index = candidates.iter().position(Candidate::readable);
    Ok(candidates.swap_remove(index.unwrap_or_default()).volume)
}

/// The logical volume `lv` among `candidates`, or why it is not there or not read.
fn chosen_lv(candidates: Vec<Candidate>, lv: &str) -> std::result::Result<Volume, Choice> {
    let names: Vec<&str> = candidates.iter().filter_map(|c| c.lv_name()).collect();
    let present = match names.is_empty() {
        true => "the disk has no LVM2 volume group".to_string(),
        false => format!("the disk has {}", names.join(", ")),
    };
    let Some(c) = candidates.into_iter().find(|c| c.lv_name() == Some(lv)) else {
        let lv = lv.to_string();
        return Err(Choice::Guest(GuestError::NoLv { lv, present }));
    };
    match c.found {
        Err(why) => Err(Choice::Guest(GuestError::LvNotRead {
            lv: lv.to_string(),
            why,
        })),
        Ok(found) if !found.is_supported() => Err(Choice::Guest(GuestError::Unsupported {
            view: c.volume.view,
            found,
        })),
        Ok(_) => Ok(c.volume),
    }
}

/// Partition numbers as a list ("1, 2, 5").
fn numbers(n: impl Iterator<Item = u32>) -> String {
    n.map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
}

/// The refusal when nothing readable was found: what was, and how to look with a mount.
fn none_found(found: String, aes: bool) -> GuestError {
    let mut hint = "qcowfs mount --read-only IMAGE MNT, then mount -o loop,ro MNT/disk-partN \
                    /mnt/guest (or MNT/disk)"
        .to_string();
    if aes {
        hint.push_str(AES_HINT);
    }
    GuestError::NoneSupported { found, hint }
}
