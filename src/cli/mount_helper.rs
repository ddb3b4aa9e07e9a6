//! The mount(8) helper. util-linux runs `/sbin/mount.fuse.qcowfs IMAGE MOUNTPOINT [-s] [-f] [-n]
//! [-v] [-o OPTIONS]` for `mount -t fuse.qcowfs` and for fstab lines of that type; when qcowfs is
//! started under that name (a symbolic link), this module turns that form into the arguments of
//! `qcowfs mount`, so clap still validates every value and the mount itself is the ordinary one.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The helper's file name, as mount(8) looks it up for the type `fuse.qcowfs`.
pub const HELPER_NAME: &str = "mount.fuse.qcowfs";
/// Also accepted, for `mount -t qcowfs`.
const SHORT_HELPER_NAME: &str = "mount.qcowfs";

/// What a `-o` option does to the `qcowfs mount` command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    ReadOnly,
    ReadWrite,
    Verbose,
    /// A flag of `qcowfs mount`.
    Flag(&'static str),
    /// A flag of `qcowfs mount` that takes the option's value.
    Value(&'static str),
}

/// One `-o` option qcowfs understands.
struct MountOption {
    name: &'static str,
    /// The value's placeholder for the manual page; `None` for a flag.
    value: Option<&'static str>,
    action: Action,
    help: &'static str,
}

const OPTIONS: &[MountOption] = &[
    MountOption {
        name: "ro",
        value: None,
        action: Action::ReadOnly,
        help: "Never write the image (--read-only).",
    },
    MountOption {
        name: "rw",
        value: None,
        action: Action::ReadWrite,
        help: "Read-write, the default; mount(8) passes it when ro is not given.",
    },
    MountOption {
        name: "passphrase_file",
        value: Some("FILE"),
        action: Action::Value("--passphrase-file"),
        help: "The passphrase for every encrypted layer (--passphrase-file).",
    },
    MountOption {
        name: "passphrase_base64_file",
        value: Some("FILE"),
        action: Action::Value("--passphrase-base64-file"),
        help:
            "The passphrase, base64 as virsh secret-get-value prints it (--passphrase-base64-file).",
    },
    MountOption {
        name: "libvirt_secret",
        value: Some("UUID"),
        action: Action::Value("--libvirt-secret"),
        help: "The passphrase from libvirt's secret store (--libvirt-secret).",
    },
    MountOption {
        name: "layer_passphrase_file",
        value: Some("PATH=FILE"),
        action: Action::Value("--layer-passphrase-file"),
        help: "The passphrase of one layer; may be repeated (--layer-passphrase-file).",
    },
    MountOption {
        name: "backing_within",
        value: Some("DIR"),
        action: Action::Value("--backing-within"),
        help: "Refuse backing files outside DIR; may be repeated (--backing-within).",
    },
    MountOption {
        name: "cache_size",
        value: Some("SIZE"),
        action: Action::Value("--cache-size"),
        help: "Memory for decrypted clusters, e.g. 512M (--cache-size).",
    },
    MountOption {
        name: "metadata_cache",
        value: Some("SIZE"),
        action: Action::Value("--metadata-cache"),
        help: "Memory for image metadata tables, e.g. 64M (--metadata-cache).",
    },
    MountOption {
        name: "log_file",
        value: Some("FILE"),
        action: Action::Value("--log-file"),
        help: "Append the daemon's log to FILE instead of syslog (--log-file).",
    },
    MountOption {
        name: "allow_other",
        value: None,
        action: Action::Flag("--allow-other"),
        help: "Let other users access the mount (--allow-other).",
    },
    MountOption {
        name: "force_share",
        value: None,
        action: Action::Flag("--force-share"),
        help: "With ro: take no image locks (--force-share).",
    },
    MountOption {
        name: "nonempty",
        value: None,
        action: Action::Flag("--nonempty"),
        help: "Mount over a folder that has files in it (--nonempty).",
    },
    MountOption {
        name: "force",
        value: None,
        action: Action::Flag("--force"),
        help: "Mount even when the passphrase looks wrong (--force).",
    },
    MountOption {
        name: "unverified_key",
        value: None,
        action: Action::Flag("--unverified-key"),
        help: "Write with a legacy AES key that cannot be verified (--unverified-key).",
    },
    MountOption {
        name: "verbose",
        value: None,
        action: Action::Verbose,
        help: "More log output (-v).",
    },
];

/// Options mount(8) passes to every helper (VFS flags, fstab's userspace options) or that the
/// mount always has: accepted and ignored.
const IGNORED: &[&str] = &[
    "defaults",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "sync",
    "async",
    "dirsync",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "diratime",
    "nodiratime",
    "lazytime",
    "nolazytime",
    "silent",
    "loud",
    "mand",
    "nomand",
    "iversion",
    "noiversion",
    "default_permissions",
];

/// Ignored option families: `x-systemd.automount`, `comment=...`, `user=NAME` (which mount(8)
/// adds for user mounts), SELinux contexts.
const IGNORED_PREFIXES: &[&str] = &[
    "x-",
    "comment=",
    "user=",
    "uhelper=",
    "helper=",
    "context=",
    "fscontext=",
    "defcontext=",
    "rootcontext=",
];

/// Why the helper's command line cannot be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HelperError {
    #[error("unknown mount option '{0}' (see qcowfs-mount(1) for the options of fuse.qcowfs)")]
    UnknownOption(String),
    #[error("mount option '{0}' needs a value: {0}=...")]
    MissingValue(String),
    #[error("mount option '{0}' takes no value")]
    UnexpectedValue(String),
    #[error("mount option '{0}' is not supported: unmount and mount again")]
    Unsupported(String),
    #[error("unknown argument '{0}'; usage: {HELPER_NAME} IMAGE MOUNTPOINT [-o OPTIONS]")]
    UnknownArgument(String),
    #[error("usage: {HELPER_NAME} IMAGE MOUNTPOINT [-o OPTIONS]")]
    Usage,
}

