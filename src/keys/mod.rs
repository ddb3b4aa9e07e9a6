//! Keys in one home: where passphrases come from (`sources`) and whether the ones given are right
//! (`check`: LUKS by its digest, legacy AES by what sampled clusters decrypt to), with the policy
//! a writing command applies. `cli`, the mount daemon and the commands call these; the chain only
//! applies the keys it is handed.

pub mod check;
pub mod domain;
pub mod sources;

pub use check::{KeyCheck, KeyPolicy, LayerKey, Verdict};
pub use sources::KeySources;
