//! Regressions for the data-loss holes adversarial testing found (issue 13): aliased files that
//! disagree, partition tables that move, block devices and FIFOs as backing files, truncated images
//! whose allocator cross-linked clusters, writes that cannot be stored, and a hostile header field.
//! Each test fails on the code before its fix. QEMU is the oracle throughout.

mod common;

use common::*;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Refusals come within this; a hang fails the test instead of the suite.
const REFUSAL_LIMIT: Duration = Duration::from_secs(5);

fn pwrite(path: &Path, off: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for writing");
    f.write_all_at(data, off).expect("pwrite");
    f.sync_all().expect("fsync");
}

// --- hole 4: a truncated image ---------------------------------------------------------------

#[test]
fn a_write_to_an_image_truncated_inside_its_data_never_lands_on_a_referenced_cluster() {
    let dir = workdir();
    let img = qcow2(dir.path().join("t.qcow2"), 4 * MIB).create();
    img.write_pattern(0, 128 * KIB, 0x5a);
    img.write_pattern(MIB, 64 * KIB, 0x5b);
    // Cut the file inside its data: clusters the L2 table and refcounts still name lie past the end.
    truncate_file(&img.path, 0x60000);
    let before = img.raw();

    let m = Mount::new(&img.path, &[] as &[&str]);
    pwrite(&m.disk(), 2 * MIB, &vec![0xa3; 64 * KIB as usize]);
    m.umount();

    let mut expected = before;
    expected[2 * MIB as usize..(2 * MIB + 64 * KIB) as usize].fill(0xa3);
    assert_same_bytes(
        &img.raw(),
        &expected,
        "guest after one write to a truncated image",
    );
    assert_check_no_corruption(&img);
}

// --- holes 3 and 6: what a backing file may be ---------------------------------------------------

/// A loop device over a file, detached on drop.
struct LoopDevice {
    device: PathBuf,
}

impl LoopDevice {
    fn attach(file: &Path) -> LoopDevice {
        let r = run_ok(
            "losetup",
            ["--find".as_ref(), "--show".as_ref(), file.as_os_str()],
        );
        LoopDevice {
            device: PathBuf::from(r.stdout_str().trim()),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

#[test]
fn a_block_device_backing_file_reads_as_its_contents_and_seal_copies_it_all() {
    let dir = workdir();
    let base_file = dir.path().join("base.raw");
    let data = random_bytes(8 * MIB as usize, 31);
    fs::write(&base_file, &data).expect("write base");
    let dev = LoopDevice::attach(&base_file);
    let base = Image::plain(&dev.device, Format::Raw, 8 * MIB);
    let top = qcow2(dir.path().join("top.qcow2"), 8 * MIB)
        .aes("blk")
        .backing(&base)
        .create();
    let key = dir.path().join("key");
    fs::write(&key, "blk").expect("key");

    let info = qcowfs_info_json(&top.path, &[]);
    let layers = info["layers"].as_array().expect("layers");
    assert_eq!(
        layers[1]["virtual_size"].as_u64(),
        Some(8 * MIB),
        "info of the device layer: {info}"
    );

    let m = Mount::new(&top.path, &["--passphrase-file".as_ref(), key.as_os_str()]);
    assert_same_bytes(
        &read_all_bounded(&m.disk()),
        &data,
        "disk over a block device",
    );
    // A partial write keeps the rest of its cluster from the device.
    pwrite(&m.disk(), 3 * MIB + 100, b"partial");
    m.umount();

    let mut expected = data.clone();
    expected[(3 * MIB + 100) as usize..(3 * MIB + 107) as usize].copy_from_slice(b"partial");
    assert_same_bytes(&top.raw(), &expected, "qemu's view after a partial write");

    let r = qcowfs([
        "seal".as_ref(),
        "--passphrase-file".as_ref(),
        key.as_os_str(),
        top.path.as_os_str(),
    ]);
    r.assert_success();
    let sealed = Image {
        secrets: vec![Some("blk".into())],
        ..Image::plain(&top.path, Format::Qcow2, 8 * MIB)
    };
    assert!(
        sealed.qemu_info().get("backing-filename").is_none(),
        "seal dropped the backing file"
    );
    drop(dev);
    assert_same_bytes(
        &sealed.raw(),
        &expected,
        "the sealed image, device detached",
    );
    assert_eq!(
        fs::read(&base_file).expect("base"),
        data,
        "the device is unchanged"
    );
    assert_check_clean(&sealed);
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().expect("UTF-8")).expect("no NUL");
    // SAFETY: a valid C string and a plain mode.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

#[test]
fn a_fifo_backing_file_is_refused_by_info_and_mount_within_a_second() {
    let dir = workdir();
    let base = create_raw(dir.path().join("base.raw"), 4 * MIB);
    let top = qcow2(dir.path().join("top.qcow2"), 4 * MIB)
        .backing(&base)
        .create();
    fs::remove_file(&base.path).expect("remove base");
    mkfifo(&base.path);

    let started = Instant::now();
    let r = qcowfs(["info".as_ref(), top.path.as_os_str()]);
    assert_one_line_error(&r, &["base.raw", "FIFO"], REFUSAL_LIMIT);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "info took {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let r = mount_failure(&top.path, &[] as &[&str], None);
    assert_one_line_error(&r, &["base.raw", "FIFO"], REFUSAL_LIMIT);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "mount took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_socket_or_character_device_backing_file_is_refused_naming_it() {
    let dir = workdir();
    let base = create_raw(dir.path().join("base.raw"), 4 * MIB);
    let top = qcow2(dir.path().join("top.qcow2"), 4 * MIB)
        .backing_named(&base, "/dev/zero")
        .create();
    let r = qcowfs(["info".as_ref(), top.path.as_os_str()]);
    assert_one_line_error(&r, &["/dev/zero", "character device"], REFUSAL_LIMIT);

    let sock = dir.path().join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    let top2 = qcow2(dir.path().join("top2.qcow2"), 4 * MIB)
        .backing_named(&base, sock.to_str().expect("UTF-8"))
        .create();
    let r = mount_failure(&top2.path, &[] as &[&str], None);
    assert_one_line_error(&r, &["sock", "socket"], REFUSAL_LIMIT);
}
