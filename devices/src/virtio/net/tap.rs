//! The host end of a virtio-net device: a tap interface opened through
//! `/dev/net/tun`, with a 12-byte virtio-net header on every frame.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Size of the virtio 1.x net header on the tap and in guest buffers.
pub const VNET_HDR_LEN: usize = 12;

const TUN_DEVICE: &str = "/dev/net/tun";
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
// _IOW('T', 202, int)
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
// _IOW('T', 208, unsigned int)
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
// _IOW('T', 216, int)
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// `struct ifreq` as far as TUNSETIFF reads it.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// Errors opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// /dev/net/tun cannot be opened.
    #[error("cannot open tap device '{name}': cannot open {TUN_DEVICE}: {source}{hint}", hint = hint(.source))]
    OpenTun {
        /// The tap's name.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// TUNSETIFF failed (no such tap and no right to create it, a tap of
    /// another type, busy...).
    #[error("cannot open tap device '{name}': {source}{hint}", hint = hint(.source))]
    SetIff {
        /// The tap's name.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The vnet header size or offloads could not be set.
    #[error("tap device '{name}': {what} failed: {source}")]
    Configure {
        /// The tap's name.
        name: String,
        /// Which ioctl.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

fn hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (creating a tap, or opening one owned by another user, needs CAP_NET_ADMIN)"
        }
        Some(libc::ENOENT) | Some(libc::ENODEV) => " (is the tun module loaded?)",
        Some(libc::EBUSY) => " (is another process attached to it?)",
        Some(libc::EINVAL) => " (is it a tun device rather than a tap, or a multi-queue tap?)",
        _ => "",
    }
}

/// An open tap: non-blocking, one frame per read or write, each with a
/// 12-byte virtio-net header in front.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens the tap `name`, creating it if it does not exist (a tap created
    /// here disappears when the VMM exits). Its link state and addresses are
    /// left to the operator.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        let n = name.len().min(15);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        // SAFETY: TUNSETIFF reads (and writes back) one `struct ifreq`;
        // `req` has its layout and size (40 bytes) and outlives the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
            return Err(TapError::SetIff {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        let cfg = |what, source| TapError::Configure {
            name: name.to_string(),
            what,
            source,
        };
        let hdr: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which
        // points to `hdr`, alive across the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ as _, &hdr) } < 0 {
            return Err(cfg("TUNSETVNETHDRSZ", std::io::Error::last_os_error()));
        }
        // No offloads: the kernel hands us complete, checksummed frames.
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD as _, 0 as libc::c_ulong) } < 0 {
            return Err(cfg("TUNSETOFFLOAD", std::io::Error::last_os_error()));
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// Wraps an fd that behaves like a tap (one frame, header included, per
    /// read and write; non-blocking): a `SOCK_SEQPACKET` socket in tests,
    /// or a tap opened by someone else.
    pub fn from_fd(fd: OwnedFd, name: &str) -> Tap {
        Tap {
            file: File::from(fd),
            name: name.to_string(),
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Another handle on the same tap.
    pub fn try_clone(&self) -> std::io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// Reads one frame, header included.
    pub fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (without header: a zero header is put in front).
    pub fn write_frame(&self, frame: &[u8]) -> std::io::Result<()> {
        let hdr = [0u8; VNET_HDR_LEN];
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both iovecs point to live buffers of the given lengths,
        // which writev only reads.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n as usize != VNET_HDR_LEN + frame.len() {
            return Err(std::io::Error::other(format!(
                "short write: {n} of {} bytes",
                VNET_HDR_LEN + frame.len()
            )));
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
