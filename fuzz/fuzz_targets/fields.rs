//! cargo-fuzz target, structure-aware: a seed image (made by scripts/fuzz-seeds.sh) and a list of
//! edits of named fields (header, extensions, L1/L2 and refcount entries, snapshot table, LUKS header
//! and key slots), applied by `qcowfs::fuzz::fields` before the image is opened, read and written.
//!
//! Input layout: a little-endian u16 N, then N bytes the `arbitrary` crate decodes into edits, then
//! the image. scripts/fuzz.sh writes the seeds with N = 0.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use qcowfs::fuzz::fields::{Edit, Field, INTERESTING};

/// How an edit's value is chosen: a limit worth trying, a small number, a neighbour of the
/// current value's limits, or any 64-bit value.
#[derive(Arbitrary, Debug)]
enum Value {
    Interesting(u8),
    Small(u16),
    Bit(u8),
    Any(u64),
}

#[derive(Arbitrary, Debug)]
struct RawEdit {
    field: u8,
    index: u32,
    value: Value,
}

impl RawEdit {
    fn edit(&self) -> Edit {
        let value = match self.value {
            Value::Interesting(i) => INTERESTING[usize::from(i) % INTERESTING.len()],
            Value::Small(v) => u64::from(v),
            Value::Bit(b) => 1u64 << (b % 64),
            Value::Any(v) => v,
        };
        Edit {
            field: Field::ALL[usize::from(self.field) % Field::ALL.len()],
            index: self.index,
            value,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2);
    let (program, image) = data[2..].split_at(n);
    let mut u = Unstructured::new(program);
    let edits: Vec<Edit> = match u.arbitrary_iter::<RawEdit>() {
        Ok(it) => it.map_while(Result::ok).take(16).map(|raw| raw.edit()).collect(),
        Err(_) => Vec::new(),
    };
    // QCOWFS_FIELDS_DUMP=DIR: write the edited image there instead (to keep an input as a plain
    // image regression case in tests/fuzz_corpus/).
    if let Some(dir) = std::env::var_os("QCOWFS_FIELDS_DUMP") {
        let edited = qcowfs::fuzz::fields::edited(image, &edits);
        let name = format!("{:016x}.bin", fnv1a(&edited));
        let _ = std::fs::write(std::path::Path::new(&dir).join(name), edited);
        return;
    }
    let _ = qcowfs::fuzz::edited_image(&std::env::temp_dir(), image, &edits);
});

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}
