//! Console transcripts across a failover, and DESIGN's exactly-once property
//! ("The test guest"): the primary's released output followed by the
//! standby's shows every counter value at most once and in order; at most
//! the output of the epoch in flight at the failure is missing.
//!
//! Transcripts are read as the files a `--serial file:PATH` console wrote.
//! Only complete lines count: a guest stopped, paused or killed in the
//! middle of a line leaves a prefix ("ftguest hb=1" of "ftguest hb=18")
//! that is not a heartbeat. The one line that may straddle the takeover is
//! judged as a whole (see [`check_exactly_once`]).

/// The test guest's heartbeat line: `ftguest hb=<n>` (a '\r' at its end
/// is allowed).
pub fn hb_line(line: &str) -> Option<u64> {
    strip_cr(line).strip_prefix("ftguest hb=")?.parse().ok()
}

/// `parse` applied to each complete line of `text` (one that ends in '\n';
/// the newline and a '\r' before it are not passed), the lines it accepts.
pub fn complete_lines<T>(text: &str, parse: impl Fn(&str) -> Option<T>) -> Vec<T> {
    text.split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
        .filter_map(|l| parse(strip_cr(l)))
        .collect()
}

/// The heartbeat numbers of a test-guest transcript, in order.
pub fn heartbeats(text: &str) -> Vec<u64> {
    complete_lines(text, hb_line)
}

fn strip_cr(line: &str) -> &str {
    line.strip_suffix('\r').unwrap_or(line)
}

/// Which side of the failover a transcript came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The primary's released output.
    Primary,
    /// The standby's output after it took over.
    Standby,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Primary => "primary",
            Side::Standby => "standby",
        })
    }
}

/// How a failover transcript breaks the exactly-once property.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranscriptError {
    /// Nothing countable on one side.
    #[error("the {0}'s transcript has no complete counter line")]
    Empty(Side),
    /// A hole or a step back within one side.
    #[error("the {side}'s output is not consecutive: {prev} followed by {next}")]
    NotConsecutive {
        /// The side.
        side: Side,
        /// A counter value.
        prev: u64,
        /// The value on the next line.
        next: u64,
    },
    /// The standby showed again what the primary had released (or the
    /// guest was rebooted rather than resumed).
    #[error(
        "output repeated across the takeover: the primary released up to {primary_last}, \
         the standby restarted at {standby_first}"
    )]
    Repeated {
        /// The primary's last released value.
        primary_last: u64,
        /// The standby's first value.
        standby_first: u64,
    },
}

/// What a failover transcript that keeps the property shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Continuity {
    /// First value the primary released.
    pub primary_first: u64,
    /// Last complete value the primary released.
    pub primary_last: u64,
    /// First value of the standby: the junction line when the standby
    /// finished the line the primary's output ended in the middle of.
    pub standby_first: u64,
    /// Last complete value of the standby.
    pub standby_last: u64,
    /// Values lost with the in-flight epoch.
    pub lost: u64,
    /// What the junction line read as when it was garbled (the primary's
    /// half-released line glued to the standby's output after a lost
    /// in-flight epoch); it is counted as lost, not as a repeat.
    pub garbled_junction: Option<u64>,
}

