//! Page encoding end to end: random pages and previous contents go through the encoder,
//! the frame, the reader and apply, and the standby's memory equals the primary's;
//! hostile encodings (framed with a correct checksum, so only the decoder can object) are
//! refused with a typed error and leave the standby's memory exactly as it was (I2).

use ftvmm_checkpoint::encoding::{
    check_delta, delta_header, encode_delta, DeltaError, MAX_DELTA_LEN,
};
use ftvmm_checkpoint::protocol::{FrameHeader, FrameKind, FRAME_HEADER_LEN, TRAILER_LEN};
use ftvmm_checkpoint::wire::{Frame, FrameReader, CHECKPOINT_HEADER_LEN};
use ftvmm_checkpoint::{
    ApplyError, CheckpointFrame, DevicesSummary, Encoder, GuestShape, Limits, PageKind, Staging,
    StagingConfig, WireError, PAGE_SIZE,
};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 256 * PAGE_SIZE as u64;

fn limits() -> Limits {
    let shape = GuestShape {
        mem_bytes: MEM,
        vcpus: 1,
        cmdline: String::new(),
        devices: DevicesSummary::default(),
    };
    Limits::for_shape(&shape, MEM, 1 << 16).unwrap()
}

fn staging() -> Staging {
    Staging::new(StagingConfig {
        slab_bytes: 4 * PAGE_SIZE,
        ..limits().staging_config()
    })
    .unwrap()
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
}

fn crc_of(mem: &GuestMemoryMmap) -> u32 {
    let mut all = vec![0u8; MEM as usize];
    mem.read_slice(&mut all, GuestAddress(0)).unwrap();
    crc32fast::hash(&all)
}

/// A page made from a seed and a shape: zero, sparse, dense random, or a small edit of
/// `base`.
fn make_page(shape: u8, seed: u64, base: &[u8; PAGE_SIZE]) -> [u8; PAGE_SIZE] {
    let mut x = seed | 1;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut p = [0u8; PAGE_SIZE];
    let mut edit = |p: &mut [u8; PAGE_SIZE], edits: u64, max: u64| {
        for _ in 0..edits {
            let at = (rnd() % PAGE_SIZE as u64) as usize;
            let n = ((rnd() % max) as usize + 1).min(PAGE_SIZE - at);
            for b in &mut p[at..at + n] {
                *b = b.wrapping_add(1 + (rnd() % 255) as u8);
            }
        }
    };
    match shape % 6 {
        0 => {}
        1 => edit(&mut p, 1 + seed % 8, 4),
        2 => p.iter_mut().for_each(|b| *b = rnd() as u8),
        3 => {
            // A few small edits of the previous content: always a delta.
            p = *base;
            edit(&mut p, 1 + seed % 8, 16);
        }
        4 => {
            // Many edits: a delta or, past half a page, raw.
            p = *base;
            edit(&mut p, seed % 80, 64);
        }
        _ => p = *base,
    }
    p
}

