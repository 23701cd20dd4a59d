//! Hostile input: random bytes, random truncations and random single-byte corruptions of
//! valid frames, fed to the frame reader, and random bytes fed to the state decoder.
//! Decoding never panics, allocates no more than the limits allow (measured by a counting
//! allocator while the decoder runs), and always errors on a torn or corrupt frame,
//! leaving the receiver's staging empty (I2).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use ftvmm_checkpoint::protocol::{
    FrameKind, Heartbeat, FRAME_HEADER_LEN, HEARTBEAT_FRAME_LEN, MAGIC, WIRE_VERSION,
};
use ftvmm_checkpoint::wire::{
    encode_message, Ack, FrameReader, HelloAck, Message, Refuse, CHECKPOINT_HEADER_LEN,
    MAX_CONTROL_BODY,
};
use ftvmm_checkpoint::{
    decode_state, CheckpointFrame, DevicesSummary, DiskShape, DiskSync, Encoder, EpochPolicy,
    GuestShape, Hello, Limits, Role, Staging, StagingConfig, WireError, PAGE_SIZE,
};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

struct Counting;

thread_local! {
    /// Bytes requested while armed (reallocations count their new size).
    static BYTES: Cell<u64> = const { Cell::new(0) };
    static ARMED: Cell<bool> = const { Cell::new(false) };
}

fn note(bytes: usize) {
    let _ = ARMED.try_with(|a| {
        if a.get() {
            let _ = BYTES.try_with(|b| b.set(b.get() + bytes as u64));
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping
// touches only const-initialized thread-local Cells, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` and returns its result with the bytes it allocated on this thread.
fn measured<T>(f: impl FnOnce() -> T) -> (T, u64) {
    BYTES.with(|b| b.set(0));
    ARMED.with(|a| a.set(true));
    let r = f();
    ARMED.with(|a| a.set(false));
    (r, BYTES.with(|b| b.get()))
}

/// Guest of 64 MiB (16384 pages): a header may claim up to that many pages.
const MEM: u64 = 64 << 20;
const STATE_CAP: u64 = 256 << 10;
const SLAB: usize = 64 << 10;
/// serde may pre-allocate up to 1 MiB for a sequence whose length prefix lies, before the
/// codec's limit stops it (see `codec`); the rest is bookkeeping.
const SLACK: u64 = (1 << 20) + (64 << 10);

fn limits() -> Limits {
    let shape = GuestShape {
        mem_bytes: MEM,
        vcpus: 2,
        cmdline: "console=ttyS0".into(),
        devices: DevicesSummary {
            nic_macs: vec![[2, 0, 0, 0, 0, 1]],
            disks: vec![DiskShape {
                bytes: 1 << 20,
                readonly: false,
            }],
        },
    };
    Limits::for_shape(&shape, MEM, STATE_CAP).unwrap()
}

fn staging() -> Staging {
    Staging::new(StagingConfig {
        slab_bytes: SLAB,
        ..limits().staging_config()
    })
    .unwrap()
}

/// Allocation a decode of `input_len` bytes may make: the payload it actually received,
/// rounded up to whole slabs, a control body, and the slack above.
fn alloc_bound(input_len: usize) -> u64 {
    (input_len.div_ceil(SLAB) * SLAB) as u64 + u64::from(MAX_CONTROL_BODY) + SLACK
}

/// Feeds `bytes` to a fresh reader. Fails the test case if the decoder allocated more
/// than the bound or left anything staged after an error; otherwise returns `None` for an
/// accepted frame and the error message for a rejected one.
fn feed(bytes: &[u8]) -> Result<Option<String>, TestCaseError> {
    let mut reader = FrameReader::new(limits());
    let mut st = staging();
    let (res, allocated) = measured(|| {
        let mut r = bytes;
        reader.read_frame(&mut r, &mut st).map(|_| ())
    });
    let bound = alloc_bound(bytes.len());
    prop_assert!(
        allocated <= bound,
        "decoding {} bytes allocated {} > {}",
        bytes.len(),
        allocated,
        bound
    );
    match res {
        Ok(()) => Ok(None),
        Err(e) => {
            prop_assert!(
                st.page_count() == 0 && st.state_len() == 0,
                "error '{}' left {} pages staged",
                e,
                st.page_count()
            );
            Ok(Some(e.to_string()))
        }
    }
}

fn checkpoint_frame(gpas: &[u64], state: &[u8], epoch: u64) -> Vec<u8> {
    let mut st = staging();
    let mut w = st.begin_epoch();
    for (i, &gpa) in gpas.iter().enumerate() {
        let slot = w.page_slot(gpa).unwrap();
        slot.fill(i as u8);
        slot[..8].copy_from_slice(&gpa.to_le_bytes());
    }
    w.stage_state(state).unwrap();
    w.finish();
    let mut v = Vec::new();
    CheckpointFrame::new(&st, epoch, 1).copy_into(&mut v);
    v
}

/// An encoded checkpoint: each page is sent once as `(gpa, before)` to warm the encoder's
/// cache, then as its `after` content, which the encoder turns into a zero flag, a delta
/// or a raw page as it sees fit.
fn encoded_frame(pages: &[(u64, u8, u8)], state: &[u8]) -> Vec<u8> {
    let content = |gpa: u64, kind: u8| -> [u8; PAGE_SIZE] {
        let mut p = [0u8; PAGE_SIZE];
        match kind % 4 {
            0 => {}
            1 => p[(gpa as usize / PAGE_SIZE) % PAGE_SIZE] = kind,
            2 => p
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i as u64 ^ gpa) as u8),
            _ => p
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i * 31) as u8 ^ kind),
        }
        p
    };
    let mut enc = Encoder::new(1 << 20, MEM);
    let mut st = staging();
    for round in 0..2 {
        let mut w = st.begin_epoch();
        for &(gpa, before, after) in pages {
            let kind = if round == 0 { before } else { after };
            w.stage_page(gpa, &content(gpa, kind)).unwrap();
        }
        if round == 1 {
            w.stage_state(state).unwrap();
        }
        w.finish();
        enc.encode(&mut st);
    }
    let mut v = Vec::new();
    CheckpointFrame::new(&st, 2, 1).copy_into(&mut v);
    v
}

