//! LUKS version 1 inside qcow2 (`crypt_method = 2`): the header the full-disk-encryption extension
//! points to, keyslot unlocking (PBKDF2, anti-forensic merge, master-key digest) and the sector cipher
//! for data (AES-128/192/256 in XTS or CBC mode, IVs plain, plain64 or essiv). Sector numbers of the
//! key material start at 0; data sectors are numbered by host offset (the caller's job).

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{
    BlockCipher, BlockDecrypt, BlockDecryptMut, BlockEncrypt, BlockEncryptMut, InnerIvInit, KeyInit,
};
use aes::{Aes128, Aes192, Aes256};
use sha1::Sha1;
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};
use zeroize::Zeroizing;

use super::{CryptoError, SectorCipher, SECTOR_SIZE};

pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
pub const HEADER_LEN: usize = 592;
const SLOTS: usize = 8;
const SLOT_ACTIVE: u32 = 0x00ac_71f3;
const SLOT_INACTIVE: u32 = 0x0000_dead;
const DIGEST_LEN: usize = 20;
/// Bounds on what a header may ask of us, so a hostile one cannot take unbounded time or memory.
const MAX_ITERATIONS: u32 = 20_000_000;
/// The most key-derivation work trying one slot may take, in SHA-256-equivalent PBKDF2 iterations
/// (slot and digest): qemu-img's default iter-time (2 s) makes 5.5 M + 1.4 M here, so this allows a
/// machine four times as fast; about 12 s of this one.
pub const MAX_SLOT_WORK: u64 = 32_000_000;
/// The most work one unlock may take over all the slots it tries: about 25 s of this machine.
pub const MAX_UNLOCK_WORK: u64 = 64_000_000;
const MAX_STRIPES: u32 = 65_536;
const MAX_KEY_MATERIAL: u64 = 16 << 20;

/// What the LUKS header says, validated.
#[derive(Debug, Clone)]
pub struct LuksHeader {
    pub cipher: String,
    pub mode: String,
    pub ivgen: String,
    pub hash: String,
    pub key_bytes: usize,
    pub payload_offset_sectors: u32,
    mk_digest: [u8; DIGEST_LEN],
    mk_digest_salt: [u8; 32],
    mk_digest_iter: u32,
    pub slots: Vec<KeySlot>,
}

#[derive(Debug, Clone)]
pub struct KeySlot {
    pub index: usize,
    pub iterations: u32,
    salt: [u8; 32],
    /// Offset of the key material from the start of the LUKS header, in bytes.
    pub material_offset: u64,
    pub stripes: u32,
}

