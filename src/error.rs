//! The crate error: which file, and what went wrong with it.
//!
//! Lower layers return their own small error enums (`FormatError`, `CryptoError`, ...); the layer that
//! knows the file path wraps them into [`Error`], so every message the user sees names the file.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::cmd::guestfs::error::GuestError;
use crate::crypto::error::CryptoError;
use crate::qcow2::error::FormatError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, without the file it happened to.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("{}", io_text(.0))]
    Io(#[from] io::Error),
    #[error("{0}")]
    Format(#[from] FormatError),
    #[error("{0}")]
    Crypto(#[from] CryptoError),
    #[error("{0}")]
    Guest(#[from] GuestError),
    #[error("image is in use: {0}")]
    Locked(String),
    /// Something else holds what the command needs (a mount point still in use).
    #[error("{0}")]
    Busy(String),
    /// The command line asks for something that cannot be (exit status 2, as clap's own).
    #[error("{0}")]
    Usage(String),
    /// The request is well formed but refused for this file (the message says why and what to
    /// do instead).
    #[error("{0}")]
    Refused(String),
    /// A complete message from another process (the mount daemon), already naming its file, and
    /// the kind of failure it reported.
    #[error("{0}")]
    Relayed(String, Failure),
    /// A command did its work for some objects and reported the others as failed (`audit`: the
    /// disks it could not read have rows saying why).
    #[error("{0}")]
    Incomplete(String),
    /// The command was stopped (Ctrl-C) at a point where it could stop cleanly.
    #[error("{0}")]
    Interrupted(String),
    /// A problem and what to do about it, for a problem whose own words cannot say it (a host
    /// error): "Permission denied; to read it only: --read-only".
    #[error("{problem}; {hint}")]
    Hinted { problem: Box<Problem>, hint: String },
}

/// The kinds of failure a script may act on differently; the command line gives each its own
/// exit status (`cli::exit_status`), in the manner of cryptsetup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Other,
    /// The command line is wrong (an option value, a missing passphrase, a path that is not one).
    Usage,
    /// A passphrase is wrong (a LUKS key slot refused it, or legacy AES decrypts to noise).
    WrongKey,
    /// A passphrase cannot be verified and the command would write with it.
    UnverifiedKey,
    /// The image (or the mount) is held by another process: a VM, qemu-img, another qcowfs.
    InUse,
    /// A file is missing, or this user may not open it the way asked.
    NotFound,
    /// The image's metadata or the guest's file system is damaged.
    Damaged,
    /// Reading or writing the host failed (EIO, a full disk).
    Io,
    /// Stopped by Ctrl-C (SIGINT or SIGTERM) where it could stop cleanly.
    Interrupted,
}

/// Every kind with the word the mount daemon sends it as (see `mount::daemon`).
const TAGS: [(Failure, &str); 9] = [
    (Failure::Other, "error"),
    (Failure::Usage, "usage"),
    (Failure::WrongKey, "wrong-key"),
    (Failure::UnverifiedKey, "unverified-key"),
    (Failure::InUse, "in-use"),
    (Failure::NotFound, "not-found"),
    (Failure::Damaged, "damaged"),
    (Failure::Io, "io"),
    (Failure::Interrupted, "interrupted"),
];

impl Failure {
    /// The word the mount daemon sends it as (see `mount::daemon`).
    pub fn tag(self) -> &'static str {
        TAGS.iter()
            .find(|(f, _)| *f == self)
            .map_or("error", |(_, t)| t)
    }

    pub fn from_tag(tag: &str) -> Failure {
        TAGS.iter()
            .find(|(_, t)| *t == tag)
            .map_or(Failure::Other, |(f, _)| *f)
    }

    fn of(problem: &Problem) -> Failure {
        match problem {
            Problem::Io(e) => Failure::of_io(e),
            Problem::Format(e) => Failure::of_format(e),
            Problem::Crypto(e) => Failure::of_crypto(e),
            Problem::Guest(e) => Failure::of_guest(e),
            Problem::Locked(_) | Problem::Busy(_) => Failure::InUse,
            Problem::Usage(_) => Failure::Usage,
            Problem::Relayed(_, failure) => *failure,
            Problem::Refused(_) | Problem::Incomplete(_) => Failure::Other,
            Problem::Interrupted(_) => Failure::Interrupted,
            Problem::Hinted { problem, .. } => Failure::of(problem),
        }
    }

    /// The kind of a host error, by its errno.
    fn of_io(e: &io::Error) -> Failure {
        match e.raw_os_error() {
            Some(
                libc::ENOENT
                | libc::ENOTDIR
                | libc::EISDIR
                | libc::EACCES
                | libc::EPERM
                | libc::EROFS
                | libc::ELOOP
                | libc::ENAMETOOLONG,
            ) => Failure::NotFound,
            Some(libc::EBUSY | libc::ETXTBSY) => Failure::InUse,
            _ => Failure::Io,
        }
    }

    fn of_format(e: &FormatError) -> Failure {
        use FormatError::*;
        match e {
            BadMagic
            | UnsupportedVersion(_)
            | UnknownIncompatible(_)
            | ExternalDataFile
            | CompressionType(_)
            | BackingFormat(_)
            | Unsupported(_) => Failure::Other,
            _ => Failure::Damaged,
        }
    }

    fn of_crypto(e: &CryptoError) -> Failure {
        match e {
            CryptoError::LooksWrong { .. } | CryptoError::WrongPassphrase => Failure::WrongKey,
            CryptoError::Unverifiable => Failure::UnverifiedKey,
            CryptoError::NoPassphrase => Failure::Usage,
            CryptoError::BadLuksHeader(_) => Failure::Damaged,
            CryptoError::UnsupportedMethod(_)
            | CryptoError::UnsupportedCipher(_)
            | CryptoError::TooMuchWork { .. }
            | CryptoError::Unaligned(_) => Failure::Other,
        }
    }

    fn of_guest(e: &GuestError) -> Failure {
        use ext4_view::Ext4Error;
        use GuestError::*;
        match e {
            NoPartition { .. } | NoLv { .. } | NotFound(_) | NotADirectory(_) => Failure::NotFound,
            Ambiguous { .. } | NoSubvolumes(_) | NotAbsolute(_) | IsADirectory(_) => Failure::Usage,
            Load { .. }
            | LoadFs { .. }
            | Geometry { .. }
            | NotClean(_)
            | LinkTooLong { .. }
            | BadXattrs(_)
            | SecondPath(_)
            | TooManyEntries { .. }
            | TooMuchData { .. }
            | TooLong { .. } => Failure::Damaged,
            Ext4 { source, .. } => match source {
                Ext4Error::NotFound | Ext4Error::NotADirectory => Failure::NotFound,
                Ext4Error::Corrupt(_) => Failure::Damaged,
                Ext4Error::Io(_) => Failure::Io,
                _ => Failure::Other,
            },
            _ => Failure::Other,
        }
    }
}

/// What a file is to the command, so that a message says which of the files named on the command
/// line (or found through the image) failed: "passphrase file KEY: No such file".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Role {
    /// The image the command names, or a file whose problem says what it is: no prefix.
    #[default]
    Plain,
    PassphraseFile,
    /// A backing file, and the image (or backing file) that names it.
    BackingFile {
        of: Box<PathBuf>,
    },
    Mountpoint,
    LogFile,
}

