//! Memory the RDMA channel owns and registers: its receive ring, its send
//! bounce ring, the buffers of control messages and the keepalive slot.
//!
//! Each is an anonymous mapping (page-aligned, zeroed) registered once for
//! the channel's life. The registration is dropped before the mapping, so
//! the device never holds a key to unmapped memory. Memory the peer may
//! write (the receive ring, the keepalive slot) is only read through raw
//! pointers or atomics, never through Rust references that would assume it
//! does not change underneath.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

use super::fabric::{Access, Provider, Region, Sge};

/// An anonymous private mapping of `len` bytes.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain memory; the owner decides who reads and writes it, and
// every access goes through raw pointers or atomics (see the module docs).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        assert!(len > 0);
        // SAFETY: a fresh anonymous mapping at an address the kernel picks;
        // nothing else is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).expect("mmap never returns NULL on success");
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; its registration (if any)
        // was dropped first (field order of RegisteredBuf).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Owned, registered memory.
pub struct RegisteredBuf {
    // Field order is drop order: deregister, then unmap.
    region: Box<dyn Region>,
    mem: Mapping,
}

impl RegisteredBuf {
    /// Maps `len` zeroed bytes and registers them on `provider` for
    /// `access`.
    pub fn new(provider: &dyn Provider, len: usize, access: Access) -> io::Result<RegisteredBuf> {
        let mem = Mapping::new(len)?;
        // SAFETY: the mapping lives in this struct and is unmapped only
        // after the registration is dropped.
        let region = unsafe { provider.register(mem.ptr.as_ptr(), len, access) }.map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOMEM) {
                // Registration pins the pages: the usual cause.
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "{} registering {len} bytes (registered memory is pinned and counts \
                         against RLIMIT_MEMLOCK: see `ulimit -l`)",
                        crate::error::io_msg(&e)
                    ),
                )
            } else {
                e
            }
        })?;
        Ok(RegisteredBuf { region, mem })
    }

    /// Start of the memory.
    pub fn ptr(&self) -> *mut u8 {
        self.mem.ptr.as_ptr()
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.mem.len
    }

    /// Its address as the device sees it.
    pub fn addr(&self) -> u64 {
        self.ptr() as u64
    }

    /// The registration's local key.
    pub fn lkey(&self) -> u32 {
        self.region.lkey()
    }

    /// The registration's remote key.
    pub fn rkey(&self) -> u32 {
        self.region.rkey()
    }

    /// An element over `[off, off + len)`.
    pub fn sge(&self, off: usize, len: usize) -> Sge {
        assert!(off + len <= self.len(), "element inside the buffer");
        Sge {
            addr: self.addr() + off as u64,
            len: u32::try_from(len).expect("element under 4 GiB"),
            lkey: self.lkey(),
        }
    }

    /// Copies `len` bytes at `off` into `dst` (raw: the peer may be
    /// writing other parts of the buffer meanwhile).
    pub fn copy_out(&self, off: usize, dst: &mut [u8]) {
        assert!(off + dst.len() <= self.len(), "copy inside the buffer");
        // SAFETY: the range lies inside our mapping (checked above) and
        // `dst` is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr().add(off), dst.as_mut_ptr(), dst.len()) }
    }

    /// Copies `src` to `off` (memory no device request is reading now).
    pub fn copy_in(&self, off: usize, src: &[u8]) {
        assert!(off + src.len() <= self.len(), "copy inside the buffer");
        // SAFETY: as in copy_out, the other way.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr().add(off), src.len()) }
    }

    /// Runs `f` on the bytes `[off, off + len)` as a mutable slice.
    ///
    /// # Safety
    /// No device request may read or write that range, and nothing else
    /// may access it, while `f` runs.
    pub unsafe fn with_slice_mut<R>(
        &self,
        off: usize,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> R {
        assert!(off + len <= self.len(), "slice inside the buffer");
        // SAFETY: in bounds; exclusivity for the call is the caller's promise.
        f(unsafe { std::slice::from_raw_parts_mut(self.ptr().add(off), len) })
    }

    /// The 8-byte word at offset 0, as an atomic (the keepalive slot,
    /// which the peer's device writes at any time).
    pub fn word(&self) -> &AtomicU64 {
        // SAFETY: the mapping is page-aligned and at least 8 bytes; an
        // AtomicU64 may be modified concurrently by other agents, which is
        // what the peer's RDMA writes are; it lives as long as `self`.
        unsafe { &*self.ptr().cast::<AtomicU64>() }
    }
}
