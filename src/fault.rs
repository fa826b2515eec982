//! Fatal faults: a panic anywhere in a serving process ends the process.
//!
//! A shard is a pinned thread that alone owns its conversations (and, on the dispatcher shard,
//! all agent routing); when it panics nothing can take them over, and the other shards would
//! carry on serving half a system. So `serve` installs [`install_panic_hook`], which on the
//! first panic of any thread:
//! 1. logs it through tracing at error level: the shard ([`shards::current_shard`]; `none` off
//!    the shard threads), the thread's name, the location, the message and a forced backtrace;
//! 2. marks the process failed ([`has_failed`]), so `/healthz` and `/readyz` answer 503 on the
//!    surviving shards (a load balancer stops sending traffic);
//! 3. after [`FAILED_LINGER`] (and once the log line is written) runs the flush callback (the
//!    audit chain) and exits with [`EXIT_PANIC`], so the service manager restarts it
//!    (`Restart=on-failure` in systemd/switchboard.service).
//!
//! Nothing acknowledged is lost by exiting: a message is acked only after the group commit
//! that stored it returned, and an LMDB commit is atomic (the meta page is written last), so
//! a process ending in the middle of a commit loses only that batch, none of which was acked.
//! Clients resend what was not acked (docs/protocol.md).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Exit code after a panic (`EX_SOFTWARE` of sysexits.h: an internal software error).
pub const EXIT_PANIC: i32 = 70;

/// How long the process keeps answering 503 on `/healthz` and `/readyz` after a panic before
/// it exits: long enough for a probe to see the failure, short enough to restart quickly.
pub const FAILED_LINGER: Duration = Duration::from_millis(750);

/// The longest the exit waits, past [`FAILED_LINGER`], for the panic's log line to be written
/// (symbolising a backtrace takes most of a second in a debug build).
const LOG_WAIT: Duration = Duration::from_secs(10);

static FAILED: AtomicBool = AtomicBool::new(false);
/// Set once the first panic's log line is written.
static LOGGED: AtomicBool = AtomicBool::new(false);

/// Whether a thread of this process panicked (the process is about to exit).
pub fn has_failed() -> bool {
    FAILED.load(Ordering::Acquire)
}

/// Installs the process-wide panic hook described in the module docs. `flush` runs once on
/// the exit thread, just before the process exits (after [`FAILED_LINGER`]).
pub fn install_panic_hook(flush: impl Fn() + Send + Sync + 'static) {
    let flush: std::sync::Arc<dyn Fn() + Send + Sync> = std::sync::Arc::new(flush);
    std::panic::set_hook(Box::new(move |info| {
        // First the failure mark and the exit timer: symbolising the backtrace below takes a
        // while (most of a second in a debug build) and must delay neither.
        if !FAILED.swap(true, Ordering::AcqRel) {
            let flush = flush.clone();
            let exit = move || {
                std::thread::sleep(FAILED_LINGER);
                let deadline = std::time::Instant::now() + LOG_WAIT;
                while !LOGGED.load(Ordering::Acquire) && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                flush();
                std::process::exit(EXIT_PANIC);
            };
            if std::thread::Builder::new()
                .name("switchboard-fatal".into())
                .spawn(exit)
                .is_err()
            {
                // No thread for the linger: exit at once rather than run on half a system.
                eprintln!("switchboard: a thread panicked: {info}");
                std::process::exit(EXIT_PANIC);
            }
        }
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed").to_owned();
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_else(|| "unknown".into());
        let message = panic_message(info.payload());
        let shard = shards::current_shard().map_or_else(|| "none".to_owned(), |s| s.0.to_string());
        let backtrace = std::backtrace::Backtrace::force_capture();
        tracing::error!(
            shard = %shard,
            thread = %thread,
            location = %location,
            panic = %message,
            "PANIC on shard {shard} (thread {thread}) at {location}: {message}; the process \
             exits with code {EXIT_PANIC} for a restart\nbacktrace:\n{backtrace}"
        );
        LOGGED.store(true, Ordering::Release);
    }));
}

/// For the thread that sees a shard end after a panic (the one joining the shards): waits
/// for the exit [`install_panic_hook`] scheduled, so the process ends with [`EXIT_PANIC`]
/// after [`FAILED_LINGER`] whichever thread panicked. Returns at once when nothing panicked.
pub fn await_fatal_exit() {
    if has_failed() {
        loop {
            std::thread::park();
        }
    }
}

/// The text of a panic payload (`panic!` gives a `&str` or a `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "(a panic payload that is not text)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_of_both_payload_kinds_are_read() {
        let literal = std::panic::catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(panic_message(literal.as_ref()), "plain");
        let formatted = std::panic::catch_unwind(|| panic!("shard {}", 3)).unwrap_err();
        assert_eq!(panic_message(formatted.as_ref()), "shard 3");
        let other = std::panic::catch_unwind(|| std::panic::panic_any(7u8)).unwrap_err();
        assert_eq!(
            panic_message(other.as_ref()),
            "(a panic payload that is not text)"
        );
    }
}
