//! `-d DOMAIN`: a nova instance found through its libvirt domain, as libvirt keeps it on a host
//! without virsh: the persistent XML in /etc/libvirt/qemu/NAME.xml, the passphrase in
//! /etc/libvirt/secrets/UUID.base64 (both folders moved into the test's own by the environment
//! variables qcowfs reads for tests), and a running domain's pid file in /run/libvirt/qemu/.

use crate::common;

use common::*;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const PASS: &str = "nova passphrase";
const UUID: &str = "3f8f9a5e-6d7c-4e11-9a9b-2f1c0d7e8a41";
const NAME: &str = "instance-00000001";
const FSTAB: &[u8] = b"UUID=0b1c / ext4 defaults 0 1\n";

/// The domain XML as libvirt writes a nova instance's persistent definition (trimmed).
fn domain_xml(disk: &Path) -> String {
    format!(
        "<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE\n\
         OVERWRITTEN AND LOST. Changes to this xml configuration should be made using:\n  \
         virsh edit {NAME}\nor other application using the libvirt API.\n-->\n\n\
         <domain type='kvm'>\n  <name>{NAME}</name>\n  \
         <uuid>6c3f1a52-3c1e-4a33-9f7e-1b2c3d4e5f60</uuid>\n  \
         <memory unit='KiB'>524288</memory>\n  <os>\n    \
         <type arch='x86_64' machine='pc-q35-8.2'>hvm</type>\n  </os>\n  <devices>\n    \
         <emulator>/usr/bin/qemu-system-x86_64</emulator>\n    \
         <disk type='file' device='disk'>\n      \
         <driver name='qemu' type='qcow2' cache='none'/>\n      \
         <source file='{}'/>\n      <target dev='vda' bus='virtio'/>\n      \
         <encryption format='qcow'>\n        \
         <secret type='passphrase' uuid='{UUID}'/>\n      </encryption>\n      \
         <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>\n    \
         </disk>\n  </devices>\n</domain>\n",
        disk.display()
    )
}

struct Host {
    dir: tempfile::TempDir,
    image: Image,
}

impl Host {
    /// A nova instance (legacy AES over a raw ext4 base) defined as libvirt domain NAME.
    fn new() -> Host {
        let dir = workdir();
        let root = dir.path();
        let files = root.join("files/etc");
        fs::create_dir_all(&files).unwrap();
        fs::write(files.join("fstab"), FSTAB).unwrap();
        fs::create_dir_all(root.join("nova/_base")).unwrap();
        let base = root.join("nova/_base/base");
        mkfs_ext4_from(&root.join("files"), &base, Some("16M"));
        let disk = root.join("nova/6c3f/disk");
        fs::create_dir_all(disk.parent().unwrap()).unwrap();
        let image = qcow2(&disk, 16 * MIB)
            .aes(PASS)
            .backing(&Image::plain(&base, Format::Raw, 16 * MIB))
            .create();
        image.write_bytes(0, &fs::read(&base).unwrap()[..64 * 1024]);
        for sub in ["qemu", "secrets", "run"] {
            fs::create_dir_all(root.join(sub)).unwrap();
        }
        fs::write(root.join(format!("qemu/{NAME}.xml")), domain_xml(&disk)).unwrap();
        fs::write(root.join("pass"), PASS).unwrap();
        let encoded = run_ok("base64", ["-w0".as_ref(), root.join("pass").as_os_str()]).stdout;
        let secret = root.join(format!("secrets/{UUID}.base64"));
        fs::write(&secret, encoded).unwrap();
        // libvirt keeps its secrets readable by root only.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        Host { dir, image }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn qcowfs(&self, args: &[&str], stdin: Option<&[u8]>) -> Run {
        let root = self.root();
        run_with(
            Command::new(qcowfs_bin())
                .args(args)
                .current_dir(root)
                .env("RUST_BACKTRACE", "0")
                .env("QCOWFS_LIBVIRT_QEMU_DIR", root.join("qemu"))
                .env("QCOWFS_LIBVIRT_SECRETS_DIR", root.join("secrets"))
                .env("QCOWFS_LIBVIRT_RUN_DIR", root.join("run")),
            stdin,
            Duration::from_secs(120),
        )
    }
}

