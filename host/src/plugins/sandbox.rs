//! The parts of a call's sandbox that wasmtime does not give as they are: a memory
//! limiter that remembers it refused, a budget of log lines, the start of the plugin's
//! stderr (where a Rust plugin's panic message goes), and WASI waits that end at the
//! call's deadline or when the call is stopped.

use super::{State, Stop};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use wasmtime::component::{Linker, Resource};
use wasmtime::{ResourceLimiter, StoreContextMut, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::p2::DynPollable;
use wasmtime_wasi::p2::bindings::io::poll as wasi_poll;

/// The store's resource limits, noting when a memory could not grow: wasmtime reports
/// that as an error about growing memory, and the user should read "out of memory".
pub(super) struct MemoryLimiter {
    limits: StoreLimits,
    pub(super) exhausted: bool,
}

impl MemoryLimiter {
    pub(super) fn new(memory_bytes: usize) -> MemoryLimiter {
        MemoryLimiter {
            limits: StoreLimitsBuilder::new()
                .memory_size(memory_bytes)
                .instances(16)
                .tables(32)
                .memories(4)
                // A failed growth traps at once instead of handing the plugin a -1 it
                // would most likely turn into a crash further away from the cause.
                .trap_on_grow_failure(true)
                .build(),
            exhausted: false,
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum);
        if !matches!(allowed, Ok(true)) {
            self.exhausted = true;
        }
        allowed
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.exhausted = true;
        self.limits.memory_grow_failed(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

/// Log lines one call may write; past it, one line says the rest were dropped, so a
/// plugin that logs in a loop cannot fill the server's log.
pub(super) const MAX_LOG_LINES: u32 = 1000;

/// Counts a call's log lines against [`MAX_LOG_LINES`].
#[derive(Debug, Default)]
pub(super) struct LogBudget {
    written: u32,
}

/// What to do with the next log line.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum LogLine {
    Write,
    /// Write the notice that further lines are dropped, instead of the line.
    WriteDroppedNotice,
    Drop,
}

impl LogBudget {
    pub(super) fn next(&mut self) -> LogLine {
        self.written = self.written.saturating_add(1);
        match self.written {
            n if n <= MAX_LOG_LINES => LogLine::Write,
            n if n == MAX_LOG_LINES + 1 => LogLine::WriteDroppedNotice,
            _ => LogLine::Drop,
        }
    }
}

/// How much of a call's stderr is kept: enough for a panic message and its location.
const STDERR_KEPT: usize = 4096;

/// A plugin's stderr: the first [`STDERR_KEPT`] bytes are kept, the rest is dropped, and
/// writing never fails, so a chatty plugin neither fills memory nor crashes on it.
#[derive(Debug, Clone, Default)]
pub(super) struct StderrTail(Arc<Mutex<Vec<u8>>>);

impl StderrTail {
    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The message of a Rust panic written there, on one line, if there is one.
    pub(super) fn panic_message(&self) -> Option<String> {
        let kept = self.kept();
        let text = String::from_utf8_lossy(&kept);
        let start = text.find("panicked at ")?;
        let message = &text[start..];
        // Rust's hint about RUST_BACKTRACE means nothing to the plugin's user.
        let message = message.split("\nnote: ").next().unwrap_or(message);
        let line: String = message
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        Some(line.chars().take(500).collect())
    }
}

impl tokio::io::AsyncWrite for StderrTail {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut kept = self.kept();
        let room = STDERR_KEPT.saturating_sub(kept.len());
        kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
        Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl wasmtime_wasi::cli::IsTerminal for StderrTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for StderrTail {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// When a call must stop: its deadline, or a cancel or shutdown through its [`Stop`].
#[derive(Debug, Clone)]
pub(super) struct Watch {
    pub(super) stop: Stop,
    pub(super) deadline: Instant,
}

impl Watch {
    pub(super) fn should_stop(&self) -> bool {
        self.stop.reason().is_some() || Instant::now() >= self.deadline
    }

    /// Resolves when the call must stop, looking at the stop flag as often as the epoch
    /// ticks.
    async fn stopped(&self) {
        while !self.should_stop() {
            tokio::time::sleep(self.next_look()).await;
        }
    }

    /// How long a wait may go on before the watch looks again.
    fn next_look(&self) -> Duration {
        self.deadline
            .saturating_duration_since(Instant::now())
            .min(super::EPOCH_TICK)
    }
}

/// Replaces `wasi:io/poll`'s blocking functions with ones that give up at the call's
/// deadline or when it is stopped. Epoch interruption only reaches running WebAssembly,
/// so without this a plugin sleeping in `poll` (a `std::thread::sleep` is one) would hold
/// its worker past any deadline. These are the only WASI calls that can wait here: stdin
/// is empty, stdout and stderr never block, and there are no files or sockets to wait on.
pub(super) fn add_interruptible_waits(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    // The version wasmtime-wasi defines the interface under; a plugin importing an older
    // 0.2 version is matched to it by semver, so one definition serves all.
    let mut poll = linker.instance("wasi:io/poll@0.2.12")?;
    poll.func_wrap(
        "[method]pollable.block",
        |mut store: StoreContextMut<'_, State>, (pollable,): (Resource<DynPollable>,)| {
            let state = store.data_mut();
            let watch = state.watch.clone();
            let table = &mut state.table;
            wasmtime_wasi::runtime::in_tokio(async move {
                tokio::select! {
                    ready = wasi_poll::HostPollable::block(table, pollable) => ready,
                    () = watch.stopped() => Err(Trap::Interrupt.into()),
                }
            })
        },
    )?;
    poll.func_wrap(
        "poll",
        |mut store: StoreContextMut<'_, State>, (pollables,): (Vec<Resource<DynPollable>>,)| {
            let state = store.data_mut();
            let watch = state.watch.clone();
            let table = &mut state.table;
            wasmtime_wasi::runtime::in_tokio(async move {
                tokio::select! {
                    ready = wasi_poll::Host::poll(table, pollables) => ready.map(|r| (r,)),
                    () = watch.stopped() => Err(Trap::Interrupt.into()),
                }
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_logs_a_thousand_lines_then_one_notice() {
        let mut budget = LogBudget::default();
        for _ in 0..MAX_LOG_LINES {
            assert_eq!(budget.next(), LogLine::Write);
        }
        assert_eq!(budget.next(), LogLine::WriteDroppedNotice);
        for _ in 0..10_000 {
            assert_eq!(budget.next(), LogLine::Drop);
        }
    }

    #[test]
    fn a_watch_stops_at_its_deadline_or_when_told() {
        let watch = Watch {
            stop: Stop::new(),
            deadline: Instant::now() + Duration::from_secs(60),
        };
        assert!(!watch.should_stop());
        assert!(watch.next_look() <= super::super::EPOCH_TICK);
        watch.stop.request(super::super::StopReason::Cancelled);
        assert!(watch.should_stop());
        let past = Watch {
            stop: Stop::new(),
            deadline: Instant::now(),
        };
        assert!(past.should_stop());
        assert_eq!(past.next_look(), Duration::ZERO);
    }

    #[test]
    fn a_panic_message_is_found_in_stderr_and_the_rest_dropped() {
        use tokio::io::AsyncWrite;
        let tail = StderrTail::default();
        let mut writer = tail.clone();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut write = |bytes: &[u8]| match Pin::new(&mut writer).poll_write(&mut cx, bytes) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("{other:?}"),
        };
        assert_eq!(tail.panic_message(), None);
        write(b"\nthread '<unnamed>' panicked at src/lib.rs:7:9:\nno disk\nnote: run with `RUST_BACKTRACE=1`\n");
        assert_eq!(
            tail.panic_message().as_deref(),
            Some("panicked at src/lib.rs:7:9: no disk")
        );
        // Writes past what is kept still succeed.
        assert_eq!(write(&[b'x'; 2 * STDERR_KEPT]), 2 * STDERR_KEPT);
        assert_eq!(tail.kept().len(), STDERR_KEPT);
    }

    #[test]
    fn a_limiter_remembers_refusing_to_grow() -> wasmtime::Result<()> {
        let mut limiter = MemoryLimiter::new(1 << 20);
        assert!(limiter.memory_growing(0, 1 << 16, None)?);
        assert!(!limiter.exhausted);
        assert!(limiter.memory_growing(1 << 16, 2 << 20, None).is_err());
        assert!(limiter.exhausted);
        Ok(())
    }
}