/// What the helper was asked to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    /// Run `qcowfs` with these arguments (the first is the program name); print the warnings.
    Mount {
        args: Vec<OsString>,
        warnings: Vec<String>,
    },
    /// `-f`: mount(8)'s fake mode, do nothing.
    Fake,
    /// `-h` / `--help`.
    Help,
}

/// Whether the program was started as the mount(8) helper (argv[0]'s file name).
pub fn is_helper(argv0: &OsStr) -> bool {
    Path::new(argv0)
        .file_name()
        .is_some_and(|n| n == HELPER_NAME || n == SHORT_HELPER_NAME)
}

/// The `-o` options for the manual page: `name` or `name=VALUE`, and what it does.
pub fn option_help() -> impl Iterator<Item = (String, &'static str)> {
    OPTIONS.iter().map(|o| {
        let name = match o.value {
            Some(v) => format!("{}={v}", o.name),
            None => o.name.to_string(),
        };
        (name, o.help)
    })
}

/// The usage text of the helper.
pub fn usage() -> String {
    let mut text = format!(
        "usage: {HELPER_NAME} IMAGE MOUNTPOINT [-s] [-f] [-n] [-v] [-o OPTIONS]\n\
         The mount(8) helper of qcowfs: mount -t fuse.qcowfs IMAGE MOUNTPOINT -o OPTIONS\n\
         Options:\n"
    );
    for (name, help) in option_help() {
        text.push_str(&format!("  {name:<34}{help}\n"));
    }
    text.push_str("Generic options mount(8) passes (defaults, rw, nodev, nosuid, _netdev, nofail, x-*, ...) are ignored.\n");
    text
}

