//! Loading a guest for the 64-bit Linux boot protocol: the kernel (ELF
//! vmlinux or bzImage, through linux-loader), the initrd, the command line and
//! the zero page with its e820 map.

use std::fs::File;
use std::io::{Cursor, Read, Seek};
use std::path::{Path, PathBuf};

use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, KernelLoader, KernelLoaderResult};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, ReadVolatile,
};

use crate::arch::x86_64::layout::*;
use crate::config::KernelSource;
use crate::memory::GuestMemory;

/// The bare-metal test guest, built by build.rs from resources/test-guest.
pub static TEST_GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ftguest.elf"));

/// Errors loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel '{path}': {source}")]
    KernelFile {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kernel is neither ELF nor bzImage, or is damaged.
    #[error("kernel '{path}' is neither a loadable ELF vmlinux ({elf}) nor a bzImage ({bzimage})")]
    KernelFormat {
        /// The path given.
        path: String,
        /// Why the ELF loader refused it.
        elf: String,
        /// Why the bzImage loader refused it.
        bzimage: String,
    },
    /// The initrd cannot be opened or read.
    #[error("cannot read initrd '{path}': {source}")]
    InitrdFile {
        /// The path given.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The initrd does not fit the guest memory.
    #[error("initrd '{path}' ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel")]
    InitrdTooLarge {
        /// The path given.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The highest address it may reach.
        limit: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot data into guest memory failed.
    #[error("cannot write {0} into guest memory")]
    GuestMemory(&'static str),
}

/// What the vCPUs need to start the loaded kernel.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// 64-bit entry point.
    pub entry: GuestAddress,
}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PAGE: u64 = 4096;

/// Loads the kernel image into memory.
fn load_kernel(mem: &GuestMemory, source: &KernelSource) -> Result<KernelLoaderResult, BootError> {
    match source {
        KernelSource::EmbeddedTestGuest => load_image(
            mem,
            &mut Cursor::new(TEST_GUEST_ELF),
            "<embedded test guest>",
        ),
        KernelSource::File(path) => {
            let mut f = File::open(path).map_err(|source| BootError::KernelFile {
                path: path.clone(),
                source,
            })?;
            if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
                return Err(BootError::KernelFile {
                    path: path.clone(),
                    source: std::io::Error::other("is a directory"),
                });
            }
            load_image(mem, &mut f, &path.display().to_string())
        }
    }
}

fn load_image<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemory,
    image: &mut F,
    name: &str,
) -> Result<KernelLoaderResult, BootError> {
    let himem = Some(GuestAddress(HIMEM_START));
    let elf = match Elf::load(mem, None, image, himem) {
        Ok(r) => return Ok(r),
        Err(e) => e.to_string(),
    };
    let bzimage = match BzImage::load(mem, None, image, himem) {
        Ok(r) => return Ok(r),
        Err(e) => e.to_string(),
    };
    Err(BootError::KernelFormat {
        path: name.to_string(),
        elf,
        bzimage,
    })
}

/// Highest guest address an initrd may end at: the top of the RAM below the
/// MMIO gap (Linux's default initrd_addr_max is 2 GiB - 1).
fn initrd_limit(mem: &GuestMemory) -> u64 {
    let low_end = mem
        .iter()
        .map(|r| r.start_addr().0 + r.len())
        .filter(|end| *end <= MMIO_GAP_START)
        .max()
        .unwrap_or(0);
    low_end.min(0x8000_0000)
}

fn load_initrd(mem: &GuestMemory, path: &Path, kernel_end: u64) -> Result<(u64, u64), BootError> {
    let initrd_err = |source| BootError::InitrdFile {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(initrd_err)?;
    let meta = f.metadata().map_err(initrd_err)?;
    if meta.is_dir() {
        return Err(initrd_err(std::io::Error::other("is a directory")));
    }
    let size = meta.len();
    let limit = initrd_limit(mem);
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !(PAGE - 1);
    if addr < kernel_end {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| initrd_err(std::io::Error::other(e.to_string())))?;
    Ok((addr, size))
}

/// Adds an e820 entry.
fn add_e820(params: &mut boot_params, addr: u64, size: u64, type_: u32) -> Result<(), BootError> {
    let i = params.e820_entries as usize;
    if i >= params.e820_table.len() {
        return Err(BootError::GuestMemory("e820 table (too many entries)"));
    }
    params.e820_table[i] = boot_e820_entry {
        addr,
        size,
        r#type: type_,
    };
    params.e820_entries += 1;
    Ok(())
}

/// Loads kernel, initrd and command line, writes the zero page and the MP
/// table, and returns where to start.
pub fn load(
    mem: &GuestMemory,
    kernel: &KernelSource,
    initrd: Option<&Path>,
    cmdline: &str,
    vcpus: u8,
) -> Result<BootInfo, BootError> {
    let kernel_res = load_kernel(mem, kernel)?;

    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    if !cmdline.trim().is_empty() {
        cl.insert_str(cmdline.trim())
            .map_err(|e| BootError::Cmdline(format!("'{cmdline}': {e}")))?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cl.as_cstring().map(|c| c.as_bytes().len()).unwrap_or(0);

    let mut params = boot_params::default();
    let entry = match kernel_res.setup_header {
        Some(hdr) => {
            // bzImage: keep its setup header; the 64-bit entry is 0x200 past
            // the protected-mode code start.
            params.hdr = hdr;
            kernel_res.kernel_load.unchecked_add(0x200)
        }
        None => {
            // ELF vmlinux: linux-loader already points at the ELF entry.
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            kernel_res.kernel_load
        }
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;

    if let Some(path) = initrd {
        let kernel_end = kernel_res.kernel_end.max(HIMEM_START);
        let (addr, size) = load_initrd(mem, path, kernel_end)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    add_e820(&mut params, 0, EBDA_START, E820_RAM)?;
    add_e820(
        &mut params,
        EBDA_START,
        0x100000 - EBDA_START,
        E820_RESERVED,
    )?;
    for region in mem.iter() {
        let start = region.start_addr().0.max(HIMEM_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            add_e820(&mut params, start, end - start, E820_RAM)?;
        }
    }
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::GuestMemory("zero page"))?;
    crate::arch::x86_64::mptable::setup_mptable(mem, vcpus)
        .map_err(|_| BootError::GuestMemory("MP table"))?;
    Ok(BootInfo { entry })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_guest_loads_at_1mib() {
        let mem = crate::memory::create(64).unwrap();
        let info = load(&mem, &KernelSource::EmbeddedTestGuest, None, "stop=1", 1).unwrap();
        assert!(info.entry.0 >= HIMEM_START);
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(p.hdr.cmd_line_ptr as u64, CMDLINE_START);
        assert_eq!(p.e820_entries, 3);
        let mut buf = [0u8; 6];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"stop=1");
    }

    #[test]
    fn garbage_kernel_is_refused() {
        let mem = crate::memory::create(32).unwrap();
        let dir = std::env::temp_dir().join(format!("ftvmm-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("garbage");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = load(&mem, &KernelSource::File(path), None, "", 1).unwrap_err();
        assert!(matches!(err, BootError::KernelFormat { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