fn text(field: &[u8]) -> String {
    String::from_utf8_lossy(field.split(|&b| b == 0).next().unwrap_or(&[])).into_owned()
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl LuksHeader {
    /// Parse the header at the start of `buf`; `area_len` is the size of the area holding the
    /// header and key material (key material must lie inside it).
    pub fn parse(buf: &[u8], area_len: u64) -> Result<LuksHeader, CryptoError> {
        let bad = |why: &'static str| CryptoError::BadLuksHeader(why);
        if buf.len() < HEADER_LEN {
            return Err(bad("truncated"));
        }
        if buf[..6] != MAGIC {
            return Err(bad("bad magic"));
        }
        if u16::from_be_bytes([buf[6], buf[7]]) != 1 {
            return Err(bad("only LUKS version 1 is supported"));
        }
        let cipher = text(&buf[8..40]);
        let mode_spec = text(&buf[40..72]);
        let hash = text(&buf[72..104]);
        let (mode, ivgen) = mode_spec
            .split_once('-')
            .unwrap_or((mode_spec.as_str(), "plain"));
        let key_bytes = be32(buf, 108) as usize;
        if cipher != "aes" {
            return Err(CryptoError::UnsupportedCipher(format!(
                "{cipher}-{mode_spec}"
            )));
        }
        let valid_key = match mode {
            "xts" => matches!(key_bytes, 32 | 48 | 64),
            "cbc" => matches!(key_bytes, 16 | 24 | 32),
            _ => false,
        };
        if !valid_key {
            return Err(CryptoError::UnsupportedCipher(format!(
                "{cipher}-{mode_spec} with a {key_bytes}-byte key"
            )));
        }
        if !matches!(ivgen, "plain" | "plain64" | "essiv:sha256") {
            return Err(CryptoError::UnsupportedCipher(format!(
                "IV generator {ivgen}"
            )));
        }
        if !matches!(
            hash.as_str(),
            "sha1" | "sha224" | "sha256" | "sha384" | "sha512"
        ) {
            return Err(CryptoError::UnsupportedCipher(format!("hash {hash}")));
        }
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&buf[112..132]);
        let mut mk_digest_salt = [0u8; 32];
        mk_digest_salt.copy_from_slice(&buf[132..164]);
        let mk_digest_iter = be32(buf, 164);
        if mk_digest_iter == 0 || mk_digest_iter > MAX_ITERATIONS {
            return Err(bad("master key digest iteration count out of range"));
        }
        let mut slots = Vec::new();
        for index in 0..SLOTS {
            let s = &buf[208 + index * 48..208 + (index + 1) * 48];
            match be32(s, 0) {
                SLOT_ACTIVE => {}
                SLOT_INACTIVE => continue,
                _ => return Err(bad("key slot with an unknown state")),
            }
            let iterations = be32(s, 4);
            let material_offset = u64::from(be32(s, 40)) * SECTOR_SIZE as u64;
            let stripes = be32(s, 44);
            if iterations == 0 || iterations > MAX_ITERATIONS {
                return Err(bad("key slot iteration count out of range"));
            }
            if stripes == 0 || stripes > MAX_STRIPES {
                return Err(bad("key slot stripe count out of range"));
            }
            let material = (key_bytes as u64 * u64::from(stripes)).div_ceil(SECTOR_SIZE as u64)
                * SECTOR_SIZE as u64;
            let inside = material_offset
                .checked_add(material)
                .is_some_and(|end| end <= area_len);
            if material > MAX_KEY_MATERIAL || !inside || material_offset < HEADER_LEN as u64 {
                return Err(bad("key material lies outside the LUKS area"));
            }
            let mut salt = [0u8; 32];
            salt.copy_from_slice(&s[8..40]);
            slots.push(KeySlot {
                index,
                iterations,
                salt,
                material_offset,
                stripes,
            });
        }
        if slots.is_empty() {
            return Err(bad("no active key slot"));
        }
        Ok(LuksHeader {
            cipher,
            mode: mode.to_string(),
            ivgen: ivgen.to_string(),
            hash,
            key_bytes,
            payload_offset_sectors: be32(buf, 104),
            mk_digest,
            mk_digest_salt,
            mk_digest_iter,
            slots,
        })
    }

    /// Bytes of key material of `slot` to read from the LUKS area: whole sectors, since it is
    /// encrypted sector by sector (only the first key_bytes * stripes are used).
    pub fn material_len(&self, slot: &KeySlot) -> usize {
        (self.key_bytes * slot.stripes as usize).div_ceil(SECTOR_SIZE) * SECTOR_SIZE
    }

    /// The key-derivation work of trying `slot`: its PBKDF2 plus the master-key digest checked
    /// after it, in SHA-256-equivalent iterations.
    pub fn slot_work(&self, slot: &KeySlot) -> u64 {
        let per_iteration = match self.hash.as_str() {
            "sha384" | "sha512" => 3, // about a third of SHA-256's rate (qemu-img: 1.9M vs 5.5M in 2 s)
            _ => 1,
        };
        (u64::from(slot.iterations) + u64::from(self.mk_digest_iter)) * per_iteration
    }

    /// Try each active slot once; `material` reads a slot's key material. Returns the data cipher.
    /// The work is bounded before any is done: a slot asking for more than [`MAX_SLOT_WORK`] is
    /// refused, and slots are tried only while the total stays within [`MAX_UNLOCK_WORK`] (a hostile
    /// header, 8 slots of 20 M iterations, would otherwise stall for minutes).
    pub fn unlock(
        &self,
        passphrase: &[u8],
        material: &dyn Fn(&KeySlot) -> Result<Vec<u8>, CryptoError>,
    ) -> Result<LuksCipher, CryptoError> {
        let too_much = |work: u64, limit: u64| CryptoError::TooMuchWork {
            work: work.div_ceil(1_000_000),
            slots: self.slots.len(),
            limit: limit / 1_000_000,
        };
        if let Some(slot) = self
            .slots
            .iter()
            .find(|s| self.slot_work(s) > MAX_SLOT_WORK)
        {
            return Err(too_much(self.slot_work(slot), MAX_SLOT_WORK));
        }
        let mut done = 0;
        for slot in &self.slots {
            done += self.slot_work(slot);
            if done > MAX_UNLOCK_WORK {
                let total = self.slots.iter().map(|s| self.slot_work(s)).sum();
                return Err(too_much(total, MAX_UNLOCK_WORK));
            }
            let mut slot_key = Zeroizing::new(vec![0u8; self.key_bytes]);
            pbkdf2(
                &self.hash,
                passphrase,
                &slot.salt,
                slot.iterations,
                &mut slot_key,
            );
            let mut split = Zeroizing::new(material(slot)?);
            let slot_cipher = LuksCipher::new(&self.mode, &self.ivgen, &slot_key)?;
            slot_cipher.decrypt(0, &mut split)?;
            let master = Zeroizing::new(af_merge(
                &self.hash,
                &split,
                self.key_bytes,
                slot.stripes as usize,
            ));
            let mut digest = [0u8; DIGEST_LEN];
            pbkdf2(
                &self.hash,
                &master,
                &self.mk_digest_salt,
                self.mk_digest_iter,
                &mut digest,
            );
            if digest == self.mk_digest {
                log::debug!("LUKS key slot {} opened", slot.index);
                return LuksCipher::new(&self.mode, &self.ivgen, &master);
            }
        }
        Err(CryptoError::WrongPassphrase)
    }
}

