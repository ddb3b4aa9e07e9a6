//! How an audit is shown: two aligned tables (disks, then bases) and a one-line summary, or
//! JSON Lines (one object per disk, then per base, each naming the host). Paths in the tables
//! have control characters escaped; JSON carries them as JSON strings. Names and numbers are
//! `info`'s (`encryption_name`, `human`, `percent`, the same JSON field names).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::scan::{Audit, BaseRow, DiskAudit, DiskRow};
use crate::cmd::info::{encryption_name, percent, share};
use crate::cmd::size::human;
use crate::error::escaped;
use crate::qcow2::Encryption;

/// Text for a table cell: one line, nothing a terminal would act on.
fn cell(text: &str) -> String {
    escaped(Path::new(text))
}

/// Columns padded to the widest cell; `right` marks the columns aligned right (numbers). A row
/// with fewer cells than the header ends early (an error row: its message runs on).
fn table(header: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        // A short row's last cell runs on: it widens nothing.
        let fixed = if row.len() < header.len() {
            row.len().saturating_sub(1)
        } else {
            row.len()
        };
        for (w, c) in widths.iter_mut().zip(&row[..fixed]) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, c) in row.iter().enumerate() {
            let last = i + 1 == row.len();
            let pad = widths
                .get(i)
                .copied()
                .unwrap_or(0)
                .saturating_sub(c.chars().count());
            if i > 0 {
                line.push_str("  ");
            }
            match (right.get(i).copied().unwrap_or(false), last) {
                (true, _) => {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(c);
                }
                (false, true) => line.push_str(c),
                (false, false) => {
                    line.push_str(c);
                    line.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The chain below the disk, top first, bases by canonical path: `qcow2 <- /.../_base/HASH (raw)`.
fn chain_cell(disk: &DiskAudit) -> String {
    let mut parts = vec![disk.layers.first().map_or("", |l| l.format).to_string()];
    for layer in disk.layers.iter().skip(1) {
        parts.push(format!(
            "{} ({})",
            cell_path(&layer.canonical),
            layer.format
        ));
    }
    parts.join(" <- ")
}

fn cell_path(p: &Path) -> String {
    escaped(p)
}

/// The IN USE cell: "yes" when a writer holds the disk, "?" when that cannot be told.
fn in_use_cell(in_use: Option<bool>) -> &'static str {
    match in_use {
        Some(true) => "yes",
        Some(false) => "no",
        None => "?",
    }
}

fn disk_row(row: &DiskRow) -> Vec<String> {
    let path = cell_path(&row.path);
    match &row.result {
        Ok(d) => vec![
            path,
            encryption_name(d.encryption()).to_string(),
            human(d.coverage.data_bytes),
            percent(d.coverage.unencrypted_share()),
            in_use_cell(row.in_use).to_string(),
            chain_cell(d),
        ],
        Err(why) => {
            let held = match row.in_use {
                Some(true) => " (in use: a running VM holds it for writing)",
                _ => "",
            };
            vec![path, format!("error: {}{held}", cell(why))]
        }
    }
}

/// Said under the disks table when some disk is in use.
const IN_USE_NOTE: &str = "in use: a running VM (or another writer) holds the disk; it was read \
                           without locks and its numbers may be changing";

fn base_row(base: &BaseRow) -> Vec<String> {
    vec![
        cell_path(&base.path),
        base.format.to_string(),
        encryption_name(base.encryption).to_string(),
        base.instances.len().to_string(),
        base.encrypted_instances.to_string(),
        human(base.plaintext_bytes()),
    ]
}

/// "N of M encrypted instances keep X% of their guest data in plaintext bases", X over the N.
pub(super) fn summary(audit: &Audit) -> String {
    let audited: Vec<&DiskAudit> = audit
        .disks
        .iter()
        .filter_map(|d| d.result.as_ref().ok())
        .collect();
    let encrypted: Vec<&DiskAudit> = audited.iter().copied().filter(|d| d.encrypted()).collect();
    let exposed: Vec<&DiskAudit> = encrypted
        .iter()
        .copied()
        .filter(|d| d.plaintext_base_bytes() > 0)
        .collect();
    if encrypted.is_empty() {
        return match audited.len() {
            0 => "no disk was audited".to_string(),
            1 => "the one audited disk is not encrypted".to_string(),
            n => format!("none of the {n} audited disks is encrypted"),
        };
    }
    if exposed.is_empty() {
        return format!(
            "0 of {} encrypted instances keep guest data in plaintext bases",
            encrypted.len()
        );
    }
    let plain: u64 = exposed.iter().map(|d| d.plaintext_base_bytes()).sum();
    let data: u64 = exposed.iter().map(|d| d.coverage.data_bytes).sum();
    format!(
        "{} of {} encrypted instances keep {} of their guest data in plaintext bases",
        exposed.len(),
        encrypted.len(),
        percent(share(plain, data))
    )
}

/// The tables and the summary.
pub(super) fn text(audit: &Audit, host: &str, searched: &[PathBuf]) -> String {
    let mut out = format!("host: {}\n", cell(host));
    if audit.disks.is_empty() {
        let names: Vec<String> = searched.iter().map(|p| cell_path(p)).collect();
        out.push_str(&format!(
            "no instance disks found in {}\n",
            names.join(", ")
        ));
    } else {
        let rows: Vec<Vec<String>> = audit.disks.iter().map(disk_row).collect();
        out.push_str(&table(
            &[
                "DISK",
                "ENCRYPTION",
                "GUEST DATA",
                "UNENCRYPTED",
                "IN USE",
                "CHAIN",
            ],
            &[false, false, true, true, false, false],
            &rows,
        ));
        if audit.disks.iter().any(|d| d.in_use == Some(true)) {
            out.push_str(IN_USE_NOTE);
            out.push('\n');
        }
    }
    out.push('\n');
    if audit.bases.is_empty() {
        out.push_str("no base images\n");
    } else {
        let rows: Vec<Vec<String>> = audit.bases.iter().map(base_row).collect();
        out.push_str(&table(
            &[
                "BASE",
                "FORMAT",
                "ENCRYPTION",
                "INSTANCES",
                "ENCRYPTED",
                "PLAINTEXT",
            ],
            &[false, false, false, true, true, true],
            &rows,
        ));
    }
    out.push('\n');
    out.push_str(&summary(audit));
    out.push('\n');
    out
}

fn path_json(p: &Path) -> Value {
    json!(p.display().to_string())
}

fn disk_json(row: &DiskRow, host: &str) -> Value {
    let mut v = json!({
        "kind": "disk",
        "host": host,
        "path": path_json(&row.path),
        "audited": row.result.is_ok(),
        "in_use": row.in_use,
    });
    match &row.result {
        Ok(d) => {
            v["format"] = json!(d.layers.first().map_or("", |l| l.format));
            v["encryption"] = json!(encryption_name(d.encryption()));
            v["encrypted"] = json!(d.encrypted());
            v["virtual_size"] = json!(d.virtual_size);
            v["data_bytes"] = json!(d.coverage.data_bytes);
            v["unencrypted_bytes"] = json!(d.coverage.unencrypted_bytes);
            v["unencrypted_share"] = json!(d.coverage.unencrypted_share());
            v["plaintext_base_bytes"] = json!(d.plaintext_base_bytes());
            v["chain"] = d
                .layers
                .iter()
                .map(|l| {
                    json!({
                        "path": path_json(&l.path),
                        "canonical_path": path_json(&l.canonical),
                        "format": l.format,
                        "encryption": encryption_name(l.encryption),
                        "encrypted": l.encryption != Encryption::None,
                        "provided_bytes": l.provided,
                    })
                })
                .collect();
        }
        Err(why) => v["error"] = json!(why),
    }
    v
}

fn base_json(base: &BaseRow, host: &str) -> Value {
    json!({
        "kind": "base",
        "host": host,
        "path": path_json(&base.path),
        "format": base.format,
        "encryption": encryption_name(base.encryption),
        "encrypted": base.encryption != Encryption::None,
        "instances": base.instances.len(),
        "encrypted_instances": base.encrypted_instances,
        "instance_paths": base.instances.iter().map(|p| path_json(p)).collect::<Vec<_>>(),
        "allocated_bytes": base.allocated,
        "plaintext_bytes": base.plaintext_bytes(),
        "provided_bytes": base.provided,
    })
}

/// One JSON object per line: every disk, then every base.
pub(super) fn json_lines(audit: &Audit, host: &str) -> String {
    let mut out = String::new();
    let objects = audit
        .disks
        .iter()
        .map(|d| disk_json(d, host))
        .chain(audit.bases.iter().map(|b| base_json(b, host)));
    for v in objects {
        out.push_str(&v.to_string());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::audit::scan::LayerRow;
    use crate::cmd::info::Coverage;

    fn disk(path: &str, top: Encryption, own: u64, from_base: u64) -> DiskRow {
        let mut layers = vec![LayerRow {
            path: PathBuf::from(path),
            canonical: PathBuf::from(path),
            format: "qcow2",
            encryption: top,
            provided: own,
            allocated: None,
        }];
        if from_base > 0 {
            layers.push(LayerRow {
                path: PathBuf::from("/i/_base/b"),
                canonical: PathBuf::from("/i/_base/b"),
                format: "raw",
                encryption: Encryption::None,
                provided: from_base,
                allocated: Some(from_base),
            });
        }
        let unencrypted = from_base + if top == Encryption::None { own } else { 0 };
        DiskRow {
            path: PathBuf::from(path),
            in_use: Some(false),
            result: Ok(DiskAudit {
                virtual_size: 1 << 20,
                coverage: Coverage {
                    provided: layers.iter().map(|l| l.provided).collect(),
                    data_bytes: own + from_base,
                    unencrypted_bytes: unencrypted,
                },
                layers,
            }),
        }
    }

    #[test]
    fn the_summary_counts_encrypted_instances_and_their_share_in_plaintext_bases() {
        let audit = Audit {
            disks: vec![
                disk("/i/a/disk", Encryption::Aes, 100, 300),
                disk("/i/b/disk", Encryption::Luks, 200, 0),
                disk("/i/c/disk", Encryption::Aes, 0, 100),
                disk("/i/d/disk", Encryption::None, 10, 90),
                DiskRow {
                    path: PathBuf::from("/i/e/disk"),
                    in_use: None,
                    result: Err("not a qcow2 image (bad magic)".into()),
                },
            ],
            bases: vec![],
        };
        // (300 + 100) of (400 + 100): the plain disk and the failed one count for nothing.
        assert_eq!(
            summary(&audit),
            "2 of 3 encrypted instances keep 80% of their guest data in plaintext bases"
        );
        let none = Audit {
            disks: vec![disk("/i/b/disk", Encryption::Luks, 200, 0)],
            bases: vec![],
        };
        assert_eq!(
            summary(&none),
            "0 of 1 encrypted instances keep guest data in plaintext bases"
        );
        assert_eq!(summary(&Audit::default()), "no disk was audited");
    }

    #[test]
    fn tables_align_columns_and_let_error_rows_run_on() {
        let rows = vec![
            vec!["/a/disk".into(), "aes".into(), "1.0 MiB".into()],
            vec![
                "/long/path/disk".into(),
                "error: bad magic, a long message".into(),
            ],
        ];
        let t = table(&["DISK", "ENC", "DATA"], &[false, false, true], &rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "DISK             ENC     DATA");
        assert_eq!(lines[1], "/a/disk          aes  1.0 MiB");
        assert_eq!(
            lines[2],
            "/long/path/disk  error: bad magic, a long message"
        );
    }

    #[test]
    fn json_lines_are_one_object_per_disk_and_base_each_naming_the_host() {
        let audit = Audit {
            disks: vec![
                disk("/i/a/disk", Encryption::Aes, 100, 300),
                DiskRow {
                    path: PathBuf::from("/i/e/disk"),
                    in_use: None,
                    result: Err("bad\nmagic".into()),
                },
            ],
            bases: vec![],
        };
        let out = json_lines(&audit, "node-1");
        let objects: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(objects.len(), 2);
        assert!(objects.iter().all(|o| o["host"] == "node-1"));
        assert_eq!(objects[0]["plaintext_base_bytes"], 300);
        assert_eq!(objects[1]["audited"], false);
    }

    #[test]
    fn a_disk_in_use_is_marked_in_its_row_and_its_json_and_is_no_failure() {
        let mut held = disk("/i/a/disk", Encryption::Luks, 100, 300);
        held.in_use = Some(true);
        let audit = Audit {
            disks: vec![held, disk("/i/b/disk", Encryption::Luks, 100, 0)],
            bases: vec![],
        };
        assert_eq!(audit.failed(), 0);
        let text = text(&audit, "node-1", &[]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].contains("IN USE  CHAIN"), "{text}");
        assert!(
            lines[2].contains(" 75%  yes     qcow2 <- /i/_base/b"),
            "{text}"
        );
        assert!(lines[3].contains(" 0%  no      qcow2"), "{text}");
        assert_eq!(lines[4], IN_USE_NOTE, "{text}");
        let out = json_lines(&audit, "node-1");
        let objects: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(objects[0]["in_use"], true);
        assert_eq!(objects[1]["in_use"], false);
    }
}
