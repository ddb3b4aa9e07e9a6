//! The commands other than `mount`, each a leaf: it takes a plain options struct (never `cli`'s
//! argument types; `cli` converts those) and works through the layers below it.
//!
//! - `info`: what an image and its chain are, as text or JSON.
//! - `check`: `qemu-img check` of an encrypted image, its keys passed safely.
//! - `check_key`: whether the passphrases open every encrypted layer (`open --test-passphrase`).
//! - `seal`: copy the backing chain into the encrypted top and drop it.
//! - `audit`: nova instance trees, how much of each guest sits unencrypted in a base image.
//! - `guestfs`: `ls`, `cat`, `copy-out` of the guest's files, in-process, no root.

pub mod audit;
pub mod check;
pub mod check_key;
pub mod guestfs;
pub mod info;
pub mod seal;
pub mod size;
