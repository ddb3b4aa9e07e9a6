//! Unit tests of LUKS: header parsing from byte literals, AF merge, every sector mode.

use super::*;

#[test]
fn af_merge_of_a_single_stripe_is_the_stripe() {
    let split = vec![7u8; 32];
    assert_eq!(af_merge("sha256", &split, 32, 1), split);
}

#[test]
fn af_merge_diffuses_all_but_the_last_stripe() {
    // Two stripes: key = diffuse(s0) ^ s1.
    let s0 = [1u8; 40];
    let s1 = [2u8; 40];
    let mut d = s0.to_vec();
    diffuse("sha1", &mut d);
    let expected: Vec<u8> = d.iter().zip(&s1).map(|(a, b)| a ^ b).collect();
    let split = [s0, s1].concat();
    assert_eq!(af_merge("sha1", &split, 40, 2), expected);
}

#[test]
fn every_mode_round_trips() {
    for (mode, iv, key_len) in [
        ("xts", "plain64", 64),
        ("xts", "plain64", 32),
        ("cbc", "essiv:sha256", 16),
        ("cbc", "plain", 24),
        ("cbc", "plain64", 32),
    ] {
        let key: Vec<u8> = (0..key_len as u8).collect();
        let c = LuksCipher::new(mode, iv, &key).unwrap();
        let plain: Vec<u8> = (0..2048u32).map(|i| i as u8).collect();
        let mut buf = plain.clone();
        c.encrypt(77, &mut buf).unwrap();
        assert_ne!(buf, plain, "{mode}-{iv}");
        c.decrypt(77, &mut buf).unwrap();
        assert_eq!(buf, plain, "{mode}-{iv}");
    }
}

#[test]
fn xts_matches_the_xts_mode_crate() {
    let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37)).collect();
    let ours = LuksCipher::new("xts", "plain64", &key).unwrap();
    let reference = xts_mode::Xts128::new(
        Aes256::new(GenericArray::from_slice(&key[..32])),
        Aes256::new(GenericArray::from_slice(&key[32..])),
    );
    let plain: Vec<u8> = (0..4096u32).map(|i| (i * 13 / 7) as u8).collect();
    let mut a = plain.clone();
    ours.encrypt(123_456, &mut a).unwrap();
    let mut b = plain.clone();
    reference.encrypt_area(&mut b, 512, 123_456, xts_mode::get_tweak_default);
    assert_eq!(a, b);
}

#[test]
fn plain_iv_wraps_at_32_bits() {
    assert_eq!(IvGen::Plain.iv(0x1_0000_0005), IvGen::Plain.iv(5));
    assert_ne!(IvGen::Plain64.iv(0x1_0000_0005), IvGen::Plain64.iv(5));
}

fn header() -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[..6].copy_from_slice(&MAGIC);
    b[7] = 1;
    b[8..11].copy_from_slice(b"aes");
    b[40..51].copy_from_slice(b"xts-plain64");
    b[72..78].copy_from_slice(b"sha256");
    b[108..112].copy_from_slice(&64u32.to_be_bytes());
    b[164..168].copy_from_slice(&1000u32.to_be_bytes());
    for i in 0..8 {
        let s = 208 + i * 48;
        b[s..s + 4].copy_from_slice(&SLOT_INACTIVE.to_be_bytes());
    }
    b[208..212].copy_from_slice(&SLOT_ACTIVE.to_be_bytes());
    b[212..216].copy_from_slice(&1000u32.to_be_bytes());
    b[248..252].copy_from_slice(&8u32.to_be_bytes());
    b[252..256].copy_from_slice(&4000u32.to_be_bytes());
    b
}

