//! The `ftvmm` command line.

mod demo;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use ftvmm::api::{ApiServer, Request};
use ftvmm::config::{DiskConfig, KernelSource, NetConfig, SerialConfig, VmConfig};
use ftvmm::ft::standby::{run_standby, StandbyOptions};
use ftvmm::ft::{FtError, FtOptions};
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "ftvmm",
    version,
    about = "A KVM micro-VMM whose virtual machines survive the loss of their host"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up and consumed: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Boot and run a VM, protected by a standby with --ft-peer.
    Run(RunArgs),
    /// Wait for a primary, mirror its VM, and take over when it is lost.
    Standby(StandbyArgs),
    /// Send a command to a running VMM's control API.
    Ctl(CtlArgs),
    /// A primary and a standby on this machine, a failover, a summary.
    Demo(demo::DemoArgs),
    /// Write a fresh pre-shared key for the checkpoint channel (mode 0600).
    Keygen(KeygenArgs),
}

#[derive(Args, Debug)]
struct KeygenArgs {
    /// Where to write the key (never overwritten).
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

/// The checkpoint channel's protection, as `run` and `standby` take it.
#[derive(Args, Debug)]
struct KeyArgs {
    /// The pre-shared key that authenticates and seals the checkpoint
    /// channel (at least 32 random bytes, readable by its owner only; make
    /// one with `ftvmm keygen FILE`). Also read from $FTVMM_FT_KEY.
    #[arg(
        long,
        value_name = "FILE",
        env = "FTVMM_FT_KEY",
        conflicts_with = "ft_insecure"
    )]
    ft_key: Option<PathBuf>,
    /// Run the checkpoint channel without authentication or encryption
    /// (anyone who reaches the standby's port can feed it a VM); a warning
    /// is printed. Both sides must agree.
    #[arg(long)]
    ft_insecure: bool,
}

impl KeyArgs {
    /// The key or the insecure choice; `None` if neither was given.
    fn security(&self) -> Result<Option<ftvmm_transport::Security>, CliError> {
        use ftvmm_transport::{FtKey, Security};
        match (&self.ft_key, self.ft_insecure) {
            (Some(path), _) => Ok(Some(Security::keyed(FtKey::load(path)?))),
            (None, true) => {
                log::warn!(
                    "--ft-insecure: the checkpoint channel is neither authenticated nor encrypted; \
                     anyone who reaches the standby's port can read the guest's memory or feed it a VM"
                );
                Ok(Some(Security::Insecure))
            }
            (None, false) => Ok(None),
        }
    }
}

