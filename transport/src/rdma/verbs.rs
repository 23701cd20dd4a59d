//! Safe RAII wrappers over libibverbs (through `rdma-sys`), and
//! [`VerbsProvider`], the real `Provider` / `Endpoint`.
//!
//! Every verbs object is owned by one wrapper that releases it on drop, and
//! holds an `Arc` of what it was made from, so objects are destroyed
//! children first (queue pair → completion queue → completion channel;
//! memory region → protection domain → device context) whatever the order
//! the owners drop them in. This is the only module with `unsafe` calls
//! into libibverbs; each says why it holds.
//!
//! Verbs conventions (rdma-core man pages): constructors return NULL and
//! set `errno`; `ibv_modify_qp`, `ibv_post_send`, `ibv_post_recv`,
//! `ibv_req_notify_cq`, `ibv_query_*` return 0 or the errno value itself;
//! `ibv_poll_cq` returns the number of completions or a negative value.
//! "By default all verbs objects are safe for multi-threaded access"
//! (ibv_alloc_td(3)), which is what the `Send`/`Sync` impls rely on.

use std::ffi::CStr;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;
use std::ptr::{self, NonNull};
use std::sync::Arc;

use rdma_sys::{
    _compat_ibv_port_attr, ibv_access_flags, ibv_ack_cq_events, ibv_alloc_pd, ibv_close_device,
    ibv_comp_channel, ibv_context, ibv_cq, ibv_create_comp_channel, ibv_create_cq, ibv_create_qp,
    ibv_dealloc_pd, ibv_dereg_mr, ibv_destroy_comp_channel, ibv_destroy_cq, ibv_destroy_qp,
    ibv_device, ibv_device_attr, ibv_free_device_list, ibv_get_cq_event, ibv_get_device_list,
    ibv_get_device_name, ibv_gid, ibv_modify_qp, ibv_mr, ibv_mtu, ibv_open_device, ibv_pd,
    ibv_poll_cq, ibv_port_attr, ibv_port_state, ibv_post_recv, ibv_post_send, ibv_qp, ibv_qp_attr,
    ibv_qp_attr_mask, ibv_qp_init_attr, ibv_qp_state, ibv_qp_type, ibv_query_device, ibv_query_gid,
    ibv_query_port, ibv_recv_wr, ibv_reg_mr, ibv_req_notify_cq, ibv_send_flags, ibv_send_wr,
    ibv_sge, ibv_wc, ibv_wc_opcode, ibv_wr_opcode,
};

use super::fabric::{Access, Caps, Completion, Endpoint, Provider, Region, Remote, Sge, WcKind};
use super::msg::{PortAddress, QpEndpoint};
use super::{RdmaConfig, RdmaError};

/// `IBV_LINK_LAYER_ETHERNET` (an anonymous enum in verbs.h that bindgen
/// does not export; its value is 2 in every rdma-core release).
const LINK_LAYER_ETHERNET: u8 = 2;

/// A zeroed plain C struct.
///
/// # Safety
/// `T` must be a C struct of integers, pointers and unions of those, for
/// which all-zero bytes are a valid value (every verbs attribute struct).
unsafe fn zeroed<T>() -> T {
    // SAFETY: the caller guarantees all-zero is a valid T.
    unsafe { MaybeUninit::<T>::zeroed().assume_init() }
}

/// `Err` from a verb that returns 0 or an errno value.
fn check(rc: i32) -> io::Result<()> {
    match rc {
        0 => Ok(()),
        // Some providers return -1 and set errno instead.
        rc if rc < 0 => Err(io::Error::last_os_error()),
        rc => Err(io::Error::from_raw_os_error(rc)),
    }
}

/// The RDMA devices present (`ibv_get_device_list`).
pub struct DeviceList {
    list: NonNull<*mut ibv_device>,
    len: usize,
}

impl DeviceList {
    /// Lists the devices. A system without kernel RDMA support (`ENOSYS`)
    /// has none.
    pub fn new() -> io::Result<DeviceList> {
        let mut n: i32 = 0;
        // SAFETY: `n` is a valid out-pointer; the returned array is ours
        // until ibv_free_device_list (in Drop).
        let list = unsafe { ibv_get_device_list(&mut n) };
        match NonNull::new(list) {
            Some(list) => Ok(DeviceList {
                list,
                len: usize::try_from(n).unwrap_or(0),
            }),
            None => Err(io::Error::last_os_error()),
        }
    }

    fn device(&self, i: usize) -> *mut ibv_device {
        assert!(i < self.len);
        // SAFETY: the array holds `len` device pointers (then a NULL).
        unsafe { *self.list.as_ptr().add(i) }
    }