fn control_frame(m: &Message) -> Vec<u8> {
    let mut v = Vec::new();
    encode_message(m, &mut v).unwrap();
    v
}

fn arb_gpas() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(
        (0..MEM / PAGE_SIZE as u64).prop_map(|p| p * PAGE_SIZE as u64),
        0..40,
    )
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            any::<u64>(),
            ".{0,200}",
            prop::collection::vec(
                (any::<u64>(), any::<bool>())
                    .prop_map(|(bytes, readonly)| DiskShape { bytes, readonly }),
                0..4
            ),
            prop::collection::vec(any::<[u8; 6]>(), 0..4)
        )
            .prop_map(
                |(generation, cmdline, disks, nic_macs)| Message::Hello(Hello {
                    version: WIRE_VERSION,
                    generation,
                    role: Role::Primary,
                    heartbeat_ms: 50,
                    shape: GuestShape {
                        mem_bytes: MEM,
                        vcpus: 1,
                        cmdline,
                        devices: DevicesSummary { nic_macs, disks },
                    },
                    disk_sync: DiskSync::Full,
                    vm_id: String::new(),
                    witnessed: false,
                    epochs: EpochPolicy {
                        interval_ms: 25,
                        max_interval_ms: 0,
                        budget_ppm: 0,
                        cache_bytes: 0,
                    },
                })
            ),
        any::<u64>().prop_map(|generation| Message::HelloAck(HelloAck {
            version: WIRE_VERSION,
            generation
        })),
        ".{0,100}".prop_map(|reason| Message::Refuse(Refuse { reason })),
        (any::<u64>(), any::<u64>())
            .prop_map(|(epoch, generation)| Message::Ack(Ack { epoch, generation })),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(generation, epoch, seq)| {
            Message::Heartbeat(Heartbeat {
                generation,
                epoch,
                seq,
            })
        }),
        Just(Message::Bye),
    ]
}

