//! Tests of the owner state machine.

use super::*;
use crate::arena::SessionId;

fn session(n: u64) -> SessionRef {
    SessionRef {
        shard: 0,
        session: SessionId::from_u64(n),
    }
}

fn owner() -> Owner {
    Owner::new(OwnerConfig {
        shard: 0,
        bot_enabled: false,
        typing_interval_ms: 1000,
        typing_expiry_ms: 5000,
        agent_names: HashMap::new(),
        max_opening_frames: 64,
    })
}

/// The store ops among `actions`, as the router would queue them.
fn stores(actions: &[OwnerAction]) -> Vec<(Op, Completion)> {
    actions
        .iter()
        .filter_map(|action| match action {
            OwnerAction::Store { op, completion } => Some((op.clone(), completion.clone())),
            _ => None,
        })
        .collect()
}

fn committed(
    owner: &mut Owner,
    (op, completion): (Op, Completion),
    outcome: OpOutcome,
) -> Vec<OwnerAction> {
    owner.handle(
        OwnerEvent::Committed {
            completion,
            op,
            outcome: Ok(outcome),
        },
        1_000,
    )
}

fn messages_to(actions: &[OwnerAction], to: SessionRef) -> usize {
    actions
        .iter()
        .filter(|action| {
            matches!(action, OwnerAction::Send { to: target, frame }
                if *target == to && frame.contains("\"type\":\"message\""))
        })
        .count()
}

fn credentials(secret: Option<&str>, verified: bool, fresh: &str) -> Credentials {
    Credentials {
        secret_hash: secret.map(crate::conversation::identity::hash_secret),
        verified,
        fresh: FreshVisitor {
            visitor: fresh.into(),
            secret: format!("secret-of-{fresh}").into(),
            secret_hash: crate::conversation::identity::hash_secret(&format!("secret-of-{fresh}")),
        },
    }
}

fn key(visitor: &str) -> VisitorKey {
    VisitorKey {
        site: "acme".into(),
        visitor: visitor.into(),
    }
}

/// Attaches `session` as the driver would: answers `LoadVisitor` with `stored`.
fn attach(
    owner: &mut Owner,
    visitor: &str,
    session: SessionRef,
    resume: Option<u64>,
    credentials: Credentials,
    stored: StoredVisitor,
) -> Vec<OwnerAction> {
    let actions = owner.handle(
        OwnerEvent::VisitorAttach {
            key: key(visitor),
            resume,
            session,
            credentials: Box::new(credentials),
            stored: None,
        },
        0,
    );
    match &actions[..] {
        [OwnerAction::LoadVisitor { .. }] => {
            let Some(OwnerAction::LoadVisitor { event, .. }) = actions.into_iter().next() else {
                unreachable!()
            };
            let mut event = *event;
            if let OwnerEvent::VisitorAttach { stored: slot, .. } = &mut event {
                *slot = Some(Box::new(stored));
            }
            owner.handle(event, 0)
        }
        _ => actions,
    }
}

fn meta(conversation: ConversationId, visitor: &str, last_seq: u64) -> Conversation {
    Conversation {
        id: conversation,
        site: "acme".into(),
        visitor: visitor.into(),
        state: ConversationState::Bot,
        state_since_ms: 0,
        last_seq,
        created_ms: 0,
        updated_ms: 0,
        visitor_read: 0,
        agent_read: 0,
        failed_bot_turns: 0,
    }
}