    /// The devices' names, in order.
    pub fn names(&self) -> Vec<String> {
        (0..self.len)
            .map(|i| {
                // SAFETY: a device of the live list; the name is a
                // NUL-terminated string owned by the device, copied here.
                let name = unsafe { ibv_get_device_name(self.device(i)) };
                if name.is_null() {
                    return format!("device{i}");
                }
                // SAFETY: non-NULL, NUL-terminated, alive while the list is.
                unsafe { CStr::from_ptr(name) }
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    /// Opens device `i`; the context stays valid after the list is freed
    /// (ibv_get_device_list(3)).
    pub fn open(&self, i: usize, name: String) -> io::Result<Context> {
        // SAFETY: a device of the live list.
        let ctx = unsafe { ibv_open_device(self.device(i)) };
        NonNull::new(ctx)
            .map(|ctx| Context { ctx, name })
            .ok_or_else(io::Error::last_os_error)
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the array came from ibv_get_device_list and is freed once;
        // opened contexts do not depend on it.
        unsafe { ibv_free_device_list(self.list.as_ptr()) }
    }
}

/// An opened device (`ibv_open_device`).
pub struct Context {
    ctx: NonNull<ibv_context>,
    name: String,
}

// SAFETY: verbs objects are safe for multi-threaded access (ibv_alloc_td(3));
// the wrapper holds no Rust state besides the pointer and an owned name.
unsafe impl Send for Context {}
// SAFETY: as above; every method takes &self and calls thread-safe verbs.
unsafe impl Sync for Context {}

impl Context {
    /// The device's attributes.
    pub fn query_device(&self) -> io::Result<ibv_device_attr> {
        // SAFETY: ibv_device_attr is a plain C struct.
        let mut attr: ibv_device_attr = unsafe { zeroed() };
        // SAFETY: live context, valid out-pointer.
        check(unsafe { ibv_query_device(self.ctx.as_ptr(), &mut attr) })?;
        Ok(attr)
    }

    /// A port's attributes.
    pub fn query_port(&self, port: u8) -> io::Result<ibv_port_attr> {
        // SAFETY: ibv_port_attr is a plain C struct.
        let mut attr: ibv_port_attr = unsafe { zeroed() };
        // SAFETY: the exported ibv_query_port fills the compat prefix of
        // ibv_port_attr (state … link_layer, flags), exactly what verbs.h's
        // own inline wrapper does when the provider has no extended query:
        // it passes the zeroed full struct, cast. We read only prefix fields.
        check(unsafe {
            ibv_query_port(
                self.ctx.as_ptr(),
                port,
                (&mut attr as *mut ibv_port_attr).cast::<_compat_ibv_port_attr>(),
            )
        })?;
        Ok(attr)
    }

    /// GID `index` of `port`.
    pub fn query_gid(&self, port: u8, index: i32) -> io::Result<[u8; 16]> {
        // SAFETY: ibv_gid is a 16-byte union of integers.
        let mut gid: ibv_gid = unsafe { zeroed() };
        // SAFETY: live context, valid out-pointer.
        check(unsafe { ibv_query_gid(self.ctx.as_ptr(), port, index, &mut gid) })?;
        // SAFETY: every bit pattern of the union is a valid byte array.
        Ok(unsafe { gid.raw })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every child object holds an Arc<Context>, so none is
        // alive any more; the context is closed once.
        let rc = unsafe { ibv_close_device(self.ctx.as_ptr()) };
        if rc != 0 {
            log::warn!(
                "RDMA device '{}': ibv_close_device failed ({rc})",
                self.name
            );
        }
    }
}

/// A protection domain (`ibv_alloc_pd`).
pub struct ProtectionDomain {
    pd: NonNull<ibv_pd>,
    ctx: Arc<Context>,
}

// SAFETY: verbs objects are safe for multi-threaded access (ibv_alloc_td(3)).
unsafe impl Send for ProtectionDomain {}
// SAFETY: as above.
unsafe impl Sync for ProtectionDomain {}

impl ProtectionDomain {
    /// Allocates one on `ctx`.
    pub fn new(ctx: Arc<Context>) -> io::Result<ProtectionDomain> {
        // SAFETY: live context.
        let pd = unsafe { ibv_alloc_pd(ctx.ctx.as_ptr()) };
        NonNull::new(pd)
            .map(|pd| ProtectionDomain { pd, ctx })
            .ok_or_else(io::Error::last_os_error)
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: memory regions and queue pairs hold an Arc of this domain,
        // so none is alive; deallocated once.
        let rc = unsafe { ibv_dealloc_pd(self.pd.as_ptr()) };
        if rc != 0 {
            log::warn!(
                "RDMA device '{}': ibv_dealloc_pd failed ({rc})",
                self.ctx.name
            );
        }
    }
}

/// A memory registration (`ibv_reg_mr`); dropping it deregisters.
pub struct MemoryRegion {
    mr: NonNull<ibv_mr>,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: verbs objects are safe for multi-threaded access; the keys are
// read-only after registration.
unsafe impl Send for MemoryRegion {}
// SAFETY: as above.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// Registers `len` bytes at `addr` with `access` (`IBV_ACCESS_*`).
    ///
    /// # Safety
    /// The memory must stay mapped until the region is dropped.
    pub unsafe fn new(
        pd: Arc<ProtectionDomain>,
        addr: *mut u8,
        len: usize,
        access: ibv_access_flags,
    ) -> io::Result<MemoryRegion> {
        // SAFETY: live PD; the caller keeps the memory mapped while the
        // registration exists. (verbs.h's ibv_reg_mr macro calls this
        // exported function whenever IBV_ACCESS_OPTIONAL_RANGE is not set.)
        let mr = unsafe { ibv_reg_mr(pd.pd.as_ptr(), addr.cast(), len, access.0 as i32) };
        NonNull::new(mr)
            .map(|mr| MemoryRegion { mr, _pd: pd })
            .ok_or_else(io::Error::last_os_error)
    }
}

impl Region for MemoryRegion {
    fn lkey(&self) -> u32 {
        // SAFETY: a live MR; lkey is set at registration and never changes.
        unsafe { (*self.mr.as_ptr()).lkey }
    }

    fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.mr.as_ptr()).rkey }
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: deregistered once; requests using it have completed (the
        // channel waits for completions before dropping registrations, or
        // has moved its queue pair to the error state).
        let rc = unsafe { ibv_dereg_mr(self.mr.as_ptr()) };
        if rc != 0 {
            log::warn!("ibv_dereg_mr failed ({rc})");
        }
    }
}

/// A completion event channel (`ibv_create_comp_channel`), non-blocking.
pub struct CompChannel {
    ch: NonNull<ibv_comp_channel>,
    _ctx: Arc<Context>,
}

// SAFETY: verbs objects are safe for multi-threaded access.
unsafe impl Send for CompChannel {}
// SAFETY: as above.
unsafe impl Sync for CompChannel {}

impl CompChannel {
    /// Creates one and makes its descriptor non-blocking, so events are
    /// waited for in epoll and taken without blocking.
    pub fn new(ctx: Arc<Context>) -> io::Result<CompChannel> {
        // SAFETY: live context.
        let ch = unsafe { ibv_create_comp_channel(ctx.ctx.as_ptr()) };
        let ch = NonNull::new(ch)
            .map(|ch| CompChannel { ch, _ctx: ctx })
            .ok_or_else(io::Error::last_os_error)?;
        let fd = ch.fd();
        // SAFETY: fcntl on a descriptor the channel owns, with valid flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ch)
    }

