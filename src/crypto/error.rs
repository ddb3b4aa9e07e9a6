//! What can go wrong with keys and ciphers: a leaf file (it imports nothing of the crate), so the
//! crate's `Error` can name it without depending on the ciphers.

/// A problem with a passphrase, a key or an encryption header.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("the image is encrypted and no passphrase was given (use --passphrase-file)")]
    NoPassphrase,
    #[error("encryption method {0} is not supported")]
    UnsupportedMethod(u32),
    #[error(
        "the passphrase is wrong: all {sampled} sampled clusters decrypt to noise (legacy AES \
         has no key check; only if the guest's own data is encrypted or random and the key is \
         right: --force)"
    )]
    LooksWrong { sampled: usize },
    #[error("the passphrase is wrong: no key slot opens with it")]
    WrongPassphrase,
    #[error(
        "the passphrase cannot be verified: legacy AES has no key check and this layer holds no \
         encrypted data yet, so a wrong one would encrypt new data for no one; if it is right, \
         say --unverified-key"
    )]
    Unverifiable,
    #[error("LUKS header is unusable: {0}")]
    BadLuksHeader(&'static str),
    #[error("unsupported LUKS cipher: {0}")]
    UnsupportedCipher(String),
    #[error(
        "refusing to unlock: the LUKS header asks for {work} million PBKDF2 iterations (SHA-256 \
         equivalent) over {slots} key slot(s) and their digest checks, past the limit of {limit} \
         million (qemu-img makes a few million per slot)"
    )]
    TooMuchWork { work: u64, slots: usize, limit: u64 },
    #[error("buffer of {0} bytes is not a whole number of 512-byte sectors")]
    Unaligned(usize),
}
