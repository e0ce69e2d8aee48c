//! Streaming reader for `rbd diff v1` / `rbd diff v2` streams.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::input::{Input, BUF_CAPACITY};
use crate::{
    check_extent, escape, DiffHeader, Error, Format, BANNER_V1, BANNER_V2, DEFAULT_MAX_PIECE, MAX_SNAP_NAME, TAG_END, TAG_FROM,
    TAG_PROTECTED, TAG_SIZE, TAG_TO, TAG_WRITE, TAG_ZERO,
};

/// One event of the data section of a diff stream.
///
/// Data payloads are yielded in pieces of at most `max_piece` bytes (default
/// [`DEFAULT_MAX_PIECE`], 1 MiB), borrowed from an internal buffer that is reused: memory stays
/// bounded whatever the record length. A zero-length `w` record yields one `Data` event with
/// an empty slice.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A piece of a `w` record: `data` is to be written at `offset` in the image.
    Data {
        /// Absolute image offset of `data[0]`, in bytes.
        offset: u64,
        /// The payload bytes of this piece (at most `max_piece` bytes, borrowed until the
        /// next call to [`DiffReader::next_event`]).
        data: &'a [u8],
    },
    /// A whole `z` record: the extent reads back as zeros (zeroed, discarded or never
    /// allocated).
    Zero {
        /// Image offset where the extent starts, in bytes.
        offset: u64,
        /// Length of the extent, in bytes.
        length: u64,
    },
    /// The `e` record. A standalone reader returns it only after end of stream was verified.
    End,
}

/// One record of the data section, its payload not yet read ([`DiffReader::next_record`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// A `w` record, or the unread rest of one: `len` payload bytes for the image at
    /// `offset` follow, read with [`DiffReader::read_data`].
    Data {
        /// Absolute image offset of the first unread payload byte.
        offset: u64,
        /// Payload bytes not yet read.
        len: u64,
    },
    /// A whole `z` record, as [`Event::Zero`].
    Zero {
        /// Image offset where the extent starts, in bytes.
        offset: u64,
        /// Length of the extent, in bytes.
        length: u64,
    },
    /// The `e` record, as [`Event::End`].
    End,
}

#[derive(Debug, Clone, Copy)]
struct Head {
    tag: u8,
    /// Stream offset of the tag byte.
    start: u64,
    /// The v2 `len` field (None for v1 and for `e`).
    len: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// At a record boundary.
    Boundary,
    /// The first data/end record head, read by the constructor.
    Pending(Head),
    /// Inside a `w` record.
    InData {
        image_offset: u64,
        remaining: u64,
        record_start: u64,
    },
    Ended,
    Failed,
}

enum Step {
    Data { offset: u64, len: usize },
    Zero { offset: u64, length: u64 },
    End,
}

/// Streaming reader of an RBD diff stream (v1 from `rbd export-diff`, or v2).
///
/// The reader does its own buffering (64 KiB), so there is no need to wrap `reader` in a
/// `BufReader`; payload reads of a piece size at least that large go straight from the
/// inner reader into the piece buffer once the internal buffer is drained. Because of the
/// read-ahead, [`DiffReader::into_inner`] may lose buffered bytes if called before `End`.
///
/// Checks done while reading: exact banner; metadata (`f`, `t`, `s`, and `p` for v2) in any
/// order, each at most once, only before the first data record; an `s` before the first data
/// or `e` record; snapshot names at most [`MAX_SNAP_NAME`] bytes and UTF-8; v2 `len` fields of
/// known records (with the Pacific `p` quirk accepted); every extent within the image size,
/// without overflow, and starting at or after the end of the previous data record; for v1,
/// no unknown tags (v2 unknown tags are skipped by their length); an `e` record, and for a
/// standalone stream nothing after it.
pub struct DiffReader<R: Read> {
    input: Input<R>,
    format: Format,
    header: DiffHeader,
    max_piece: usize,
    piece: Vec<u8>,
    state: State,
    prev_end: u64,
    standalone: bool,
    end_flag: Option<Arc<AtomicBool>>,
    skipped: u64,
}

impl<R: Read> DiffReader<R> {
    /// Reads the banner (v1 or v2, decided by it) and all metadata records up to the first
    /// data/end record. Standalone stream: after `e` the reader requires end of stream.
    pub fn new(reader: R) -> Result<Self, Error> {
        Self::with_max_piece(reader, DEFAULT_MAX_PIECE)
    }

