//! A few files added to the tiny Linux guest's initramfs, so a test can
//! run its own script as the guest's init (`rdinit=/NAME`) without
//! rebuilding the guest: the kernel unpacks concatenated newc archives in
//! order, so the tiny guest's archive followed by one made here gives the
//! guest both.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A newc ("070701") archive of `files` (path without the leading '/',
/// mode such as 0o100755, contents), with its trailer.
pub fn newc(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, (name, mode, data)) in files.iter().enumerate() {
        entry(&mut out, i as u32 + 1, name, *mode, data);
    }
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        1, // nlink
        0, // mtime
        data.len() as u32,
        0, // devmajor
        0, // devminor
        0, // rdevmajor
        0, // rdevminor
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Writes `dir/initramfs-with-extras.cpio`: the archive `base` followed by
/// one holding `files`; returns its path.
pub fn initrd_with(base: &Path, dir: &Path, files: &[(&str, u32, &[u8])]) -> PathBuf {
    let mut img =
        std::fs::read(base).unwrap_or_else(|e| panic!("read initramfs {}: {e}", base.display()));
    pad4(&mut img);
    img.extend_from_slice(&newc(files));
    let path = dir.join("initramfs-with-extras.cpio");
    std::fs::write(&path, img).unwrap();
    path
}
