//! A loopback TCP relay between a primary and its standby, for the channel
//! security tests: it records what the primary sends on each connection
//! and can flip one byte in one direction of one connection.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Which way bytes travel through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Primary to standby (checkpoints, the primary's heartbeats).
    ToStandby,
    /// Standby to primary (acks, the standby's heartbeats).
    ToPrimary,
}

/// Flip the middle byte of the first read of `way` on connection number
/// `connection` (0: the data channel, 1: the heartbeat connection, in the
/// order a primary opens them) that happens `after` the connection opened.
#[derive(Debug, Clone, Copy)]
pub struct Tamper {
    pub connection: usize,
    pub way: Way,
    pub after: Duration,
}

/// What the primary sent on one connection, filled as it goes.
type Log = Arc<Mutex<Vec<u8>>>;

/// A running relay; dropping it stops accepting (connections in flight go
/// on until either side closes).
pub struct Relay {
    pub addr: SocketAddr,
    /// What the primary sent on each connection, in connection order.
    pub recorded: Arc<Mutex<Vec<Log>>>,
    /// Set once the byte was flipped.
    pub flipped: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Relays connections to `target`, tampering as told.
    pub fn start(target: SocketAddr, tamper: Option<Tamper>) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let recorded: Arc<Mutex<Vec<Log>>> = Arc::default();
        let flipped = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (recorded, flipped, stop) = (recorded.clone(), flipped.clone(), stop.clone());
            thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let Ok((from_p, _)) = l.accept() else {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    from_p.set_nonblocking(false).unwrap();
                    let Ok(to_s) = TcpStream::connect(target) else {
                        continue;
                    };
                    let log = Arc::new(Mutex::new(Vec::new()));
                    recorded.lock().unwrap().push(log.clone());
                    let opened = Instant::now();
                    let flip = |way| {
                        tamper
                            .filter(|t| t.connection == n && t.way == way)
                            .map(|t| (opened + t.after, flipped.clone()))
                    };
                    pump(
                        from_p.try_clone().unwrap(),
                        to_s.try_clone().unwrap(),
                        Some(log),
                        flip(Way::ToStandby),
                    );
                    pump(to_s, from_p, None, flip(Way::ToPrimary));
                    n += 1;
                }
            });
        }
        Relay {
            addr,
            recorded,
            flipped,
            stop,
        }
    }

    /// The bytes the primary sent on connection `i`.
    pub fn sent_on(&self, i: usize) -> Vec<u8> {
        self.recorded.lock().unwrap()[i].lock().unwrap().clone()
    }

    /// Connections relayed so far.
    pub fn connections(&self) -> usize {
        self.recorded.lock().unwrap().len()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies `from` to `to` on a thread until either ends, recording into
/// `log` and flipping one byte once `flip`'s time has come.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    log: Option<Log>,
    mut flip: Option<(Instant, Arc<AtomicBool>)>,
) {
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(log) = &log {
                log.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            if let Some((when, done)) = &flip {
                if Instant::now() >= *when {
                    buf[n / 2] ^= 0x20;
                    done.store(true, Ordering::SeqCst);
                    flip = None;
                }
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        let _ = from.shutdown(Shutdown::Read);
    });
}
