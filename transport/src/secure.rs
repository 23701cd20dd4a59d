//! The channel's cryptography: the pre-shared key, the session keys derived
//! from it for one connection, and the AEAD that seals every frame.
//!
//! Everything here is `ring`: HKDF-SHA256 to derive keys, HMAC-SHA256 for
//! the handshake's proofs (see [`crate::auth`]), AES-256-GCM (or
//! ChaCha20-Poly1305 on a CPU without AES instructions) to seal. Nothing is
//! home-made but the framing around those calls.
//!
//! # Keys
//! A [`FtKey`] is at least [`KEY_MIN_LEN`] random bytes both hosts share,
//! read from a file that only its owner may read (as ssh insists for private
//! keys). `ftvmm keygen FILE` writes one ([`FtKey::write_new`]).
//!
//! # Nonces
//! Each connection derives its own pair of AEAD keys (one per direction)
//! from the key and both sides' fresh random nonces, so nothing sealed on one
//! connection opens on another. Within a direction the AEAD nonce is the
//! direction (4 bytes) followed by a counter (8 bytes, big-endian) that both
//! ends keep: the sender never reuses a value, and the receiver opens record
//! n only with counter n, so a replayed, dropped or reordered record fails
//! to open.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::aead::{self, Aad, LessSafeKey, Nonce, Tag, UnboundKey, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

/// The shortest key accepted, in bytes.
pub const KEY_MIN_LEN: usize = 32;
/// The longest key file read, in bytes (a key is small; anything bigger is
/// not a key file).
const KEY_FILE_MAX: u64 = 4096;
/// Length of an AEAD tag (both ciphers).
pub const TAG_LEN: usize = aead::MAX_TAG_LEN;
/// Length of each side's handshake nonce.
pub const NONCE_BYTES: usize = 32;

/// Why a key could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Opening or reading the file failed.
    #[error("cannot read the key file '{path}': {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// Group or others may read or write the file.
    #[error(
        "key file '{path}' is accessible by group or others (mode {mode:04o}); \
         a key must be private to its owner: chmod 600 '{path}'"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Not a regular file.
    #[error("key file '{path}' is not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// Too short, or too long to be a key.
    #[error(
        "key file '{path}' holds {len} bytes of key; at least {KEY_MIN_LEN} are needed \
         (make one with `ftvmm keygen FILE`)"
    )]
    Length {
        /// The file.
        path: PathBuf,
        /// Key bytes found.
        len: usize,
    },
    /// The file already exists (keygen never overwrites a key).
    #[error("key file '{path}' already exists; refusing to overwrite a key")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// Writing a new key failed.
    #[error("cannot write the key file '{path}': {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// The system's random number generator failed.
    #[error("the system's random number generator failed")]
    Random,
}

/// The pre-shared key of a primary and its standby.
pub struct FtKey {
    bytes: Vec<u8>,
}

impl fmt::Debug for FtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FtKey({} bytes)", self.bytes.len())
    }
}

