use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use ftvmm_checkpoint::test_utils::PersistPair;
use ftvmm_checkpoint::{persist_roundtrip_tests, Persist};

use super::*;
use crate::bus::BusDevice;
use crate::virtio::mmio::{regs, status, MmioTransport, VirtioMmioDevice};
use crate::virtio::test_utils::*;
use crate::virtio::Quiesce;

const T: Duration = Duration::from_secs(5);
const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];

/// A socketpair behaving like a tap: one frame (with its 12-byte header)
/// per message. Returns (device end as a Tap, test end).
fn fake_tap(name: &str) -> (Tap, std::fs::File) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    (Tap::from_fd(a, name), std::fs::File::from(b))
}

struct Fixture {
    mem: GuestMemory,
    dev: VirtioMmioDevice<Net>,
    transport: Arc<Mutex<MmioTransport<Net>>>,
    irq: EventFd,
    rx: TestQueue,
    tx: TestQueue,
    peer: std::fs::File,
}

fn fixture(sink: Option<Box<dyn FrameSink>>) -> Fixture {
    let (tap, peer) = fake_tap("fake0");
    let mem = test_mem(1 << 20);
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let dev = VirtioMmioDevice::new(
        Net::new(tap, MAC, sink).unwrap(),
        mem.clone(),
        irq.try_clone().unwrap(),
    )
    .unwrap();
    let transport = dev.transport();
    let rx = TestQueue::new(0x1000, 16);
    let tx = TestQueue::new(0x3000, 16);
    let st = activate(
        &mut *transport.lock().unwrap(),
        crate::virtio::features::VERSION_1 | crate::virtio::features::NET_MAC,
        &[&rx, &tx],
    );
    assert_eq!(st & status::DRIVER_OK, status::DRIVER_OK);
    Fixture {
        mem,
        dev,
        transport,
        irq,
        rx,
        tx,
        peer,
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8) ^ seed).collect()
}

fn peer_send(peer: &std::fs::File, frame: &[u8]) {
    use std::io::Write;
    let mut msg = vec![0u8; VNET_HDR_LEN];
    msg.extend_from_slice(frame);
    (&*peer).write_all(&msg).unwrap();
}

fn notify(f: &Fixture, q: u32) {
    w32(&mut *f.transport.lock().unwrap(), regs::QUEUE_NOTIFY, q);
}

#[test]
fn config_space_holds_the_mac() {
    let f = fixture(None);
    let mut t = f.transport.lock().unwrap();
    let mut mac = [0u8; 6];
    t.read(regs::CONFIG, &mut mac);
    assert_eq!(mac, MAC);
    assert_eq!(r32(&mut *t, regs::DEVICE_ID), 1);
    let mut st = [0u8; 2];
    t.read(regs::CONFIG + 6, &mut st);
    assert_eq!(u16::from_le_bytes(st), 1);
}

#[test]
fn default_mac_is_local_unicast_and_stable() {
    let a = default_mac("ftap0");
    assert_eq!(a[0], 0x02);
    assert_eq!(a, default_mac("ftap0"));
    assert_ne!(a, default_mac("ftap1"));
}

#[test]
fn rx_delivers_frames_into_guest_memory_and_marks_them_dirty() {
    let mut f = fixture(None);
    // A frame arrives before the guest has buffers: it waits.
    let fr = frame(100, 0x5a);
    peer_send(&f.peer, &fr);
    f.rx.add_chain(&f.mem, &[(0x20000, 6, true), (0x24000, 2000, true)]);
    clear_dirty(&f.mem);
    notify(&f, 0);
    assert!(wait_used(&f.mem, &f.rx, 1, &f.irq, T));
    let (_, len) = f.rx.used_elem(&f.mem, 0);
    assert_eq!(len as usize, VNET_HDR_LEN + fr.len());
    let mut hdr = [0u8; 12];
    f.mem
        .read_slice(&mut hdr[..6], GuestAddress(0x20000))
        .unwrap();
    f.mem
        .read_slice(&mut hdr[6..], GuestAddress(0x24000))
        .unwrap();
    assert_eq!(&hdr[..10], &[0; 10]);
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1);
    let mut got = vec![0u8; fr.len()];
    f.mem.read_slice(&mut got, GuestAddress(0x24006)).unwrap();
    assert_eq!(got, fr);
    // DESIGN I3: the RX buffers and the used ring were written through
    // vm-memory and are dirty; an untouched page is not.
    assert!(is_dirty(&f.mem, 0x20000));
    assert!(is_dirty(&f.mem, 0x24000));
    assert!(is_dirty(&f.mem, f.rx.used));
    assert!(!is_dirty(&f.mem, 0x30000));
    // A second frame with a buffer already posted comes straight through.
    f.rx.add_chain(&f.mem, &[(0x28000, 2048, true)]);
    notify(&f, 0);
    let fr2 = frame(1500, 0x11);
    peer_send(&f.peer, &fr2);
    assert!(wait_used(&f.mem, &f.rx, 2, &f.irq, T));
    let mut got = vec![0u8; fr2.len()];
    f.mem
        .read_slice(&mut got, GuestAddress(0x28000 + 12))
        .unwrap();
    assert_eq!(got, fr2);
    // A frame bigger than the buffer is dropped, the buffer returned empty.
    f.rx.add_chain(&f.mem, &[(0x2c000, 64, true)]);
    notify(&f, 0);
    peer_send(&f.peer, &frame(200, 1));
    assert!(wait_used(&f.mem, &f.rx, 3, &f.irq, T));
    assert_eq!(f.rx.used_elem(&f.mem, 2).1, 0);
    let m = f.dev.with_device(|d| d.metrics());
    assert_eq!(m.rx_frames.load(Ordering::Relaxed), 2);
    assert_eq!(m.rx_dropped.load(Ordering::Relaxed), 1);
}

