//! The per-shard session arena: one compact record per open WebSocket session.
//!
//! A session's connection task owns its socket and codec; everything else that
//! other parts of the shard need to reach (its outbox, its wake-up, its last
//! activity time, a pending close) lives here, addressed by a [`SessionId`]. The
//! arena is a slab: freed slots are reused, and a generation counter makes a
//! stale id (a session that closed and whose slot was reused) harmless.
//!
//! Invariants:
//! - An idle session's record owns no heap memory: the outbox is an empty
//!   `VecDeque` (no allocation) and is shrunk back after a burst.
//! - Only the shard's own thread touches the arena (it is inside a `RefCell`
//!   owned by the shard); nothing here is `Send`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::Waker;

/// Handle to a session in its shard's arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId {
    index: u32,
    generation: u32,
}

impl SessionId {
    /// The slot number, for logs.
    pub fn slot(&self) -> u32 {
        self.index
    }

    /// Packs the id into a `u64` (for messages that carry plain integers).
    pub fn to_u64(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }

    /// Inverse of [`SessionId::to_u64`].
    pub fn from_u64(packed: u64) -> Self {
        SessionId {
            index: packed as u32,
            generation: (packed >> 32) as u32,
        }
    }
}

/// What a session is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionKind {
    Visitor,
    Agent,
    Echo,
}

impl SessionKind {
    /// Every kind, in the order of [`Arena::len_by_kind`].
    pub const ALL: [SessionKind; 3] = [SessionKind::Visitor, SessionKind::Agent, SessionKind::Echo];

    /// The kind's name as `/metrics` labels it.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionKind::Visitor => "visitor",
            SessionKind::Agent => "agent",
            SessionKind::Echo => "echo",
        }
    }

    /// The kind's position in [`SessionKind::ALL`] (and in per-kind tables).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A frame waiting to be written to a session.
#[derive(Clone, Debug)]
pub enum Outbound {
    /// Shared so that one rendered frame fans out to many sessions (and
    /// shards) without copies.
    Text(Arc<str>),
    Binary(Arc<[u8]>),
}

/// Why the shard wants a session to close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: &'static str,
}

/// One session's record.
#[derive(Debug)]
pub struct SessionRecord {
    pub kind: SessionKind,
    generation: u32,
    /// Shard-clock second of the last byte received.
    pub last_activity: u32,
    /// Shard-clock second the last unanswered ping was sent, if any.
    pub ping_sent_at: Option<u32>,
    /// Set by the sweeper when a ping is due.
    pub ping_due: bool,
    /// Set when the shard wants this session closed.
    pub close: Option<CloseRequest>,
    /// Shard-clock second the close handshake started, if it did.
    pub closing_since: Option<u32>,
    /// Set by the sweeper when the close handshake took too long: drop the
    /// connection.
    pub abort: bool,
    /// The backlog passed the arena's bound: it was dropped and a 1013 close requested. The
    /// session task logs it once and clears it; a write blocked on a client that does not read
    /// is abandoned while it is set (see `server::connection`).
    pub overflowed: bool,
    /// Refusals (error frames for something this session sent) queued by other parts of the
    /// shard since the session task last looked; they count toward its abuse limit.
    pub refusals: u16,
    /// Conversations an agent session follows (empty, unallocated, for others).
    pub follows: Vec<u64>,
    /// Until its `hello` arrives, frames for the session are held back here,
    /// so a client always sees `hello` first even when other frames come
    /// from another shard faster than the hello does.
    awaiting_hello: bool,
    /// Resume replays streaming to the session (between [`Arena::begin_replay`] and
    /// [`Arena::end_replay`]): live frames are held back meanwhile, so the session sees the
    /// replayed history first and each seq in order.
    replaying: u16,
    /// Frames of a resume replay queued and not yet written: the outbox may exceed its
    /// usual bound by this many (a replay is as long as the conversation, and a client
    /// that reads slowly is told apart from one catching up).
    replay_frames: u32,
    /// Frames held back until `hello` (or the end of a replay); released into the outbox.
    held: Vec<Outbound>,
    outbox: VecDeque<Outbound>,
    waker: Option<Waker>,
}

