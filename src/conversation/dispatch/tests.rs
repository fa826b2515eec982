//! Tests of the dispatcher state machine (including the randomized invariant test).

use super::*;
use std::collections::BTreeSet;

const GRACE: u64 = 5_000;

fn cid(n: u64) -> ConversationId {
    ConversationId(n)
}

fn sess(shard: usize, session: u64) -> SessionRef {
    SessionRef { shard, session }
}

fn dispatcher() -> Dispatcher {
    Dispatcher::new(DispatcherConfig::new(GRACE))
}

fn attach(
    d: &mut Dispatcher,
    agent: &str,
    max_open: u32,
    session: SessionRef,
    now: u64,
) -> Vec<DispatchAction> {
    d.handle(
        DispatchEvent::AgentAttached {
            agent: agent.into(),
            name: format!("Agent {agent}"),
            max_open,
            session,
        },
        now,
    )
}

fn detach(d: &mut Dispatcher, agent: &str, session: SessionRef, now: u64) -> Vec<DispatchAction> {
    d.handle(
        DispatchEvent::AgentDetached {
            agent: agent.into(),
            session,
        },
        now,
    )
}

fn status(d: &mut Dispatcher, agent: &str, status: AgentStatus, now: u64) -> Vec<DispatchAction> {
    d.handle(
        DispatchEvent::AgentStatus {
            agent: agent.into(),
            status,
        },
        now,
    )
}

fn enqueue(d: &mut Dispatcher, n: u64, now: u64) -> Vec<DispatchAction> {
    d.handle(
        DispatchEvent::Enqueue {
            conversation: cid(n),
            owner: (n % 2) as usize,
        },
        now,
    )
}

fn close(d: &mut Dispatcher, n: u64, now: u64) -> Vec<DispatchAction> {
    d.handle(
        DispatchEvent::Closed {
            conversation: cid(n),
        },
        now,
    )
}

fn accept(d: &mut Dispatcher, agent: &str, session: SessionRef, n: u64) -> Vec<DispatchAction> {
    d.handle(
        DispatchEvent::Accept {
            agent: agent.into(),
            session,
            conversation: cid(n),
        },
        0,
    )
}

fn transfer(
    d: &mut Dispatcher,
    from: &str,
    session: SessionRef,
    n: u64,
    to: &str,
) -> Vec<DispatchAction> {
    transfer_as(d, from, Role::Agent, session, n, to)
}

fn transfer_as(
    d: &mut Dispatcher,
    from: &str,
    role: Role,
    session: SessionRef,
    n: u64,
    to: &str,
) -> Vec<DispatchAction> {
    d.handle(
        DispatchEvent::Transfer {
            from: from.into(),
            session,
            conversation: cid(n),
            to: to.into(),
            role,
        },
        0,
    )
}

fn restore(d: &mut Dispatcher, n: u64, assigned: Option<&str>, now: u64) -> Vec<DispatchAction> {
    d.handle(
        DispatchEvent::Restore {
            conversation: cid(n),
            owner: (n % 2) as usize,
            assigned: assigned.map(Into::into),
        },
        now,
    )
}

/// (conversation, agent) of every `Assigned`, in order.
fn assigned(actions: &[DispatchAction]) -> Vec<(u64, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            DispatchAction::Assigned {
                conversation,
                agent,
                ..
            } => Some((conversation.0, agent.clone())),
            _ => None,
        })
        .collect()
}

fn requeued(actions: &[DispatchAction]) -> Vec<(u64, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            DispatchAction::Requeued {
                conversation,
                from_agent,
                ..
            } => Some((conversation.0, from_agent.clone())),
            _ => None,
        })
        .collect()
}

/// (conversation, position) of every position update, in order.
fn positions(actions: &[DispatchAction]) -> Vec<(u64, usize)> {
    actions
        .iter()
        .filter_map(|a| match a {
            DispatchAction::QueuePositions { updates } => Some(updates),
            _ => None,
        })
        .flatten()
        .map(|&(c, _, p)| (c.0, p))
        .collect()
}

fn rejection(actions: &[DispatchAction]) -> &'static str {
    match actions {
        [DispatchAction::Rejected { code, .. }] => code,
        other => panic!("expected exactly one rejection, got {other:?}"),
    }
}

fn queue(d: &Dispatcher) -> Vec<u64> {
    d.queue().map(|c| c.0).collect()
}

fn open(d: &Dispatcher, agent: &str) -> Vec<u64> {
    d.agent_conversations(agent).iter().map(|c| c.0).collect()
}

fn pairs(list: &[(u64, &str)]) -> Vec<(u64, String)> {
    list.iter().map(|&(c, a)| (c, a.to_owned())).collect()
}

#[test]
fn queue_is_fifo_and_reports_positions() {
    let mut d = dispatcher();
    for n in 1..=5 {
        let out = enqueue(&mut d, n, 0);
        // Only the newcomer's position is new.
        assert_eq!(positions(&out), vec![(n, n as usize)]);
    }
    assert_eq!(queue(&d), vec![1, 2, 3, 4, 5]);
    assert_eq!(d.position(cid(4)), Some(4));

    let out = attach(&mut d, "a", 2, sess(0, 1), 0);
    assert!(
        matches!(&out[0], DispatchAction::AgentHello { queue, conversations, status: AgentStatus::Online, .. }
        if queue.len() == 5 && conversations.is_empty())
    );
    assert_eq!(assigned(&out), pairs(&[(1, "a"), (2, "a")]));
    assert_eq!(positions(&out), vec![(3, 1), (4, 2), (5, 3)]);
    assert_eq!(d.position(cid(1)), None);

    let out = close(&mut d, 1, 0);
    assert_eq!(assigned(&out), pairs(&[(3, "a")]));
    assert_eq!(positions(&out), vec![(4, 1), (5, 2)]);
    assert_eq!(open(&d, "a"), vec![2, 3]);
}

#[test]
fn enqueue_is_idempotent() {
    let mut d = dispatcher();
    enqueue(&mut d, 7, 0);
    // Nothing moves; its visitor only hears again that nobody is online.
    let again = enqueue(&mut d, 7, 0);
    assert_eq!(told_no_agents(&again), vec![7]);
    assert_eq!(again.len(), 1);
    assert_eq!(queue(&d), vec![7]);

    attach(&mut d, "a", 1, sess(0, 1), 0);
    assert_eq!(d.assigned_to(cid(7)).map(String::as_str), Some("a"));
    assert!(enqueue(&mut d, 7, 0).is_empty());
    assert_eq!(d.queue_len(), 0);
    assert_eq!(d.agent_open("a"), 1);
}

