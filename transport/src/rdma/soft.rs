//! A software RDMA fabric for tests: [`SoftProvider`] implements
//! [`Provider`] and [`Endpoint`] in-process, so the channel, its setup and
//! its keepalive run unchanged without a device.
//!
//! It is strict where a device is strict, so that the tests catch what a
//! device would reject or silently break:
//! - every scatter/gather element must lie inside a live registration of
//!   the poster's protection domain (its lkey), every RDMA WRITE inside a
//!   live, remotely writable registration of the peer's (its rkey);
//! - at most `send_wr` send requests may be outstanding (an unsignaled one
//!   is retired only by a later signaled completion being polled), at most
//!   `recv_wr` receives posted, `send_sge` elements and `inline` bytes per
//!   request; a completion queue that would overflow panics;
//! - a SEND that finds no receive posted is an RNR event (counted; the
//!   device would retry, here it waits for the next receive);
//! - both queue pairs must have been connected to each other with matching
//!   packet sequence numbers and port addresses before anything is sent;
//! - a queue pair in the error state flushes every request; sending to a
//!   broken or destroyed peer fails with "retry counter exceeded".
//!
//! Requests execute when posted (an infinitely fast wire).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use vmm_sys_util::eventfd::EventFd;

use super::fabric::{Access, Caps, Completion, Endpoint, Provider, Region, Remote, Sge, WcKind};
use super::fabric::{WC_SUCCESS, WC_WR_FLUSH_ERR};
use super::msg::{PortAddress, QpEndpoint};

const LOC_PROT_ERR: u32 = 4;
const REM_ACCESS_ERR: u32 = 10;
const LOC_LEN_ERR: u32 = 1;
const RETRY_EXC_ERR: u32 = 12;

/// What the fabric counted for one queue pair.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SoftStats {
    /// RDMA WRITEs executed.
    pub writes: u64,
    /// Bytes written by them.
    pub write_bytes: u64,
    /// SENDs delivered.
    pub sends: u64,
    /// SENDs that found no receive posted at the peer.
    pub rnr: u64,
    /// Most send requests outstanding at once.
    pub max_outstanding: u32,
}

#[derive(Debug)]
struct RegionInfo {
    pd: u32,
    addr: usize,
    len: usize,
    remote_write: bool,
}

struct Qp {
    pd: u32,
    port: PortAddress,
    caps: Caps,
    event: Arc<EventFd>,
    armed: bool,
    /// (peer qpn, its port as given to connect, our sq psn, our rq psn).
    conn: Option<(u32, PortAddress, u32, u32)>,
    error: bool,
    recvs: VecDeque<(Sge, u64)>,
    /// Completions, each with the send requests it retires when polled.
    cq: VecDeque<(Completion, u32)>,
    outstanding: u32,
    unsignaled: u32,
    /// SENDs from the peer waiting for a receive (RNR).
    held: VecDeque<Vec<u8>>,
}

#[derive(Default)]
struct Switch {
    next_id: u32,
    regions: HashMap<u32, RegionInfo>,
    qps: HashMap<u32, Qp>,
    stats: HashMap<u32, SoftStats>,
}

fn switch() -> MutexGuard<'static, Switch> {
    static SWITCH: OnceLock<Mutex<Switch>> = OnceLock::new();
    SWITCH
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

impl Switch {
    fn id(&mut self) -> u32 {
        self.next_id += 1;
        // 24-bit queue pair numbers, like a device's.
        self.next_id & 0xff_ffff
    }

    /// Pushes a completion on `qpn`'s queue, waking it if armed.
    fn complete(&mut self, qpn: u32, c: Completion, retire: u32) {
        let Some(qp) = self.qps.get_mut(&qpn) else {
            return;
        };
        let depth = (qp.caps.send_wr + qp.caps.recv_wr) as usize;
        assert!(qp.cq.len() < depth, "completion queue of QP {qpn} overrun");
        qp.cq.push_back((c, retire));
        if qp.armed {
            qp.armed = false;
            let _ = qp.event.write(1);
        }
    }

    fn fail(&mut self, qpn: u32, wr_id: u64, status: u32, kind: WcKind, retire: u32) {
        if let Some(qp) = self.qps.get_mut(&qpn) {
            qp.error = true;
        }
        self.complete(
            qpn,
            Completion {
                wr_id,
                status,
                kind,
                byte_len: 0,
            },
            retire,
        );
    }

