//! Recognising re-sent messages without writing an index entry per message.
//!
//! A client re-sends its unacked messages with the same client id after a reconnect, and
//! the store must answer with the ORIGINAL seq instead of storing the message twice. The
//! message record itself carries its client id, so the answer is always in the
//! `messages` table; what this module adds is a fast way to find it.
//!
//! An index table `(conversation, client id) -> seq` would cost one more B-tree leaf page
//! per conversation touched by a group commit. Those pages land at scattered places in the
//! file, and a scattered page costs ~30 us of fdatasync on the reference VM against ~5 us
//! for a sequential one; in the relay benchmark (100 conversations, 10,000 round trips/s,
//! `fsync`) dropping the index cut p50 from 16 ms to 5.8 ms and made commits 2.4x
//! cheaper. So the store remembers instead, per recently written conversation, the
//! client ids of its newest [`WINDOW`] messages as 64-bit hashes with their seqs.
//!
//! Invariants:
//! - For a conversation it holds, a [`RecentIds`] window lists the `(hash of client id,
//!   seq)` of every message of that conversation with seq > `last_seq - WINDOW` that
//!   carries a client id, as stored or staged by the transaction in progress, oldest
//!   first.
//! - A hash match is only a candidate: the caller confirms it against the stored record,
//!   so a hash collision can never make a new message look like a re-send.
//! - A conversation it does not hold is rebuilt from that conversation's newest
//!   [`WINDOW`] stored messages on first use, so the answer after a restart is the same.
//! - When a write transaction fails, the caller drops everything ([`RecentIds::clear`]):
//!   entries staged by the failed batch must not survive it.
//! - Bounded memory: at most [`CONVERSATIONS`] windows and [`MAX_ENTRIES`] entries of ~40
//!   bytes in all (~10 MiB); the least recently used windows go first. Only chatty
//!   conversations have long windows: an entry exists per message with a client id.
//!   The bounds are sized so that the working set fits: 256 conversations at a full
//!   window at once. When it does not, windows are rebuilt from LMDB on every use (a
//!   scan of up to [`WINDOW`] records, ~0.25 ms for a full one): with 4,096-message
//!   windows, 50 conversations of ~2,000 messages each overflowed a 128 Ki bound and
//!   the rebuilds took most of a core in the relay benchmark.
//!
//! The contract this gives clients (docs/protocol.md): a re-send is recognised while its
//! original is among the conversation's newest [`WINDOW`] messages. A client re-sends right
//! after it reconnects, so its unacked messages are the newest ones.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hash, Hasher};

use super::records::{ConversationId, ConversationMap};

/// How many of a conversation's newest messages a re-send is checked against.
pub const WINDOW: u64 = 1024;
/// How many conversations' windows are kept in memory at most.
pub const CONVERSATIONS: usize = 4096;
/// How many entries all windows hold together at most.
pub const MAX_ENTRIES: usize = 256 * 1024;

/// The hash of a client id (SipHash-1-3 with fixed keys: stable across runs).
pub fn client_id_hash(client_id: &str) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    client_id.hash(&mut hasher);
    hasher.finish()
}

/// The client-id windows of recently written conversations.
#[derive(Default)]
pub struct RecentIds {
    windows: ConversationMap<Window>,
    /// Entries of all windows together.
    entries: usize,
    /// Use counter for least-recently-used eviction.
    clock: u64,
}

#[derive(Default)]
struct Window {
    /// `(client id hash, seq)`, oldest first.
    entries: VecDeque<(u64, u64)>,
    /// Client id hash -> the newest seq in `entries` with that hash. A new message is
    /// checked with one lookup here instead of a scan of the whole window (a scan of
    /// ~1,400 entries per message was 9% of the server's CPU in the relay benchmark).
    newest: HashMap<u64, u64, BuildHasherDefault<AlreadyHashed>>,
    last_used: u64,
}

impl Window {
    fn new(entries: Vec<(u64, u64)>, last_used: u64) -> Window {
        let mut window = Window {
            entries: VecDeque::with_capacity(entries.len()),
            newest: HashMap::default(),
            last_used,
        };
        for (hash, seq) in entries {
            window.push(hash, seq);
        }
        window
    }