#[test]
fn closed_conversation_can_be_enqueued_again() {
    let mut d = dispatcher();
    enqueue(&mut d, 1, 0);
    close(&mut d, 1, 0);
    assert_eq!(d.tracked_len(), 0);
    assert_eq!(positions(&enqueue(&mut d, 1, 0)), vec![(1, 1)]);
    // Closing something unknown does nothing.
    assert!(close(&mut d, 99, 0).is_empty());
}

#[test]
fn load_is_spread_evenly_and_caps_hold() {
    let mut d = dispatcher();
    for (i, agent) in ["a", "b", "c"].into_iter().enumerate() {
        attach(&mut d, agent, 10, sess(i, 1), 0);
    }
    for n in 0..20 {
        enqueue(&mut d, n, 0);
        let counts: Vec<usize> = ["a", "b", "c"].iter().map(|a| d.agent_open(a)).collect();
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(max - min <= 1, "after {n}: {counts:?}");
    }
    assert_eq!(
        [d.agent_open("a"), d.agent_open("b"), d.agent_open("c")],
        [7, 7, 6]
    );

    // Unequal caps: the small one fills up, the rest share.
    let mut d = dispatcher();
    attach(&mut d, "a", 2, sess(0, 1), 0);
    attach(&mut d, "b", 10, sess(0, 2), 0);
    attach(&mut d, "c", 10, sess(1, 1), 0);
    for n in 0..25 {
        enqueue(&mut d, n, 0);
    }
    assert_eq!(
        [d.agent_open("a"), d.agent_open("b"), d.agent_open("c")],
        [2, 10, 10]
    );
    assert_eq!(queue(&d), vec![22, 23, 24]);
}

#[test]
fn cap_blocks_assignment_until_a_close_frees_a_slot() {
    let mut d = dispatcher();
    attach(&mut d, "a", 1, sess(0, 1), 0);
    assert_eq!(assigned(&enqueue(&mut d, 1, 0)), pairs(&[(1, "a")]));
    let out = enqueue(&mut d, 2, 0);
    assert!(assigned(&out).is_empty());
    assert_eq!(positions(&out), vec![(2, 1)]);
    enqueue(&mut d, 3, 0);

    // Closing a queued conversation frees no slot but moves the others.
    let out = close(&mut d, 2, 0);
    assert!(assigned(&out).is_empty());
    assert_eq!(positions(&out), vec![(3, 1)]);

    let out = close(&mut d, 1, 0);
    assert_eq!(assigned(&out), pairs(&[(3, "a")]));
    assert_eq!(d.queue_len(), 0);
}

#[test]
fn ties_go_to_the_agent_assigned_least_recently_then_by_id() {
    let mut d = dispatcher();
    // Attached in reverse id order: ids decide among never-assigned agents.
    attach(&mut d, "c", 5, sess(0, 3), 0);
    attach(&mut d, "b", 5, sess(0, 2), 0);
    attach(&mut d, "a", 5, sess(0, 1), 0);
    assert_eq!(assigned(&enqueue(&mut d, 1, 0)), pairs(&[(1, "a")]));
    assert_eq!(assigned(&enqueue(&mut d, 2, 0)), pairs(&[(2, "b")]));
    assert_eq!(assigned(&enqueue(&mut d, 3, 0)), pairs(&[(3, "c")]));
    close(&mut d, 1, 0);
    close(&mut d, 2, 0);
    // a and b have 0 open; a was assigned before b.
    assert_eq!(assigned(&enqueue(&mut d, 4, 0)), pairs(&[(4, "a")]));
    assert_eq!(assigned(&enqueue(&mut d, 5, 0)), pairs(&[(5, "b")]));
    // All have 1 open; c was assigned least recently.
    assert_eq!(assigned(&enqueue(&mut d, 6, 0)), pairs(&[(6, "c")]));
}

#[test]
fn positions_only_report_conversations_that_moved() {
    let mut d = Dispatcher::new(DispatcherConfig {
        agent_grace_ms: GRACE,
        auto_assign: false,
    });
    for n in 1..=4 {
        enqueue(&mut d, n, 0);
    }
    let s = sess(0, 1);
    attach(&mut d, "a", 3, s, 0);
    assert_eq!(d.queue_len(), 4, "no auto-assignment when it is off");
    let out = accept(&mut d, "a", s, 3);
    assert_eq!(assigned(&out), pairs(&[(3, "a")]));
    assert_eq!(positions(&out), vec![(4, 3)]);
    let out = accept(&mut d, "a", s, 1);
    assert_eq!(positions(&out), vec![(2, 1), (4, 2)]);
    assert_eq!(queue(&d), vec![2, 4]);
}

#[test]
fn hello_and_snapshots_say_how_long_each_queued_conversation_has_waited() {
    let mut d = Dispatcher::new(DispatcherConfig {
        agent_grace_ms: GRACE,
        auto_assign: false,
    });
    enqueue(&mut d, 1, 1_000);
    enqueue(&mut d, 2, 4_000);
    // Enqueued again (the visitor reconnected): still waiting since the first time.
    enqueue(&mut d, 1, 7_000);
    let s = sess(0, 1);
    let out = attach(&mut d, "a", 3, s, 10_000);
    assert!(out.iter().any(|a| matches!(a,
        DispatchAction::AgentHello { queue, waited_ms, .. }
            if queue == &[cid(1), cid(2)] && waited_ms == &[9_000, 6_000])));
    let out = d.handle(
        DispatchEvent::Accept {
            agent: "a".into(),
            session: s,
            conversation: cid(1),
        },
        12_000,
    );
    assert!(out.iter().any(|a| matches!(a,
        DispatchAction::QueueSnapshot { queue, waited_ms, .. }
            if queue == &[cid(2)] && waited_ms == &[8_000])));
}

