//! Helpers and mocks shared by the unit tests (loopback only).

use std::io::{self, IoSlice};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use ftvmm_checkpoint::{DevicesSummary, GuestShape, Limits, Staging, StagingConfig, PAGE_SIZE};

use crate::channel::write_all_chunks;
use crate::{Channel, TransportError};

/// A tiny deterministic PRNG, so tests need no dependency.
pub(crate) struct XorShift(u64);

impl XorShift {
    pub(crate) fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// `len` pseudo-random bytes.
pub(crate) fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut r = XorShift::new(seed);
    (0..len).map(|_| r.next() as u8).collect()
}

/// A connected pair of plain TCP streams on 127.0.0.1.
pub(crate) fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect_timeout(&l.local_addr().unwrap(), Duration::from_secs(5)).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

/// A writer for [`crate::channel::write_all_chunks`] that takes a random
/// amount of what it is offered (often ending mid-slice), fails every fifth
/// call with `EINTR`, and, if told to, fails with `EPIPE` once `fail_after`
/// bytes went through. It checks that it is never offered an empty slice and,
/// when `allowed` is set, that every slice lies inside one of those memory
/// ranges (the sender copied nothing).
pub(crate) struct Dribble {
    rng: XorShift,
    pub(crate) sink: Vec<u8>,
    pub(crate) calls: u64,
    pub(crate) interrupted: u64,
    pub(crate) max_offered: usize,
    pub(crate) fail_after: Option<usize>,
    pub(crate) allowed: Vec<std::ops::Range<usize>>,
}

impl Dribble {
    pub(crate) fn new(seed: u64) -> Self {
        Dribble {
            rng: XorShift::new(seed),
            sink: Vec::new(),
            calls: 0,
            interrupted: 0,
            max_offered: 0,
            fail_after: None,
            allowed: Vec::new(),
        }
    }

    pub(crate) fn write(&mut self, iov: &[IoSlice<'_>]) -> io::Result<usize> {
        self.calls += 1;
        self.max_offered = self.max_offered.max(iov.len());
        for s in iov {
            assert!(!s.is_empty(), "empty slice offered");
            let start = s.as_ptr() as usize;
            assert!(
                self.allowed.is_empty()
                    || self
                        .allowed
                        .iter()
                        .any(|r| r.start <= start && start + s.len() <= r.end),
                "a slice of {} bytes at {start:#x} is not the sender's memory: copied",
                s.len()
            );
        }
        if self.calls % 5 == 0 {
            self.interrupted += 1;
            return Err(io::Error::from_raw_os_error(libc::EINTR));
        }
        let room = match self.fail_after {
            Some(limit) if self.sink.len() >= limit => {
                return Err(io::Error::from_raw_os_error(libc::EPIPE))
            }
            Some(limit) => limit - self.sink.len(),
            None => usize::MAX,
        };
        let offered: usize = iov.iter().map(|s| s.len()).sum();
        let mut take = (1 + (self.rng.next() as usize % offered.min(20_000))).min(room);
        let n = take;
        for s in iov {
            let k = take.min(s.len());
            self.sink.extend_from_slice(&s[..k]);
            take -= k;
            if take == 0 {
                break;
            }
        }
        Ok(n)
    }
}

/// An in-memory [`Channel`] whose sends go through a [`Dribble`] (short
/// writes, `EINTR`) and whose receives read back what was sent: for tests of
/// the trait's provided methods.
pub(crate) struct LoopbackChannel {
    pub(crate) dribble: Dribble,
    read_pos: usize,
}

impl LoopbackChannel {
    pub(crate) const PEER: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9);

    pub(crate) fn new(dribble: Dribble) -> Self {
        LoopbackChannel {
            dribble,
            read_pos: 0,
        }
    }
}

impl Channel for LoopbackChannel {
    fn send_chunks(
        &mut self,
        chunks: &mut dyn Iterator<Item = &[u8]>,
    ) -> Result<u64, TransportError> {
        write_all_chunks(chunks, |iov| self.dribble.write(iov))
            .map(|out| out.bytes)
            .map_err(|source| TransportError::Send {
                addr: Self::PEER,
                source,
            })
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        let rest = &self.dribble.sink[self.read_pos..];
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.read_pos += n;
        Ok(n)
    }

    fn recv_exact(&mut self, buf: &mut [u8]) -> Result<(), TransportError> {
        let got = self.recv(buf)?;
        if got < buf.len() {
            return Err(TransportError::Closed {
                addr: Self::PEER,
                got,
                wanted: buf.len(),
            });
        }
        Ok(())
    }

    fn set_read_timeout(&mut self, _: Option<Duration>) -> Result<(), TransportError> {
        Ok(())
    }

    fn set_write_timeout(&mut self, _: Option<Duration>) -> Result<(), TransportError> {
        Ok(())
    }

    fn shutdown(&self) -> Result<(), TransportError> {
        Ok(())
    }

    fn try_clone(&self) -> Result<Self, TransportError> {
        Err(TransportError::Clone {
            addr: Self::PEER,
            source: io::ErrorKind::Unsupported.into(),
        })
    }

    fn peer_addr(&self) -> SocketAddr {
        Self::PEER
    }
}

/// A checkpoint staged in slabs of one page each (so its frame has more
/// chunks than one send window), `pages` pages and `state_len` state bytes,
/// every byte derived from its position.
pub(crate) fn staged_checkpoint(pages: usize, state_len: usize) -> Staging {
    let mut st = Staging::new(StagingConfig {
        slab_bytes: PAGE_SIZE,
        ..StagingConfig::for_guest((pages as u64 + 1) * PAGE_SIZE as u64)
    })
    .unwrap();
    let mut w = st.begin_epoch();
    for p in 0..pages {
        let page = pattern(PAGE_SIZE, p as u64);
        w.stage_page((p * PAGE_SIZE) as u64, page.as_slice().try_into().unwrap())
            .unwrap();
    }
    w.stage_state(&pattern(state_len, 1 << 32)).unwrap();
    w.finish();
    st
}

/// Limits under which a receiver accepts [`staged_checkpoint`]`(pages, _)`.
pub(crate) fn receiver_limits(pages: usize) -> Limits {
    let shape = GuestShape {
        mem_bytes: (pages as u64 + 1) * PAGE_SIZE as u64,
        vcpus: 1,
        cmdline: String::new(),
        devices: DevicesSummary::default(),
    };
    Limits::for_shape(&shape, u64::MAX, 1 << 20).unwrap()
}
