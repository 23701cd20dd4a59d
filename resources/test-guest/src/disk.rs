//! The disk workload over virtio-blk (`blk`): with heartbeat n, the sector
//! record of n (see `records`) at LBA (n - 1) mod capacity; with
//! `disk_verify=on` it is read back and compared, with `disk_flush=on` a
//! flush follows. With `disk_bytes=N`, every round also writes N bytes (whole
//! sectors) into a bulk area in the second half of the disk, and the records
//! keep to the first half (`records::BulkArea`).
//!
//! One request is in flight at a time. It is submitted without blocking and
//! its completion polled (the network is polled meanwhile); a request the
//! device does not finish within `REQUEST_TIMEOUT_MS` is reported, and left
//! in flight: it is checked again before the next request, which is skipped
//! until then. A read-only disk (VIRTIO_BLK_F_RO, or a write answered IOERR)
//! is reported once and not written again.

use virtio_drivers::Error;

use crate::arch::io::{pause, rdtsc};
use crate::blk::{Blk, Kind, Req};
use crate::cmdline::Config;
use crate::net::{fail, Net};
use crate::records::{self, BulkArea, SECTOR};
use crate::serial::{write_bytes, Line};
use crate::virtio::{alloc_pages, Mmio};

const REQUEST_TIMEOUT_MS: u64 = 1000;

/// The requests the disk workload makes; each has its own data buffer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Heartbeat n's sector record.
    Record,
    /// Reading it back (`disk_verify`).
    Readback,
    /// The flush after it (`disk_flush`).
    Flush,
    /// Round r's bulk write (`disk_bytes`).
    Bulk,
}

/// A request left in flight after its timeout.
#[derive(Clone, Copy)]
struct Pending {
    op: Op,
    token: u16,
    /// The heartbeat (the round for `Op::Bulk`) it was made for.
    n: u64,
}

/// The bulk writes' area and buffer (`area.sectors` sectors, DMA memory).
struct Bulk {
    area: BulkArea,
    buf: &'static mut [u8],
}

pub struct Disk {
    blk: Blk,
    capacity: u64,
    verify: bool,
    flush: bool,
    readonly: bool,
    /// Header and status, shared by all requests (one in flight at a time).
    req: Req,
    record: &'static mut [u8; SECTOR],
    readback: &'static mut [u8; SECTOR],
    bulk: Option<Bulk>,
    stuck: Option<Pending>,
    timeout_cycles: u64,
}

impl Disk {
    pub fn new(t: Mmio, cfg: &Config, tsc_khz: u64) -> Option<Disk> {
        let blk = match Blk::new(t) {
            Ok(b) => b,
            Err(e) => {
                fail("disk", e);
                return None;
            }
        };
        let Some(page) = alloc_pages(1) else {
            fail("disk", "DMA pool exhausted");
            return None;
        };
        let p = page.as_ptr();
        // SAFETY: one zeroed page of the pool, for this device alone, cut in
        // non-overlapping parts: two sectors at 0 and 512, the 16-byte
        // header at 1024 and the status byte at 1040.
        let (record, readback, req) = unsafe {
            (
                &mut *p.cast::<[u8; SECTOR]>(),
                &mut *p.add(SECTOR).cast::<[u8; SECTOR]>(),
                Req::new(p.add(1024).cast(), p.add(1040).cast()),
            )
        };
        let capacity = blk.capacity();
        let mut flush = cfg.disk_flush;
        if flush && !blk.can_flush() {
            fail(
                "disk_flush=on",
                "the device does not offer VIRTIO_BLK_F_FLUSH",
            );
            flush = false;
        }
        let bulk = if cfg.disk_bytes == 0 {
            None
        } else {
            Self::bulk(capacity, cfg.disk_bytes)
        };
        Some(Disk {
            readonly: blk.readonly(),
            blk,
            capacity,
            verify: cfg.disk_verify,
            flush,
            req,
            record,
            readback,
            bulk,
            stuck: None,
            timeout_cycles: REQUEST_TIMEOUT_MS * tsc_khz,
        })
    }

