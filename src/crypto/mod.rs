//! Sector ciphers for encrypted qcow2 layers.
//!
//! Every cipher works on whole 512-byte sectors and numbers them itself; the caller says which sector
//! number the first sector of a buffer has (guest offset / 512 for legacy AES, host offset / 512 for
//! LUKS, as QEMU numbers them).

mod cipher;
pub(crate) mod error;
pub(crate) mod luks;
mod qcow_aes;
pub mod secret;

pub(crate) use cipher::as_blocks;
pub use cipher::{looks_like_plaintext, SectorCipher, SECTOR_SIZE};
pub use error::CryptoError;
pub use luks::{LuksCipher, LuksHeader};
pub use qcow_aes::QcowAes;