    /// Same as [`DiffReader::new`] with a maximum piece size (>= 1) for `Data` events.
    pub fn with_max_piece(reader: R, max_piece: usize) -> Result<Self, Error> {
        if max_piece == 0 {
            return Err(Error::InvalidArgument {
                what: "max_piece must be at least 1",
            });
        }
        Self::open(Input::new(reader, BUF_CAPACITY, 0), max_piece, true, None, None)
    }

    /// Reader for a v2 diff embedded in an image export: `input` is unbuffered (the container
    /// buffers), reading stops after `e`.
    pub(crate) fn embedded(reader: R, start: u64, max_piece: usize, end_flag: Arc<AtomicBool>) -> Result<Self, Error> {
        Self::open(Input::new(reader, 0, start), max_piece, false, Some(Format::V2), Some(end_flag))
    }

    fn open(
        mut input: Input<R>,
        max_piece: usize,
        standalone: bool,
        only: Option<Format>,
        end_flag: Option<Arc<AtomicBool>>,
    ) -> Result<Self, Error> {
        let banners: &[&[u8]] = match only {
            None => &[BANNER_V1, BANNER_V2],
            Some(Format::V1) => &[BANNER_V1],
            Some(Format::V2) => &[BANNER_V2],
        };
        let which = read_banner(&mut input, banners)?;
        let format = if banners[which] == BANNER_V1 { Format::V1 } else { Format::V2 };
        let mut r = DiffReader {
            input,
            format,
            header: DiffHeader::default(),
            max_piece,
            piece: Vec::new(),
            state: State::Boundary,
            prev_end: 0,
            standalone,
            end_flag,
            skipped: 0,
        };
        r.read_metadata()?;
        Ok(r)
    }

    /// The stream format, decided by the banner.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The metadata records (all of them precede the first data record).
    pub fn header(&self) -> &DiffHeader {
        &self.header
    }

    /// Bytes of the stream consumed so far (for embedded diffs: counted from the start of the
    /// image export). The reader may have read ahead of this position.
    pub fn position(&self) -> u64 {
        self.input.position()
    }

    /// Bytes of the current `w` record not yet yielded. After a `Data` event, 0 means that
    /// event finished its record; this lets a caller recover record boundaries.
    pub fn record_remaining(&self) -> u64 {
        match self.state {
            State::InData { remaining, .. } => remaining,
            _ => 0,
        }
    }

    /// Number of unknown v2 records skipped so far.
    pub fn skipped_records(&self) -> u64 {
        self.skipped
    }

    /// The maximum size of a `Data` piece.
    pub fn max_piece(&self) -> usize {
        self.max_piece
    }

    /// The inner reader. Bytes read ahead into the internal buffer are lost.
    pub fn into_inner(self) -> R {
        self.input.into_inner()
    }

