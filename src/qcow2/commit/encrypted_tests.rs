//! The commit pipeline on encrypted images, whose large batches are encrypted half on a second
//! thread (`stage`): the writes must still reach the file in the batch's order, QEMU must read
//! back what was written, and a write failing in either half must leave the image as it was.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;
use crate::crypto::QcowAes;
use crate::io::fault::{Fault, FaultInjector, FaultPlan, HostOp};
use crate::io::host::Recorder;
use crate::io::{HostEvent, HostFile, HostIo, MemFile, WriteLog};
use crate::qcow2::qemu_tools::{qemu_check_args, run};
use crate::qcow2::{ClusterSource, Header};

const SECRET: &str = "secret,id=sec0,data=qcowfs-unit";
const KEY: &[u8] = b"qcowfs-unit";
const CS: u64 = 64 << 10;
/// Clusters in the batch: 1 MiB, well above `PARALLEL_ENCRYPTION_BYTES`.
const CLUSTERS: u64 = 16;

/// A legacy-AES image qemu-img made, its bytes, and where it lies.
fn encrypted_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("img.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            SECRET,
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=aes,encrypt.key-secret=sec0,cluster_size=65536",
        ],
        &path,
        &["4M"],
    );
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

fn open(path: &Path, bytes: &[u8], io: Arc<dyn HostIo>) -> Qcow2Image {
    let header = Header::parse(&bytes[..4096], bytes.len() as u64).unwrap();
    let mut image = Qcow2Image::open(HostFile::over(path, io), header, true).unwrap();
    image.set_cipher(Box::new(QcowAes::new(KEY)));
    image
}

/// Cluster i of the batch: every byte i + 1.
fn batch(image: &Qcow2Image) -> Vec<ClusterWrite> {
    (0..CLUSTERS)
        .map(|i| ClusterWrite {
            guest: i * CS,
            target: image.write_target(i * CS).unwrap(),
            pieces: vec![(0, vec![i as u8 + 1; CS as usize])],
        })
        .collect()
}

/// The `--image-opts` string QEMU opens the encrypted image at `path` with.
fn image_opts(path: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        path.display()
    )
}

/// `qemu-img check` of the encrypted image at `path`: (corruptions, leaks).
fn qemu_check(path: &Path) -> (u64, u64) {
    let opts = image_opts(path);
    qemu_check_args(&["--object", SECRET, "--image-opts"], opts.as_ref())
}

/// `qemu-io read -P` of the encrypted image at `path`: exit 0 and no failed verification.
fn qemu_reads(path: &Path, pattern: u8, offset: u64, len: u64) -> bool {
    let opts = image_opts(path);
    let out = std::process::Command::new("qemu-io")
        .args(["--object", SECRET, "--image-opts", &opts, "-c"])
        .arg(format!("read -P {pattern:#x} {offset} {len}"))
        .output()
        .expect("qemu-io is required");
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && !text.contains("Pattern verification failed")
}

#[test]
fn a_large_encrypted_batch_is_written_in_its_order_and_qemu_reads_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = encrypted_image(dir.path());
    let mem = Arc::new(MemFile::new(bytes.clone()));
    let log = WriteLog::default();
    let image = open(
        &path,
        &bytes,
        Arc::new(Recorder::new(mem.clone(), log.clone())),
    );
    image.commit(batch(&image), Durability::Synced).unwrap();
    let hosts: Vec<u64> = (0..CLUSTERS)
        .map(|i| match image.map(i * CS, 1).unwrap().0 {
            ClusterSource::Data { host } => host,
            other => panic!("cluster {i} maps to {other:?}"),
        })
        .collect();
    // The data writes come first, one per cluster, in the batch's order.
    let writes: Vec<u64> = log
        .events()
        .iter()
        .filter_map(|e| match e {
            HostEvent::Write { offset, .. } => Some(*offset),
            _ => None,
        })
        .take(CLUSTERS as usize)
        .collect();
    assert_eq!(writes, hosts);
    let after = dir.path().join("after.qcow2");
    std::fs::write(&after, mem.contents()).unwrap();
    assert_eq!(qemu_check(&after), (0, 0));
    for i in 0..CLUSTERS {
        assert!(qemu_reads(&after, i as u8 + 1, i * CS, CS), "cluster {i}");
    }
    assert!(qemu_reads(
        &after,
        0,
        CLUSTERS * CS,
        (4 << 20) - CLUSTERS * CS
    ));
}

#[test]
fn a_write_failing_in_either_half_of_an_encrypted_batch_leaves_the_image_as_it_was() {
    // The first cluster's write (encrypted here) and the last one's (encrypted on the helper).
    for nth in [0, CLUSTERS - 1] {
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes) = encrypted_image(dir.path());
        let mem = Arc::new(MemFile::new(bytes.clone()));
        let plan = FaultPlan::new(Fault::Eio, nth);
        let image = open(
            &path,
            &bytes,
            Arc::new(FaultInjector::new(mem.clone(), plan.clone())),
        );
        let err = image.commit(batch(&image), Durability::Synced).unwrap_err();
        assert_eq!(err.errno(), libc::EIO, "write {nth}: {err}");
        assert_eq!(
            plan.seen(HostOp::Write),
            nth + 1,
            "no write after the failed one"
        );
        let after = dir.path().join("after.qcow2");
        std::fs::write(&after, mem.contents()).unwrap();
        let (corruptions, _leaks) = qemu_check(&after);
        assert_eq!(corruptions, 0, "write {nth}");
        assert!(
            qemu_reads(&after, 0, 0, 4 << 20),
            "write {nth}: the guest still reads zeros"
        );
    }
}