    /// Checks that `sge` lies in a registration of protection domain `pd`.
    fn local_ok(&self, pd: u32, sge: &Sge) -> bool {
        self.regions.get(&sge.lkey).is_some_and(|r| {
            r.pd == pd
                && sge.addr as usize >= r.addr
                && sge.addr as usize + sge.len as usize <= r.addr + r.len
        })
    }

    /// The peer of `qpn` if both are connected to each other consistently.
    fn peer_of(&self, qpn: u32) -> Option<u32> {
        let me = self.qps.get(&qpn)?;
        let (peer, peer_port, sq_psn, _) = me.conn?;
        let p = self.qps.get(&peer)?;
        let (back, my_port, _, rq_psn) = p.conn?;
        (back == qpn && rq_psn == sq_psn && peer_port == p.port && my_port == me.port && !p.error)
            .then_some(peer)
    }

    /// Starts a send request on `qpn`: checks and takes a send queue slot.
    fn start(&mut self, qpn: u32) -> io::Result<()> {
        let qp = self.qps.get_mut(&qpn).expect("live QP");
        if qp.outstanding >= qp.caps.send_wr {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        qp.outstanding += 1;
        qp.unsignaled += 1;
        let max = qp.outstanding;
        let st = self.stats.entry(qpn).or_default();
        st.max_outstanding = st.max_outstanding.max(max);
        Ok(())
    }

    /// The send requests a completion generated now retires: this one and
    /// every unsignaled one before it.
    fn retire(&mut self, qpn: u32) -> u32 {
        let qp = self.qps.get_mut(&qpn).expect("live QP");
        std::mem::take(&mut qp.unsignaled)
    }

    /// Completes the send request just started with `status`.
    fn finish(&mut self, qpn: u32, wr_id: u64, status: u32, kind: WcKind) {
        let retire = self.retire(qpn);
        if status == WC_SUCCESS {
            self.complete(
                qpn,
                Completion {
                    wr_id,
                    status,
                    kind,
                    byte_len: 0,
                },
                retire,
            );
        } else {
            self.fail(qpn, wr_id, status, kind, retire);
        }
    }

    /// Delivers a SEND's bytes into `peer`'s next receive (or holds them).
    fn deliver(&mut self, peer: u32, data: Vec<u8>) {
        let qp = self.qps.get_mut(&peer).expect("peer checked");
        let Some((sge, wr_id)) = qp.recvs.pop_front() else {
            qp.held.push_back(data);
            return;
        };
        if data.len() > sge.len as usize {
            self.fail(peer, wr_id, LOC_LEN_ERR, WcKind::Recv, 0);
            return;
        }
        // SAFETY: post_recv's contract keeps the receive buffer valid and
        // untouched until its completion, and local_ok checked at post time
        // that it lies in a live registration.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), sge.addr as *mut u8, data.len());
        }
        self.complete(
            peer,
            Completion {
                wr_id,
                status: WC_SUCCESS,
                kind: WcKind::Recv,
                byte_len: data.len() as u32,
            },
            0,
        );
    }
}

/// An in-process "device" with its own protection domain.
pub struct SoftProvider {
    pd: u32,
    name: String,
    port: PortAddress,
    max_sge: u32,
}

impl SoftProvider {
    /// A new device (its own protection domain and port address).
    pub fn new() -> Arc<SoftProvider> {
        let pd = switch().id();
        let mut gid = [0u8; 16];
        gid[10] = 0xff;
        gid[11] = 0xff;
        gid[12..].copy_from_slice(&pd.to_be_bytes());
        Arc::new(SoftProvider {
            pd,
            name: format!("soft{pd}"),
            port: PortAddress {
                lid: 0,
                gid,
                global: true,
                mtu: 3,
            },
            max_sge: 8,
        })
    }

    /// Counters of queue pair `qpn`.
    pub fn stats(qpn: u32) -> SoftStats {
        switch().stats.get(&qpn).copied().unwrap_or_default()
    }

    /// Live registrations of this device.
    pub fn registrations(&self) -> usize {
        switch()
            .regions
            .values()
            .filter(|r| r.pd == self.pd)
            .count()
    }
}

struct SoftRegion {
    key: u32,
}

impl Region for SoftRegion {
    fn lkey(&self) -> u32 {
        self.key
    }
    fn rkey(&self) -> u32 {
        self.key
    }
}

impl Drop for SoftRegion {
    fn drop(&mut self) {
        switch().regions.remove(&self.key);
    }
}

