//! Streaming codec for Ceph RBD export-diff streams.
//!
//! * [`DiffReader`] reads an `rbd diff v1` stream (what `rbd export-diff` writes) or an
//!   `rbd diff v2` stream, yielding the metadata as a [`DiffHeader`] and the data section as
//!   [`Event`]s. `w` payloads come in pieces of bounded size borrowed from a reused buffer, so
//!   memory stays bounded whatever the record lengths. Or as [`Record`]s
//!   ([`DiffReader::next_record`]), whose payload the caller reads straight into its own
//!   buffers with [`DiffReader::read_data`] — one copy less.
//! * [`DiffWriter`] writes v1 (what `rbd import-diff` reads) or v2 streams, validating what it
//!   writes the same way the reader checks.
//! * [`ImageExportReader`] / [`ImageExportWriter`] handle the container of
//!   `rbd export --export-format 2` (`rbd image v2` header plus one v2 diff per snapshot and
//!   one for HEAD).
//!
//! No Ceph, no async: everything works on [`std::io::Read`] / [`std::io::Write`].
//!
//! The reader is strict: unknown banners, unknown v1 tags, v2 `len` fields that disagree with
//! a known record (except the Pacific `p` record, which has `len = 8` and one byte of
//! payload), extents beyond the image size or overflowing, extents that go backwards or
//! overlap, duplicate or late metadata, truncation, a missing `e` and trailing bytes are all
//! errors that carry the stream offset of the offending record. See [`Error`].
//!
//! ```
//! use rbd_diff::{DiffHeader, DiffReader, DiffWriter, Event, Record};
//!
//! let header = DiffHeader { to_snap: Some("snap1".into()), image_size: 1 << 20, ..Default::default() };
//! let mut w = DiffWriter::new(Vec::new(), &header).unwrap();
//! w.write_data(4096, b"hello").unwrap();
//! w.write_zero(8192, 4096).unwrap();
//! let stream = w.finish().unwrap();
//!
//! let mut r = DiffReader::new(&stream[..]).unwrap();
//! assert_eq!(r.header(), &header);
//! assert_eq!(r.next_event().unwrap(), Event::Data { offset: 4096, data: b"hello" });
//! assert_eq!(r.next_event().unwrap(), Event::Zero { offset: 8192, length: 4096 });
//! assert_eq!(r.next_event().unwrap(), Event::End);
//!
//! // The same stream as records, the payload read into a buffer of the caller's.
//! let mut r = DiffReader::new(&stream[..]).unwrap();
//! assert_eq!(r.next_record().unwrap(), Record::Data { offset: 4096, len: 5 });
//! let mut buf = [0u8; 5];
//! assert_eq!(r.read_data(&mut buf).unwrap(), 5);
//! assert_eq!(&buf, b"hello");
//! assert_eq!(r.next_record().unwrap(), Record::Zero { offset: 8192, length: 4096 });
//! assert_eq!(r.next_record().unwrap(), Record::End);
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod container;
mod error;
mod input;
mod reader;
mod writer;

#[cfg(test)]
mod tests;

pub use container::{ImageExportReader, ImageExportWriter, ImageHeader};
pub use error::Error;
pub use input::CountingReader;
pub use reader::{DiffReader, Event, Record};
pub use writer::DiffWriter;

/// Banner of a v1 diff stream (`rbd export-diff`).
pub const BANNER_V1: &[u8] = b"rbd diff v1\n";
/// Banner of a v2 diff stream (only inside `rbd export --export-format 2`).
pub const BANNER_V2: &[u8] = b"rbd diff v2\n";
/// Banner of an `rbd export --export-format 2` stream.
pub const BANNER_IMAGE_V2: &[u8] = b"rbd image v2\n";
/// Banner of the diff section of an `rbd export --export-format 2` stream.
pub const BANNER_IMAGE_DIFFS_V2: &[u8] = b"rbd image diffs v2\n";
/// Longest snapshot name accepted (Ceph's `read_string` limit).
pub const MAX_SNAP_NAME: usize = 4096;
/// Default maximum size of a [`Event::Data`] piece (1 MiB).
pub const DEFAULT_MAX_PIECE: usize = 1 << 20;
/// Maximum total size of the image-meta keys and values of an image export header (16 MiB).
pub const MAX_IMAGE_METADATA: usize = 16 << 20;

pub(crate) const TAG_FROM: u8 = b'f';
pub(crate) const TAG_TO: u8 = b't';
pub(crate) const TAG_SIZE: u8 = b's';
pub(crate) const TAG_PROTECTED: u8 = b'p';
pub(crate) const TAG_WRITE: u8 = b'w';
pub(crate) const TAG_ZERO: u8 = b'z';
pub(crate) const TAG_END: u8 = b'e';
pub(crate) const TAG_ORDER: u8 = b'O';
pub(crate) const TAG_FEATURES: u8 = b'T';
pub(crate) const TAG_STRIPE_UNIT: u8 = b'U';
pub(crate) const TAG_STRIPE_COUNT: u8 = b'C';
pub(crate) const TAG_META: u8 = b'M';
pub(crate) const TAG_IMAGE_END: u8 = b'E';

/// Diff stream format, decided by the banner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `rbd diff v1`: records without length fields.
    V1,
    /// `rbd diff v2`: every record but `e` carries a `le64` length.
    V2,
}

/// The metadata records of a diff stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiffHeader {
    /// `f`: the snapshot the diff starts from (None: since image creation).
    pub from_snap: Option<String>,
    /// `t`: the snapshot the diff ends at (None: the image HEAD).
    pub to_snap: Option<String>,
    /// `s`: image size at the end point, in bytes.
    pub image_size: u64,
    /// `p`: protection status of the to-snapshot (only from a v2 `p` record; None when the
    /// stream has none, which is always the case for v1).
    pub protected: Option<bool>,
}

/// Validates an extent; returns its end. `record_start` is the error offset.
pub(crate) fn check_extent(record_start: u64, image_offset: u64, length: u64, image_size: u64, previous_end: u64) -> Result<u64, Error> {
    let end = image_offset.checked_add(length).ok_or(Error::ExtentOverflow {
        offset: record_start,
        image_offset,
        length,
    })?;
    if end > image_size {
        return Err(Error::ExtentBeyondImage {
            offset: record_start,
            image_offset,
            length,
            image_size,
        });
    }
    if image_offset < previous_end {
        return Err(Error::OutOfOrder {
            offset: record_start,
            image_offset,
            previous_end,
        });
    }
    Ok(end)
}

/// ASCII-escapes bytes for error messages.
pub(crate) fn escape(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}
