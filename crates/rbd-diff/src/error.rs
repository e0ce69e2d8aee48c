//! The single error type of this crate.

use std::fmt;

/// Everything that can go wrong while reading or writing a stream.
///
/// Every variant that describes malformed input carries `offset`: the byte position in the
/// stream (counted from the first banner byte) where the offending record, field or banner
/// starts. For [`Error::Truncated`] that is the start of the record that was cut short
/// (`eof_at` tells where the stream ended); for [`Error::MissingEnd`] and
/// [`Error::TrailingBytes`] it is the position where the `e` record (resp. the trailing
/// bytes) would start. Writer-side errors use the number of bytes written so far.
///
/// All offsets, lengths and sizes in the variants are in bytes. `offset` and `eof_at` are
/// positions in the byte stream; `image_offset`, `length`, `previous_end` and `image_size`
/// refer to the RBD image the stream describes.
///
/// For a caller: once [`crate::DiffReader::next_event`] or
/// [`crate::ImageExportReader::next_diff`] has returned an error, that reader only returns
/// [`Error::Poisoned`] from then on; a malformed stream cannot be resumed. On the writer side,
/// validation errors write nothing and leave a [`crate::DiffWriter`] usable, while I/O errors
/// poison it (see the writer docs for the details).
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum Error {
    /// The underlying reader or writer failed. Says nothing about the stream's validity:
    /// the source (pipe, file, child process) is what broke.
    #[error("I/O error at offset {offset}: {source}")]
    Io {
        /// Stream position when the I/O call failed (reader: bytes handed out so far;
        /// writer: bytes written so far).
        offset: u64,
        /// The error of the inner reader or writer.
        #[source]
        source: std::io::Error,
    },

    /// The stream does not start with a banner this reader accepts.
    #[error("unknown or unexpected banner at offset {offset}: \"{found}\"")]
    UnknownBanner {
        /// Stream offset where the banner should start.
        offset: u64,
        /// The bytes found, ASCII-escaped.
        found: String,
    },

    /// A v1 record tag that is not known (v1 records carry no length, so they cannot be skipped).
    #[error("unknown record tag {} at offset {offset} (v1 records cannot be skipped)", Tag(*.tag))]
    UnknownTag {
        /// Stream offset of the tag byte.
        offset: u64,
        /// The tag byte found.
        tag: u8,
    },

    /// A known v2 record whose `len` field disagrees with its contents.
    #[error(
        "record {} at offset {offset} has len {found}, expected {expected}",
        Tag(*.tag)
    )]
    LengthMismatch {
        /// Stream offset of the record's tag byte.
        offset: u64,
        /// The record's tag byte.
        tag: u8,
        /// What the record's fields imply (saturated at `u64::MAX`).
        expected: u64,
        /// The `len` field as found in the stream.
        found: u64,
    },

    /// `image_offset + length` does not fit in a u64 (for a v2 writer also: a `w` length
    /// whose `len` field, 16 + length, does not fit).
    #[error("extent at offset {offset} overflows: image offset {image_offset} + length {length} > 2^64-1")]
    ExtentOverflow {
        /// Stream offset of the record.
        offset: u64,
        /// Image offset of the extent, in bytes.
        image_offset: u64,
        /// Length of the extent, in bytes.
        length: u64,
    },

    /// The extent ends beyond the image size given by the `s` record.
    #[error("extent at offset {offset} ends beyond the image: image offset {image_offset} + length {length} > image size {image_size}")]
    ExtentBeyondImage {
        /// Stream offset of the record.
        offset: u64,
        /// Image offset of the extent, in bytes.
        image_offset: u64,
        /// Length of the extent, in bytes.
        length: u64,
        /// Image size from the `s` record, in bytes.
        image_size: u64,
    },

    /// A data record (`w` or `z`) starts below the end of the previous data record
    /// (decreasing or overlapping extents).
    #[error("data record at offset {offset} is out of order: image offset {image_offset} < end of previous extent {previous_end}")]
    OutOfOrder {
        /// Stream offset of the record.
        offset: u64,
        /// Image offset where the record's extent starts, in bytes.
        image_offset: u64,
        /// Image offset where the previous record's extent ended, in bytes.
        previous_end: u64,
    },

    /// End of stream inside a banner or record.
    #[error("stream truncated in {what} starting at offset {offset} (end of stream at {eof_at})")]
    Truncated {
        /// Stream offset where the cut-short banner or record starts.
        offset: u64,
        /// Which part was cut short (e.g. "banner", "'w' payload").
        what: &'static str,
        /// Stream offset where the stream ended (its total length).
        eof_at: u64,
    },

    /// Clean end of stream at a record boundary, but no `e` record was seen.
    #[error("stream ended at offset {offset} without an 'e' (end) record")]
    MissingEnd {
        /// Stream offset where the stream ended.
        offset: u64,
    },

    /// Bytes follow the `e` record of a standalone diff, or the last diff of an image export.
    #[error("unexpected trailing bytes at offset {offset} after the end of the stream")]
    TrailingBytes {
        /// Stream offset of the first byte after the end.
        offset: u64,
    },

    /// A snapshot name longer than [`crate::MAX_SNAP_NAME`] bytes.
    #[error("snapshot name in record at offset {offset} is {len} bytes long (max {max})")]
    NameTooLong {
        /// Stream offset of the `f`/`t` record.
        offset: u64,
        /// Length of the name, in bytes.
        len: u64,
        /// The limit, [`crate::MAX_SNAP_NAME`] bytes.
        max: usize,
    },

    /// A snapshot name or image-meta key/value that is not UTF-8.
    #[error("{what} in record at offset {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// Stream offset of the record holding the string.
        offset: u64,
        /// Which string: "snapshot name", "image-meta key" or "image-meta value".
        what: &'static str,
    },

    /// A data record or `e` was reached before any `s` (image size) record.
    #[error("record at offset {offset} needs the image size, but no 's' record came before it")]
    MissingImageSize {
        /// Stream offset of the data or `e` record.
        offset: u64,
    },

    /// A metadata record (`f`, `t`, `s`, `p`) after the first data record.
    #[error("metadata record {} at offset {offset} after the first data record", Tag(*.tag))]
    MetadataAfterData {
        /// Stream offset of the metadata record.
        offset: u64,
        /// Its tag byte.
        tag: u8,
    },

    /// A metadata record (`f`, `t`, `s`, `p`, or `O`, `T`, `U`, `C` of an image export) seen twice.
    #[error("duplicate record {} at offset {offset}", Tag(*.tag))]
    DuplicateRecord {
        /// Stream offset of the second occurrence.
        offset: u64,
        /// The record's tag byte.
        tag: u8,
    },

    /// Image-meta (`M`) records of an image export exceed [`crate::MAX_IMAGE_METADATA`] bytes.
    #[error("image metadata in record at offset {offset} needs {len} bytes (max {max} in total)")]
    MetadataTooLarge {
        /// Stream offset of the `M` record that crossed the limit.
        offset: u64,
        /// Total length of the image-meta keys and values up to and including the one that
        /// crossed the limit, in bytes.
        len: u64,
        /// The limit, [`crate::MAX_IMAGE_METADATA`] bytes.
        max: usize,
    },

    /// [`crate::ImageExportReader::next_diff`] was called before the previous diff had been read
    /// up to its `End` event.
    #[error("previous diff was not read to its end (at offset {offset})")]
    IncompleteDiff {
        /// Stream position when `next_diff` was called.
        offset: u64,
    },

    /// Writer misuse: `write_payload` got more bytes than the open `w` record has left.
    #[error("payload overrun at offset {offset}: {given} bytes given, {remaining} left in the record")]
    PayloadOverrun {
        /// Bytes written so far.
        offset: u64,
        /// Payload bytes the open `w` record still expects.
        remaining: u64,
        /// Bytes passed to `write_payload`.
        given: u64,
    },

    /// Writer misuse: a new record or `finish` while a streaming `w` record still expects bytes.
    #[error("incomplete 'w' payload at offset {offset}: {remaining} bytes still expected")]
    IncompletePayload {
        /// Bytes written so far.
        offset: u64,
        /// Payload bytes the open `w` record still expects.
        remaining: u64,
    },

    /// Writer misuse: an image export got a different number of diffs than declared.
    #[error("image export at offset {offset} declares {declared} diffs, but {written} were written")]
    DiffCountMismatch {
        /// Bytes written so far.
        offset: u64,
        /// The diff count given to [`crate::ImageExportWriter::new`].
        declared: u64,
        /// Diffs written (from `write_diff`: the count the extra diff would have made).
        written: u64,
    },

    /// The reader or writer was used again after an earlier error left the stream in an
    /// unknown state.
    #[error("stream already failed earlier (now at offset {offset})")]
    Poisoned {
        /// Current stream position (bytes read or written so far).
        offset: u64,
    },

    /// An argument outside its allowed range (e.g. a `max_piece` of 0).
    #[error("invalid argument: {what}")]
    InvalidArgument {
        /// Which argument and what is wrong with it.
        what: &'static str,
    },
}

impl Error {
    /// The stream offset attached to this error, if it has one.
    pub fn offset(&self) -> Option<u64> {
        use Error::*;
        match self {
            Io { offset, .. }
            | UnknownBanner { offset, .. }
            | UnknownTag { offset, .. }
            | LengthMismatch { offset, .. }
            | ExtentOverflow { offset, .. }
            | ExtentBeyondImage { offset, .. }
            | OutOfOrder { offset, .. }
            | Truncated { offset, .. }
            | MissingEnd { offset }
            | TrailingBytes { offset }
            | NameTooLong { offset, .. }
            | InvalidUtf8 { offset, .. }
            | MissingImageSize { offset }
            | MetadataAfterData { offset, .. }
            | DuplicateRecord { offset, .. }
            | MetadataTooLarge { offset, .. }
            | IncompleteDiff { offset }
            | PayloadOverrun { offset, .. }
            | IncompletePayload { offset, .. }
            | DiffCountMismatch { offset, .. }
            | Poisoned { offset } => Some(*offset),
            InvalidArgument { .. } => None,
        }
    }
}

/// Displays a tag byte as `'w'` (printable ASCII) or `0x07`.
struct Tag(u8);

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}' (0x{:02x})", self.0 as char, self.0)
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}
