//! The RDMA channel end to end over the software fabric: the TCP bootstrap
//! with the authenticated handshake, the setup exchange, queue pair
//! connection, the data path both ways, flow control, sealing, zero-copy,
//! the keepalive, and the ends of a channel. Only [`super::verbs`] is not
//! run (it needs a device).

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ftvmm_checkpoint::{CheckpointFrame, Frame, FrameReader, Staging, StagingConfig, PAGE_SIZE};

use super::fabric::Provider;
use super::soft::SoftProvider;
use super::{RdmaConfig, RdmaError};
use crate::data::connect_rdma_pair;
use crate::secure::{FtKey, Security};
use crate::test_utils::{pattern, receiver_limits, staged_checkpoint};
use crate::{
    Channel, ChannelListener, DataChannel, FailureDetector, HeartbeatStream, KeepaliveLoss,
    PeerLost, TcpOptions, TransportError,
};

const T: Duration = Duration::from_secs(10);

fn key() -> Security {
    Security::keyed(FtKey::from_bytes(&[7; 32]).unwrap())
}

/// Small rings, so that sends wait for credits and wrap around.
fn small() -> RdmaConfig {
    RdmaConfig {
        slabs: 4,
        slab_bytes: 64 << 10,
        ..RdmaConfig::default()
    }
}

struct Pair {
    primary: DataChannel,
    standby: DataChannel,
    _hbs: (HeartbeatStream, HeartbeatStream),
    devices: (Arc<SoftProvider>, Arc<SoftProvider>),
}

/// A primary and a standby paired over loopback TCP and two soft devices.
fn pair(security: Security, cfg: RdmaConfig) -> Pair {
    let mut l = ChannelListener::bind("127.0.0.1:0").unwrap();
    l.set_security(security.clone());
    let (p_dev, s_dev) = (SoftProvider::new(), SoftProvider::new());
    l.rdma_override = Some((s_dev.clone(), cfg.clone()));
    let addr = l.local_addr();
    let p: Arc<dyn Provider> = p_dev.clone();
    let primary = thread::spawn(move || {
        connect_rdma_pair(addr, T, &TcpOptions::default(), &security, &cfg, p)
    });
    let (standby, s_hb) = l.accept_data_pair(T).unwrap();
    let (primary, p_hb) = primary.join().unwrap().unwrap();
    assert_eq!(primary.transport(), "rdma");
    assert_eq!(standby.transport(), "rdma");
    assert_eq!(primary.session(), standby.session());
    Pair {
        primary,
        standby,
        _hbs: (p_hb, s_hb),
        devices: (p_dev, s_dev),
    }
}

fn rdma(c: &DataChannel) -> &super::RdmaChannel {
    match c {
        DataChannel::Rdma(c) => c,
        DataChannel::Tcp(_) => panic!("not an RDMA channel"),
    }
}

fn rdma_mut(c: &mut DataChannel) -> &mut super::RdmaChannel {
    match c {
        DataChannel::Rdma(c) => c,
        DataChannel::Tcp(_) => panic!("not an RDMA channel"),
    }
}