impl SessionRecord {
    /// Whether the connection task has something to do besides reading.
    pub fn has_work(&self) -> bool {
        self.ping_due
            || self.abort
            || self.close.is_some()
            || !self.outbox.is_empty()
            || self.refusals > 0
    }

    /// Remembers the task to wake when work arrives.
    pub fn set_waker(&mut self, waker: &Waker) {
        match &self.waker {
            Some(existing) if existing.will_wake(waker) => {}
            _ => self.waker = Some(waker.clone()),
        }
    }

    /// Takes everything queued for writing; gives back the queue's memory when
    /// a burst made it large.
    pub fn drain_outbox(&mut self, mut each: impl FnMut(Outbound)) {
        for frame in self.outbox.drain(..) {
            each(frame);
        }
        if self.held.is_empty() {
            self.replay_frames = 0;
        }
        if self.outbox.capacity() > 16 {
            self.outbox = VecDeque::new();
        }
    }

    /// Drops every frame waiting (the session is being closed; its client resumes from
    /// storage) and gives back the queue's memory.
    pub fn discard_outbox(&mut self) {
        self.outbox = VecDeque::new();
        self.held = Vec::new();
        self.replay_frames = 0;
    }

    /// Number of frames waiting to be written.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Number of frames waiting for this session: queued for writing plus held back until
    /// its `hello` or the end of a resume replay. `[limits] max_outbox_frames` bounds it.
    pub fn backlog(&self) -> usize {
        self.outbox.len() + self.held.len()
    }

    /// Frames of a resume replay among those waiting (see `push_replay`).
    pub fn replay_frames(&self) -> usize {
        self.replay_frames as usize
    }

    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

enum Slot {
    Occupied(SessionRecord),
    Free { generation: u32, next_free: u32 },
}

const NO_FREE_SLOT: u32 = u32::MAX;

/// The slab of sessions of one shard.
pub struct Arena {
    slots: Vec<Slot>,
    first_free: u32,
    len: usize,
    /// Open sessions per [`SessionKind`] (indexed like [`SessionKind::ALL`]); they add up to `len`.
    by_kind: [usize; 3],
    /// Most frames a session may have waiting (outbox plus held, replay frames aside):
    /// `[limits] max_outbox_frames`.
    max_backlog: usize,
}

impl Default for Arena {
    fn default() -> Self {
        Self::new()
    }
}

impl Arena {
    pub fn new() -> Self {
        Self {
            slots: Vec::new(),
            first_free: NO_FREE_SLOT,
            len: 0,
            by_kind: [0; 3],
            max_backlog: usize::MAX,
        }
    }

    /// An arena whose sessions are closed with 1013 once more than `max_backlog` frames wait
    /// for them (frames of a resume replay aside).
    pub fn with_backlog_bound(max_backlog: usize) -> Self {
        Self {
            max_backlog,
            ..Self::new()
        }
    }

    /// A new bound on a session's backlog (a configuration reload); it applies from the next
    /// frame queued.
    pub fn set_backlog_bound(&mut self, max_backlog: usize) {
        self.max_backlog = max_backlog;
    }

    /// Number of open sessions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of open sessions of each kind, in the order of [`SessionKind::ALL`].
    pub fn len_by_kind(&self) -> [usize; 3] {
        self.by_kind
    }

    /// Creates a session record.
    pub fn insert(&mut self, kind: SessionKind, now: u32) -> SessionId {
        let make = |generation| SessionRecord {
            kind,
            generation,
            last_activity: now,
            ping_sent_at: None,
            ping_due: false,
            close: None,
            closing_since: None,
            abort: false,
            overflowed: false,
            refusals: 0,
            follows: Vec::new(),
            awaiting_hello: kind != SessionKind::Echo,
            replaying: 0,
            replay_frames: 0,
            held: Vec::new(),
            outbox: VecDeque::new(),
            waker: None,
        };
        self.len += 1;
        self.by_kind[kind.index()] += 1;
        if self.first_free != NO_FREE_SLOT {
            let index = self.first_free;
            let slot = &mut self.slots[index as usize];
            let Slot::Free {
                generation,
                next_free,
            } = *slot
            else {
                unreachable!("the free list only links free slots");
            };
            self.first_free = next_free;
            *slot = Slot::Occupied(make(generation));
            SessionId { index, generation }
        } else {
            let index = u32::try_from(self.slots.len()).expect("fewer than 2^32 sessions");
            self.slots.push(Slot::Occupied(make(0)));
            SessionId {
                index,
                generation: 0,
            }
        }
    }