/// Checks the exactly-once property of the primary's released output
/// `primary` followed by the standby's `standby`, reading counter values
/// with `parse` (e.g. [`hb_line`]): consecutive within each side, a gap
/// only at the takeover, and the standby going on counting.
///
/// The line the primary's output ends in the middle of is the junction:
/// the standby resumes at the same epoch boundary and so may finish it with
/// its first bytes, which then read as the value just before its next line.
/// If the epoch in flight was lost instead, the half line glues to whatever
/// the standby printed next and reads as anything (or nothing): such a
/// garbled junction counts as lost output, not as a repeat, and the complete
/// lines on both sides are still checked.
pub fn check_exactly_once(
    primary: &str,
    standby: &str,
    parse: impl Fn(&str) -> Option<u64>,
) -> Result<Continuity, TranscriptError> {
    let p_tail = primary.rsplit_once('\n').map_or(primary, |(_, t)| t);
    let (s_head, s_rest) = if p_tail.is_empty() {
        ("", standby)
    } else {
        standby.split_once('\n').unwrap_or((standby, ""))
    };
    let p = complete_lines(primary, &parse);
    let s = complete_lines(s_rest, &parse);
    let junction = parse(strip_cr(&format!("{p_tail}{s_head}")));
    let (Some(&primary_first), Some(&primary_last)) = (p.first(), p.last()) else {
        return Err(TranscriptError::Empty(Side::Primary));
    };
    consecutive(Side::Primary, &p)?;
    let (Some(&s_first), Some(&standby_last)) = (s.first(), s.last()) else {
        return Err(TranscriptError::Empty(Side::Standby));
    };
    consecutive(Side::Standby, &s)?;
    let (standby_first, garbled_junction) = match junction {
        Some(j) if j + 1 == s_first && j > primary_last => (j, None),
        Some(j) => (s_first, Some(j)),
        None => (s_first, None),
    };
    if standby_first <= primary_last {
        return Err(TranscriptError::Repeated {
            primary_last,
            standby_first,
        });
    }
    Ok(Continuity {
        primary_first,
        primary_last,
        standby_first,
        standby_last,
        lost: standby_first - primary_last - 1,
        garbled_junction,
    })
}