#[test]
fn tx_goes_to_the_tap_with_a_header() {
    use std::io::Read;
    let mut f = fixture(None);
    let fr = frame(60, 0x33);
    f.mem
        .write_slice(&[0u8; 12], GuestAddress(0x40000))
        .unwrap();
    f.mem.write_slice(&fr, GuestAddress(0x41000)).unwrap();
    f.tx.add_chain(&f.mem, &[(0x40000, 12, false), (0x41000, 60, false)]);
    notify(&f, 1);
    assert!(wait_used(&f.mem, &f.tx, 1, &f.irq, T));
    let mut buf = [0u8; 256];
    let n = (&f.peer).read(&mut buf).unwrap();
    assert_eq!(n, 12 + 60);
    assert_eq!(&buf[12..n], &fr[..]);
}

struct Collect(Arc<Mutex<Vec<Vec<u8>>>>);
impl FrameSink for Collect {
    fn send(&mut self, frame: &[u8]) {
        self.0.lock().unwrap().push(frame.to_vec());
    }
}

#[test]
fn every_tx_frame_goes_through_the_sink_in_order() {
    let got = Arc::new(Mutex::new(Vec::new()));
    let mut f = fixture(Some(Box::new(Collect(got.clone()))));
    for i in 0..5u8 {
        let base = 0x40000 + u64::from(i) * 0x1000;
        let mut buf = vec![0u8; 12];
        buf.extend(frame(64 + i as usize, i));
        f.mem.write_slice(&buf, GuestAddress(base)).unwrap();
        f.tx.add_chain(&f.mem, &[(base, buf.len() as u32, false)]);
    }
    // A malformed chain (a writable descriptor) is consumed, not sent.
    f.tx.add_chain(&f.mem, &[(0x50000, 100, true)]);
    notify(&f, 1);
    assert!(wait_used(&f.mem, &f.tx, 6, &f.irq, T));
    let got = got.lock().unwrap();
    assert_eq!(got.len(), 5);
    for (i, fr) in got.iter().enumerate() {
        assert_eq!(fr, &frame(64 + i, i as u8));
    }
    assert_eq!(
        f.dev
            .with_device(|d| d.metrics())
            .tx_malformed
            .load(Ordering::Relaxed),
        1
    );
}

#[test]
fn rx_input_waits_while_paused() {
    let mut f = fixture(None);
    f.rx.add_chain(&f.mem, &[(0x20000, 2048, true)]);
    notify(&f, 0);
    f.dev.pause(T).unwrap();
    peer_send(&f.peer, &frame(80, 9));
    assert!(!wait_evt(&f.irq, Duration::from_millis(200)));
    assert_eq!(f.rx.used_idx(&f.mem), 0);
    f.dev.resume();
    assert!(wait_used(&f.mem, &f.rx, 1, &f.irq, T));
}

/// The primary's NIC mid-traffic (a frame delivered, a buffer posted,
/// paused) and a standby's: its own tap, another default MAC.
struct NetPair {
    f: Fixture,
    standby: VirtioMmioDevice<Net>,
    standby_irq: EventFd,
    standby_peer: std::fs::File,
}

impl PersistPair for NetPair {
    type Component = VirtioMmioDevice<Net>;

    fn pair(&mut self) -> (&mut Self::Component, &mut Self::Component) {
        (&mut self.f.dev, &mut self.standby)
    }

    /// The tap is a host resource: each device names its own.
    fn normalize(state: &mut NetDeviceState) {
        state.device.tap.clear();
    }
}

fn mid_traffic() -> NetPair {
    let mut f = fixture(None);
    f.rx.add_chain(&f.mem, &[(0x20000, 2048, true)]);
    notify(&f, 0);
    peer_send(&f.peer, &frame(80, 9));
    assert!(wait_used(&f.mem, &f.rx, 1, &f.irq, T));
    f.rx.add_chain(&f.mem, &[(0x22000, 2048, true)]);
    notify(&f, 0);
    f.dev.pause(T).unwrap();
    let (tap2, standby_peer) = fake_tap("standby0");
    let standby_irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let standby = VirtioMmioDevice::new(
        Net::new(tap2, default_mac("x"), None).unwrap(),
        f.mem.clone(),
        standby_irq.try_clone().unwrap(),
    )
    .unwrap();
    NetPair {
        f,
        standby,
        standby_irq,
        standby_peer,
    }
}

persist_roundtrip_tests! {
    virtio_net: mid_traffic();
}