/// An error that names the file it concerns.
#[derive(Debug)]
pub struct Error {
    pub path: PathBuf,
    pub problem: Problem,
    pub role: Role,
}

impl Error {
    pub fn new(path: impl AsRef<Path>, problem: impl Into<Problem>) -> Self {
        Error {
            path: path.as_ref().to_path_buf(),
            problem: problem.into(),
            role: Role::Plain,
        }
    }

    /// The same error, with what to do about it.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        let problem = std::mem::replace(&mut self.problem, Problem::Incomplete(String::new()));
        self.problem = Problem::Hinted {
            problem: Box::new(problem),
            hint: hint.into(),
        };
        self
    }

    /// The host errno, when the problem is one.
    pub fn os_error(&self) -> Option<i32> {
        match &self.problem {
            Problem::Io(e) => e.raw_os_error(),
            Problem::Hinted { problem, .. } => match problem.as_ref() {
                Problem::Io(e) => e.raw_os_error(),
                _ => None,
            },
            _ => None,
        }
    }

    /// The same error, saying what the file is (unless a lower layer already said so).
    pub fn as_role(mut self, role: Role) -> Self {
        if self.role == Role::Plain {
            self.role = role;
        }
        self
    }

    /// An error whose text came from the mount daemon and already names the file.
    pub fn relayed(message: String, failure: Failure) -> Self {
        Error {
            path: PathBuf::new(),
            problem: Problem::Relayed(message, failure),
            role: Role::Plain,
        }
    }

    /// What kind of failure this is, for the exit status.
    pub fn failure(&self) -> Failure {
        Failure::of(&self.problem)
    }

    /// The errno a FUSE request failing with this error answers with.
    pub fn errno(&self) -> i32 {
        match &self.problem {
            Problem::Io(e) => match e.raw_os_error() {
                Some(code) => code,
                None => libc::EIO,
            },
            Problem::Format(_) | Problem::Crypto(_) | Problem::Guest(_) => libc::EIO,
            Problem::Locked(_) | Problem::Busy(_) => libc::EBUSY,
            Problem::Usage(_) | Problem::Refused(_) | Problem::Relayed(..) => libc::EINVAL,
            Problem::Incomplete(_) => libc::EIO,
            Problem::Interrupted(_) => libc::EINTR,
            Problem::Hinted { .. } => match self.os_error() {
                Some(code) => code,
                None => libc::EIO,
            },
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.as_os_str().is_empty() {
            return write!(f, "{}", self.problem);
        }
        let path = escaped(&self.path);
        let missing =
            matches!(&self.problem, Problem::Io(e) if e.raw_os_error() == Some(libc::ENOENT));
        match &self.role {
            Role::Plain => write!(f, "{path}: {}", self.problem),
            Role::PassphraseFile => write!(f, "passphrase file {path}: {}", self.problem),
            Role::BackingFile { of } if missing => {
                write!(f, "backing file {path} of {}: missing", escaped(of))
            }
            Role::BackingFile { of } => {
                write!(
                    f,
                    "backing file {path} of {}: {}",
                    escaped(of),
                    self.problem
                )
            }
            Role::Mountpoint if missing => {
                write!(f, "mountpoint {path}: no such folder (make it with mkdir)")
            }
            Role::Mountpoint => write!(f, "mountpoint {path}: {}", self.problem),
            Role::LogFile => write!(f, "log file {path}: {}", self.problem),
        }
    }
}

