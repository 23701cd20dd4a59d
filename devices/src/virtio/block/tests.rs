use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use ftvmm_checkpoint::test_utils::PersistPair;
use ftvmm_checkpoint::{persist_roundtrip_tests, Persist};

use super::*;
use crate::bus::BusDevice;
use crate::virtio::features;
use crate::virtio::mmio::{regs, status, VirtioMmioDevice};
use crate::virtio::test_utils::*;
use crate::virtio::Quiesce;

const T: Duration = Duration::from_secs(5);
const DATA: u64 = 0x10000;
const HDR: u64 = 0x8000;
const STATUS: u64 = 0x9000;

struct Fixture {
    dir: std::path::PathBuf,
    mem: GuestMemory,
    dev: VirtioMmioDevice<Block>,
    transport: std::sync::Arc<std::sync::Mutex<crate::virtio::mmio::MmioTransport<Block>>>,
    irq: EventFd,
    q: TestQueue,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

fn fixture(tag: &str, size: usize, readonly: bool) -> Fixture {
    let dir = std::env::temp_dir().join(format!("ftvmm-blk-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk0.img");
    std::fs::write(&path, pattern(size, 1)).unwrap();
    let mem = test_mem(1 << 20);
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let dev = VirtioMmioDevice::new(
        Block::new(Disk::open(&path, readonly).unwrap()),
        mem.clone(),
        irq.try_clone().unwrap(),
    )
    .unwrap();
    let transport = dev.transport();
    let q = TestQueue::new(0x1000, 16);
    let st = activate(
        &mut *transport.lock().unwrap(),
        features::VERSION_1 | features::BLK_FLUSH,
        &[&q],
    );
    assert_eq!(st & status::DRIVER_OK, status::DRIVER_OK);
    Fixture {
        dir,
        mem,
        dev,
        transport,
        irq,
        q,
    }
}

impl Fixture {
    fn path(&self) -> std::path::PathBuf {
        self.dir.join("disk0.img")
    }

    /// Submits a request (header, then data segments, then the status
    /// byte) and waits for it; returns (status, used length).
    fn request(&mut self, req: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
        self.mem.write_obj(req, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut chain = vec![(HDR, 16, false)];
        chain.extend_from_slice(data);
        chain.push((STATUS, 1, true));
        self.submit(&chain)
    }

    fn submit(&mut self, chain: &[(u64, u32, bool)]) -> (u8, u32) {
        let head = self.q.add_chain(&self.mem, chain);
        let n = self.q.used_idx(&self.mem) + 1;
        w32(&mut *self.transport.lock().unwrap(), regs::QUEUE_NOTIFY, 0);
        assert!(
            wait_used(&self.mem, &self.q, n, &self.irq, T),
            "request not completed"
        );
        let (id, len) = self.q.used_elem(&self.mem, n - 1);
        assert_eq!(id, u32::from(head));
        (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }
}

#[test]
fn read_lands_in_guest_memory_and_marks_it_dirty() {
    let mut f = fixture("read", 8192, false);
    clear_dirty(&f.mem);
    let (st, len) = f.request(
        VIRTIO_BLK_T_IN,
        2,
        &[(DATA, 512, true), (DATA + 0x3000, 1024, true)],
    );
    assert_eq!((st, len), (VIRTIO_BLK_S_OK, 1536 + 1));
    let want = pattern(8192, 1);
    let mut got = vec![0u8; 512];
    f.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, want[1024..1536]);
    let mut got = vec![0u8; 1024];
    f.mem
        .read_slice(&mut got, GuestAddress(DATA + 0x3000))
        .unwrap();
    assert_eq!(got, want[1536..2560]);
    // DESIGN I3 for the VMM's writes: data pages, status and used ring are
    // dirty; an untouched page is not.
    assert!(is_dirty(&f.mem, DATA));
    assert!(is_dirty(&f.mem, DATA + 0x3000));
    assert!(is_dirty(&f.mem, STATUS));
    assert!(is_dirty(&f.mem, f.q.used));
    assert!(!is_dirty(&f.mem, DATA + 0x1000));
    assert!(!is_dirty(&f.mem, 0x50000));
}

#[test]
fn write_reaches_the_file() {
    let mut f = fixture("write", 8192, false);
    let data = pattern(1024, 99);
    f.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let (st, len) = f.request(VIRTIO_BLK_T_OUT, 3, &[(DATA, 1024, false)]);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK, 1));
    let file = std::fs::read(f.path()).unwrap();
    assert_eq!(&file[1536..2560], &data[..]);
    assert_eq!(&file[..1536], &pattern(8192, 1)[..1536]);
    assert_eq!(f.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (VIRTIO_BLK_S_OK, 1));
    assert_eq!(
        f.dev
            .with_device(|d| d.metrics().write_bytes.load(Ordering::Relaxed)),
        1024
    );
}

#[test]
fn protected_writes_and_flushes_are_journaled_in_completion_order() {
    use super::journal::{records, Record};
    let mut f = fixture("journal", 8192, false);
    let journal = f.dev.with_device(|d| d.journal());
    let a = pattern(1024, 7);
    f.mem.write_slice(&a, GuestAddress(DATA)).unwrap();
    // Not protected yet: the file only.
    assert_eq!(f.request(VIRTIO_BLK_T_OUT, 1, &[(DATA, 1024, false)]).0, 0);
    assert!(journal.seal().as_bytes().is_empty());
    journal.start();
    let b = pattern(1536, 8);
    f.mem.write_slice(&b, GuestAddress(DATA + 0x2000)).unwrap();
    // Two segments: the journal holds them as one contiguous write.
    let segs = [(DATA + 0x2000, 512, false), (DATA + 0x2200, 1024, false)];
    assert_eq!(f.request(VIRTIO_BLK_T_OUT, 4, &segs).0, VIRTIO_BLK_S_OK);
    assert_eq!(f.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0, VIRTIO_BLK_S_OK);
    // A failed write (out of range) is not journaled.
    assert_eq!(
        f.request(VIRTIO_BLK_T_OUT, 16, &[(DATA, 512, false)]).0,
        VIRTIO_BLK_S_IOERR
    );
    let epoch = journal.seal();
    let recs: Vec<_> = records(epoch.as_bytes()).collect::<Result<_, _>>().unwrap();
    assert_eq!(
        recs,
        [
            Record::Write {
                offset: 4 * 512,
                data: &b[..]
            },
            Record::Flush
        ]
    );
    assert_eq!(epoch.counts().writes, 1);
    assert_eq!(epoch.counts().flushes, 1);
    let file = std::fs::read(f.path()).unwrap();
    assert_eq!(&file[2048..3584], &b[..], "the file got the journaled data");
}

#[test]
fn get_id_is_the_file_name() {
    let mut f = fixture("id", 4096, false);
    let (st, len) = f.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, true)]);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK, 21));
    let mut id = [0u8; 20];
    f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..9], b"disk0.img");
    assert!(id[9..].iter().all(|&b| b == 0));
}

