//! Nobody online, through the real binary: a visitor whose conversation is
//! queued while no agent is online gets `no_agents`, may leave messages (they
//! are stored), and an agent who comes online later finds the conversation in
//! the queue with those messages; an online agent means no `no_agents`; the
//! last agent leaving tells the visitors still waiting. Also `[agents]
//! auto_assign = false`: an online agent gets a conversation only by `accept`.
//!
//! Two shards, so the visitor's owner shard, the dispatcher and the agent's
//! session meet only through mesh messages.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const ALICE: &str = "alice-token-0123456789";

/// Bot off (a first message queues the conversation), one static agent account.
fn overlay(extra: &str) -> String {
    format!(
        r#"
[shards]
cores = [0, 1]

[inference]
enabled = false

[agents]
dev_static_tokens = true
{extra}

[agents.accounts.alice]
token = "{ALICE}"
name = "Alice"
max_open = 5
"#
    )
}

/// A client and the frames it received that no step consumed yet.
struct Peer {
    client: RawClient,
    backlog: Vec<Value>,
}

impl Peer {
    fn connect(server: &Server, path: &str) -> Peer {
        let client = RawClient::connect(server.addr, path).expect("upgrade");
        Peer {
            client,
            backlog: Vec::new(),
        }
    }

    /// The first frame (backlog first) that satisfies `want`.
    fn wait_for(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        self.wait_within(what, Duration::from_secs(15), want)
            .unwrap_or_else(|| panic!("timed out waiting for {what}; saw {:#?}", self.backlog))
    }

    /// Like `wait_for`, but `None` if nothing matching arrives within `limit`.
    fn wait_within(
        &mut self,
        what: &str,
        limit: Duration,
        want: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        if let Some(at) = self.backlog.iter().position(&want) {
            return Some(self.backlog.remove(at));
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.client
                .set_read_timeout(left.min(Duration::from_millis(200)));
            let Some(frame) = self.client.read_message() else {
                if Instant::now() >= deadline {
                    return None;
                }
                // A read timeout; the connection may still be open.
                if !self.client.is_alive() {
                    panic!(
                        "connection ended while waiting for {what}; saw {:#?}",
                        self.backlog
                    );
                }
                continue;
            };
            assert_eq!(
                frame.opcode, TEXT,
                "unexpected frame while waiting for {what}"
            );
            let value = frame.json();
            if want(&value) {
                return Some(value);
            }
            self.backlog.push(value);
        }
    }

    fn send(&mut self, value: Value) {
        self.client.send_json(&value);
    }
}

fn of_type(kind: &'static str) -> impl Fn(&Value) -> bool {
    move |v| v["type"] == kind
}

fn visitor(server: &Server, id: &str, resume: Option<u64>) -> (Peer, Value) {
    let mut peer = Peer::connect(server, &visitor_path(server, "acme", id, resume));
    let hello = peer.wait_for("visitor hello", of_type("hello"));
    remember_visitor(server, &hello);
    (peer, hello)
}

fn agent(server: &Server) -> (Peer, Value) {
    let mut peer = Peer::connect(server, &format!("/ws/agent?token={ALICE}"));
    let hello = peer.wait_for("agent hello", of_type("hello"));
    (peer, hello)
}

/// Sends a message and returns `(conversation, seq)` from its ack.
fn say(peer: &mut Peer, id: &str, text: &str) -> (u64, u64) {
    peer.send(json!({"type": "message", "id": id, "text": text}));
    let ack = peer.wait_for("ack", |v| v["type"] == "ack" && v["id"] == id);
    (
        ack["conversation"].as_u64().unwrap(),
        ack["seq"].as_u64().unwrap(),
    )
}

#[test]
fn with_no_agent_online_the_visitor_is_told_and_the_left_message_reaches_a_later_agent() {
    let server = Server::start(&overlay(""));
    let (mut tab, _) = visitor(&server, "leaver", None);
    let (conversation, _) = say(&mut tab, "m1", "Is anyone there?");
    let note = tab.wait_for("no_agents", of_type("no_agents"));
    assert_eq!(note["conversation"], conversation, "{note}");
    // Still queued: the visitor keeps a position and may leave a message.
    let queued = tab.wait_for("queued", of_type("queued"));
    assert_eq!(queued["position"], 1);
    let (again, seq) = say(&mut tab, "m2", "Please call me back at 555-0100.");
    assert_eq!(
        (again, seq),
        (conversation, 2),
        "stored in the same conversation"
    );

    // Coming back later, the visitor hears it again (nobody came online meanwhile).
    drop(tab);
    let (mut tab, hello) = visitor(&server, "leaver", Some(2));
    assert_eq!(hello["conversation"], conversation);
    let note = tab.wait_for("no_agents after reconnect", of_type("no_agents"));
    assert_eq!(note["conversation"], conversation);

    // An agent who comes online finds it in the queue, and gets it with the left messages.
    let (mut alice, hello) = agent(&server);
    assert_eq!(hello["queue"], json!([conversation]), "{hello}");
    let assigned = alice.wait_for("assigned", of_type("assigned"));
    assert_eq!(assigned["conversation"], conversation);
    for text in ["Is anyone there?", "Please call me back at 555-0100."] {
        let message = alice.wait_for(text, |v| v["type"] == "message" && v["text"] == text);
        assert_eq!(message["conversation"], conversation);
        assert_eq!(message["from"], "visitor");
    }
    tab.wait_for("assigned notice", of_type("assigned"));
}

