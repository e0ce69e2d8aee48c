//! The `rbd export --export-format 2` container: `rbd image v2` header, then
//! `rbd image diffs v2`, a diff count and that many v2 diff streams.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::input::CountingReader;
use crate::reader::read_banner;
use crate::{
    DiffHeader, DiffReader, DiffWriter, Error, Format, BANNER_IMAGE_DIFFS_V2, BANNER_IMAGE_V2, DEFAULT_MAX_PIECE, MAX_IMAGE_METADATA,
    TAG_FEATURES, TAG_IMAGE_END, TAG_META, TAG_ORDER, TAG_STRIPE_COUNT, TAG_STRIPE_UNIT,
};

/// The header records of an image export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageHeader {
    /// `O`: log2 of the object size in bytes (22 for 4 MiB objects).
    pub order: Option<u64>,
    /// `T`: the image's feature bits (librbd's `RBD_FEATURE_*` mask).
    pub features: Option<u64>,
    /// `U`: stripe unit, in bytes.
    pub stripe_unit: Option<u64>,
    /// `C`: stripe count (number of objects a stripe spans).
    pub stripe_count: Option<u64>,
    /// `M`: image-meta key/value pairs, in stream order.
    pub metadata: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Diffs,
    Done,
    Failed,
}

/// Reader of an `rbd export --export-format 2` stream.
///
/// The constructor reads the image header (unknown header records are skipped by their
/// length), the `rbd image diffs v2` banner and the diff count. [`ImageExportReader::next_diff`]
/// then hands out one [`DiffReader`] per embedded v2 diff, in stream order; each must be read
/// up to its `End` event before the next one is requested. After the last diff the stream must
/// end. The reader buffers internally; error offsets count from the start of the export.
pub struct ImageExportReader<R: Read> {
    input: CountingReader<R>,
    header: ImageHeader,
    diff_count: u64,
    diffs_started: u64,
    current: Option<Arc<AtomicBool>>,
    max_piece: usize,
    state: ReadState,
}

impl<R: Read> ImageExportReader<R> {
    /// Reads the banner `rbd image v2\n`, the header records up to `E`, the banner
    /// `rbd image diffs v2\n` and the diff count.
    pub fn new(reader: R) -> Result<Self, Error> {
        Self::with_max_piece(reader, DEFAULT_MAX_PIECE)
    }

    /// Same as [`ImageExportReader::new`], with the maximum piece size of the diff readers.
    pub fn with_max_piece(reader: R, max_piece: usize) -> Result<Self, Error> {
        if max_piece == 0 {
            return Err(Error::InvalidArgument {
                what: "max_piece must be at least 1",
            });
        }
        let mut input = CountingReader::new(reader);
        let header = read_image_header(&mut input)?;
        let diff_count = {
            let inp = &mut input.input;
            read_banner(inp, &[BANNER_IMAGE_DIFFS_V2])?;
            let start = inp.position();
            inp.read_u64(start, "diff count")?
        };
        Ok(ImageExportReader {
            input,
            header,
            diff_count,
            diffs_started: 0,
            current: None,
            max_piece,
            state: ReadState::Diffs,
        })
    }

    /// The image header.
    pub fn header(&self) -> &ImageHeader {
        &self.header
    }

    /// Number of diffs the stream declares (snapshots + 1).
    pub fn diff_count(&self) -> u64 {
        self.diff_count
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.input.position()
    }

    /// The inner reader. Bytes read ahead into the internal buffer are lost.
    pub fn into_inner(self) -> R {
        self.input.into_inner()
    }

