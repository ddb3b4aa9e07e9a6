//! A small tmpfs for tests that fill, or pull away, the host file system under an image.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::fuse::is_mounted;
use super::run::{run_ok, run_with};

/// A tmpfs of `size` mounted on `path` (as small as tests need); unmounted (lazily if it must)
/// when dropped.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        run_ok(
            "mount",
            [
                "-t".as_ref(),
                "tmpfs".as_ref(),
                "-o".as_ref(),
                OsStr::new(&format!("size={size},mode=0755")),
                "tmpfs".as_ref(),
                path.as_os_str(),
            ],
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let bounded = Duration::from_secs(20);
        let _ = run_with(Command::new("umount").arg(&self.path), None, bounded);
        if is_mounted(&self.path) {
            let _ = run_with(
                Command::new("umount").arg("-l").arg(&self.path),
                None,
                bounded,
            );
        }
    }
}
