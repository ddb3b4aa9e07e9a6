//! Unit tests of the key check over chains held in memory: legacy AES layers judged by what their
//! sampled clusters decrypt to, and what reading and writing commands accept.

use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::crypto::{QcowAes, SectorCipher};
use crate::qcow2::tiny::{self, TinyImage};

const CS: u64 = 4096;

/// A cluster of fstab text as the guest cluster `cluster` stores it under `key`.
fn encrypted_text(key: &[u8], cluster: u64) -> Vec<u8> {
    let mut data: Vec<u8> = b"/dev/vda1 / ext4 defaults 0 1\n"
        .iter()
        .cycle()
        .take(CS as usize)
        .copied()
        .collect();
    QcowAes::new(key)
        .encrypt(cluster * CS / 512, &mut data)
        .unwrap();
    data
}

/// An AES image (4 KiB clusters) with text in `clusters` clusters, encrypted under `right`, and
/// opened with `given` as its key.
fn aes_layer(clusters: u64, right: &[u8], given: &[u8]) -> Layer {
    let mut t = TinyImage::new(12, 64 << 10);
    t.crypt_method = 1; // legacy AES
    for c in 0..clusters {
        t.data(c * CS, &encrypted_text(right, c));
    }
    let mut image = t.open(true).unwrap();
    image.set_cipher(Box::new(QcowAes::new(given)));
    Layer::Qcow2(Arc::new(image))
}

fn check(layers: Vec<Layer>) -> KeyCheck {
    KeyCheck::of(&Chain::from_layers(layers)).unwrap()
}

#[test]
fn a_right_legacy_aes_key_is_verified_by_what_it_decrypts() {
    let keys = check(vec![aes_layer(3, b"right", b"right")]);
    assert_eq!(
        keys.layers[0].verdict,
        Verdict::Plausible {
            plausible: 3,
            sampled: 3
        }
    );
    assert!(keys.all_verified());
    keys.require_right().unwrap();
    keys.require_for_writing(false).unwrap();
}

#[test]
fn a_wrong_legacy_aes_key_is_refused_for_reading_and_writing() {
    let keys = check(vec![aes_layer(3, b"right", b"wrong")]);
    assert_eq!(keys.layers[0].verdict, Verdict::Noise { sampled: 3 });
    for err in [
        keys.require_right().unwrap_err(),
        keys.require_for_writing(true).unwrap_err(),
    ] {
        assert_eq!(err.failure(), crate::error::Failure::WrongKey, "{err}");
        assert!(err.to_string().contains("the passphrase is wrong"), "{err}");
    }
}

#[test]
fn an_aes_layer_without_data_is_written_only_when_the_user_says_so() {
    let keys = check(vec![aes_layer(0, b"right", b"anything")]);
    assert_eq!(keys.layers[0].verdict, Verdict::NoData);
    assert!(!keys.all_verified());
    // Nothing is read from it: reading is fine.
    keys.require_right().unwrap();
    let err = keys.require_for_writing(false).unwrap_err();
    assert_eq!(err.failure(), crate::error::Failure::UnverifiedKey, "{err}");
    assert!(err.to_string().contains("--unverified-key"), "{err}");
    keys.require_for_writing(true).unwrap();
}

#[test]
fn a_wrong_key_on_a_backing_layer_is_refused_for_writing_the_top() {
    // The top is plain; sealing would copy the AES base's noise up.
    let top = tiny::open_bytes(TinyImage::new(12, 64 << 10).bytes(), true).unwrap();
    let keys = check(vec![
        Layer::Qcow2(Arc::new(top)),
        aes_layer(2, b"right", b"wrong"),
    ]);
    assert_eq!(keys.layers.len(), 1);
    assert_eq!(keys.layers[0].level, 1);
    assert!(keys.require_for_writing(true).is_err());
}

#[test]
fn a_chain_without_encryption_has_nothing_to_verify() {
    let top = tiny::open_bytes(TinyImage::new(12, 64 << 10).bytes(), true).unwrap();
    let raw = crate::io::HostFile::in_memory(Path::new("base.raw"), vec![0; 4096]);
    let keys = check(vec![Layer::Qcow2(Arc::new(top)), Layer::Raw(raw)]);
    assert!(keys.layers.is_empty());
    assert!(keys.all_verified());
}

#[test]
fn clusters_stored_as_zeros_do_not_verify_a_wrong_key() {
    // A preallocated (or torn) cluster holds zeros on disk: under any key, CBC turns them into a
    // repeating 16-byte pattern that looks like data. Alone, it verifies nothing.
    let mut t = TinyImage::new(12, 64 << 10);
    t.crypt_method = 1;
    t.data(0, &[0u8; CS as usize]);
    let mut image = t.open(true).unwrap();
    image.set_cipher(Box::new(QcowAes::new(b"wrong")));
    let keys = check(vec![Layer::Qcow2(Arc::new(image))]);
    assert_eq!(keys.layers[0].verdict, Verdict::NoData);
    assert!(keys.require_for_writing(false).is_err());
    // Beside a real ciphertext cluster, the wrong key is found out.
    let mut t = TinyImage::new(12, 64 << 10);
    t.crypt_method = 1;
    t.data(0, &[0u8; CS as usize]);
    let text = encrypted_text(b"right", 1);
    t.data(CS, &text);
    let mut image = t.open(true).unwrap();
    image.set_cipher(Box::new(QcowAes::new(b"wrong")));
    let keys = check(vec![Layer::Qcow2(Arc::new(image))]);
    assert_eq!(keys.layers[0].verdict, Verdict::Noise { sampled: 1 });
}