/// A valid frame of either sort.
fn arb_frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (
            arb_gpas(),
            prop::collection::vec(any::<u8>(), 0..3000),
            any::<u64>()
        )
            .prop_map(|(g, s, e)| checkpoint_frame(&g, &s, e)),
        (
            prop::collection::vec(
                (
                    (0..MEM / PAGE_SIZE as u64).prop_map(|p| p * PAGE_SIZE as u64),
                    any::<u8>(),
                    any::<u8>()
                ),
                0..40
            ),
            prop::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(pages, s)| encoded_frame(&pages, &s)),
        arb_message().prop_map(|m| control_frame(&m)),
    ]
}

/// A frame header with a plausible start and arbitrary kind and length, then noise: it
/// gets past the magic and version checks and into the length validation.
fn arb_forged() -> impl Strategy<Value = Vec<u8>> {
    (
        1u16..=8,
        prop_oneof![any::<u64>(), 0u64..100_000],
        any::<[u64; 6]>(),
        prop_oneof![Just(0u64), 0..(1u64 << 20)],
        prop::collection::vec(any::<u8>(), 0..20_000),
    )
        .prop_map(|(kind, body_len, mut ckpt, small_pages, noise)| {
            let mut v = Vec::new();
            v.extend_from_slice(&MAGIC);
            v.extend_from_slice(&WIRE_VERSION.to_le_bytes());
            v.extend_from_slice(&kind.to_le_bytes());
            v.extend_from_slice(&body_len.to_le_bytes());
            if kind == FrameKind::Checkpoint as u16 {
                // Half the time a page count the guest admits.
                if small_pages != 0 {
                    ckpt[2] = small_pages % 20_000;
                    ckpt[3] %= 300_000;
                    ckpt[4] = 0;
                    ckpt[5] %= 30_000;
                }
                for f in ckpt {
                    v.extend_from_slice(&f.to_le_bytes());
                }
            }
            v.extend_from_slice(&noise);
            v
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..10_000)) {
        feed(&bytes)?;
    }

    #[test]
    fn forged_headers_are_bounded(bytes in arb_forged()) {
        feed(&bytes)?;
    }

    #[test]
    fn valid_frames_decode(frame in arb_frame()) {
        prop_assert_eq!(feed(&frame)?, None);
    }

    #[test]
    fn every_truncation_fails(frame in arb_frame(), cut in any::<prop::sample::Index>()) {
        let n = cut.index(frame.len()); // 0..len: strictly shorter
        let Some(e) = feed(&frame[..n])? else {
            return Err(TestCaseError::fail(format!(
                "a {n}-byte prefix of a {}-byte frame was accepted", frame.len()
            )));
        };
        prop_assert!(e.contains("torn frame") || (n == 0 && e.contains("closed")), "{}", e);
    }

    #[test]
    fn every_single_byte_corruption_fails(
        frame in arb_frame(),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let mut f = frame.clone();
        let i = at.index(f.len());
        f[i] ^= flip;
        prop_assert!(feed(&f)?.is_some(), "corrupting byte {} of {} went unnoticed", i, f.len());
    }

    #[test]
    fn random_heartbeat_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), HEARTBEAT_FRAME_LEN),
    ) {
        let b: [u8; HEARTBEAT_FRAME_LEN] = bytes.try_into().unwrap();
        let _ = Heartbeat::decode_frame(&b);
    }

    #[test]
    fn every_single_byte_corruption_of_a_heartbeat_fails(
        (generation, epoch, seq) in (any::<u64>(), any::<u64>(), any::<u64>()),
        at in 0..HEARTBEAT_FRAME_LEN,
        flip in 1u8..=255,
    ) {
        let hb = Heartbeat { generation, epoch, seq };
        let mut f = hb.encode_frame();
        prop_assert_eq!(Heartbeat::decode_frame(&f), Ok(hb));
        f[at] ^= flip;
        prop_assert!(
            Heartbeat::decode_frame(&f).is_err(),
            "corrupting byte {} of a heartbeat went unnoticed", at
        );
    }

    #[test]
    fn state_decoding_is_bounded(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        #[derive(Serialize, Deserialize, Debug)]
        struct DeviceLike {
            name: String,
            queues: Vec<(u16, u64, u64)>,
            config: Vec<u8>,
            nested: Vec<Vec<u32>>,
            mac: Option<[u8; 6]>,
        }
        let limit = 4096;
        let (_, allocated) = measured(|| decode_state::<DeviceLike>(&bytes, limit));
        prop_assert!(allocated <= limit + 3 * (1 << 20), "allocated {}", allocated);
    }
}