#[test]
fn a_restored_nic_goes_on_on_its_own_tap() {
    let mut p = mid_traffic();
    let saved = p.f.dev.save().unwrap();
    p.standby.restore(&saved).unwrap();
    let again = p.standby.save().unwrap();
    assert_eq!(again.device.mac, MAC, "the MAC is the guest's: it travels");
    assert_eq!(again.device.tap, "standby0");
    // It goes on: the posted buffer receives from the new tap.
    peer_send(&p.standby_peer, &frame(90, 3));
    assert!(wait_used(&p.f.mem, &p.f.rx, 2, &p.standby_irq, T));
    assert_eq!(p.f.rx.used_elem(&p.f.mem, 1).1 as usize, 12 + 90);
}

#[test]
fn a_hostile_queue_is_refused() {
    let mut p = mid_traffic();
    let saved = p.f.dev.save().unwrap();
    let mut bad = saved.clone();
    bad.transport.queues[1].used_ring = 0x7fff_f000;
    let err = p.standby.restore(&bad).unwrap_err();
    assert!(
        matches!(err, NetRestoreError::QueueOutsideMemory { index: 1, .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("cannot restore virtio-net 'standby0': queue 1"),
        "{err}"
    );
    let mut bad = saved;
    bad.transport.driver_features |= 1 << 60;
    let err = p.standby.restore(&bad).unwrap_err();
    assert!(matches!(err, NetRestoreError::Features { .. }), "{err}");
}

/// A checkpoint taken mid-traffic — the receive queue out of buffers (the
/// device waiting for the guest's notification), an interrupt not yet
/// acknowledged — restored into a fresh device on the same memory (the
/// standby): the interrupt is raised again, and receive and transmit go on
/// with interrupts, as the Linux guest's interrupt-driven driver needs.
#[test]
fn traffic_and_interrupts_go_on_after_a_restore_mid_traffic() {
    use std::io::Read;
    let mut f = fixture(None);
    f.rx.add_chain(&f.mem, &[(0x20000, 2048, true)]);
    notify(&f, 0);
    peer_send(&f.peer, &frame(80, 1));
    assert!(wait_used(&f.mem, &f.rx, 1, &f.irq, T));
    // No buffer left: the next frame makes the device wait for the guest.
    peer_send(&f.peer, &frame(80, 2));
    let deadline = std::time::Instant::now() + T;
    while f.dev.with_device(|d| d.backend_fd().is_some()) {
        assert!(
            std::time::Instant::now() < deadline,
            "receive never blocked"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    f.dev.pause(T).unwrap();
    let saved = f.dev.save().unwrap();
    assert_eq!(
        saved.transport.interrupt_status,
        crate::virtio::mmio::INT_VRING
    );
    drop(f.dev);

    let (tap2, peer2) = fake_tap("standby0");
    let irq2 = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut dev2 = VirtioMmioDevice::new(
        Net::new(tap2, MAC, None).unwrap(),
        f.mem.clone(),
        irq2.try_clone().unwrap(),
    )
    .unwrap();
    let t2 = dev2.transport();
    dev2.restore(&saved).unwrap();
    assert!(
        wait_evt(&irq2, T),
        "the pending interrupt was not raised again"
    );
    w32(&mut *t2.lock().unwrap(), regs::INTERRUPT_ACK, 1);
    // Receive: the guest posts buffers after the restore and notifies.
    for i in 0..3u16 {
        f.rx.add_chain(&f.mem, &[(0x22000 + u64::from(i) * 0x1000, 2048, true)]);
        w32(&mut *t2.lock().unwrap(), regs::QUEUE_NOTIFY, 0);
        peer_send(&peer2, &frame(90 + usize::from(i), 3));
        assert!(
            wait_used(&f.mem, &f.rx, 2 + i, &irq2, T),
            "frame {i} not received"
        );
        assert_eq!(
            f.rx.used_elem(&f.mem, 1 + i).1 as usize,
            12 + 90 + usize::from(i)
        );
        w32(&mut *t2.lock().unwrap(), regs::INTERRUPT_ACK, 1);
    }
    // Transmit, each completion interrupting.
    for i in 0..3u16 {
        let base = 0x40000 + u64::from(i) * 0x1000;
        let mut buf = vec![0u8; 12];
        buf.extend(frame(64, i as u8));
        f.mem.write_slice(&buf, GuestAddress(base)).unwrap();
        f.tx.add_chain(&f.mem, &[(base, buf.len() as u32, false)]);
        // The ACK above took the device lock: no older signal is in flight.
        let _ = irq2.read();
        w32(&mut *t2.lock().unwrap(), regs::QUEUE_NOTIFY, 1);
        assert!(wait_evt(&irq2, T), "no interrupt for transmit {i}");
        assert!(wait_used(&f.mem, &f.tx, i + 1, &irq2, T));
        let mut got = [0u8; 256];
        let n = (&peer2).read(&mut got).unwrap();
        assert_eq!(&got[12..n], &frame(64, i as u8)[..]);
        w32(&mut *t2.lock().unwrap(), regs::INTERRUPT_ACK, 1);
    }
}