    /// The bulk area and its buffer, or None (with a warning) when the disk
    /// is too small for it or the DMA pool too.
    fn bulk(capacity: u64, bytes: u64) -> Option<Bulk> {
        let Some(area) = BulkArea::new(capacity, bytes) else {
            fail("disk_bytes", "the disk's second half cannot hold one write");
            return None;
        };
        let len = area.sectors as usize * SECTOR;
        let Some(pages) = alloc_pages(len.div_ceil(4096)) else {
            fail("disk_bytes", "DMA pool exhausted");
            return None;
        };
        // SAFETY: zeroed pages of the pool, for the bulk writes alone.
        let buf = unsafe { core::slice::from_raw_parts_mut(pages.as_ptr(), len) };
        Some(Bulk { area, buf })
    }

    /// `ftguest disk sectors=<n>`, then `ftguest disk readonly` if it is,
    /// and with `disk_bytes` the bulk area: `ftguest disk bulk lba=<first>
    /// sectors=<per write> slots=<writes that fit>`.
    pub fn print(&self) {
        let mut line = Line::new();
        line.push_str("ftguest disk sectors=");
        line.push_u64(self.capacity);
        line.push_str("\n");
        line.emit();
        if self.readonly {
            write_bytes(b"ftguest disk readonly\n");
        }
        if let Some(bulk) = &self.bulk {
            let mut line = Line::new();
            line.push_str("ftguest disk bulk lba=");
            line.push_u64(bulk.area.first);
            line.push_str(" sectors=");
            line.push_u64(bulk.area.sectors);
            line.push_str(" slots=");
            line.push_u64(bulk.area.slots);
            line.push_str("\n");
            line.emit();
        }
    }

    /// Writes heartbeat n's sector (reads it back with `disk_verify`, then
    /// flushes with `disk_flush`), polling `net` while waiting.
    pub fn heartbeat(&mut self, n: u64, mut net: Option<&mut Net>) {
        if self.readonly || self.capacity == 0 || !self.ready() {
            return;
        }
        let area = self
            .bulk
            .as_ref()
            .map_or(self.capacity, |b| b.area.records());
        let lba = records::sector_lba(n, area);
        records::sector_record(self.record, n);
        match self.run(Op::Record, lba, n, &mut net) {
            Some(Ok(())) => {}
            // The device refused the write: a read-only disk.
            Some(Err(Error::IoError)) => return self.refused(),
            Some(Err(e)) => return report(Op::Record, n, e),
            None => return,
        }
        if self.verify {
            self.readback.fill(0);
            match self.run(Op::Readback, lba, n, &mut net) {
                Some(Ok(())) if self.readback[..] != self.record[..] => {
                    report(Op::Readback, n, "readback mismatch")
                }
                Some(Ok(())) => {}
                Some(Err(e)) => report(Op::Readback, n, e),
                None => return,
            }
        }
        if self.flush {
            match self.run(Op::Flush, 0, n, &mut net) {
                Some(Ok(())) => {
                    let mut line = Line::new();
                    line.push_str("ftguest disk flushed hb=");
                    line.push_u64(n);
                    line.push_str("\n");
                    line.emit();
                }
                Some(Err(e)) => report(Op::Flush, n, e),
                None => {}
            }
        }
    }

    /// Round r's bulk write (with `disk_bytes`), polling `net` while waiting.
    pub fn round(&mut self, r: u64, mut net: Option<&mut Net>) {
        if self.bulk.is_none() || self.readonly || !self.ready() {
            return;
        }
        let Some(bulk) = &mut self.bulk else {
            return;
        };
        let lba = bulk.area.lba(r);
        for (i, sector) in bulk.buf.chunks_exact_mut(SECTOR).enumerate() {
            records::bulk_sector(sector, r, lba + i as u64);
        }
        match self.run(Op::Bulk, lba, r, &mut net) {
            Some(Ok(())) | None => {}
            Some(Err(Error::IoError)) => self.refused(),
            Some(Err(e)) => report(Op::Bulk, r, e),
        }
    }

