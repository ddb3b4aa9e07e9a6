//! Large direct I/O and a loop device with `--direct-io=on` over the mount: a direct read or write
//! larger than one request, and the loop device's own direct requests, on both transports. The
//! bytes must be QEMU's: read back through the mount and the loop device, and compared with
//! `qemu-img compare` and `qemu-img check` after the umount. (The mount does not ask for
//! FUSE_ASYNC_DIO: see `DevFuse::init`.)

use crate::common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use common::*;

const PASS: &str = "async-dio-pass";
const SIZE: u64 = 64 * MIB;

/// `len` bytes of `seed`'s stream in a buffer aligned for O_DIRECT.
fn aligned_data(image: &Image, len: usize, seed: u64) -> AlignedBuf {
    let mut buf = AlignedBuf::new(len);
    buf.as_mut().copy_from_slice(&image.test_data(len, seed));
    buf
}

fn open_direct(path: &Path) -> fs::File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} with O_DIRECT: {e}", path.display()))
}

/// `losetup --direct-io=on` over `file`, which must have taken direct I/O.
fn attach_direct(file: &Path) -> LoopDevice {
    let dev = LoopDevice::attach_with(file, &["--direct-io=on"]);
    let name = dev
        .device
        .file_name()
        .expect("a device name")
        .to_string_lossy();
    let dio = fs::read_to_string(format!("/sys/block/{name}/loop/dio")).unwrap_or_default();
    assert_eq!(
        dio.trim(),
        "1",
        "{} over {} did not take direct I/O",
        dev.device.display(),
        file.display()
    );
    dev
}

#[test]
fn large_direct_io_and_a_direct_io_loop_device_read_and_write_what_qemu_sees() {
    require_fuse();
    let _one = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let _on = Switch::set(true);
    let dir = workdir();
    let image = qcow2(dir.path().join("a.qcow2"), SIZE).aes(PASS).create();
    image.write_random(3 * MIB + 512, 5 * MIB as usize, 1);
    image.write_random(30 * MIB, 2 * MIB as usize, 2);
    let mut expected = raw_of(&image);
    let opts = passphrase_opts(dir.path(), PASS);
    for (round, mode) in ["off", "on"].into_iter().enumerate() {
        let mut options = opts.clone();
        options.extend(["--io-uring".into(), mode.into()]);
        let m = Mount::new(&image.path, &options);
        let disk = open_direct(&m.disk());

        // One 8 MiB read and one 6 MiB write: several requests each, across data and holes.
        let mut buf = AlignedBuf::new(8 * MIB as usize);
        let n = disk.read_at(buf.as_mut(), 2 * MIB).expect("direct read");
        assert_eq!(n, 8 * MIB as usize, "{mode}: short direct read");
        assert_same_bytes(
            buf.as_mut(),
            &expected[2 * MIB as usize..10 * MIB as usize],
            &format!("{mode}: 8 MiB direct read at 2 MiB"),
        );
        let at = 20 * MIB + 4096;
        let mut data = aligned_data(&image, 6 * MIB as usize, 10 + round as u64);
        assert_eq!(
            disk.write_at(data.as_mut(), at).expect("direct write"),
            6 * MIB as usize
        );
        expected[at as usize..at as usize + 6 * MIB as usize].copy_from_slice(data.as_mut());
        disk.sync_all().expect("fsync the disk");
        drop(disk);

        // A loop device with direct I/O: written at 40 MiB, then read whole.
        let device = attach_direct(&m.disk());
        let dev = open_direct(&device.device);
        let at = 40 * MIB + 8192 * round as u64;
        let mut data = aligned_data(&image, 3 * MIB as usize, 20 + round as u64);
        assert_eq!(
            dev.write_at(data.as_mut(), at)
                .expect("write the loop device"),
            3 * MIB as usize
        );
        expected[at as usize..at as usize + 3 * MIB as usize].copy_from_slice(data.as_mut());
        dev.sync_all().expect("fsync the loop device");
        let mut all = AlignedBuf::new(SIZE as usize);
        for chunk in 0..SIZE / (4 * MIB) {
            let range = (chunk * 4 * MIB) as usize..((chunk + 1) * 4 * MIB) as usize;
            let n = dev
                .read_at(&mut all.as_mut()[range], chunk * 4 * MIB)
                .expect("read the loop device");
            assert_eq!(
                n,
                4 * MIB as usize,
                "{mode}: short read of {}",
                device.device.display()
            );
        }
        assert_same_bytes(
            all.as_mut(),
            &expected,
            &format!("{mode}: {} read whole", device.device.display()),
        );
        drop(dev);
        drop(device);
        wait_until_no_loop_device_uses(&m.disk());
        m.umount().assert_success();
    }
    let raw = dir.path().join("expected.raw");
    fs::write(&raw, &expected).expect("write the expected guest");
    qemu_compare_with_raw(&image, &raw).assert_success();
    assert_check_clean(&image);
}
