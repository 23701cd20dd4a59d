//! Output commit for the serial console of a protected VM (DESIGN I1): bytes
//! the guest writes in epoch n are held and reach the real sink only once the
//! standby has acknowledged checkpoint n.

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};

use ftvmm_devices::legacy::SerialOutput;
use ftvmm_netbuf::{EpochQueue, Held, OutputCommit};

struct Inner {
    sink: SerialOutput,
    queue: EpochQueue<Vec<u8>>,
}

/// Writes released console bytes; a sink that fails (a closed terminal)
/// loses them, it does not stop the VM.
fn write_sink(sink: &mut SerialOutput, bytes: &[u8]) {
    if let Err(e) = sink.write_all(bytes) {
        log::debug!("console sink: {e}");
    }
}

/// The console's output, held per epoch while the VM is protected.
pub struct HeldOutput {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for HeldOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = self.lock();
        f.debug_struct("HeldOutput")
            .field("holding", &i.queue.holding())
            .field("held", &i.queue.held())
            .finish()
    }
}

impl HeldOutput {
    /// Wraps `sink`, passing output through until [`OutputCommit::hold`].
    pub fn new(sink: SerialOutput) -> Arc<Self> {
        let mut queue = EpochQueue::<Vec<u8>>::new();
        queue.open().reserve(4096);
        Arc::new(HeldOutput {
            inner: Mutex::new(Inner { sink, queue }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The writer to give the serial device.
    pub fn writer(self: &Arc<Self>) -> SerialOutput {
        Box::new(HeldWriter(self.clone()))
    }

    /// Writes the epochs before `epoch` and only the first half of sealed
    /// epoch `epoch`: fault injection uses it to die in the middle of a
    /// release.
    pub fn release_half(&self, epoch: u64) {
        self.release_upto(epoch.saturating_sub(1));
        let mut i = self.lock();
        let Inner { queue, sink } = &mut *i;
        if let Some((e, buf)) = queue.front() {
            if e == epoch {
                let _ = sink.write_all(&buf[..buf.len() / 2]);
                let _ = sink.flush();
            }
        }
    }

    /// Bytes held now (sealed and open).
    pub fn held_bytes(&self) -> usize {
        self.lock().queue.held().bytes as usize
    }
}

impl OutputCommit for HeldOutput {
    fn hold(&self) {
        self.lock().queue.hold();
    }

    fn seal(&self, epoch: u64) -> Held {
        self.lock().queue.seal(epoch)
    }

    fn release_upto(&self, epoch: u64) -> Held {
        let mut i = self.lock();
        let Inner { queue, sink } = &mut *i;
        let released = queue.release_upto(epoch, |b| write_sink(sink, b));
        if released.bytes > 0 {
            let _ = i.sink.flush();
        }
        released
    }

    fn discard_after(&self, epoch: u64) {
        self.lock().queue.discard_after(epoch);
    }

    fn release_all(&self) {
        let mut i = self.lock();
        let Inner { queue, sink } = &mut *i;
        queue.release_all(|b| write_sink(sink, b));
        let _ = i.sink.flush();
    }
}

struct HeldWriter(Arc<HeldOutput>);

impl Write for HeldWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut i = self.0.lock();
        if i.queue.holding() {
            i.queue.open().extend_from_slice(buf);
            Ok(buf.len())
        } else {
            i.sink.write(buf)
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut i = self.0.lock();
        if i.queue.holding() {
            Ok(())
        } else {
            i.sink.flush()
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
        assert_eq!(h.release_upto(1).bytes, 1);
        assert_eq!(&*sink.0.lock().unwrap(), b"boot a");
        assert_eq!(h.release_upto(1).bytes, 0);
        h.release_all();
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
