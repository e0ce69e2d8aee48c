//! Tests: helpers shared by the test modules.

mod container;
mod errors;
mod props;
mod roundtrip;

use std::io::{self, Read};

use crate::{DiffReader, Error, Event, Record, BANNER_V1, BANNER_V2};

/// A data record as reassembled from reader events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rec {
    W(u64, Vec<u8>),
    Z(u64, u64),
}

/// Reads all events up to `End`, reassembling `w` records from their pieces.
pub(crate) fn drain<R: Read>(r: &mut DiffReader<R>) -> Result<Vec<Rec>, Error> {
    let max_piece = r.max_piece();
    let mut recs = Vec::new();
    let mut open = false;
    loop {
        match r.next_event()? {
            Event::Data { offset, data } => {
                assert!(data.len() <= max_piece);
                match recs.last_mut() {
                    Some(Rec::W(o, d)) if open => {
                        assert_eq!(*o + d.len() as u64, offset);
                        d.extend_from_slice(data);
                    }
                    _ => recs.push(Rec::W(offset, data.to_vec())),
                }
            }
            Event::Zero { offset, length } => {
                assert!(!open);
                recs.push(Rec::Z(offset, length));
            }
            Event::End => {
                assert!(!open);
                return Ok(recs);
            }
        }
        open = r.record_remaining() > 0;
    }
}

/// Reads all records up to `End` with `next_record` / `read_data`, the payload in reads of at
/// most `step` bytes (after every other read, the record's rest is asked for again with `next_record`).
pub(crate) fn drain_records<R: Read>(r: &mut DiffReader<R>, step: usize) -> Result<Vec<Rec>, Error> {
    let mut recs = Vec::new();
    let mut again = false;
    loop {
        match r.next_record()? {
            Record::Data { offset, len } => {
                let mut data = Vec::new();
                let mut at = offset;
                let mut left = len;
                let mut buf = vec![0u8; step.max(1)];
                while left > 0 {
                    let n = r.read_data(&mut buf)?;
                    assert_eq!(n as u64, left.min(buf.len() as u64));
                    data.extend_from_slice(&buf[..n]);
                    left -= n as u64;
                    at += n as u64;
                    assert_eq!(r.record_remaining(), left);
                    if left > 0 && again {
                        // Asked again, the rest of the record is what is left.
                        assert_eq!(r.next_record()?, Record::Data { offset: at, len: left });
                    }
                    again = !again;
                }
                assert_eq!(r.read_data(&mut buf)?, 0);
                recs.push(Rec::W(offset, data));
            }
            Record::Zero { offset, length } => recs.push(Rec::Z(offset, length)),
            Record::End => return Ok(recs),
        }
    }
}

/// Reads a whole standalone stream; returns the error if there is one.
pub(crate) fn parse(bytes: &[u8], max_piece: usize) -> Result<Vec<Rec>, Error> {
    let mut r = DiffReader::with_max_piece(bytes, max_piece)?;
    drain(&mut r)
}

pub(crate) fn parse_err(bytes: &[u8]) -> Error {
    match parse(bytes, 7) {
        Ok(recs) => panic!("expected an error, got {recs:?}"),
        Err(e) => e,
    }
}

/// Hand-made stream builder, for malformed streams.
pub(crate) struct B {
    pub v: Vec<u8>,
    pub v2: bool,
}

impl B {
    pub fn v1() -> B {
        B {
            v: BANNER_V1.to_vec(),
            v2: false,
        }
    }
    pub fn v2() -> B {
        B {
            v: BANNER_V2.to_vec(),
            v2: true,
        }
    }
    pub fn pos(&self) -> u64 {
        self.v.len() as u64
    }
    pub fn raw(mut self, b: &[u8]) -> B {
        self.v.extend_from_slice(b);
        self
    }
    pub fn u64(self, x: u64) -> B {
        self.raw(&x.to_le_bytes())
    }
    pub fn u32(self, x: u32) -> B {
        self.raw(&x.to_le_bytes())
    }
    /// Tag plus (v2) len.
    pub fn head(self, tag: u8, len: u64) -> B {
        let v2 = self.v2;
        let b = self.raw(&[tag]);
        if v2 {
            b.u64(len)
        } else {
            b
        }
    }
    pub fn name(self, tag: u8, name: &[u8]) -> B {
        self.head(tag, 4 + name.len() as u64).u32(name.len() as u32).raw(name)
    }
    pub fn s(self, size: u64) -> B {
        self.head(b's', 8).u64(size)
    }
    pub fn p(self, len: u64, val: u8) -> B {
        self.head(b'p', len).raw(&[val])
    }
    pub fn w(self, off: u64, data: &[u8]) -> B {
        self.head(b'w', 16 + data.len() as u64).u64(off).u64(data.len() as u64).raw(data)
    }
    pub fn z(self, off: u64, len: u64) -> B {
        self.head(b'z', 16).u64(off).u64(len)
    }
    pub fn e(self) -> B {
        self.raw(b"e")
    }
}

/// Returns `data` in reads of at most `step` bytes, then fails with an I/O error.
pub(crate) struct FailAfter<'a> {
    pub data: &'a [u8],
    pub step: usize,
}

impl Read for FailAfter<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.data.is_empty() {
            return Err(io::Error::other("boom"));
        }
        let n = buf.len().min(self.step).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Hands out at most `step` bytes per read, with `Interrupted` errors in between.
pub(crate) struct Trickle<'a> {
    pub data: &'a [u8],
    pub step: usize,
    pub interrupt: bool,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.interrupt = !self.interrupt;
        if self.interrupt {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = buf.len().min(self.step).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}