#[test]
fn queue_snapshot_goes_to_every_session_only_when_the_queue_changed() {
    let mut d = dispatcher();
    attach(&mut d, "b", 1, sess(1, 1), 0);
    attach(&mut d, "a", 1, sess(0, 1), 0);
    attach(&mut d, "a", 1, sess(1, 2), 0);
    // Enqueued and assigned at once: the queue did not change.
    let out = enqueue(&mut d, 1, 0);
    assert!(!out
        .iter()
        .any(|a| matches!(a, DispatchAction::QueueSnapshot { .. })));
    enqueue(&mut d, 2, 0);
    let out = enqueue(&mut d, 3, 0);
    let snapshot = out.iter().find_map(|a| match a {
        DispatchAction::QueueSnapshot {
            sessions, queue, ..
        } => Some((sessions.clone(), queue.clone())),
        _ => None,
    });
    // Sessions in agent-id order, then attach order.
    assert_eq!(
        snapshot,
        Some((vec![sess(0, 1), sess(1, 2), sess(1, 1)], vec![cid(3)]))
    );
    // An agent that is away still sees the queue.
    status(&mut d, "a", AgentStatus::Away, 0);
    let out = enqueue(&mut d, 4, 0);
    assert!(
        matches!(out.last(), Some(DispatchAction::QueueSnapshot { sessions, .. }) if sessions.len() == 3)
    );
}

#[test]
fn agent_back_within_grace_keeps_conversations() {
    let mut d = dispatcher();
    let s = sess(0, 1);
    attach(&mut d, "a", 3, s, 0);
    for n in 1..=3 {
        enqueue(&mut d, n, 0);
    }
    detach(&mut d, "a", s, 1_000);
    assert!(d.handle(DispatchEvent::Tick, 1_000 + GRACE - 1).is_empty());
    let out = attach(&mut d, "a", 3, sess(1, 9), 1_000 + GRACE - 1);
    assert!(
        matches!(&out[0], DispatchAction::AgentHello { conversations, .. } if conversations == &[cid(1), cid(2), cid(3)])
    );
    assert!(d.handle(DispatchEvent::Tick, 100_000).is_empty());
    assert_eq!(open(&d, "a"), vec![1, 2, 3]);

    // Same with away/online.
    status(&mut d, "a", AgentStatus::Away, 200_000);
    // While away, nothing new is assigned to them.
    close(&mut d, 1, 200_001);
    enqueue(&mut d, 4, 200_001);
    assert_eq!(queue(&d), vec![4]);
    assert!(d
        .handle(DispatchEvent::Tick, 200_000 + GRACE - 1)
        .is_empty());
    let out = status(&mut d, "a", AgentStatus::Online, 200_000 + GRACE - 1);
    assert_eq!(assigned(&out), pairs(&[(4, "a")]));
    assert!(requeued(&d.handle(DispatchEvent::Tick, 1_000_000)).is_empty());
    assert_eq!(open(&d, "a"), vec![2, 3, 4]);
}

#[test]
fn expired_grace_requeues_at_the_front_in_order_then_reassigns() {
    let mut d = dispatcher();
    let (sa, sb) = (sess(0, 1), sess(1, 1));
    attach(&mut d, "a", 2, sa, 0);
    attach(&mut d, "b", 2, sb, 0);
    for n in 1..=5 {
        enqueue(&mut d, n, 0);
    }
    assert_eq!(open(&d, "a"), vec![1, 3]);
    assert_eq!(open(&d, "b"), vec![2, 4]);
    assert_eq!(queue(&d), vec![5]);

    status(&mut d, "a", AgentStatus::Away, 100);
    assert!(d.handle(DispatchEvent::Tick, 100 + GRACE - 1).is_empty());
    let out = d.handle(DispatchEvent::Tick, 100 + GRACE);
    assert_eq!(requeued(&out), pairs(&[(1, "a"), (3, "a")]));
    // The away agent's open tab is told.
    assert!(matches!(&out[0], DispatchAction::Requeued { sessions, .. } if sessions == &[sa]));
    assert_eq!(queue(&d), vec![1, 3, 5]);
    assert_eq!(positions(&out), vec![(1, 1), (3, 2), (5, 3)]);
    assert_eq!(d.agent_open("a"), 0);
    // Nothing more on later ticks.
    assert!(d.handle(DispatchEvent::Tick, 100 + 2 * GRACE).is_empty());

    // A slot frees on b: the head goes there.
    assert_eq!(assigned(&close(&mut d, 2, 20_000)), pairs(&[(1, "b")]));
    // a comes back and takes the rest.
    let out = status(&mut d, "a", AgentStatus::Online, 20_000);
    assert_eq!(assigned(&out), pairs(&[(3, "a"), (5, "a")]));
}

#[test]
fn expired_conversations_go_straight_to_an_online_agent() {
    let mut d = dispatcher();
    let sa = sess(0, 1);
    attach(&mut d, "a", 2, sa, 0);
    enqueue(&mut d, 1, 0);
    enqueue(&mut d, 2, 0);
    attach(&mut d, "b", 2, sess(1, 1), 0);
    detach(&mut d, "a", sa, 10);
    let out = d.handle(DispatchEvent::Tick, 10 + GRACE);
    assert_eq!(requeued(&out), pairs(&[(1, "a"), (2, "a")]));
    assert_eq!(assigned(&out), pairs(&[(1, "b"), (2, "b")]));
    // They passed through the queue within the event: nothing to report.
    assert!(positions(&out).is_empty());
    assert!(!out
        .iter()
        .any(|a| matches!(a, DispatchAction::QueueSnapshot { .. })));
    assert!(matches!(&out[0], DispatchAction::Requeued { sessions, .. } if sessions.is_empty()));
}

#[test]
fn requeue_of_several_agents_keeps_original_arrival_order() {
    let mut d = Dispatcher::new(DispatcherConfig {
        agent_grace_ms: GRACE,
        auto_assign: false,
    });
    let (sa, sb) = (sess(0, 1), sess(0, 2));
    attach(&mut d, "a", 5, sa, 0);
    attach(&mut d, "b", 5, sb, 0);
    for n in 1..=6 {
        enqueue(&mut d, n, 0);
    }
    // Picked in an order unrelated to arrival.
    for (agent, s, n) in [("b", sb, 5), ("a", sa, 4), ("b", sb, 1), ("a", sa, 2)] {
        assert_eq!(assigned(&accept(&mut d, agent, s, n)), pairs(&[(n, agent)]));
    }
    assert_eq!(queue(&d), vec![3, 6]);
    detach(&mut d, "a", sa, 0);
    detach(&mut d, "b", sb, 0);
    let out = d.handle(DispatchEvent::Tick, GRACE);
    assert_eq!(
        requeued(&out),
        pairs(&[(1, "b"), (2, "a"), (4, "a"), (5, "b")])
    );
    assert_eq!(queue(&d), vec![1, 2, 4, 5, 3, 6]);
}

