//! Opening a guest file system for changes (`GuestEditor`): the chain writable under QEMU's
//! write lock, the key checked for writing, the partition chosen as the reading commands choose
//! it, the file system's library opened over a writable range of the disk; and at the end, the
//! library's clean unmount followed by the disk's commit.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::super::choose::{choose, Wanted};
use super::super::detect;
use super::super::device::RangeDevice;
use super::super::error::{Contents, GuestError};
use super::super::tree::shown;
use super::super::tree::FsError;
use super::editor::Editor;
use super::ext::ExtEditor;
use super::fat::FatEditor;
use super::xfs::XfsEditor;
use crate::chain::{Chain, KeyRing, OpenOptions};
use crate::disk::{BlockDevice, Disk, DiskOptions};
use crate::error::{Error, Result};
use crate::keys::check::{KeyCheck, KeyPolicy};

/// Memory for decrypted clusters while editing (the libraries cache blocks themselves).
const CACHE_BYTES: u64 = 32 << 20;

/// How to open the image for changes.
#[derive(Debug, Default)]
pub struct EditOptions {
    /// Backing files must lie in these folders (`--backing-within`).
    pub backing_within: Vec<PathBuf>,
    /// The partition to change (Linux numbering), or None to find the file system.
    pub partition: Option<u32>,
    /// The LVM2 logical volume to change (`VG/LV`), or None to find the file system.
    pub lv: Option<String>,
    /// What the key check lets through (`--unverified-key`, `--force`).
    pub key_policy: KeyPolicy,
}

/// A guest file system open for changes.
pub struct GuestEditor {
    image: PathBuf,
    disk: Arc<dyn BlockDevice>,
    editor: Option<Box<dyn Editor>>,
    /// The library's name, for messages.
    fs: &'static str,
}

impl GuestEditor {
    /// Open `image` writable and the guest file system on it for changes.
    pub fn open(image: &Path, keys: &KeyRing, opts: &EditOptions) -> Result<GuestEditor> {
        let chain = Chain::open(
            image,
            keys,
            OpenOptions {
                writable: true,
                force_share: false,
                without_keys: false,
                keep_rejected_keys: false,
                backing_within: opts.backing_within.clone(),
                record: None,
                faults: None,
            },
        )?;
        let check = KeyCheck::of(&chain)?;
        check.enforce_for_writing(opts.key_policy)?;
        let aes = check.aes_unverified();
        let disk: Arc<dyn BlockDevice> = Arc::new(Disk::new(
            chain,
            DiskOptions {
                cache_size: CACHE_BYTES,
                read_only: false,
            },
        ));
        let wanted = Wanted {
            partition: opts.partition,
            lv: opts.lv.as_deref(),
        };
        GuestEditor::over(image, disk, wanted, aes)
    }

    /// The guest file system on `disk` (the decrypted disk of `image`, opened writable and its
    /// key checked by the caller) open for changes: the volume `wanted` chosen as
    /// [`GuestEditor::open`] chooses it; `aes` when a legacy AES key could explain a disk that reads as noise. For
    /// callers that hold the disk themselves (the crash-state harness records its writes).
    pub fn over(
        image: &Path,
        disk: Arc<dyn BlockDevice>,
        wanted: Wanted,
        aes: bool,
    ) -> Result<GuestEditor> {
        let volume = choose(&disk, wanted, aes).map_err(|e| e.at_image(image))?;
        let view = volume.view;
        if let Some(why) = volume.read_only {
            let e = GuestError::NotEditableNow {
                view,
                found: "a logical volume",
                why,
            };
            return Err(Error::new(image, e));
        }
        let found = detect::detect(volume.device.as_ref(), volume.start, volume.len)?;
        let device = RangeDevice::writable(volume.device, volume.start, volume.len);
        let refuse = |e: FsError| match e {
            FsError::Disk(e) => e,
            FsError::Guest(g) => Error::new(image, g),
            other => Error::new(
                image,
                GuestError::NotEditableNow {
                    view: view.clone(),
                    found: found.name(),
                    why: other.to_string(),
                },
            ),
        };
        let (editor, fs): (Box<dyn Editor>, _) = match found {
            Contents::Ext => (
                Box::new(ExtEditor::open(device).map_err(refuse)?),
                "ext2/3/4",
            ),
            Contents::Xfs => (Box::new(XfsEditor::open(device).map_err(refuse)?), "XFS"),
            Contents::Fat => (Box::new(FatEditor::open(device).map_err(refuse)?), "FAT"),
            other => {
                let e = GuestError::NotEditable {
                    view,
                    found: other.name(),
                };
                return Err(Error::new(image, e));
            }
        };
        Ok(GuestEditor {
            image: image.to_path_buf(),
            disk,
            editor: Some(editor),
            fs,
        })
    }

    /// The image, for messages.
    pub fn image(&self) -> &Path {
        &self.image
    }

    pub(crate) fn editor(&self) -> &dyn Editor {
        self.editor.as_deref().expect("open until finished")
    }

    /// An error from the library about guest `path`, naming the image and the path.
    pub(crate) fn error(&self, path: &[u8], e: FsError) -> Error {
        match e {
            FsError::Disk(e) => e,
            FsError::Guest(g) => Error::new(&self.image, g),
            other => Error::new(
                &self.image,
                GuestError::Library {
                    fs: self.fs,
                    path: shown(path),
                    message: other.to_string(),
                },
            ),
        }
    }

    /// An error of ours about the guest, naming the image.
    pub(crate) fn guest_error(&self, e: GuestError) -> Error {
        Error::new(&self.image, e)
    }

    /// Write everything home, leave the file system clean, and commit the image. Called after
    /// a failed change too: what the library committed is made consistent on disk.
    pub fn finish(mut self) -> Result<()> {
        let editor = self.editor.take().expect("finished once");
        let finished = editor.finish().map_err(|e| self.error(b"/", e));
        let flushed = self.disk.flush();
        finished?;
        flushed
    }
}