fn consecutive(side: Side, values: &[u64]) -> Result<(), TranscriptError> {
    match values.windows(2).find(|w| w[1] != w[0] + 1) {
        Some(w) => Err(TranscriptError::NotConsecutive {
            side,
            prev: w[0],
            next: w[1],
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hbs(range: std::ops::RangeInclusive<u64>) -> String {
        range.map(|n| format!("ftguest hb={n}\n")).collect()
    }

    fn check(p: &str, s: &str) -> Result<Continuity, TranscriptError> {
        check_exactly_once(p, s, hb_line)
    }

    #[test]
    fn complete_lines_only() {
        // A guest stopped mid-line left "ftguest hb=1" of "ftguest hb=18".
        assert_eq!(
            heartbeats(&format!("{}ftguest hb=1", hbs(16..=17))),
            [16, 17]
        );
        assert_eq!(heartbeats("ftguest ready\r\nftguest hb=1\r\n"), [1]);
        assert_eq!(hb_line("ftguest hb=7\r"), Some(7));
        assert_eq!(
            heartbeats("ftguest hb=x\n ftguest hb=2\nftguest hb=3"),
            [0u64; 0]
        );
        assert_eq!(complete_lines("a\nb\n", |l| Some(l.len())), [1, 1]);
    }

    #[test]
    fn ok_with_and_without_a_gap() {
        let p = format!("ftguest ready\n{}", hbs(1..=10));
        let c = check(&p, &hbs(13..=20)).unwrap();
        assert_eq!(
            c,
            Continuity {
                primary_first: 1,
                primary_last: 10,
                standby_first: 13,
                standby_last: 20,
                lost: 2,
                garbled_junction: None,
            }
        );
        assert_eq!(check(&p, &hbs(11..=12)).unwrap().lost, 0);
    }

    #[test]
    fn junction_line_finished_by_the_standby() {
        let p = format!("{}ftguest hb=1", hbs(1..=10));
        let c = check(&p, &format!("1\n{}", hbs(12..=14))).unwrap();
        assert_eq!((c.primary_last, c.standby_first, c.lost), (10, 11, 0));
        assert_eq!(c.garbled_junction, None);
        // A junction cut before the number.
        let p = format!("{}ftguest h", hbs(1..=10));
        let c = check(&p, &format!("b=11\n{}", hbs(12..=14))).unwrap();
        assert_eq!((c.standby_first, c.lost), (11, 0));
        // With "\r\n" line ends (a Linux console).
        let p = "ftguest hb=1\r\nftguest hb=2\r\nftguest hb=";
        let c = check(p, "3\r\nftguest hb=4\r\n").unwrap();
        assert_eq!((c.primary_last, c.standby_first, c.lost), (2, 3, 0));
    }

    #[test]
    fn garbled_junction_counts_as_lost_not_repeated() {
        // The in-flight epoch was lost mid-line: the primary's half line
        // glues to the standby's next output ("ftguest hb=1" + "" reads as
        // hb=1, below what the primary released).
        let p = format!("{}ftguest hb=1", hbs(1..=10));
        let c = check(&p, &format!("\n{}", hbs(13..=14))).unwrap();
        assert_eq!((c.primary_last, c.standby_first, c.lost), (10, 13, 2));
        assert_eq!(c.garbled_junction, Some(1));
        // Glued to the tail of a later line: reads as a number that does not
        // lead into the standby's next line.
        let c = check(&p, &format!("3\n{}", hbs(24..=25))).unwrap();
        assert_eq!(
            (c.standby_first, c.lost, c.garbled_junction),
            (24, 13, Some(13))
        );
        // Reads as nothing at all.
        let c = check(&p, &format!("x\n{}", hbs(12..=13))).unwrap();
        assert_eq!((c.standby_first, c.lost, c.garbled_junction), (12, 1, None));
    }

    #[test]
    fn repeats_and_reboots_fail() {
        let p = hbs(1..=10);
        let e = check(&p, &hbs(10..=12)).unwrap_err();
        assert_eq!(
            e,
            TranscriptError::Repeated {
                primary_last: 10,
                standby_first: 10
            }
        );
        assert!(e.to_string().contains("repeated"), "{e}");
        // A guest rebooted instead of resumed starts counting again.
        let e = check(&p, &format!("ftguest ready\n{}", hbs(1..=3))).unwrap_err();
        assert!(matches!(e, TranscriptError::Repeated { .. }), "{e}");
        // A junction finished into an old number is a repeat too.
        let p2 = format!("{}ftguest hb=", hbs(1..=10));
        let e = check(&p2, &format!("9\n{}", hbs(10..=11))).unwrap_err();
        assert!(matches!(e, TranscriptError::Repeated { .. }), "{e}");
    }

    #[test]
    fn holes_within_a_side_fail() {
        let holey = format!("{}{}", hbs(1..=3), hbs(5..=6));
        let e = check(&holey, &hbs(8..=9)).unwrap_err();
        assert_eq!(
            e,
            TranscriptError::NotConsecutive {
                side: Side::Primary,
                prev: 3,
                next: 5
            }
        );
        assert!(e
            .to_string()
            .contains("primary's output is not consecutive"));
        let e = check(&hbs(1..=10), &format!("{}{}", hbs(11..=12), hbs(14..=15))).unwrap_err();
        assert!(
            e.to_string()
                .contains("standby's output is not consecutive"),
            "{e}"
        );
    }

    #[test]
    fn an_empty_side_fails() {
        assert_eq!(
            check("", &hbs(1..=2)).unwrap_err(),
            TranscriptError::Empty(Side::Primary)
        );
        // A primary that never finished a line released nothing countable.
        assert_eq!(
            check("ftguest hb=1", &hbs(2..=3)).unwrap_err(),
            TranscriptError::Empty(Side::Primary)
        );
        assert_eq!(
            check(&hbs(1..=10), "").unwrap_err(),
            TranscriptError::Empty(Side::Standby)
        );
        // The standby killed mid-line before its first complete line.
        assert_eq!(
            check(&hbs(1..=10), "ftguest hb=1").unwrap_err(),
            TranscriptError::Empty(Side::Standby)
        );
    }

    #[test]
    fn the_standby_cut_mid_line_at_its_end_is_fine() {
        let c = check(&hbs(1..=10), &format!("{}ftguest hb=1", hbs(11..=15))).unwrap();
        assert_eq!((c.standby_first, c.standby_last, c.lost), (11, 15, 0));
    }

    #[test]
    fn any_counter_line_format() {
        // The tiny Linux guest: "ftlinux n=<n> up=<secs>", "\r\n" line ends.
        let parse_n = |l: &str| {
            l.strip_prefix("ftlinux n=")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        };
        let p = "ftlinux ready\r\nftlinux n=1 up=1.00\r\nftlinux n=2 up=1.50\r\nftlinux n=3 u";
        let s = "p=2.00\r\nftlinux n=4 up=2.50\r\n";
        let c = check_exactly_once(p, s, parse_n).unwrap();
        assert_eq!((c.primary_last, c.standby_first, c.lost), (2, 3, 0));
        let e = check_exactly_once(p, "\nftlinux n=2 up=3.00\n", parse_n).unwrap_err();
        assert!(matches!(e, TranscriptError::Repeated { .. }), "{e}");
    }
}
