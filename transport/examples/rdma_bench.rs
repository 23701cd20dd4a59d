//! RDMA against TCP in the same run (prints figures; asserts nothing).
//!
//! `cargo run --release -p ftvmm-transport --features rdma --example rdma_bench [rounds]`
//!
//! Both transports are paired on this host the way ftvmm pairs them
//! (`connect_pair_over` / `accept_data_pair`: authenticated, sealed with
//! the preferred AEAD; then again plain, as `--ft-insecure`), and measured
//! alternately, round by round:
//!
//! 1. **Stream throughput**: a 64 MiB checkpoint (16 Ki scattered pages in
//!    1 MiB slabs, plus 200 KB of state) sent with `send_checkpoint`, until
//!    the standby side decoded and verified it and acked: MB/s, median.
//! 2. **Per-epoch latency**: a checkpoint of 0, 256 and 2048 dirty pages
//!    (plus 64 KB of machine state), from the start of the send to the ack
//!    of the decoded, verified frame: median and p99.
//!
//! RDMA needs a device (`FTVMM_RDMA_DEVICE`, else the first; soft-RoCE
//! counts); where there is none, or in a build without the `rdma` feature,
//! the benchmark says so and why, and exits successfully.

#[cfg(not(feature = "rdma"))]
fn main() {
    println!(
        "rdma_bench: skipped: this build has no RDMA support \
         (run: cargo run --release -p ftvmm-transport --features rdma --example rdma_bench)"
    );
}

#[cfg(feature = "rdma")]
fn main() {
    bench::main();
}

#[cfg(feature = "rdma")]
mod bench {
    use std::thread;
    use std::time::{Duration, Instant};

    use ftvmm_checkpoint::{
        CheckpointFrame, DevicesSummary, Frame, FrameReader, GuestShape, Limits, Staging,
        StagingConfig, PAGE_SIZE,
    };
    use ftvmm_transport::rdma::probe;
    use ftvmm_transport::{
        connect_pair_over, Channel, ChannelListener, DataChannel, FtKey, HeartbeatStream,
        RdmaConfig, Security, TcpOptions, Transport,
    };

    const T: Duration = Duration::from_secs(30);
    const GUEST_PAGES: usize = 64 << 10; // a 256 MiB guest

    fn median(v: &mut [f64]) -> f64 {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    }

    fn p99(v: &mut [f64]) -> f64 {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[((v.len() as f64 - 1.0) * 0.99).round() as usize]
    }

    fn limits() -> Limits {
        let shape = GuestShape {
            mem_bytes: (GUEST_PAGES * PAGE_SIZE) as u64,
            vcpus: 1,
            cmdline: String::new(),
            devices: DevicesSummary::default(),
        };
        Limits::for_shape(&shape, u64::MAX, 1 << 20).unwrap()
    }

    /// `pages` scattered pages and `state` bytes of state, staged.
    fn staged(pages: usize, state: usize) -> Staging {
        let mut st =
            Staging::new(StagingConfig::for_guest((GUEST_PAGES * PAGE_SIZE) as u64)).unwrap();
        let mut w = st.begin_epoch();
        let mut page = [0u8; PAGE_SIZE];
        for p in 0..pages {
            page.fill(p as u8);
            let gpa = ((p * 7919) % GUEST_PAGES * PAGE_SIZE) as u64;
            w.stage_page(gpa, &page).unwrap();
        }
        w.stage_state(&vec![0x5a; state]).unwrap();
        w.finish();
        st
    }