#[test]
fn parses_a_luks_header() {
    let h = LuksHeader::parse(&header(), 1 << 20).unwrap();
    assert_eq!(
        (
            h.cipher.as_str(),
            h.mode.as_str(),
            h.ivgen.as_str(),
            h.hash.as_str()
        ),
        ("aes", "xts", "plain64", "sha256")
    );
    assert_eq!(h.slots.len(), 1);
    assert_eq!(h.material_len(&h.slots[0]), 256_000);
    // 24-byte keys (aes-192-cbc) * 4000 stripes is not whole sectors: rounded up.
    let mut b = header();
    b[40..51].copy_from_slice(b"cbc-plain64");
    b[108..112].copy_from_slice(&24u32.to_be_bytes());
    let h = LuksHeader::parse(&b, 1 << 20).unwrap();
    assert_eq!(h.material_len(&h.slots[0]), 96_256);
}

#[test]
fn rejects_absurd_key_slots() {
    let mut b = header();
    b[212..216].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(LuksHeader::parse(&b, 1 << 20).is_err());
    let mut b = header();
    b[252..256].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(LuksHeader::parse(&b, 1 << 20).is_err());
    let b = header();
    assert!(
        LuksHeader::parse(&b, 4096).is_err(),
        "key material beyond the area"
    );
    let mut b = header();
    b[208..212].copy_from_slice(&SLOT_INACTIVE.to_be_bytes());
    assert!(LuksHeader::parse(&b, 1 << 20).is_err(), "no active slot");
    let mut b = header();
    b[8..11].copy_from_slice(b"twf");
    assert!(LuksHeader::parse(&b, 1 << 20).is_err());
}

#[test]
fn rejects_key_material_offset_past_the_luks_area_without_overflow() {
    // The largest material offset a header can hold (u32::MAX sectors, 2 TiB) against the largest
    // area: no overflow, and against a real area: outside it.
    let mut b = header();
    b[248..252].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        LuksHeader::parse(&b, 1 << 20),
        Err(CryptoError::BadLuksHeader(_))
    ));
    let h = LuksHeader::parse(&b, u64::MAX).unwrap();
    assert_eq!(h.slots[0].material_offset, u64::from(u32::MAX) * 512);
}

/// `header()` with all eight slots active like slot 0, `iterations` each, and that digest count.
fn header_with_slots(iterations: u32, digest: u32, hash: &[u8]) -> Vec<u8> {
    let mut b = header();
    b[72..72 + 32].fill(0);
    b[72..72 + hash.len()].copy_from_slice(hash);
    b[164..168].copy_from_slice(&digest.to_be_bytes());
    let slot0 = b[208..256].to_vec();
    for i in 0..8 {
        let s = 208 + i * 48;
        b[s..s + 48].copy_from_slice(&slot0);
        b[s + 4..s + 8].copy_from_slice(&iterations.to_be_bytes());
    }
    b
}

#[test]
fn a_header_asking_for_too_much_key_derivation_is_refused_before_any_is_done() {
    let h = LuksHeader::parse(
        &header_with_slots(20_000_000, 20_000_000, b"sha256"),
        1 << 20,
    )
    .unwrap();
    assert_eq!(h.slots.len(), 8);
    let never = |_: &KeySlot| -> Result<Vec<u8>, CryptoError> {
        panic!("no key material may be read for a refused header")
    };
    match h.unlock(b"anything", &never) {
        Err(CryptoError::TooMuchWork { work, slots, limit }) => {
            assert_eq!((work, slots, limit), (40, 8, MAX_SLOT_WORK / 1_000_000));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn sha512_key_derivation_counts_three_times_sha256() {
    let h256 =
        LuksHeader::parse(&header_with_slots(1_000_000, 100_000, b"sha256"), 1 << 20).unwrap();
    let h512 =
        LuksHeader::parse(&header_with_slots(1_000_000, 100_000, b"sha512"), 1 << 20).unwrap();
    assert_eq!(h256.slot_work(&h256.slots[0]), 1_100_000);
    assert_eq!(h512.slot_work(&h512.slots[0]), 3_300_000);
    // Twelve million SHA-512 iterations are 36 M SHA-256 ones: past the per-slot limit.
    let slow = LuksHeader::parse(&header_with_slots(12_000_000, 1000, b"sha512"), 1 << 20).unwrap();
    assert!(matches!(
        slow.unlock(b"x", &|_| panic!("refused first")),
        Err(CryptoError::TooMuchWork { .. })
    ));
}
