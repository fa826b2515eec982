//! Resume replays: stored messages `(after, up_to]` sent to sessions, streamed from storage in
//! chunks of `[limits] replay_chunk` with yields between them.
//!
//! Invariants: a session sees each seq once and in order (live frames wait behind a streamed
//! replay, see [`crate::arena::Arena::begin_replay`]); a replay never holds a read transaction
//! across an await.

use super::*;

/// How long a streamed resume replay waits for a recipient that does not read before it sends
/// its next chunk anyway (the backlog bound then closes that session with 1013).
const REPLAY_STALL: Duration = Duration::from_secs(5);

impl Router {
    /// Sends stored messages `(after, up_to]` of a conversation to sessions, streamed from
    /// storage in chunks of `[limits] replay_chunk`: the first chunk at once, the rest by a task
    /// that yields between chunks and waits while its recipients' queues are full, so a resume
    /// from seq 0 of a long conversation neither stalls the shard nor piles its history up in
    /// memory. Live frames for the recipients wait behind a streamed replay (`ReplayBegin` /
    /// `ReplayEnd`), so every session still sees each seq once and in order.
    pub(super) fn replay(
        &self,
        to: &[SessionRef],
        conversation: ConversationId,
        after: u64,
        up_to: u64,
    ) {
        let chunk = self.config().limits.replay_chunk;
        let Some(sent) = self.replay_chunk(to, conversation, after, up_to, chunk) else {
            return;
        };
        if sent >= up_to {
            return;
        }
        let Some(router) = self.me.borrow().upgrade() else {
            return;
        };
        let to = to.to_vec();
        for session in &to {
            self.deliver_frame(*session, Arc::from(""), Delivery::ReplayBegin);
        }
        glommio::spawn_local(async move {
            let mut sent = sent;
            while sent < up_to {
                glommio::executor().yield_now().await;
                router.wait_for_room(&to, chunk).await;
                match router.replay_chunk(&to, conversation, sent, up_to, chunk) {
                    Some(next) if next > sent => sent = next,
                    _ => break,
                }
            }
            for session in &to {
                router.deliver_frame(*session, Arc::from(""), Delivery::ReplayEnd);
            }
        })
        .detach();
    }

    /// Sends the stored messages `(after, up_to]`, at most `chunk` of them, read in one read
    /// transaction. Returns the seq reached (`up_to` once everything was sent), or `None` when
    /// storage cannot be read (logged; the client's next resume asks again).
    pub(super) fn replay_chunk(
        &self,
        to: &[SessionRef],
        conversation: ConversationId,
        after: u64,
        up_to: u64,
        chunk: usize,
    ) -> Option<u64> {
        let view = match self.reader.read() {
            Ok(view) => view,
            Err(err) => {
                tracing::error!(shard = self.shard, error = %err, "replay: cannot read");
                return None;
            }
        };
        let limit = (up_to.saturating_sub(after) as usize).min(chunk);
        let messages = match view.messages_after(conversation, after, limit) {
            Ok(messages) => messages,
            Err(err) => {
                tracing::error!(shard = self.shard, error = %err, "replay: cannot read messages");
                return None;
            }
        };
        let mut frames = Vec::with_capacity(limit);
        let mut reached = after;
        let mut complete = true;
        for record in messages {
            match record {
                Ok(record) if record.seq() <= up_to => {
                    reached = record.seq();
                    frames.push(Arc::<str>::from(message_frame(
                        conversation,
                        record.seq(),
                        record.from(),
                        record.name(),
                        record.text(),
                        record.ts_ms(),
                    )))
                }
                Ok(_) => break,
                Err(err) => {
                    tracing::error!(shard = self.shard, error = %err, "replay: damaged record");
                    complete = false;
                    break;
                }
            }
        }
        drop(view);
        for session in to {
            for frame in &frames {
                self.deliver_frame(*session, frame.clone(), Delivery::Replay);
            }
        }
        // Fewer than asked for means nothing more is stored up to `up_to`.
        match complete {
            true if frames.len() < limit => Some(up_to),
            true => Some(reached),
            false => None,
        }
    }

    /// Waits (polling each millisecond) until every recipient of a streamed replay has room for
    /// another chunk: a session of this shard until fewer than `chunk` frames wait to be written
    /// to it (or it is gone; the live frames held behind the replay do not count: they wait for
    /// it to end), a session of another shard until the mesh queue toward that shard is under
    /// half its bound. Gives up after [`REPLAY_STALL`]: a client that stops reading is then
    /// closed by its backlog bound or its idle timeout, not held here.
    pub(super) async fn wait_for_room(&self, to: &[SessionRef], chunk: usize) {
        let started = std::time::Instant::now();
        let half_mesh = (self.config().limits.max_queued_per_shard / 2).max(1);
        loop {
            let full = to.iter().any(|session| {
                if session.shard == self.shard {
                    self.arena
                        .borrow()
                        .get(session.session)
                        .is_some_and(|record| record.outbox_len() >= chunk)
                } else {
                    self.queued_to(session.shard) >= half_mesh
                }
            });
            if !full || started.elapsed() >= REPLAY_STALL {
                return;
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }
}
