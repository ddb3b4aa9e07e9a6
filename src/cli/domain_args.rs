//! `-d DOMAIN`, as virt-cat takes it: the command line is rewritten before it is parsed, the
//! option replaced by the domain's first disk as the IMAGE operand (every disk, for `audit`) and,
//! unless a passphrase option is given, `--libvirt-secret UUID` of the disk's secret. A running
//! domain's disk is refused to every command that writes it (exit status 5, in use) and read
//! without locks by those that only read, as virt-cat does, with a warning.

use std::ffi::{OsStr, OsString};

use crate::error::{Error, Problem, Result};
use crate::keys::domain::{self, Domain};

/// The commands `-d` serves.
const COMMANDS: &[&str] = &[
    "info",
    "ls",
    "cat",
    "copy-out",
    "edit",
    "write",
    "copy-in",
    "rm",
    "mkdir",
    "mount",
    "audit",
    "check-key",
    "check",
    "seal",
];

/// Commands that only read, and take `-U` to read without locks.
const READ_WITHOUT_LOCKS: &[&str] = &["ls", "cat", "copy-out", "check-key"];

/// Options that give a passphrase (then the domain's secret is not added).
const PASSPHRASE_OPTIONS: &[&str] = &[
    "--passphrase-file",
    "--passphrase-base64-file",
    "--libvirt-secret",
    "--layer-passphrase-file",
];

/// `argv` with `-d DOMAIN` resolved; unchanged when there is none.
pub fn rewrite(argv: Vec<OsString>) -> Result<Vec<OsString>> {
    rewrite_with(argv, &domain::find)
}

fn rewrite_with(
    argv: Vec<OsString>,
    find: &dyn Fn(&str) -> Result<Domain>,
) -> Result<Vec<OsString>> {
    let Some(at) = argv
        .iter()
        .skip(1)
        .position(|a| !a.as_encoded_bytes().starts_with(b"-"))
    else {
        return Ok(argv);
    };
    let at = at + 1;
    let command = argv[at].to_string_lossy().into_owned();
    if !COMMANDS.contains(&command.as_str()) {
        return Ok(argv);
    }
    let (rest, name) = take_domain(&command, &argv[at + 1..])?;
    let Some(name) = name else {
        return Ok(argv);
    };
    let domain = find(&name)?;
    let has = |opts: &[&str]| rest.iter().any(|a| opts.iter().any(|o| is_option(a, o)));
    let read_only = has(&["-r", "--read-only"]);
    let writes = match command.as_str() {
        "edit" | "write" | "copy-in" | "rm" | "mkdir" | "seal" => true,
        "mount" => !read_only,
        "check" => rest.iter().any(|a| {
            let a = a.to_string_lossy();
            a.starts_with("-r") || a.starts_with("--repair")
        }),
        _ => false,
    };
    if domain.running && writes {
        return Err(Error::new(
            &name,
            Problem::Busy(format!(
                "libvirt domain {name} is running; its disk is not changed under a running VM \
                 (virsh shutdown {name} first)"
            )),
        ));
    }
    let mut out: Vec<OsString> = argv[..=at].to_vec();
    // libvirt opens a disk with the format its XML declares and never probes it; qcowfs would
    // read the file's own header, which the guest of a raw disk writes. So only qcow2 disks.
    let disks: Vec<_> = match command.as_str() {
        "audit" => domain
            .disks
            .iter()
            .filter(|d| d.format == "qcow2")
            .collect(),
        _ => domain.disks.iter().take(1).collect(),
    };
    let refused = match disks.first() {
        None => Some(format!("libvirt domain {name} has no qcow2 disk")),
        Some(d) if d.format != "qcow2" => Some(format!(
            "disk {} of libvirt domain {name} is {}, and qcowfs reads qcow2 images (a raw disk \
             needs no qcowfs: mount -o loop,ro)",
            d.target, d.format
        )),
        Some(_) => None,
    };
    if let Some(why) = refused {
        return Err(Error::new(&name, Problem::Refused(why)));
    }
    out.extend(disks.iter().map(|d| d.image.clone().into_os_string()));
    if let Some(uuid) = disks.first().and_then(|d| d.secret.as_ref()) {
        if command != "audit" && !has(PASSPHRASE_OPTIONS) {
            out.push("--libvirt-secret".into());
            out.push(uuid.into());
        }
    }
    let reads_live = domain.running
        && (READ_WITHOUT_LOCKS.contains(&command.as_str()) || (command == "mount" && read_only));
    if reads_live && !has(&["-U", "--force-share"]) {
        eprintln!(
            "qcowfs: warning: libvirt domain {name} is running: its disk is read without locks, \
             and what the VM is writing may read inconsistent"
        );
        out.push("-U".into());
    }
    out.extend(rest);
    Ok(out)
}

/// Options whose value is the next argument (which is then never taken for `-d`).
const TAKE_VALUES: &[&str] = &[
    "--passphrase-file",
    "--passphrase-base64-file",
    "--libvirt-secret",
    "--layer-passphrase-file",
    "--backing-within",
    "--cache-size",
    "--metadata-cache",
    "--log-file",
    "--io-uring",
    "--partition",
    "--lv",
    "--subvolume",
    "--editor",
    "--tries",
    "--repair",
];