#[test]
fn closing_a_tab_does_not_start_grace_but_closing_the_last_does() {
    let mut d = dispatcher();
    let (s1, s2) = (sess(0, 1), sess(1, 2));
    attach(&mut d, "a", 2, s1, 0);
    attach(&mut d, "a", 2, s2, 0);
    let out = enqueue(&mut d, 1, 0);
    assert!(
        matches!(&out[0], DispatchAction::Assigned { sessions, agent_name, .. }
        if sessions == &[s1, s2] && agent_name == "Agent a")
    );
    detach(&mut d, "a", s1, 0);
    assert!(d.agent_present("a"));
    assert!(d.handle(DispatchEvent::Tick, 10 * GRACE).is_empty());
    assert_eq!(
        assigned(&enqueue(&mut d, 2, 10 * GRACE)),
        pairs(&[(2, "a")])
    );
    // Detaching an unknown session or agent is ignored.
    assert!(detach(&mut d, "a", s1, 10 * GRACE).is_empty());
    assert!(detach(&mut d, "zed", s1, 10 * GRACE).is_empty());
    detach(&mut d, "a", s2, 10 * GRACE);
    assert!(!d.agent_present("a"));
    let out = d.handle(DispatchEvent::Tick, 11 * GRACE);
    assert_eq!(requeued(&out), pairs(&[(1, "a"), (2, "a")]));
}

#[test]
fn away_is_sticky_across_reconnects() {
    let mut d = dispatcher();
    let s = sess(0, 1);
    attach(&mut d, "a", 2, s, 0);
    status(&mut d, "a", AgentStatus::Away, 0);
    detach(&mut d, "a", s, 0);
    enqueue(&mut d, 1, 0);
    let out = attach(&mut d, "a", 2, s, 1);
    assert!(
        matches!(&out[0], DispatchAction::AgentHello { status: AgentStatus::Away, queue, .. } if queue == &[cid(1)])
    );
    assert!(assigned(&out).is_empty());
    // Status of an unknown agent is ignored.
    assert!(status(&mut d, "zed", AgentStatus::Online, 1).is_empty());
}

#[test]
fn accept_rejections() {
    let mut d = Dispatcher::new(DispatcherConfig {
        agent_grace_ms: GRACE,
        auto_assign: false,
    });
    let (sa, sb, stranger) = (sess(0, 1), sess(0, 2), sess(1, 7));
    attach(&mut d, "a", 1, sa, 0);
    attach(&mut d, "b", 1, sb, 0);
    for n in 1..=3 {
        enqueue(&mut d, n, 0);
    }
    assert_eq!(rejection(&accept(&mut d, "zed", sa, 1)), "unknown_agent");
    assert_eq!(rejection(&accept(&mut d, "a", stranger, 1)), "not_attached");
    assert_eq!(rejection(&accept(&mut d, "a", sa, 99)), "not_queued");
    // Manual accept ignores the "fewest" rule: b may take one while a has none.
    assert_eq!(assigned(&accept(&mut d, "b", sb, 2)), pairs(&[(2, "b")]));
    assert_eq!(rejection(&accept(&mut d, "b", sb, 1)), "at_capacity");
    let out = accept(&mut d, "b", sb, 2);
    assert!(
        matches!(&out[..], [DispatchAction::Rejected { code: "not_queued", message, .. }] if message.contains("already assigned to you"))
    );
    let out = accept(&mut d, "a", sa, 2);
    assert!(
        matches!(&out[..], [DispatchAction::Rejected { code: "not_queued", message, .. }] if message.contains("another agent"))
    );
    status(&mut d, "a", AgentStatus::Away, 0);
    assert_eq!(rejection(&accept(&mut d, "a", sa, 1)), "agent_offline");
    // Rejections change nothing.
    assert_eq!(queue(&d), vec![1, 3]);
    assert_eq!(d.agent_open("a"), 0);
}

#[test]
fn transfer_moves_the_conversation_and_frees_a_slot() {
    let mut d = dispatcher();
    let (sa, sb) = (sess(0, 1), sess(1, 1));
    attach(&mut d, "a", 1, sa, 0);
    enqueue(&mut d, 1, 0);
    enqueue(&mut d, 2, 0);
    attach(&mut d, "b", 2, sb, 0);
    assert_eq!(open(&d, "a"), vec![1]);
    assert_eq!(open(&d, "b"), vec![2]);

    let out = transfer(&mut d, "a", sa, 1, "b");
    assert_eq!(
        out[0],
        DispatchAction::Transferred {
            conversation: cid(1),
            owner: 1,
            from: "a".into(),
            to: "b".into(),
            to_name: "Agent b".into(),
            sessions: vec![sb],
            from_sessions: vec![sa],
        }
    );
    assert_eq!(d.assigned_to(cid(1)).map(String::as_str), Some("b"));
    assert_eq!(open(&d, "b"), vec![2, 1]);
    // a's freed slot takes the next waiting conversation.
    enqueue(&mut d, 3, 0);
    assert_eq!(open(&d, "a"), vec![3]);
}

#[test]
fn supervisor_transfers_a_conversation_of_another_agent() {
    let mut d = dispatcher();
    let (sa, sb, ss) = (sess(0, 1), sess(1, 1), sess(0, 9));
    attach(&mut d, "a", 1, sa, 0);
    enqueue(&mut d, 1, 0); // a
    attach(&mut d, "b", 1, sb, 0);
    attach(&mut d, "sup", 1, ss, 0);
    assert_eq!(open(&d, "a"), vec![1]);
    // An agent may not move a conversation that is not theirs.
    assert_eq!(
        rejection(&transfer_as(&mut d, "sup", Role::Agent, ss, 1, "b")),
        "not_assigned"
    );
    // A supervisor may.
    let out = transfer_as(&mut d, "sup", Role::Supervisor, ss, 1, "b");
    assert!(
        matches!(&out[0], DispatchAction::Transferred { from, to, from_sessions, .. }
            if from == "a" && to == "b" && from_sessions == &vec![sa]),
        "{out:?}"
    );
    assert_eq!(d.assigned_to(cid(1)).map(String::as_str), Some("b"));
    assert_eq!(open(&d, "a"), Vec::<u64>::new());
    // Still not to the agent who already holds it, nor to nobody.
    assert_eq!(
        rejection(&transfer_as(&mut d, "sup", Role::Admin, ss, 1, "b")),
        "same_agent"
    );
    assert_eq!(
        rejection(&transfer_as(&mut d, "sup", Role::Supervisor, ss, 7, "a")),
        "not_assigned"
    );
}

