//! The allowlist of each kind of thread: which system calls, and for some
//! of them which arguments. Everything else traps (SIGSYS).
//!
//! Filters stack and are inherited: a thread spawned after its parent
//! installed a filter runs under the parent's as well as under the one it
//! installs itself, and a call must pass both. So the list of a thread that
//! spawns others later (the main threads, the control API, the helpers of
//! [`super::within`]) holds what its descendants need too, and every list
//! ends a thread cleanly (the exit path of glibc and Rust's std) and lets
//! the SIGSYS handler write its line ([`common`]).
//!
//! The lists were found by running every test through `strace -f` and
//! reading what each thread called after its filter was installed; see
//! docs/design.md "Sandboxing".

use std::collections::BTreeMap;

use libc::c_ulong;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::ThreadKind;
use crate::arch::x86_64::ioctls::*;

/// A condition on one argument of a call: its low 32 bits, masked by
/// `mask` when given, equal `value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cond {
    arg: u8,
    mask: Option<u64>,
    value: u64,
}

impl Cond {
    /// Argument `arg` equals `value`.
    fn eq(arg: u8, value: u64) -> Cond {
        Cond {
            arg,
            mask: None,
            value,
        }
    }

    fn compile(self) -> Result<SeccompCondition, seccompiler::BackendError> {
        let op = match self.mask {
            Some(m) => SeccompCmpOp::MaskedEq(m),
            None => SeccompCmpOp::Eq,
        };
        SeccompCondition::new(self.arg, SeccompCmpArgLen::Dword, op, self.value)
    }
}

/// An allowlist under construction: a syscall maps to `None` when any
/// arguments pass, or to the alternatives (each a conjunction of
/// conditions) of which one must hold.
#[derive(Debug, Default)]
pub(super) struct List {
    rules: BTreeMap<i64, Option<Vec<Vec<Cond>>>>,
}

impl List {
    /// Allows `calls` with any arguments.
    fn allow(&mut self, calls: &[libc::c_long]) -> &mut Self {
        for &nr in calls {
            self.rules.insert(nr, None);
        }
        self
    }

    /// Allows `call` when all of `conds` hold (or with any arguments, if it
    /// is already allowed so).
    fn allow_if(&mut self, call: libc::c_long, conds: Vec<Cond>) -> &mut Self {
        if let Some(alts) = self.rules.entry(call).or_insert_with(|| Some(Vec::new())) {
            alts.push(conds);
        }
        self
    }

    /// Allows `call` when argument `arg` is one of `values`.
    fn allow_values(&mut self, call: libc::c_long, arg: u8, values: &[u64]) -> &mut Self {
        for &v in values {
            self.allow_if(call, vec![Cond::eq(arg, v)]);
        }
        self
    }

    /// Allows `ioctl` with these requests, tested in this order (the hot
    /// ones first).
    fn ioctls(&mut self, requests: &[c_ulong]) -> &mut Self {
        let values: Vec<u64> = requests.iter().map(|&r| u64::from(r as u32)).collect();
        self.allow_values(libc::SYS_ioctl, 1, &values)
    }

    /// Allows `mmap` and `mprotect`, of pages that are never executable
    /// (`exec`: with any protection).
    fn memory(&mut self, exec: bool) -> &mut Self {
        for call in [libc::SYS_mmap, libc::SYS_mprotect] {
            if exec {
                self.allow(&[call]);
            } else {
                let no_exec = Cond {
                    arg: 2,
                    mask: Some(libc::PROT_EXEC as u64),
                    value: 0,
                };
                self.allow_if(call, vec![no_exec]);
            }
        }
        self
    }

    /// Whether `call` is allowed in some form.
    #[cfg(test)]
    pub(super) fn allows(&self, call: libc::c_long) -> bool {
        self.rules.contains_key(&call)
    }

    /// Whether everything `other` allows, this allows too.
    #[cfg(test)]
    fn covers(&self, other: &List) -> Result<(), String> {
        for (nr, alts) in &other.rules {
            match (self.rules.get(nr), alts) {
                (None, _) => return Err(format!("system call {nr}")),
                (Some(None), _) => {}
                (Some(Some(_)), None) => {
                    return Err(format!("system call {nr} with any arguments"))
                }
                (Some(Some(mine)), Some(theirs)) => {
                    if let Some(a) = theirs.iter().find(|a| !mine.contains(a)) {
                        return Err(format!("system call {nr} when {a:?}"));
                    }
                }
            }
        }
        Ok(())
    }