#[test]
fn out_of_range_and_unknown_requests() {
    let mut f = fixture("range", 4096 + 100, false); // 8 sectors, the tail ignored
    let cap = f.dev.with_device(|d| d.disk().capacity());
    assert_eq!(cap, 8);
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, 7, &[(DATA, 512, true)]).0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, 7, &[(DATA, 1024, true)]).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, 8, &[(DATA, 512, true)]).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        f.request(VIRTIO_BLK_T_OUT, u64::MAX, &[(DATA, 512, false)])
            .0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, u64::MAX / 256, &[(DATA, 512, true)])
            .0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(f.request(99, 0, &[]).0, VIRTIO_BLK_S_UNSUPP);
    // A data buffer outside guest memory.
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, 0, &[(0x4000_0000, 512, true)]).0,
        VIRTIO_BLK_S_IOERR
    );
    let file = std::fs::read(f.path()).unwrap();
    assert_eq!(file, pattern(4096 + 100, 1));
}

#[test]
fn readonly_disk_refuses_writes() {
    let mut f = fixture("ro", 4096, true);
    let offered = {
        let mut t = f.transport.lock().unwrap();
        w32(&mut *t, regs::DEVICE_FEATURES_SEL, 0);
        r32(&mut *t, regs::DEVICE_FEATURES)
    };
    assert_ne!(u64::from(offered) & features::BLK_RO, 0);
    f.mem.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        f.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, false)]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]).0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(std::fs::read(f.path()).unwrap(), pattern(4096, 1));
}

