#![no_main]
//! Feeds arbitrary bytes to the `config` decoder (`RepoConfig::decode`).

use ferry_repo::RepoConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = RepoConfig::decode(data);
});