    /// The BPF program: allow what is listed, trap everything else.
    pub(super) fn compile(self) -> Result<BpfProgram, seccompiler::BackendError> {
        let mut rules = BTreeMap::new();
        for (nr, alts) in self.rules {
            let alts = match alts {
                None => Vec::new(),
                Some(alts) => alts
                    .into_iter()
                    .map(|conds| {
                        let conds = conds
                            .into_iter()
                            .map(Cond::compile)
                            .collect::<Result<Vec<_>, _>>()?;
                        SeccompRule::new(conds)
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            };
            rules.insert(nr, alts);
        }
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Trap,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )?;
        BpfProgram::try_from(filter)
    }
}

/// What every thread may do: allocate (never executable memory), wait on
/// futexes, sleep, read clocks, write (its logs; the SIGSYS line), close
/// what it owns, return from signal handlers, abort (signals to itself
/// only) and end.
fn common(l: &mut List, pid: u32, exec: bool) {
    use libc::*;
    l.memory(exec).allow(&[
        SYS_munmap,
        SYS_mremap,
        SYS_madvise,
        SYS_brk,
        SYS_futex,
        SYS_sched_yield,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_gettid,
        SYS_getpid,
        SYS_getrandom,
        SYS_write,
        SYS_close,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_sigaltstack,
        SYS_restart_syscall,
        SYS_exit,
        SYS_exit_group,
    ]);
    // raise(3) and abort(3): a signal to a thread of this process only.
    l.allow_if(SYS_tgkill, vec![Cond::eq(0, u64::from(pid))]);
    // The SIGSYS handler names the thread.
    l.allow_values(SYS_prctl, 0, &[PR_GET_NAME as u64]);
    // Debug builds of std check that a descriptor is open before closing it.
    l.allow_values(SYS_fcntl, 1, &[F_GETFD as u64]);
}

/// What a thread that starts threads needs, for itself and for the new
/// thread until that installs its own filter: clone3, glibc's and std's
/// thread start (robust list, rseq, affinity, the name), and the two
/// calls of a filter's installation.
fn spawner(l: &mut List) {
    use libc::*;
    l.allow(&[
        SYS_clone3,
        SYS_set_robust_list,
        SYS_rseq,
        SYS_sched_getaffinity,
    ]);
    l.allow_values(
        SYS_prctl,
        0,
        &[PR_SET_NAME as u64, PR_SET_NO_NEW_PRIVS as u64],
    );
    l.allow_values(SYS_seccomp, 0, &[u64::from(SECCOMP_SET_MODE_FILTER)]);
}

/// Event and readiness waits (eventfds are read).
fn waits(l: &mut List) {
    use libc::*;
    l.allow(&[
        SYS_poll,
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_wait,
        SYS_timerfd_create,
        SYS_timerfd_settime,
        SYS_read,
    ]);
}

/// A connected TCP or Unix stream: transfer, options, shutdown.
fn stream(l: &mut List) {
    use libc::*;
    l.allow(&[
        SYS_read,
        SYS_recvfrom,
        SYS_sendto,
        SYS_sendmsg,
        SYS_setsockopt,
        SYS_getsockopt,
        SYS_getsockname,
        SYS_getpeername,
        SYS_shutdown,
    ]);
    l.ioctls(&[FIONBIO]);
    l.allow_values(
        SYS_fcntl,
        1,
        &[
            F_GETFD as u64,
            F_SETFD as u64,
            F_GETFL as u64,
            F_SETFL as u64,
            F_DUPFD_CLOEXEC as u64,
        ],
    );
}

/// Name lookups (getaddrinfo(3)): NSS configuration and modules,
/// /etc/hosts, DNS over UDP and TCP, netlink for the host's addresses.
fn lookups(l: &mut List) {
    use libc::*;
    l.allow(&[
        SYS_openat,
        SYS_newfstatat,
        SYS_fstat,
        SYS_lseek,
        SYS_connect,
        SYS_bind,
        SYS_recvmsg,
        SYS_sendmmsg,
        SYS_uname,
    ]);
    l.allow_values(
        SYS_socket,
        0,
        &[
            AF_UNIX as u64,
            AF_INET as u64,
            AF_INET6 as u64,
            AF_NETLINK as u64,
        ],
    );
    l.ioctls(&[FIONREAD]);
}

/// The vCPU ioctls of the `KVM_RUN` loop, of a saving pause and of the
/// emulation quirks, `KVM_RUN` first.
fn vcpu_ioctls() -> Vec<c_ulong> {
    vec![
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_SET_REGS(),
        KVM_GET_SREGS(),
        KVM_GET_VCPU_EVENTS(),
        KVM_SET_VCPU_EVENTS(),
        KVM_GET_MSRS(),
        KVM_GET_MP_STATE(),
        KVM_GET_XSAVE(),
        KVM_GET_FPU(),
        KVM_GET_XCRS(),
        KVM_GET_LAPIC(),
        KVM_GET_DEBUGREGS(),
        KVM_TRANSLATE(),
    ]
}

/// The ioctls of a running VM's main thread: dirty tracking on and off
/// (a pairing, the loss of a standby), the dirty log or rings, and the
/// VM-wide state of a checkpoint.
fn runner_ioctls() -> Vec<c_ulong> {
    vec![
        KVM_GET_DIRTY_LOG(),
        KVM_CLEAR_DIRTY_LOG(),
        KVM_RESET_DIRTY_RINGS(),
        KVM_GET_IRQCHIP(),
        KVM_GET_PIT2(),
        KVM_GET_CLOCK(),
        KVM_CHECK_EXTENSION(),
        KVM_ENABLE_CAP(),
        KVM_SET_USER_MEMORY_REGION(),
    ]
}

/// The ioctls that build a VM and restore it from a checkpoint (a
/// standby's takeover): KVM's system, VM and vCPU set-up, the vCPU and VM
/// state setters, and the tap's set-up.
fn build_ioctls() -> Vec<c_ulong> {
    vec![
        KVM_GET_API_VERSION(),
        KVM_CREATE_VM(),
        KVM_GET_MSR_INDEX_LIST(),
        KVM_GET_MSR_FEATURE_INDEX_LIST(),
        KVM_GET_VCPU_MMAP_SIZE(),
        KVM_GET_SUPPORTED_CPUID(),
        KVM_CREATE_VCPU(),
        KVM_SET_TSS_ADDR(),
        KVM_SET_IDENTITY_MAP_ADDR(),
        KVM_CREATE_IRQCHIP(),
        KVM_SET_IRQCHIP(),
        KVM_IRQFD(),
        KVM_CREATE_PIT2(),
        KVM_SET_PIT2(),
        KVM_IOEVENTFD(),
        KVM_SET_CLOCK(),
        KVM_SET_CPUID2(),
        KVM_SET_SREGS(),
        KVM_SET_MSRS(),
        KVM_SET_FPU(),
        KVM_SET_LAPIC(),
        KVM_SET_MP_STATE(),
        KVM_SET_DEBUGREGS(),
        KVM_SET_XSAVE(),
        KVM_SET_XCRS(),
        KVM_KVMCLOCK_CTRL(),
        TUNSETIFF(),
        TUNSETOFFLOAD(),
        TUNSETVNETHDRSZ(),
    ]
}

/// The main thread of a VM that runs (a primary, or a standby that took
/// over), and so what every thread it starts needs: the epoch loop (KVM's
/// dirty log and state, the event waits), the checkpoint stream and
/// pairings (`ctl protect`: name lookup, TCP), the witness's HTTP, the
/// network output commit (taps, netlink for the plug backend), disks
/// (hashes at pairing), the kick signal's handler, fault injection's
/// SIGKILL to itself, and its children's calls (vCPUs, heartbeats at
/// real-time priority, watchers, the resolver).
fn runner(l: &mut List, pid: u32) {
    use libc::*;
    common(l, pid, true);
    spawner(l);
    waits(l);
    stream(l);
    lookups(l);
    l.allow(&[
        SYS_statx,
        SYS_writev,
        SYS_pread64,
        SYS_pwrite64,
        SYS_fdatasync,
        SYS_eventfd2,
        SYS_rt_sigaction,
        // The control API's socket, removed when the VMM ends.
        SYS_unlink,
    ]);
    l.allow_if(SYS_kill, vec![Cond::eq(0, u64::from(pid))]);
    l.allow_values(SYS_sched_setscheduler, 1, &[SCHED_FIFO as u64]);
    let mut ioctls = vcpu_ioctls();
    ioctls.extend(runner_ioctls());
    l.ioctls(&ioctls);
}

/// The allowlist of `kind`'s threads in process `pid`.
pub(super) fn list(kind: ThreadKind, pid: u32) -> List {
    use libc::*;
    let mut l = List::default();
    match kind {
        ThreadKind::Primary => runner(&mut l, pid),
        ThreadKind::Standby => {
            runner(&mut l, pid);
            l.allow(&[SYS_accept4]);
            l.ioctls(&build_ioctls());
        }
        ThreadKind::Vcpu => {
            common(&mut l, pid, false);
            l.ioctls(&vcpu_ioctls());
        }
        ThreadKind::Device => {
            common(&mut l, pid, false);
            l.allow(&[
                SYS_poll,
                SYS_read,
                SYS_writev,
                SYS_pread64,
                SYS_pwrite64,
                SYS_fdatasync,
            ]);
        }
        ThreadKind::Api => {
            common(&mut l, pid, false);
            spawner(&mut l);
            waits(&mut l);
            stream(&mut l);
            l.allow(&[SYS_accept4, SYS_geteuid]);
        }
        ThreadKind::Acceptor => {
            common(&mut l, pid, false);
            waits(&mut l);
            stream(&mut l);
            l.allow(&[SYS_accept4]);
        }
        ThreadKind::Heartbeat => {
            common(&mut l, pid, false);
            spawner(&mut l);
            waits(&mut l);
            stream(&mut l);
            l.allow(&[SYS_eventfd2]);
            l.allow_values(SYS_sched_setscheduler, 1, &[SCHED_FIFO as u64]);
        }
        ThreadKind::Watcher => {
            common(&mut l, pid, false);
            l.allow(&[SYS_shutdown]);
        }
        ThreadKind::Resolver => {
            // NSS modules are loaded with dlopen: executable mappings.
            common(&mut l, pid, true);
            waits(&mut l);
            stream(&mut l);
            lookups(&mut l);
        }
        ThreadKind::Announce => {
            common(&mut l, pid, false);
            spawner(&mut l);
            l.allow(&[SYS_writev]);
        }
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_list_compiles_and_fits_a_bpf_program() {
        for kind in ThreadKind::ALL {
            let prog = list(kind, 1).compile().unwrap();
            assert!(prog.len() < 4096, "{kind:?}: {} instructions", prog.len());
        }
    }

    #[test]
    fn no_list_allows_the_test_call_or_process_creation() {
        for kind in ThreadKind::ALL {
            let l = list(kind, 1);
            for call in [
                super::super::TEST_SYSCALL,
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_clone,
                libc::SYS_ptrace,
                libc::SYS_process_vm_writev,
            ] {
                assert!(!l.allows(call), "{kind:?} allows system call {call}");
            }
        }
    }

    #[test]
    fn parents_allow_what_their_children_need() {
        // A thread spawned after its parent installed a filter runs under
        // that filter too (filters stack): the parent's list must cover
        // the child's.
        let inherits = [
            // The primary's filter is on before it pairs and starts its vCPUs.
            (ThreadKind::Primary, ThreadKind::Vcpu),
            (ThreadKind::Primary, ThreadKind::Heartbeat),
            (ThreadKind::Primary, ThreadKind::Watcher),
            (ThreadKind::Primary, ThreadKind::Resolver),
            // The standby's is on once it listens; its takeover builds the VM.
            (ThreadKind::Standby, ThreadKind::Acceptor),
            (ThreadKind::Standby, ThreadKind::Heartbeat),
            (ThreadKind::Standby, ThreadKind::Watcher),
            (ThreadKind::Standby, ThreadKind::Resolver),
            (ThreadKind::Standby, ThreadKind::Vcpu),
            (ThreadKind::Standby, ThreadKind::Device),
            (ThreadKind::Standby, ThreadKind::Announce),
        ];
        for (parent, child) in inherits {
            if let Err(what) = list(parent, 1).covers(&list(child, 1)) {
                panic!(
                    "{parent:?} threads do not allow {what}, which their {child:?} children need"
                );
            }
        }
    }
}
