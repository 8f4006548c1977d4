//! Where log lines go: stderr, through one 64 KiB buffer that a background
//! thread writes out every 100 ms (and that is written out whenever it
//! fills, and at exit).
//!
//! With one `info` line per review, an unbuffered stderr costs a `write`
//! syscall per request on the serving path (half of the logging cost
//! in `perf`). Batching keeps the line per review and makes it cheap; the
//! price is that a line can reach `kubectl logs` up to 100 ms late. Envoy's
//! access log makes the same trade (it flushes every 10 s by default).
//!
//! Nothing is lost on the ways this process ends: a normal return and the
//! second-signal exit call [`flush`], and a panic flushes before the panic
//! message is printed.
//!
//! What a JSON line holds is written by [`JsonLine`] (module `json`).

mod json;

pub use json::JsonLine;

use std::io::{self, BufWriter, Stderr, Write};
use std::sync::{LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

const CAPACITY: usize = 64 * 1024;
const FLUSH_EVERY: Duration = Duration::from_millis(100);

static BUFFER: LazyLock<Mutex<BufWriter<Stderr>>> =
    LazyLock::new(|| Mutex::new(BufWriter::with_capacity(CAPACITY, io::stderr())));

fn lock() -> MutexGuard<'static, BufWriter<Stderr>> {
    // A panic while holding the lock leaves at worst a partial line.
    BUFFER.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The `tracing` writer: each event is appended to the shared buffer under
/// one lock (the formatter hands over a whole line at once).
pub struct BatchedStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchedStderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Self::Writer {
        Line
    }
}

/// One event's bytes on their way into the buffer.
pub struct Line;

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock().write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        lock().write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Written out by the flusher thread; flushing per event would undo
        // the batching.
        Ok(())
    }
}

/// Starts the flusher thread and makes panics flush the buffer before the
/// panic message. Call once, before logging.
pub fn start() {
    let spawned = std::thread::Builder::new()
        .name("log-flush".into())
        .spawn(|| {
            loop {
                std::thread::sleep(FLUSH_EVERY);
                flush();
            }
        });
    if spawned.is_err() {
        // Without the thread, lines would wait for the buffer to fill.
        eprintln!("cannot start the log flusher thread; log lines may be delayed");
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // try_lock: the panicking thread may be the one holding the buffer.
        let guard = match BUFFER.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        if let Some(mut buffer) = guard {
            let _ = buffer.flush();
        }
        previous(info);
    }));
}

/// Writes out everything logged so far. Call before the process exits.
pub fn flush() {
    let _ = lock().flush();
}