/// The precise errors of a few hand-made corruptions.
#[test]
fn corruption_is_named() {
    let f = checkpoint_frame(&[0, 0x1000], b"state", 3);
    // A flipped payload bit is a checksum error.
    let mut c = f.clone();
    c[FRAME_HEADER_LEN + CHECKPOINT_HEADER_LEN + 16 + 100] ^= 1;
    let e = feed(&c).unwrap().unwrap();
    assert!(
        e.starts_with("checksum mismatch in Checkpoint frame"),
        "{e}"
    );
    // A claimed page count beyond the guest, before any allocation.
    let mut c = f.clone();
    c[FRAME_HEADER_LEN + 16..FRAME_HEADER_LEN + 24].copy_from_slice(&9_999_999u64.to_le_bytes());
    assert_eq!(
        feed(&c).unwrap().unwrap(),
        "checkpoint page count 9999999 exceeds guest size of 16384 pages"
    );
    let mut reader = FrameReader::new(limits());
    let mut st = staging();
    let err = reader
        .read_frame(&mut &f[..f.len() - 1], &mut st)
        .unwrap_err();
    assert!(matches!(
        err,
        WireError::Truncated {
            what: "frame trailer"
        }
    ));
}

/// Slabs are allocated as payload arrives, not on a header's word: a frame claiming the
/// whole guest but cut after its index allocates nothing, while a real 40-page frame grows
/// the cache (which also shows the counter works).
#[test]
fn allocation_follows_received_bytes() {
    let pages = MEM / PAGE_SIZE as u64;
    let mut f = Vec::new();
    f.extend_from_slice(&MAGIC);
    f.extend_from_slice(&WIRE_VERSION.to_le_bytes());
    f.extend_from_slice(&(FrameKind::Checkpoint as u16).to_le_bytes());
    let body = CHECKPOINT_HEADER_LEN as u64 + pages * (8 + PAGE_SIZE as u64);
    f.extend_from_slice(&body.to_le_bytes());
    for field in [1u64, 1, pages, 0, 0, 0] {
        f.extend_from_slice(&field.to_le_bytes());
    }
    f.resize(f.len() + pages as usize * 8, 0); // every page at gpa 0: valid
    f.extend_from_slice(&[7; 100]);
    let mut reader = FrameReader::new(limits());
    let mut st = staging();
    let (res, allocated) = measured(|| reader.read_frame(&mut &f[..], &mut st).map(|_| ()));
    assert!(matches!(
        res,
        Err(WireError::Truncated {
            what: "checkpoint payload"
        })
    ));
    assert_eq!(allocated, 0);

    let gpas: Vec<u64> = (0..40).map(|p| p * PAGE_SIZE as u64).collect();
    let f = checkpoint_frame(&gpas, b"", 1);
    let mut st = staging();
    let (res, allocated) = measured(|| reader.read_frame(&mut &f[..], &mut st).map(|_| ()));
    assert!(res.is_ok());
    assert_eq!(allocated, 2 * SLAB as u64, "two more 16-page slabs");
}