fn hello_of(actions: &[OwnerAction], to: SessionRef) -> serde_json::Value {
    actions
        .iter()
        .find_map(|action| match action {
            OwnerAction::Hello { to: target, frame } if *target == to => {
                Some(serde_json::from_str(frame).unwrap())
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no hello for {to:?} in {actions:#?}"))
}

#[test]
fn frames_waiting_on_an_opening_conversation_are_bounded_and_refused_past_it() {
    let mut owner = Owner::new(OwnerConfig {
        max_opening_frames: 3,
        ..owner().config
    });
    let tab = session(1);
    attach(
        &mut owner,
        "v1",
        tab,
        None,
        credentials(None, false, "fresh-1"),
        StoredVisitor::default(),
    );
    let send = |owner: &mut Owner, n: usize| {
        owner.handle(
            OwnerEvent::Visitor {
                key: key("v1"),
                session: tab,
                frame: VisitorFrame::Message {
                    id: format!("m{n}"),
                    text: "hi".into(),
                },
            },
            0,
        )
    };
    // The first message opens the conversation; two more wait with it.
    assert!(!stores(&send(&mut owner, 0)).is_empty());
    for n in 1..3 {
        let actions = send(&mut owner, n);
        assert!(actions.is_empty(), "message {n} waits: {actions:#?}");
    }
    // The fourth is refused, with its id, and nothing is queued or stored for it.
    let refused = send(&mut owner, 3);
    let [OwnerAction::Send { to, frame }] = &refused[..] else {
        panic!("{refused:#?}");
    };
    assert_eq!(*to, tab);
    let frame: serde_json::Value = serde_json::from_str(frame).unwrap();
    assert_eq!(frame["code"], "overloaded");
    assert_eq!(frame["id"], "m3");
    assert_eq!(frame["retry_after"], OPENING_RETRY_MS);
    assert_eq!(owner.visitors[&key("v1")].pending.len(), 3);
    let typing = owner.handle(
        OwnerEvent::Visitor {
            key: key("v1"),
            session: tab,
            frame: VisitorFrame::Typing { on: true },
        },
        0,
    );
    assert!(
        matches!(&typing[..], [OwnerAction::Send { frame, .. }] if frame.contains("overloaded")),
        "{typing:#?}"
    );
}

#[test]
fn connecting_stores_nothing_and_the_first_message_opens_the_conversation() {
    let mut owner = owner();
    let tab = session(1);
    let greeted = attach(
        &mut owner,
        "v1",
        tab,
        None,
        credentials(None, false, "fresh-1"),
        StoredVisitor::default(),
    );
    assert!(stores(&greeted).is_empty(), "{greeted:#?}");
    let hello = hello_of(&greeted, tab);
    assert_eq!(hello["visitor"], "v1");
    assert_eq!(hello["conversation"], serde_json::Value::Null);
    assert_eq!(hello["seq"], 0);
    assert_eq!(hello["secret"], "secret-of-fresh-1");
    // Typing and read before a conversation exists store nothing either.
    for frame in [
        VisitorFrame::Typing { on: true },
        VisitorFrame::Read { seq: 3 },
    ] {
        let actions = owner.handle(
            OwnerEvent::Visitor {
                key: key("v1"),
                session: tab,
                frame,
            },
            0,
        );
        assert!(actions.is_empty(), "{actions:#?}");
    }
    // Leaving without a word leaves nothing behind.
    owner.handle(
        OwnerEvent::VisitorDetach {
            key: key("v1"),
            session: tab,
        },
        0,
    );
    assert!(owner.visitors.is_empty());
    // The first message stores the secret's hash, then opens the conversation.
    attach(
        &mut owner,
        "v1",
        tab,
        None,
        credentials(None, false, "fresh-1"),
        StoredVisitor::default(),
    );
    let sent = owner.handle(
        OwnerEvent::Visitor {
            key: key("v1"),
            session: tab,
            frame: VisitorFrame::Message {
                id: "m1".into(),
                text: "hi".into(),
            },
        },
        0,
    );
    let queued = stores(&sent);
    let ops: Vec<&Op> = queued.iter().map(|(op, _)| op).collect();
    assert!(
        matches!(&ops[..], [Op::SetVisitorSecret { visitor, secret_hash, .. }]
            if visitor == "v1" && *secret_hash == crate::conversation::identity::hash_secret("secret-of-fresh-1")),
        "{ops:#?}"
    );
    // The conversation is opened once the secret is committed.
    let opened = committed(&mut owner, queued[0].clone(), OpOutcome::Updated);
    let ops: Vec<Op> = stores(&opened).into_iter().map(|(op, _)| op).collect();
    assert!(
        matches!(&ops[..], [Op::Open { visitor, .. }] if visitor == "v1"),
        "{ops:#?}"
    );
}

/// Found by the simulation (seed 694): an agent's close whose commit failed left the
/// conversation `Closed` in memory but open in storage; the visitor's next message then
/// asked storage to open a conversation, got this one back, replayed the message into
/// it, found it closed and asked again: a commit per turn, forever.
#[test]
fn a_close_that_failed_to_commit_leaves_the_conversation_open() {
    let conversation = ConversationId::from_parts(0, 5);
    let mut owner = owner();
    let mut assigned = meta(conversation, "v1", 2);
    assigned.state = ConversationState::Assigned { agent: "a1".into() };
    owner.insert_loaded(assigned);
    let agent_frame = |frame: AgentFrame| OwnerEvent::Agent {
        agent: "a1".into(),
        name: "A1".into(),
        role: Role::Agent,
        session: session(7),
        frame,
    };
    let closing = owner.handle(
        agent_frame(AgentFrame::Close {
            conversation: conversation.0,
        }),
        0,
    );
    let queued = stores(&closing);
    assert!(
        matches!(
            &queued[..],
            [(
                Op::SetState {
                    state: ConversationState::Closed,
                    ..
                },
                _
            )]
        ),
        "{queued:#?}"
    );
    let (op, completion) = queued[0].clone();
    let failed = owner.handle(
        OwnerEvent::Committed {
            completion,
            op,
            outcome: Err(CommitFailure {
                code: "storage_error",
                message: "disk on fire".into(),
            }),
        },
        0,
    );
    assert!(
        !failed
            .iter()
            .any(|a| matches!(a, OwnerAction::Send { frame, .. } if frame.contains("closed"))),
        "{failed:#?}"
    );
    // Still the agent's and open: its reply is stored in it.
    let reply = owner.handle(
        agent_frame(AgentFrame::Message {
            conversation: conversation.0,
            id: "r1".into(),
            text: "still here".into(),
        }),
        0,
    );
    assert!(
        matches!(&stores(&reply)[..], [(Op::Append(m), _)] if m.conversation == conversation),
        "{reply:#?}"
    );
    // And the visitor's message goes into it too, not into a new conversation.
    attach(
        &mut owner,
        "v1",
        session(1),
        None,
        credentials(Some("s"), true, "fresh-1"),
        StoredVisitor {
            secret_hash: Some(crate::conversation::identity::hash_secret("s")),
            conversation: Some(conversation),
        },
    );
    let sent = owner.handle(
        OwnerEvent::Visitor {
            key: key("v1"),
            session: session(1),
            frame: VisitorFrame::Message {
                id: "m9".into(),
                text: "hello?".into(),
            },
        },
        0,
    );
    assert!(
        matches!(&stores(&sent)[..], [(Op::Append(m), _)] if m.conversation == conversation),
        "{sent:#?}"
    );
}

/// Found by the simulation (seed 1 with `max_batch` 1): the secret's commit failed, the
/// open's (queued with it, committed in the next batch) did not, and the visitor's next
/// connection, presenting its secret, was moved to a fresh visitor id: the stored
/// conversation had no secret to match. Now nothing is opened without the secret.
#[test]
fn a_failed_secret_commit_opens_no_conversation() {
    let mut owner = owner();
    let tab = session(1);
    attach(
        &mut owner,
        "v1",
        tab,
        None,
        credentials(None, false, "fresh-1"),
        StoredVisitor::default(),
    );
    let message = |id: &str| OwnerEvent::Visitor {
        key: key("v1"),
        session: tab,
        frame: VisitorFrame::Message {
            id: id.into(),
            text: "hi".into(),
        },
    };
    let sent = owner.handle(message("m1"), 0);
    let queued = stores(&sent);
    assert!(
        matches!(&queued[..], [(Op::SetVisitorSecret { .. }, _)]),
        "{queued:#?}"
    );
    let (op, completion) = queued[0].clone();
    let failed = owner.handle(
        OwnerEvent::Committed {
            completion,
            op,
            outcome: Err(CommitFailure {
                code: "storage_error",
                message: "disk on fire".into(),
            }),
        },
        0,
    );
    assert!(stores(&failed).is_empty(), "nothing opened: {failed:#?}");
    // The visitor is not left opening: its next message tries the secret again.
    let again = owner.handle(message("m1"), 0);
    assert!(
        matches!(&stores(&again)[..], [(Op::SetVisitorSecret { .. }, _)]),
        "{again:#?}"
    );
}

#[test]
fn a_guessed_visitor_id_without_its_secret_becomes_a_new_visitor() {
    let conversation = ConversationId::from_parts(0, 7);
    let real_secret = "the-real-secret";
    let stored = StoredVisitor {
        secret_hash: Some(crate::conversation::identity::hash_secret(real_secret)),
        conversation: Some(conversation),
    };
    for presented in [None, Some("a-wrong-secret"), Some("")] {
        let mut owner = owner();
        let intruder = session(9);
        let actions = attach(
            &mut owner,
            "victim",
            intruder,
            Some(0),
            credentials(presented, false, "fresh-9"),
            stored.clone(),
        );
        // No load, no replay of the victim's conversation: a hello for a new visitor.
        assert!(
            !actions.iter().any(|a| matches!(
                a,
                OwnerAction::Load { .. } | OwnerAction::Replay { .. } | OwnerAction::Store { .. }
            )),
            "{actions:#?}"
        );
        let hello = hello_of(&actions, intruder);
        assert_eq!(hello["visitor"], "fresh-9");
        assert_eq!(hello["conversation"], serde_json::Value::Null);
        assert_eq!(hello["secret"], "secret-of-fresh-9");
        // Its frames go to the new visitor: a message opens a conversation for fresh-9.
        let sent = owner.handle(
            OwnerEvent::Visitor {
                key: key("victim"),
                session: intruder,
                frame: VisitorFrame::Message {
                    id: "m1".into(),
                    text: "hi".into(),
                },
            },
            0,
        );
        assert!(stores(&sent).iter().all(|(op, _)| matches!(op,
            Op::Open { visitor, .. } | Op::SetVisitorSecret { visitor, .. } if visitor == "fresh-9")));
        assert_eq!(owner.visitor_of(&key("victim"), intruder), key("fresh-9"));
        // While the intruder is connected the real visitor still gets in with its secret.
        let real = session(1);
        let actions = attach(
            &mut owner,
            "victim",
            real,
            Some(0),
            credentials(Some(real_secret), false, "fresh-1"),
            stored.clone(),
        );
        let OwnerAction::Load { event, .. } = &actions[0] else {
            panic!("the real visitor's conversation is loaded: {actions:#?}")
        };
        owner.insert_loaded(meta(conversation, "victim", 4));
        assert!(matches!(&**event, OwnerEvent::Greet { .. }), "{event:?}");
        let Some(OwnerAction::Load { event, .. }) = actions.into_iter().next() else {
            unreachable!()
        };
        let greeted = owner.handle(*event, 0);
        let hello = hello_of(&greeted, real);
        assert_eq!(hello["visitor"], "victim");
        assert_eq!(hello["conversation"], conversation.0);
        assert!(hello.get("secret").is_none());
        assert!(greeted.iter().any(|a| matches!(a,
            OwnerAction::Replay { to, after: 0, up_to: 4, .. } if to == &vec![real])));
        // A second guess while the real visitor is connected is refused from memory.
        let actions = attach(
            &mut owner,
            "victim",
            session(10),
            Some(0),
            credentials(None, false, "fresh-10"),
            stored.clone(),
        );
        assert_eq!(hello_of(&actions, session(10))["visitor"], "fresh-10");
        assert!(!actions
            .iter()
            .any(|a| matches!(a, OwnerAction::Replay { .. })));
    }
}

#[test]
fn a_verified_identity_resumes_without_the_secret_and_a_legacy_visitor_needs_one() {
    let conversation = ConversationId::from_parts(0, 3);
    let mut owner = owner();
    owner.insert_loaded(meta(conversation, "user-42", 2));
    let stored = StoredVisitor {
        secret_hash: Some([7; 32]),
        conversation: Some(conversation),
    };
    let actions = attach(
        &mut owner,
        "user-42",
        session(1),
        Some(0),
        credentials(None, true, "fresh-1"),
        stored,
    );
    assert_eq!(
        hello_of(&actions, session(1))["conversation"],
        conversation.0
    );
    // A visitor from before secrets existed: only a verified identity gets its conversation.
    let legacy = StoredVisitor {
        secret_hash: None,
        conversation: Some(conversation),
    };
    let mut owner = self::owner();
    owner.insert_loaded(meta(conversation, "user-42", 2));
    let refused = attach(
        &mut owner,
        "user-42",
        session(2),
        Some(0),
        credentials(Some("anything"), false, "fresh-2"),
        legacy.clone(),
    );
    assert_eq!(hello_of(&refused, session(2))["visitor"], "fresh-2");
    let verified = attach(
        &mut owner,
        "user-42",
        session(3),
        Some(0),
        credentials(None, true, "fresh-3"),
        legacy,
    );
    assert_eq!(
        hello_of(&verified, session(3))["conversation"],
        conversation.0
    );
}

#[test]
fn an_abandoned_empty_conversation_is_deleted_unless_someone_is_connected() {
    let conversation = ConversationId::from_parts(0, 8);
    let mut owner = owner();
    let mut queued = meta(conversation, "asker", 0);
    queued.state = ConversationState::Queued;
    owner.insert_loaded(queued.clone());
    // The visitor is connected: kept.
    let tab = session(1);
    attach(
        &mut owner,
        "asker",
        tab,
        None,
        credentials(None, true, "fresh-1"),
        StoredVisitor {
            secret_hash: Some([1; 32]),
            conversation: Some(conversation),
        },
    );
    let kept = owner.handle(OwnerEvent::ExpireEmpty { conversation }, 0);
    assert!(stores(&kept).is_empty(), "{kept:#?}");
    // Gone: deleted, and the dispatcher drops it from the queue.
    owner.handle(
        OwnerEvent::VisitorDetach {
            key: key("asker"),
            session: tab,
        },
        0,
    );
    owner.insert_loaded(queued);
    let expire = stores(&owner.handle(OwnerEvent::ExpireEmpty { conversation }, 0));
    assert!(
        matches!(&expire[..], [(Op::DeleteEmpty { .. }, _)]),
        "{expire:#?}"
    );
    let done = committed(
        &mut owner,
        expire.into_iter().next().unwrap(),
        OpOutcome::Updated,
    );
    assert!(done
        .iter()
        .any(|a| matches!(a, OwnerAction::Dispatch(DispatchEvent::Closed { .. }))));
    assert!(!owner.is_live(conversation));
    // A conversation with a message is never deleted.
    let mut owner = self::owner();
    owner.insert_loaded(meta(conversation, "talker", 1));
    assert!(stores(&owner.handle(OwnerEvent::ExpireEmpty { conversation }, 0)).is_empty());
}

#[test]
fn no_agents_reaches_the_connected_visitor_even_after_eviction() {
    let conversation = ConversationId::from_parts(0, 9);
    let mut owner = owner();
    let mut queued = meta(conversation, "waiter", 1);
    queued.state = ConversationState::Queued;
    owner.insert_loaded(queued);
    let tab = session(1);
    attach(
        &mut owner,
        "waiter",
        tab,
        None,
        credentials(None, true, "fresh-1"),
        StoredVisitor {
            secret_hash: Some([1; 32]),
            conversation: Some(conversation),
        },
    );
    let tell = |owner: &mut Owner| {
        let actions = owner.handle(
            OwnerEvent::NoAgents {
                conversations: vec![conversation],
            },
            0,
        );
        frames_to(&actions, tab)
    };
    let expected = serde_json::json!({"type": "no_agents", "conversation": conversation.0});
    assert_eq!(tell(&mut owner), vec![expected.clone()]);
    // Evicted while the visitor idles: found through the visitor's entry.
    owner.handle(OwnerEvent::Tick, 0);
    assert!(!owner.is_live(conversation));
    assert_eq!(tell(&mut owner), vec![expected]);
    // Gone: nobody to tell.
    owner.handle(
        OwnerEvent::VisitorDetach {
            key: key("waiter"),
            session: tab,
        },
        0,
    );
    assert!(tell(&mut owner).is_empty());
}

#[test]
fn a_new_queue_position_reaches_a_visitor_whose_conversation_was_evicted() {
    let conversation = ConversationId::from_parts(0, 9);
    let mut owner = owner();
    let mut queued = meta(conversation, "waiter", 1);
    queued.state = ConversationState::Queued;
    owner.insert_loaded(queued.clone());
    let tab = session(1);
    attach(
        &mut owner,
        "waiter",
        tab,
        None,
        credentials(None, true, "fresh-1"),
        StoredVisitor {
            secret_hash: Some([1; 32]),
            conversation: Some(conversation),
        },
    );
    owner.handle(OwnerEvent::Tick, 0);
    assert!(!owner.is_live(conversation));
    let position = OwnerEvent::QueuePosition {
        conversation,
        position: 1,
    };
    let actions = owner.handle(position, 0);
    let Some(OwnerAction::Load { event, .. }) = actions
        .into_iter()
        .find(|a| matches!(a, OwnerAction::Load { .. }))
    else {
        panic!("an evicted conversation is loaded to tell its visitor");
    };
    // The driver loads it and hands the event back.
    owner.insert_loaded(queued);
    let actions = owner.handle(*event, 0);
    assert_eq!(
        frames_to(&actions, tab),
        vec![serde_json::json!({"type": "queued", "conversation": conversation.0, "position": 1})]
    );
}

/// Every typing frame forwarded to `to`, as `on` values.
fn typing_to(actions: &[OwnerAction], to: SessionRef) -> Vec<bool> {
    actions
        .iter()
        .filter_map(|action| match action {
            OwnerAction::Send { to: target, frame }
                if *target == to && frame.contains("\"type\":\"typing\"") =>
            {
                Some(frame.contains("\"on\":true"))
            }
            _ => None,
        })
        .collect()
}

/// An owner holding conversation 5 of visitor "typist", assigned to alice, with the
/// visitor's tab (session 1) attached; also returns the agent's tab (session 2).
fn typist_assigned_to_alice() -> (Owner, ConversationId, SessionRef, SessionRef) {
    let conversation = ConversationId::from_parts(0, 5);
    let (visitor_tab, agent_tab) = (session(1), session(2));
    let mut owner = owner();
    let mut assigned = meta(conversation, "typist", 1);
    assigned.state = ConversationState::Assigned {
        agent: "alice".into(),
    };
    owner.insert_loaded(assigned);
    attach(
        &mut owner,
        "typist",
        visitor_tab,
        None,
        credentials(None, true, "fresh-1"),
        StoredVisitor {
            secret_hash: Some([1; 32]),
            conversation: Some(conversation),
        },
    );
    (owner, conversation, visitor_tab, agent_tab)
}

#[test]
fn an_agent_who_joins_while_the_visitor_is_shown_typing_is_shown_it_too() {
    let (mut owner, conversation, visitor_tab, agent_tab) = typist_assigned_to_alice();
    let typing = |owner: &mut Owner, on: bool, now: u64| {
        owner.handle(
            OwnerEvent::Visitor {
                key: key("typist"),
                session: visitor_tab,
                frame: VisitorFrame::Typing { on },
            },
            now,
        )
    };
    // "On" forwarded to nobody yet, then "off" held by the throttle.
    typing(&mut owner, true, 10_000);
    typing(&mut owner, false, 10_050);
    let joined = owner.handle(
        OwnerEvent::AgentSubscribe {
            conversation,
            agent: "alice".into(),
            session: agent_tab,
        },
        10_100,
    );
    assert_eq!(typing_to(&joined, agent_tab), vec![true]);
    // Typing again inside the interval cancels the held "off": no change to send, and
    // the agent already shows "typing".
    assert!(typing_to(&typing(&mut owner, true, 10_200), agent_tab).is_empty());
    assert!(typing_to(&owner.handle(OwnerEvent::Tick, 11_100), agent_tab).is_empty());
    // Stopping reaches the agent.
    assert_eq!(
        typing_to(&typing(&mut owner, false, 12_000), agent_tab),
        vec![false]
    );
}

#[test]
fn alternating_typing_on_and_off_is_throttled_and_ends_in_the_final_state() {
    let (mut owner, conversation, visitor_tab, agent_tab) = typist_assigned_to_alice();
    owner.handle(
        OwnerEvent::AgentSubscribe {
            conversation,
            agent: "alice".into(),
            session: agent_tab,
        },
        0,
    );
    // 1,000 frames in one second from each side, alternating on and off.
    let (mut to_agent, mut to_visitor) = (Vec::new(), Vec::new());
    for i in 0..1000u64 {
        let on = i % 2 == 0;
        let now = 10_000 + i;
        let actions = owner.handle(
            OwnerEvent::Visitor {
                key: key("typist"),
                session: visitor_tab,
                frame: VisitorFrame::Typing { on },
            },
            now,
        );
        to_agent.extend(typing_to(&actions, agent_tab));
        let actions = owner.handle(
            OwnerEvent::Agent {
                agent: "alice".into(),
                name: "Alice".into(),
                role: crate::auth::rbac::Role::Agent,
                session: agent_tab,
                frame: AgentFrame::Typing {
                    conversation: conversation.0,
                    on,
                },
            },
            now,
        );
        to_visitor.extend(typing_to(&actions, visitor_tab));
    }
    assert_eq!(
        to_agent,
        vec![true],
        "one change per interval reaches the agent"
    );
    assert_eq!(
        to_visitor,
        vec![true],
        "one change per interval reaches the visitor"
    );
    // The last frame was "off": delivered once the interval is over, and only once.
    let tick = owner.handle(OwnerEvent::Tick, 11_000);
    assert_eq!(typing_to(&tick, agent_tab), vec![false]);
    assert_eq!(typing_to(&tick, visitor_tab), vec![false]);
    let tick = owner.handle(OwnerEvent::Tick, 12_000);
    assert!(typing_to(&tick, agent_tab).is_empty());
    assert!(typing_to(&tick, visitor_tab).is_empty());
    // An "on" that is not renewed is switched off after the expiry.
    let on = owner.handle(
        OwnerEvent::Visitor {
            key: key("typist"),
            session: visitor_tab,
            frame: VisitorFrame::Typing { on: true },
        },
        20_000,
    );
    assert_eq!(typing_to(&on, agent_tab), vec![true]);
    assert!(typing_to(&owner.handle(OwnerEvent::Tick, 24_000), agent_tab).is_empty());
    assert_eq!(
        typing_to(&owner.handle(OwnerEvent::Tick, 25_000), agent_tab),
        vec![false]
    );
    // Typing again right after an "off" was forwarded: held, then delivered by a tick.
    let on = owner.handle(
        OwnerEvent::Visitor {
            key: key("typist"),
            session: visitor_tab,
            frame: VisitorFrame::Typing { on: true },
        },
        25_300,
    );
    assert!(typing_to(&on, agent_tab).is_empty());
    assert_eq!(
        typing_to(&owner.handle(OwnerEvent::Tick, 26_000), agent_tab),
        vec![true]
    );
}

#[test]
fn a_tab_waiting_for_its_hello_gets_a_committing_message_from_its_replay_only() {
    let conversation = ConversationId::from_parts(0, 1);
    let (first, second) = (session(1), session(2));
    let mut owner = owner();

    // The first tab connects and sends a message: that opens the conversation.
    attach(
        &mut owner,
        "v1",
        first,
        None,
        credentials(None, false, "fresh-1"),
        StoredVisitor::default(),
    );
    let first_message = owner.handle(
        OwnerEvent::Visitor {
            key: key("v1"),
            session: first,
            frame: VisitorFrame::Message {
                id: "m0".into(),
                text: "first".into(),
            },
        },
        0,
    );
    // The secret is stored first, then the conversation is opened.
    let secret = stores(&first_message)
        .into_iter()
        .next()
        .expect("the first message stores the secret");
    let opening = committed(&mut owner, secret, OpOutcome::Updated);
    let open = stores(&opening)
        .into_iter()
        .find(|(op, _)| matches!(op, Op::Open { .. }))
        .expect("the first message opens the conversation");
    let load = committed(
        &mut owner,
        open,
        OpOutcome::Opened {
            conversation,
            created: true,
            last_seq: 0,
        },
    );
    assert!(matches!(load[..], [OwnerAction::Load { .. }]));
    owner.insert_loaded(meta(conversation, "v1", 0));
    let OwnerAction::Load { event, .. } = load.into_iter().next().unwrap() else {
        unreachable!()
    };
    owner.handle(*event, 0);

    // It sends a message and goes away before the commit completes.
    let sent = owner.handle(
        OwnerEvent::Visitor {
            key: key("v1"),
            session: first,
            frame: VisitorFrame::Message {
                id: "m1".into(),
                text: "hello".into(),
            },
        },
        0,
    );
    let append = stores(&sent)
        .into_iter()
        .find(|(op, _)| matches!(op, Op::Append(_)))
        .expect("the message is stored");
    owner.handle(
        OwnerEvent::VisitorDetach {
            key: key("v1"),
            session: first,
        },
        0,
    );

    // A new tab attaches with its secret and resume = 0 while the message commits.
    let greeting = attach(
        &mut owner,
        "v1",
        second,
        Some(0),
        credentials(Some("secret-of-fresh-1"), false, "fresh-2"),
        StoredVisitor {
            secret_hash: Some(crate::conversation::identity::hash_secret(
                "secret-of-fresh-1",
            )),
            conversation: Some(conversation),
        },
    );
    // The conversation is still in memory (a commit in flight): greeted from there, at
    // the seq fanned out so far, with nothing to replay.
    let hello = hello_of(&greeting, second);
    assert_eq!(
        (hello["visitor"].as_str(), hello["seq"].as_u64()),
        (Some("v1"), Some(0))
    );
    assert!(!greeting
        .iter()
        .any(|a| matches!(a, OwnerAction::Replay { .. })));
    // So the message reaches it exactly once, by fan-out.
    let fan_out = committed(&mut owner, append, OpOutcome::Stored { seq: 1, ts_ms: 1 });
    assert_eq!(messages_to(&fan_out, second), 1, "{fan_out:#?}");
}

fn frames_to(actions: &[OwnerAction], to: SessionRef) -> Vec<serde_json::Value> {
    actions
        .iter()
        .filter_map(|action| match action {
            OwnerAction::Send { to: target, frame } if *target == to => {
                Some(serde_json::from_str(frame).unwrap())
            }
            _ => None,
        })
        .collect()
}

fn audits(actions: &[OwnerAction]) -> Vec<&AuditEvent> {
    actions
        .iter()
        .filter_map(|action| match action {
            OwnerAction::Audit(event) => Some(event),
            _ => None,
        })
        .collect()
}

fn agent_frame(agent: &str, role: Role, session: SessionRef, frame: AgentFrame) -> OwnerEvent {
    OwnerEvent::Agent {
        agent: agent.into(),
        name: agent.to_uppercase(),
        role,
        session,
        frame,
    }
}

#[test]
fn a_supervisor_watches_any_conversation_without_taking_it_and_an_agent_may_not() {
    let conversation = ConversationId::from_parts(0, 7);
    let mut owner = owner();
    let mut stored = meta(conversation, "v1", 3);
    stored.state = ConversationState::Assigned {
        agent: "alice".into(),
    };
    owner.insert_loaded(stored);
    let (alice, bob, sue) = (session(10), session(11), session(20));
    owner.handle(
        OwnerEvent::AgentSubscribe {
            conversation,
            agent: "alice".into(),
            session: alice,
        },
        0,
    );
    let c = conversation.0;

    // A plain agent is refused by role: no subscription, no history.
    let refused = owner.handle(
        agent_frame(
            "bob",
            Role::Agent,
            bob,
            AgentFrame::Watch { conversation: c },
        ),
        0,
    );
    assert_eq!(frames_to(&refused, bob)[0]["code"], "forbidden");
    assert!(!refused.iter().any(|a| matches!(
        a,
        OwnerAction::Replay { .. } | OwnerAction::Track { .. } | OwnerAction::Audit(_)
    )));

    // A supervisor gets the state, the whole history and is tracked; it is audited.
    let watched = owner.handle(
        agent_frame(
            "sue",
            Role::Supervisor,
            sue,
            AgentFrame::Watch { conversation: c },
        ),
        0,
    );
    let info = &frames_to(&watched, sue)[0];
    assert_eq!(info["type"], "watching");
    assert_eq!(info["state"], "assigned");
    assert_eq!(info["agent"], "alice");
    assert_eq!(info["seq"], 3);
    assert!(watched.iter().any(|a| matches!(a,
        OwnerAction::Replay { to, after: 0, up_to: 3, .. } if *to == vec![sue])));
    assert!(watched.iter().any(|a| matches!(a,
        OwnerAction::Track { session, .. } if *session == sue)));
    let records = audits(&watched);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].kind, "conversation_watched");
    assert_eq!(records[0].actor, "sue");
    assert_eq!(records[0].target, c.to_string());
    // Watching twice does not deliver live frames twice.
    owner.handle(
        agent_frame(
            "sue",
            Role::Supervisor,
            sue,
            AgentFrame::Watch { conversation: c },
        ),
        0,
    );

    // Live messages and typing of the conversation reach the watcher once.
    let sent = owner.handle(
        agent_frame(
            "alice",
            Role::Agent,
            alice,
            AgentFrame::Message {
                conversation: c,
                id: "m1".into(),
                text: "hi".into(),
            },
        ),
        0,
    );
    let fanned = committed(
        &mut owner,
        stores(&sent).remove(0),
        OpOutcome::Stored { seq: 4, ts_ms: 5 },
    );
    assert_eq!(messages_to(&fanned, sue), 1);
    let typing = owner.handle(
        agent_frame(
            "alice",
            Role::Agent,
            alice,
            AgentFrame::Typing {
                conversation: c,
                on: true,
            },
        ),
        10_000,
    );
    assert_eq!(frames_to(&typing, sue)[0]["type"], "typing");

    // Watching is not holding: the supervisor cannot write in it.
    let write = owner.handle(
        agent_frame(
            "sue",
            Role::Supervisor,
            sue,
            AgentFrame::Message {
                conversation: c,
                id: "s1".into(),
                text: "psst".into(),
            },
        ),
        0,
    );
    assert_eq!(frames_to(&write, sue)[0]["code"], "not_assigned");
    assert!(stores(&write).is_empty());

    // The watcher keeps the conversation in memory and follows a transfer.
    owner.handle(OwnerEvent::Tick, 20_000);
    owner.handle(
        OwnerEvent::AgentUnsubscribe {
            conversation,
            session: alice,
        },
        0,
    );
    owner.handle(OwnerEvent::Tick, 30_000);
    assert!(owner.is_live(conversation));
    let moved = owner.handle(
        OwnerEvent::Transferred {
            conversation,
            to: "carol".into(),
            to_name: "Carol".into(),
            sessions: vec![],
        },
        0,
    );
    let info = frames_to(&moved, sue);
    assert_eq!(info.last().unwrap()["type"], "watching");
    assert_eq!(info.last().unwrap()["agent"], "carol");

    // Closing by its agent is audited once committed, and the watcher hears `closed`.
    let close = owner.handle(
        agent_frame(
            "carol",
            Role::Agent,
            session(12),
            AgentFrame::Close { conversation: c },
        ),
        0,
    );
    assert!(audits(&close).is_empty(), "audited only when committed");
    let closing = stores(&close)
        .into_iter()
        .find(|(op, _)| matches!(op, Op::SetState { .. }))
        .unwrap();
    let closed = committed(&mut owner, closing, OpOutcome::Updated);
    assert_eq!(frames_to(&closed, sue)[0]["type"], "closed");
    let records = audits(&closed);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].kind, "conversation_closed");
    assert_eq!(records[0].actor, "carol");
    assert_eq!(records[0].target, c.to_string());
}

