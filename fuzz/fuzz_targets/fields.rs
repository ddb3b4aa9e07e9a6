//! cargo-fuzz target, structure-aware: a seed image (made by scripts/fuzz-seeds.sh) and a list of
//! edits of named fields (header, extensions, L1/L2 and refcount entries, snapshot table, LUKS header
//! and key slots), applied by `qcowfs::fuzz::fields` before the image is opened, read and written.
//!
//! Input layout: the whole input is the structured part. Its first byte picks a seed image (index
//! modulo the number of seeds) from the `*.qcow2` files of fuzz/seeds/, sorted by name and loaded
//! once (made by scripts/fuzz-seeds.sh if missing); the rest is decoded by the `arbitrary` crate
//! into up to 16 edits. An input of one byte opens a seed unchanged.
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

/// The seed images, `*.qcow2` in fuzz/seeds/ sorted by file name, read once.
fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join("seeds");
        let list = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
            let mut names: Vec<_> = std::fs::read_dir(dir)
                .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            names.retain(|p| p.extension().is_some_and(|e| e == "qcow2"));
            names.sort();
            names
        };
        if list(&dir).is_empty() {
            let status = std::process::Command::new(root.join("../scripts/fuzz-seeds.sh"))
                .arg(&dir)
                .current_dir(root.join(".."))
                .stdout(std::process::Stdio::null())
                .status();
            assert!(
                matches!(status, Ok(s) if s.success()),
                "scripts/fuzz-seeds.sh fuzz/seeds failed"
            );
        }
        // The overlay seed's raw backing file, next to where the target writes its images.
        let _ = std::fs::copy(
            dir.join("fuzz-base.raw"),
            std::env::temp_dir().join("fuzz-base.raw"),
        );
        let seeds: Vec<Vec<u8>> = list(&dir)
            .iter()
            .map(|p| std::fs::read(p).expect("read seed"))
            .collect();
        assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
        seeds
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, program)) = data.split_first() else {
        return;
    };
    let seeds = seeds();
    let image = &seeds[usize::from(pick) % seeds.len()][..];
    let mut u = Unstructured::new(program);
    let edits: Vec<Edit> = match u.arbitrary_iter::<RawEdit>() {
        Ok(it) => it
            .map_while(Result::ok)
            .take(16)
            .map(|raw| raw.edit())
            .collect(),
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
