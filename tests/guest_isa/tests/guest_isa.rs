//! Every instruction in the test guest's ELF must be one that KVM's x86
//! instruction emulator runs (PLATFORM.md, "guest kernel code runs under
//! emulation"). The whole image is checked, CPL3 code too: it is simpler and
//! stronger than proving which code only ever runs in ring 3.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Mnemonics the emulator runs (objdump, Intel syntax, after prefixes).
#[rustfmt::skip]
const ALLOWED: &[&str] = &[
    // integer ALU
    "add", "adc", "sub", "sbb", "and", "or", "xor", "not", "neg", "inc", "dec", "cmp", "test",
    "mul", "imul", "div", "idiv",
    // shifts, rotates, bit tests and scans
    "shl", "sal", "shr", "sar", "rol", "ror", "rcl", "rcr", "shld", "shrd",
    "bt", "bts", "btr", "btc", "bsf", "bsr", "bswap",
    // moves, sign extension, address arithmetic, the stack
    "mov", "movabs", "movzx", "movsx", "movsxd", "lea",
    "cbw", "cwde", "cdqe", "cwd", "cdq", "cqo",
    "push", "pop", "pushf", "pushfq", "popf", "popfq", "leave",
    "xchg", "cmpxchg", "xadd", "cmpxchg8b",
    // flags
    "clc", "stc", "cmc", "cld", "std", "lahf", "sahf",
    // control flow (jcc, cmovcc, setcc: see CONDITIONS)
    "call", "ret", "jmp", "jrcxz", "jecxz",
    // string moves and stores, alone or under `rep` (see STRING_OPS)
    "movs", "movsb", "movsw", "movsq", "stos", "stosb", "stosw", "stosd", "stosq",
    // system
    "in", "out", "cli", "sti", "hlt", "lgdt", "lgdtd", "lidt", "ltr", "rdmsr", "wrmsr", "rdtsc", "rdrand",
    "cpuid", "iretq", "swapgs", "sysretq", "sysret", "ud2", "int",
    "nop", "endbr64", "pause",
    // the SSE moves and state saves (need CR4.OSFXSR)
    "movups", "movaps", "movdqu", "movdqa", "movntdq", "fxsave", "fxrstor", "fxsave64", "fxrstor64",
];

/// Condition codes of `jcc`, `cmovcc` and `setcc`.
#[rustfmt::skip]
const CONDITIONS: &[&str] = &[
    "o", "no", "b", "nb", "c", "nc", "ae", "nae", "e", "z", "ne", "nz", "be", "nbe", "a", "na",
    "s", "ns", "p", "np", "pe", "po", "l", "nl", "ge", "nge", "le", "nle", "g", "ng",
];

/// What `rep`/`repz`/`repnz` may prefix.
#[rustfmt::skip]
const STRING_OPS: &[&str] = &[
    "movs", "movsb", "movsw", "movsd", "movsq", "stos", "stosb", "stosw", "stosd", "stosq",
];

/// What `lock` may prefix.
#[rustfmt::skip]
const LOCKABLE: &[&str] = &[
    "add", "adc", "sub", "sbb", "and", "or", "xor", "not", "neg", "inc", "dec", "xchg",
    "cmpxchg", "xadd", "bts", "btr", "btc", "cmpxchg8b",
];

/// One instruction the emulator cannot run.
#[derive(Debug, PartialEq, Eq)]
struct Offence {
    addr: String,
    text: String,
}

fn is_allowed_mnemonic(m: &str, operands: &str) -> bool {
    if ALLOWED.contains(&m) {
        // `int n` yes; `int3`, `int1`, `into` are other mnemonics anyway.
        return m != "int" || !operands.is_empty();
    }
    // `movsd` is both the string move and SSE2's scalar-double move.
    if m == "movsd" {
        return !operands.contains("xmm");
    }
    ["j", "cmov", "set"].iter().any(|family| {
        m.strip_prefix(family)
            .is_some_and(|cc| CONDITIONS.contains(&cc))
    })
}

/// Checks one instruction's text (what follows the address and tab).
fn check_instruction(text: &str) -> bool {
    let text = text.split('#').next().unwrap_or("").trim();
    let mut tokens = text.split_whitespace().peekable();
    let (mut rep, mut lock) = (false, false);
    while let Some(&t) = tokens.peek() {
        match t {
            "rep" | "repz" | "repe" | "repnz" | "repne" => rep = true,
            "lock" => lock = true,
            "cs" | "ds" | "es" | "ss" | "fs" | "gs" | "data16" | "data32" | "addr16" | "addr32"
            | "notrack" | "bnd" => {}
            t if t == "rex" || t.starts_with("rex.") => {}
            _ => break,
        }
        tokens.next();
    }
    let Some(mnemonic) = tokens.next() else {
        // Prefixes alone: objdump shows a prefix it could not attach.
        return false;
    };
    let operands: String = tokens.collect::<Vec<_>>().join(" ");
    if !is_allowed_mnemonic(mnemonic, &operands) {
        return false;
    }
    if rep && !STRING_OPS.contains(&mnemonic) {
        return false;
    }
    if lock && !LOCKABLE.contains(&mnemonic) {
        return false;
    }
    true
}

/// Every offending instruction in an `objdump -d -M intel --no-show-raw-insn`
/// listing.
fn check_listing(listing: &str) -> Vec<Offence> {
    let mut offences = Vec::new();
    for line in listing.lines() {
        // Instruction lines look like "  100005:\tlea    rsp,[rip+0x10ff4]".
        let Some((addr, text)) = line.split_once(":\t") else {
            continue;
        };
        let addr = addr.trim();
        if addr.is_empty() || !addr.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        if !check_instruction(text) {
            offences.push(Offence {
                addr: format!("0x{addr}"),
                text: text.trim().to_string(),
            });
        }
    }
    offences
}

