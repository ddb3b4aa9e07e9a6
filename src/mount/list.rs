//! `qcowfs list`: the live qcowfs mounts of this host, from the kernel's mount table joined with
//! the daemons' records (`registry`): image, mount point, daemon pid, read-write or read-only,
//! and the bytes written but not yet stored in the image, as each daemon last published them.
//! Nothing here calls into a mount (a hung daemon cannot hang the listing).

use std::io::Write;
use std::path::PathBuf;

use super::mount_table::{all_mounts, MountEntry};
use super::registry::{recorded, Recorded};
use crate::cmd::size::human;
use crate::error::{escaped, Error, Result};

/// What `qcowfs list` prints.
pub struct ListOptions {
    /// One JSON array instead of a table.
    pub json: bool,
}

/// How a listed mount stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Mounted, its daemon alive.
    Running,
    /// Mounted, its daemon gone: the mount answers nothing, unflushed writes are lost.
    DaemonDead,
    /// Its daemon lives but this mount table has no mount of it: unmounted and still writing the
    /// last data, or mounted in another mount namespace.
    NoMount,
    /// Mounted, no record of ours names it (another user's mount, seen by root).
    NoRecord,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::DaemonDead => "daemon dead",
            State::NoMount => "no mount here",
            State::NoRecord => "no record",
        }
    }
}

/// One row of the listing.
#[derive(Debug, Clone)]
pub struct Listed {
    pub image: PathBuf,
    pub mountpoint: PathBuf,
    pub pid: Option<u32>,
    /// None without a mount in this mount table.
    pub read_only: Option<bool>,
    pub dirty_bytes: Option<u64>,
    pub state: State,
    pub uid: Option<u32>,
}

/// Print the listing to `out`.
pub fn run(opts: &ListOptions, out: &mut dyn Write) -> Result<()> {
    let mounts = all_mounts().map_err(|e| Error::new("/proc/self/mountinfo", e))?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let rows = join(&mounts, recorded(), euid);
    let text = if opts.json { json(&rows) } else { table(&rows) };
    out.write_all(text.as_bytes())
        .map_err(|e| Error::new("stdout", e))
}

/// The mounts of qcowfs in `mounts` (root: every user's; others: their own), each with the record
/// of its daemon, then the records of live daemons whose mount is gone.
fn join(mounts: &[MountEntry], mut records: Vec<Recorded>, euid: u32) -> Vec<Listed> {
    let mut rows = Vec::new();
    for m in mounts.iter().filter(|m| m.is_fuse()) {
        if euid != 0 && m.user_id != Some(euid) {
            continue;
        }
        // A device number is reused by later mounts: only records of this image count, and of
        // those a live daemon's, else the newest.
        let best = records
            .iter()
            .enumerate()
            .filter(|(_, r)| r.dev == Some(m.dev) && r.source.as_ref() == Some(&m.source))
            .max_by_key(|(_, r)| (r.alive, r.modified))
            .map(|(i, _)| i);
        let Some(i) = best else {
            // Mounts of older qcowfs as root are plain "fuse": without a record, only the type tells.
            if m.fstype == "fuse.qcowfs" {
                rows.push(Listed {
                    image: m.source.clone(),
                    mountpoint: m.mountpoint.clone(),
                    pid: None,
                    read_only: Some(m.read_only),
                    dirty_bytes: None,
                    state: State::NoRecord,
                    uid: m.user_id,
                });
            }
            continue;
        };
        let r = records.swap_remove(i);
        rows.push(Listed {
            image: m.source.clone(),
            mountpoint: m.mountpoint.clone(),
            pid: Some(r.pid),
            read_only: Some(m.read_only),
            dirty_bytes: if r.alive { r.dirty } else { None },
            state: if r.alive {
                State::Running
            } else {
                State::DaemonDead
            },
            uid: m.user_id,
        });
    }
    // Records of live daemons left: unmounted and still writing, or mounted in another mount
    // namespace. Dead ones left are stale.
    records.sort_by_key(|r| r.modified);
    for r in records.into_iter().filter(|r| r.alive) {
        rows.push(Listed {
            image: r.source.unwrap_or_default(),
            mountpoint: r.mountpoint,
            pid: Some(r.pid),
            read_only: None,
            dirty_bytes: r.dirty,
            state: State::NoMount,
            uid: Some(euid),
        });
    }
    rows
}

