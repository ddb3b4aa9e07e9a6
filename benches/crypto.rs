//! Throughput of the sector ciphers on 1 MiB buffers: legacy AES-128-CBC (encryption runs eight
//! sectors side by side; decryption is parallel within a sector) and LUKS AES-256-XTS.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qcowfs::crypto::{LuksCipher, QcowAes, SectorCipher};

const LEN: usize = 1 << 20;

fn bench(c: &mut Criterion, name: &str, cipher: &dyn SectorCipher) {
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(LEN as u64));
    let mut buf = vec![0x5au8; LEN];
    group.bench_function("encrypt", |b| b.iter(|| cipher.encrypt(1000, &mut buf)));
    group.bench_function("decrypt", |b| b.iter(|| cipher.decrypt(1000, &mut buf)));
    group.finish();
}

fn ciphers(c: &mut Criterion) {
    bench(c, "qcow-aes-128-cbc", &QcowAes::new(b"passphrase"));
    let key: Vec<u8> = (0..64u8).collect();
    let xts = LuksCipher::new("xts", "plain64", &key).expect("valid key");
    bench(c, "luks-aes-256-xts", &xts);
}

criterion_group!(benches, ciphers);
criterion_main!(benches);