    /// The next embedded v2 diff, or `None` after `diff_count` diffs (then the stream must
    /// end: trailing bytes are an error). The previous diff must have been read to its `End`
    /// event, else [`Error::IncompleteDiff`]. Embedded diff readers stop after their `e`.
    pub fn next_diff(&mut self) -> Result<Option<DiffReader<&mut CountingReader<R>>>, Error> {
        match self.state {
            ReadState::Failed => {
                return Err(Error::Poisoned {
                    offset: self.input.position(),
                })
            }
            ReadState::Done => return Ok(None),
            ReadState::Diffs => {}
        }
        if let Some(flag) = &self.current {
            if !flag.load(Ordering::Acquire) {
                self.state = ReadState::Failed;
                return Err(Error::IncompleteDiff {
                    offset: self.input.position(),
                });
            }
        }
        if self.diffs_started == self.diff_count {
            let at = self.input.position();
            self.state = ReadState::Failed;
            if !self.input.input.at_eof()? {
                return Err(Error::TrailingBytes { offset: at });
            }
            self.state = ReadState::Done;
            return Ok(None);
        }
        self.diffs_started += 1;
        let flag = Arc::new(AtomicBool::new(false));
        self.current = Some(Arc::clone(&flag));
        let start = self.input.position();
        // Poisoned unless the diff header reads fine.
        self.state = ReadState::Failed;
        let reader = DiffReader::embedded(&mut self.input, start, self.max_piece, flag)?;
        self.state = ReadState::Diffs;
        Ok(Some(reader))
    }
}

fn read_image_header<R: Read>(input: &mut CountingReader<R>) -> Result<ImageHeader, Error> {
    let inp = &mut input.input;
    read_banner(inp, &[BANNER_IMAGE_V2])?;
    let mut header = ImageHeader::default();
    let mut meta_bytes: u64 = 0;
    loop {
        let start = inp.position();
        let [tag] = inp.read_array::<1>(start, "image header record")?;
        if tag == TAG_IMAGE_END {
            return Ok(header);
        }
        let len = inp.read_u64(start, "image header record")?;
        let slot = match tag {
            TAG_ORDER => Some(&mut header.order),
            TAG_FEATURES => Some(&mut header.features),
            TAG_STRIPE_UNIT => Some(&mut header.stripe_unit),
            TAG_STRIPE_COUNT => Some(&mut header.stripe_count),
            _ => None,
        };
        if let Some(slot) = slot {
            if slot.is_some() {
                return Err(Error::DuplicateRecord { offset: start, tag });
            }
            if len != 8 {
                return Err(Error::LengthMismatch {
                    offset: start,
                    tag,
                    expected: 8,
                    found: len,
                });
            }
            *slot = Some(inp.read_u64(start, "image header record")?);
        } else if tag == TAG_META {
            let mut string = |what: &'static str, meta_bytes: &mut u64| {
                let n = inp.read_u32(start, "'M' record")?;
                *meta_bytes += u64::from(n);
                if *meta_bytes > MAX_IMAGE_METADATA as u64 {
                    return Err(Error::MetadataTooLarge {
                        offset: start,
                        len: *meta_bytes,
                        max: MAX_IMAGE_METADATA,
                    });
                }
                let bytes = inp.read_vec(n as usize, start, "'M' record")?;
                let s = String::from_utf8(bytes).map_err(|_| Error::InvalidUtf8 { offset: start, what })?;
                Ok((n, s))
            };
            let (k, key) = string("image-meta key", &mut meta_bytes)?;
            let (v, value) = string("image-meta value", &mut meta_bytes)?;
            let expected = 8 + u64::from(k) + u64::from(v);
            if len != expected {
                return Err(Error::LengthMismatch {
                    offset: start,
                    tag,
                    expected,
                    found: len,
                });
            }
            header.metadata.push((key, value));
        } else {
            inp.skip(len, start, "skipped image header record")?;
        }
    }
}

/// Writer of an `rbd export --export-format 2` stream (mainly to build test streams).
///
/// ```
/// use rbd_diff::{DiffHeader, ImageExportReader, ImageExportWriter, ImageHeader};
///
/// let mut w = ImageExportWriter::new(Vec::new(), &ImageHeader::default(), 1).unwrap();
/// let head = DiffHeader { image_size: 4096, ..Default::default() };
/// w.write_diff(&head, false, |d| d.write_data(0, b"x")).unwrap();
/// let bytes = w.finish().unwrap();
///
/// let mut r = ImageExportReader::new(&bytes[..]).unwrap();
/// let mut d = r.next_diff().unwrap().unwrap();
/// assert_eq!(d.header(), &head);
/// while d.next_event().unwrap() != rbd_diff::Event::End {}
/// drop(d);
/// assert!(r.next_diff().unwrap().is_none());
/// ```
pub struct ImageExportWriter<W: Write> {
    inner: W,
    pos: u64,
    declared: u64,
    written: u64,
    failed: bool,
}