#[derive(Args, Debug)]
struct VmArgs {
    /// Kernel: an ELF vmlinux or a bzImage (default: the embedded test guest).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, value_name = "N", default_value_t = 128)]
    mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u64,
    /// A virtio-net device: tap=NAME[,mac=MAC] (repeatable).
    #[arg(long, value_name = "SPEC")]
    net: Vec<NetConfig>,
    /// A virtio-blk device: path=FILE[,readonly] (repeatable).
    #[arg(long, value_name = "SPEC")]
    disk: Vec<DiskConfig>,
    /// Console output: stdout, file:PATH or none.
    #[arg(long, value_name = "SINK", default_value = "stdout")]
    serial: SerialConfig,
    /// Control API on this Unix socket (see `ftvmm ctl`).
    #[arg(long, value_name = "SOCKET")]
    api: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    #[command(flatten)]
    ft: FtArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

#[derive(Args, Debug)]
struct SandboxArgs {
    /// Run without seccomp filters (debugging only: a system call outside
    /// a thread's allowlist then runs instead of ending the process).
    #[arg(long)]
    no_seccomp: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum NetbufArg {
    Vmm,
    Plug,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DiskSyncArg {
    Hashes,
    Full,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DirtyTrackArg {
    Bitmap,
    Ring,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum TransportArg {
    Tcp,
    Rdma,
}

#[derive(Args, Debug)]
struct FtArgs {
    /// Protect the VM: stream checkpoints to the standby at HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    ft_peer: Option<String>,
    /// Epoch length in milliseconds (with --ft-adaptive: the shortest, and
    /// the first).
    #[arg(long, value_name = "N", default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    ft_interval_ms: u64,
    /// Adaptive epochs: the shortest length from --ft-interval-ms up to
    /// --ft-max-interval-ms whose estimated guest overhead (pause plus a
    /// write fault per dirty page, over the epoch) stays within
    /// --ft-overhead-pct.
    #[arg(long)]
    ft_adaptive: bool,
    /// With --ft-adaptive: the longest epoch in milliseconds (it bounds the
    /// output latency); default 200, or --ft-interval-ms if longer.
    #[arg(long, value_name = "M", requires = "ft_adaptive", value_parser = clap::value_parser!(u64).range(1..=60_000))]
    ft_max_interval_ms: Option<u64>,
    /// With --ft-adaptive: the guest's overhead budget, percent of its time.
    #[arg(long, value_name = "PCT", requires = "ft_adaptive", default_value_t = ftvmm::ft::adaptive::DEFAULT_BUDGET_PCT)]
    ft_overhead_pct: f64,
    /// With --ft-adaptive: this host's cost of one write-protect fault, µs
    /// (measure it with `cargo run --release -p ftvmm --example guest_speed
    /// -- --faults-only`); default 21 on a PVM host, 1 on hardware KVM.
    #[arg(long, value_name = "US", requires = "ft_adaptive")]
    ft_fault_us: Option<f64>,
    /// Network output commit backend: vmm (frames held in the VMM per
    /// epoch), plug (held by the kernel's sch_plug qdisc on an IFB; needs
    /// CONFIG_NET_SCH_PLUG) or none (nothing held: tests only).
    #[arg(long, value_enum, default_value_t = NetbufArg::Vmm)]
    netbuf: NetbufArg,
    /// Most output the netbuf holds, in MiB; near it the epoch is cut early.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    netbuf_limit_mib: u64,
    /// The same limit in KiB, overriding --netbuf-limit-mib (tests).
    #[arg(long, value_name = "N", hide = true, value_parser = clap::value_parser!(u64).range(1..=4_194_304))]
    netbuf_limit_kib: Option<u64>,
    /// Checkpoint transport: tcp, or rdma (InfiniBand/RoCE through
    /// libibverbs; a build with `--features rdma` and an RDMA device, picked
    /// with $FTVMM_RDMA_DEVICE, $FTVMM_RDMA_PORT, $FTVMM_RDMA_GID_INDEX).
    /// The standby serves whichever the primary asks for.
    #[arg(long, value_enum, default_value_t = TransportArg::Tcp)]
    transport: TransportArg,
    #[command(flatten)]
    key: KeyArgs,
    /// How vCPU writes are tracked: KVM's dirty bitmap (manual protect) or per-vCPU dirty rings.
    #[arg(long, value_enum, default_value_t = DirtyTrackArg::Bitmap)]
    dirty_track: DirtyTrackArg,
    /// Heartbeat interval in milliseconds; the peer is lost after 5 silent
    /// intervals (250 ms by default).
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    heartbeat_ms: u64,
    /// How the standby's disk replicas are brought equal at pairing: hashes
    /// (compare SHA-256 of 1 MiB blocks, send the differing ones) or full
    /// (send every block).
    #[arg(long, value_enum, default_value_t = DiskSyncArg::Hashes)]
    ft_disk_sync: DiskSyncArg,
    /// The witness that decides role changes (no split brain under a
    /// partition): etcd v3 client URLs, comma-separated (http://HOST:PORT).
    #[arg(long, value_name = "URLS")]
    witness: Option<String>,
    /// The VM's id on the witness (default: a fresh one).
    #[arg(long, value_name = "ID")]
    vm_id: Option<String>,
    /// Write one JSON line of metrics per epoch to FILE.
    #[arg(long, value_name = "FILE")]
    ft_metrics: Option<PathBuf>,
    /// MiB of recently sent pages kept to send them again as deltas (XBZRLE
    /// runs against the standby's copy); 0: no deltas (zero pages are still
    /// sent as a flag).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u64).range(0..=65_536))]
    ft_cache_mib: u64,
    /// Protection generation (fences older primaries).
    #[arg(long, value_name = "N", default_value_t = 1, hide = true)]
    ft_generation: u64,
    /// Fault injection for tests: handshake, initial-sync, mid-checkpoint@N, before-ack@N, during-release@N.
    #[arg(long, value_name = "POINT", hide = true)]
    ft_fault: Option<ftvmm::ft::Fault>,
    /// Print CRCs of guest memory and of the disks at this epoch's cut (tests).
    #[arg(long, value_name = "N", hide = true)]
    ft_hash_epoch: Option<u64>,
    /// Benchmarks only: run the epochs (pause, harvest, copy, state) with no
    /// standby, sending nothing and holding nothing past its epoch.
    #[arg(long, hide = true, conflicts_with = "ft_peer")]
    ft_bench_local: bool,
}

#[derive(Args, Debug)]
struct StandbyArgs {
    /// Address to listen on for the primary.
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,
    /// This host's tap for each of the guest's NICs: tap=NAME (repeatable, in order).
    #[arg(long, value_name = "SPEC")]
    net: Vec<NetConfig>,
    /// This host's replica of each of the guest's disks (repeatable, in order).
    #[arg(long, value_name = "SPEC")]
    disk: Vec<DiskConfig>,
    /// Console output once the guest runs here: stdout, file:PATH or none.
    #[arg(long, value_name = "SINK", default_value = "stdout")]
    serial: SerialConfig,
    /// Print CRCs of guest memory and of the replicas after applying this
    /// epoch, and of the replicas at a takeover (tests).
    #[arg(long, value_name = "N", hide = true)]
    ft_hash_epoch: Option<u64>,
    /// Delay each ack by N ms (tests: output commit must wait for it).
    #[arg(long, value_name = "N", hide = true)]
    ft_ack_delay_ms: Option<u64>,
    /// Control API on this Unix socket (see `ftvmm ctl`).
    #[arg(long, value_name = "SOCKET")]
    api: Option<PathBuf>,
    /// The witness that decides whether this standby may take over: etcd
    /// v3 client URLs, comma-separated (the primary's own).
    #[arg(long, value_name = "URLS")]
    witness: Option<String>,
    #[command(flatten)]
    key: KeyArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

#[derive(Args, Debug)]
struct CtlArgs {
    /// The VMM's control socket.
    #[arg(long, value_name = "SOCKET")]
    api: PathBuf,
    /// status | stats | pause | resume | failover | protect HOST:PORT | set interval-ms N
    #[arg(required = true, num_args = 1.., value_name = "COMMAND")]
    command: Vec<String>,
}

impl VmArgs {
    fn into_config(self) -> Result<VmConfig, CliError> {
        let vcpus = u8::try_from(self.vcpus).map_err(|_| CliError::Vcpus(self.vcpus))?;
        Ok(VmConfig {
            kernel: self
                .kernel
                .map(KernelSource::File)
                .unwrap_or(KernelSource::EmbeddedTestGuest),
            initrd: self.initrd,
            cmdline: self.cmdline,
            mem_mib: self.mem_mib,
            vcpus,
            net: self.net,
            disks: self.disk,
            serial: self.serial,
            dirty_ring: false,
        })
    }
}

/// The log on stderr: the run's report lines (`ftvmm::REPORT`) always, as
/// `ftvmm: <line>`; diagnostics from warnings up, or as `FTVMM_LOG` says,
/// with a timestamp, level and module.
fn init_logger() {
    use std::io::Write;
    let level = std::env::var("FTVMM_LOG").unwrap_or_else(|_| "warn".to_string());
    env_logger::Builder::new()
        .filter_module(ftvmm::REPORT, log::LevelFilter::Info)
        .parse_filters(&level)
        .format(|buf, record| {
            if record.target() == ftvmm::REPORT {
                writeln!(buf, "ftvmm: {}", record.args())
            } else {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                writeln!(
                    buf,
                    "[{}.{:06} {:5} {}] {}",
                    t.as_secs(),
                    t.subsec_micros(),
                    record.level(),
                    record.target(),
                    record.args()
                )
            }
        })
        .target(env_logger::Target::Stderr)
        .init();
}

fn ft_options(ft: FtArgs) -> Result<(Option<String>, FtOptions), CliError> {
    let backend = match ft.netbuf {
        NetbufArg::Vmm => ftvmm_netbuf::Backend::Vmm,
        NetbufArg::Plug => ftvmm_netbuf::Backend::Plug,
        NetbufArg::None => ftvmm_netbuf::Backend::None,
    };
    let limit_kib = ft.netbuf_limit_kib.unwrap_or(ft.netbuf_limit_mib << 10);
    let transport = transport(ft.transport)?;
    let security = ft.key.security()?;
    if ft.ft_peer.is_some() && security.is_none() {
        return Err(CliError::NeedKey("a protected run (--ft-peer)"));
    }
    let adaptive = if ft.ft_adaptive {
        use ftvmm::ft::adaptive::{self, AdaptiveConfig, FaultCostSource};
        let min = Duration::from_millis(ft.ft_interval_ms);
        let max = ft
            .ft_max_interval_ms
            .map(Duration::from_millis)
            .unwrap_or(adaptive::DEFAULT_MAX.max(min));
        let (cost, source) = match ft.ft_fault_us {
            Some(us) if (0.0..=10_000.0).contains(&us) => {
                (Duration::from_secs_f64(us / 1e6), FaultCostSource::Given)
            }
            Some(us) => return Err(CliError::FaultCost(us)),
            None => adaptive::default_fault_cost(),
        };
        Some(AdaptiveConfig::new(
            min,
            max,
            ft.ft_overhead_pct,
            cost,
            source,
        )?)
    } else {
        None
    };
    let opts = FtOptions {
        security,
        peer: ft.ft_peer.clone().unwrap_or_default(),
        interval: Duration::from_millis(ft.ft_interval_ms),
        adaptive,
        heartbeat: Duration::from_millis(ft.heartbeat_ms),
        generation: ft.ft_generation,
        metrics_path: ft.ft_metrics,
        fault: ft.ft_fault,
        hash_epoch: ft.ft_hash_epoch,
        vm_id: ft.vm_id.unwrap_or_else(fresh_vm_id),
        witness: ft.witness,
        disk_sync: match ft.ft_disk_sync {
            DiskSyncArg::Hashes => ftvmm_checkpoint::DiskSync::Hashes,
            DiskSyncArg::Full => ftvmm_checkpoint::DiskSync::Full,
        },
        netbuf: ftvmm_netbuf::NetbufConfig {
            backend,
            limit_bytes: (limit_kib << 10) as usize,
        },
        cache_bytes: ft.ft_cache_mib << 20,
        transport,
    };
    Ok((ft.ft_peer, opts))
}

/// `--transport`. RDMA needs this build's feature and a usable device
/// (`$FTVMM_RDMA_DEVICE`, else the first), both checked here, at start.
fn transport(arg: TransportArg) -> Result<ftvmm_transport::Transport, CliError> {
    match arg {
        TransportArg::Tcp => Ok(ftvmm_transport::Transport::Tcp),
        #[cfg(feature = "rdma")]
        TransportArg::Rdma => {
            let cfg = ftvmm_transport::RdmaConfig::from_env().map_err(CliError::Rdma)?;
            let device = ftvmm_transport::rdma::probe(&cfg).map_err(CliError::Rdma)?;
            log::info!("--transport rdma: RDMA device '{device}'");
            Ok(ftvmm_transport::Transport::Rdma(cfg))
        }
        #[cfg(not(feature = "rdma"))]
        TransportArg::Rdma => Err(CliError::NoRdma),
    }
}

/// A fresh VM id for the witness: 16 random hex digits.
fn fresh_vm_id() -> String {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let v = u64::from_le_bytes(b) ^ t ^ u64::from(std::process::id());
    format!("vm-{v:016x}")
}

/// The API server and the mailbox its requests reach the VMM's loop by.
fn start_api(
    path: Option<&std::path::Path>,
) -> Result<Option<(ApiServer, ftvmm::api::Mailbox)>, CliError> {
    let Some(path) = path else { return Ok(None) };
    let (mailbox, handler) = ftvmm::api::mailbox().map_err(CliError::Mailbox)?;
    let server = ApiServer::start(path, handler)?;
    Ok(Some((server, mailbox)))
}

fn run(args: RunArgs) -> Result<(), CliError> {
    ftvmm::seccomp::init(!args.sandbox.no_seccomp)?;
    let api_path = args.vm.api.clone();
    let mut config = args.vm.into_config()?;
    config.dirty_ring = args.ft.dirty_track == DirtyTrackArg::Ring;
    let local = args.ft.ft_bench_local;
    let (peer, ft) = ft_options(args.ft)?;
    if local {
        let reason = ftvmm::ft::local::run_local(&config, &ft)?;
        return if reason.is_clean() {
            Ok(())
        } else {
            Err(CliError::Guest(reason))
        };
    }
    let (_server, mailbox) = match start_api(api_path.as_deref())? {
        Some((s, m)) => (Some(s), Some(m)),
        None => (None, None),
    };
    let reason = ftvmm::ft::primary::run_vm(&config, &ft, peer.as_deref(), mailbox)?;
    if reason.is_clean() {
        log::info!("{reason}");
        Ok(())
    } else {
        Err(CliError::Guest(reason))
    }
}

fn standby(args: StandbyArgs) -> Result<(), CliError> {
    let security = args.key.security()?.ok_or(CliError::NeedKey("a standby"))?;
    ftvmm::seccomp::init(!args.sandbox.no_seccomp)?;
    let opts = StandbyOptions {
        security,
        listen: args.listen,
        serial: args.serial,
        net: args.net,
        disks: args.disk,
        hash_epoch: args.ft_hash_epoch,
        ack_delay: args.ft_ack_delay_ms.map(Duration::from_millis),
        api: args.api,
        witness: args.witness,
    };
    match run_standby(&opts)? {
        None => Ok(()),
        Some(reason) if reason.is_clean() => Ok(()),
        Some(reason) => Err(CliError::Guest(reason)),
    }
}

/// The request a `ctl` command line names.
/// Why a command failed: one line on stderr, a non-zero exit.
#[derive(Debug, thiserror::Error)]
enum CliError {
    /// `--vcpus` out of range.
    #[error("--vcpus {0} is invalid: it must be between 1 and 254")]
    Vcpus(u64),
    /// Neither `--ft-key` nor `--ft-insecure` where one is required.
    #[error("{0} needs --ft-key FILE (make one with `ftvmm keygen FILE` and copy it to both hosts) or --ft-insecure")]
    NeedKey(&'static str),
    /// A key file.
    #[error(transparent)]
    Key(#[from] ftvmm_transport::KeyError),
    /// `--transport rdma` in a build without it.
    #[cfg_attr(feature = "rdma", allow(dead_code))]
    #[error("--transport rdma: {}", ftvmm_transport::rdma::NOT_BUILT)]
    NoRdma,
    /// `--transport rdma` where RDMA cannot run (no device, port down).
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    #[error("--transport rdma: {0}")]
    Rdma(ftvmm_transport::RdmaError),
    /// The control API's mailbox.
    #[error("cannot set up the API: {0}")]
    Mailbox(std::io::Error),
    /// The control API.
    #[error(transparent)]
    Api(#[from] ftvmm::api::ApiError),
    /// Setting up the seccomp filters.
    #[error(transparent)]
    Seccomp(#[from] ftvmm::seccomp::SeccompError),
    /// Running the VM, protected or not, or the standby.
    #[error(transparent)]
    Ft(#[from] FtError),
    /// The guest ended in error (a triple fault, an unexpected exit).
    #[error("{0}")]
    Guest(ftvmm::vcpu::VmExit),
    /// A bad adaptive setting.
    #[error(transparent)]
    Adaptive(#[from] ftvmm::ft::adaptive::AdaptiveError),
    /// `--ft-fault-us` not a cost in µs.
    #[error("--ft-fault-us {0} is out of range (0 to 10000 µs)")]
    FaultCost(f64),
    /// `ctl set interval-ms` with a word that is not a number.
    #[error("set interval-ms: '{0}' is not a number")]
    NotANumber(String),
    /// An unknown `ctl` command.
    #[error("unknown ctl command '{0}' (expected status, stats, pause, resume, failover, protect HOST:PORT, set interval-ms N)")]
    UnknownCtl(String),
    /// The VMM answered a `ctl` request with an error.
    #[error("{0}")]
    Refused(String),
    /// The demo.
    #[error(transparent)]
    Demo(#[from] demo::DemoError),
}

fn ctl_request(words: &[String]) -> Result<Request, CliError> {
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    Ok(match w.as_slice() {
        ["status"] => Request::Status,
        ["stats"] => Request::Stats,
        ["pause"] => Request::Pause,
        ["resume"] => Request::Resume,
        ["failover"] => Request::Failover,
        ["protect", peer] => Request::Protect {
            peer: peer.to_string(),
        },
        ["set", "interval-ms", n] => Request::SetIntervalMs {
            ms: n.parse().map_err(|_| CliError::NotANumber(n.to_string()))?,
        },
        _ => return Err(CliError::UnknownCtl(words.join(" "))),
    })
}

fn ctl(args: CtlArgs) -> Result<(), CliError> {
    let req = ctl_request(&args.command)?;
    let resp = ftvmm::api::call(&args.api, &req)?;
    if resp.ok {
        println!(
            "{}",
            serde_json::to_string_pretty(&resp.result).unwrap_or_default()
        );
        Ok(())
    } else {
        Err(CliError::Refused(
            resp.error.unwrap_or_else(|| "request failed".into()),
        ))
    }
}

fn keygen(args: &KeygenArgs) -> Result<(), CliError> {
    ftvmm_transport::FtKey::write_new(&args.file)?;
    let key = ftvmm_transport::FtKey::load(&args.file)?;
    println!(
        "wrote a {}-byte key to {} (mode 0600, fingerprint {}); copy it to the other host over a trusted channel",
        ftvmm_transport::secure::KEY_MIN_LEN,
        args.file.display(),
        key.fingerprint()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                print!("{e}");
                return ExitCode::SUCCESS;
            }
            // One clear line: clap's first paragraph (a missing argument's
            // name is on the lines after the first), without its usage block.
            let text = e.to_string();
            let line = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ");
            let line = if line.is_empty() {
                "invalid arguments"
            } else {
                &line
            };
            eprintln!("ftvmm: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    init_logger();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Standby(args) => standby(args),
        Command::Ctl(args) => ctl(args),
        Command::Demo(args) => demo::run(&args).map_err(CliError::from),
        Command::Keygen(args) => keygen(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ftvmm: {e}");
            ExitCode::FAILURE
        }
    }
}