    /// Its descriptor (readable when an event is pending).
    pub fn fd(&self) -> RawFd {
        // SAFETY: a live channel; fd is fixed at creation.
        unsafe { (*self.ch.as_ptr()).fd }
    }

    /// Takes and acknowledges every pending event (never blocks).
    fn take_events(&self) -> io::Result<()> {
        loop {
            let mut cq: *mut ibv_cq = ptr::null_mut();
            let mut cq_ctx: *mut libc::c_void = ptr::null_mut();
            // SAFETY: live channel, valid out-pointers; non-blocking fd.
            let rc = unsafe { ibv_get_cq_event(self.ch.as_ptr(), &mut cq, &mut cq_ctx) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(()),
                    _ => Err(e),
                };
            }
            // SAFETY: `cq` is the live CQ the event is for (ours: it holds
            // an Arc of this channel); every event got is acked, as
            // ibv_destroy_cq requires.
            unsafe { ibv_ack_cq_events(cq, 1) };
        }
    }
}

impl Drop for CompChannel {
    fn drop(&mut self) {
        // SAFETY: CQs using it hold an Arc of it, so none is left.
        let rc = unsafe { ibv_destroy_comp_channel(self.ch.as_ptr()) };
        if rc != 0 {
            log::warn!("ibv_destroy_comp_channel failed ({rc})");
        }
    }
}

/// A completion queue (`ibv_create_cq`).
pub struct CompletionQueue {
    cq: NonNull<ibv_cq>,
    /// Kept alive as long as the CQ that reports to it.
    _channel: Option<Arc<CompChannel>>,
    _ctx: Arc<Context>,
}

// SAFETY: verbs objects are safe for multi-threaded access.
unsafe impl Send for CompletionQueue {}
// SAFETY: as above.
unsafe impl Sync for CompletionQueue {}

impl CompletionQueue {
    /// A queue of at least `cqe` entries, with events on `channel`.
    pub fn new(
        ctx: Arc<Context>,
        cqe: i32,
        channel: Option<Arc<CompChannel>>,
    ) -> io::Result<CompletionQueue> {
        let ch = channel.as_ref().map_or(ptr::null_mut(), |c| c.ch.as_ptr());
        // SAFETY: live context and channel (or NULL: no events).
        let cq = unsafe { ibv_create_cq(ctx.ctx.as_ptr(), cqe, ptr::null_mut(), ch, 0) };
        NonNull::new(cq)
            .map(|cq| CompletionQueue {
                cq,
                _channel: channel,
                _ctx: ctx,
            })
            .ok_or_else(io::Error::last_os_error)
    }

    /// Polls up to `out.len()` completions.
    pub fn poll(&self, out: &mut [ibv_wc]) -> io::Result<usize> {
        let n = i32::try_from(out.len()).unwrap_or(i32::MAX);
        // SAFETY: live CQ; `out` has room for `n` entries (ibv_wc's layout
        // is checked against verbs.h in the tests).
        let rc = unsafe { ibv_poll_cq(self.cq.as_ptr(), n, out.as_mut_ptr()) };
        usize::try_from(rc).map_err(|_| io::Error::other(format!("ibv_poll_cq failed ({rc})")))
    }

    /// Requests an event for the next completion.
    pub fn arm(&self) -> io::Result<()> {
        // SAFETY: live CQ.
        check(unsafe { ibv_req_notify_cq(self.cq.as_ptr(), 0) })
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: queue pairs using it hold an Arc of it, so none is left;
        // every event was acked in take_events.
        let rc = unsafe { ibv_destroy_cq(self.cq.as_ptr()) };
        if rc != 0 {
            log::warn!("ibv_destroy_cq failed ({rc})");
        }
    }
}

