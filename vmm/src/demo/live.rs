//! The live status line: rewritten in place on a terminal, one line per
//! period otherwise.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// The live status line.
pub struct LiveLine {
    tty: bool,
    every: Duration,
    last: Option<Instant>,
    open: bool,
}

impl LiveLine {
    pub fn new() -> LiveLine {
        let tty = std::io::stdout().is_terminal();
        LiveLine {
            tty,
            every: if tty {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(1)
            },
            last: None,
            open: false,
        }
    }

    /// The next line is due a period from now.
    pub fn start_period(&mut self) {
        self.last = Some(Instant::now());
    }

    pub fn due(&self) -> bool {
        self.last.is_none_or(|t| t.elapsed() >= self.every)
    }

    pub fn show(&mut self, line: &str) {
        self.last = Some(Instant::now());
        let mut out = std::io::stdout().lock();
        if self.tty {
            let _ = write!(out, "\r{line}\x1b[K");
            self.open = true;
        } else {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }

    /// Ends the in-place line so that ordinary output can follow.
    pub fn finish(&mut self) {
        if self.open {
            println!();
            self.open = false;
        }
        self.last = None;
    }
}