    /// Removes a session; a stale id is ignored.
    pub fn remove(&mut self, id: SessionId) {
        let Some(kind) = self.get(id).map(|record| record.kind) else {
            return;
        };
        self.by_kind[kind.index()] -= 1;
        self.slots[id.index as usize] = Slot::Free {
            generation: id.generation.wrapping_add(1),
            next_free: self.first_free,
        };
        self.first_free = id.index;
        self.len -= 1;
    }

    /// The record of a live session.
    pub fn get(&self, id: SessionId) -> Option<&SessionRecord> {
        match self.slots.get(id.index as usize) {
            Some(Slot::Occupied(record)) if record.generation == id.generation => Some(record),
            _ => None,
        }
    }

    /// The record of a live session, mutably.
    pub fn get_mut(&mut self, id: SessionId) -> Option<&mut SessionRecord> {
        match self.slots.get_mut(id.index as usize) {
            Some(Slot::Occupied(record)) if record.generation == id.generation => Some(record),
            _ => None,
        }
    }

    /// Queues a frame for a session and wakes it. Returns the outbox length
    /// afterwards, or `None` if the session is gone.
    ///
    /// A session whose backlog passes the arena's bound (its client stopped reading) has the
    /// backlog dropped and a 1013 close requested: every message is stored, so the client
    /// resumes from storage when it reconnects, and the shard's memory stays bounded.
    pub fn push(&mut self, id: SessionId, frame: Outbound) -> Option<usize> {
        let max_backlog = self.max_backlog;
        let record = self.get_mut(id)?;
        let hold = record.awaiting_hello || record.replaying > 0;
        if hold {
            record.held.push(frame);
        } else {
            record.outbox.push_back(frame);
        }
        if record.backlog() > max_backlog.saturating_add(record.replay_frames as usize) {
            record.discard_outbox();
            if record.close.is_none() {
                record.close = Some(CloseRequest {
                    code: 1013,
                    reason: "client is not reading; reconnect and resume",
                });
            }
            record.overflowed = true;
            record.wake();
            return Some(0);
        }
        if !hold {
            record.wake();
        }
        Some(record.outbox.len())
    }

    /// Like [`Arena::push`], for a frame of a resume replay: it does not count towards the
    /// bound on a session's backlog that closes clients which stop reading, and it is not
    /// held back by a replay in progress (it is that replay).
    pub fn push_replay(&mut self, id: SessionId, frame: Outbound) -> Option<usize> {
        let record = self.get_mut(id)?;
        record.replay_frames = record.replay_frames.saturating_add(1);
        if record.awaiting_hello {
            record.held.push(frame);
            return Some(record.outbox.len());
        }
        record.outbox.push_back(frame);
        record.wake();
        Some(record.outbox.len())
    }

    /// A resume replay longer than one chunk starts streaming to the session: until the
    /// matching [`Arena::end_replay`], live frames are held back behind it.
    pub fn begin_replay(&mut self, id: SessionId) {
        if let Some(record) = self.get_mut(id) {
            record.replaying = record.replaying.saturating_add(1);
        }
    }

    /// A streamed resume replay ended: once none is left (and `hello` went out), the live
    /// frames held meanwhile follow it, in the order they came.
    pub fn end_replay(&mut self, id: SessionId) {
        let Some(record) = self.get_mut(id) else {
            return;
        };
        record.replaying = record.replaying.saturating_sub(1);
        if record.replaying == 0 && !record.awaiting_hello && !record.held.is_empty() {
            let held = std::mem::take(&mut record.held);
            record.outbox.extend(held);
            record.wake();
        }
    }

    /// Like [`Arena::push`], for an `error` frame refusing something the session sent: the
    /// session task counts it toward the session's abuse limit.
    pub fn push_refusal(&mut self, id: SessionId, frame: Outbound) -> Option<usize> {
        let record = self.get_mut(id)?;
        record.refusals = record.refusals.saturating_add(1);
        let len = self.push(id, frame);
        if let Some(record) = self.get_mut(id) {
            // A refusal held until `hello` still wakes the task to count it.
            record.wake();
        }
        len
    }

