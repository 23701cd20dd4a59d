//! The `plug` backend: the kernel holds the frames, as Remus and the QEMU
//! MC spec do it.
//!
//! Set-up, per NIC (all undone on drop or on a failed start):
//! 1. an IFB device `ftapifb<pid><n>`, brought up;
//! 2. an `sch_plug` qdisc as its root (`1:`, byte limit = the netbuf
//!    limit) — created first, so a kernel without `sch_plug` is found
//!    before the tap is touched;
//! 3. the `ingress` qdisc on the tap, and a u32 match-all filter on it whose
//!    `mirred` action redirects every frame the guest sends (the tap's
//!    ingress) to the IFB's egress, where the plug holds it; what the plug
//!    lets out the IFB hands back to the stack as if received on the tap.
//!
//! Epochs (two plugs in flight, as the MC spec's steps): [`OutputCommit::hold`]
//! inserts the first plug; each [`OutputCommit::seal`] inserts a plug
//! (`TCQ_PLUG_BUFFER`), closing the epoch behind it; each ack releases the
//! oldest closed epoch (`TCQ_PLUG_RELEASE_ONE`); losing the standby unplugs
//! for good (`TCQ_PLUG_RELEASE_INDEFINITE`). `sch_plug` counts only the
//! last closed epoch and the open one, which is exactly what the epoch
//! driver keeps in flight (epoch n is released before n + 1 is sealed).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use crate::netlink::{self, NetlinkError, PlugAction, Socket};
use crate::{Backend, Held, NetOutput, NetbufError, NetbufReport, OutputCommit};

/// Time given to the kernel to send what a last release let out before a
/// fenced primary tears the plug (and what it still holds) down.
const DRAIN_BEFORE_DISCARD: Duration = Duration::from_millis(20);

#[derive(Debug)]
struct Link {
    tap: String,
    tap_index: u32,
    ifb: String,
    ifb_index: u32,
    /// Set-up steps done, for the teardown.
    ingress: bool,
}

#[derive(Debug)]
struct State {
    sock: Socket,
    links: Vec<Link>,
    /// Sealed epochs not yet released, oldest first.
    sealed: VecDeque<u64>,
    /// Torn down (fenced) or unplugged for good.
    done: bool,
    report: NetbufReport,
}

/// The plug backend.
#[derive(Debug)]
pub struct PlugBuffer {
    state: Mutex<State>,
}

/// The IFB name for NIC `nic` of this process (≤ 15 bytes).
pub fn ifb_name(nic: usize) -> String {
    format!("ftapifb{}{nic}", std::process::id() % 100_000)
}

fn nl(what: String) -> impl FnOnce(NetlinkError) -> NetbufError {
    move |source| NetbufError::Netlink { what, source }
}

impl State {
    fn new(limit: usize) -> Result<State, NetbufError> {
        let sock = Socket::open().map_err(nl("opening a NETLINK_ROUTE socket".into()))?;
        Ok(State {
            sock,
            links: Vec::new(),
            sealed: VecDeque::new(),
            done: false,
            report: NetbufReport {
                limit_bytes: limit as u64,
                ..NetbufReport::default()
            },
        })
    }

    /// Set-up step 1 for NIC `n` on `tap`: its IFB, brought up.
    fn add_ifb(&mut self, n: usize, tap: &str) -> Result<(), NetbufError> {
        let tap_index = self
            .sock
            .ifindex(tap)
            .map_err(nl(format!("finding tap '{tap}'")))?;
        let ifb = ifb_name(n);
        // A leftover of a killed process with the same pid.
        if let Ok(old) = self.sock.ifindex(&ifb) {
            let _ = self.sock.request(netlink::del_link(old));
        }
        self.sock
            .request(netlink::new_ifb(&ifb))
            .map_err(|source| NetbufError::NoIfb {
                ifb: ifb.clone(),
                source,
            })?;
        let ifb_index = self
            .sock
            .ifindex(&ifb)
            .map_err(nl(format!("finding '{ifb}'")))?;
        self.links.push(Link {
            tap: tap.to_string(),
            tap_index,
            ifb: ifb.clone(),
            ifb_index,
            ingress: false,
        });
        self.sock
            .request(netlink::set_up(ifb_index))
            .map_err(nl(format!("bringing '{ifb}' up")))
    }

    /// Set-up step 2 for the last IFB: the plug qdisc, passing everything
    /// until protection begins.
    fn add_plug(&mut self, limit: u32) -> Result<(), NetbufError> {
        let l = self.links.last().expect("add_ifb first");
        let (ifb, ifb_index) = (l.ifb.clone(), l.ifb_index);
        self.sock
            .request(netlink::new_plug(ifb_index, limit))
            .map_err(|source| match source.errno() {
                Some(libc::ENOENT) | Some(libc::EOPNOTSUPP) => NetbufError::NoSchPlug {
                    ifb: ifb.clone(),
                    source,
                },
                _ => NetbufError::Netlink {
                    what: format!("adding the plug qdisc to '{ifb}'"),
                    source,
                },
            })?;
        self.sock
            .request(netlink::plug_command(
                ifb_index,
                PlugAction::ReleaseIndefinite,
            ))
            .map_err(nl(format!("unplugging '{ifb}'")))
    }