/// Sends `rounds` checkpoints from a primary memory image through encoder, frame, reader
/// and apply; after each, the standby's memory must equal the primary's.
fn replicate(
    rounds: &[Vec<(u8, u8, u64)>],
    cache_bytes: u64,
) -> Result<Vec<[u64; 3]>, TestCaseError> {
    let primary = memory();
    let standby = memory();
    let mut enc = Encoder::new(cache_bytes, MEM);
    let (mut tx, mut rx) = (staging(), staging());
    let mut reader = FrameReader::new(limits());
    let mut kinds = Vec::new();
    for (epoch, writes) in rounds.iter().enumerate() {
        // The guest writes its pages...
        for &(page, shape, seed) in writes {
            let gpa = u64::from(page) * PAGE_SIZE as u64;
            let mut base = [0u8; PAGE_SIZE];
            primary.read_slice(&mut base, GuestAddress(gpa)).unwrap();
            primary
                .write_slice(&make_page(shape, seed, &base), GuestAddress(gpa))
                .unwrap();
        }
        // ...the pause copies each dirty page once...
        let mut dirty: Vec<u64> = writes.iter().map(|w| u64::from(w.0)).collect();
        dirty.sort_unstable();
        dirty.dedup();
        let mut w = tx.begin_epoch();
        for p in dirty {
            let gpa = p * PAGE_SIZE as u64;
            primary
                .read_slice(w.page_slot(gpa).unwrap(), GuestAddress(gpa))
                .unwrap();
        }
        w.stage_state(b"state").unwrap();
        w.finish();
        // ...and after the resume the encoder runs and the frame goes out.
        let s = enc.encode(&mut tx);
        kinds.push([s.raw, s.zero, s.delta]);
        let mut wire = Vec::new();
        CheckpointFrame::new(&tx, epoch as u64 + 1, 1).copy_into(&mut wire);
        let Frame::Checkpoint(cp) = reader.read_frame(&mut &wire[..], &mut rx).unwrap() else {
            return Err(TestCaseError::fail("not a checkpoint"));
        };
        prop_assert_eq!(cp.raw_count() as u64, s.raw);
        let mut state = Vec::new();
        prop_assert_eq!(cp.apply(&standby, &mut state).unwrap(), b"state");
        prop_assert_eq!(
            crc_of(&standby),
            crc_of(&primary),
            "after epoch {}",
            epoch + 1
        );
    }
    Ok(kinds)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn deltas_round_trip(
        old in prop::collection::vec(any::<u8>(), PAGE_SIZE),
        edits in prop::collection::vec((0..PAGE_SIZE, any::<u8>(), 1usize..80), 0..60),
    ) {
        let old: [u8; PAGE_SIZE] = old.try_into().unwrap();
        let mut new = old;
        for (at, v, n) in edits {
            for b in &mut new[at..(at + n).min(PAGE_SIZE)] {
                *b = b.wrapping_add(v);
            }
        }
        let mut out = [0u8; MAX_DELTA_LEN];
        if let Some(len) = encode_delta(&old, &new, &mut out) {
            prop_assert!(check_delta(&out[..len]).is_ok());
            let mut p = old;
            ftvmm_checkpoint::encoding::apply_runs(&mut p, &out[..len]).unwrap();
            prop_assert_eq!(&p[..], &new[..]);
        } else {
            let changed = old.iter().zip(&new).filter(|(a, b)| a != b).count();
            prop_assert!(changed > MAX_DELTA_LEN / 3, "only {} bytes changed", changed);
        }
    }

    #[test]
    fn random_pages_replicate_exactly(
        rounds in prop::collection::vec(
            prop::collection::vec((0u8..=255, any::<u8>(), any::<u64>()), 0..40),
            1..6,
        ),
        cache_pages in prop_oneof![Just(0u64), Just(4), Just(16), Just(1024)],
    ) {
        replicate(&rounds, cache_pages * PAGE_SIZE as u64)?;
    }

    /// Random bytes as a delta section behind a valid index and checksum: refused or
    /// applied, never a panic, and a refusal leaves memory untouched.
    #[test]
    fn hostile_delta_sections_are_refused_whole(
        pages in prop::collection::vec((0u64..256, 0u64..3), 1..8),
        section in prop::collection::vec(any::<u8>(), 0..200),
        headers in prop::collection::vec((0u16..300, any::<bool>()), 0..8),
    ) {
        let standby = memory();
        standby.write_slice(&[0x5a; PAGE_SIZE], GuestAddress(0)).unwrap();
        let before = crc_of(&standby);
        // Records whose headers are plausible (base CRC of the page as it is) or not.
        let mut delta = Vec::new();
        for (i, &(len, good_crc)) in headers.iter().enumerate() {
            let base = if good_crc { crc_of_page(&standby, pages[i % pages.len()].0) } else { 7 };
            delta.extend_from_slice(&delta_header(usize::from(len), base));
            let from = (i * 13) % (section.len() + 1);
            let n = usize::from(len).min(section.len() - from);
            delta.extend_from_slice(&section[from..from + n]);
        }
        delta.extend_from_slice(&section[..section.len() % 5]);
        let index: Vec<u64> = pages.iter().map(|&(p, k)| (p * PAGE_SIZE as u64) | k).collect();
        let raw = pages.iter().filter(|p| p.1 == 0).count();
        let f = forged_frame(&index, &vec![0xab; raw * PAGE_SIZE], &delta);
        let mut rx = staging();
        match FrameReader::new(limits()).read_frame(&mut &f[..], &mut rx) {
            Ok(Frame::Checkpoint(cp)) => {
                if cp.apply(&standby, &mut Vec::new()).is_err() {
                    prop_assert_eq!(crc_of(&standby), before, "a refused apply wrote memory");
                }
            }
            Ok(Frame::Message(m)) => return Err(TestCaseError::fail(format!("{m:?}"))),
            Err(_) => {
                prop_assert_eq!(rx.page_count(), 0);
                prop_assert_eq!(crc_of(&standby), before);
            }
        }
    }
}

