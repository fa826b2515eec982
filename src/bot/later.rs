//! Answers a handler gives later: for a handler that must wait for something outside the
//! process (an HTTP service, a database) to decide.
//!
//! `handle` runs on the shard's event loop and must not block, so such a handler starts the
//! work elsewhere (its own thread), hands that work a [`LaterAnswer`], and returns
//! [`Verdict::Later`] at once. The driver awaits the answer without blocking the shard and acts
//! on it as on a verdict returned directly.
//!
//! Invariants: an answer is delivered at most once. The driver waits at most
//! [`LATER_LIMIT`]; an answer dropped unsent, one that comes too late, and one that is itself
//! `Later`, `Continue` or `NeedIntent` (a later answer cannot resume the chain) become the
//! standard fallback turn. The handler should give its work a much shorter deadline than
//! [`LATER_LIMIT`] and answer politely when it passes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_channel::oneshot;

use super::Verdict;

/// The longest the driver waits for a [`Later`] answer before it answers with the fallback.
pub const LATER_LIMIT: Duration = Duration::from_secs(10);

/// Creates a pending answer: the handler keeps the [`LaterAnswer`] (or gives it to the thread
/// doing the work) and returns `Verdict::Later(later)`.
pub fn later() -> (LaterAnswer, Later) {
    let (sender, receiver) = oneshot::channel();
    (
        LaterAnswer { sender },
        Later {
            receiver: Arc::new(Mutex::new(Some(receiver))),
        },
    )
}

/// The sending half: `send` it from any thread.
#[derive(Debug)]
pub struct LaterAnswer {
    sender: oneshot::Sender<Verdict>,
}

impl LaterAnswer {
    /// Delivers the verdict (ignored if the driver stopped waiting).
    pub fn send(self, verdict: Verdict) {
        let _ = self.sender.send(verdict);
    }
}

/// The receiving half, carried by [`Verdict::Later`]. Clones share one answer: whoever
/// awaits first gets it.
#[derive(Clone)]
pub struct Later {
    receiver: Arc<Mutex<Option<oneshot::Receiver<Verdict>>>>,
}

impl Later {
    /// Waits for the answer; `None` if it was dropped unsent or already taken.
    pub async fn answer(&self) -> Option<Verdict> {
        let receiver = self.receiver.lock().ok()?.take()?;
        receiver.await.ok()
    }
}

impl std::fmt::Debug for Later {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Later")
    }
}

impl PartialEq for Later {
    /// The same pending answer.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.receiver, &other.receiver)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(text: &str) -> Verdict {
        Verdict::Reply {
            text: text.into(),
            intent: None,
            confidence: 1.0,
            failed: false,
            degraded: false,
        }
    }

    #[test]
    fn an_answer_sent_from_another_thread_is_received_once() {
        let (answer, later) = super::later();
        let copy = later.clone();
        assert_eq!(copy, later);
        std::thread::spawn(move || answer.send(reply("shipped")))
            .join()
            .unwrap();
        let got = block_on(async move { later.answer().await });
        assert_eq!(got, Some(reply("shipped")));
        assert_eq!(block_on(async move { copy.answer().await }), None, "taken");
    }

    #[test]
    fn an_answer_dropped_unsent_is_none() {
        let (answer, later) = super::later();
        drop(answer);
        assert_eq!(block_on(async move { later.answer().await }), None);
    }

    /// Runs a future to completion on a glommio executor of this thread.
    fn block_on<T: 'static>(future: impl std::future::Future<Output = T> + 'static) -> T {
        glommio::LocalExecutorBuilder::default()
            .make()
            .expect("executor")
            .run(future)
    }
}
