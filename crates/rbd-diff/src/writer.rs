//! Streaming writer for `rbd diff v1` / `rbd diff v2` streams.

use std::io::Write;

use crate::{
    check_extent, DiffHeader, Error, Format, BANNER_V1, BANNER_V2, MAX_SNAP_NAME, TAG_END, TAG_FROM, TAG_PROTECTED, TAG_SIZE, TAG_TO,
    TAG_WRITE, TAG_ZERO,
};

/// Streaming writer of an RBD diff stream: v1 (what `rbd import-diff` reads) or v2 (as embedded
/// in `rbd export --export-format 2`).
///
/// The writer validates what it writes the way [`crate::DiffReader`] checks it (extents within
/// the image size, no overflow, ascending non-overlapping offsets, exact payload lengths) and
/// returns the same error variants, with `offset` = bytes written so far. A validation error
/// writes nothing and leaves the writer usable; an I/O error poisons it.
///
/// Each record header is written with one `write_all` call and each payload with another; for
/// many small records wrap an unbuffered writer in a `BufWriter`. [`DiffWriter::finish`]
/// flushes the writer.
pub struct DiffWriter<W: Write> {
    inner: W,
    format: Format,
    image_size: u64,
    pos: u64,
    prev_end: u64,
    /// Payload bytes still expected by a streaming `w` record.
    open: u64,
    failed: bool,
}

impl<W: Write> DiffWriter<W> {
    /// Starts a v1 stream: banner, `f` (if any), `t` (if any), `s`.
    /// `header.protected` is ignored (v1 has no `p` record).
    pub fn new(writer: W, header: &DiffHeader) -> Result<Self, Error> {
        Self::start(writer, header, Format::V1, false, 0)
    }

    /// Starts a v2 stream: banner, `f` (if any), `t` (if any), `p` (only if `to_snap` is set;
    /// value `header.protected.unwrap_or(false)`; `len` = 8 if `pacific_p_quirk`, else 1, then
    /// one byte), `s`.
    pub fn new_v2(writer: W, header: &DiffHeader, pacific_p_quirk: bool) -> Result<Self, Error> {
        Self::start(writer, header, Format::V2, pacific_p_quirk, 0)
    }

    pub(crate) fn start(writer: W, header: &DiffHeader, format: Format, pacific_p_quirk: bool, start: u64) -> Result<Self, Error> {
        let v2 = format == Format::V2;
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(if v2 { BANNER_V2 } else { BANNER_V1 });
        for (tag, name) in [(TAG_FROM, &header.from_snap), (TAG_TO, &header.to_snap)] {
            let Some(name) = name else { continue };
            if name.len() > MAX_SNAP_NAME {
                return Err(Error::NameTooLong {
                    offset: start + buf.len() as u64,
                    len: name.len() as u64,
                    max: MAX_SNAP_NAME,
                });
            }
            buf.push(tag);
            if v2 {
                buf.extend_from_slice(&(4 + name.len() as u64).to_le_bytes());
            }
            // name.len() <= MAX_SNAP_NAME, so it fits in a u32.
            buf.extend_from_slice(&(name.len() as u32).to_le_bytes());
            buf.extend_from_slice(name.as_bytes());
        }
        if v2 && header.to_snap.is_some() {
            buf.push(TAG_PROTECTED);
            let len: u64 = if pacific_p_quirk { 8 } else { 1 };
            buf.extend_from_slice(&len.to_le_bytes());
            buf.push(u8::from(header.protected.unwrap_or(false)));
        }
        buf.push(TAG_SIZE);
        if v2 {
            buf.extend_from_slice(&8u64.to_le_bytes());
        }
        buf.extend_from_slice(&header.image_size.to_le_bytes());

        let mut w = DiffWriter {
            inner: writer,
            format,
            image_size: header.image_size,
            pos: start,
            prev_end: 0,
            open: 0,
            failed: false,
        };
        w.write_raw(&buf)?;
        Ok(w)
    }

    /// The stream format being written.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Bytes written so far (for diffs inside an image export: counted from its start).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// A whole `w` record at once.
    pub fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.begin_data(offset, data.len() as u64)?;
        self.write_payload(data)
    }

    /// Streaming `w` record: the header now, then exactly `length` bytes through
    /// [`DiffWriter::write_payload`].
    pub fn begin_data(&mut self, offset: u64, length: u64) -> Result<(), Error> {
        self.ready()?;
        if self.format == Format::V2 && length > u64::MAX - 16 {
            // The record's len field (16 + length) cannot be represented.
            return Err(Error::ExtentOverflow {
                offset: self.pos,
                image_offset: offset,
                length,
            });
        }
        let end = check_extent(self.pos, offset, length, self.image_size, self.prev_end)?;
        self.write_extent_head(TAG_WRITE, offset, length)?;
        self.prev_end = end;
        self.open = length;
        Ok(())
    }

    /// Payload bytes of the `w` record opened by [`DiffWriter::begin_data`].
    pub fn write_payload(&mut self, bytes: &[u8]) -> Result<(), Error> {
        if self.failed {
            return Err(Error::Poisoned { offset: self.pos });
        }
        let given = bytes.len() as u64;
        if given > self.open {
            return Err(Error::PayloadOverrun {
                offset: self.pos,
                remaining: self.open,
                given,
            });
        }
        self.write_raw(bytes)?;
        self.open -= given;
        Ok(())
    }

    /// A `z` record.
    pub fn write_zero(&mut self, offset: u64, length: u64) -> Result<(), Error> {
        self.ready()?;
        let end = check_extent(self.pos, offset, length, self.image_size, self.prev_end)?;
        self.write_extent_head(TAG_ZERO, offset, length)?;
        self.prev_end = end;
        Ok(())
    }

    /// Writes `e` (after checking the last streaming record is complete), flushes, and returns
    /// the inner writer.
    pub fn finish(self) -> Result<W, Error> {
        self.finish_at().map(|(w, _)| w)
    }

    /// Like `finish`, also returning the final position.
    pub(crate) fn finish_at(mut self) -> Result<(W, u64), Error> {
        self.ready()?;
        self.write_raw(&[TAG_END])?;
        if let Err(source) = self.inner.flush() {
            return Err(Error::Io { offset: self.pos, source });
        }
        Ok((self.inner, self.pos))
    }

    fn ready(&self) -> Result<(), Error> {
        if self.failed {
            return Err(Error::Poisoned { offset: self.pos });
        }
        if self.open > 0 {
            return Err(Error::IncompletePayload {
                offset: self.pos,
                remaining: self.open,
            });
        }
        Ok(())
    }

    fn write_extent_head(&mut self, tag: u8, offset: u64, length: u64) -> Result<(), Error> {
        let mut head = [0u8; 25];
        head[0] = tag;
        let mut n = 1;
        if self.format == Format::V2 {
            // Checked by the callers: w has length <= u64::MAX - 16; z has len 16.
            let len = if tag == TAG_WRITE { 16 + length } else { 16 };
            head[n..n + 8].copy_from_slice(&len.to_le_bytes());
            n += 8;
        }
        head[n..n + 8].copy_from_slice(&offset.to_le_bytes());
        head[n + 8..n + 16].copy_from_slice(&length.to_le_bytes());
        self.write_raw(&head[..n + 16])
    }

    fn write_raw(&mut self, bytes: &[u8]) -> Result<(), Error> {
        if let Err(source) = self.inner.write_all(bytes) {
            self.failed = true;
            return Err(Error::Io { offset: self.pos, source });
        }
        self.pos += bytes.len() as u64;
        Ok(())
    }
}