/// `args` of `command` without `-d NAME` / `--domain NAME` / `--domain=NAME` / `-dNAME` (before a
/// `--`, and never an option's value), and the name. A `-d` inside a group of flags (`-Ud`) is
/// left to clap, which refuses it.
fn take_domain(command: &str, args: &[OsString]) -> Result<(Vec<OsString>, Option<String>)> {
    let mut rest = Vec::new();
    let mut name = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let text = arg.to_string_lossy();
        let takes_value =
            TAKE_VALUES.contains(&text.as_ref()) || (command == "check" && text == "-r");
        if takes_value {
            rest.push(arg.clone());
            rest.extend(it.next().cloned());
            continue;
        }
        let value = if text == "--" {
            rest.push(arg.clone());
            rest.extend(it.by_ref().cloned());
            break;
        } else if text == "-d" || text == "--domain" {
            match it.next() {
                Some(v) => v.to_string_lossy().into_owned(),
                None => {
                    return Err(Error::new(
                        "",
                        Problem::Usage(format!("{text} needs a libvirt domain name")),
                    ))
                }
            }
        } else if let Some(v) = text.strip_prefix("--domain=") {
            v.to_string()
        } else if let Some(v) = text.strip_prefix("-d").filter(|_| !text.starts_with("--")) {
            v.to_string()
        } else {
            rest.push(arg.clone());
            continue;
        };
        if name.replace(value).is_some() {
            return Err(Error::new("", Problem::Usage("-d is given twice".into())));
        }
    }
    Ok((rest, name))
}

/// Whether `arg` is option `name` (or its `--name=value` form).
fn is_option(arg: &OsStr, name: &str) -> bool {
    let text = arg.to_string_lossy();
    text == name || (name.starts_with("--") && text.starts_with(&format!("{name}=")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::domain::DomainDisk;
    use std::path::PathBuf;

    fn args(text: &str) -> Vec<OsString> {
        text.split(' ').map(OsString::from).collect()
    }

    fn vm(running: bool) -> impl Fn(&str) -> Result<Domain> {
        move |name| {
            Ok(Domain {
                name: name.to_string(),
                disks: vec![
                    DomainDisk {
                        image: PathBuf::from("/i/disk"),
                        target: "vda".into(),
                        secret: Some("3f8f9a5e-6d7c-4e11-9a9b-2f1c0d7e8a41".into()),
                        format: "qcow2".into(),
                    },
                    DomainDisk {
                        image: PathBuf::from("/i/disk.eph0"),
                        target: "vdb".into(),
                        secret: None,
                        format: "qcow2".into(),
                    },
                ],
                running,
            })
        }
    }

    fn joined(v: Vec<OsString>) -> String {
        v.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn the_domain_becomes_the_image_and_its_secret() {
        let out = rewrite_with(args("qcowfs -v ls -d vm /etc"), &vm(false)).unwrap();
        assert_eq!(
            joined(out),
            "qcowfs -v ls /i/disk --libvirt-secret 3f8f9a5e-6d7c-4e11-9a9b-2f1c0d7e8a41 /etc"
        );
        let out = rewrite_with(
            args("qcowfs cat --domain=vm --passphrase-file k /x"),
            &vm(false),
        );
        assert_eq!(
            joined(out.unwrap()),
            "qcowfs cat /i/disk --passphrase-file k /x"
        );
        let out = rewrite_with(args("qcowfs audit -dvm"), &vm(false)).unwrap();
        assert_eq!(joined(out), "qcowfs audit /i/disk /i/disk.eph0");
    }

    #[test]
    fn a_running_domain_is_read_without_locks_and_never_written() {
        let out = rewrite_with(args("qcowfs ls -d vm /etc"), &vm(true)).unwrap();
        assert!(joined(out).ends_with(" -U /etc"));
        for writes in [
            "edit -d vm /etc/fstab",
            "mount -d vm /mnt",
            "seal -d vm",
            "check -r all -d vm",
        ] {
            let e = rewrite_with(args(&format!("qcowfs {writes}")), &vm(true)).unwrap_err();
            assert_eq!(e.failure(), crate::error::Failure::InUse, "{writes}: {e}");
        }
        let out = rewrite_with(args("qcowfs mount -r -d vm /mnt"), &vm(true)).unwrap();
        assert_eq!(
            joined(out),
            "qcowfs mount /i/disk --libvirt-secret 3f8f9a5e-6d7c-4e11-9a9b-2f1c0d7e8a41 -U -r /mnt"
        );
    }

    #[test]
    fn without_d_nothing_changes() {
        let out = rewrite_with(args("qcowfs ls /img /etc -- -d x"), &vm(false)).unwrap();
        assert_eq!(joined(out), "qcowfs ls /img /etc -- -d x");
        let out = rewrite_with(args("qcowfs umount -d /mnt"), &vm(false)).unwrap();
        assert_eq!(joined(out), "qcowfs umount -d /mnt");
        // An option's value is never the domain option.
        let line = "qcowfs info --passphrase-file -d /img";
        assert_eq!(joined(rewrite_with(args(line), &vm(false)).unwrap()), line);
        let line = "qcowfs check -r -d /img";
        assert_eq!(joined(rewrite_with(args(line), &vm(false)).unwrap()), line);
    }
}
