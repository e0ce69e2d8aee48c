#![no_main]
//! Feeds arbitrary bytes to the delta payload decoder (`Delta::decode`, FORMAT.md §14) and
//! applies what decodes to a base: extents out of order, past the block, or longer than the
//! data must be refused, and applying an accepted delta must stay within its target length.

use ferry_repo::Delta;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = Delta::decode(data) {
        let out = d.apply(vec![0x5a; 4096]);
        assert_eq!(out.len(), d.target_len as usize);
    }
});