/// A host error as a person reads it: the C library's words without Rust's "(os error N)".
pub fn io_text(e: &io::Error) -> String {
    let text = e.to_string();
    match e.raw_os_error() {
        Some(libc::ENOENT) => "No such file".to_string(),
        Some(code) => text
            .strip_suffix(&format!(" (os error {code})"))
            .unwrap_or(&text)
            .to_string(),
        None => text,
    }
}

/// A path as text safe for a terminal or a log line: control characters (escape sequences, line
/// breaks) and bytes that are not UTF-8 are shown as `\xNN` (`\n`, `\t`), so an image naming a
/// backing file `"x\e[2J"` cannot clear the screen or forge a line of output.
pub fn escaped(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for chunk in path.as_os_str().as_bytes().utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.problem)
    }
}

/// Attach a path to any lower-level error.
pub trait Context<T> {
    fn at(self, path: &Path) -> Result<T>;
}

impl<T, E: Into<Problem>> Context<T> for std::result::Result<T, E> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|e| Error::new(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn escapes_control_characters_and_bytes_that_are_not_utf8() {
        let p = Path::new(std::ffi::OsStr::from_bytes(
            b"/img/a\x1b[2J\nb\xff c\xc3\xa9",
        ));
        assert_eq!(escaped(p), "/img/a\\x1b[2J\\nb\\xff c\u{e9}");
        let e = Error::new(p, Problem::Usage("bad".into()));
        assert!(!e.to_string().contains('\x1b'), "{e}");
    }
}