    /// Next event. After `End` has been returned, further calls return `Ok(Event::End)` again.
    /// After an error, further calls return [`Error::Poisoned`].
    pub fn next_event(&mut self) -> Result<Event<'_>, Error> {
        match self.step() {
            Ok(Step::Data { offset, len }) => Ok(Event::Data {
                offset,
                data: &self.piece[..len],
            }),
            Ok(Step::Zero { offset, length }) => Ok(Event::Zero { offset, length }),
            Ok(Step::End) => Ok(Event::End),
            Err(e) => {
                self.state = State::Failed;
                Err(e)
            }
        }
    }

    /// The next record of the data section, its payload not read: a `Data` record's bytes
    /// are then read with [`DiffReader::read_data`], straight into the caller's buffer (no
    /// copy through the piece buffer). Called while a data record still has unread bytes,
    /// it returns that rest again (`offset` and `len` of what is left). A zero-length `w`
    /// record is a `Data` record of length 0. Same checks, errors and poisoning as
    /// [`DiffReader::next_event`]; the two may be mixed.
    pub fn next_record(&mut self) -> Result<Record, Error> {
        self.advance().inspect_err(|_| self.state = State::Failed)
    }

    /// Reads the next bytes of the current data record into `out`: exactly
    /// `min(out.len(), record_remaining())` bytes, their number returned (0 outside a data
    /// record). A stream that ends inside the payload is [`Error::Truncated`], as with
    /// [`DiffReader::next_event`].
    pub fn read_data(&mut self, out: &mut [u8]) -> Result<usize, Error> {
        let State::InData {
            image_offset,
            remaining,
            record_start,
        } = self.state
        else {
            return match self.state {
                State::Failed => Err(Error::Poisoned { offset: self.position() }),
                _ => Ok(0),
            };
        };
        // n <= remaining, so the cast cannot truncate.
        let n = remaining.min(out.len() as u64) as usize;
        let out = &mut out[..n];
        match self.input.read_full(out) {
            Ok(got) if got == n => {}
            Ok(_) => {
                self.state = State::Failed;
                return Err(self.input.truncated(record_start, "'w' payload"));
            }
            Err(e) => {
                self.state = State::Failed;
                return Err(e);
            }
        }
        self.state = State::InData {
            image_offset: image_offset + n as u64,
            remaining: remaining - n as u64,
            record_start,
        };
        Ok(n)
    }

    fn step(&mut self) -> Result<Step, Error> {
        loop {
            if let State::InData {
                image_offset, remaining, ..
            } = self.state
            {
                if remaining > 0 {
                    // n <= max_piece, so the cast cannot truncate.
                    let n = remaining.min(self.max_piece as u64) as usize;
                    if self.piece.len() < n {
                        self.piece.resize(n, 0);
                    }
                    let mut piece = std::mem::take(&mut self.piece);
                    let read = self.read_data(&mut piece[..n]);
                    self.piece = piece;
                    return Ok(Step::Data {
                        offset: image_offset,
                        len: read?,
                    });
                }
            }
            match self.advance()? {
                Record::Data { offset, len: 0 } => return Ok(Step::Data { offset, len: 0 }),
                // The first piece is read by the next loop iteration.
                Record::Data { .. } => {}
                Record::Zero { offset, length } => return Ok(Step::Zero { offset, length }),
                Record::End => return Ok(Step::End),
            }
        }
    }

    /// To the next record (or the unread rest of the current data record).
    fn advance(&mut self) -> Result<Record, Error> {
        loop {
            let head = match self.state {
                State::Ended => return Ok(Record::End),
                State::Failed => return Err(Error::Poisoned { offset: self.position() }),
                State::InData {
                    image_offset, remaining, ..
                } if remaining > 0 => {
                    return Ok(Record::Data {
                        offset: image_offset,
                        len: remaining,
                    })
                }
                State::InData { .. } | State::Boundary => match self.read_head()? {
                    Some(h) => h,
                    None => return Err(Error::MissingEnd { offset: self.position() }),
                },
                State::Pending(h) => h,
            };
            self.state = State::Boundary;
            match head.tag {
                TAG_WRITE => {
                    let (offset, length) = self.read_extent(&head)?;
                    if length > 0 {
                        self.state = State::InData {
                            image_offset: offset,
                            remaining: length,
                            record_start: head.start,
                        };
                    }
                    return Ok(Record::Data { offset, len: length });
                }
                TAG_ZERO => {
                    let (offset, length) = self.read_extent(&head)?;
                    return Ok(Record::Zero { offset, length });
                }
                TAG_END => {
                    if self.standalone {
                        let at = self.position();
                        if !self.input.at_eof()? {
                            return Err(Error::TrailingBytes { offset: at });
                        }
                    }
                    if let Some(flag) = &self.end_flag {
                        flag.store(true, Ordering::Release);
                    }
                    self.state = State::Ended;
                    return Ok(Record::End);
                }
                tag if self.is_metadata_tag(tag) => return Err(Error::MetadataAfterData { offset: head.start, tag }),
                tag => self.skip_unknown(&head, tag)?,
            }
        }
    }

    fn is_metadata_tag(&self, tag: u8) -> bool {
        matches!(tag, TAG_FROM | TAG_TO | TAG_SIZE) || (tag == TAG_PROTECTED && self.format == Format::V2)
    }

    /// v2: skips an unknown record by its length. v1: unknown tags are fatal.
    fn skip_unknown(&mut self, head: &Head, tag: u8) -> Result<(), Error> {
        match head.len {
            Some(len) if self.format == Format::V2 => {
                self.input.skip(len, head.start, "skipped unknown record")?;
                self.skipped += 1;
                Ok(())
            }
            _ => Err(Error::UnknownTag { offset: head.start, tag }),
        }
    }

    /// Reads the tag (and for v2 the length) of the next record; None at a clean end of stream.
    fn read_head(&mut self) -> Result<Option<Head>, Error> {
        let start = self.position();
        let mut tag = [0u8; 1];
        if self.input.read_full(&mut tag)? == 0 {
            return Ok(None);
        }
        let tag = tag[0];
        let len = if self.format == Format::V2 && tag != TAG_END {
            Some(self.input.read_u64(start, "record length")?)
        } else {
            None
        };
        Ok(Some(Head { tag, start, len }))
    }

    fn read_metadata(&mut self) -> Result<(), Error> {
        let mut have_size = false;
        loop {
            let head = match self.read_head()? {
                Some(h) => h,
                None => return Err(Error::MissingEnd { offset: self.position() }),
            };
            let dup = Error::DuplicateRecord {
                offset: head.start,
                tag: head.tag,
            };
            match head.tag {
                TAG_FROM | TAG_TO => {
                    let is_from = head.tag == TAG_FROM;
                    let seen = if is_from {
                        self.header.from_snap.is_some()
                    } else {
                        self.header.to_snap.is_some()
                    };
                    if seen {
                        return Err(dup);
                    }
                    let name = self.read_name(&head)?;
                    if is_from {
                        self.header.from_snap = Some(name);
                    } else {
                        self.header.to_snap = Some(name);
                    }
                }
                TAG_SIZE => {
                    if have_size {
                        return Err(dup);
                    }
                    expect_len(&head, 8)?;
                    self.header.image_size = self.input.read_u64(head.start, "'s' record")?;
                    have_size = true;
                }
                TAG_PROTECTED if self.format == Format::V2 => {
                    if self.header.protected.is_some() {
                        return Err(dup);
                    }
                    // Ceph <= 16.2 writes len = 8 followed by a single byte; newer Ceph len = 1.
                    // Either way exactly one byte of payload follows.
                    match head.len {
                        Some(1) | Some(8) => {}
                        other => {
                            return Err(Error::LengthMismatch {
                                offset: head.start,
                                tag: head.tag,
                                expected: 1,
                                found: other.unwrap_or(0),
                            })
                        }
                    }
                    let [b] = self.input.read_array::<1>(head.start, "'p' record")?;
                    self.header.protected = Some(b != 0);
                }
                TAG_WRITE | TAG_ZERO | TAG_END => {
                    if !have_size {
                        return Err(Error::MissingImageSize { offset: head.start });
                    }
                    self.state = State::Pending(head);
                    return Ok(());
                }
                tag => self.skip_unknown(&head, tag)?,
            }
        }
    }

    /// Body of an `f`/`t` record: `le32 n`, `name[n]`.
    fn read_name(&mut self, head: &Head) -> Result<String, Error> {
        let n = self.input.read_u32(head.start, "snapshot name record")?;
        expect_len(head, 4 + u64::from(n))?;
        if n as usize > MAX_SNAP_NAME {
            return Err(Error::NameTooLong {
                offset: head.start,
                len: u64::from(n),
                max: MAX_SNAP_NAME,
            });
        }
        let mut name = vec![0u8; n as usize];
        self.input.read_exact_at(&mut name, head.start, "snapshot name record")?;
        String::from_utf8(name).map_err(|_| Error::InvalidUtf8 {
            offset: head.start,
            what: "snapshot name",
        })
    }

    /// Body of a `w`/`z` record up to (not including) the payload, validated.
    fn read_extent(&mut self, head: &Head) -> Result<(u64, u64), Error> {
        if head.tag == TAG_ZERO {
            expect_len(head, 16)?;
        }
        let what = if head.tag == TAG_ZERO { "'z' record" } else { "'w' record header" };
        let offset = self.input.read_u64(head.start, what)?;
        let length = self.input.read_u64(head.start, what)?;
        if head.tag == TAG_WRITE {
            expect_len(head, 16u64.saturating_add(length))?;
        }
        self.prev_end = check_extent(head.start, offset, length, self.header.image_size, self.prev_end)?;
        Ok((offset, length))
    }
}

/// v2: the record's `len` must equal `expected` (v1 has no `len`).
fn expect_len(head: &Head, expected: u64) -> Result<(), Error> {
    match head.len {
        Some(found) if found != expected => Err(Error::LengthMismatch {
            offset: head.start,
            tag: head.tag,
            expected,
            found,
        }),
        _ => Ok(()),
    }
}

/// Reads one of `banners` (which must all have the same length); returns its index.
pub(crate) fn read_banner<R: Read>(input: &mut Input<R>, banners: &[&[u8]]) -> Result<usize, Error> {
    let start = input.position();
    let len = banners.iter().map(|b| b.len()).max().unwrap_or(0);
    let mut buf = vec![0u8; len];
    let got = input.read_full(&mut buf)?;
    let found = &buf[..got];
    if let Some(i) = banners.iter().position(|b| *b == found) {
        return Ok(i);
    }
    if got < len && banners.iter().any(|b| b.starts_with(found)) {
        return Err(Error::Truncated {
            offset: start,
            what: "banner",
            eof_at: input.position(),
        });
    }
    Err(Error::UnknownBanner {
        offset: start,
        found: escape(found),
    })
}