fn mode(read_only: Option<bool>) -> Option<&'static str> {
    read_only.map(|ro| if ro { "read-only" } else { "read-write" })
}

fn json(rows: &[Listed]) -> String {
    let items: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "image": r.image.to_string_lossy(),
                "mountpoint": r.mountpoint.to_string_lossy(),
                "pid": r.pid,
                "mode": mode(r.read_only),
                "dirty_bytes": r.dirty_bytes,
                "state": r.state.as_str(),
                "uid": r.uid,
            })
        })
        .collect();
    let mut text = serde_json::to_string_pretty(&items).unwrap_or_else(|_| "[]".into());
    text.push('\n');
    text
}

fn table(rows: &[Listed]) -> String {
    let header = ["IMAGE", "MOUNTPOINT", "PID", "MODE", "DIRTY", "STATE"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                escaped(&r.image),
                escaped(&r.mountpoint),
                r.pid.map_or("-".into(), |p| p.to_string()),
                mode(r.read_only).unwrap_or("-").to_string(),
                r.dirty_bytes.map_or("-".into(), human),
                r.state.as_str().to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut text = String::new();
    let header = header.map(String::from);
    for row in std::iter::once(&header).chain(&cells) {
        let mut line = String::new();
        for (i, (c, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  "));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(dev: (u32, u32), fstype: &str, source: &str, at: &str, uid: u32) -> MountEntry {
        MountEntry {
            dev,
            fstype: fstype.into(),
            source: source.into(),
            mountpoint: at.into(),
            read_only: false,
            user_id: Some(uid),
        }
    }

    fn record(dev: (u32, u32), pid: u32, source: &str, alive: bool, age: u64) -> Recorded {
        Recorded {
            dev: Some(dev),
            pid,
            mountpoint: "/mnt/x".into(),
            source: Some(source.into()),
            alive,
            dirty: Some(7),
            modified: std::time::UNIX_EPOCH + std::time::Duration::from_secs(age),
        }
    }

    #[test]
    fn a_mount_takes_the_live_record_of_its_device_and_image_and_stale_ones_are_dropped() {
        let mounts = [
            mount((0, 40), "fuse", "/a.qcow2", "/mnt/a", 0),
            mount((0, 41), "fuse", "/ntfs.raw", "/mnt/n", 0),
        ];
        let records = vec![
            record((0, 40), 10, "/a.qcow2", false, 5),
            record((0, 40), 11, "/a.qcow2", true, 1),
            record((0, 40), 12, "/other.qcow2", false, 9),
            record((0, 41), 13, "/gone.qcow2", false, 9),
        ];
        let rows = join(&mounts, records, 0);
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].pid, Some(11));
        assert_eq!(rows[0].state, State::Running);
        assert_eq!(rows[0].dirty_bytes, Some(7));
    }

    #[test]
    fn a_dead_daemon_is_listed_as_such_and_a_live_one_without_a_mount_too() {
        let mounts = [mount((0, 40), "fuse", "/a.qcow2", "/mnt/a", 0)];
        let records = vec![
            record((0, 40), 10, "/a.qcow2", false, 5),
            record((0, 44), 20, "/b.qcow2", true, 6),
        ];
        let rows = join(&mounts, records, 0);
        assert_eq!(rows[0].state, State::DaemonDead);
        assert_eq!(rows[0].dirty_bytes, None);
        assert_eq!(rows[1].state, State::NoMount);
        assert_eq!(rows[1].read_only, None);
        let text = table(&rows);
        assert!(text.starts_with("IMAGE"), "{text}");
        assert!(text.contains("daemon dead"), "{text}");
        let parsed: serde_json::Value = serde_json::from_str(&json(&rows)).unwrap();
        assert_eq!(parsed[1]["state"], "no mount here");
    }

    #[test]
    fn a_user_sees_only_their_own_mounts() {
        let mounts = [
            mount((0, 40), "fuse.qcowfs", "/a.qcow2", "/mnt/a", 1000),
            mount((0, 41), "fuse.qcowfs", "/b.qcow2", "/mnt/b", 1001),
        ];
        let rows = join(&mounts, Vec::new(), 1000);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].state, State::NoRecord);
        assert_eq!(join(&mounts, Vec::new(), 0).len(), 2);
    }
}