/// A reliable-connected queue pair (`ibv_create_qp`, `IBV_QPT_RC`).
pub struct QueuePair {
    qp: NonNull<ibv_qp>,
    _cq: Arc<CompletionQueue>,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: verbs objects are safe for multi-threaded access.
unsafe impl Send for QueuePair {}
// SAFETY: as above.
unsafe impl Sync for QueuePair {}

impl QueuePair {
    /// An RC queue pair whose send and receive completions both go to
    /// `cq`; only signaled sends complete (`sq_sig_all = 0`).
    pub fn new(
        pd: Arc<ProtectionDomain>,
        cq: Arc<CompletionQueue>,
        caps: Caps,
    ) -> io::Result<QueuePair> {
        // SAFETY: ibv_qp_init_attr is a plain C struct.
        let mut init: ibv_qp_init_attr = unsafe { zeroed() };
        init.send_cq = cq.cq.as_ptr();
        init.recv_cq = cq.cq.as_ptr();
        init.cap.max_send_wr = caps.send_wr;
        init.cap.max_recv_wr = caps.recv_wr;
        init.cap.max_send_sge = caps.send_sge;
        init.cap.max_recv_sge = 1;
        init.cap.max_inline_data = caps.inline;
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        // SAFETY: live PD and CQ; `init` is valid for the call (the
        // provider may raise the caps it writes back).
        let qp = unsafe { ibv_create_qp(pd.pd.as_ptr(), &mut init) };
        NonNull::new(qp)
            .map(|qp| QueuePair {
                qp,
                _cq: cq,
                _pd: pd,
            })
            .ok_or_else(io::Error::last_os_error)
    }

    /// The queue pair number.
    pub fn qpn(&self) -> u32 {
        // SAFETY: a live QP; qp_num is fixed at creation.
        unsafe { (*self.qp.as_ptr()).qp_num }
    }

    /// `ibv_modify_qp` with `attr` and `mask`.
    pub fn modify(&self, attr: &mut ibv_qp_attr, mask: ibv_qp_attr_mask) -> io::Result<()> {
        // SAFETY: live QP; `attr` is valid for the call.
        check(unsafe { ibv_modify_qp(self.qp.as_ptr(), attr, mask.0 as i32) })
    }

