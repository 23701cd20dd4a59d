//! The demo's disk: two zeroed images (the primary's and the standby's
//! replica), and the check of the replica after the standby stopped.
//!
//! The test guest writes one sector per heartbeat n, at LBA
//! `(n - 1) mod capacity`: `ftguest sector hb=<n>\n`, then zeros
//! (resources/test-guest/README.md, "Disk record"). The replica starts as
//! zeros, receives the primary's committed writes, and is the guest's own
//! disk after the takeover; so once the standby has printed heartbeat N,
//! the replica holds, at every sector, the newest record of 1..=N that
//! falls there, and zeros where none does.
//!
//! One allowance: the guest prints heartbeat N's line before it writes N's
//! record, and the standby is stopped at an arbitrary instant, so the last
//! record may not have been written yet. Its sector may then still hold what
//! was there before (zeros, or the record one lap earlier). Nothing else may
//! differ: a record beyond N, a missing or misplaced earlier record, or any
//! other byte is a failure.

use std::fs::File;
use std::path::Path;

use super::error::DemoError;

/// Bytes of a sector.
pub const SECTOR: usize = 512;
/// Size of each image (8 MiB).
pub const IMAGE_BYTES: u64 = 8 << 20;

/// The prefix of a sector record.
const RECORD_PREFIX: &[u8] = b"ftguest sector hb=";

/// Creates `path` as a zeroed image of [`IMAGE_BYTES`] (sparse), replacing
/// whatever was there.
pub fn create_image(path: &Path) -> Result<(), DemoError> {
    File::create(path)
        .and_then(|f| f.set_len(IMAGE_BYTES))
        .map_err(|source| DemoError::File {
            what: "create",
            path: path.to_path_buf(),
            source,
        })
}

/// What one sector holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sector {
    /// Zeros only.
    Zeros,
    /// Exactly the record of heartbeat n.
    Record(u64),
    /// Anything else.
    Other,
}

impl std::fmt::Display for Sector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sector::Zeros => f.write_str("zeros"),
            Sector::Record(n) => write!(f, "the record of hb={n}"),
            Sector::Other => f.write_str("something else"),
        }
    }
}

/// Reads one sector: zeros, an exact record, or something else (a record
/// followed by anything but zeros is something else).
pub fn read_sector(s: &[u8]) -> Sector {
    let Some(rest) = s.strip_prefix(RECORD_PREFIX) else {
        return if s.iter().all(|&b| b == 0) {
            Sector::Zeros
        } else {
            Sector::Other
        };
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let n = std::str::from_utf8(&rest[..digits])
        .ok()
        .and_then(|d| d.parse::<u64>().ok());
    let tail = &rest[digits..];
    match (n, tail.split_first()) {
        // The canonical digits only ("07" is not how the guest writes 7).
        (Some(n), Some((b'\n', zeros)))
            if n.to_string().len() == digits && zeros.iter().all(|&b| b == 0) =>
        {
            Sector::Record(n)
        }
        _ => Sector::Other,
    }
}

/// The newest record of 1..=`last` the guest writes at `lba` of a disk of
/// `capacity` sectors, if any.
fn newest_at(lba: u64, last: u64, capacity: u64) -> Option<u64> {
    let first = lba + 1;
    (last >= first).then(|| first + (last - first) / capacity * capacity)
}

/// A replica that holds what it should.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaOk {
    /// The last record present: the last heartbeat the standby printed, or
    /// the one before when that one's record was not written yet.
    pub last_record: u64,
    /// The last heartbeat the standby printed.
    pub last_hb: u64,
}

/// The first sector that is not what it should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaFail {
    /// The image is not a whole number of sectors, or is empty.
    #[error("the replica is {0} bytes, not a whole number (>0) of {SECTOR}-byte sectors")]
    Size(u64),
    /// A sector holds the wrong thing.
    #[error(
        "sector {lba} holds {found}, expected {expected} (standby printed up to hb={last_hb})"
    )]
    Sector {
        /// The sector.
        lba: u64,
        /// What it holds.
        found: Sector,
        /// What it should hold.
        expected: Sector,
        /// The last heartbeat the standby printed.
        last_hb: u64,
    },
}

/// Checks the replica image `img` against the heartbeats 1..=`last_hb` the
/// standby printed (see the module's allowance for the last one).
pub fn check_replica(img: &[u8], last_hb: u64) -> Result<ReplicaOk, ReplicaFail> {
    if img.is_empty() || !img.len().is_multiple_of(SECTOR) {
        return Err(ReplicaFail::Size(img.len() as u64));
    }
    let capacity = (img.len() / SECTOR) as u64;
    let last_lba = last_hb.checked_sub(1).map(|n| n % capacity);
    let mut last_record = last_hb;
    for (lba, s) in (0u64..).zip(img.chunks_exact(SECTOR)) {
        let found = read_sector(s);
        let expected = newest_at(lba, last_hb, capacity).map_or(Sector::Zeros, Sector::Record);
        if found == expected {
            continue;
        }
        if Some(lba) == last_lba {
            // hb=last_hb's record not written yet: the sector still holds
            // the newest record of 1..last_hb there, or zeros.
            let before =
                newest_at(lba, last_hb - 1, capacity).map_or(Sector::Zeros, Sector::Record);
            if found == before {
                last_record = last_hb - 1;
                continue;
            }
        }
        return Err(ReplicaFail::Sector {
            lba,
            found,
            expected,
            last_hb,
        });
    }
    Ok(ReplicaOk {
        last_record,
        last_hb,
    })
}

