//! The one rule for block sizes, and the limits of a volume.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Smallest block size: one page, the smallest RBD object size.
pub const MIN_BLOCK_SIZE: u64 = 4 << 10;
/// Largest block size a repository may use (bounds memory when decoding).
pub const MAX_BLOCK_SIZE: u64 = 64 << 20;

/// Largest volume ferry backs up: 1 PiB.
pub const MAX_IMAGE_SIZE: u64 = 1 << 50;
/// Most blocks in one volume's map (64 Mi: 256 TiB in 4 MiB blocks, 2.2 GB of map in memory
/// at most). A diff stream claiming more is refused before anything is allocated for it.
pub const MAX_BLOCKS: u64 = 1 << 26;

/// The unit of a volume's block map: a power of two from 4 KiB to 64 MiB.
///
/// Every block size ferry accepts — `init --block-size`, `backup --block-size`, the `config`
/// object, a manifest read from the bucket — goes through [`BlockSize::new`], so there is one
/// rule, stated once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct BlockSize(u64);

impl BlockSize {
    /// The default of new repositories: 4 MiB, RBD's default object size.
    pub const DEFAULT: BlockSize = BlockSize(4 << 20);

    /// Checks the rule: a power of two from [`MIN_BLOCK_SIZE`] to [`MAX_BLOCK_SIZE`].
    pub fn new(bytes: u64) -> Result<BlockSize> {
        if bytes.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bytes) {
            Ok(BlockSize(bytes))
        } else {
            Err(Error::InvalidBlockSize { bytes })
        }
    }

    /// The size in bytes.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The size in bytes, as a buffer length.
    pub fn as_usize(self) -> usize {
        self.0 as usize
    }

    /// Number of blocks of an image of `image_size` bytes.
    pub fn blocks_in(self, image_size: u64) -> u64 {
        image_size.div_ceil(self.0)
    }

    /// This size as an RBD object size, when RBD allows it (4 KiB to 32 MiB).
    pub fn as_rbd_object_size(self) -> Option<u64> {
        (self.0 <= 32 << 20).then_some(self.0)
    }
}

impl TryFrom<u64> for BlockSize {
    type Error = Error;
    fn try_from(v: u64) -> Result<BlockSize> {
        BlockSize::new(v)
    }
}

impl From<BlockSize> for u64 {
    fn from(b: BlockSize) -> u64 {
        b.0
    }
}

impl std::fmt::Display for BlockSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 >= 1 << 20 {
            write!(f, "{} MiB", self.0 >> 20)
        } else {
            write!(f, "{} KiB", self.0 >> 10)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        for ok in [4096, 8192, 1 << 20, 4 << 20, 64 << 20] {
            assert_eq!(BlockSize::new(ok).unwrap().get(), ok);
        }
        for bad in [0, 1, 2048, 4095, 4097, 3 << 20, 128 << 20, u64::MAX] {
            assert!(matches!(BlockSize::new(bad), Err(Error::InvalidBlockSize { .. })), "{bad}");
        }
        assert_eq!(BlockSize::new(64 << 20).unwrap().as_rbd_object_size(), None);
        assert_eq!(BlockSize::DEFAULT.as_rbd_object_size(), Some(4 << 20));
        assert_eq!(BlockSize::DEFAULT.blocks_in((8 << 20) + 1), 3);
        assert!(serde_json::from_str::<BlockSize>("12345").is_err());
        assert_eq!(serde_json::from_str::<BlockSize>("65536").unwrap().get(), 65536);
    }
}