#[test]
fn transfer_rejections() {
    let mut d = dispatcher();
    let (sa, sb, sc) = (sess(0, 1), sess(0, 2), sess(0, 3));
    attach(&mut d, "a", 1, sa, 0);
    attach(&mut d, "b", 1, sb, 0);
    attach(&mut d, "c", 1, sc, 0);
    enqueue(&mut d, 1, 0); // a
    enqueue(&mut d, 2, 0); // b
    enqueue(&mut d, 4, 0); // c
    enqueue(&mut d, 3, 0); // queued
    restore(&mut d, 5, Some("ghost"), 0); // known, never attached
    assert_eq!(
        rejection(&transfer(&mut d, "zed", sa, 1, "b")),
        "unknown_agent"
    );
    assert_eq!(
        rejection(&transfer(&mut d, "a", sb, 1, "b")),
        "not_attached"
    );
    assert_eq!(
        rejection(&transfer(&mut d, "b", sb, 1, "c")),
        "not_assigned"
    );
    assert_eq!(
        rejection(&transfer(&mut d, "a", sa, 3, "b")),
        "not_assigned"
    );
    assert_eq!(
        rejection(&transfer(&mut d, "a", sa, 99, "b")),
        "not_assigned"
    );
    assert_eq!(
        rejection(&transfer(&mut d, "a", sa, 1, "nobody")),
        "unknown_agent"
    );
    assert_eq!(rejection(&transfer(&mut d, "a", sa, 1, "a")), "same_agent");
    assert_eq!(
        rejection(&transfer(&mut d, "a", sa, 1, "ghost")),
        "agent_offline"
    );
    assert_eq!(rejection(&transfer(&mut d, "a", sa, 1, "b")), "at_capacity");
    close(&mut d, 4, 0); // c takes 3
    status(&mut d, "b", AgentStatus::Away, 0);
    close(&mut d, 2, 0);
    assert_eq!(
        rejection(&transfer(&mut d, "a", sa, 1, "b")),
        "agent_offline"
    );
    let out = transfer(&mut d, "a", sa, 1, "c");
    assert!(
        matches!(&out[..], [DispatchAction::Rejected { code: "at_capacity", message, .. }] if message.contains("1 of at most 1"))
    );
    assert_eq!(open(&d, "a"), vec![1]);
}

#[test]
fn restore_rebuilds_queue_and_assignments() {
    let mut d = dispatcher();
    let t0 = 50;
    restore(&mut d, 1, None, t0);
    restore(&mut d, 3, Some("a"), t0);
    let out = restore(&mut d, 2, None, t0);
    assert_eq!(positions(&out), vec![(2, 2)]);
    restore(&mut d, 4, Some("b"), t0);
    // Already tracked: ignored.
    assert!(restore(&mut d, 1, Some("b"), t0).is_empty());
    assert_eq!(queue(&d), vec![1, 2]);
    assert_eq!(d.assigned_to(cid(3)).map(String::as_str), Some("a"));
    assert!(!d.agent_present("a"));

    let out = attach(&mut d, "a", 2, sess(0, 1), t0 + 100);
    assert!(
        matches!(&out[0], DispatchAction::AgentHello { conversations, .. } if conversations == &[cid(3)])
    );
    assert_eq!(assigned(&out), pairs(&[(1, "a")]));
    assert_eq!(positions(&out), vec![(2, 1)]);

    // b never came: its grace started at restore time.
    assert!(d.handle(DispatchEvent::Tick, t0 + GRACE - 1).is_empty());
    let out = d.handle(DispatchEvent::Tick, t0 + GRACE);
    assert_eq!(requeued(&out), pairs(&[(4, "b")]));
    assert_eq!(queue(&d), vec![4, 2]);
    assert_eq!(open(&d, "a"), vec![3, 1]);
}

#[test]
fn restore_above_cap_keeps_everything_but_assigns_nothing_new() {
    let mut d = dispatcher();
    for n in 1..=3 {
        restore(&mut d, n, Some("a"), 0);
    }
    enqueue(&mut d, 4, 0);
    attach(&mut d, "a", 2, sess(0, 1), 1);
    assert_eq!(open(&d, "a"), vec![1, 2, 3]);
    assert_eq!(queue(&d), vec![4]);
    close(&mut d, 1, 2);
    assert_eq!(queue(&d), vec![4], "still at cap");
    close(&mut d, 2, 3);
    assert_eq!(open(&d, "a"), vec![3, 4]);
    // The grace timer from the restore was cancelled by the attach.
    assert!(d.handle(DispatchEvent::Tick, 10 * GRACE).is_empty());
}

#[test]
fn lowering_the_cap_on_reattach_stops_new_assignments() {
    let mut d = dispatcher();
    attach(&mut d, "a", 3, sess(0, 1), 0);
    for n in 1..=3 {
        enqueue(&mut d, n, 0);
    }
    attach(&mut d, "a", 1, sess(0, 2), 0);
    close(&mut d, 1, 0);
    enqueue(&mut d, 4, 0);
    assert_eq!(queue(&d), vec![4]);
    assert_eq!(d.agent_open("a"), 2);
}

fn told_no_agents(actions: &[DispatchAction]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            DispatchAction::NoAgents { conversations } => Some(conversations),
            _ => None,
        })
        .flatten()
        .map(|(c, _)| c.0)
        .collect()
}

#[test]
fn visitors_are_told_when_nobody_is_online_and_stay_queued() {
    let mut d = dispatcher();
    // No agent at all: the visitor is told, the conversation waits.
    assert_eq!(told_no_agents(&enqueue(&mut d, 9, 0)), vec![9]);
    assert_eq!(queue(&d), vec![9]);
    close(&mut d, 9, 0);
    // An agent who is away is nobody online.
    attach(&mut d, "a", 1, sess(0, 1), 0);
    status(&mut d, "a", AgentStatus::Away, 0);
    assert!(!d.anyone_present());
    assert_eq!(told_no_agents(&enqueue(&mut d, 1, 0)), vec![1]);
    assert_eq!(told_no_agents(&enqueue(&mut d, 2, 0)), vec![2]);
    assert_eq!(queue(&d), vec![1, 2]);
    // Enqueued again (the visitor reconnected): told again, still queued once.
    assert_eq!(told_no_agents(&enqueue(&mut d, 1, 0)), vec![1]);
    assert_eq!(queue(&d), vec![1, 2]);
    // Coming online takes the head; the other keeps waiting with a position,
    // and a full agent is not "nobody online".
    let out = status(&mut d, "a", AgentStatus::Online, 0);
    assert_eq!(assigned(&out), pairs(&[(1, "a")]));
    assert!(told_no_agents(&out).is_empty());
    assert!(told_no_agents(&enqueue(&mut d, 3, 0)).is_empty());
    // The last agent leaves: everyone still waiting is told, once.
    let out = detach(&mut d, "a", sess(0, 1), 10);
    assert_eq!(told_no_agents(&out), vec![2, 3]);
    assert!(told_no_agents(&d.handle(DispatchEvent::Tick, 20)).is_empty());
    // Its conversation comes back after the grace period: that visitor is told too.
    let out = d.handle(DispatchEvent::Tick, 10 + GRACE);
    assert_eq!(requeued(&out), pairs(&[(1, "a")]));
    assert_eq!(told_no_agents(&out), vec![1]);
    assert_eq!(queue(&d), vec![1, 2, 3]);
}