#[test]
fn malformed_chains_never_panic() {
    let mut f = fixture("bad", 4096, false);
    f.mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HDR)).unwrap();
    f.mem.write_obj(0u64, GuestAddress(HDR + 8)).unwrap();
    // No writable descriptor: nothing to put a status in; used length 0.
    assert_eq!(f.submit(&[(HDR, 16, false)]).1, 0);
    // A short header.
    f.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(
        f.submit(&[(HDR, 8, false), (STATUS, 1, true)]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    // Readable after writable.
    assert_eq!(
        f.submit(&[
            (HDR, 16, false),
            (DATA, 512, true),
            (DATA, 512, false),
            (STATUS, 1, true)
        ])
        .0,
        VIRTIO_BLK_S_IOERR
    );
    // The header outside guest memory.
    assert_eq!(
        f.submit(&[(0x4000_0000, 16, false), (STATUS, 1, true)]).0,
        VIRTIO_BLK_S_IOERR
    );
    // A descriptor whose `next` points past the table: the chain ends there,
    // without a status descriptor.
    let head = 15u16;
    f.q.write_desc(&f.mem, head, HDR, 16, VIRTQ_DESC_F_NEXT, 200);
    f.q.publish(&f.mem, head);
    let n = f.q.used_idx(&f.mem) + 1;
    w32(&mut *f.transport.lock().unwrap(), regs::QUEUE_NOTIFY, 0);
    assert!(wait_used(&f.mem, &f.q, n, &f.irq, T));
    assert_eq!(f.q.used_elem(&f.mem, n - 1), (15, 0));
    // And the device still works.
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, true)]).0,
        VIRTIO_BLK_S_OK
    );
    assert!(
        f.dev
            .with_device(|d| d.metrics().malformed.load(Ordering::Relaxed))
            >= 2
    );
}

#[test]
fn paused_device_serves_nothing_until_resumed() {
    let mut f = fixture("pause", 4096, false);
    f.dev.pause(T).unwrap();
    f.mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HDR)).unwrap();
    f.mem.write_obj(0u64, GuestAddress(HDR + 8)).unwrap();
    f.q.add_chain(
        &f.mem,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    w32(&mut *f.transport.lock().unwrap(), regs::QUEUE_NOTIFY, 0);
    // A negative check: no completion may come while paused.
    assert!(!wait_evt(&f.irq, Duration::from_millis(200)));
    assert_eq!(f.q.used_idx(&f.mem), 0);
    let before = f.dev.save().unwrap();
    f.dev.resume();
    assert!(wait_used(&f.mem, &f.q, 1, &f.irq, T));
    assert_eq!(before.transport.queues[0].next_avail, 0);
    assert_eq!(f.dev.save().unwrap().transport.queues[0].next_avail, 1);
}

/// The primary's disk after a request, paused, and a standby's on its own
/// replica of the disk file.
struct BlockPair {
    f: Fixture,
    standby: VirtioMmioDevice<Block>,
    standby_irq: EventFd,
}

impl PersistPair for BlockPair {
    type Component = VirtioMmioDevice<Block>;

    fn pair(&mut self) -> (&mut Self::Component, &mut Self::Component) {
        (&mut self.f.dev, &mut self.standby)
    }

    /// The disk file is a host resource: each device names its own.
    fn normalize(state: &mut BlockDeviceState) {
        state.device.path.clear();
    }
}

fn after_a_request(tag: &str) -> BlockPair {
    let mut f = fixture(tag, 4096, false);
    assert_eq!(
        f.request(VIRTIO_BLK_T_IN, 1, &[(DATA, 512, true)]).0,
        VIRTIO_BLK_S_OK
    );
    f.dev.pause(T).unwrap();
    let replica = f.dir.join("replica.img");
    std::fs::copy(f.path(), &replica).unwrap();
    let standby_irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let standby = VirtioMmioDevice::new(
        Block::new(Disk::open(&replica, false).unwrap()),
        f.mem.clone(),
        standby_irq.try_clone().unwrap(),
    )
    .unwrap();
    BlockPair {
        f,
        standby,
        standby_irq,
    }
}

persist_roundtrip_tests! {
    virtio_blk: after_a_request("roundtrip");
}

