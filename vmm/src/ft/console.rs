//! Output commit for the serial console of a protected VM (DESIGN I1): bytes
//! the guest writes in epoch n are held and reach the real sink only once the
//! standby has acknowledged checkpoint n.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};

use ftvmm_devices::legacy::SerialOutput;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Unprotected: straight to the sink.
    PassThrough,
    /// Protected: buffered per epoch.
    Held,
}

struct Inner {
    sink: SerialOutput,
    mode: Mode,
    /// Bytes of the epoch in progress.
    open: Vec<u8>,
    /// Closed epochs waiting for their ack, oldest first.
    sealed: VecDeque<(u64, Vec<u8>)>,
    /// Emptied buffers kept for reuse, so steady state does not allocate.
    spare: Vec<Vec<u8>>,
}

/// The console's output, held per epoch while the VM is protected.
pub struct HeldOutput {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for HeldOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.lock();
        f.debug_struct("HeldOutput")
            .field("mode", &i.mode)
            .field("open", &i.open.len())
            .field("sealed", &i.sealed.len())
            .finish()
    }
}

impl HeldOutput {
    /// Wraps `sink`, passing output through until [`HeldOutput::hold`].
    pub fn new(sink: SerialOutput) -> Arc<Self> {
        Arc::new(HeldOutput {
            inner: Mutex::new(Inner {
                sink,
                mode: Mode::PassThrough,
                open: Vec::with_capacity(4096),
                sealed: VecDeque::with_capacity(8),
                spare: Vec::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The writer to give the serial device.
    pub fn writer(self: &Arc<Self>) -> SerialOutput {
        Box::new(HeldWriter(self.clone()))
    }

    /// Starts holding output (protection begins).
    pub fn hold(&self) {
        self.lock().mode = Mode::Held;
    }

    /// Closes the output of epoch `epoch` (call while the vCPUs are paused,
    /// so the cut matches the checkpoint). Returns its size.
    pub fn seal(&self, epoch: u64) -> usize {
        let mut i = self.lock();
        if i.mode != Mode::Held {
            return 0;
        }
        let fresh = i.spare.pop().unwrap_or_default();
        let buf = std::mem::replace(&mut i.open, fresh);
        let n = buf.len();
        i.sealed.push_back((epoch, buf));
        n
    }

    /// Writes every sealed epoch up to and including `epoch` to the sink.
    /// Returns the bytes released.
    pub fn release_upto(&self, epoch: u64) -> usize {
        let mut i = self.lock();
        let mut released = 0;
        while i.sealed.front().is_some_and(|(e, _)| *e <= epoch) {
            let (_, mut buf) = i.sealed.pop_front().expect("front exists");
            released += buf.len();
            if let Err(e) = i.sink.write_all(&buf) {
                log::debug!("console sink: {e}");
            }
            buf.clear();
            i.spare.push(buf);
        }
        if released > 0 {
            let _ = i.sink.flush();
        }
        released
    }

    /// Writes only the first `bytes` of sealed epoch `epoch` (and the epochs
    /// before it): fault injection uses it to die in the middle of a release.
    pub fn release_prefix(&self, epoch: u64, bytes: usize) {
        self.release_upto(epoch.saturating_sub(1));
        let mut i = self.lock();
        let Inner { sealed, sink, .. } = &mut *i;
        if let Some((e, buf)) = sealed.front() {
            if *e == epoch {
                let _ = sink.write_all(&buf[..bytes.min(buf.len())]);
                let _ = sink.flush();
            }
        }
    }

    /// Drops every sealed epoch after `epoch` and the open one: output of
    /// epochs that will never commit (a fenced primary, whose standby took
    /// over from `epoch`).
    pub fn discard_after(&self, epoch: u64) {
        let mut i = self.lock();
        while i.sealed.back().is_some_and(|(e, _)| *e > epoch) {
            let (_, mut buf) = i.sealed.pop_back().expect("back exists");
            buf.clear();
            i.spare.push(buf);
        }
        i.open.clear();
    }

    /// Protection ended (the standby is gone): releases everything held, in
    /// order, and passes further output straight through.
    pub fn release_all(&self) -> usize {
        let released = self.release_upto(u64::MAX);
        let mut i = self.lock();
        let open = std::mem::take(&mut i.open);
        if let Err(e) = i.sink.write_all(&open) {
            log::debug!("console sink: {e}");
        }
        let _ = i.sink.flush();
        i.mode = Mode::PassThrough;
        released + open.len()
    }

    /// Bytes held now (sealed and open).
    pub fn held_bytes(&self) -> usize {
        let i = self.lock();
        i.open.len() + i.sealed.iter().map(|(_, b)| b.len()).sum::<usize>()
    }
}

struct HeldWriter(Arc<HeldOutput>);

impl Write for HeldWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut i = self.0.lock();
        match i.mode {
            Mode::Held => {
                i.open.extend_from_slice(buf);
                Ok(buf.len())
            }
            Mode::PassThrough => i.sink.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut i = self.0.lock();
        match i.mode {
            Mode::Held => Ok(()),
            Mode::PassThrough => i.sink.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn held_until_released_in_order() {
        let sink = Shared::default();
        let h = HeldOutput::new(Box::new(sink.clone()));
        let mut w = h.writer();
        w.write_all(b"boot ").unwrap();
        assert_eq!(&*sink.0.lock().unwrap(), b"boot ");
        h.hold();
        w.write_all(b"a").unwrap();
        h.seal(1);
        w.write_all(b"b").unwrap();
        h.seal(2);
        w.write_all(b"c").unwrap();
        assert_eq!(h.held_bytes(), 3);
        assert_eq!(&*sink.0.lock().unwrap(), b"boot ");
        assert_eq!(h.release_upto(1), 1);
        assert_eq!(&*sink.0.lock().unwrap(), b"boot a");
        assert_eq!(h.release_upto(1), 0);
        assert_eq!(h.release_all(), 2);
        assert_eq!(&*sink.0.lock().unwrap(), b"boot abc");
        w.write_all(b"d").unwrap();
        assert_eq!(&*sink.0.lock().unwrap(), b"boot abcd");
    }

    #[test]
    fn discard_drops_uncommitted_epochs() {
        let sink = Shared::default();
        let h = HeldOutput::new(Box::new(sink.clone()));
        let mut w = h.writer();
        h.hold();
        w.write_all(b"1").unwrap();
        h.seal(1);
        w.write_all(b"2").unwrap();
        h.seal(2);
        w.write_all(b"3").unwrap();
        h.discard_after(1);
        h.release_upto(10);
        assert_eq!(&*sink.0.lock().unwrap(), b"1");
    }
}