    /// Adds the newest entry (seqs increase).
    fn push(&mut self, hash: u64, seq: u64) {
        self.entries.push_back((hash, seq));
        self.newest.insert(hash, seq);
    }

    /// Drops the entries with seq < `oldest_kept`.
    fn forget_older_than(&mut self, oldest_kept: u64) {
        while let Some(&(hash, seq)) = self.entries.front() {
            if seq >= oldest_kept {
                break;
            }
            self.entries.pop_front();
            // One lookup, not a `get` and a `remove`: this runs for every stored message.
            if let Entry::Occupied(newest) = self.newest.entry(hash) {
                if *newest.get() == seq {
                    newest.remove();
                }
            }
        }
        // A window that has shrunk a lot gives its memory back.
        if self.entries.capacity() > 64 && self.entries.len() < self.entries.capacity() / 4 {
            self.entries.shrink_to(self.entries.len() * 2);
            self.newest.shrink_to(self.entries.len() * 2);
        }
    }

    fn find<E>(
        &self,
        hash: u64,
        mut confirm: impl FnMut(u64) -> Result<bool, E>,
    ) -> Result<Option<u64>, E> {
        let Some(&newest) = self.newest.get(&hash) else {
            return Ok(None);
        };
        if confirm(newest)? {
            return Ok(Some(newest));
        }
        // A hash collision (~2^-64 per pair): look at the older entries with this hash.
        for &(candidate, seq) in self.entries.iter().rev() {
            if candidate == hash && seq != newest && confirm(seq)? {
                return Ok(Some(seq));
            }
        }
        Ok(None)
    }
}

/// The keys of [`Window::newest`] are SipHash values already; hashing them again is waste.
#[derive(Default)]
struct AlreadyHashed(u64);

impl Hasher for AlreadyHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

impl RecentIds {
    /// Whether `conversation`'s window is in memory.
    pub fn holds(&self, conversation: ConversationId) -> bool {
        self.windows.contains_key(&conversation)
    }

    /// Installs `conversation`'s window rebuilt from storage: `entries` are the
    /// `(hash, seq)` of its newest messages with a client id, in any order.
    pub fn install(&mut self, conversation: ConversationId, mut entries: Vec<(u64, u64)>) {
        if let Some(old) = self.windows.remove(&conversation) {
            self.entries -= old.entries.len();
        }
        while self.windows.len() >= CONVERSATIONS {
            self.evict_least_recently_used(conversation);
        }
        entries.sort_unstable_by_key(|&(_, seq)| seq);
        self.entries += entries.len();
        self.clock += 1;
        self.windows
            .insert(conversation, Window::new(entries, self.clock));
        self.keep_entries_bounded(conversation);
    }

    /// Evicts the least recently used windows other than `keep`'s while there are too
    /// many entries.
    fn keep_entries_bounded(&mut self, keep: ConversationId) {
        while self.entries > MAX_ENTRIES && self.windows.len() > 1 {
            self.evict_least_recently_used(keep);
        }
    }

    fn evict_least_recently_used(&mut self, keep: ConversationId) {
        let oldest = self
            .windows
            .iter()
            .filter(|(id, _)| **id != keep)
            .min_by_key(|(_, window)| window.last_used)
            .map(|(id, _)| *id);
        if let Some(window) = oldest.and_then(|id| self.windows.remove(&id)) {
            self.entries -= window.entries.len();
        }
    }

    /// The seq of a stored message of `conversation` whose client id has `hash` and passes
    /// `confirm` (which reads the record at that seq and compares the full id), newest first.
    /// `None` when no message in the window has that id (or the window is not held).
    pub fn find<E>(
        &mut self,
        conversation: ConversationId,
        hash: u64,
        confirm: impl FnMut(u64) -> Result<bool, E>,
    ) -> Result<Option<u64>, E> {
        self.clock += 1;
        let Some(window) = self.windows.get_mut(&conversation) else {
            return Ok(None);
        };
        window.last_used = self.clock;
        window.find(hash, confirm)
    }

    /// Records that `conversation` got message `seq` (with a client id hashing to `hash`,
    /// if it has one), and forgets entries that fell out of the window.
    pub fn record(&mut self, conversation: ConversationId, seq: u64, hash: Option<u64>) {
        let Some(window) = self.windows.get_mut(&conversation) else {
            return;
        };
        let before = window.entries.len();
        if let Some(hash) = hash {
            window.push(hash, seq);
        }
        window.forget_older_than(seq.saturating_sub(WINDOW - 1));
        self.entries = self.entries + window.entries.len() - before;
        self.keep_entries_bounded(conversation);
    }