/// Sends checkpoints both sides decode, and acks back: over a sealed or a
/// plain channel.
fn checkpoints_round_trip(security: Security) {
    let Pair {
        mut primary,
        mut standby,
        _hbs,
        ..
    } = pair(security.clone(), small());
    assert_eq!(
        primary.cipher().is_some(),
        matches!(security, Security::Keyed(_))
    );
    assert_eq!(primary.cipher(), standby.cipher());
    // ≈ 1.2 MiB in 300 one-page slabs: many more bytes than the 256 KiB
    // ring, so the sender waits for credits and wraps around.
    let st = staged_checkpoint(300, 70_000);
    let limits = receiver_limits(300);
    let receiver = thread::spawn(move || {
        standby.set_read_timeout(Some(T)).unwrap();
        let mut rst = Staging::new(limits.staging_config()).unwrap();
        let mut reader = FrameReader::new(limits);
        let mut got = Vec::new();
        for _ in 0..3 {
            match reader.read_frame(&mut standby, &mut rst).unwrap() {
                Frame::Checkpoint(cp) => {
                    let pages: Vec<(u64, Vec<u8>)> =
                        cp.pages().map(|(g, p)| (g, p.to_vec())).collect();
                    let mut state = Vec::new();
                    cp.copy_state_into(&mut state);
                    got.push((cp.epoch(), pages, state));
                    standby.send_all(&cp.epoch().to_le_bytes()).unwrap();
                }
                Frame::Message(m) => panic!("unexpected {m:?}"),
            }
        }
        (standby, got)
    });
    primary.set_write_timeout(Some(T)).unwrap();
    primary.set_read_timeout(Some(T)).unwrap();
    for epoch in 1..=3 {
        let frame = CheckpointFrame::new(&st, epoch, 1);
        assert_eq!(primary.send_checkpoint(&frame).unwrap(), frame.len());
        let mut ack = [0u8; 8];
        primary.recv_exact(&mut ack).unwrap();
        assert_eq!(u64::from_le_bytes(ack), epoch);
    }
    let (standby, got) = receiver.join().unwrap();
    let pages: Vec<(u64, Vec<u8>)> = st.pages().map(|(g, p)| (g, p.to_vec())).collect();
    let mut state = Vec::new();
    st.copy_state_into(&mut state);
    for (i, (epoch, p, s)) in got.into_iter().enumerate() {
        assert_eq!(epoch, i as u64 + 1);
        assert!(p == pages, "checkpoint {epoch}: pages differ");
        assert!(s == state, "checkpoint {epoch}: state differs");
    }
    let (ps, ss) = (rdma(&primary).stats(), rdma(&standby).stats());
    assert!(ps.credit_waits > 0, "the ring should have filled: {ps:?}");
    assert!(ps.slabs_sent >= 3 * 20, "{ps:?}");
    assert_eq!(ps.bytes_sent, 3 * CheckpointFrame::new(&st, 1, 1).len());
    assert_eq!(ss.bytes_received, ps.bytes_sent);
    // Plain: pages and state straight from the registered slabs (one
    // registration each, made once); sealed: everything copied.
    let staged = 3 * st.payload_len() as u64;
    let plain = primary.cipher().is_none();
    assert_eq!(ps.zero_copy_bytes, if plain { staged } else { 0 });
    let slabs = if plain { st.slab_count() as u64 } else { 0 };
    assert_eq!(rdma(&primary).registry_stats().registered, slabs);
    // Flow control kept a receive posted for every SEND.
    let soft = |c: &DataChannel| SoftProvider::stats(rdma(c).qpn());
    assert_eq!(soft(&primary).rnr, 0);
    assert_eq!(soft(&standby).rnr, 0);
    assert!(soft(&primary).max_outstanding <= super::channel::SQ_DEPTH);
}

#[test]
fn sealed_checkpoints_and_acks_cross_the_fabric_and_decode() {
    checkpoints_round_trip(key());
}

#[test]
fn plain_checkpoints_and_acks_cross_the_fabric_and_decode() {
    checkpoints_round_trip(Security::Insecure);
}

/// Stages `pages` pages (contents from `seed`) and `state` state bytes.
fn stage(st: &mut Staging, pages: usize, state: usize, seed: u64) {
    let data = pattern(pages * PAGE_SIZE, seed);
    let mut w = st.begin_epoch();
    for (i, p) in data.chunks_exact(PAGE_SIZE).enumerate() {
        w.stage_page(i as u64 * PAGE_SIZE as u64, p.try_into().unwrap())
            .unwrap();
    }
    w.stage_state(&pattern(state, seed + 1)).unwrap();
    w.finish();
}