#[test]
fn with_manual_accept_an_online_agent_means_somebody_is_there() {
    let mut d = Dispatcher::new(DispatcherConfig {
        agent_grace_ms: GRACE,
        auto_assign: false,
    });
    attach(&mut d, "a", 2, sess(0, 1), 0);
    let out = enqueue(&mut d, 1, 0);
    assert!(assigned(&out).is_empty());
    assert!(told_no_agents(&out).is_empty());
    assert_eq!(queue(&d), vec![1]);
    let out = detach(&mut d, "a", sess(0, 1), 0);
    assert_eq!(told_no_agents(&out), vec![1]);
}

// Randomized: random events, invariants and oracles checked after each one.

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const AGENTS: [&str; 4] = ["a", "b", "c", "d"];
const CAPS: [u32; 4] = [1, 3, 4, 2];
const CONVERSATIONS: u64 = 16;
const RANDOM_GRACE: u64 = 1_000;

/// What the test knows independently of the dispatcher.
struct Model {
    live: BTreeSet<u64>,
    known: [bool; 4],
    sessions: [BTreeSet<SessionRef>; 4],
    status: [AgentStatus; 4],
    grace_start: [Option<u64>; 4],
    reported: HashMap<u64, usize>,
    /// Order in which live conversations first arrived.
    arrival: HashMap<u64, u64>,
    arrivals: u64,
}

impl Model {
    fn present(&self, a: usize) -> bool {
        self.known[a] && self.status[a] == AgentStatus::Online && !self.sessions[a].is_empty()
    }

    /// Applies the grace rules to a presence change.
    fn presence(&mut self, a: usize, was: bool, now: u64) {
        match (was, self.present(a)) {
            (true, false) => self.grace_start[a] = Some(now),
            (false, true) => self.grace_start[a] = None,
            _ => {}
        }
    }

    fn arrive(&mut self, c: u64) -> bool {
        if !self.live.insert(c) {
            return false;
        }
        self.arrival.insert(c, self.arrivals);
        self.arrivals += 1;
        true
    }
}

fn agent_no(id: &str) -> usize {
    AGENTS
        .iter()
        .position(|a| *a == id)
        .expect("known test agent")
}

fn tab(a: usize, t: u64) -> SessionRef {
    sess((a + t as usize) % 2, a as u64 * 10 + t)
}

fn random_event(rng: &mut XorShift, d: &Dispatcher) -> DispatchEvent {
    let a = rng.below(4) as usize;
    let session = tab(a, rng.below(2));
    let conversation = cid(rng.below(CONVERSATIONS));
    match rng.below(100) {
        0..=9 => DispatchEvent::AgentAttached {
            agent: AGENTS[a].into(),
            name: AGENTS[a].to_uppercase(),
            max_open: CAPS[a],
            session,
        },
        10..=17 => DispatchEvent::AgentDetached {
            agent: AGENTS[a].into(),
            session,
        },
        18..=25 => DispatchEvent::AgentStatus {
            agent: AGENTS[a].into(),
            status: if rng.below(3) == 0 {
                AgentStatus::Away
            } else {
                AgentStatus::Online
            },
        },
        26..=40 => DispatchEvent::Enqueue {
            conversation,
            owner: rng.below(2) as usize,
        },
        41..=50 => {
            // Usually something from the queue, sometimes anything.
            let queued: Vec<ConversationId> = d.queue().collect();
            let conversation = if !queued.is_empty() && rng.below(4) != 0 {
                queued[rng.below(queued.len() as u64) as usize]
            } else {
                conversation
            };
            DispatchEvent::Accept {
                agent: AGENTS[a].into(),
                session,
                conversation,
            }
        }
        51..=60 => {
            let mine = d.agent_conversations(AGENTS[a]);
            let conversation = if !mine.is_empty() && rng.below(4) != 0 {
                mine[rng.below(mine.len() as u64) as usize]
            } else {
                conversation
            };
            let to = if rng.below(20) == 0 {
                "nobody"
            } else {
                AGENTS[rng.below(4) as usize]
            };
            DispatchEvent::Transfer {
                from: AGENTS[a].into(),
                session,
                conversation,
                to: to.into(),
                role: Role::Agent,
            }
        }
        61..=76 => {
            // Usually one of an agent's conversations, sometimes anything.
            let mine = d.agent_conversations(AGENTS[a]);
            let conversation = if !mine.is_empty() && rng.below(2) != 0 {
                mine[rng.below(mine.len() as u64) as usize]
            } else {
                conversation
            };
            DispatchEvent::Closed { conversation }
        }
        77..=81 => {
            // Restores never exceed a cap, so the cap invariant stays strict.
            let assigned = (rng.below(2) == 0 && (d.agent_open(AGENTS[a]) as u32) < CAPS[a])
                .then(|| AGENTS[a].to_owned());
            DispatchEvent::Restore {
                conversation,
                owner: rng.below(2) as usize,
                assigned,
            }
        }
        _ => DispatchEvent::Tick,
    }
}