impl Drop for FtKey {
    fn drop(&mut self) {
        for b in self.bytes.iter_mut() {
            // SAFETY: `b` is a valid, aligned, exclusive reference into the
            // vector; a volatile store keeps the wipe from being elided.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl FtKey {
    /// A key from its bytes (at least [`KEY_MIN_LEN`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<FtKey, KeyError> {
        if bytes.len() < KEY_MIN_LEN {
            return Err(KeyError::Length {
                path: PathBuf::from("(memory)"),
                len: bytes.len(),
            });
        }
        Ok(FtKey {
            bytes: bytes.to_vec(),
        })
    }

    /// 32 fresh random bytes.
    pub fn generate() -> Result<FtKey, KeyError> {
        let mut bytes = vec![0u8; KEY_MIN_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| KeyError::Random)?;
        Ok(FtKey { bytes })
    }

    /// Reads a key file: one line of hex digits (what `ftvmm keygen`
    /// writes), or raw bytes (e.g. `head -c 32 /dev/urandom`). The file must
    /// be a regular file that neither group nor others can access.
    pub fn load(path: &Path) -> Result<FtKey, KeyError> {
        let read_err = |source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(KeyError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut raw = Vec::with_capacity(128);
        file.take(KEY_FILE_MAX + 1)
            .read_to_end(&mut raw)
            .map_err(read_err)?;
        let length = |len| KeyError::Length {
            path: path.to_path_buf(),
            len,
        };
        if raw.len() as u64 > KEY_FILE_MAX {
            return Err(length(raw.len()));
        }
        let bytes = decode_hex_line(&raw).unwrap_or_else(|| raw.clone());
        for b in raw.iter_mut() {
            // SAFETY: as in `Drop`: a valid exclusive reference; volatile so
            // the wipe of the file's copy is kept.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
        if bytes.len() < KEY_MIN_LEN {
            return Err(length(bytes.len()));
        }
        Ok(FtKey { bytes })
    }

    /// Writes a fresh key to `path` (created with mode 0600; an existing file
    /// is never overwritten), as one line of hex.
    pub fn write_new(path: &Path) -> Result<(), KeyError> {
        let key = FtKey::generate()?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => KeyError::Exists {
                    path: path.to_path_buf(),
                },
                _ => KeyError::Write {
                    path: path.to_path_buf(),
                    source,
                },
            })?;
        let mut line: String = key.bytes.iter().map(|b| format!("{b:02x}")).collect();
        line.push('\n');
        file.write_all(line.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|source| KeyError::Write {
                path: path.to_path_buf(),
                source,
            })
    }

    /// A short, non-secret name of the key for logs (the first 8 bytes of
    /// an HKDF output that nothing else uses), so operators can tell whether
    /// two hosts hold the same key without printing it.
    pub fn fingerprint(&self) -> String {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"ftvmm key fingerprint").extract(&self.bytes);
        let mut out = [0u8; 8];
        prk.expand(&[b"fingerprint"], Len(8))
            .and_then(|okm| okm.fill(&mut out))
            .expect("8 bytes is a valid HKDF-SHA256 output length");
        out.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Hex digits (whitespace around them allowed) → bytes; `None` if the file
/// is not one line of an even number of hex digits.
fn decode_hex_line(raw: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(raw).ok()?.trim();
    if text.is_empty() || text.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    text.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// How a connection is protected: what `--ft-key` / `--ft-insecure` chose.
#[derive(Debug, Clone)]
pub enum Security {
    /// Mutual authentication with this key, every frame sealed.
    Keyed(Arc<FtKey>),
    /// Nothing authenticated or sealed (`--ft-insecure`).
    Insecure,
}

impl Security {
    /// A keyed setting.
    pub fn keyed(key: FtKey) -> Security {
        Security::Keyed(Arc::new(key))
    }

    /// "keyed (fingerprint …)" or "insecure", for logs.
    pub fn describe(&self) -> String {
        match self {
            Security::Keyed(k) => format!("keyed (key {})", k.fingerprint()),
            Security::Insecure => "insecure (--ft-insecure)".into(),
        }
    }
}

/// The AEAD that seals frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    /// AES-256-GCM (the default where the CPU has AES and carry-less
    /// multiply instructions).
    Aes256Gcm,
    /// ChaCha20-Poly1305 (CPUs without AES instructions).
    ChaCha20Poly1305,
}

impl Cipher {
    /// AES-256-GCM if this CPU has AES-NI and PCLMULQDQ, else
    /// ChaCha20-Poly1305.
    pub fn preferred() -> Cipher {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("aes")
                && std::arch::is_x86_feature_detected!("pclmulqdq")
            {
                return Cipher::Aes256Gcm;
            }
        }
        Cipher::ChaCha20Poly1305
    }

    /// Its code on the wire.
    pub fn code(self) -> u8 {
        match self {
            Cipher::Aes256Gcm => 1,
            Cipher::ChaCha20Poly1305 => 2,
        }
    }

    /// The cipher with this wire code.
    pub fn from_code(code: u8) -> Option<Cipher> {
        match code {
            1 => Some(Cipher::Aes256Gcm),
            2 => Some(Cipher::ChaCha20Poly1305),
            _ => None,
        }
    }

    /// Its name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::Aes256Gcm => "AES-256-GCM",
            Cipher::ChaCha20Poly1305 => "ChaCha20-Poly1305",
        }
    }

    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Cipher::Aes256Gcm => &aead::AES_256_GCM,
            Cipher::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }
}