#[test]
fn a_restored_disk_serves_the_next_request() {
    let mut p = after_a_request("goes-on");
    let saved = p.f.dev.save().unwrap();
    assert!(saved.transport.activated);
    p.standby.restore(&saved).unwrap();
    let again = p.standby.save().unwrap();
    assert_eq!(again.device.disk_id, saved.device.disk_id);
    assert!(again.device.path.ends_with("replica.img"));
    let f = &mut p.f;
    f.mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HDR)).unwrap();
    f.q.add_chain(
        &f.mem,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    w32(
        &mut *p.standby.transport().lock().unwrap(),
        regs::QUEUE_NOTIFY,
        0,
    );
    assert!(wait_used(&f.mem, &f.q, 2, &p.standby_irq, T));
}

#[test]
fn a_hostile_or_misfit_state_is_refused() {
    let mut p = after_a_request("hostile");
    let saved = p.f.dev.save().unwrap();
    // Another capacity, another access.
    let small = p.f.dir.join("small.img");
    std::fs::write(&small, [0u8; 512]).unwrap();
    let mut other = VirtioMmioDevice::new(
        Block::new(Disk::open(&small, false).unwrap()),
        p.f.mem.clone(),
        EventFd::new(0).unwrap(),
    )
    .unwrap();
    let err = other.restore(&saved).unwrap_err();
    assert!(
        matches!(
            err,
            BlockRestoreError::Device(BlockStateError::Capacity {
                state: 8,
                disk: 1,
                ..
            })
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("has 8 sectors, this one 1"),
        "{err}"
    );
    let mut ro = VirtioMmioDevice::new(
        Block::new(Disk::open(&p.f.path(), true).unwrap()),
        p.f.mem.clone(),
        EventFd::new(0).unwrap(),
    )
    .unwrap();
    let err = ro.restore(&saved).unwrap_err().to_string();
    assert!(
        err.contains("checkpointed disk is writable, this one readonly"),
        "{err}"
    );
    // Queues virtio-queue rejects, or outside guest memory, or missing.
    let mut bad = saved.clone();
    bad.transport.queues[0].size = 3;
    let err = p.standby.restore(&bad).unwrap_err();
    assert!(
        matches!(err, BlockRestoreError::Queue { index: 0, .. }),
        "{err}"
    );
    let mut bad = saved.clone();
    bad.transport.queues[0].used_ring = 0x7fff_f000;
    assert!(matches!(
        p.standby.restore(&bad),
        Err(BlockRestoreError::QueueOutsideMemory { .. })
    ));
    let mut bad = saved.clone();
    bad.transport.queues[0].max_size = 1024;
    assert!(matches!(
        p.standby.restore(&bad),
        Err(BlockRestoreError::QueueMaxSize { got: 1024, .. })
    ));
    let mut bad = saved;
    bad.transport.queues.pop();
    let err = p.standby.restore(&bad).unwrap_err();
    assert!(
        matches!(
            err,
            BlockRestoreError::QueueCount {
                got: 0,
                want: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn empty_disk_is_refused() {
    let dir = std::env::temp_dir().join(format!("ftvmm-blk-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("e.img");
    std::fs::write(&p, b"").unwrap();
    let e = Disk::open(&p, false).unwrap_err().to_string();
    assert!(
        e.contains("e.img") && e.contains("at least one 512-byte sector"),
        "{e}"
    );
    let e = Disk::open(&dir.join("missing.img"), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot open disk") && e.contains("missing.img"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn transport_identity_and_reset() {
    let mut f = fixture("ident", 4096, false);
    let mut t = f.transport.lock().unwrap();
    assert_eq!(r32(&mut *t, regs::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r32(&mut *t, regs::VERSION), 2);
    assert_eq!(r32(&mut *t, regs::DEVICE_ID), 2);
    let mut cap = [0u8; 8];
    t.read(regs::CONFIG, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8);
    w32(&mut *t, regs::STATUS, 0);
    assert_eq!(r32(&mut *t, regs::STATUS), 0);
    drop(t);
    assert!(!f.dev.save().unwrap().transport.activated);
    // Without VERSION_1 the device refuses FEATURES_OK.
    let mut t = f.transport.lock().unwrap();
    let q = TestQueue::new(0x1000, 16);
    let st = activate(&mut *t, features::BLK_FLUSH, &[&q]);
    assert_eq!(st & status::FEATURES_OK, 0);
    assert_eq!(
        st & status::DRIVER_OK & !status::DEVICE_NEEDS_RESET,
        status::DRIVER_OK
    );
    assert_ne!(st & status::DEVICE_NEEDS_RESET, 0);
}
