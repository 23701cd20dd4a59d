//! The Linux `boot_params` zero page: the e820 map and the command line.

/// Offsets into `struct boot_params` (arch/x86/include/uapi/asm/bootparam.h).
const E820_ENTRIES: u64 = 0x1e8;
const CMD_LINE_PTR: u64 = 0x228;
const E820_TABLE: u64 = 0x2d0;
const E820_MAX_ENTRIES: u8 = 128;
const E820_ENTRY_SIZE: u64 = 20;
const E820_RAM: u32 = 1;
/// Longest command line read (Linux's COMMAND_LINE_SIZE).
const CMDLINE_MAX: usize = 2048;

/// One usable-RAM range of the e820 map: [start, end).
#[derive(Clone, Copy)]
pub struct RamRange {
    pub start: u64,
    pub end: u64,
}

pub struct BootParams {
    addr: u64,
}

impl BootParams {
    /// # Safety
    /// `addr` must be the zero page the VMM passed in RSI, mapped readable at
    /// the current privilege level.
    pub unsafe fn new(addr: u64) -> Self {
        BootParams { addr }
    }

    fn read<T: Copy>(&self, offset: u64) -> T {
        // SAFETY: `new`'s contract; the offsets are within the 4 KiB page.
        unsafe { core::ptr::read_unaligned((self.addr + offset) as *const T) }
    }

    /// The usable RAM ranges (e820 type 1), in table order.
    pub fn ram(&self) -> impl Iterator<Item = RamRange> + '_ {
        let n = self.read::<u8>(E820_ENTRIES).min(E820_MAX_ENTRIES);
        (0..u64::from(n)).filter_map(move |i| {
            let entry = E820_TABLE + i * E820_ENTRY_SIZE;
            let addr = self.read::<u64>(entry);
            let size = self.read::<u64>(entry + 8);
            let kind = self.read::<u32>(entry + 16);
            (kind == E820_RAM && size != 0).then(|| RamRange {
                start: addr,
                end: addr.saturating_add(size),
            })
        })
    }

    /// End of the highest RAM range.
    pub fn ram_end(&self) -> u64 {
        self.ram().map(|r| r.end).max().unwrap_or(0)
    }

    /// The NUL-terminated command line, without the NUL (empty if none).
    pub fn cmdline(&self) -> &'static [u8] {
        let ptr = self.read::<u32>(CMD_LINE_PTR);
        if ptr == 0 {
            return &[];
        }
        let start = u64::from(ptr) as *const u8;
        let mut len = 0;
        // SAFETY: the VMM put a NUL-terminated string at cmd_line_ptr; reading
        // stops at the NUL or after CMDLINE_MAX bytes. The memory is RAM that
        // nothing writes.
        unsafe {
            while len < CMDLINE_MAX && start.add(len).read() != 0 {
                len += 1;
            }
            core::slice::from_raw_parts(start, len)
        }
    }
}
