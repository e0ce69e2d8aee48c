#![no_main]
//! Feeds arbitrary bytes to the key-slot decoder (`KeySlot::decode`) and, for a slot that
//! parses, tries to open it with cheap refusals only (KDF parameters are checked before any
//! derivation, so a planted slot cannot make the fuzzer — or ferry — spend a GiB).

use ferry_repo::KeySlot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(slot) = KeySlot::decode(data, "fuzz") {
        if slot.kdf.m_cost_kib <= 64 && slot.kdf.t_cost <= 2 {
            let _ = slot.open(b"passphrase", "repository");
        }
    }
});