    /// Set-up step 3 for the last link: the tap's ingress redirected to
    /// its IFB.
    fn add_redirect(&mut self) -> Result<(), NetbufError> {
        let l = self.links.last_mut().expect("add_ifb first");
        self.sock
            .request(netlink::new_ingress(l.tap_index))
            .map_err(nl(format!("adding the ingress qdisc to '{}'", l.tap)))?;
        l.ingress = true;
        self.sock
            .request(netlink::new_redirect(l.tap_index, l.ifb_index))
            .map_err(nl(format!("redirecting '{}' to '{}'", l.tap, l.ifb)))
    }

    fn command(&mut self, action: PlugAction) {
        for l in &self.links {
            if let Err(e) = self
                .sock
                .request(netlink::plug_command(l.ifb_index, action))
            {
                log::error!("netbuf plug: {action:?} on '{}' failed: {e}", l.ifb);
            }
        }
    }

    fn teardown(&mut self) {
        for l in self.links.drain(..) {
            if l.ingress {
                if let Err(e) = self.sock.request(netlink::del_ingress(l.tap_index)) {
                    log::warn!(
                        "netbuf plug: removing the ingress qdisc of '{}': {e}",
                        l.tap
                    );
                }
            }
            if let Err(e) = self.sock.request(netlink::del_link(l.ifb_index)) {
                log::warn!("netbuf plug: removing '{}': {e}", l.ifb);
            }
        }
    }
}