impl Provider for SoftProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn port_address(&self) -> PortAddress {
        self.port
    }

    fn max_sge(&self) -> u32 {
        self.max_sge
    }

    unsafe fn register(
        &self,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> io::Result<Box<dyn Region>> {
        let remote_write = access == Access::RemoteWrite;
        let mut sw = switch();
        let key = sw.id();
        sw.regions.insert(
            key,
            RegionInfo {
                pd: self.pd,
                addr: addr as usize,
                len,
                remote_write,
            },
        );
        Ok(Box::new(SoftRegion { key }))
    }

    fn endpoint(&self, caps: Caps) -> io::Result<Box<dyn Endpoint>> {
        let event = Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?);
        let mut sw = switch();
        let qpn = sw.id();
        sw.qps.insert(
            qpn,
            Qp {
                pd: self.pd,
                port: self.port,
                caps,
                event: event.clone(),
                armed: false,
                conn: None,
                error: false,
                recvs: VecDeque::new(),
                cq: VecDeque::new(),
                outstanding: 0,
                unsignaled: 0,
                held: VecDeque::new(),
            },
        );
        Ok(Box::new(SoftEndpoint { qpn, event }))
    }
}

struct SoftEndpoint {
    qpn: u32,
    event: Arc<EventFd>,
}

impl Drop for SoftEndpoint {
    fn drop(&mut self) {
        switch().qps.remove(&self.qpn);
    }
}

impl SoftEndpoint {
    fn send_bytes(
        &self,
        data: &[u8],
        wr_id: u64,
        kind: WcKind,
        remote: Option<Remote>,
    ) -> io::Result<()> {
        let mut sw = switch();
        if data.len() > sw.qps[&self.qpn].caps.inline as usize {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        sw.start(self.qpn)?;
        if sw.qps[&self.qpn].error {
            sw.finish(self.qpn, wr_id, WC_WR_FLUSH_ERR, kind);
            return Ok(());
        }
        let Some(peer) = sw.peer_of(self.qpn) else {
            sw.finish(self.qpn, wr_id, RETRY_EXC_ERR, kind);
            return Ok(());
        };
        match remote {
            None => {
                let rnr = sw.qps[&peer].recvs.is_empty();
                let st = sw.stats.entry(self.qpn).or_default();
                st.sends += 1;
                st.rnr += u64::from(rnr);
                sw.deliver(peer, data.to_vec());
            }
            Some(r) => {
                if let Err(status) = write_remote(&sw, peer, r, data.len()) {
                    sw.finish(self.qpn, wr_id, status, kind);
                    return Ok(());
                }
                // SAFETY: write_remote checked that the target range lies in
                // a live, remotely writable registration of the peer, whose
                // owner accesses it through raw pointers only.
                unsafe {
                    std::ptr::copy_nonoverlapping(data.as_ptr(), r.addr as *mut u8, data.len());
                }
                let st = sw.stats.entry(self.qpn).or_default();
                st.writes += 1;
                st.write_bytes += data.len() as u64;
            }
        }
        sw.finish(self.qpn, wr_id, WC_SUCCESS, kind);
        Ok(())
    }
}

fn flushed(wr_id: u64, kind: WcKind) -> Completion {
    Completion {
        wr_id,
        status: WC_WR_FLUSH_ERR,
        kind,
        byte_len: 0,
    }
}

/// Checks an RDMA WRITE of `len` bytes to `r` at `peer`.
fn write_remote(sw: &Switch, peer: u32, r: Remote, len: usize) -> Result<(), u32> {
    let pd = sw.qps[&peer].pd;
    let ok = sw.regions.get(&r.rkey).is_some_and(|reg| {
        reg.pd == pd
            && reg.remote_write
            && r.addr as usize >= reg.addr
            && r.addr as usize + len <= reg.addr + reg.len
    });
    if ok {
        Ok(())
    } else {
        Err(REM_ACCESS_ERR)
    }
}

impl Endpoint for SoftEndpoint {
    fn qpn(&self) -> u32 {
        self.qpn
    }

    fn connect(&self, local_psn: u32, peer: &PortAddress, peer_qp: QpEndpoint) -> io::Result<()> {
        let mut sw = switch();
        let qp = sw.qps.get_mut(&self.qpn).expect("live QP");
        if qp.conn.is_some() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        qp.conn = Some((peer_qp.qpn, *peer, local_psn, peer_qp.psn));
        Ok(())
    }

