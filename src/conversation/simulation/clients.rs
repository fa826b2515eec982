//! The simulated clients: what a well-behaved visitor page and agent console remember
//! between connections, per docs/protocol.md.
//!
//! - A visitor keeps its visitor id and secret, its conversation and the highest seq it
//!   has seen there (shared by its tabs, like `localStorage`), reconnects with
//!   `resume=<highest seen>`, and keeps every message it sent until acked: after each
//!   `hello` it re-sends them with the same id.
//! - An agent keeps the conversations it was told it holds (`hello`, `assigned`; dropped on
//!   `closed`, `requeued`, `transferred`), the last queue snapshot, and its unacked replies,
//!   which it re-sends after its next `hello`.
//!
//! Invariant: a client never re-uses a message id for a different text, and an id once
//! acked with a seq in a conversation is never acked with another seq there
//! (checked in `invariants::check_ack`).

use std::collections::{BTreeMap, BTreeSet};

pub struct VisitorClient {
    pub index: usize,
    pub name: String,
    pub secret: Option<String>,
    /// Open connections (session ids), at most two.
    pub tabs: Vec<u64>,
    /// The conversation of the latest `hello`, and the highest seq seen in it.
    pub conversation: Option<u64>,
    pub high: u64,
    /// Sent, not yet acked: (id, text).
    pub unacked: Vec<(String, String)>,
    /// Acked ids: (conversation, seq).
    pub acked: BTreeMap<String, (u64, u64)>,
    next: u64,
}

impl VisitorClient {
    pub fn new(index: usize) -> VisitorClient {
        VisitorClient {
            index,
            name: format!("v{index}"),
            secret: None,
            tabs: Vec::new(),
            conversation: None,
            high: 0,
            unacked: Vec::new(),
            acked: BTreeMap::new(),
            next: 0,
        }
    }

    pub fn new_message(&mut self) -> (String, String) {
        self.next += 1;
        let id = format!("v{}-m{}", self.index, self.next);
        let text = format!("visitor {} says {}", self.index, self.next);
        self.unacked.push((id.clone(), text.clone()));
        (id, text)
    }

    /// The `resume` of a new connection: the highest seq seen in its conversation.
    pub fn resume(&self) -> Option<u64> {
        self.conversation.map(|_| self.high)
    }

    pub fn hello(&mut self, conversation: Option<u64>, seq: u64) {
        if conversation != self.conversation {
            self.conversation = conversation;
            // Nothing of a new conversation was seen; the hello's seq is where it starts
            // unless a replay follows (which raises `high` as it arrives).
            self.high = 0;
        }
        let _ = seq;
    }

    pub fn saw(&mut self, conversation: u64, seq: u64) {
        if self.conversation == Some(conversation) {
            self.high = self.high.max(seq);
        }
    }

    pub fn acked(&mut self, id: &str, conversation: u64, seq: u64) {
        self.unacked.retain(|(m, _)| m != id);
        self.acked.insert(id.to_string(), (conversation, seq));
        self.saw(conversation, seq);
    }
}

pub struct AgentClient {
    pub index: usize,
    pub name: String,
    pub session: Option<u64>,
    pub held: BTreeSet<u64>,
    pub queue: Vec<u64>,
    /// Sent, not yet acked: (id, conversation, text).
    pub unacked: Vec<(String, u64, String)>,
    pub acked: BTreeMap<String, (u64, u64)>,
    next: u64,
}

impl AgentClient {
    pub fn new(index: usize) -> AgentClient {
        AgentClient {
            index,
            name: format!("a{index}"),
            session: None,
            held: BTreeSet::new(),
            queue: Vec::new(),
            unacked: Vec::new(),
            acked: BTreeMap::new(),
            next: 0,
        }
    }

    pub fn new_message(&mut self, conversation: u64) -> (String, String) {
        self.next += 1;
        let id = format!("a{}-m{}", self.index, self.next);
        let text = format!("agent {} says {}", self.index, self.next);
        self.unacked.push((id.clone(), conversation, text.clone()));
        (id, text)
    }

    pub fn connected(&mut self, session: u64) {
        self.session = Some(session);
    }

    /// The console forgets what the server will tell it again in its next `hello`.
    pub fn disconnected(&mut self) {
        self.session = None;
        self.held.clear();
        self.queue.clear();
    }

    pub fn acked(&mut self, id: &str, conversation: u64, seq: u64) {
        self.unacked.retain(|(m, _, _)| m != id);
        self.acked.insert(id.to_string(), (conversation, seq));
    }
}