    /// RESET → INIT on `port`, with remote writes allowed into our
    /// registrations (those that allow them).
    pub fn to_init(&self, port: u8) -> io::Result<()> {
        // SAFETY: plain C struct.
        let mut a: ibv_qp_attr = unsafe { zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = port;
        a.qp_access_flags = ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        self.modify(
            &mut a,
            ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
                | ibv_qp_attr_mask::IBV_QP_PORT
                | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS,
        )
    }

    /// INIT → RTR → RTS (the attributes ibv_modify_qp(3) requires for RC).
    pub fn to_rts(
        &self,
        port: u8,
        sgid_index: u8,
        local: &PortAddress,
        local_psn: u32,
        peer: &PortAddress,
        peer_qp: QpEndpoint,
    ) -> io::Result<()> {
        // SAFETY: plain C struct.
        let mut a: ibv_qp_attr = unsafe { zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = ibv_mtu::Type::from(local.mtu.min(peer.mtu));
        a.dest_qp_num = peer_qp.qpn;
        a.rq_psn = peer_qp.psn;
        // No RDMA READs or atomics are used; 1 is the least every device takes.
        a.max_dest_rd_atomic = 1;
        // 0.64 ms before a sender retries after "receiver not ready"
        // (encoding 12 of the IB spec's RNR timer table).
        a.min_rnr_timer = 12;
        a.ah_attr.dlid = peer.lid;
        a.ah_attr.sl = 0;
        a.ah_attr.src_path_bits = 0;
        a.ah_attr.port_num = port;
        if peer.global {
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid.raw = peer.gid;
            a.ah_attr.grh.sgid_index = sgid_index;
            a.ah_attr.grh.hop_limit = 64;
            a.ah_attr.grh.traffic_class = 0;
            a.ah_attr.grh.flow_label = 0;
        }
        self.modify(
            &mut a,
            ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_AV
                | ibv_qp_attr_mask::IBV_QP_PATH_MTU
                | ibv_qp_attr_mask::IBV_QP_DEST_QPN
                | ibv_qp_attr_mask::IBV_QP_RQ_PSN
                | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
                | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER,
        )?;
        // SAFETY: plain C struct.
        let mut a: ibv_qp_attr = unsafe { zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTS;
        a.sq_psn = local_psn;
        // Local ACK timeout 4.096 µs × 2^14 ≈ 67 ms, 7 retries: a peer that
        // vanished fails our sends after about half a second (the
        // heartbeats and keepalive notice sooner).
        a.timeout = 14;
        a.retry_cnt = 7;
        // 7: retry "receiver not ready" forever (our credits keep receives
        // posted; a stuck peer is left to the failure detector).
        a.rnr_retry = 7;
        a.max_rd_atomic = 1;
        self.modify(
            &mut a,
            ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_SQ_PSN
                | ibv_qp_attr_mask::IBV_QP_TIMEOUT
                | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
                | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
                | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC,
        )
    }

    /// Any state → ERR: outstanding requests are flushed.
    pub fn to_error(&self) -> io::Result<()> {
        // SAFETY: plain C struct.
        let mut a: ibv_qp_attr = unsafe { zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_ERR;
        self.modify(&mut a, ibv_qp_attr_mask::IBV_QP_STATE)
    }

    /// Posts one send work request.
    ///
    /// # Safety
    /// `wr`'s scatter/gather elements must satisfy [`Endpoint::post_write`]'s
    /// contract (or the request is inline).
    unsafe fn post(&self, wr: &mut ibv_send_wr) -> io::Result<()> {
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: live QP; `wr` and its sg_list are valid for the call (the
        // provider copies the request, or the inline data, into its queue).
        check(unsafe { ibv_post_send(self.qp.as_ptr(), wr, &mut bad) })
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: destroyed once; the CQ and PD it uses outlive it (Arcs).
        let rc = unsafe { ibv_destroy_qp(self.qp.as_ptr()) };
        if rc != 0 {
            log::warn!("ibv_destroy_qp failed ({rc})");
        }
    }
}

/// A send work request with no scatter/gather list yet.
fn send_wr(wr_id: u64, opcode: u32, flags: ibv_send_flags) -> ibv_send_wr {
    // SAFETY: ibv_send_wr is a plain C struct of integers, pointers and
    // unions of those.
    let mut wr: ibv_send_wr = unsafe { zeroed() };
    wr.wr_id = wr_id;
    wr.opcode = opcode;
    wr.send_flags = flags.0;
    wr
}

/// One port of an opened device, its protection domain, and what the
/// peer needs to reach it: the real `Provider`.
pub struct VerbsProvider {
    ctx: Arc<Context>,
    pd: Arc<ProtectionDomain>,
    port: u8,
    sgid_index: u8,
    address: PortAddress,
    max_sge: u32,
}

impl VerbsProvider {
    /// Opens the device `cfg` names (or the first one), checks its port is
    /// active and picks the GID to be addressed by.
    pub fn open(cfg: &RdmaConfig) -> Result<VerbsProvider, RdmaError> {
        let list = match DeviceList::new() {
            Ok(l) => Some(l),
            // No kernel RDMA support at all: no device.
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => None,
            Err(source) => return Err(RdmaError::List { source }),
        };
        let names = list.as_ref().map(DeviceList::names).unwrap_or_default();
        let index =
            match &cfg.device {
                None if names.is_empty() => return Err(RdmaError::NoDevice),
                None => 0,
                Some(want) => names.iter().position(|n| n == want).ok_or_else(|| {
                    RdmaError::DeviceNotFound {
                        wanted: want.clone(),
                        found: names.clone(),
                    }
                })?,
            };
        let device = names[index].clone();
        let verb = |what: &'static str| {
            let device = device.clone();
            move |source| RdmaError::Verb {
                device,
                what,
                source,
            }
        };
        let list = list.expect("a device was found, so there is a list");
        let ctx = Arc::new(
            list.open(index, device.clone())
                .map_err(verb("open the device"))?,
        );
        drop(list);
        let dev = ctx.query_device().map_err(verb("query the device"))?;
        if cfg.port == 0 || cfg.port > dev.phys_port_cnt {
            return Err(RdmaError::NoPort {
                device,
                port: cfg.port,
                ports: dev.phys_port_cnt,
            });
        }
        let attr = ctx.query_port(cfg.port).map_err(verb("query its port"))?;
        if attr.state != ibv_port_state::IBV_PORT_ACTIVE {
            return Err(RdmaError::PortDown {
                device,
                port: cfg.port,
                state: port_state_name(attr.state),
            });
        }
        let ethernet = attr.link_layer == LINK_LAYER_ETHERNET;
        let gid_index = match cfg.gid_index {
            Some(i) => Some(i),
            None if ethernet => {
                let gids = (0..attr.gid_tbl_len.clamp(0, 256))
                    .map(|i| ctx.gid_entry(cfg.port, i))
                    .collect::<Vec<_>>();
                pick_gid(&gids)
            }
            None => None,
        };
        let (global, sgid_index, gid) = match gid_index {
            Some(i) => {
                let gid = ctx
                    .query_gid(cfg.port, i32::from(i))
                    .map_err(verb("read the GID"))?;
                if gid == [0; 16] {
                    return Err(RdmaError::NoGid {
                        device,
                        port: cfg.port,
                    });
                }
                (true, i, gid)
            }
            None if ethernet => {
                return Err(RdmaError::NoGid {
                    device,
                    port: cfg.port,
                })
            }
            None => (false, 0, [0; 16]),
        };
        let pd = Arc::new(
            ProtectionDomain::new(ctx.clone()).map_err(verb("allocate a protection domain"))?,
        );
        log::info!(
            "RDMA device '{device}' port {}: {} link, lid {}, mtu {}, {}",
            cfg.port,
            if ethernet {
                "Ethernet (RoCE)"
            } else {
                "InfiniBand"
            },
            attr.lid,
            128u32 << attr.active_mtu,
            if global {
                format!("GID index {sgid_index}")
            } else {
                "no GID".to_string()
            }
        );
        Ok(VerbsProvider {
            ctx,
            pd,
            port: cfg.port,
            sgid_index,
            address: PortAddress {
                lid: attr.lid,
                gid,
                global,
                mtu: attr.active_mtu.clamp(1, 5) as u8,
            },
            max_sge: u32::try_from(dev.max_sge).unwrap_or(1).max(1),
        })
    }
}

/// One entry of a port's GID table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GidEntry {
    /// The GID (all zero: an empty entry).
    pub gid: [u8; 16],
    /// Whether it is a RoCE v2 GID; `None` where the library cannot say.
    pub roce_v2: Option<bool>,
}

/// The GID a RoCE port is addressed by when none is configured: the first
/// IPv4-mapped RoCE v2 one (`::ffff:a.b.c.d` over UDP, routable, what
/// soft-RoCE and most RoCE setups use), else the first IPv4-mapped one,
/// else the first non-zero one. Both sides apply the same rule.
pub fn pick_gid(gids: &[GidEntry]) -> Option<u8> {
    let v4 = |e: &GidEntry| e.gid[..10] == [0; 10] && e.gid[10..12] == [0xff, 0xff];
    gids.iter()
        .position(|e| v4(e) && e.roce_v2 == Some(true))
        .or_else(|| gids.iter().position(v4))
        .or_else(|| gids.iter().position(|e| e.gid != [0; 16]))
        .and_then(|i| u8::try_from(i).ok())
}

extern "C" {
    /// What verbs.h's inline `ibv_query_gid_ex` calls (rdma-core 32 and
    /// later); rdma-sys does not bind it (its name starts with `_`).
    fn _ibv_query_gid_ex(
        context: *mut ibv_context,
        port_num: u32,
        gid_index: u32,
        entry: *mut rdma_sys::ibv_gid_entry,
        flags: u32,
        entry_size: usize,
    ) -> i32;
}

impl Context {
    /// GID table entry `index` of `port` with its type, where the library
    /// can tell it; else the bare GID.
    fn gid_entry(&self, port: u8, index: i32) -> GidEntry {
        // SAFETY: ibv_gid_entry is a plain C struct.
        let mut e: rdma_sys::ibv_gid_entry = unsafe { zeroed() };
        // SAFETY: live context; `e` is a valid out-buffer of the size passed.
        let rc = unsafe {
            _ibv_query_gid_ex(
                self.ctx.as_ptr(),
                u32::from(port),
                index as u32,
                &mut e,
                0,
                std::mem::size_of::<rdma_sys::ibv_gid_entry>(),
            )
        };
        if rc == 0 {
            return GidEntry {
                // SAFETY: every bit pattern of the union is a byte array.
                gid: unsafe { e.gid.raw },
                roce_v2: Some(e.gid_type == rdma_sys::IBV_GID_TYPE_ROCE_V2),
            };
        }
        // An empty entry (ENODATA) or a provider without the extended query.
        GidEntry {
            gid: self.query_gid(port, index).unwrap_or([0; 16]),
            roce_v2: None,
        }
    }
}

fn port_state_name(state: u32) -> &'static str {
    match state {
        ibv_port_state::IBV_PORT_DOWN => "DOWN",
        ibv_port_state::IBV_PORT_INIT => "INIT",
        ibv_port_state::IBV_PORT_ARMED => "ARMED",
        ibv_port_state::IBV_PORT_ACTIVE_DEFER => "ACTIVE_DEFER",
        _ => "NOP",
    }
}

impl Provider for VerbsProvider {
    fn name(&self) -> &str {
        self.ctx.name()
    }

    fn port_address(&self) -> PortAddress {
        self.address
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
        let access = match access {
            // Local read is always enabled (ibv_reg_mr(3)).
            Access::Read => ibv_access_flags(0),
            Access::Write => ibv_access_flags::IBV_ACCESS_LOCAL_WRITE,
            // Remote write needs local write too (ibv_reg_mr(3)).
            Access::RemoteWrite => {
                ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            }
        };
        // SAFETY: the caller keeps the memory mapped until the region drops.
        let mr = unsafe { MemoryRegion::new(self.pd.clone(), addr, len, access)? };
        Ok(Box::new(mr))
    }

    fn endpoint(&self, caps: Caps) -> io::Result<Box<dyn Endpoint>> {
        let channel = if caps.events {
            Some(Arc::new(CompChannel::new(self.ctx.clone())?))
        } else {
            None
        };
        let cqe = (caps.send_wr + caps.recv_wr) as i32;
        let cq = Arc::new(CompletionQueue::new(
            self.ctx.clone(),
            cqe,
            channel.clone(),
        )?);
        let qp = QueuePair::new(self.pd.clone(), cq.clone(), caps)?;
        qp.to_init(self.port)?;
        Ok(Box::new(VerbsEndpoint {
            qp,
            cq,
            channel,
            port: self.port,
            sgid_index: self.sgid_index,
            local: self.address,
        }))
    }
}

/// A queue pair with its completion queue (and event channel).
struct VerbsEndpoint {
    // Field order is drop order: the QP before its CQ before the channel.
    qp: QueuePair,
    cq: Arc<CompletionQueue>,
    channel: Option<Arc<CompChannel>>,
    port: u8,
    sgid_index: u8,
    local: PortAddress,
}

impl Endpoint for VerbsEndpoint {
    fn qpn(&self) -> u32 {
        self.qp.qpn()
    }

    fn connect(&self, local_psn: u32, peer: &PortAddress, peer_qp: QpEndpoint) -> io::Result<()> {
        self.qp.to_rts(
            self.port,
            self.sgid_index,
            &self.local,
            local_psn,
            peer,
            peer_qp,
        )
    }

    unsafe fn post_write(
        &self,
        sges: &[Sge],
        remote: Remote,
        wr_id: u64,
        signaled: bool,
    ) -> io::Result<()> {
        let mut list: Vec<ibv_sge> = sges
            .iter()
            .map(|s| ibv_sge {
                addr: s.addr,
                length: s.len,
                lkey: s.lkey,
            })
            .collect();
        let flags = if signaled {
            ibv_send_flags::IBV_SEND_SIGNALED
        } else {
            ibv_send_flags(0)
        };
        let mut wr = send_wr(wr_id, ibv_wr_opcode::IBV_WR_RDMA_WRITE, flags);
        wr.sg_list = list.as_mut_ptr();
        wr.num_sge = list.len() as i32;
        wr.wr.rdma.remote_addr = remote.addr;
        wr.wr.rdma.rkey = remote.rkey;
        // SAFETY: the caller keeps the elements' memory valid until the
        // completion (this function's contract); `list` lives for the call.
        unsafe { self.qp.post(&mut wr) }
    }

    fn post_write_inline(&self, data: &[u8], remote: Remote, wr_id: u64) -> io::Result<()> {
        let mut sge = ibv_sge {
            addr: data.as_ptr() as u64,
            length: data.len() as u32,
            lkey: 0,
        };
        let mut wr = send_wr(
            wr_id,
            ibv_wr_opcode::IBV_WR_RDMA_WRITE,
            ibv_send_flags::IBV_SEND_SIGNALED | ibv_send_flags::IBV_SEND_INLINE,
        );
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.wr.rdma.remote_addr = remote.addr;
        wr.wr.rdma.rkey = remote.rkey;
        // SAFETY: IBV_SEND_INLINE: the data is copied into the send queue
        // during the call and may be reused at once (ibv_post_send(3)); the
        // lkey is not checked.
        unsafe { self.qp.post(&mut wr) }
    }

    fn post_send_inline(&self, data: &[u8], wr_id: u64) -> io::Result<()> {
        let mut sge = ibv_sge {
            addr: data.as_ptr() as u64,
            length: data.len() as u32,
            lkey: 0,
        };
        let mut wr = send_wr(
            wr_id,
            ibv_wr_opcode::IBV_WR_SEND,
            ibv_send_flags::IBV_SEND_SIGNALED | ibv_send_flags::IBV_SEND_INLINE,
        );
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        // SAFETY: inline, as in post_write_inline.
        unsafe { self.qp.post(&mut wr) }
    }

    unsafe fn post_recv(&self, sge: Sge, wr_id: u64) -> io::Result<()> {
        let mut list = ibv_sge {
            addr: sge.addr,
            length: sge.len,
            lkey: sge.lkey,
        };
        let mut wr = ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &mut list,
            num_sge: 1,
        };
        let mut bad: *mut ibv_recv_wr = ptr::null_mut();
        // SAFETY: live QP; the caller keeps the buffer valid until the
        // receive completes; `wr` and `list` live for the call.
        check(unsafe { ibv_post_recv(self.qp.qp.as_ptr(), &mut wr, &mut bad) })
    }

    fn poll(&self, out: &mut [Completion]) -> io::Result<usize> {
        // SAFETY: ibv_wc is a plain C struct.
        let mut wc: [ibv_wc; 16] = unsafe { zeroed() };
        let n = out.len().min(wc.len());
        let got = self.cq.poll(&mut wc[..n])?;
        for (o, w) in out.iter_mut().zip(&wc[..got]) {
            *o = Completion {
                wr_id: w.wr_id,
                status: w.status,
                kind: match w.opcode {
                    ibv_wc_opcode::IBV_WC_SEND => WcKind::Send,
                    ibv_wc_opcode::IBV_WC_RDMA_WRITE => WcKind::Write,
                    ibv_wc_opcode::IBV_WC_RECV => WcKind::Recv,
                    other => WcKind::Other(other),
                },
                byte_len: w.byte_len,
            };
        }
        Ok(got)
    }

    fn arm(&self) -> io::Result<()> {
        self.cq.arm()
    }

    fn event_fd(&self) -> Option<RawFd> {
        self.channel.as_ref().map(|c| c.fd())
    }

    fn take_events(&self) -> io::Result<()> {
        match &self.channel {
            Some(c) => c.take_events(),
            None => Ok(()),
        }
    }

    fn break_connection(&self) -> io::Result<()> {
        self.qp.to_error()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// rdma-sys writes these structs by hand (bindgen cannot do their
    /// unions); their layout must be verbs.h's. The figures were measured
    /// with offsetof/sizeof against rdma-core 44's verbs.h on x86_64.
    #[test]
    fn hand_written_structs_match_verbs_h() {
        assert_eq!(size_of::<ibv_wc>(), 48);
        assert_eq!(offset_of!(ibv_wc, status), 8);
        assert_eq!(offset_of!(ibv_wc, opcode), 12);
        assert_eq!(offset_of!(ibv_wc, byte_len), 20);
        assert_eq!(offset_of!(ibv_wc, qp_num), 28);
        assert_eq!(offset_of!(ibv_wc, wc_flags), 36);
        assert_eq!(size_of::<ibv_send_wr>(), 128);
        assert_eq!(offset_of!(ibv_send_wr, sg_list), 16);
        assert_eq!(offset_of!(ibv_send_wr, num_sge), 24);
        assert_eq!(offset_of!(ibv_send_wr, opcode), 28);
        assert_eq!(offset_of!(ibv_send_wr, send_flags), 32);
        assert_eq!(offset_of!(ibv_send_wr, wr), 40);
        assert_eq!(offset_of!(ibv_send_wr, qp_type), 72);
        assert_eq!(size_of::<rdma_sys::ibv_ah_attr>(), 32);
        assert_eq!(offset_of!(rdma_sys::ibv_ah_attr, dlid), 24);
        assert_eq!(offset_of!(rdma_sys::ibv_ah_attr, is_global), 29);
        assert_eq!(offset_of!(rdma_sys::ibv_ah_attr, port_num), 30);
        assert_eq!(size_of::<rdma_sys::ibv_global_route>(), 24);
        assert_eq!(offset_of!(rdma_sys::ibv_global_route, sgid_index), 20);
        assert_eq!(size_of::<ibv_qp_attr>(), 144);
        assert_eq!(offset_of!(ibv_qp_attr, ah_attr), 56);
        assert_eq!(offset_of!(ibv_qp_attr, timeout), 130);
        assert_eq!(offset_of!(ibv_qp_attr, rnr_retry), 132);
        assert_eq!(size_of::<ibv_qp_init_attr>(), 64);
        assert_eq!(offset_of!(ibv_qp_init_attr, qp_type), 52);
        assert_eq!(size_of::<ibv_port_attr>(), 52);
        assert_eq!(offset_of!(ibv_port_attr, lid), 34);
        assert_eq!(offset_of!(ibv_port_attr, link_layer), 46);
        assert_eq!(offset_of!(ibv_port_attr, gid_tbl_len), 12);
        assert_eq!(size_of::<ibv_gid>(), 16);
    }

    #[test]
    fn status_names_match_the_library() {
        for status in 0..24u32 {
            // SAFETY: ibv_wc_status_str returns a static string for any value.
            let s = unsafe { CStr::from_ptr(rdma_sys::ibv_wc_status_str(status)) };
            assert_eq!(
                super::super::wc_status_name(status),
                s.to_str().unwrap(),
                "status {status}"
            );
        }
    }

    #[test]
    fn gid_choice_prefers_routable_ipv4_mapped_then_any() {
        let e = |gid: [u8; 16], roce_v2| GidEntry { gid, roce_v2 };
        let mut link_local = [0u8; 16];
        link_local[..2].copy_from_slice(&[0xfe, 0x80]);
        link_local[15] = 1;
        let mut v4 = [0u8; 16];
        v4[10..12].copy_from_slice(&[0xff, 0xff]);
        v4[12..].copy_from_slice(&[10, 0, 0, 1]);
        // mlx5's order: v1 and v2 of the link-local, then of each address.
        let mlx = [
            e(link_local, Some(false)),
            e(link_local, Some(true)),
            e(v4, Some(false)),
            e(v4, Some(true)),
        ];
        assert_eq!(pick_gid(&mlx), Some(3));
        // Type unknown (an old provider): the first IPv4-mapped one.
        assert_eq!(
            pick_gid(&[e(link_local, None), e([0; 16], None), e(v4, None)]),
            Some(2)
        );
        assert_eq!(pick_gid(&[e([0; 16], None), e(link_local, None)]), Some(1));
        assert_eq!(pick_gid(&[e([0; 16], Some(true))]), None);
        assert_eq!(pick_gid(&[]), None);
    }

    #[test]
    fn gid_entry_layout_matches_verbs_h() {
        assert_eq!(size_of::<rdma_sys::ibv_gid_entry>(), 32);
        assert_eq!(offset_of!(rdma_sys::ibv_gid_entry, gid_type), 24);
    }

    /// On these hosts there is no RDMA device: opening one must say so in
    /// one line, never panic. (Where a device exists this test only checks
    /// that opening it works or fails with a typed error.)
    #[test]
    fn opening_without_a_device_is_a_clear_error() {
        match VerbsProvider::open(&RdmaConfig::default()) {
            Ok(p) => eprintln!("RDMA device present: {}", p.name()),
            Err(e) => {
                let line = e.to_string();
                assert!(!line.contains('\n'), "{line}");
                eprintln!("{line}");
            }
        }
        let err = VerbsProvider::open(&RdmaConfig {
            device: Some("no-such-rdma-device".into()),
            ..RdmaConfig::default()
        })
        .err()
        .expect("no device has that name");
        assert!(
            err.to_string().contains("no-such-rdma-device") || matches!(err, RdmaError::NoDevice),
            "{err}"
        );
    }
}
