#![no_main]
//! Feeds arbitrary bytes to the NBD server as a client's side of one connection (`ferry serve
//! --nbd`): negotiation and requests, answered from a 64 KiB in-memory export.

use std::sync::Arc;

use ferry_nbd::testing::{session, MemoryExport};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_time().build() else {
        return;
    };
    let mut image: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8 + 1).collect();
    image[8192..16384].fill(0);
    image[36864..].fill(0);
    let export = Arc::new(MemoryExport { data: image, block: 4096 });
    rt.block_on(session(export, "token", data));
});