fn run_random(seed: u64, auto_assign: bool, steps: usize) {
    let config = DispatcherConfig {
        agent_grace_ms: RANDOM_GRACE,
        auto_assign,
    };
    let mut d = Dispatcher::new(config);
    // A twin fed the same events must answer the same (its HashMap is
    // seeded differently), proving outputs do not depend on hash order.
    let mut twin = Dispatcher::new(config);
    let mut rng = XorShift(seed);
    let mut m = Model {
        live: BTreeSet::new(),
        known: [false; 4],
        sessions: Default::default(),
        status: [AgentStatus::Online; 4],
        grace_start: [None; 4],
        reported: HashMap::new(),
        arrival: HashMap::new(),
        arrivals: 0,
    };
    let mut now = 0u64;
    // How often each outcome happened, so the run proves it covered them.
    let (mut accepts, mut transfers, mut requeues, mut assignments, mut rejections) =
        (0, 0, 0, 0, 0);
    let mut no_agents = 0;
    for step in 0..steps {
        now += rng.below(300);
        let event = random_event(&mut rng, &d);
        let ctx = format!("seed {seed} step {step} now {now} event {event:?}");
        let queue_before: Vec<u64> = queue(&d);
        let open_before: Vec<usize> = AGENTS.iter().map(|a| d.agent_open(a)).collect();
        let anyone_before = (0..4).any(|a| m.present(a));
        let owner_before = match &event {
            DispatchEvent::Transfer { conversation, .. } => d.assigned_to(*conversation).cloned(),
            _ => None,
        };
        let out = d.handle(event.clone(), now);
        assert_eq!(out, twin.handle(event.clone(), now), "{ctx}");

        // Update the model and check event-specific oracles.
        match &event {
            DispatchEvent::AgentAttached { agent, session, .. } => {
                let a = agent_no(agent);
                let was = m.present(a);
                m.known[a] = true;
                m.sessions[a].insert(*session);
                m.presence(a, was, now);
                assert!(
                    matches!(out.first(), Some(DispatchAction::AgentHello { session: s, .. }) if s == session),
                    "{ctx}"
                );
            }
            DispatchEvent::AgentDetached { agent, session } => {
                let a = agent_no(agent);
                let was = m.present(a);
                m.sessions[a].remove(session);
                m.presence(a, was, now);
            }
            DispatchEvent::AgentStatus { agent, status } => {
                let a = agent_no(agent);
                if m.known[a] {
                    let was = m.present(a);
                    m.status[a] = *status;
                    m.presence(a, was, now);
                }
            }
            DispatchEvent::Enqueue { conversation, .. } => {
                m.arrive(conversation.0);
            }
            DispatchEvent::Closed { conversation } => {
                m.live.remove(&conversation.0);
                m.arrival.remove(&conversation.0);
                m.reported.remove(&conversation.0);
            }
            DispatchEvent::Restore {
                conversation,
                assigned,
                ..
            } => {
                if m.arrive(conversation.0) {
                    if let Some(agent) = assigned {
                        let a = agent_no(agent);
                        m.known[a] = true;
                        if !m.present(a) && m.grace_start[a].is_none() {
                            m.grace_start[a] = Some(now);
                        }
                    }
                }
            }
            DispatchEvent::Accept {
                agent,
                session,
                conversation,
            } => {
                let a = agent_no(agent);
                let ok = m.sessions[a].contains(session)
                    && m.present(a)
                    && queue_before.contains(&conversation.0)
                    && open_before[a] < CAPS[a] as usize;
                let rejected = matches!(&out[..], [DispatchAction::Rejected { .. }]);
                assert_eq!(ok, !rejected, "{ctx}: {out:?}");
                if ok {
                    accepts += 1;
                    assert_eq!(
                        assigned(&out[..1]),
                        vec![(conversation.0, agent.clone())],
                        "{ctx}"
                    );
                }
            }
            DispatchEvent::Transfer {
                from,
                session,
                conversation,
                to,
                ..
            } => {
                let a = agent_no(from);
                let ok = m.sessions[a].contains(session)
                    && owner_before.as_deref() == Some(from.as_str())
                    && to != from
                    && AGENTS
                        .iter()
                        .position(|x| x == to)
                        .is_some_and(|t| m.present(t) && open_before[t] < CAPS[t] as usize);
                let rejected = matches!(&out[..], [DispatchAction::Rejected { .. }]);
                assert_eq!(ok, !rejected, "{ctx}: {out:?}");
                if ok {
                    transfers += 1;
                    assert_eq!(d.assigned_to(*conversation), Some(to), "{ctx}");
                }
            }
            DispatchEvent::Tick => {}
        }
        if matches!(&out[..], [DispatchAction::Rejected { .. }]) {
            rejections += 1;
            assert_eq!(
                queue(&d),
                queue_before,
                "{ctx}: rejection changed the queue"
            );
            let open_after: Vec<usize> = AGENTS.iter().map(|a| d.agent_open(a)).collect();
            assert_eq!(open_after, open_before, "{ctx}");
        }

        // Check every action against the model.
        let mut expired = [false; 4];
        for action in &out {
            match action {
                DispatchAction::Assigned {
                    conversation,
                    agent,
                    ..
                } => {
                    assignments += 1;
                    let a = agent_no(agent);
                    assert!(m.present(a), "{ctx}: assigned to absent {agent}");
                    assert!(m.live.contains(&conversation.0), "{ctx}");
                    m.reported.remove(&conversation.0);
                }
                DispatchAction::Requeued {
                    from_agent,
                    conversation,
                    ..
                } => {
                    assert!(matches!(event, DispatchEvent::Tick), "{ctx}");
                    let a = agent_no(from_agent);
                    assert!(!m.present(a), "{ctx}");
                    let start = m.grace_start[a].expect("grace was running");
                    assert!(now >= start + RANDOM_GRACE, "{ctx}: requeued early");
                    expired[a] = true;
                    requeues += 1;
                    m.reported.remove(&conversation.0);
                }
                DispatchAction::QueuePositions { updates } => {
                    for &(c, _, p) in updates {
                        let old = m.reported.insert(c.0, p);
                        assert_ne!(old, Some(p), "{ctx}: unchanged position reported");
                    }
                }
                DispatchAction::QueueSnapshot {
                    sessions, queue: q, ..
                } => {
                    let expected: Vec<SessionRef> = m.sessions.iter().flatten().copied().collect();
                    let mut got = sessions.clone();
                    got.sort();
                    let mut expected = expected;
                    expected.sort();
                    assert_eq!(got, expected, "{ctx}");
                    assert_eq!(
                        q.iter().map(|c| c.0).collect::<Vec<_>>(),
                        queue(&d),
                        "{ctx}"
                    );
                    assert_ne!(queue(&d), queue_before, "{ctx}: snapshot without change");
                }
                _ => {}
            }
        }
        if !out
            .iter()
            .any(|a| matches!(a, DispatchAction::QueueSnapshot { .. }))
            && m.sessions.iter().any(|s| !s.is_empty())
        {
            assert_eq!(
                queue(&d),
                queue_before,
                "{ctx}: queue changed without snapshot"
            );
        }
        if matches!(event, DispatchEvent::Tick) {
            // Re-queued in original arrival order, ahead of everyone else
            // (those reassigned at once left from the front).
            let back: Vec<u64> = requeued(&out).into_iter().map(|(c, _)| c).collect();
            assert!(
                back.windows(2).all(|w| m.arrival[&w[0]] < m.arrival[&w[1]]),
                "{ctx}: {back:?}"
            );
            let still: Vec<u64> = back
                .iter()
                .copied()
                .filter(|&c| d.is_queued(cid(c)))
                .collect();
            assert_eq!(
                queue(&d)[..still.len()],
                still[..],
                "{ctx}: not at the front"
            );
            for a in 0..4 {
                if m.grace_start[a].is_some_and(|start| now >= start + RANDOM_GRACE) {
                    m.grace_start[a] = None;
                    assert_eq!(
                        d.agent_open(AGENTS[a]),
                        0,
                        "{ctx}: {} kept conversations",
                        AGENTS[a]
                    );
                } else {
                    assert!(!expired[a], "{ctx}");
                }
            }
        }

        // Nobody online: said only when true, to queued visitors, and to every
        // visitor who just entered the queue (or all of them when the last agent left).
        let told: Vec<u64> = out
            .iter()
            .filter_map(|a| match a {
                DispatchAction::NoAgents { conversations } => Some(conversations),
                _ => None,
            })
            .flatten()
            .map(|(c, _)| c.0)
            .collect();
        let anyone_after = (0..4).any(|a| m.present(a));
        assert_eq!(d.anyone_present(), anyone_after, "{ctx}");
        if !told.is_empty() {
            no_agents += 1;
            assert!(!anyone_after, "{ctx}: no_agents while an agent is present");
            let unique: BTreeSet<u64> = told.iter().copied().collect();
            assert_eq!(unique.len(), told.len(), "{ctx}: told twice {told:?}");
            assert!(told.iter().all(|c| d.is_queued(cid(*c))), "{ctx}");
        }
        if !anyone_after {
            if anyone_before {
                assert_eq!(told, queue(&d), "{ctx}: last agent left");
            }
            if let DispatchEvent::Enqueue { conversation, .. } = &event {
                let waiting = d.is_queued(*conversation);
                assert_eq!(told.contains(&conversation.0), waiting, "{ctx}: not told");
            }
            for (c, _) in requeued(&out) {
                assert!(told.contains(&c), "{ctx}: re-queued {c} not told");
            }
        }

        // Global invariants.
        let q = queue(&d);
        let unique: BTreeSet<u64> = q.iter().copied().collect();
        assert_eq!(unique.len(), q.len(), "{ctx}: duplicate in queue {q:?}");
        for (i, &c) in q.iter().enumerate() {
            assert!(d.is_queued(cid(c)), "{ctx}");
            assert_eq!(d.assigned_to(cid(c)), None, "{ctx}");
            assert_eq!(d.position(cid(c)), Some(i + 1), "{ctx}");
            assert_eq!(
                m.reported.get(&c),
                Some(&(i + 1)),
                "{ctx}: visitor of {c} has a stale position"
            );
        }
        let mut total = q.len();
        for (a, agent) in AGENTS.iter().enumerate() {
            let mine = d.agent_conversations(agent);
            assert!(mine.len() <= CAPS[a] as usize, "{ctx}: {agent} above cap");
            for c in mine {
                assert_eq!(d.assigned_to(*c), Some(&agent.to_string()), "{ctx}");
                assert!(!d.is_queued(*c), "{ctx}");
            }
            total += mine.len();
            assert_eq!(
                d.agent_present(agent),
                m.present(a),
                "{ctx}: presence of {agent}"
            );
            if !m.present(a) && !mine.is_empty() {
                assert!(
                    m.grace_start[a].is_some(),
                    "{ctx}: {agent} absent without grace"
                );
            }
            if auto_assign && !q.is_empty() {
                assert!(
                    !(m.present(a) && mine.len() < CAPS[a] as usize),
                    "{ctx}: {agent} idle while queue waits"
                );
            }
        }
        assert_eq!(total, m.live.len(), "{ctx}: conversations lost or invented");
        assert_eq!(d.tracked_len(), m.live.len(), "{ctx}");
        for &c in &m.live {
            assert!(
                d.is_queued(cid(c)) != d.assigned_to(cid(c)).is_some(),
                "{ctx}: {c}"
            );
        }
    }
    let counts = format!(
        "seed {seed}: {accepts} accepts, {transfers} transfers, {requeues} requeues, \
         {assignments} assignments, {rejections} rejections, {no_agents} no_agents"
    );
    println!("{counts}");
    // With auto-assignment an idle agent never sees a waiting conversation,
    // so a manual accept can only be refused.
    assert!(accepts > 0 || auto_assign, "{counts}");
    assert!(
        transfers > 0 && requeues > 0 && assignments > 50 && rejections > 100 && no_agents > 0,
        "{counts}"
    );
}

