//! A libvirt domain's disk, as virt-cat's `-d DOMAIN` finds it: the domain's XML (from `virsh
//! dumpxml` when virsh is installed, else the persistent definition libvirt keeps in
//! /etc/libvirt/qemu/NAME.xml), its first disk's image file, the UUID of the libvirt secret that
//! holds the disk's passphrase (`<encryption><secret type='passphrase' uuid='...'/>`), and
//! whether the domain is running (libvirt's pid file under /run/libvirt/qemu/ names a live
//! process), so that the commands that write can refuse it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Problem, Result};

/// Where libvirt keeps the persistent XML of QEMU domains.
pub const LIBVIRT_QEMU_DIR: &str = "/etc/libvirt/qemu";
/// Overrides [`LIBVIRT_QEMU_DIR`], and virsh is then not asked; meant for tests.
pub const LIBVIRT_QEMU_DIR_ENV: &str = "QCOWFS_LIBVIRT_QEMU_DIR";
/// Where libvirt keeps the state of running QEMU domains (`NAME.pid`, `NAME.xml`).
pub const LIBVIRT_RUN_DIR: &str = "/run/libvirt/qemu";
/// Overrides [`LIBVIRT_RUN_DIR`]; meant for tests.
pub const LIBVIRT_RUN_DIR_ENV: &str = "QCOWFS_LIBVIRT_RUN_DIR";

/// The domain XML read is bounded: libvirt's own are a few KiB.
const MAX_XML: u64 = 1 << 20;

/// A domain's disk, as its XML describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    /// The disk's image file (`<source file=...>` or `<source dev=...>`).
    pub image: PathBuf,
    /// Its name in the guest (`<target dev='vda'/>`).
    pub target: String,
    /// The libvirt secret holding its passphrase, if it is encrypted.
    pub secret: Option<String>,
    /// The format libvirt opens it with (`<driver type='qcow2'/>`): libvirt never probes it, and
    /// neither may qcowfs, or a raw disk whose guest wrote a qcow2 header would name its own
    /// backing file on the host.
    pub format: String,
}

/// What `-d DOMAIN` names.
#[derive(Debug, Clone)]
pub struct Domain {
    pub name: String,
    pub disks: Vec<DomainDisk>,
    pub running: bool,
}

fn dir_from_env(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

/// A domain name as libvirt allows it in a file name: no '/', no leading '.' or '-' (an option
/// to virsh), not empty.
fn check_name(name: &str) -> Result<()> {
    let bad_start = name.starts_with('.') || name.starts_with('-');
    if name.is_empty() || name.contains('/') || bad_start || name.len() > 255 {
        return Err(Error::new(
            name,
            Problem::Usage("not a libvirt domain name".into()),
        ));
    }
    Ok(())
}

/// Find domain `name` on this host.
pub fn find(name: &str) -> Result<Domain> {
    check_name(name)?;
    let ask_virsh = std::env::var_os(LIBVIRT_QEMU_DIR_ENV).is_none();
    let virsh = |args: &[&str]| if ask_virsh { virsh(args) } else { None };
    let (xml, from) = match virsh(&["dumpxml", "--domain", name]) {
        Some(Ok(xml)) => (xml, PathBuf::from("virsh dumpxml")),
        Some(Err(why)) if why.contains("failed to get domain") => {
            return Err(Error::new(
                name,
                Problem::Io(std::io::Error::from_raw_os_error(libc::ENOENT)),
            )
            .hint(format!("no libvirt domain {name} (virsh: {why})")))
        }
        Some(Err(why)) => {
            return Err(Error::new(
                name,
                Problem::Refused(format!("virsh dumpxml failed: {why}")),
            ))
        }
        None => {
            let path =
                dir_from_env(LIBVIRT_QEMU_DIR_ENV, LIBVIRT_QEMU_DIR).join(format!("{name}.xml"));
            let xml = read_bounded(&path).map_err(|e| {
                Error::new(&path, e).hint(format!(
                    "no libvirt domain {name} on this host (virsh list --all names them)"
                ))
            })?;
            (xml, path)
        }
    };
    let disks = disks(&xml).map_err(|why| Error::new(&from, Problem::Refused(why)))?;
    let running = match virsh(&["domstate", "--domain", name]) {
        Some(Ok(state)) => !matches!(state.trim(), "shut off" | "crashed"),
        _ => pid_file_alive(
            &dir_from_env(LIBVIRT_RUN_DIR_ENV, LIBVIRT_RUN_DIR).join(format!("{name}.pid")),
        ),
    };
    Ok(Domain {
        name: name.to_string(),
        disks,
        running,
    })
}

/// `virsh ARGS`'s output; `None` when virsh is not installed.
fn virsh(args: &[&str]) -> Option<std::result::Result<String, String>> {
    // In the C locale: its state words are parsed.
    let out = match Command::new("virsh").args(args).env("LC_ALL", "C").output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Err(e.to_string())),
    };
    if out.status.success() {
        Some(Ok(String::from_utf8_lossy(&out.stdout).into_owned()))
    } else {
        let text = String::from_utf8_lossy(&out.stderr);
        Some(Err(text
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("failed")
            .trim()
            .to_string()))
    }
}

fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_XML)
        .read_to_end(&mut bytes)?;
    String::from_utf8(bytes).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8: not a domain XML",
        )
    })
}

/// Whether the pid file names a live process (libvirt removes it when the domain stops; a stale
/// one after a host crash names a pid that is gone or reused, which errs on the side of "running").
fn pid_file_alive(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks that the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    alive || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The disks (`<disk device='disk'>` with a file or block source) of a domain XML, in order.
pub fn disks(xml: &str) -> std::result::Result<Vec<DomainDisk>, String> {
    let doc =
        roxmltree::Document::parse(xml).map_err(|e| format!("not a libvirt domain XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err("not a libvirt domain XML (no <domain>)".into());
    }
    let mut out = Vec::new();
    let devices = root.children().filter(|n| n.has_tag_name("devices"));
    for disk in devices
        .flat_map(|d| d.children())
        .filter(|n| n.has_tag_name("disk"))
    {
        if disk.attribute("device").unwrap_or("disk") != "disk" {
            continue;
        }
        let target = child_attribute(disk, "target", "dev")
            .unwrap_or("")
            .to_string();
        // A disk qcowfs cannot open is named, never skipped: "the first disk" must not quietly
        // become the second.
        let file =
            child_attribute(disk, "source", "file").or(child_attribute(disk, "source", "dev"));
        let Some(file) = file.filter(|f| f.starts_with('/')) else {
            return Err(format!(
                "disk {target} is not an image file named by an absolute path (type '{}')",
                disk.attribute("type").unwrap_or("?")
            ));
        };
        // libvirt's default driver type is raw.
        let format = child_attribute(disk, "driver", "type")
            .unwrap_or("raw")
            .to_string();
        // libvirt puts <encryption> in <disk> (older) or in <source> (since 5.x).
        let secret = disk
            .descendants()
            .filter(|n| n.has_tag_name("encryption"))
            .flat_map(|e| e.children())
            .find(|n| n.has_tag_name("secret") && n.attribute("type") == Some("passphrase"))
            .and_then(|s| s.attribute("uuid"))
            .map(str::to_string);
        out.push(DomainDisk {
            image: PathBuf::from(file),
            target,
            secret,
            format,
        });
    }
    if out.is_empty() {
        return Err("the domain has no disk with an image file".into());
    }
    Ok(out)
}

/// Attribute `name` of the first child element `<tag>` of `node`.
fn child_attribute<'a>(node: roxmltree::Node<'a, '_>, tag: &str, name: &str) -> Option<&'a str> {
    node.children()
        .find(|n| n.has_tag_name(tag))
        .and_then(|n| n.attribute(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As libvirt 9 writes a nova instance (trimmed): a qcow2 disk with legacy AES, a cdrom.
    const NOVA: &str = r#"<!--
WARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE
OVERWRITTEN AND LOST. Changes to this xml configuration should be made using:
  virsh edit instance-00000001
-->
<domain type='kvm'>
  <name>instance-00000001</name>
  <uuid>6c3f1a52-3c1e-4a33-9f7e-1b2c3d4e5f60</uuid>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/var/lib/nova/instances/6c3f/disk'/>
      <target dev='vda' bus='virtio'/>
      <encryption format='qcow'>
        <secret type='passphrase' uuid='3f8f9a5e-6d7c-4e11-9a9b-2f1c0d7e8a41'/>
      </encryption>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/var/lib/nova/instances/6c3f/disk.config'/>
      <target dev='sda' bus='sata'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/nova/instances/6c3f/disk.eph0'>
        <encryption format='luks'>
          <secret type='passphrase' uuid='0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d'/>
        </encryption>
      </source>
      <target dev='vdb' bus='virtio'/>
    </disk>
  </devices>
</domain>
"#;

    #[test]
    fn disks_and_their_secrets_are_read_as_libvirt_writes_them() {
        let d = disks(NOVA).unwrap();
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(d[0].image, Path::new("/var/lib/nova/instances/6c3f/disk"));
        assert_eq!(d[0].target, "vda");
        assert_eq!(
            d[0].secret.as_deref(),
            Some("3f8f9a5e-6d7c-4e11-9a9b-2f1c0d7e8a41")
        );
        assert_eq!(d[0].format, "qcow2");
        assert_eq!(d[1].target, "vdb");
        assert_eq!(
            d[1].secret.as_deref(),
            Some("0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d")
        );
    }

    #[test]
    fn names_that_are_paths_and_xml_without_disks_are_refused() {
        for bad in ["", "../x", "a/b", ".hidden", "--help"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(disks("<domain><devices/></domain>").is_err());
        assert!(disks("<network/>").is_err());
        assert!(disks("<domain").is_err());
        let network = "<domain><devices><disk type='network' device='disk'><source \
                       protocol='rbd' name='pool/vol'/><target dev='vda'/></disk></devices></domain>";
        assert!(disks(network).unwrap_err().contains("vda"));
        let relative = "<domain><devices><disk type='file' device='disk'><source \
                        file='disk'/><target dev='vda'/></disk></devices></domain>";
        assert!(disks(relative).is_err());
    }
}
