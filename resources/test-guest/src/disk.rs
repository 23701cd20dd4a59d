//! The disk workload over virtio-blk (`virtio_drivers::VirtIOBlk`): with
//! heartbeat n, the sector record of n (see `records`) at LBA
//! (n - 1) mod capacity; with `disk_verify=on` it is read back and compared.
//!
//! Requests are submitted without blocking and their completion is polled
//! (the network is polled meanwhile); a request the device does not finish
//! within `REQUEST_TIMEOUT_MS` is reported, and left in flight: it is
//! checked again before the next heartbeat, whose write is skipped until
//! then. A read-only disk (VIRTIO_BLK_F_RO, or a write answered IOERR) is
//! reported once and not written again.

use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk};
use virtio_drivers::Error;

use crate::arch::io::{pause, rdtsc};
use crate::net::{fail, Net};
use crate::records::{self, SECTOR};
use crate::serial::{write_bytes, Line};
use crate::virtio::{alloc_pages, GuestHal, Mmio};

const REQUEST_TIMEOUT_MS: u64 = 1000;

/// The request's parts, in DMA memory: header, data, status.
struct Request {
    req: &'static mut BlkReq,
    data: &'static mut [u8; SECTOR],
    resp: &'static mut BlkResp,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Write,
    Read,
}

pub struct Disk {
    dev: VirtIOBlk<GuestHal, Mmio>,
    capacity: u64,
    verify: bool,
    readonly: bool,
    write: Request,
    read: Request,
    /// A request still in flight after its timeout: (op, token, heartbeat).
    stuck: Option<(Op, u16, u64)>,
    timeout_cycles: u64,
}

impl Disk {
    pub fn new(t: Mmio, verify: bool, tsc_khz: u64) -> Option<Disk> {
        let dev = match VirtIOBlk::<GuestHal, Mmio>::new(t) {
            Ok(d) => d,
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
        // non-overlapping, suitably aligned parts: two sectors at 0 and 512,
        // two 16-byte headers at 1024 and 1040, two status bytes at 1056/1057.
        // All-zero bytes are valid for each type (BlkReq's ReqType 0 is In).
        let (write, read) = unsafe {
            (
                Request {
                    data: &mut *p.cast(),
                    req: &mut *p.add(1024).cast(),
                    resp: &mut *p.add(1056).cast(),
                },
                Request {
                    data: &mut *p.add(512).cast(),
                    req: &mut *p.add(1040).cast(),
                    resp: &mut *p.add(1057).cast(),
                },
            )
        };
        let mut disk = Disk {
            capacity: dev.capacity(),
            readonly: dev.readonly(),
            dev,
            verify,
            write,
            read,
            stuck: None,
            timeout_cycles: REQUEST_TIMEOUT_MS * tsc_khz,
        };
        disk.dev.disable_interrupts();
        Some(disk)
    }

    /// `ftguest disk sectors=<n>`, then `ftguest disk readonly` if it is.
    pub fn print(&self) {
        let mut line = Line::new();
        line.push_str("ftguest disk sectors=");
        line.push_u64(self.capacity);
        line.push_str("\n");
        line.emit();
        if self.readonly {
            write_bytes(b"ftguest disk readonly\n");
        }
    }

    /// Writes heartbeat n's sector (and reads it back with `disk_verify`),
    /// polling `net` while waiting.
    pub fn heartbeat(&mut self, n: u64, mut net: Option<&mut Net>) {
        if self.readonly || self.capacity == 0 {
            return;
        }
        if let Some((op, token, hb)) = self.stuck {
            if self.dev.peek_used() != Some(token) {
                return;
            }
            self.stuck = None;
            let _ = self.complete(op, token);
            error_line(hb, "late completion");
        }
        let lba = records::sector_lba(n, self.capacity);
        records::sector_record(self.write.data, n);
        // SAFETY: the request parts are not touched until `complete`.
        let token = unsafe {
            self.dev.write_blocks_nb(
                lba as usize,
                self.write.req,
                self.write.data,
                self.write.resp,
            )
        };
        let token = match token {
            Ok(t) => t,
            Err(e) => return error_line(n, e),
        };
        match self.wait(Op::Write, token, n, &mut net) {
            Some(Ok(())) => {}
            Some(Err(Error::IoError)) => {
                // The device refused the write: a read-only disk.
                self.readonly = true;
                write_bytes(b"ftguest disk readonly\n");
                return;
            }
            Some(Err(e)) => return error_line(n, e),
            None => return,
        }
        if !self.verify {
            return;
        }
        self.read.data.fill(0);
        // SAFETY: as for the write.
        let token = unsafe {
            self.dev
                .read_blocks_nb(lba as usize, self.read.req, self.read.data, self.read.resp)
        };
        let token = match token {
            Ok(t) => t,
            Err(e) => return error_line(n, e),
        };
        match self.wait(Op::Read, token, n, &mut net) {
            Some(Ok(())) if self.read.data[..] != self.write.data[..] => {
                error_line(n, "readback mismatch")
            }
            Some(Ok(())) | None => {}
            Some(Err(e)) => error_line(n, e),
        }
    }

    /// Polls for `token`'s completion; None after the timeout (the request
    /// is then left in flight as `stuck`).
    fn wait(
        &mut self,
        op: Op,
        token: u16,
        n: u64,
        net: &mut Option<&mut Net>,
    ) -> Option<Result<(), Error>> {
        let start = rdtsc();
        loop {
            match self.dev.peek_used() {
                Some(t) if t == token => return Some(self.complete(op, token)),
                Some(_) => {
                    // Not ours (cannot happen with one request in flight).
                    return Some(Err(Error::WrongToken));
                }
                None => {}
            }
            if rdtsc().wrapping_sub(start) >= self.timeout_cycles {
                self.stuck = Some((op, token, n));
                error_line(n, "request timeout");
                return None;
            }
            if let Some(net) = net.as_deref_mut() {
                net.poll();
            }
            pause();
        }
    }

    fn complete(&mut self, op: Op, token: u16) -> Result<(), Error> {
        let r = match op {
            Op::Write => &mut self.write,
            Op::Read => &mut self.read,
        };
        // SAFETY: the parts handed over with `token` by write/read_blocks_nb.
        unsafe {
            match op {
                Op::Write => self.dev.complete_write_blocks(token, r.req, r.data, r.resp),
                Op::Read => self.dev.complete_read_blocks(token, r.req, r.data, r.resp),
            }
        }
    }
}

/// `ftguest disk error hb=<n>: <what>`.
fn error_line(n: u64, what: impl core::fmt::Display) {
    let mut line = Line::new();
    line.push_str("ftguest disk error hb=");
    line.push_u64(n);
    let _ = core::fmt::Write::write_fmt(&mut line, format_args!(": {what}\n"));
    line.emit();
}
