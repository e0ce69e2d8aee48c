//! Buffered, position-counting input shared by the readers.

use std::io::{self, Read};

use crate::Error;

/// Capacity of the internal read buffer of standalone readers.
pub(crate) const BUF_CAPACITY: usize = 64 * 1024;

/// A reader with an optional internal buffer that counts the bytes handed out.
///
/// With capacity 0 every read goes straight to the inner reader (used for diffs embedded in an
/// image export, whose inner reader is an already buffered [`CountingReader`]). Reads at least
/// as large as the buffer bypass it when it is empty, so large payloads are copied only once.
pub(crate) struct Input<R> {
    inner: R,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Logical position: bytes handed out to the parser (plus the starting offset).
    pos: u64,
}

fn read_retry<R: Read>(inner: &mut R, out: &mut [u8]) -> io::Result<usize> {
    loop {
        match inner.read(out) {
            // Guard against readers that report more than they were given room for.
            Ok(n) => return Ok(n.min(out.len())),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

impl<R: Read> Input<R> {
    pub(crate) fn new(inner: R, capacity: usize, pos: u64) -> Self {
        Input {
            inner,
            buf: vec![0u8; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
            pos,
        }
    }

    pub(crate) fn position(&self) -> u64 {
        self.pos
    }

    pub(crate) fn into_inner(self) -> R {
        self.inner
    }

    pub(crate) fn io_err(&self, source: io::Error) -> Error {
        Error::Io { offset: self.pos, source }
    }

    /// One read; returns 0 only at end of stream (or for an empty `out`).
    pub(crate) fn read_some(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.start == self.end {
            if out.len() >= self.buf.len() {
                let n = read_retry(&mut self.inner, out)?;
                self.pos += n as u64;
                return Ok(n);
            }
            let n = read_retry(&mut self.inner, &mut self.buf)?;
            self.start = 0;
            self.end = n;
            if n == 0 {
                return Ok(0);
            }
        }
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        self.pos += n as u64;
        Ok(n)
    }

    /// Fills `out` unless the stream ends first; returns the number of bytes read.
    pub(crate) fn read_full(&mut self, out: &mut [u8]) -> Result<usize, Error> {
        let mut done = 0;
        while done < out.len() {
            match self.read_some(&mut out[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) => return Err(self.io_err(e)),
            }
        }
        Ok(done)
    }

    /// Reads exactly `N` bytes; a short read is `Truncated` for the record starting at `start`.
    pub(crate) fn read_array<const N: usize>(&mut self, start: u64, what: &'static str) -> Result<[u8; N], Error> {
        let mut a = [0u8; N];
        self.read_exact_at(&mut a, start, what)?;
        Ok(a)
    }

    pub(crate) fn read_exact_at(&mut self, out: &mut [u8], start: u64, what: &'static str) -> Result<(), Error> {
        if self.read_full(out)? < out.len() {
            return Err(self.truncated(start, what));
        }
        Ok(())
    }

    pub(crate) fn truncated(&self, start: u64, what: &'static str) -> Error {
        Error::Truncated {
            offset: start,
            what,
            eof_at: self.pos,
        }
    }

    pub(crate) fn read_u64(&mut self, start: u64, what: &'static str) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.read_array(start, what)?))
    }

    pub(crate) fn read_u32(&mut self, start: u64, what: &'static str) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.read_array(start, what)?))
    }

    /// Reads `n` bytes into a new vector, growing it only as data actually arrives.
    pub(crate) fn read_vec(&mut self, n: usize, start: u64, what: &'static str) -> Result<Vec<u8>, Error> {
        const STEP: usize = 64 * 1024;
        let mut v = Vec::with_capacity(n.min(STEP));
        while v.len() < n {
            let old = v.len();
            let chunk = (n - old).min(STEP);
            v.resize(old + chunk, 0);
            self.read_exact_at(&mut v[old..], start, what)?;
        }
        Ok(v)
    }

    /// Discards `n` bytes; a short stream is `Truncated` for the record starting at `start`.
    pub(crate) fn skip(&mut self, mut n: u64, start: u64, what: &'static str) -> Result<(), Error> {
        let mut scratch = [0u8; 8192];
        while n > 0 {
            let buffered = (self.end - self.start) as u64;
            if buffered > 0 {
                let k = buffered.min(n);
                self.start += k as usize;
                self.pos += k;
                n -= k;
                continue;
            }
            let want = n.min(scratch.len() as u64) as usize;
            let got = self.read_some(&mut scratch[..want]).map_err(|e| self.io_err(e))?;
            if got == 0 {
                return Err(self.truncated(start, what));
            }
            n -= got as u64;
        }
        Ok(())
    }

    /// True if the stream has ended. Consumes one byte otherwise.
    pub(crate) fn at_eof(&mut self) -> Result<bool, Error> {
        let mut b = [0u8; 1];
        Ok(self.read_full(&mut b)? == 0)
    }
}

/// The buffered, position-counting reader underneath an [`crate::ImageExportReader`].
///
/// Diffs embedded in an image export are read through `DiffReader<&mut CountingReader<R>>`.
/// It implements [`Read`]; reads hand out bytes from its internal buffer (or go straight to
/// the inner reader for large reads).
pub struct CountingReader<R> {
    pub(crate) input: Input<R>,
}

impl<R: Read> CountingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        CountingReader {
            input: Input::new(inner, BUF_CAPACITY, 0),
        }
    }

    /// Bytes handed out so far (the logical stream position).
    pub fn position(&self) -> u64 {
        self.input.position()
    }

    /// The inner reader. Bytes already buffered but not yet handed out are lost.
    pub fn into_inner(self) -> R {
        self.input.into_inner()
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read_some(buf)
    }
}
