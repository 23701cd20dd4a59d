//! The write journal of a replicated disk (docs/design.md, "Disk").
//!
//! While a protected VM runs, every write the guest completes on a disk is
//! also appended to the disk's journal, in completion order, with its
//! flushes among them. The write's data is read from guest memory straight
//! into the journal, and the file is written from there: replication adds
//! no copy to the write path, and none to the epoch's pause, which only
//! swaps the open epoch for a spare ([`Journal::seal`]). The sealed epoch is
//! sent with its checkpoint from where it lies, then given back
//! ([`Journal::recycle`]), so steady state allocates nothing.
//!
//! An epoch's bytes are the records as they go on the wire:
//!
//! ```text
//! record   kind u32 | reserved u32 | offset u64 | len u64   (24 bytes, little endian)
//!          len bytes of data (a write; a flush has none)
//! ```

use std::sync::{Mutex, MutexGuard};

/// Length of a record's header.
pub const RECORD_HEADER_LEN: usize = 24;
/// A write: `len` bytes at byte `offset`.
pub const RECORD_WRITE: u32 = 1;
/// A flush: everything before it is durable once it completed.
pub const RECORD_FLUSH: u32 = 2;

/// One record of an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// `data` written at byte `offset`.
    Write {
        /// Byte offset in the disk.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// A completed flush.
    Flush,
}

/// Why a journal's bytes do not parse (a hostile or corrupt stream).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// A header cut short.
    #[error("disk journal: record header cut short at byte {at} of {len}")]
    ShortHeader {
        /// Where.
        at: usize,
        /// Of how many.
        len: usize,
    },
    /// Data cut short.
    #[error("disk journal: write at byte {at} claims {claimed} bytes, {left} remain")]
    ShortData {
        /// Where.
        at: usize,
        /// Its length.
        claimed: u64,
        /// What is left.
        left: usize,
    },
    /// An unknown record kind.
    #[error("disk journal: unknown record kind {kind} at byte {at}")]
    Kind {
        /// The kind.
        kind: u32,
        /// Where.
        at: usize,
    },
    /// A flush that claims data.
    #[error("disk journal: flush at byte {at} claims {len} bytes of data")]
    FlushWithData {
        /// Where.
        at: usize,
        /// Its length.
        len: u64,
    },
}

/// Counts of one epoch's journal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalCounts {
    /// Writes.
    pub writes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Flushes.
    pub flushes: u64,
}

impl std::ops::AddAssign for JournalCounts {
    fn add_assign(&mut self, o: JournalCounts) {
        self.writes += o.writes;
        self.write_bytes += o.write_bytes;
        self.flushes += o.flushes;
    }
}

/// One epoch of a disk's journal.
#[derive(Debug, Default)]
pub struct JournalEpoch {
    bytes: Vec<u8>,
    counts: JournalCounts,
}

impl JournalEpoch {
    /// The records, as they go on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// What it holds.
    pub fn counts(&self) -> JournalCounts {
        self.counts
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.counts = JournalCounts::default();
    }

    fn push_header(&mut self, kind: u32, offset: u64, len: u64) {
        self.bytes.extend_from_slice(&kind.to_le_bytes());
        self.bytes.extend_from_slice(&0u32.to_le_bytes());
        self.bytes.extend_from_slice(&offset.to_le_bytes());
        self.bytes.extend_from_slice(&len.to_le_bytes());
    }
}

/// Appends a write record of `len` bytes at `offset` to `out` and returns
/// its (zeroed) data to fill: the initial sync's blocks travel as records.
pub fn write_record(out: &mut Vec<u8>, offset: u64, len: usize) -> &mut [u8] {
    out.extend_from_slice(&RECORD_WRITE.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&(len as u64).to_le_bytes());
    let at = out.len();
    out.resize(at + len, 0);
    &mut out[at..]
}

/// Walks the records of an epoch's bytes (from the wire: checked).
pub fn records(bytes: &[u8]) -> impl Iterator<Item = Result<Record<'_>, JournalError>> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= bytes.len() {
            return None;
        }
        let hdr = match bytes.get(at..at + RECORD_HEADER_LEN) {
            Some(h) => h,
            None => {
                let e = JournalError::ShortHeader {
                    at,
                    len: bytes.len(),
                };
                at = bytes.len();
                return Some(Err(e));
            }
        };
        let kind = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
        let offset = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(hdr[16..24].try_into().expect("8 bytes"));
        let start = at;
        let data_at = at + RECORD_HEADER_LEN;
        let left = bytes.len() - data_at;
        let r = match kind {
            RECORD_WRITE if len <= left as u64 => {
                at = data_at + len as usize;
                Ok(Record::Write {
                    offset,
                    data: &bytes[data_at..at],
                })
            }
            RECORD_WRITE => Err(JournalError::ShortData {
                at: start,
                claimed: len,
                left,
            }),
            RECORD_FLUSH if len == 0 => {
                at = data_at;
                Ok(Record::Flush)
            }
            RECORD_FLUSH => Err(JournalError::FlushWithData { at: start, len }),
            kind => Err(JournalError::Kind { kind, at: start }),
        };
        if r.is_err() {
            at = bytes.len();
        }
        Some(r)
    })
}

