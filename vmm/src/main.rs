//! The `ftvmm` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use ftvmm::config::{DiskConfig, KernelSource, NetConfig, SerialConfig, VmConfig};
use ftvmm::vm::Vm;

#[derive(Parser, Debug)]
#[command(name = "ftvmm", version, about = "A KVM micro-VMM whose virtual machines survive the loss of their host")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot and run a VM.
    Run(RunArgs),
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
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
}

impl VmArgs {
    fn into_config(self) -> Result<VmConfig, String> {
        let vcpus = u8::try_from(self.vcpus)
            .map_err(|_| format!("--vcpus {} is invalid: it must be between 1 and 254", self.vcpus))?;
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
        })
    }
}

fn init_logger() {
    let level = std::env::var("FTVMM_LOG").unwrap_or_else(|_| "warn".to_string());
    env_logger::Builder::new()
        .parse_filters(&level)
        .format_timestamp_micros()
        .target(env_logger::Target::Stderr)
        .init();
}

fn run(args: RunArgs) -> Result<(), String> {
    let config = args.vm.into_config()?;
    let mut vm = Vm::build(&config).map_err(|e| e.to_string())?;
    vm.start().map_err(|e| e.to_string())?;
    let reason = vm.wait_exit(None).expect("waiting without timeout returns a reason");
    vm.stop();
    if reason.is_clean() {
        log::info!("{reason}");
        Ok(())
    } else {
        Err(reason.to_string())
    }
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
            // One clear line: clap's first line, without its usage block.
            let text = e.to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("ftvmm: {}", line.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    init_logger();
    let result = match cli.command {
        Command::Run(args) => run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ftvmm: {e}");
            ExitCode::FAILURE
        }
    }
}