#[test]
fn a_domain_names_its_disk_and_its_secret_and_writes_reach_the_image() {
    let host = Host::new();
    let r = host.qcowfs(&["cat", "-d", NAME, "/etc/fstab"], None);
    r.assert_success();
    assert_eq!(r.stdout, FSTAB);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    let r = host.qcowfs(&["write", "--domain", NAME, "/etc/motd"], Some(b"fixed\n"));
    r.assert_success();
    let r = host.qcowfs(&["cat", &format!("--domain={NAME}"), "/etc/motd"], None);
    r.assert_success();
    assert_eq!(r.stdout, b"fixed\n");
    assert_check_clean(&host.image);
    let r = host.qcowfs(&["info", "--json", "-d", NAME], None);
    r.assert_success();
    assert!(
        r.stdout_str().contains("nova/6c3f/disk"),
        "{}",
        r.stdout_str()
    );
    let r = host.qcowfs(&["audit", "-d", NAME], None);
    r.assert_success();
    assert!(r.stdout_str().contains("6c3f/disk"), "{}", r.stdout_str());
}

#[test]
fn a_running_domain_is_read_without_locks_and_refused_for_writes() {
    let host = Host::new();
    // libvirt's pid file for a running domain; this test's own process stands for QEMU.
    fs::write(
        host.root().join(format!("run/{NAME}.pid")),
        std::process::id().to_string(),
    )
    .unwrap();
    let r = host.qcowfs(&["write", "-d", NAME, "/etc/motd"], Some(b"x\n"));
    assert_one_line_error(&r, &[NAME], Duration::from_secs(60));
    assert_eq!(r.status.code(), Some(5), "{}", r.stderr);
    assert!(
        r.stderr.contains("running") && r.stderr.contains("virsh shutdown"),
        "{}",
        r.stderr
    );
    let r = host.qcowfs(&["cat", "-d", NAME, "/etc/fstab"], None);
    r.assert_success();
    assert_eq!(r.stdout, FSTAB);
    assert!(
        r.stderr.contains("is running") && r.stderr.contains("without locks"),
        "{}",
        r.stderr
    );
}

#[test]
fn an_unknown_domain_is_one_line_and_not_found() {
    let host = Host::new();
    let r = host.qcowfs(&["ls", "-d", "instance-0000ffff", "/"], None);
    assert_one_line_error(&r, &["instance-0000ffff"], Duration::from_secs(60));
    assert_eq!(r.status.code(), Some(6), "{}", r.stderr);
    assert!(r.stderr.contains("no libvirt domain"), "{}", r.stderr);
    let r = host.qcowfs(&["ls", "-d", "../../etc/passwd", "/"], None);
    assert_eq!(r.status.code(), Some(2), "{}", r.stderr);
}

/// libvirt opens a disk with the format its XML declares and never probes it: a raw disk whose
/// guest wrote a qcow2 header (naming a host file as its backing file) is refused, not read as
/// qcow2; a `-d` inside a group of flags is a usage error, not ignored.
#[test]
fn a_raw_disk_is_refused_whatever_its_guest_wrote_and_d_must_stand_alone() {
    let host = Host::new();
    let raw = host.root().join("nova/6c3f/disk.raw");
    // The guest's header names a host file as its backing file.
    let host_file = Image::plain("/etc/hostname", Format::Raw, 16 * MIB);
    qcow2(&raw, 16 * MIB)
        .backing_named(&host_file, "/etc/hostname")
        .create();
    let xml = domain_xml(&raw).replace("type='qcow2'", "type='raw'");
    fs::write(
        host.root().join("qemu/rawvm.xml"),
        xml.replace(NAME, "rawvm"),
    )
    .unwrap();
    for args in [&["info", "-d", "rawvm"][..], &["seal", "-d", "rawvm"]] {
        let r = host.qcowfs(args, None);
        assert_one_line_error(&r, &["rawvm"], Duration::from_secs(60));
        assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
        assert!(
            r.stderr.contains("vda") && r.stderr.contains("is raw"),
            "{}",
            r.stderr
        );
    }
    let r = host.qcowfs(&["check-key", "-Ud", NAME, "nova/6c3f/disk"], None);
    assert_eq!(r.status.code(), Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("-d NAME on its own"), "{}", r.stderr);
}