    /// A write answered IOERR: the disk is read-only from now on.
    fn refused(&mut self) {
        self.readonly = true;
        write_bytes(b"ftguest disk readonly\n");
    }

    /// Whether a request may be made: none is left in flight, or the one
    /// left has completed by now (reported as a late completion).
    fn ready(&mut self) -> bool {
        let Some(p) = self.stuck else {
            return true;
        };
        if self.blk.peek_used() != Some(p.token) {
            return false;
        }
        self.stuck = None;
        let _ = self.complete(p.op, p.token);
        report(p.op, p.n, "late completion");
        true
    }

    /// Makes request `op` (for heartbeat or round `n`) at `lba` and polls
    /// for its completion; None after the timeout (the request is then left
    /// in flight as `stuck`, and reported).
    fn run(
        &mut self,
        op: Op,
        lba: u64,
        n: u64,
        net: &mut Option<&mut Net>,
    ) -> Option<Result<(), Error>> {
        let (blk, kind, req, data) = self.parts(op);
        // SAFETY: the parts are not touched until `complete`: only `run`
        // and `ready` make or complete requests, and neither makes one
        // while another is in flight.
        let token = match unsafe { blk.submit(kind, lba, req, data) } {
            Ok(t) => t,
            Err(e) => return Some(Err(e)),
        };
        let start = rdtsc();
        loop {
            match self.blk.peek_used() {
                Some(t) if t == token => return Some(self.complete(op, token)),
                // Not ours (cannot happen with one request in flight).
                Some(_) => return Some(Err(Error::WrongToken)),
                None => {}
            }
            if rdtsc().wrapping_sub(start) >= self.timeout_cycles {
                self.stuck = Some(Pending { op, token, n });
                report(op, n, "request timeout");
                return None;
            }
            if let Some(net) = net.as_deref_mut() {
                net.poll();
            }
            pause();
        }
    }

    fn complete(&mut self, op: Op, token: u16) -> Result<(), Error> {
        let (blk, kind, req, data) = self.parts(op);
        // SAFETY: `run` submitted `op` with these very parts for `token`.
        unsafe { blk.complete(token, kind, req, data) }
    }

    /// The device, and what `op` sends: its kind, the shared header and
    /// status, its data.
    fn parts(&mut self, op: Op) -> (&mut Blk, Kind, &mut Req, &mut [u8]) {
        let data: &mut [u8] = match op {
            Op::Record => &mut self.record[..],
            Op::Readback => &mut self.readback[..],
            Op::Flush => &mut [],
            Op::Bulk => match &mut self.bulk {
                Some(b) => &mut b.buf[..],
                None => &mut [],
            },
        };
        let kind = match op {
            Op::Record | Op::Bulk => Kind::Write,
            Op::Readback => Kind::Read,
            Op::Flush => Kind::Flush,
        };
        (&mut self.blk, kind, &mut self.req, data)
    }
}

/// `ftguest disk error hb=<n>: <what>`; a flush's `<what>` starts with
/// `flush `, and a bulk write's line is `ftguest disk error round=<r>: bulk
/// <what>`.
fn report(op: Op, n: u64, what: impl core::fmt::Display) {
    let (key, prefix) = match op {
        Op::Record | Op::Readback => ("hb=", ""),
        Op::Flush => ("hb=", "flush "),
        Op::Bulk => ("round=", "bulk "),
    };
    let mut line = Line::new();
    line.push_str("ftguest disk error ");
    line.push_str(key);
    line.push_u64(n);
    let _ = core::fmt::Write::write_fmt(&mut line, format_args!(": {prefix}{what}\n"));
    line.emit();
}