fn pbkdf2(hash: &str, password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
    match hash {
        "sha1" => pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, rounds, out),
        "sha224" => pbkdf2::pbkdf2_hmac::<Sha224>(password, salt, rounds, out),
        "sha384" => pbkdf2::pbkdf2_hmac::<Sha384>(password, salt, rounds, out),
        "sha512" => pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, rounds, out),
        _ => pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, rounds, out),
    }
}

fn digest_with(hash: &str, index: u32, data: &[u8]) -> Vec<u8> {
    fn run<D: Digest>(index: u32, data: &[u8]) -> Vec<u8> {
        let mut h = D::new();
        h.update(index.to_be_bytes());
        h.update(data);
        h.finalize().to_vec()
    }
    match hash {
        "sha1" => run::<Sha1>(index, data),
        "sha224" => run::<Sha224>(index, data),
        "sha384" => run::<Sha384>(index, data),
        "sha512" => run::<Sha512>(index, data),
        _ => run::<Sha256>(index, data),
    }
}

/// The anti-forensic diffuser: hash each digest-sized piece with its big-endian index.
fn diffuse(hash: &str, block: &mut [u8]) {
    let size = digest_with(hash, 0, &[]).len();
    for (i, piece) in block.chunks_mut(size).enumerate() {
        let h = digest_with(hash, i as u32, piece);
        piece.copy_from_slice(&h[..piece.len()]);
    }
}

/// AF merge: d = 0; for each stripe but the last, d = diffuse(d ^ stripe); key = d ^ last stripe.
fn af_merge(hash: &str, split: &[u8], key_len: usize, stripes: usize) -> Vec<u8> {
    let mut d = vec![0u8; key_len];
    for stripe in split.chunks_exact(key_len).take(stripes - 1) {
        d.iter_mut().zip(stripe).for_each(|(a, b)| *a ^= b);
        diffuse(hash, &mut d);
    }
    let last = &split[(stripes - 1) * key_len..stripes * key_len];
    d.iter_mut().zip(last).for_each(|(a, b)| *a ^= b);
    d
}

/// How each sector's IV is made.
enum IvGen {
    /// Sector number, little-endian, cut to 32 bits.
    Plain,
    /// Sector number, little-endian, 64 bits.
    Plain64,
    /// plain64 encrypted with AES-256 keyed by SHA-256 of the master key.
    Essiv(Box<Aes256>),
}

impl IvGen {
    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(c) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                c.encrypt_block(GenericArray::from_mut_slice(&mut iv));
            }
        }
        iv
    }
}

/// One sector with a given IV, in one mode of one AES key size.
trait SectorMode: Send + Sync {
    fn decrypt(&self, iv: [u8; 16], sector: &mut [u8]);
    fn encrypt(&self, iv: [u8; 16], sector: &mut [u8]);
}

struct Cbc<C>(C);

fn blocks(buf: &mut [u8]) -> impl Iterator<Item = &mut GenericArray<u8, aes::cipher::consts::U16>> {
    buf.chunks_exact_mut(16).map(GenericArray::from_mut_slice)
}

impl<C> SectorMode for Cbc<C>
where
    C: BlockCipher<BlockSize = aes::cipher::consts::U16>
        + BlockEncrypt
        + BlockDecrypt
        + Clone
        + Send
        + Sync,
{
    fn decrypt(&self, iv: [u8; 16], sector: &mut [u8]) {
        let mut d =
            cbc::Decryptor::<C>::inner_iv_init(self.0.clone(), GenericArray::from_slice(&iv));
        blocks(sector).for_each(|b| d.decrypt_block_mut(b));
    }

    fn encrypt(&self, iv: [u8; 16], sector: &mut [u8]) {
        let mut e =
            cbc::Encryptor::<C>::inner_iv_init(self.0.clone(), GenericArray::from_slice(&iv));
        blocks(sector).for_each(|b| e.encrypt_block_mut(b));
    }
}

/// XTS (IEEE 1619) over 512-byte sectors: the tweak of block j is E_k2(iv) times alpha^j in GF(2^128).
/// All 32 tweaks of a sector are computed first, so the 32 block encryptions run as one pipelined batch.
struct Xts<C> {
    data: C,
    tweak: C,
}