fn guest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../resources/test-guest")
}

/// Builds the guest (cargo does nothing if it is up to date) and returns its ELF.
fn build_guest() -> PathBuf {
    let dir = guest_dir();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&dir).args(["build", "--release"]);
    // The outer cargo's settings (target dir, target, flags) must not leak
    // into the guest's own build; its .cargo/config.toml decides.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS"
        {
            cmd.env_remove(key.as_ref());
        }
    }
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run cargo to build the guest in {}: {e}",
            dir.display()
        )
    });
    assert!(
        out.status.success(),
        "building the guest in {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    dir.join("target/x86_64-unknown-linux-gnu/release/ftguest")
}

/// Whether `objdump` runs here; prints the SKIP line when it does not.
fn objdump_found() -> bool {
    match Command::new("objdump").arg("--version").output() {
        Ok(out) if out.status.success() => true,
        _ => {
            println!("SKIP guest_isa: objdump not found");
            false
        }
    }
}

#[test]
fn guest_only_uses_emulated_instructions() {
    if !objdump_found() {
        return;
    }
    let elf = build_guest();
    let out = Command::new("objdump")
        .args(["-d", "-M", "intel", "--no-show-raw-insn"])
        .arg(&elf)
        .output()
        .expect("objdump runs");
    assert!(
        out.status.success(),
        "objdump {} failed: {}",
        elf.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    let instructions = listing.lines().filter(|l| l.contains(":\t")).count();
    assert!(
        instructions > 100,
        "objdump listed only {instructions} instructions in {}",
        elf.display()
    );
    let offences = check_listing(&listing);
    let report: Vec<String> = offences
        .iter()
        .map(|o| format!("  {}: {}", o.addr, o.text))
        .collect();
    assert!(
        offences.is_empty(),
        "{} instruction(s) in {} that KVM's emulator cannot run at CPL0 (PLATFORM.md):\n{}",
        offences.len(),
        elf.display(),
        report.join("\n")
    );
}

/// The address of symbol `name` in `elf` (from `nm`).
fn symbol(elf: &Path, name: &str) -> u64 {
    let out = Command::new("nm").arg(elf).output().expect("nm runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (addr, _, sym) = (f.next()?, f.next()?, f.next()?);
            (sym == name).then(|| u64::from_str_radix(addr, 16).ok())?
        })
        .unwrap_or_else(|| panic!("no symbol {name} in {}", elf.display()))
}

/// The APs' trampoline (in `.rodata`, so the whole-image check above never
/// decodes it) runs at CPL0 in real mode, then 32-bit protected mode, then
/// long mode: each part is checked in its own mode.
#[test]
fn ap_trampoline_only_uses_emulated_instructions() {
    if !objdump_found() {
        return;
    }
    let elf = build_guest();
    let parts = [
        ("__ftg_tramp16", "__ftg_tramp32", "i8086"),
        ("__ftg_tramp32", "__ftg_tramp64", "i386"),
        ("__ftg_tramp64", "__ftg_tramp_gdt", "x86-64"),
    ];
    for (from, to, mode) in parts {
        let (start, stop) = (symbol(&elf, from), symbol(&elf, to));
        let out = Command::new("objdump")
            .args(["-D", "-j", ".rodata", "--no-show-raw-insn", "-M"])
            .arg(format!("intel,{mode}"))
            .arg(format!("--start-address={start:#x}"))
            .arg(format!("--stop-address={stop:#x}"))
            .arg(&elf)
            .output()
            .expect("objdump runs");
        let listing = String::from_utf8_lossy(&out.stdout);
        let count = listing.lines().filter(|l| l.contains(":\t")).count();
        assert!(
            count >= 4,
            "{from} ({mode}): only {count} instructions:\n{listing}"
        );
        let offences = check_listing(&listing);
        assert!(
            offences.is_empty(),
            "{from} ({mode}) has instructions the emulator cannot run: {offences:?}\n{listing}"
        );
    }
}

#[test]
fn checker_rejects_what_the_emulator_cannot_run() {
    let listing = "\
ftguest:     file format elf64-x86-64

Disassembly of section .text:

0000000000100000 <_start>:
  100000:\tcli
  100001:\txorps  xmm0,xmm0
  100004:\tmov    r15,rsi
  100007:\tpopcnt rax,rdi
  10000c:\tvmovdqu ymm0,YMMWORD PTR [rdi]
  100010:\tint3
  100011:\tcrc32  eax,BYTE PTR [rsi]
  100016:\trep stos QWORD PTR es:[rdi],rax
  100019:\tlock cmpxchg QWORD PTR [rdi],rcx
  10001e:\tcmovne rax,rcx
  100022:\tmovsd  xmm0,QWORD PTR [rip+0x10]
  10002a:\trepz ret
  10002c:\tdata16 cs nop WORD PTR [rax+rax*1+0x0]
  100036:\tint    0x80
  100038:\ttzcnt  rax,rdi
  10003d:\t(bad)
  10003e:\tjmp    100000 <_start>        # a comment
\t...
";
    let offences = check_listing(listing);
    let rejected: Vec<&str> = offences.iter().map(|o| o.addr.as_str()).collect();
    assert_eq!(
        rejected,
        [
            "0x100001", // xorps
            "0x100007", // popcnt
            "0x10000c", // vmovdqu
            "0x100010", // int3
            "0x100011", // crc32
            "0x100022", // SSE2 movsd
            "0x10002a", // rep on a non-string op
            "0x100038", // tzcnt
            "0x10003d", // undecodable
        ]
    );
    assert_eq!(offences[0].text, "xorps  xmm0,xmm0");
}