    unsafe fn post_write(
        &self,
        sges: &[Sge],
        remote: Remote,
        wr_id: u64,
        signaled: bool,
    ) -> io::Result<()> {
        let mut sw = switch();
        let qp = &sw.qps[&self.qpn];
        if sges.len() > qp.caps.send_sge as usize {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let pd = qp.pd;
        sw.start(self.qpn)?;
        if sw.qps[&self.qpn].error {
            sw.finish(self.qpn, wr_id, WC_WR_FLUSH_ERR, WcKind::Write);
            return Ok(());
        }
        if let Some(bad) = sges.iter().find(|s| !sw.local_ok(pd, s)) {
            log::debug!("soft fabric: bad lkey or range {bad:?}");
            sw.finish(self.qpn, wr_id, LOC_PROT_ERR, WcKind::Write);
            return Ok(());
        }
        let Some(peer) = sw.peer_of(self.qpn) else {
            sw.finish(self.qpn, wr_id, RETRY_EXC_ERR, WcKind::Write);
            return Ok(());
        };
        let total: usize = sges.iter().map(|s| s.len as usize).sum();
        if let Err(status) = write_remote(&sw, peer, remote, total) {
            sw.finish(self.qpn, wr_id, status, WcKind::Write);
            return Ok(());
        }
        let mut at = remote.addr as usize;
        for s in sges {
            // SAFETY: the caller keeps every element valid until completion
            // (post_write's contract); local_ok and write_remote checked
            // both ranges against live registrations, and the peer accesses
            // its ring through raw pointers only.
            unsafe { std::ptr::copy(s.addr as *const u8, at as *mut u8, s.len as usize) };
            at += s.len as usize;
        }
        let st = sw.stats.entry(self.qpn).or_default();
        st.writes += 1;
        st.write_bytes += total as u64;
        if signaled {
            sw.finish(self.qpn, wr_id, WC_SUCCESS, WcKind::Write);
        }
        Ok(())
    }

    fn post_write_inline(&self, data: &[u8], remote: Remote, wr_id: u64) -> io::Result<()> {
        self.send_bytes(data, wr_id, WcKind::Write, Some(remote))
    }

    fn post_send_inline(&self, data: &[u8], wr_id: u64) -> io::Result<()> {
        self.send_bytes(data, wr_id, WcKind::Send, None)
    }

    unsafe fn post_recv(&self, sge: Sge, wr_id: u64) -> io::Result<()> {
        let mut sw = switch();
        let qp = &sw.qps[&self.qpn];
        let pd = qp.pd;
        if qp.recvs.len() >= qp.caps.recv_wr as usize {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        if qp.error {
            sw.complete(self.qpn, flushed(wr_id, WcKind::Recv), 0);
            return Ok(());
        }
        if !sw.local_ok(pd, &sge) {
            sw.fail(self.qpn, wr_id, LOC_PROT_ERR, WcKind::Recv, 0);
            return Ok(());
        }
        let qp = sw.qps.get_mut(&self.qpn).expect("live QP");
        qp.recvs.push_back((sge, wr_id));
        if let Some(data) = qp.held.pop_front() {
            sw.deliver(self.qpn, data);
        }
        Ok(())
    }

    fn poll(&self, out: &mut [Completion]) -> io::Result<usize> {
        let mut sw = switch();
        let qp = sw.qps.get_mut(&self.qpn).expect("live QP");
        let mut n = 0;
        while n < out.len() {
            let Some((c, retire)) = qp.cq.pop_front() else {
                break;
            };
            qp.outstanding -= retire;
            out[n] = c;
            n += 1;
        }
        Ok(n)
    }

    fn arm(&self) -> io::Result<()> {
        let mut sw = switch();
        let qp = sw.qps.get_mut(&self.qpn).expect("live QP");
        // Like a device: an event only for completions after the request.
        qp.armed = true;
        Ok(())
    }

    fn event_fd(&self) -> Option<RawFd> {
        Some(self.event.as_raw_fd())
    }

    fn take_events(&self) -> io::Result<()> {
        match self.event.read() {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn break_connection(&self) -> io::Result<()> {
        let mut sw = switch();
        let qp = sw.qps.get_mut(&self.qpn).expect("live QP");
        qp.error = true;
        let recvs: Vec<u64> = qp.recvs.drain(..).map(|(_, id)| id).collect();
        for id in recvs {
            sw.complete(self.qpn, flushed(id, WcKind::Recv), 0);
        }
        // A waiter learns of it even if nothing was outstanding.
        let _ = self.event.write(1);
        Ok(())
    }
}