impl<C> Xts<C>
where
    C: BlockCipher<BlockSize = aes::cipher::consts::U16> + BlockEncrypt + BlockDecrypt,
{
    fn tweaks(&self, iv: [u8; 16]) -> [u128; BLOCKS_PER_SECTOR] {
        let mut t = GenericArray::from(iv);
        self.tweak.encrypt_block(&mut t);
        let mut x = u128::from_le_bytes(t.into());
        let mut all = [0u128; BLOCKS_PER_SECTOR];
        for slot in all.iter_mut() {
            *slot = x;
            let carry = x >> 127;
            x = (x << 1) ^ (carry * 0x87);
        }
        all
    }

    fn whiten(sector: &mut [u8], tweaks: &[u128; BLOCKS_PER_SECTOR]) {
        for (block, t) in sector.chunks_exact_mut(16).zip(tweaks) {
            let mut b = [0u8; 16];
            b.copy_from_slice(block);
            block.copy_from_slice(&(u128::from_le_bytes(b) ^ t).to_le_bytes());
        }
    }
}

const BLOCKS_PER_SECTOR: usize = SECTOR_SIZE / 16;

impl<C> SectorMode for Xts<C>
where
    C: BlockCipher<BlockSize = aes::cipher::consts::U16>
        + BlockEncrypt
        + BlockDecrypt
        + Send
        + Sync,
{
    fn decrypt(&self, iv: [u8; 16], sector: &mut [u8]) {
        let tweaks = self.tweaks(iv);
        Self::whiten(sector, &tweaks);
        self.data.decrypt_blocks(super::as_blocks(sector));
        Self::whiten(sector, &tweaks);
    }

    fn encrypt(&self, iv: [u8; 16], sector: &mut [u8]) {
        let tweaks = self.tweaks(iv);
        Self::whiten(sector, &tweaks);
        self.data.encrypt_blocks(super::as_blocks(sector));
        Self::whiten(sector, &tweaks);
    }
}

fn aes_mode<C>(mode: &str, key: &[u8]) -> Box<dyn SectorMode>
where
    C: BlockCipher<BlockSize = aes::cipher::consts::U16>
        + BlockEncrypt
        + BlockDecrypt
        + KeyInit
        + Clone
        + Send
        + Sync
        + 'static,
{
    if mode == "xts" {
        let (k1, k2) = key.split_at(key.len() / 2);
        Box::new(Xts {
            data: C::new(GenericArray::from_slice(k1)),
            tweak: C::new(GenericArray::from_slice(k2)),
        })
    } else {
        Box::new(Cbc(C::new(GenericArray::from_slice(key))))
    }
}

/// The LUKS data cipher (or a key slot's cipher while unlocking).
pub struct LuksCipher {
    mode: Box<dyn SectorMode>,
    ivgen: IvGen,
}

impl std::fmt::Debug for LuksCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LuksCipher { key: <hidden> }")
    }
}

impl LuksCipher {
    pub fn new(mode: &str, ivgen: &str, key: &[u8]) -> Result<Self, CryptoError> {
        let aes_key_len = if mode == "xts" {
            key.len() / 2
        } else {
            key.len()
        };
        let mode_impl = match aes_key_len {
            16 => aes_mode::<Aes128>(mode, key),
            24 => aes_mode::<Aes192>(mode, key),
            32 => aes_mode::<Aes256>(mode, key),
            n => {
                return Err(CryptoError::UnsupportedCipher(format!(
                    "AES with a {n}-byte key"
                )))
            }
        };
        let ivgen = match ivgen {
            "plain" => IvGen::Plain,
            "plain64" => IvGen::Plain64,
            "essiv:sha256" => {
                let salt = Zeroizing::new(Sha256::digest(key).to_vec());
                IvGen::Essiv(Box::new(Aes256::new(GenericArray::from_slice(&salt))))
            }
            other => {
                return Err(CryptoError::UnsupportedCipher(format!(
                    "IV generator {other}"
                )))
            }
        };
        Ok(LuksCipher {
            mode: mode_impl,
            ivgen,
        })
    }
}

impl SectorCipher for LuksCipher {
    fn decrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        if buf.len() % SECTOR_SIZE != 0 {
            return Err(CryptoError::Unaligned(buf.len()));
        }
        for (i, sector) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            self.mode
                .decrypt(self.ivgen.iv(first_sector + i as u64), sector);
        }
        Ok(())
    }

    fn encrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        if buf.len() % SECTOR_SIZE != 0 {
            return Err(CryptoError::Unaligned(buf.len()));
        }
        for (i, sector) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            self.mode
                .encrypt(self.ivgen.iv(first_sector + i as u64), sector);
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "luks/tests.rs"]
mod tests;
