#![no_main]
//! Feeds arbitrary bytes to the manifest plaintext decoder (`Manifest::decode`): it must
//! return an error or a manifest whose map matches its meta, never panic or over-allocate.

use ferry_repo::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data, "fuzz") {
        assert_eq!(m.blocks.len() as u64, m.meta.block_size.blocks_in(m.meta.image_size));
        // What decodes re-encodes to something that decodes to the same manifest.
        let again = m.encode().expect("a decoded manifest encodes");
        assert_eq!(Manifest::decode(&again, "fuzz").expect("round trip"), m);
    }
});