/// Which way a sealed record travels; part of every AEAD nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the side that connected (the primary) to the one that accepted.
    Initiator,
    /// From the side that accepted (the standby) to the one that connected.
    Responder,
}

impl Direction {
    fn tag(self) -> u32 {
        match self {
            Direction::Initiator => 0x6674_0001,
            Direction::Responder => 0x6674_0002,
        }
    }

    fn label(self) -> &'static [u8] {
        match self {
            Direction::Initiator => b"ftvmm traffic initiator to responder",
            Direction::Responder => b"ftvmm traffic responder to initiator",
        }
    }
}

/// A record failed to open: altered, replayed, reordered, truncated, or
/// sealed under another key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("record {counter} failed authentication (altered, replayed, reordered or sealed under another key)")]
pub struct Rejected {
    /// The counter the record was expected to carry.
    pub counter: u64,
}

/// Seals one direction's records, counter by counter.
pub struct Sealer {
    key: LessSafeKey,
    dir: Direction,
    counter: u64,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sealer({:?}, {})", self.dir, self.counter)
    }
}

/// Opens one direction's records, counter by counter.
pub struct Opener {
    key: LessSafeKey,
    dir: Direction,
    counter: u64,
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Opener({:?}, {})", self.dir, self.counter)
    }
}

fn nonce(dir: Direction, counter: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[..4].copy_from_slice(&dir.tag().to_be_bytes());
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

impl Sealer {
    /// Encrypts `in_out` in place under the next counter, authenticating
    /// `aad` with it; returns the tag.
    pub fn seal(&mut self, aad: &[u8], in_out: &mut [u8]) -> [u8; TAG_LEN] {
        // 2^64 records cannot be sent in the life of a connection; stopping
        // short of the wrap keeps a nonce from ever repeating regardless.
        assert!(self.counter < u64::MAX, "AEAD counter exhausted");
        let n = nonce(self.dir, self.counter);
        self.counter += 1;
        let tag = self
            .key
            .seal_in_place_separate_tag(n, Aad::from(aad), in_out)
            .expect("sealing fails only for inputs beyond the AEAD's size limit");
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Records sealed so far.
    pub fn count(&self) -> u64 {
        self.counter
    }
}

impl Opener {
    /// Decrypts `in_out` in place if `tag` authenticates it and `aad` as
    /// the next record of this direction; on failure `in_out` holds garbage
    /// and the stream must be dropped.
    pub fn open(
        &mut self,
        aad: &[u8],
        in_out: &mut [u8],
        tag: [u8; TAG_LEN],
    ) -> Result<(), Rejected> {
        let counter = self.counter;
        self.key
            .open_in_place_separate_tag(
                nonce(self.dir, counter),
                Aad::from(aad),
                Tag::from(tag),
                in_out,
                0..,
            )
            .map_err(|_| Rejected { counter })?;
        self.counter += 1;
        Ok(())
    }

    /// Records opened so far.
    pub fn count(&self) -> u64 {
        self.counter
    }
}

/// One side's keys for one connection.
#[derive(Debug)]
pub struct SessionKeys {
    /// Seals what this side sends.
    pub tx: Sealer,
    /// Opens what the other side sends.
    pub rx: Opener,
    /// The cipher both use.
    pub cipher: Cipher,
}

/// HKDF output length marker for `ring`.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// The keys one connection's handshake derives from the pre-shared key.
pub(crate) struct Derived {
    /// Key of the handshake's HMAC proofs.
    pub auth: ring::hmac::Key,
    prk: hkdf::Prk,
    transcript_hash: [u8; 32],
}

impl Derived {
    /// HKDF-Extract over the key with both nonces as salt; the transcript
    /// hash (preamble, offer, reply) goes into every expansion, so the keys
    /// are bound to everything said in the clear.
    pub fn new(
        key: &FtKey,
        initiator_nonce: &[u8],
        responder_nonce: &[u8],
        transcript: &[u8],
    ) -> Derived {
        let mut salt = [0u8; 2 * NONCE_BYTES];
        salt[..NONCE_BYTES].copy_from_slice(initiator_nonce);
        salt[NONCE_BYTES..].copy_from_slice(responder_nonce);
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(key.bytes());
        let th = ring::digest::digest(&ring::digest::SHA256, transcript);
        let mut transcript_hash = [0u8; 32];
        transcript_hash.copy_from_slice(th.as_ref());
        let mut auth = [0u8; 32];
        prk.expand(&[b"ftvmm handshake proof key", &transcript_hash], Len(32))
            .and_then(|okm| okm.fill(&mut auth))
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        Derived {
            auth: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &auth),
            prk,
            transcript_hash,
        }
    }

    /// The HMAC proof a side of `role` gives: over the transcript hash.
    pub fn proof(&self, role: Direction) -> [u8; 32] {
        let label: &[u8] = match role {
            Direction::Initiator => b"ftvmm proof of the initiator",
            Direction::Responder => b"ftvmm proof of the responder",
        };
        let mut ctx = ring::hmac::Context::with_key(&self.auth);
        ctx.update(label);
        ctx.update(&self.transcript_hash);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    /// Checks the other side's proof in constant time.
    pub fn verify(&self, role: Direction, proof: &[u8]) -> bool {
        let mut msg = Vec::with_capacity(64);
        msg.extend_from_slice(match role {
            Direction::Initiator => b"ftvmm proof of the initiator".as_slice(),
            Direction::Responder => b"ftvmm proof of the responder".as_slice(),
        });
        msg.extend_from_slice(&self.transcript_hash);
        ring::hmac::verify(&self.auth, &msg, proof).is_ok()
    }

    /// The traffic keys of the side that sends as `me`.
    pub fn session_keys(&self, me: Direction, cipher: Cipher) -> SessionKeys {
        let other = match me {
            Direction::Initiator => Direction::Responder,
            Direction::Responder => Direction::Initiator,
        };
        SessionKeys {
            tx: Sealer {
                key: self.traffic_key(me, cipher),
                dir: me,
                counter: 0,
            },
            rx: Opener {
                key: self.traffic_key(other, cipher),
                dir: other,
                counter: 0,
            },
            cipher,
        }
    }

    fn traffic_key(&self, dir: Direction, cipher: Cipher) -> LessSafeKey {
        let alg = cipher.algorithm();
        let mut k = [0u8; 32];
        self.prk
            .expand(
                &[dir.label(), &[cipher.code()], &self.transcript_hash],
                Len(alg.key_len()),
            )
            .and_then(|okm| okm.fill(&mut k[..alg.key_len()]))
            .expect("an AEAD key length is a valid HKDF-SHA256 output length");
        let key = UnboundKey::new(alg, &k[..alg.key_len()]).expect("key of the algorithm's length");
        for b in k.iter_mut() {
            // SAFETY: a valid exclusive reference into a local array; the
            // volatile store keeps the wipe.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
        LessSafeKey::new(key)
    }
}

/// `n` fresh random bytes for a handshake nonce.
pub(crate) fn random_nonce() -> Result<[u8; NONCE_BYTES], KeyError> {
    let mut n = [0u8; NONCE_BYTES];
    SystemRandom::new()
        .fill(&mut n)
        .map_err(|_| KeyError::Random)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(cipher: Cipher) -> (SessionKeys, SessionKeys) {
        let key = FtKey::from_bytes(&[7u8; 32]).unwrap();
        let d = Derived::new(&key, &[1; 32], &[2; 32], b"transcript");
        (
            d.session_keys(Direction::Initiator, cipher),
            d.session_keys(Direction::Responder, cipher),
        )
    }

    #[test]
    fn both_ciphers_round_trip_and_reject_tampering() {
        for cipher in [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305] {
            let (mut a, mut b) = pair(cipher);
            let mut msg = *b"checkpoint bytes";
            let tag = a.tx.seal(b"aad", &mut msg);
            assert_ne!(&msg, b"checkpoint bytes");
            let mut copy = msg;
            b.rx.open(b"aad", &mut copy, tag).unwrap();
            assert_eq!(&copy, b"checkpoint bytes");

            // Flipped byte, wrong aad, replay of record 0 as record 1.
            let mut m2 = *b"second";
            let tag2 = a.tx.seal(b"aad", &mut m2);
            let mut bad = m2;
            bad[3] ^= 1;
            assert_eq!(
                b.rx.open(b"aad", &mut bad, tag2),
                Err(Rejected { counter: 1 })
            );
            let mut bad_aad = m2;
            assert!(b.rx.open(b"aaX", &mut bad_aad, tag2).is_err());
            let mut replay = msg;
            assert!(b.rx.open(b"aad", &mut replay, tag).is_err());
            // The other direction's key does not open it either.
            let mut wrong_dir = m2;
            assert!(a.rx.open(b"aad", &mut wrong_dir, tag2).is_err());
            let mut good = m2;
            b.rx.open(b"aad", &mut good, tag2).unwrap();
            assert_eq!(&good, b"second");
        }
    }

    #[test]
    fn keys_depend_on_key_nonces_and_transcript() {
        let k1 = FtKey::from_bytes(&[7u8; 32]).unwrap();
        let k2 = FtKey::from_bytes(&[8u8; 32]).unwrap();
        let base = Derived::new(&k1, &[1; 32], &[2; 32], b"t");
        let others = [
            Derived::new(&k2, &[1; 32], &[2; 32], b"t"),
            Derived::new(&k1, &[9; 32], &[2; 32], b"t"),
            Derived::new(&k1, &[1; 32], &[9; 32], b"t"),
            Derived::new(&k1, &[1; 32], &[2; 32], b"u"),
        ];
        let p = base.proof(Direction::Initiator);
        assert!(base.verify(Direction::Initiator, &p));
        assert!(!base.verify(Direction::Responder, &p));
        for o in &others {
            assert!(!o.verify(Direction::Initiator, &p));
            let mut tx = base
                .session_keys(Direction::Initiator, Cipher::Aes256Gcm)
                .tx;
            let mut rx = o.session_keys(Direction::Responder, Cipher::Aes256Gcm).rx;
            let mut m = *b"x";
            let tag = tx.seal(b"", &mut m);
            assert!(rx.open(b"", &mut m, tag).is_err());
        }
    }

    #[test]
    fn key_files_hex_raw_permissions_and_length() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ftvmm-key-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("k");
        FtKey::write_new(&p).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.trim().len(), 64);
        let k = FtKey::load(&p).unwrap();
        assert_eq!(k.bytes().len(), 32);
        assert!(matches!(FtKey::write_new(&p), Err(KeyError::Exists { .. })));

        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = FtKey::load(&p).unwrap_err();
        assert!(
            matches!(e, KeyError::Permissions { mode: 0o640, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");

        let raw = dir.join("raw");
        std::fs::write(&raw, [0xabu8; 40]).unwrap();
        std::fs::set_permissions(&raw, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(FtKey::load(&raw).unwrap().bytes(), &[0xab; 40]);

        let short = dir.join("short");
        std::fs::write(&short, "abcd\n").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = FtKey::load(&short).unwrap_err();
        assert!(matches!(e, KeyError::Length { len: 2, .. }), "{e}");
        assert!(matches!(FtKey::load(&dir), Err(KeyError::NotAFile { .. })));
        assert!(matches!(
            FtKey::load(&dir.join("missing")),
            Err(KeyError::Read { .. })
        ));
        assert_ne!(k.fingerprint(), FtKey::load(&raw).unwrap().fingerprint());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