#[derive(Debug, Default)]
struct Inner {
    recording: bool,
    open: JournalEpoch,
    spare: Vec<JournalEpoch>,
}

/// A disk's journal, shared by its device worker (which appends) and the
/// epoch driver (which seals, sends and recycles).
#[derive(Debug, Default)]
pub struct Journal {
    inner: Mutex<Inner>,
}

impl Journal {
    /// A journal that records nothing until [`Journal::start`].
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records from now on (a pairing began).
    pub fn start(&self) {
        let mut i = self.lock();
        i.open.clear();
        i.recording = true;
    }

    /// Records nothing more and drops what is open (protection ended).
    pub fn stop(&self) {
        let mut i = self.lock();
        i.recording = false;
        i.open.clear();
    }

    /// Whether writes are journaled now.
    pub fn recording(&self) -> bool {
        self.lock().recording
    }

    /// The epoch cut (devices quiesced): hands over the open epoch and opens
    /// the next in a spare buffer.
    pub fn seal(&self) -> JournalEpoch {
        let mut i = self.lock();
        let fresh = i.spare.pop().unwrap_or_default();
        std::mem::replace(&mut i.open, fresh)
    }

    /// Gives a sent epoch's buffer back for reuse.
    pub fn recycle(&self, mut epoch: JournalEpoch) {
        epoch.clear();
        self.lock().spare.push(epoch);
    }

    /// Journals a write of `len` bytes at `offset` whose data `fill` puts
    /// into the slice it is given (from guest memory) and takes to the file;
    /// `fill` returns false on failure, and then nothing is journaled.
    /// Returns what `fill` did, or `None` (and `fill` is not called) when
    /// the journal is not recording.
    pub fn write(
        &self,
        offset: u64,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> bool,
    ) -> Option<bool> {
        let mut i = self.lock();
        if !i.recording {
            return None;
        }
        let mark = i.open.bytes.len();
        i.open.push_header(RECORD_WRITE, offset, len as u64);
        let at = i.open.bytes.len();
        i.open.bytes.resize(at + len, 0);
        if fill(&mut i.open.bytes[at..]) {
            i.open.counts.writes += 1;
            i.open.counts.write_bytes += len as u64;
            Some(true)
        } else {
            i.open.bytes.truncate(mark);
            Some(false)
        }
    }

    /// Journals a completed flush.
    pub fn flush(&self) {
        let mut i = self.lock();
        if i.recording {
            i.open.push_header(RECORD_FLUSH, 0, 0);
            i.open.counts.flushes += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_writes_and_flushes_in_order_and_parses_them_back() {
        let j = Journal::new();
        assert_eq!(j.write(0, 4, |_| unreachable!("not recording")), None);
        j.flush();
        assert_eq!(j.seal().counts(), JournalCounts::default(), "not recording");
        j.start();
        let w = |off, data: &'static [u8]| {
            j.write(off, data.len(), |b| {
                b.copy_from_slice(data);
                true
            })
        };
        assert_eq!(w(512, b"abc"), Some(true));
        assert_eq!(j.write(1024, 2, |_| false), Some(false));
        j.flush();
        assert_eq!(w(4096, b"z"), Some(true));
        let e = j.seal();
        assert_eq!(
            e.counts(),
            JournalCounts {
                writes: 2,
                write_bytes: 4,
                flushes: 1
            }
        );
        let recs: Vec<_> = records(e.as_bytes()).collect::<Result<_, _>>().unwrap();
        assert_eq!(
            recs,
            [
                Record::Write {
                    offset: 512,
                    data: b"abc"
                },
                Record::Flush,
                Record::Write {
                    offset: 4096,
                    data: b"z"
                },
            ]
        );
        j.recycle(e);
        assert_eq!(j.seal().as_bytes(), b"", "a fresh epoch after the cut");
    }

    #[test]
    fn hostile_bytes_are_errors_not_panics() {
        let j = Journal::new();
        j.start();
        j.write(0, 8, |b| {
            b.fill(7);
            true
        });
        let good = j.seal().as_bytes().to_vec();
        for cut in 0..good.len() {
            let r: Result<Vec<_>, _> = records(&good[..cut]).collect();
            assert!(r.is_err() || cut == 0, "cut at {cut} parsed");
        }
        let mut bad = good.clone();
        bad[0] = 9;
        assert!(matches!(
            records(&bad).next(),
            Some(Err(JournalError::Kind { kind: 9, .. }))
        ));
        let mut flush = good.clone();
        flush[0] = RECORD_FLUSH as u8;
        assert!(matches!(
            records(&flush).next(),
            Some(Err(JournalError::FlushWithData { .. }))
        ));
        let mut huge = good;
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            records(&huge).next(),
            Some(Err(JournalError::ShortData { .. }))
        ));
    }
}