/// A receiver that decodes checkpoints and acks each with its epoch, until
/// the channel ends; returns each checkpoint's pages and state.
fn decoder(mut standby: DataChannel) -> thread::JoinHandle<Vec<(Vec<u8>, Vec<u8>)>> {
    thread::spawn(move || {
        let limits = receiver_limits(64);
        let mut rst = Staging::new(limits.staging_config()).unwrap();
        let mut reader = FrameReader::new(limits);
        standby.set_read_timeout(Some(T)).unwrap();
        let mut got = Vec::new();
        while let Ok(Frame::Checkpoint(cp)) = reader.read_frame(&mut standby, &mut rst) {
            let pages: Vec<u8> = cp.pages().flat_map(|(_, p)| p.to_vec()).collect();
            let mut state = Vec::new();
            cp.copy_state_into(&mut state);
            got.push((pages, state));
            standby.send_all(&cp.epoch().to_le_bytes()).unwrap();
        }
        got
    })
}

/// Sends `st`'s checkpoint as `epoch` and waits for its ack.
fn send_acked(primary: &mut DataChannel, st: &Staging, epoch: u64) {
    let frame = CheckpointFrame::new(st, epoch, 1);
    assert_eq!(primary.send_checkpoint(&frame).unwrap(), frame.len());
    let mut ack = [0u8; 8];
    primary.recv_exact(&mut ack).unwrap();
    assert_eq!(u64::from_le_bytes(ack), epoch);
}

#[test]
fn a_plain_channel_sends_staging_slabs_without_a_copy() {
    let Pair {
        mut primary,
        standby,
        _hbs,
        devices,
    } = pair(Security::Insecure, small());
    primary.set_read_timeout(Some(T)).unwrap();
    let rx = decoder(standby);
    // 4-page slabs, halved after one strike.
    let mut st = Staging::new(StagingConfig {
        slab_bytes: 4 * PAGE_SIZE,
        strike_limit: 1,
        max_pages: 64,
        max_state_bytes: 1 << 20,
    })
    .unwrap();
    let mut sent = Vec::new();
    let mut expect = |st: &Staging| {
        let pages: Vec<u8> = st.pages().flat_map(|(_, p)| p.to_vec()).collect();
        let mut state = Vec::new();
        st.copy_state_into(&mut state);
        sent.push((pages, state));
    };
    let stats = |c: &DataChannel| (rdma(c).stats(), rdma(c).registry_stats());
    let base = devices.0.registrations();

    // 10 pages and 3000 state bytes: 3 slabs, registered at the first send,
    // and every page and state byte written straight from them.
    stage(&mut st, 10, 3000, 1);
    expect(&st);
    send_acked(&mut primary, &st, 1);
    let (s1, r1) = stats(&primary);
    assert_eq!((r1.registered, r1.deregistered), (3, 0));
    assert_eq!(devices.0.registrations(), base + 3);
    assert_eq!(s1.zero_copy_bytes, 10 * PAGE_SIZE as u64 + 3000);
    // The same slabs again: nothing registered, nothing looked up twice.
    stage(&mut st, 10, 3000, 2);
    expect(&st);
    send_acked(&mut primary, &st, 2);
    let (s2, r2) = stats(&primary);
    assert_eq!((r2.registered, r2.deregistered, r2.repeats), (3, 0, 0));
    assert_eq!(s2.zero_copy_bytes - s1.zero_copy_bytes, s1.zero_copy_bytes);

    // A burst grows the cache to 8 slabs: only the 5 new ones register.
    stage(&mut st, 30, 100, 3);
    assert_eq!(st.slab_count(), 8);
    expect(&st);
    send_acked(&mut primary, &st, 3);
    let (_, r3) = stats(&primary);
    assert_eq!((r3.registered, r3.deregistered), (8, 0));
    assert_eq!(devices.0.registrations(), base + 8);

    // A small checkpoint is a strike; trim halves the cache to 4 (a new
    // lineage): every registration goes, the 4 survivors register again.
    stage(&mut st, 1, 10, 4);
    assert_eq!(st.trim(), 4);
    expect(&st);
    send_acked(&mut primary, &st, 4);
    let (s4, r4) = stats(&primary);
    assert_eq!((r4.registered, r4.deregistered), (12, 8));
    assert_eq!(rdma(&primary).registered_buffers(), 4);
    assert_eq!(devices.0.registrations(), base + 4);

    // Bytes sent through send_chunks never use the registrations, even
    // from inside a registered slab.
    let slab = st.slab_buffers().next().unwrap().as_ptr();
    // SAFETY: the head slab is 4 pages long and nothing writes it meanwhile.
    let inside = unsafe { std::slice::from_raw_parts(slab, 100) };
    let bounced = s4.bounce_bytes;
    primary.send_all(inside).unwrap();
    let (s5, _) = stats(&primary);
    assert_eq!(s5.zero_copy_bytes, s4.zero_copy_bytes);
    assert_eq!(s5.bounce_bytes - bounced, 100);

    primary.shutdown().unwrap();
    let got = rx.join().unwrap();
    assert_eq!(got.len(), 4);
    for (i, (g, e)) in got.iter().zip(&sent).enumerate() {
        assert!(g == e, "checkpoint {}: received differs from sent", i + 1);
    }
}