#[test]
fn random_events_keep_invariants_with_auto_assignment() {
    for seed in [1, 2, 3, 0x9e37_79b9_7f4a_7c15, 42, 1234567, 99, 7] {
        run_random(seed, true, 4_000);
    }
}

#[test]
fn random_events_keep_invariants_with_manual_accept() {
    for seed in [5, 6, 0xdead_beef, 31337] {
        run_random(seed, false, 4_000);
    }
}

/// Cost with a long queue: `cargo test --release -- --ignored --nocapture`.
#[test]
#[ignore]
fn long_queue_cost() {
    use std::time::Instant;
    const WAITING: u64 = 50_000;
    const ROUNDS: u64 = 1_000;
    let mut d = dispatcher();
    let start = Instant::now();
    for n in 0..WAITING {
        enqueue(&mut d, n, 0);
    }
    let enqueue_ns = start.elapsed().as_nanos() as u64 / WAITING;
    attach(&mut d, "a", 1, sess(0, 1), 0);
    let start = Instant::now();
    let mut updates = 0;
    for n in 0..ROUNDS {
        // Frees the slot: the head is assigned and every position moves.
        let out = close(&mut d, n, 0);
        updates += positions(&out).len();
    }
    let per_close = start.elapsed() / ROUNDS as u32;
    let start = Instant::now();
    for n in 0..ROUNDS {
        close(&mut d, WAITING - 1 - n, 0); // tail of the queue: no one moves
    }
    let per_tail_close = start.elapsed() / ROUNDS as u32;
    println!(
        "queue {WAITING}: enqueue {enqueue_ns} ns each; assignment from the head {per_close:?} \
         ({} position updates each); closing the tail {per_tail_close:?}",
        updates / ROUNDS as usize
    );
}
