//! Architecture-specific code. Only x86_64 hosts are supported.

pub mod x86_64;
