//! `ls -R` and `ls --json` against the host tree the guest was made from (mke2fs -d): every
//! path, kind, mode, size and symlink target, and `ls -lR`'s shape (a `PATH:` line per folder).

use crate::common;

use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// The host tree, as `ls --json -R` should see it: guest path -> (kind, mode, size, target).
fn host_tree(root: &Path) -> BTreeMap<String, (String, String, u64, Option<String>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let guest = format!("/{}", path.strip_prefix(root).unwrap().display());
            if guest.starts_with("/odd/") {
                continue; // checked by name below
            }
            let kind = if meta.is_dir() {
                stack.push(path.clone());
                "dir"
            } else if meta.file_type().is_symlink() {
                "symlink"
            } else {
                "file"
            };
            let target = meta
                .file_type()
                .is_symlink()
                .then(|| fs::read_link(&path).unwrap().display().to_string());
            let size = if meta.is_dir() { 0 } else { meta.len() };
            let mode = format!("{:04o}", meta.mode() & 0o7777);
            out.insert(guest, (kind.to_string(), mode, size, target));
        }
    }
    out
}

#[test]
fn ls_recursive_json_lists_every_entry_of_the_tree_the_guest_was_made_from() {
    let dir = workdir();
    let tree = dir.path().join("tree");
    for d in ["etc/ssh", "var/log/nova", "srv/empty"] {
        fs::create_dir_all(tree.join(d)).unwrap();
    }
    fs::write(tree.join("etc/fstab"), b"/dev/vda1 / ext4 defaults 0 1\n").unwrap();
    fs::write(tree.join("etc/ssh/sshd_config"), b"PermitRootLogin no\n").unwrap();
    fs::set_permissions(
        tree.join("etc/ssh/sshd_config"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    fs::write(tree.join("var/log/nova/a.log"), vec![b'x'; 70_000]).unwrap();
    std::os::unix::fs::symlink("../etc/fstab", tree.join("srv/fstab-link")).unwrap();
    // Names a hostile guest may hold: a line break, a lookalike of it, bytes that are not UTF-8.
    use std::os::unix::ffi::OsStrExt;
    fs::create_dir_all(tree.join("odd")).unwrap();
    for name in [&b"a\nb"[..], b"a\\nb", b"bad\xff"] {
        fs::write(
            tree.join("odd").join(std::ffi::OsStr::from_bytes(name)),
            b"x",
        )
        .unwrap();
    }
    let raw = dir.path().join("guest.raw");
    mkfs_ext4_from(&tree, &raw, Some("16M"));
    let image = encrypted(&raw, "aes", "pw");
    let key = dir.path().join("key");
    fs::write(&key, "pw").unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let ls = |extra: &[&str], path: &str| {
        let mut args = vec!["ls", "--passphrase-file", key.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend([image.to_str().unwrap(), path]);
        let r = qcowfs(&args);
        r.assert_success();
        assert!(r.stderr.is_empty(), "{}", r.stderr);
        r.stdout_str()
    };

    let mut seen = BTreeMap::new();
    for line in ls(&["--json", "-R"], "/").lines() {
        let o: serde_json::Value = serde_json::from_str(line).expect("one JSON object per line");
        let path = o["path"].as_str().unwrap().to_string();
        if path.starts_with("/lost+found") {
            continue;
        }
        let kind = o["kind"].as_str().unwrap().to_string();
        let size = if kind == "dir" {
            0
        } else {
            o["size"].as_u64().unwrap()
        };
        let target = o["target"].as_str().map(str::to_string);
        assert_eq!(
            o["name"].as_str(),
            path.rsplit('/').next(),
            "the name is the path's last part: {o}"
        );
        let entry = (kind, o["mode"].as_str().unwrap().to_string(), size, target);
        assert!(
            seen.insert(path.clone(), entry).is_none(),
            "{path} listed twice"
        );
    }
    let odd: BTreeMap<String, serde_json::Value> = ls(&["--json"], "/odd")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|o| (o["path"].as_str().unwrap().to_string(), o))
        .collect();
    assert!(odd.contains_key("/odd/a\nb"), "{odd:#?}");
    assert!(odd.contains_key("/odd/a\\nb"), "{odd:#?}");
    assert_eq!(odd.len(), 3, "three names, three paths: {odd:#?}");
    let bad = &odd["/odd/bad\\xff"];
    assert_eq!(bad["path_base64"], "L29kZC9iYWT/", "{bad}");
    seen.retain(|path, _| !path.starts_with("/odd/"));
    assert_eq!(seen, host_tree(&tree));

    // ls -lR's shape: the top folder, then each folder below under its own PATH: line.
    let text = ls(&["-R"], "/var");
    let heads: Vec<&str> = text.lines().filter(|l| l.ends_with(':')).collect();
    assert_eq!(heads, ["/var:", "/var/log:", "/var/log/nova:"], "{text}");
    assert!(text.contains(" a.log\n"), "{text}");
    // Without -R, one folder only; a file lists itself, in JSON too.
    let one = ls(&[], "/var");
    assert_eq!(one.lines().count(), 1, "{one}");
    let file = ls(&["--json"], "/srv/fstab-link");
    let o: serde_json::Value = serde_json::from_str(file.trim()).unwrap();
    assert_eq!(o["target"], "../etc/fstab", "{o}");
    assert_eq!(o["kind"], "symlink", "{o}");
}