fn crc_of_page(mem: &GuestMemoryMmap, page: u64) -> u32 {
    let mut p = [0u8; PAGE_SIZE];
    mem.read_slice(&mut p, GuestAddress(page * PAGE_SIZE as u64))
        .unwrap();
    crc32fast::hash(&p)
}

/// A checkpoint frame made by hand: `index` entries (gpa | kind), the raw pages, an empty
/// state, the delta section `delta`, a correct checksum.
fn forged_frame(index: &[u64], raw: &[u8], delta: &[u8]) -> Vec<u8> {
    let body_len = CHECKPOINT_HEADER_LEN + index.len() * 8 + raw.len() + delta.len();
    let mut f = FrameHeader {
        kind: FrameKind::Checkpoint,
        body_len: body_len as u64,
    }
    .encode()
    .to_vec();
    for field in [1u64, 1, index.len() as u64, 0, 0, delta.len() as u64] {
        f.extend_from_slice(&field.to_le_bytes());
    }
    for e in index {
        f.extend_from_slice(&e.to_le_bytes());
    }
    f.extend_from_slice(raw);
    f.extend_from_slice(delta);
    let crc = crc32fast::hash(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    assert_eq!(f.len(), FRAME_HEADER_LEN + body_len + TRAILER_LEN);
    f
}

fn read_forged(f: &[u8]) -> Result<(), WireError> {
    let mut rx = staging();
    FrameReader::new(limits())
        .read_frame(&mut &f[..], &mut rx)
        .map(drop)
}

#[test]
fn hostile_encodings_are_typed_errors() {
    let gpa = 3 * PAGE_SIZE as u64;
    let delta = PageKind::Delta as u64;
    let rec = |runs: &[u8]| {
        let mut d = delta_header(runs.len(), 0).to_vec();
        d.extend_from_slice(runs);
        d
    };
    // A run past the end of the page.
    let e = read_forged(&forged_frame(
        &[gpa | delta],
        &[],
        &rec(&[0xff, 0x1f, 2, 1, 2]),
    ))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "checkpoint delta section: delta record 0: run of 2 bytes at page offset 4095 goes past the 4096-byte page"
    );
    // Wrong lengths: a record claiming more than the section holds, a section longer
    // than its records, an empty run, an overlong varint.
    let mut short = rec(&[0, 1, 9]);
    short[0] = 9;
    let e = read_forged(&forged_frame(&[gpa | delta], &[], &short)).unwrap_err();
    assert!(matches!(e, WireError::Delta(_)), "{e}");
    let mut long = rec(&[0, 1, 9]);
    long.extend_from_slice(&[0; 7]);
    let e = read_forged(&forged_frame(&[gpa | delta], &[], &long)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "checkpoint delta section: 7 bytes after the last delta record"
    );
    for runs in [&[5u8, 0][..], &[0x80, 0x80, 0x01, 1, 0]] {
        let e = read_forged(&forged_frame(&[gpa | delta], &[], &rec(runs))).unwrap_err();
        assert!(matches!(e, WireError::Delta(_)), "{e}");
    }
    // A delta section the index does not announce, and delta pages without records.
    let e = read_forged(&forged_frame(&[gpa], &[0; PAGE_SIZE], &rec(&[0, 1, 9]))).unwrap_err();
    assert!(
        matches!(e, WireError::DeltaLength { len: 9, deltas: 0 }),
        "{e}"
    );
    let e = read_forged(&forged_frame(&[gpa | delta, 0], &[0; PAGE_SIZE], &[])).unwrap_err();
    assert!(
        matches!(e, WireError::DeltaLength { len: 0, deltas: 1 }),
        "{e}"
    );
    // A kind nobody defined.
    let e = read_forged(&forged_frame(&[gpa | 3], &[], &[])).unwrap_err();
    assert!(
        matches!(e, WireError::UnknownPageKind { index: 0, entry } if entry == gpa | 3),
        "{e}"
    );
    // The runs themselves, directly.
    assert_eq!(
        check_delta(&[0, 0]),
        Err(DeltaError::EmptyRun { offset: 0 })
    );
}

