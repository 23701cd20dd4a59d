//! The bare-metal test guest's disk options against ftvmm's virtio-blk, end
//! to end (no network, no root): with `disk_flush=on` every heartbeat's
//! record is followed by a flush the guest saw complete, and with
//! `disk_bytes=N` every round writes a bulk slot in the disk's second half
//! while the records keep to its first half. The disk file is checked
//! sector by sector afterwards, against formats built here from the README,
//! not from the guest's code.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{run, Output, TempDir};

const SECTOR: usize = 512;

/// Where each sector of the disk should stand after a run.
#[derive(Clone, Debug, PartialEq)]
enum Expect {
    Zero,
    Record(u64),
    /// Round `r`'s bulk data.
    Bulk(u64),
}

/// The README's heartbeat record: `ftguest sector hb=<n>\n`, then zeros.
fn record(n: u64) -> Vec<u8> {
    let mut s = format!("ftguest sector hb={n}\n").into_bytes();
    s.resize(SECTOR, 0);
    s
}

/// The README's bulk sector: `ftguest bulk round=<r> sector=<lba>\n`, then
/// byte i of the sector is (r + i) mod 256.
fn bulk(r: u64, lba: u64) -> Vec<u8> {
    let mut s = format!("ftguest bulk round={r} sector={lba}\n").into_bytes();
    let text = s.len();
    s.extend((text..SECTOR).map(|i| ((r + i as u64) % 256) as u8));
    s
}

/// Runs the guest on a zeroed disk of `sectors` sectors with `cmdline`;
/// returns its output and the disk's bytes afterwards.
fn boot(tag: &str, sectors: usize, cmdline: &str) -> (Output, Vec<u8>, String) {
    let dir = TempDir::new(tag);
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; sectors * SECTOR]).unwrap();
    let out = run(
        &[
            "run",
            "--disk",
            &format!("path={}", disk.display()),
            "--cmdline",
            cmdline,
        ],
        Duration::from_secs(120),
    );
    let context = format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status, out.stdout, out.stderr
    );
    let image = std::fs::read(&disk).unwrap();
    assert_eq!(image.len(), sectors * SECTOR, "{context}");
    (out, image, context)
}

/// Checks every sector of `image` against `expect(lba)`.
fn check_image(image: &[u8], expect: impl Fn(u64) -> Expect) {
    for (lba, sector) in image.chunks(SECTOR).enumerate() {
        let lba = lba as u64;
        let want = match expect(lba) {
            Expect::Zero => vec![0; SECTOR],
            Expect::Record(n) => record(n),
            Expect::Bulk(r) => bulk(r, lba),
        };
        assert!(
            sector == want.as_slice(),
            "sector {lba}: want {:?}, found {:?}",
            expect(lba),
            String::from_utf8_lossy(&sector[..64])
        );
    }
}

/// The `ftguest hb=` and `ftguest disk flushed hb=` lines, in order.
fn beats_and_flushes(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.starts_with("ftguest hb=") || l.starts_with("ftguest disk flushed"))
        .collect()
}

/// What `beats_and_flushes` should be for heartbeats 1..=`beats`.
fn flushed_beats(beats: u64) -> Vec<String> {
    (1..=beats)
        .flat_map(|n| {
            [
                format!("ftguest hb={n}"),
                format!("ftguest disk flushed hb={n}"),
            ]
        })
        .collect()
}

fn kvm() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    println!("SKIP guest_disk: no /dev/kvm");
    false
}

#[test]
fn guest_flushes_each_record_and_writes_bulk_data() {
    if !kvm() {
        return;
    }
    // 8 MiB: records in LBA 0..8192, bulk slots of 8 sectors from 8192.
    const SECTORS: usize = 16384;
    const HALF: u64 = 8192;
    const BEATS: u64 = 20;
    const ROUNDS: u64 = 10;
    const BULK: u64 = 8;
    let (out, image, context) = boot(
        "guest-disk",
        SECTORS,
        &format!("disk_flush=on disk_bytes=4096 rounds={ROUNDS} stop={BEATS}"),
    );
    assert!(out.status.success(), "{context}");
    assert!(
        out.stdout
            .contains(&format!("ftguest disk sectors={SECTORS}\n")),
        "{context}"
    );
    assert!(
        out.stdout.contains(&format!(
            "ftguest disk bulk lba={HALF} sectors={BULK} slots=1024\n"
        )),
        "{context}"
    );
    assert!(out.stdout.contains("ftguest done\n"), "{context}");
    assert!(!out.stdout.contains("ftguest disk error"), "{context}");
    assert!(!out.stdout.contains("ftguest disk readonly"), "{context}");
    assert!(!out.stdout.contains("ftguest warning"), "{context}");

    // Each heartbeat line is followed by its flush line, before the next.
    assert_eq!(
        beats_and_flushes(&out.stdout),
        flushed_beats(BEATS),
        "{context}"
    );

    // Records in the first half; rounds 1..=200 in bulk slots 0..200.
    let rounds = BEATS * ROUNDS;
    check_image(&image, |lba| {
        if lba < BEATS {
            Expect::Record(lba + 1)
        } else if lba < HALF {
            Expect::Zero
        } else if lba < HALF + rounds * BULK {
            Expect::Bulk((lba - HALF) / BULK + 1)
        } else {
            Expect::Zero
        }
    });
}

#[test]
fn guest_bulk_slots_wrap_around_and_records_stay_in_the_first_half() {
    if !kvm() {
        return;
    }
    // 64 sectors: records rotate through LBA 0..32; 1000 bytes are two
    // sectors, so the bulk area (32..64) has 16 slots. 40 heartbeats of 2
    // rounds wrap both: the records once, the 80 rounds' slots 5 times.
    const SECTORS: usize = 64;
    const HALF: u64 = 32;
    const BEATS: u64 = 40;
    const ROUNDS: u64 = 2;
    const SLOTS: u64 = 16;
    let (out, image, context) = boot(
        "guest-disk-wrap",
        SECTORS,
        &format!("disk_flush=yes disk_verify=on disk_bytes=1000 rounds={ROUNDS} stop={BEATS}"),
    );
    assert!(out.status.success(), "{context}");
    assert!(
        out.stdout.contains(&format!(
            "ftguest disk bulk lba={HALF} sectors=2 slots={SLOTS}\n"
        )),
        "{context}"
    );
    assert!(!out.stdout.contains("ftguest disk error"), "{context}");
    assert!(!out.stdout.contains("ftguest warning"), "{context}");
    assert_eq!(
        beats_and_flushes(&out.stdout),
        flushed_beats(BEATS),
        "{context}"
    );

    // LBA k holds the last heartbeat n <= 40 with (n - 1) mod 32 = k; bulk
    // slot k the last round r <= 80 with (r - 1) mod 16 = k.
    let rounds = BEATS * ROUNDS;
    check_image(&image, |lba| {
        if lba < HALF {
            let last = (1..=BEATS).rev().find(|n| (n - 1) % HALF == lba).unwrap();
            Expect::Record(last)
        } else {
            let slot = (lba - HALF) / 2;
            let last = (1..=rounds)
                .rev()
                .find(|r| (r - 1) % SLOTS == slot)
                .unwrap();
            Expect::Bulk(last)
        }
    });
}