#[test]
fn a_sealed_channel_registers_nothing_and_copies() {
    let Pair {
        mut primary,
        standby,
        _hbs,
        devices,
    } = pair(key(), small());
    primary.set_read_timeout(Some(T)).unwrap();
    let base = devices.0.registrations();
    let rx = decoder(standby);
    let st = staged_checkpoint(50, 2000);
    send_acked(&mut primary, &st, 1);
    let st_stats = rdma(&primary).stats();
    assert_eq!(st_stats.zero_copy_bytes, 0);
    assert_eq!(st_stats.bounce_bytes, CheckpointFrame::new(&st, 1, 1).len());
    assert_eq!(rdma(&primary).registry_stats().registered, 0);
    assert_eq!(devices.0.registrations(), base);
    primary.shutdown().unwrap();
    assert_eq!(rx.join().unwrap().len(), 1);
}

#[test]
fn small_reads_see_the_stream_in_order() {
    let Pair {
        mut primary,
        mut standby,
        _hbs,
        ..
    } = pair(key(), small());
    let data = pattern(300_000, 4);
    let expected = data.clone();
    // More than the ring holds: the reader must run meanwhile.
    let writer = thread::spawn(move || {
        for piece in data.chunks(7_777) {
            primary.send_all(piece).unwrap();
        }
        primary
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 1000];
    standby.set_read_timeout(Some(T)).unwrap();
    while got.len() < expected.len() {
        let n = standby.recv(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got == expected);
    writer.join().unwrap();
}

#[test]
fn an_orderly_drop_ends_the_stream_after_every_byte() {
    let Pair {
        mut primary,
        mut standby,
        _hbs,
        ..
    } = pair(key(), small());
    primary.send_all(b"last words").unwrap();
    drop(primary);
    standby.set_read_timeout(Some(T)).unwrap();
    let mut buf = [0u8; 10];
    standby.recv_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"last words");
    assert_eq!(standby.recv(&mut buf).unwrap(), 0, "then the end");
    match standby.recv_exact(&mut buf) {
        Err(TransportError::Closed {
            got: 0, wanted: 10, ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn shutdown_from_a_clone_unblocks_a_reader_and_the_peer_sees_the_end() {
    let Pair {
        mut primary,
        mut standby,
        _hbs,
        ..
    } = pair(key(), small());
    let clone = standby.try_clone().unwrap();
    assert!(
        matches!(
            clone.try_clone().unwrap().recv(&mut [0u8; 1]),
            Err(TransportError::Rdma(RdmaError::Clone { .. }))
        ),
        "clones only shut down"
    );
    let reader = thread::spawn(move || {
        let t0 = Instant::now();
        let r = standby.recv(&mut [0u8; 16]);
        (r, t0.elapsed())
    });
    thread::sleep(Duration::from_millis(50));
    clone.shutdown().unwrap();
    let (r, waited) = reader.join().unwrap();
    assert_eq!(r.unwrap(), 0);
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    // The primary learns from the bootstrap connection's end.
    primary.set_read_timeout(Some(T)).unwrap();
    assert_eq!(primary.recv(&mut [0u8; 4]).unwrap(), 0);
    let err = primary.send_all(b"x").unwrap_err();
    assert_eq!(err.io_kind(), std::io::ErrorKind::BrokenPipe, "{err}");
}

#[test]
fn a_read_timeout_is_a_typed_error() {
    let Pair {
        primary: _p,
        mut standby,
        _hbs,
        ..
    } = pair(key(), small());
    standby
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let t0 = Instant::now();
    let err = standby.recv(&mut [0u8; 4]).unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Timeout {
                op: "receive from",
                ..
            }
        ),
        "{err}"
    );
    assert!(t0.elapsed() >= Duration::from_millis(50));
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_peer_that_reads_nothing_times_the_send_out() {
    let Pair {
        mut primary,
        standby: _s,
        _hbs,
        ..
    } = pair(key(), small());
    primary
        .set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let err = primary.send_all(&vec![0u8; 4 << 20]).unwrap_err();
    assert!(
        matches!(err, TransportError::Timeout { op: "send to", .. }),
        "{err}"
    );
    // The stream is unusable afterwards, as over TCP.
    assert!(primary.send_all(b"x").is_err());
}

#[test]
fn the_keepalive_keeps_a_live_peer_and_loses_a_frozen_one() {
    let Pair {
        mut primary,
        mut standby,
        _hbs,
        ..
    } = pair(key(), small());
    // ftvmm's default: 50 ms, lost after 5 silent intervals.
    let hb = Duration::from_millis(50);
    let p_det = Arc::new(FailureDetector::new(1, hb * 5).unwrap());
    let s_det = Arc::new(FailureDetector::new(1, hb * 5).unwrap());
    primary.start_keepalive(&p_det, hb, 5).unwrap();
    standby.start_keepalive(&s_det, hb, 5).unwrap();
    // Both alive for several loss timeouts.
    assert_eq!(p_det.wait_failure(Duration::from_millis(1000)), None);
    assert_eq!(s_det.failure(), None);
    // The standby freezes (its keepalive stops writing; its device still
    // takes the primary's writes): the primary loses it about 5 × 50 ms
    // after the last change it saw.
    rdma_mut(&mut standby).pause_keepalive();
    let t0 = Instant::now();
    let lost = p_det.wait_failure(Duration::from_secs(5)).expect("lost");
    let took = t0.elapsed();
    assert!(
        matches!(lost, PeerLost::Keepalive(KeepaliveLoss::Silent { quiet_ms }) if quiet_ms >= 250),
        "{lost:?}"
    );
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(s_det.failure(), None, "the frozen side judges nothing");
    assert!(lost
        .to_string()
        .starts_with("no RDMA keepalive from the peer for"));
}

#[test]
fn the_keepalive_loses_a_peer_whose_queue_pair_is_gone() {
    let Pair {
        mut primary,
        standby,
        _hbs,
        ..
    } = pair(key(), small());
    let hb = Duration::from_millis(50);
    let det = Arc::new(FailureDetector::new(1, hb * 5).unwrap());
    primary.start_keepalive(&det, hb, 5).unwrap();
    drop(standby);
    let lost = det.wait_failure(Duration::from_secs(5)).expect("lost");
    assert!(matches!(lost, PeerLost::Keepalive(_)), "{lost:?}");
}

#[test]
fn a_standby_without_a_device_refuses_and_the_primary_says_why() {
    if super::verbs::DeviceList::new().is_ok_and(|l| !l.names().is_empty()) {
        eprintln!("SKIP a_standby_without_a_device_refuses_and_the_primary_says_why: this host has an RDMA device");
        return;
    }
    let mut l = ChannelListener::bind("127.0.0.1:0").unwrap();
    l.set_security(key());
    let addr = l.local_addr();
    let primary = thread::spawn(move || {
        let p: Arc<dyn Provider> = SoftProvider::new();
        connect_rdma_pair(addr, T, &TcpOptions::default(), &key(), &small(), p)
    });
    let err = l.accept_data_pair(T).unwrap_err();
    assert!(err.is_per_connection(), "{err}");
    let p_err = primary.join().unwrap().unwrap_err();
    let line = p_err.to_string();
    assert!(
        line.starts_with(&format!(
            "{addr} cannot use RDMA: standby: no RDMA device found"
        )),
        "{line}"
    );
    assert!(!line.contains('\n'));
}

#[test]
fn a_primary_without_a_device_fails_before_connecting() {
    if super::verbs::DeviceList::new().is_ok_and(|l| !l.names().is_empty()) {
        eprintln!(
            "SKIP a_primary_without_a_device_fails_before_connecting: this host has an RDMA device"
        );
        return;
    }
    // Nobody listens there: a connection attempt would fail differently.
    let err = crate::connect_pair_over(
        "127.0.0.1:9",
        T,
        &TcpOptions::default(),
        &key(),
        &crate::Transport::Rdma(RdmaConfig::default()),
    )
    .unwrap_err();
    assert!(
        matches!(err, TransportError::Rdma(RdmaError::NoDevice)),
        "{err}"
    );
}

#[test]
fn dropping_the_channels_releases_every_registration() {
    let Pair {
        mut primary,
        standby,
        _hbs,
        devices,
    } = pair(Security::Insecure, small());
    primary.set_read_timeout(Some(T)).unwrap();
    let rx = decoder(standby);
    let st = staged_checkpoint(1, 10);
    send_acked(&mut primary, &st, 1);
    // Ring, control buffers, keepalive slot, bounce ring; plus the slabs.
    assert_eq!(st.slab_count(), 2);
    assert_eq!(devices.0.registrations(), 6);
    assert_eq!(devices.1.registrations(), 4);
    let clone = primary.try_clone().unwrap();
    drop(primary);
    // The standby's decoder sees the end and drops its channel.
    assert_eq!(rx.join().unwrap().len(), 1);
    assert_eq!(devices.0.registrations(), 0);
    assert_eq!(devices.1.registrations(), 0);
    clone.shutdown().unwrap(); // a clone outliving its channel is harmless
}

#[test]
fn a_record_altered_in_the_ring_is_refused() {
    let Pair {
        mut primary,
        mut standby,
        _hbs,
        ..
    } = pair(key(), small());
    primary.send_all(&pattern(5000, 5)).unwrap();
    // The record is in slab 0 of the standby's ring, not taken yet.
    rdma_mut(&mut standby).corrupt_ring(0, 1234);
    standby.set_read_timeout(Some(T)).unwrap();
    let err = standby.recv_exact(&mut [0u8; 5000]).unwrap_err();
    assert!(matches!(err, TransportError::Tampered { .. }), "{err}");
    let err = standby.recv(&mut [0u8; 1]).unwrap_err();
    assert!(err.to_string().contains("failed earlier"), "{err}");
}

#[test]
fn a_plain_record_altered_in_the_ring_goes_through_unnoticed() {
    // What --ft-insecure means: nothing is checked (the frame checksum of
    // the checkpoint format above still is).
    let Pair {
        mut primary,
        mut standby,
        _hbs,
        ..
    } = pair(Security::Insecure, small());
    let data = pattern(5000, 5);
    primary.send_all(&data).unwrap();
    rdma_mut(&mut standby).corrupt_ring(0, 1234);
    let mut got = [0u8; 5000];
    standby.recv_exact(&mut got).unwrap();
    assert_ne!(&got[..], &data[..]);
}