/// A delta against a copy the standby does not have (the sender's cache and the standby
/// disagree, or the page was never sent): refused before anything is written, with the
/// page and both CRCs named.
#[test]
fn a_delta_against_the_wrong_base_applies_nothing() {
    let standby = memory();
    standby
        .write_slice(&[1; PAGE_SIZE], GuestAddress(0))
        .unwrap();
    let before = crc_of(&standby);
    // Page 0: a raw page (valid); page 5: a delta whose base CRC is not page 5's.
    let mut delta = delta_header(3, 0xdead_beef).to_vec();
    delta.extend_from_slice(&[0, 1, 9]);
    let f = forged_frame(
        &[0, (5 * PAGE_SIZE as u64) | PageKind::Delta as u64],
        &[7; PAGE_SIZE],
        &delta,
    );
    let mut rx = staging();
    let Frame::Checkpoint(cp) = FrameReader::new(limits())
        .read_frame(&mut &f[..], &mut rx)
        .unwrap()
    else {
        panic!("not a checkpoint")
    };
    let e = cp.apply(&standby, &mut Vec::new()).unwrap_err();
    assert!(
        matches!(
            e,
            ApplyError::DeltaBase {
                index: 1,
                gpa: 0x5000,
                expected: 0xdead_beef,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().ends_with("nothing was applied"), "{e}");
    assert_eq!(crc_of(&standby), before, "not even the raw page before it");
}

/// The same delta applied against the right base works, and zero pages are written only
/// where the copy is not zero already.
#[test]
fn deltas_and_zero_pages_apply() {
    let standby = memory();
    standby
        .write_slice(&[1; PAGE_SIZE], GuestAddress(0))
        .unwrap();
    standby
        .write_slice(&[2; PAGE_SIZE], GuestAddress(PAGE_SIZE as u64))
        .unwrap();
    let mut delta = delta_header(3, crc_of_page(&standby, 1)).to_vec();
    delta.extend_from_slice(&[10, 1, 9]);
    let zero = PageKind::Zero as u64;
    let f = forged_frame(
        &[
            zero,
            PAGE_SIZE as u64 | PageKind::Delta as u64,
            (9 * PAGE_SIZE as u64) | zero,
        ],
        &[],
        &delta,
    );
    let mut rx = staging();
    let Frame::Checkpoint(cp) = FrameReader::new(limits())
        .read_frame(&mut &f[..], &mut rx)
        .unwrap()
    else {
        panic!("not a checkpoint")
    };
    assert_eq!((cp.page_count(), cp.raw_count()), (3, 0));
    cp.apply(&standby, &mut Vec::new()).unwrap();
    let mut p = [0u8; PAGE_SIZE];
    standby.read_slice(&mut p, GuestAddress(0)).unwrap();
    assert!(p.iter().all(|&b| b == 0));
    standby
        .read_slice(&mut p, GuestAddress(PAGE_SIZE as u64))
        .unwrap();
    assert_eq!((p[9], p[10], p[11]), (2, 9, 2));
}

/// What the encoder makes of typical pages, and that the cache follows what was sent.
#[test]
fn encoder_chooses_kinds_and_bytes_shrink() {
    // Round 1: 4 pages raw (cache misses); round 2: one zero, two small edits (deltas),
    // one rewritten entirely (raw, then cold); round 3: the cold page stays raw, the
    // edited pages are deltas against what round 2 sent.
    let w = |page, shape, seed| (page, shape, seed);
    let rounds = vec![
        vec![w(1, 2, 11), w(2, 2, 12), w(3, 2, 13), w(4, 2, 14)],
        vec![w(1, 0, 0), w(2, 3, 5), w(3, 3, 6), w(4, 2, 99)],
        vec![w(2, 3, 7), w(3, 3, 8), w(4, 2, 100)],
    ];
    let kinds = replicate(&rounds, 64 * PAGE_SIZE as u64).unwrap();
    assert_eq!(kinds, vec![[4, 0, 0], [1, 1, 2], [1, 0, 2]]);
    // Without a cache: zero pages still, no deltas.
    let kinds = replicate(&rounds, 0).unwrap();
    assert_eq!(kinds, vec![[4, 0, 0], [3, 1, 0], [3, 0, 0]]);
}
