//! VM configuration: what the command line (or the control API, or a
//! standby's handshake) asks for, validated into plain structs that the
//! builder turns into live objects.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Errors in a configuration value. Each says which option and which input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A `--net` spec that does not parse.
    #[error("invalid --net '{spec}': {reason}")]
    Net {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A `--disk` spec that does not parse.
    #[error("invalid --disk '{spec}': {reason}")]
    Disk {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A `--serial` value that does not parse.
    #[error("invalid --serial '{0}': expected stdout, file:PATH or none")]
    Serial(String),
}

/// Where the serial console's output goes.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum SerialConfig {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Discarded.
    None,
}

impl FromStr for SerialConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdout" => Ok(SerialConfig::Stdout),
            "none" => Ok(SerialConfig::None),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SerialConfig::File(PathBuf::from(p))),
                _ => Err(ConfigError::Serial(s.to_string())),
            },
        }
    }
}

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("MAC '{s}' must have six ':'-separated bytes"));
        }
        let mut mac = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(format!("MAC '{s}': byte '{p}' is not two hex digits"));
            }
            mac[i] = u8::from_str_radix(p, 16)
                .map_err(|_| format!("MAC '{s}': byte '{p}' is not two hex digits"))?;
        }
        if mac[0] & 1 != 0 {
            return Err(format!("MAC '{s}' is a multicast address"));
        }
        Ok(MacAddr(mac))
    }
}

/// One virtio-net device: `tap=NAME[,mac=MAC]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Host tap device name.
    pub tap: String,
    /// Guest MAC; generated from the tap name when absent.
    pub mac: Option<MacAddr>,
}

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

fn split_kv(item: &str) -> Result<(&str, &str), String> {
    item.split_once('=')
        .ok_or_else(|| format!("'{item}' is not key=value"))
}

impl FromStr for NetConfig {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, ConfigError> {
        let err = |reason: String| ConfigError::Net {
            spec: spec.to_string(),
            reason,
        };
        let mut tap = None;
        let mut mac = None;
        for item in spec.split(',') {
            let (k, v) = split_kv(item).map_err(err)?;
            match k {
                "tap" => {
                    if v.is_empty() || v.len() > IFNAME_MAX {
                        return Err(err(format!(
                            "tap name '{v}' must be 1 to {IFNAME_MAX} bytes"
                        )));
                    }
                    if v.contains(['/', ' ', '\0']) || v == "." || v == ".." {
                        return Err(err(format!("tap name '{v}' is not a valid interface name")));
                    }
                    tap = Some(v.to_string());
                }
                "mac" => mac = Some(v.parse::<MacAddr>().map_err(err)?),
                _ => return Err(err(format!("unknown key '{k}' (expected tap, mac)"))),
            }
        }
        let tap = tap.ok_or_else(|| err("missing tap=NAME".to_string()))?;
        Ok(NetConfig { tap, mac })
    }
}

/// One virtio-blk device: `path=FILE[,readonly]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Backing file.
    pub path: PathBuf,
    /// Refuse guest writes.
    pub readonly: bool,
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, ConfigError> {
        let err = |reason: String| ConfigError::Disk {
            spec: spec.to_string(),
            reason,
        };
        let mut path = None;
        let mut readonly = false;
        for item in spec.split(',') {
            if item == "readonly" || item == "ro" {
                readonly = true;
                continue;
            }
            let (k, v) = split_kv(item).map_err(err)?;
            match k {
                "path" if !v.is_empty() => path = Some(PathBuf::from(v)),
                "path" => return Err(err("empty path".to_string())),
                "readonly" => {
                    readonly = match v {
                        "on" | "true" | "1" => true,
                        "off" | "false" | "0" => false,
                        _ => return Err(err(format!("readonly={v} is not on/off"))),
                    }
                }
                _ => return Err(err(format!("unknown key '{k}' (expected path, readonly)"))),
            }
        }
        let path = path.ok_or_else(|| err("missing path=FILE".to_string()))?;
        Ok(DiskConfig { path, readonly })
    }
}

/// The kernel to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelSource {
    /// An ELF vmlinux or a bzImage on disk.
    File(PathBuf),
    /// The test guest embedded in the binary.
    EmbeddedTestGuest,
}

/// Everything needed to build a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel image.
    pub kernel: KernelSource,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Network devices.
    pub net: Vec<NetConfig>,
    /// Block devices.
    pub disks: Vec<DiskConfig>,
    /// Console output.
    pub serial: SerialConfig,
    /// Track vCPU writes with per-vCPU dirty rings instead of KVM's dirty
    /// bitmap (`--dirty-track ring`; must be chosen when the VM is created).
    pub dirty_ring: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: KernelSource::EmbeddedTestGuest,
            initrd: None,
            cmdline: String::new(),
            mem_mib: 128,
            vcpus: 1,
            net: Vec::new(),
            disks: Vec::new(),
            serial: SerialConfig::Stdout,
            dirty_ring: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_specs() {
        assert_eq!("stdout".parse(), Ok(SerialConfig::Stdout));
        assert_eq!("none".parse(), Ok(SerialConfig::None));
        assert_eq!(
            "file:/tmp/x".parse(),
            Ok(SerialConfig::File(PathBuf::from("/tmp/x")))
        );
        assert!("file:".parse::<SerialConfig>().is_err());
        assert!("tty".parse::<SerialConfig>().is_err());
    }

    #[test]
    fn net_specs() {
        let n: NetConfig = "tap=ftap0,mac=02:00:00:00:00:01".parse().unwrap();
        assert_eq!(n.tap, "ftap0");
        assert_eq!(n.mac.unwrap().to_string(), "02:00:00:00:00:01");
        for bad in [
            "",
            "tap=",
            "mac=02:00:00:00:00:01",
            "tap=x,mac=zz:00:00:00:00:01",
            "tap=x,mac=01:00:00:00:00:01",
            "tap=x,mac=02:00:00:00:00",
            "tap=x,speed=10",
            "tap=abcdefghijklmnopq",
            "tap=a/b",
            "tapx",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn disk_specs() {
        let d: DiskConfig = "path=/tmp/d.img,readonly".parse().unwrap();
        assert!(d.readonly);
        let d: DiskConfig = "path=/tmp/d.img".parse().unwrap();
        assert!(!d.readonly);
        for bad in ["", "path=", "readonly", "path=x,readonly=maybe", "file=x"] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad} accepted");
        }
    }
}