    /// Queues a session's `hello`, then everything held back until it came.
    pub fn push_hello(&mut self, id: SessionId, hello: Outbound) -> Option<usize> {
        let record = self.get_mut(id)?;
        record.outbox.push_back(hello);
        if record.awaiting_hello {
            record.awaiting_hello = false;
            if record.replaying == 0 {
                let held = std::mem::take(&mut record.held);
                record.outbox.extend(held);
            }
        }
        record.wake();
        Some(record.outbox.len())
    }

    /// Asks a session to close and wakes it.
    pub fn request_close(&mut self, id: SessionId, request: CloseRequest) {
        if let Some(record) = self.get_mut(id) {
            record.close.get_or_insert(request);
            record.wake();
        }
    }

    /// Visits every live session (for the sweeper and shutdown).
    pub fn for_each_mut(&mut self, mut visit: impl FnMut(SessionId, &mut SessionRecord)) {
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if let Slot::Occupied(record) = slot {
                let id = SessionId {
                    index: index as u32,
                    generation: record.generation,
                };
                visit(id, record);
            }
        }
    }

    /// Wakes a session after its flags were changed through `for_each_mut`.
    pub fn wake(record: &mut SessionRecord) {
        record.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_counted_by_kind() {
        let mut arena = Arena::new();
        let visitor = arena.insert(SessionKind::Visitor, 0);
        let agent = arena.insert(SessionKind::Agent, 0);
        arena.insert(SessionKind::Visitor, 0);
        arena.insert(SessionKind::Echo, 0);
        assert_eq!(arena.len_by_kind(), [2, 1, 1]);
        arena.remove(visitor);
        arena.remove(visitor); // stale: ignored
        arena.remove(agent);
        assert_eq!(arena.len_by_kind(), [1, 0, 1]);
        assert_eq!(arena.len_by_kind().iter().sum::<usize>(), arena.len());
        assert_eq!(
            SessionKind::ALL.map(SessionKind::as_str),
            ["visitor", "agent", "echo"]
        );
    }

    #[test]
    fn slots_are_reused_and_stale_ids_ignored() {
        let mut arena = Arena::new();
        let a = arena.insert(SessionKind::Echo, 0);
        let b = arena.insert(SessionKind::Echo, 0);
        assert_eq!(arena.len(), 2);
        arena.remove(a);
        assert!(arena.get(a).is_none());
        let c = arena.insert(SessionKind::Agent, 5);
        assert_eq!(c.slot(), a.slot(), "freed slot is reused");
        assert!(
            arena.get(a).is_none(),
            "stale id does not reach the new session"
        );
        assert_eq!(arena.get(c).unwrap().kind, SessionKind::Agent);
        arena.remove(a);
        assert_eq!(arena.len(), 2, "removing a stale id changes nothing");
        assert!(arena.push(a, Outbound::Text("x".into())).is_none());
        assert_eq!(arena.push(b, Outbound::Text("x".into())), Some(1));
    }

    #[test]
    fn frames_before_hello_are_held_back() {
        let mut arena = Arena::new();
        let id = arena.insert(SessionKind::Agent, 0);
        arena.push(id, Outbound::Text("assigned".into()));
        assert!(
            !arena.get(id).unwrap().has_work(),
            "nothing is sent before hello"
        );
        arena.push_hello(id, Outbound::Text("hello".into()));
        arena.push(id, Outbound::Text("later".into()));
        assert_eq!(drain_texts(&mut arena, id), ["hello", "assigned", "later"]);
        let echo = arena.insert(SessionKind::Echo, 0);
        arena.push(echo, Outbound::Text("x".into()));
        assert!(
            arena.get(echo).unwrap().has_work(),
            "echo sessions have no hello"
        );
    }

    fn drain_texts(arena: &mut Arena, id: SessionId) -> Vec<String> {
        let mut order = Vec::new();
        arena
            .get_mut(id)
            .unwrap()
            .drain_outbox(|frame| match frame {
                Outbound::Text(text) => order.push(text.to_string()),
                Outbound::Binary(_) => unreachable!(),
            });
        order
    }

    #[test]
    fn live_frames_wait_behind_a_streamed_replay() {
        let mut arena = Arena::new();
        let id = arena.insert(SessionKind::Visitor, 0);
        arena.push_hello(id, Outbound::Text("hello".into()));
        arena.push_replay(id, Outbound::Text("seq 1".into()));
        arena.begin_replay(id);
        arena.push(id, Outbound::Text("seq 3 live".into()));
        assert_eq!(drain_texts(&mut arena, id), ["hello", "seq 1"]);
        arena.push_replay(id, Outbound::Text("seq 2".into()));
        arena.push(id, Outbound::Text("seq 4 live".into()));
        assert_eq!(arena.get(id).unwrap().backlog(), 3, "held frames count");
        assert_eq!(drain_texts(&mut arena, id), ["seq 2"]);
        arena.end_replay(id);
        assert_eq!(drain_texts(&mut arena, id), ["seq 3 live", "seq 4 live"]);
        arena.push(id, Outbound::Text("seq 5".into()));
        assert_eq!(drain_texts(&mut arena, id), ["seq 5"]);
        // A replay that starts before the hello: everything waits for the hello, and live
        // frames also for the replay's end.
        let late = arena.insert(SessionKind::Agent, 0);
        arena.begin_replay(late);
        arena.push_replay(late, Outbound::Text("old".into()));
        arena.push(late, Outbound::Text("live".into()));
        arena.push_hello(late, Outbound::Text("hello".into()));
        assert_eq!(drain_texts(&mut arena, late), ["hello"]);
        arena.end_replay(late);
        assert_eq!(drain_texts(&mut arena, late), ["old", "live"]);
        // Ending a replay of a gone session is harmless.
        arena.remove(late);
        arena.end_replay(late);
    }

    #[test]
    fn a_backlog_past_the_bound_is_dropped_and_the_session_closed_with_1013() {
        let mut arena = Arena::with_backlog_bound(4);
        let id = arena.insert(SessionKind::Agent, 0);
        arena.push_hello(id, Outbound::Text("hello".into()));
        for n in 0..3 {
            arena.push(id, Outbound::Text(format!("live {n}").into()));
            assert!(arena.get(id).unwrap().close.is_none(), "within the bound");
        }
        let record = arena.get(id).unwrap();
        assert_eq!(record.backlog(), 4, "hello and three frames wait");
        arena.push(id, Outbound::Text("live 3".into()));
        let record = arena.get(id).unwrap();
        assert_eq!(record.backlog(), 0, "the backlog is dropped");
        assert!(record.overflowed);
        assert_eq!(record.close.map(|close| close.code), Some(1013));
        // Replay frames do not count towards the bound, held frames do.
        let replayed = arena.insert(SessionKind::Visitor, 0);
        arena.push_hello(replayed, Outbound::Text("hello".into()));
        for _ in 0..10 {
            arena.push_replay(replayed, Outbound::Text("old".into()));
        }
        arena.begin_replay(replayed);
        arena.push(replayed, Outbound::Text("held".into()));
        assert!(arena.get(replayed).unwrap().close.is_none());
        assert_eq!(arena.get(replayed).unwrap().backlog(), 12);
        let waiting = arena.insert(SessionKind::Visitor, 0);
        for _ in 0..5 {
            arena.push(waiting, Outbound::Text("before hello".into()));
        }
        assert!(arena.get(waiting).unwrap().overflowed, "held frames count");
    }

    #[test]
    fn record_is_compact_and_outbox_is_released() {
        // An idle record must stay small: it is the per-session cost that the
        // 4 KB-per-idle-session target is made of.
        assert!(
            std::mem::size_of::<Slot>() <= 160,
            "slot grew to {} bytes",
            std::mem::size_of::<Slot>()
        );
        let mut arena = Arena::new();
        let id = arena.insert(SessionKind::Echo, 0);
        for _ in 0..100 {
            arena.push(id, Outbound::Text("hello".into()));
        }
        let mut drained = 0;
        arena.get_mut(id).unwrap().drain_outbox(|_| drained += 1);
        assert_eq!(drained, 100);
        assert_eq!(arena.get(id).unwrap().outbox.capacity(), 0);
    }
}