#[test]
fn an_unwatched_conversation_no_longer_reaches_the_supervisor() {
    let conversation = ConversationId::from_parts(0, 8);
    let mut owner = owner();
    let mut stored = meta(conversation, "v1", 0);
    stored.state = ConversationState::Assigned {
        agent: "alice".into(),
    };
    owner.insert_loaded(stored);
    let (alice, sue) = (session(10), session(20));
    owner.handle(
        OwnerEvent::AgentSubscribe {
            conversation,
            agent: "alice".into(),
            session: alice,
        },
        0,
    );
    let c = conversation.0;
    let watched = owner.handle(
        agent_frame(
            "sue",
            Role::Admin,
            sue,
            AgentFrame::Watch { conversation: c },
        ),
        0,
    );
    assert!(
        !watched
            .iter()
            .any(|a| matches!(a, OwnerAction::Replay { .. })),
        "no history yet"
    );
    let unwatched = owner.handle(
        agent_frame(
            "sue",
            Role::Admin,
            sue,
            AgentFrame::Unwatch { conversation: c },
        ),
        0,
    );
    assert_eq!(frames_to(&unwatched, sue)[0]["type"], "unwatched");
    let sent = owner.handle(
        agent_frame(
            "alice",
            Role::Agent,
            alice,
            AgentFrame::Message {
                conversation: c,
                id: "m1".into(),
                text: "hi".into(),
            },
        ),
        0,
    );
    let fanned = committed(
        &mut owner,
        stores(&sent).remove(0),
        OpOutcome::Stored { seq: 1, ts_ms: 5 },
    );
    assert_eq!(messages_to(&fanned, sue), 0);
    // An agent may not unwatch either (the frame is a supervisor's).
    let refused = owner.handle(
        agent_frame(
            "alice",
            Role::Agent,
            alice,
            AgentFrame::Unwatch { conversation: c },
        ),
        0,
    );
    assert_eq!(frames_to(&refused, alice)[0]["code"], "forbidden");
}

#[test]
fn an_ack_frame_is_byte_for_byte_what_the_json_value_form_gave() {
    for (client_id, conversation, seq) in [
        ("c-1", 7, 1),
        ("quote\" back\\slash \u{1} 中文", u64::MAX, u64::MAX),
        ("", 0, 0),
    ] {
        let value = serde_json::json!({
            "type": "ack", "id": client_id, "conversation": conversation, "seq": seq,
        });
        assert_eq!(
            &*ack_frame(client_id, ConversationId(conversation), seq),
            value.to_string()
        );
    }
}