impl<W: Write> ImageExportWriter<W> {
    /// Writes the banner, the header records (`O`, `T`, `U`, `C` where set, then one `M` per
    /// metadata pair in the given order), `E`, the diff banner and `diff_count`.
    pub fn new(mut writer: W, header: &ImageHeader, diff_count: u64) -> Result<Self, Error> {
        let mut buf = Vec::new();
        buf.extend_from_slice(BANNER_IMAGE_V2);
        for (tag, value) in [
            (TAG_ORDER, header.order),
            (TAG_FEATURES, header.features),
            (TAG_STRIPE_UNIT, header.stripe_unit),
            (TAG_STRIPE_COUNT, header.stripe_count),
        ] {
            if let Some(v) = value {
                buf.push(tag);
                buf.extend_from_slice(&8u64.to_le_bytes());
                buf.extend_from_slice(&v.to_le_bytes());
            }
        }
        let mut total = 0u64;
        for (k, v) in &header.metadata {
            total += k.len() as u64 + v.len() as u64;
            if total > MAX_IMAGE_METADATA as u64 {
                return Err(Error::MetadataTooLarge {
                    offset: buf.len() as u64,
                    len: total,
                    max: MAX_IMAGE_METADATA,
                });
            }
            buf.push(TAG_META);
            buf.extend_from_slice(&(8 + k.len() as u64 + v.len() as u64).to_le_bytes());
            // Both fit in a u32: their total is at most MAX_IMAGE_METADATA.
            buf.extend_from_slice(&(k.len() as u32).to_le_bytes());
            buf.extend_from_slice(k.as_bytes());
            buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
            buf.extend_from_slice(v.as_bytes());
        }
        buf.push(TAG_IMAGE_END);
        buf.extend_from_slice(BANNER_IMAGE_DIFFS_V2);
        buf.extend_from_slice(&diff_count.to_le_bytes());
        writer.write_all(&buf).map_err(|source| Error::Io { offset: 0, source })?;
        Ok(ImageExportWriter {
            inner: writer,
            pos: buf.len() as u64,
            declared: diff_count,
            written: 0,
            failed: false,
        })
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Writes one complete v2 diff: header records, whatever `body` writes, then `e`.
    /// Any error poisons the writer (a partial diff may have been written).
    pub fn write_diff<F>(&mut self, header: &DiffHeader, pacific_p_quirk: bool, body: F) -> Result<(), Error>
    where
        F: FnOnce(&mut DiffWriter<&mut W>) -> Result<(), Error>,
    {
        if self.failed {
            return Err(Error::Poisoned { offset: self.pos });
        }
        if self.written == self.declared {
            return Err(Error::DiffCountMismatch {
                offset: self.pos,
                declared: self.declared,
                written: self.written + 1,
            });
        }
        self.failed = true;
        let mut w = DiffWriter::start(&mut self.inner, header, Format::V2, pacific_p_quirk, self.pos)?;
        body(&mut w)?;
        let (_, pos) = w.finish_at()?;
        self.pos = pos;
        self.written += 1;
        self.failed = false;
        Ok(())
    }

    /// Checks that `diff_count` diffs were written, flushes and returns the inner writer.
    pub fn finish(mut self) -> Result<W, Error> {
        if self.failed {
            return Err(Error::Poisoned { offset: self.pos });
        }
        if self.written != self.declared {
            return Err(Error::DiffCountMismatch {
                offset: self.pos,
                declared: self.declared,
                written: self.written,
            });
        }
        self.inner.flush().map_err(|source| Error::Io { offset: self.pos, source })?;
        Ok(self.inner)
    }
}