#[test]
fn with_no_agent_account_at_all_a_handoff_is_told_nobody_is_online() {
    let server = Server::start("[inference]\nenabled = false\n");
    let (mut tab, _) = visitor(&server, "alone", None);
    tab.send(json!({"type": "handoff"}));
    let note = tab.wait_for("no_agents", of_type("no_agents"));
    assert!(note["conversation"].as_u64().unwrap() > 0, "{note}");
    let (conversation, seq) = say(&mut tab, "m1", "My card was charged twice.");
    assert_eq!(conversation, note["conversation"].as_u64().unwrap());
    assert_eq!(seq, 1, "the left message is stored");
}

#[test]
fn with_an_agent_online_the_visitor_is_not_told_nobody_is_online() {
    let server = Server::start(&overlay(""));
    let (mut alice, _) = agent(&server);
    let (mut tab, _) = visitor(&server, "served", None);
    let (conversation, _) = say(&mut tab, "m1", "Hello?");
    let assigned = tab.wait_for("assigned", of_type("assigned"));
    assert_eq!(assigned["conversation"], conversation);
    alice.wait_for("assigned to alice", of_type("assigned"));
    let told = tab.wait_within("no no_agents", Duration::from_secs(1), of_type("no_agents"));
    assert_eq!(told, None, "an agent is online");
    assert!(tab.backlog.iter().all(|v| v["type"] != "no_agents"));
}

#[test]
fn manual_assignment_waits_for_accept_and_the_last_agent_leaving_tells_the_queue() {
    let server = Server::start(&overlay("auto_assign = false"));
    let (mut alice, hello) = agent(&server);
    assert_eq!(hello["queue"], json!([]));
    let (mut tab, _) = visitor(&server, "waiting", None);
    let (conversation, _) = say(&mut tab, "m1", "Where is my refund?");
    let queued = tab.wait_for("queued", of_type("queued"));
    assert_eq!(queued["position"], 1);
    // Alice is online with room, but nothing is assigned until she accepts.
    let queue = alice.wait_for("queue", of_type("queue"));
    assert_eq!(queue["conversations"], json!([conversation]));
    assert_eq!(
        alice.wait_within("no assignment", Duration::from_secs(1), of_type("assigned")),
        None,
        "assigned without accept"
    );
    assert!(tab
        .backlog
        .iter()
        .all(|v| v["type"] != "assigned" && v["type"] != "no_agents"));

    // The only agent leaves: the waiting visitor is told nobody is online.
    drop(alice);
    let note = tab.wait_for("no_agents", of_type("no_agents"));
    assert_eq!(note["conversation"], conversation);

    // She comes back and accepts: now it is hers.
    let (mut alice, hello) = agent(&server);
    assert_eq!(hello["queue"], json!([conversation]));
    alice.send(json!({"type": "accept", "conversation": conversation}));
    let assigned = alice.wait_for("assigned", of_type("assigned"));
    assert_eq!(assigned["conversation"], conversation);
    alice.wait_for("the visitor's message", |v| {
        v["type"] == "message" && v["text"] == "Where is my refund?"
    });
    tab.wait_for("assigned notice", of_type("assigned"));
}

#[test]
fn a_bot_handoff_with_no_agent_online_is_told_too() {
    // The bot answers (model loaded); "talk to a human" makes it hand off.
    let server = Server::start(&overlay("").replace(
        "[inference]\nenabled = false",
        "[inference]\nenabled = true\n\n[bot]\nhandlers = [\"human_transfer\", \"fallback\"]",
    ));
    let (mut tab, _) = visitor(&server, "asker", None);
    let (conversation, _) = say(&mut tab, "m1", "I want to talk to a human");
    let note = tab.wait_for("no_agents after the bot's handoff", of_type("no_agents"));
    assert_eq!(note["conversation"], conversation);
    let (_, seq) = say(&mut tab, "m2", "My number is 555-0100, call me.");
    assert!(seq >= 2, "the left message is stored");
}