    /// Drops every window (after a failed transaction; they are rebuilt on demand).
    pub fn clear(&mut self) {
        self.windows = ConversationMap::default();
        self.entries = 0;
    }

    /// Windows held now (for tests).
    #[cfg(test)]
    pub fn windows_held(&self) -> usize {
        self.windows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: ConversationId = ConversationId(7);

    fn ok(_: u64) -> Result<bool, ()> {
        Ok(true)
    }

    #[test]
    fn finds_recorded_ids_and_nothing_else() {
        let mut recent = RecentIds::default();
        assert_eq!(recent.find(C, 1, ok), Ok(None), "not held yet");
        recent.install(C, vec![(11, 2), (10, 1)]);
        recent.record(C, 3, Some(12));
        recent.record(C, 4, None);
        assert_eq!(recent.find(C, 10, ok), Ok(Some(1)));
        assert_eq!(recent.find(C, 12, ok), Ok(Some(3)));
        assert_eq!(recent.find(C, 99, ok), Ok(None));
    }

    #[test]
    fn a_hash_match_the_record_does_not_confirm_is_not_a_resend() {
        let mut recent = RecentIds::default();
        recent.install(C, vec![(5, 1), (5, 2)]);
        // The newest candidate (seq 2) is a collision; the older one is the real original.
        assert_eq!(recent.find(C, 5, |seq| Ok::<_, ()>(seq == 1)), Ok(Some(1)));
        assert_eq!(recent.find(C, 5, |_| Ok::<_, ()>(false)), Ok(None));
        assert_eq!(recent.find(C, 5, |_| Err("io")), Err("io"));
    }

    #[test]
    fn entries_leave_the_window_after_window_newer_messages() {
        let mut recent = RecentIds::default();
        recent.install(C, Vec::new());
        recent.record(C, 1, Some(1));
        for seq in 2..=WINDOW {
            recent.record(C, seq, None);
        }
        assert_eq!(
            recent.find(C, 1, ok),
            Ok(Some(1)),
            "seq 1 is the oldest of the window"
        );
        recent.record(C, WINDOW + 1, None);
        assert_eq!(recent.find(C, 1, ok), Ok(None));
    }

    #[test]
    fn memory_is_bounded_by_evicting_the_least_recently_used() {
        let mut recent = RecentIds::default();
        for id in 0..CONVERSATIONS as u64 {
            recent.install(ConversationId(id), vec![(id, 1)]);
        }
        // Touch conversation 0 so that 1 is the least recently used.
        assert_eq!(recent.find(ConversationId(0), 0, ok), Ok(Some(1)));
        recent.install(ConversationId(u64::MAX), Vec::new());
        assert_eq!(recent.windows_held(), CONVERSATIONS);
        assert!(recent.holds(ConversationId(0)));
        assert!(!recent.holds(ConversationId(1)));
    }

    #[test]
    fn entries_in_all_windows_stay_bounded() {
        let mut recent = RecentIds::default();
        let per_window = (MAX_ENTRIES / 4) as u64;
        for id in 0..5u64 {
            recent.install(
                ConversationId(id),
                (1..=per_window).map(|seq| (seq, seq)).collect(),
            );
        }
        assert!(recent.entries <= MAX_ENTRIES);
        assert!(!recent.holds(ConversationId(0)), "the oldest window went");
        assert!(recent.holds(ConversationId(4)));
        // Growing one window past the bound evicts others, never the one being written.
        for seq in per_window + 1..per_window + 1 + MAX_ENTRIES as u64 / 2 {
            recent.record(ConversationId(4), seq, Some(seq));
        }
        assert!(recent.entries <= MAX_ENTRIES);
        assert!(recent.holds(ConversationId(4)));
        let total: usize = recent.windows.values().map(|w| w.entries.len()).sum();
        assert_eq!(total, recent.entries);
    }

    #[test]
    fn clear_forgets_everything() {
        let mut recent = RecentIds::default();
        recent.install(C, vec![(1, 1)]);
        recent.clear();
        assert!(!recent.holds(C));
    }
}
