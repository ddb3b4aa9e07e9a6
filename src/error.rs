//! The crate error: which file, and what went wrong with it.
//!
//! Lower layers return their own small error enums (`FormatError`, `CryptoError`, ...); the layer that
//! knows the file path wraps them into [`Error`], so every message the user sees names the file.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::crypto::error::CryptoError;
use crate::qcow2::error::FormatError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, without the file it happened to.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Format(#[from] FormatError),
    #[error("{0}")]
    Crypto(#[from] CryptoError),
    #[error("{0}")]
    Guest(#[from] crate::cmd::guestfs::error::GuestError),
    #[error("image is in use: {0}")]
    Locked(String),
    #[error("{0}")]
    Usage(String),
    /// A complete message from another process (the mount daemon), already naming its file, and
    /// the kind of failure it reported.
    #[error("{0}")]
    Relayed(String, Failure),
    /// A command did its work for some objects and reported the others as failed (`audit`: the
    /// disks it could not read have rows saying why).
    #[error("{0}")]
    Incomplete(String),
}

/// The kinds of failure a script may act on differently; the command line gives each its own
/// exit status (`cli::exit_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Other,
    /// A passphrase is wrong (a LUKS key slot refused it, or legacy AES decrypts to noise).
    WrongKey,
    /// A passphrase cannot be verified and the command would write with it.
    UnverifiedKey,
}

impl Failure {
    /// The word the mount daemon sends it as (see `mount::daemon`).
    pub fn tag(self) -> &'static str {
        match self {
            Failure::Other => "error",
            Failure::WrongKey => "wrong-key",
            Failure::UnverifiedKey => "unverified-key",
        }
    }

    pub fn from_tag(tag: &str) -> Failure {
        match tag {
            "wrong-key" => Failure::WrongKey,
            "unverified-key" => Failure::UnverifiedKey,
            _ => Failure::Other,
        }
    }
}

/// An error that names the file it concerns.
#[derive(Debug)]
pub struct Error {
    pub path: PathBuf,
    pub problem: Problem,
}

impl Error {
    pub fn new(path: impl AsRef<Path>, problem: impl Into<Problem>) -> Self {
        Error {
            path: path.as_ref().to_path_buf(),
            problem: problem.into(),
        }
    }

    /// An error whose text came from the mount daemon and already names the file.
    pub fn relayed(message: String, failure: Failure) -> Self {
        Error {
            path: PathBuf::new(),
            problem: Problem::Relayed(message, failure),
        }
    }

    /// What kind of failure this is, for the exit status.
    pub fn failure(&self) -> Failure {
        match &self.problem {
            Problem::Crypto(CryptoError::LooksWrong { .. } | CryptoError::WrongPassphrase) => {
                Failure::WrongKey
            }
            Problem::Crypto(CryptoError::Unverifiable) => Failure::UnverifiedKey,
            Problem::Relayed(_, failure) => *failure,
            _ => Failure::Other,
        }
    }

    /// The errno a FUSE request failing with this error answers with.
    pub fn errno(&self) -> i32 {
        match &self.problem {
            Problem::Io(e) => match e.raw_os_error() {
                Some(code) => code,
                None => libc::EIO,
            },
            Problem::Format(_) | Problem::Crypto(_) | Problem::Guest(_) => libc::EIO,
            Problem::Locked(_) => libc::EBUSY,
            Problem::Usage(_) | Problem::Relayed(..) => libc::EINVAL,
            Problem::Incomplete(_) => libc::EIO,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.as_os_str().is_empty() {
            write!(f, "{}", self.problem)
        } else {
            write!(f, "{}: {}", escaped(&self.path), self.problem)
        }
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