    /// A primary's channel and a standby thread that decodes, verifies
    /// and acks every checkpoint, as ftvmm's standby does.
    fn pair(
        transport: &Transport,
        security: &Security,
    ) -> (DataChannel, HeartbeatStream, thread::JoinHandle<()>) {
        let mut l = ChannelListener::bind("127.0.0.1:0").unwrap();
        l.set_security(security.clone());
        let addr = l.local_addr();
        let standby = thread::spawn(move || {
            let (mut chan, _hb) = l.accept_data_pair(T).unwrap();
            let lim = limits();
            let mut staging = Staging::new(lim.staging_config()).unwrap();
            let mut reader = FrameReader::new(lim);
            loop {
                match reader.read_frame(&mut chan, &mut staging) {
                    Ok(Frame::Checkpoint(cp)) => {
                        chan.send_all(&cp.epoch().to_le_bytes()).unwrap();
                    }
                    Ok(Frame::Message(_)) | Err(_) => return,
                }
            }
        });
        let (mut chan, hb) =
            connect_pair_over(addr, T, &TcpOptions::default(), security, transport).unwrap();
        chan.set_read_timeout(Some(T)).unwrap();
        chan.set_write_timeout(Some(T)).unwrap();
        // The heartbeat connection stays open (unused) for the run.
        (chan, hb, standby)
    }

    /// Sends `st` as `epoch` and waits for its ack; seconds.
    fn epoch(chan: &mut DataChannel, st: &Staging, epoch: u64) -> f64 {
        let t0 = Instant::now();
        chan.send_checkpoint(&CheckpointFrame::new(st, epoch, 1))
            .unwrap();
        let mut ack = [0u8; 8];
        chan.recv_exact(&mut ack).unwrap();
        assert_eq!(u64::from_le_bytes(ack), epoch);
        t0.elapsed().as_secs_f64()
    }

    pub fn main() {
        let rounds: usize = std::env::args()
            .nth(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or(20);
        let cfg = match RdmaConfig::from_env() {
            Ok(c) => c,
            Err(e) => {
                println!("rdma_bench: skipped: {e}");
                return;
            }
        };
        let device = match probe(&cfg) {
            Ok(d) => d,
            Err(e) => {
                println!("rdma_bench: skipped: no RDMA device ({e})");
                return;
            }
        };
        println!("rdma_bench: RDMA device '{device}', {rounds} rounds, medians");
        let key = Security::keyed(FtKey::generate().unwrap());
        for (label, security) in [("sealed", key), ("plain", Security::Insecure)] {
            let transports = [Transport::Tcp, Transport::Rdma(cfg.clone())];
            let mut chans: Vec<_> = transports.iter().map(|t| pair(t, &security)).collect();
            let mut ep = 0u64;

            let big = staged(16 << 10, 200_000);
            let bytes = CheckpointFrame::new(&big, 1, 1).len() as f64;
            let mut tput = [Vec::new(), Vec::new()];
            for r in 0..=rounds.min(10) {
                for (i, (c, _, _)) in chans.iter_mut().enumerate() {
                    ep += 1;
                    let s = epoch(c, &big, ep);
                    if r > 0 {
                        tput[i].push(bytes / s / 1e6);
                    }
                }
            }
            let (t, d) = (median(&mut tput[0]), median(&mut tput[1]));
            println!(
                "{label}: 64 MiB checkpoint stream: tcp {t:.0} MB/s, rdma {d:.0} MB/s (rdma/tcp {:.2})",
                d / t
            );

            for pages in [0usize, 256, 2048] {
                let st = staged(pages, 64 << 10);
                let mut lat = [Vec::new(), Vec::new()];
                for r in 0..=rounds * 5 {
                    for (i, (c, _, _)) in chans.iter_mut().enumerate() {
                        ep += 1;
                        let s = epoch(c, &st, ep);
                        if r > 0 {
                            lat[i].push(s * 1e6);
                        }
                    }
                }
                let (tm, dm) = (median(&mut lat[0]), median(&mut lat[1]));
                println!(
                    "{label}: epoch of {pages:>4} pages + 64 KB state, send → verified ack: \
                     tcp {tm:.0} µs (p99 {:.0}), rdma {dm:.0} µs (p99 {:.0}) (rdma/tcp {:.2})",
                    p99(&mut lat[0]),
                    p99(&mut lat[1]),
                    dm / tm
                );
            }
            for (c, hb, standby) in chans.drain(..) {
                drop((c, hb));
                let _ = standby.join();
            }
        }
    }
}