/// Turns the helper's arguments (after argv[0]) into a `qcowfs mount` command line.
pub fn translate(args: &[OsString]) -> Result<Invocation, HelperError> {
    let mut positional: Vec<&OsStr> = Vec::new();
    let mut option_strings: Vec<&[u8]> = Vec::new();
    let (mut sloppy, mut fake, mut verbose) = (false, false, 0usize);
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let bytes = arg.as_bytes();
        match bytes {
            b"-h" | b"--help" => return Ok(Invocation::Help),
            b"-o" | b"-t" | b"-N" => {
                let value = iter.next().ok_or(HelperError::Usage)?;
                if bytes == b"-o" {
                    option_strings.push(value.as_bytes());
                }
            }
            [b'-', b'o', rest @ ..] => option_strings.push(rest),
            [b'-', b't', ..] => {}
            [b'-', flags @ ..] if !flags.is_empty() => {
                for flag in flags {
                    match flag {
                        b's' => sloppy = true,
                        b'f' => fake = true,
                        b'n' => {}
                        b'v' => verbose += 1,
                        _ => return Err(HelperError::UnknownArgument(lossy(bytes))),
                    }
                }
            }
            _ => positional.push(arg),
        }
    }
    let [image, mountpoint] = positional[..] else {
        return Err(match positional.get(2) {
            Some(extra) => HelperError::UnknownArgument(extra.to_string_lossy().into_owned()),
            None => HelperError::Usage,
        });
    };
    let mut read_only = false;
    let mut flags: Vec<OsString> = Vec::new();
    let mut warnings = Vec::new();
    for option in option_strings.iter().flat_map(|s| split_options(s)) {
        match map_option(&option) {
            Ok(Some(Action::ReadOnly)) => read_only = true,
            Ok(Some(Action::ReadWrite)) => read_only = false,
            Ok(Some(Action::Verbose)) => verbose += 1,
            Ok(Some(Action::Flag(flag))) => flags.push(flag.into()),
            Ok(Some(Action::Value(flag))) => {
                let value = option_value(&option).unwrap_or_default();
                flags.push(flag.into());
                flags.push(OsStr::from_bytes(&value).to_os_string());
            }
            Ok(None) => {}
            Err(HelperError::UnknownOption(name)) if sloppy => {
                warnings.push(format!("ignoring unknown mount option '{name}' (-s)"));
            }
            Err(e) => return Err(e),
        }
    }
    if fake {
        return Ok(Invocation::Fake);
    }
    let mut out: Vec<OsString> = vec!["qcowfs".into()];
    out.extend(std::iter::repeat_n(OsString::from("-v"), verbose.min(3)));
    out.push("mount".into());
    if read_only {
        out.push("--read-only".into());
    }
    out.extend(flags);
    out.push("--".into());
    out.push(image.to_os_string());
    out.push(mountpoint.to_os_string());
    Ok(Invocation::Mount {
        args: out,
        warnings,
    })
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Splits an option string at commas outside double quotes (libmount's quoting, so a value may
/// hold a comma: `passphrase_file="/keys/a,b"`); the quotes stay until [`option_value`].
fn split_options(s: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut quoted = false;
    for &b in s {
        match b {
            b'"' => {
                quoted = !quoted;
                current.push(b);
            }
            b',' if !quoted => out.push(std::mem::take(&mut current)),
            _ => current.push(b),
        }
    }
    out.push(current);
    out.retain(|o| !o.is_empty());
    out
}

/// The part after the first `=`, without surrounding double quotes; `None` without `=`.
fn option_value(option: &[u8]) -> Option<Vec<u8>> {
    let eq = option.iter().position(|&b| b == b'=')?;
    let value = &option[eq + 1..];
    let unquoted = match value {
        [b'"', inner @ .., b'"'] => inner,
        _ => value,
    };
    Some(unquoted.to_vec())
}

/// What one `-o` option means: an action, `None` for an ignored option, or why it is refused.
fn map_option(option: &[u8]) -> Result<Option<Action>, HelperError> {
    let text = lossy(option);
    if IGNORED.contains(&text.as_str()) || IGNORED_PREFIXES.iter().any(|p| text.starts_with(p)) {
        return Ok(None);
    }
    let (name, value) = match option_value(option) {
        Some(v) => (
            text.split('=').next().unwrap_or_default().to_string(),
            Some(v),
        ),
        None => (text.clone(), None),
    };
    if name == "remount" {
        return Err(HelperError::Unsupported(name));
    }
    // Dashes are accepted for underscores (passphrase-file=...), as the CLI spells the flags.
    let key = name.replace('-', "_");
    let Some(known) = OPTIONS.iter().find(|o| o.name == key) else {
        return Err(HelperError::UnknownOption(name));
    };
    match (known.value, value) {
        (Some(_), None) => Err(HelperError::MissingValue(name)),
        (Some(_), Some(v)) if v.is_empty() => Err(HelperError::MissingValue(name)),
        (None, Some(_)) => Err(HelperError::UnexpectedValue(name)),
        _ => Ok(Some(known.action)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn mount_args(list: &[&str]) -> Vec<String> {
        match translate(&args(list)).unwrap() {
            Invocation::Mount { args, .. } => args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            other => panic!("expected a mount, got {other:?}"),
        }
    }

    #[test]
    fn recognises_the_helper_by_its_file_name() {
        assert!(is_helper(OsStr::new("/sbin/mount.fuse.qcowfs")));
        assert!(is_helper(OsStr::new("mount.qcowfs")));
        assert!(!is_helper(OsStr::new("/usr/local/bin/qcowfs")));
        assert!(!is_helper(OsStr::new("mount.fuse")));
    }

    #[test]
    fn maps_the_options_mount_passes_to_qcowfs_flags() {
        let got = mount_args(&[
            "/img/disk",
            "/mnt/vm",
            "-o",
            "ro,passphrase_file=/root/key,allow_other,nofail,_netdev,nodev,nosuid,x-systemd.automount",
        ]);
        assert_eq!(
            got,
            [
                "qcowfs",
                "mount",
                "--read-only",
                "--passphrase-file",
                "/root/key",
                "--allow-other",
                "--",
                "/img/disk",
                "/mnt/vm"
            ]
        );
    }

    #[test]
    fn the_last_of_ro_and_rw_wins() {
        let got = mount_args(&["i", "m", "-o", "ro,rw"]);
        assert!(!got.contains(&"--read-only".to_string()), "{got:?}");
        let got = mount_args(&["i", "m", "-o", "rw,ro"]);
        assert!(got.contains(&"--read-only".to_string()), "{got:?}");
    }

    #[test]
    fn accepts_every_documented_option_and_repeats_layer_keys() {
        let got = mount_args(&[
            "-v",
            "-n",
            "-oro,force_share,force,cache_size=1G,log_file=/var/log/q.log",
            "i",
            "m",
            "-o",
            "passphrase_base64_file=/k.b64,layer_passphrase_file=/a=/ka,layer_passphrase_file=/b=/kb",
            "-t",
            "fuse.qcowfs",
        ]);
        let joined = got.join(" ");
        assert_eq!(
            joined,
            "qcowfs -v mount --read-only --force-share --force --cache-size 1G --log-file \
             /var/log/q.log --passphrase-base64-file /k.b64 --layer-passphrase-file /a=/ka \
             --layer-passphrase-file /b=/kb -- i m"
        );
    }

    #[test]
    fn libvirt_secret_and_dashed_names_map_too() {
        let got = mount_args(&["i", "m", "-o", "libvirt-secret=0123,verbose"]).join(" ");
        assert_eq!(got, "qcowfs -v mount --libvirt-secret 0123 -- i m");
    }

    #[test]
    fn a_quoted_value_may_hold_a_comma() {
        let got = mount_args(&["i", "m", "-o", "passphrase_file=\"/keys/a,b\",ro"]).join(" ");
        assert_eq!(
            got,
            "qcowfs mount --read-only --passphrase-file /keys/a,b -- i m"
        );
    }

    #[test]
    fn refuses_unknown_options_unless_sloppy() {
        assert_eq!(
            translate(&args(&["i", "m", "-o", "ro,bogus=1"])),
            Err(HelperError::UnknownOption("bogus".into()))
        );
        match translate(&args(&["-s", "i", "m", "-o", "ro,bogus"])).unwrap() {
            Invocation::Mount { warnings, .. } => assert_eq!(warnings.len(), 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refuses_values_on_flags_and_flags_without_values() {
        assert_eq!(
            translate(&args(&["i", "m", "-o", "allow_other=1"])),
            Err(HelperError::UnexpectedValue("allow_other".into()))
        );
        assert_eq!(
            translate(&args(&["i", "m", "-o", "passphrase_file"])),
            Err(HelperError::MissingValue("passphrase_file".into()))
        );
        assert_eq!(
            translate(&args(&["i", "m", "-o", "passphrase_file="])),
            Err(HelperError::MissingValue("passphrase_file".into()))
        );
        assert_eq!(
            translate(&args(&["i", "m", "-o", "remount"])),
            Err(HelperError::Unsupported("remount".into()))
        );
    }

    #[test]
    fn needs_exactly_an_image_and_a_mountpoint() {
        assert_eq!(translate(&args(&["i"])), Err(HelperError::Usage));
        assert_eq!(
            translate(&args(&["i", "m", "x"])),
            Err(HelperError::UnknownArgument("x".into()))
        );
        assert_eq!(
            translate(&args(&["i", "m", "-q"])),
            Err(HelperError::UnknownArgument("-q".into()))
        );
        assert_eq!(translate(&args(&["i", "m", "-o"])), Err(HelperError::Usage));
    }

    #[test]
    fn fake_mode_and_help_do_not_mount() {
        assert_eq!(
            translate(&args(&["-f", "i", "m", "-o", "ro"])),
            Ok(Invocation::Fake)
        );
        assert_eq!(translate(&args(&["--help"])), Ok(Invocation::Help));
    }
}