impl PlugBuffer {
    /// Sets up the IFB, plug qdisc and redirect for each tap in `taps`.
    /// Fails (and undoes what it did) with [`NetbufError::NoSchPlug`] on a
    /// kernel without `sch_plug`.
    pub fn start(taps: &[String], limit: usize) -> Result<PlugBuffer, NetbufError> {
        let mut st = State::new(limit)?;
        let limit = u32::try_from(limit).unwrap_or(u32::MAX);
        let r = taps.iter().enumerate().try_for_each(|(n, tap)| {
            st.add_ifb(n, tap)?;
            st.add_plug(limit)?;
            st.add_redirect()?;
            let ifb = &st.links[n].ifb;
            log::info!("netbuf plug: '{tap}' → '{ifb}' (sch_plug, limit {limit} bytes)");
            Ok(())
        });
        if let Err(e) = r {
            st.teardown();
            return Err(e);
        }
        Ok(PlugBuffer {
            state: Mutex::new(st),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl OutputCommit for PlugBuffer {
    fn hold(&self) {
        let mut s = self.lock();
        if !s.done {
            s.command(PlugAction::Buffer);
        }
    }

    fn seal(&self, epoch: u64) -> Held {
        let mut s = self.lock();
        if !s.done {
            s.command(PlugAction::Buffer);
            s.sealed.push_back(epoch);
        }
        Held::default()
    }

    fn release_upto(&self, epoch: u64) -> Held {
        let mut s = self.lock();
        while !s.done && s.sealed.front().is_some_and(|&e| e <= epoch) {
            s.sealed.pop_front();
            s.command(PlugAction::ReleaseOne);
        }
        Held::default()
    }

    fn discard_after(&self, _epoch: u64) {
        // What was released is on its way; the rest goes with the qdisc.
        std::thread::sleep(DRAIN_BEFORE_DISCARD);
        let mut s = self.lock();
        s.sealed.clear();
        s.teardown();
        s.done = true;
    }

    fn release_all(&self) {
        let mut s = self.lock();
        if !s.done {
            s.command(PlugAction::ReleaseIndefinite);
            s.sealed.clear();
            s.done = true;
        }
    }
}

impl NetOutput for PlugBuffer {
    fn backend(&self) -> Backend {
        Backend::Plug
    }

    fn report(&self) -> NetbufReport {
        self.lock().report
    }
}

impl Drop for PlugBuffer {
    fn drop(&mut self) {
        self.lock().teardown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::process::Command;

    use ftvmm_devices::virtio::net::Tap;

    #[test]
    fn ifb_names_fit_an_interface_name() {
        assert!(ifb_name(8).len() <= 15);
        assert!(ifb_name(0).starts_with("ftapifb"));
    }

    /// Runs `f` on a thread of its own moved into a fresh network
    /// namespace. The namespace, and every device made in it, goes away
    /// when the thread ends, however `f` ends (its panic is passed on).
    /// `f` is not run (SKIP printed) where the namespace cannot be made.
    fn in_fresh_netns(test: &'static str, f: impl FnOnce() + Send + 'static) {
        let r = std::thread::spawn(move || {
            // SAFETY: unshare(2) takes a flag word and touches none of our
            // memory; CLONE_NEWNET moves only the calling thread (this
            // test's own thread), so nothing else sees the new namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let e = std::io::Error::last_os_error();
                println!("SKIP {test}: cannot make a network namespace: {e}");
                return;
            }
            f();
        })
        .join();
        if let Err(panic) = r {
            std::panic::resume_unwind(panic);
        }
    }

    /// Runs `cmd ARGS` (in the calling thread's namespace); its stdout, or
    /// None if it failed.
    fn run(cmd: &str, args: &[&str]) -> Option<String> {
        let out = Command::new(cmd).args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn ingress_of(tap: &str) -> (String, String) {
        let qdiscs = run("tc", &["qdisc", "show", "dev", tap]).expect("tc qdisc show");
        let filters =
            run("tc", &["filter", "show", "dev", tap, "ingress"]).expect("tc filter show");
        (qdiscs, filters)
    }

    /// Against the real kernel, in a namespace of its own: the IFB, the
    /// ingress qdisc and the u32 + mirred redirect are what `tc` and `ip`
    /// read back, and all of it goes on drop; the full start either works
    /// (a kernel with sch_plug) or fails with `NoSchPlug`, leaving nothing.
    #[test]
    fn redirect_to_ifb_on_a_real_kernel_and_cleanup() {
        let test = "redirect_to_ifb_on_a_real_kernel_and_cleanup";
        in_fresh_netns(test, move || {
            if run("tc", &["-V"]).is_none() || run("ip", &["-V"]).is_none() {
                println!("SKIP {test}: no `tc` or `ip` command");
                return;
            }
            let tap_name = format!("ftnbtap{}", std::process::id() % 100_000);
            let tap = match Tap::open(&tap_name) {
                Ok(t) => t,
                Err(e) => {
                    println!("SKIP {test}: no tap device: {e}");
                    return;
                }
            };
            let link_of = |dev: &str| run("ip", &["-o", "link", "show", "dev", dev]);

            // Steps 1 and 3 (step 2 needs sch_plug).
            let mut st = State::new(1 << 20).unwrap();
            st.add_ifb(0, &tap_name).unwrap();
            let ifb = st.links[0].ifb.clone();
            assert_eq!(ifb, ifb_name(0));
            let shown = link_of(&ifb).expect("the IFB exists");
            assert!(shown.contains(",UP"), "the IFB is not up: {shown}");
            st.add_redirect().unwrap();
            let (qdiscs, filters) = ingress_of(&tap_name);
            assert!(qdiscs.contains("qdisc ingress ffff:"), "{qdiscs}");
            assert!(
                filters.contains("protocol all pref 1 u32")
                    && filters.contains("match 00000000/00000000 at 0"),
                "{filters}"
            );
            assert!(
                filters.contains(&format!("mirred (Egress Redirect to device {ifb}) stolen")),
                "{filters}"
            );
            // A second redirect on the same tap is refused, and says why.
            let e = st
                .sock
                .request(netlink::new_ingress(st.links[0].tap_index))
                .unwrap_err();
            assert_eq!(e.errno(), Some(libc::EEXIST), "{e}");
            assert!(e.to_string().starts_with("RTM_NEWQDISC: "), "{e}");

            drop(PlugBuffer {
                state: Mutex::new(st),
            });
            assert!(link_of(&ifb).is_none(), "the IFB outlived the drop");
            let (qdiscs, filters) = ingress_of(&tap_name);
            assert!(!qdiscs.contains("ingress"), "{qdiscs}");
            assert!(filters.trim().is_empty(), "{filters}");

            // The whole start.
            match PlugBuffer::start(std::slice::from_ref(&tap_name), 1 << 20) {
                Err(NetbufError::NoSchPlug { ifb: i, source }) => {
                    println!("{test}: this kernel has no sch_plug: {source}");
                    assert_eq!(i, ifb);
                    assert_eq!(source.errno(), Some(libc::ENOENT));
                }
                Ok(plug) => {
                    let q = run("tc", &["qdisc", "show", "dev", &ifb]).unwrap();
                    assert!(q.contains("qdisc plug 1: root"), "{q}");
                    assert!(ingress_of(&tap_name).1.contains("mirred"));
                    plug.hold();
                    plug.seal(1);
                    plug.release_upto(1);
                    plug.release_all();
                    drop(plug);
                }
                Err(e) => panic!("{e}"),
            }
            assert!(link_of(&ifb).is_none(), "the IFB outlived a failed start");
            assert!(!ingress_of(&tap_name).0.contains("ingress"));

            // A tap that is not there.
            let e = PlugBuffer::start(&["ftnbnone".to_string()], 1 << 20).unwrap_err();
            assert!(
                e.to_string().contains("finding tap 'ftnbnone'")
                    && e.to_string().contains("RTM_GETLINK"),
                "{e}"
            );
            drop(tap);
        });
    }
}