/// The highest heartbeat whose record is in `img` (0 if none).
pub fn highest_record(img: &[u8]) -> u64 {
    img.chunks_exact(SECTOR)
        .filter_map(|s| match read_sector(s) {
            Sector::Record(n) => Some(n),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// A whole image.
pub fn read_image(path: &Path) -> Result<Vec<u8>, DemoError> {
    std::fs::read(path).map_err(|source| DemoError::File {
        what: "read",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sector the guest writes for heartbeat `n`.
    fn record(n: u64) -> [u8; SECTOR] {
        let mut s = [0u8; SECTOR];
        let line = format!("ftguest sector hb={n}\n");
        s[..line.len()].copy_from_slice(line.as_bytes());
        s
    }

    /// A disk of `capacity` sectors after the guest wrote 1..=`last`.
    fn disk(capacity: usize, last: u64) -> Vec<u8> {
        let mut img = vec![0u8; capacity * SECTOR];
        for n in 1..=last {
            let at = ((n - 1) % capacity as u64) as usize * SECTOR;
            img[at..at + SECTOR].copy_from_slice(&record(n));
        }
        img
    }

    #[test]
    fn reads_sectors() {
        assert_eq!(read_sector(&record(42)), Sector::Record(42));
        assert_eq!(read_sector(&[0u8; SECTOR]), Sector::Zeros);
        let mut s = record(42);
        s[100] = 1;
        assert_eq!(read_sector(&s), Sector::Other, "a byte after the line");
        let mut s = [0u8; SECTOR];
        s[..21].copy_from_slice(b"ftguest sector hb=07\n");
        assert_eq!(read_sector(&s), Sector::Other, "not the guest's digits");
        let mut s = [0u8; SECTOR];
        s[..19].copy_from_slice(b"ftguest sector hb=7");
        assert_eq!(read_sector(&s), Sector::Other, "no newline");
        let mut s = [0u8; SECTOR];
        s[3] = 0xff;
        assert_eq!(read_sector(&s), Sector::Other);
    }

    #[test]
    fn a_replica_with_every_record_is_ok() {
        let ok = check_replica(&disk(64, 40), 40).unwrap();
        assert_eq!((ok.last_record, ok.last_hb), (40, 40));
        // Past a lap: the newest record at every sector.
        let ok = check_replica(&disk(64, 150), 150).unwrap();
        assert_eq!(ok.last_record, 150);
    }

    #[test]
    fn the_last_record_may_be_unwritten() {
        // Stopped between hb=40's line and its record.
        let ok = check_replica(&disk(64, 39), 40).unwrap();
        assert_eq!((ok.last_record, ok.last_hb), (39, 40));
        // Past a lap: its sector still holds the record a lap before.
        let ok = check_replica(&disk(64, 149), 150).unwrap();
        assert_eq!(ok.last_record, 149);
        // But not two.
        let e = check_replica(&disk(64, 38), 40).unwrap_err();
        assert_eq!(
            e,
            ReplicaFail::Sector {
                lba: 38,
                found: Sector::Zeros,
                expected: Sector::Record(39),
                last_hb: 40
            }
        );
    }

    #[test]
    fn the_first_wrong_sector_fails() {
        // A record beyond what the standby printed.
        let e = check_replica(&disk(64, 41), 40).unwrap_err();
        assert!(
            matches!(
                e,
                ReplicaFail::Sector {
                    lba: 40,
                    found: Sector::Record(41),
                    expected: Sector::Zeros,
                    ..
                }
            ),
            "{e:?}"
        );
        // An earlier record missing (the in-flight epoch's write not redone).
        let mut img = disk(64, 40);
        img[10 * SECTOR..11 * SECTOR].fill(0);
        let e = check_replica(&img, 40).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sector 10 holds zeros, expected the record of hb=11 (standby printed up to hb=40)"
        );
        // A stale record from the lap before.
        let mut img = disk(64, 100);
        img[5 * SECTOR..6 * SECTOR].copy_from_slice(&record(6));
        let e = check_replica(&img, 100).unwrap_err();
        assert!(
            matches!(
                e,
                ReplicaFail::Sector {
                    lba: 5,
                    found: Sector::Record(6),
                    expected: Sector::Record(70),
                    ..
                }
            ),
            "{e:?}"
        );
        // Garbage where zeros belong.
        let mut img = disk(64, 10);
        img[50 * SECTOR + 7] = 1;
        let e = check_replica(&img, 10).unwrap_err();
        assert!(
            matches!(
                e,
                ReplicaFail::Sector {
                    lba: 50,
                    found: Sector::Other,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(check_replica(&[0; 100], 1), Err(ReplicaFail::Size(100)));
        assert_eq!(check_replica(&[], 1), Err(ReplicaFail::Size(0)));
    }

    #[test]
    fn highest_record_of_an_image() {
        assert_eq!(highest_record(&disk(64, 0)), 0);
        assert_eq!(highest_record(&disk(64, 40)), 40);
        assert_eq!(highest_record(&disk(64, 150)), 150);
    }

    #[test]
    fn images_are_zeroed_and_sized() {
        let dir = std::env::temp_dir().join(format!("ftvmm-demo-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.img");
        std::fs::write(&p, b"old").unwrap();
        create_image(&p).unwrap();
        let img = read_image(&p).unwrap();
        assert_eq!(img.len() as u64, IMAGE_BYTES);
        assert!(img.iter().all(|&b| b == 0));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
