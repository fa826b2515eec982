//! Carries out the dispatcher's actions: assignment, transfer and queue changes go to the owner
//! shards of their conversations, and frames to agent sessions wherever they are connected.
//!
//! [`route_dispatch`] is pure (actions in, owner events and frames out, in order); the router
//! sends what it returns, and the simulation (`conversation::simulation`) runs the same routing.

use super::*;

/// Where one piece of a dispatcher action goes.
#[derive(Debug)]
pub enum Routed {
    /// An event for the owner shard `shard`.
    Owner { shard: usize, event: OwnerEvent },
    /// A frame for a session, wherever it is connected.
    Frame {
        to: SessionRef,
        frame: Arc<str>,
        kind: Delivery,
    },
}

/// Turns dispatcher actions into owner events and session frames, in order. `attaching_agent`
/// is the id and display name of the agent whose attach caused these actions (its `AgentHello`
/// greets it by name).
pub fn route_dispatch(
    actions: Vec<DispatchAction>,
    attaching_agent: Option<(String, String)>,
) -> Vec<Routed> {
    let mut out = Vec::new();
    let owner = |shard: usize, event: OwnerEvent| Routed::Owner { shard, event };
    let live = |to: dispatch::SessionRef, frame: Arc<str>| Routed::Frame {
        to: SessionRef::from_dispatch(to),
        frame,
        kind: Delivery::Live,
    };
    let sessions_of = |sessions: Vec<dispatch::SessionRef>| -> Vec<SessionRef> {
        sessions
            .into_iter()
            .map(SessionRef::from_dispatch)
            .collect()
    };
    for action in actions {
        match action {
            DispatchAction::Assigned {
                conversation,
                owner: shard,
                agent,
                agent_name,
                sessions,
            } => out.push(owner(
                shard,
                OwnerEvent::Assigned {
                    conversation: ConversationId(conversation.0),
                    agent,
                    agent_name,
                    sessions: sessions_of(sessions),
                },
            )),
            DispatchAction::Requeued {
                conversation,
                owner: shard,
                ..
            } => out.push(owner(
                shard,
                OwnerEvent::Requeued {
                    conversation: ConversationId(conversation.0),
                },
            )),
            DispatchAction::QueuePositions { updates } => {
                for (conversation, shard, position) in updates {
                    out.push(owner(
                        shard,
                        OwnerEvent::QueuePosition {
                            conversation: ConversationId(conversation.0),
                            position,
                        },
                    ));
                }
            }
            DispatchAction::QueueSnapshot {
                sessions,
                queue,
                waited_ms,
            } => {
                let frame: Arc<str> = Arc::from(
                    serde_json::json!({
                        "type": "queue",
                        "conversations": queue.iter().map(|c| c.0).collect::<Vec<_>>(),
                        "waited_ms": waited_ms,
                    })
                    .to_string(),
                );
                for session in sessions {
                    out.push(live(session, frame.clone()));
                }
            }
            DispatchAction::Transferred {
                conversation,
                owner: shard,
                to,
                to_name,
                sessions,
                ..
            } => out.push(owner(
                shard,
                OwnerEvent::Transferred {
                    conversation: ConversationId(conversation.0),
                    to,
                    to_name,
                    sessions: sessions_of(sessions),
                },
            )),
            DispatchAction::NoAgents { conversations } => {
                // One message per owner shard, in the dispatcher's order.
                let mut by_owner: Vec<(usize, Vec<ConversationId>)> = Vec::new();
                for (conversation, shard) in conversations {
                    let conversation = ConversationId(conversation.0);
                    match by_owner.iter_mut().find(|(o, _)| *o == shard) {
                        Some((_, list)) => list.push(conversation),
                        None => by_owner.push((shard, vec![conversation])),
                    }
                }
                for (shard, conversations) in by_owner {
                    out.push(owner(shard, OwnerEvent::NoAgents { conversations }));
                }
            }
            DispatchAction::Rejected {
                session,
                code,
                message,
            } => out.push(live(
                session,
                Arc::from(protocol::error_frame(code, &message)),
            )),
            DispatchAction::AgentHello {
                session,
                conversations,
                queue,
                waited_ms,
                status,
            } => {
                let session = SessionRef::from_dispatch(session);
                let (agent, name) = attaching_agent.clone().unwrap_or_default();
                let hello = serde_json::json!({
                    "type": "hello",
                    "agent": name,
                    "id": &agent,
                    "conversations": conversations.iter().map(|c| c.0).collect::<Vec<_>>(),
                    "queue": queue.iter().map(|c| c.0).collect::<Vec<_>>(),
                    "queue_waited_ms": waited_ms,
                    "status": match status {
                        dispatch::AgentStatus::Online => "online",
                        dispatch::AgentStatus::Away => "away",
                    },
                });
                out.push(Routed::Frame {
                    to: session,
                    frame: Arc::from(hello.to_string()),
                    kind: Delivery::Hello,
                });
                for conversation in conversations {
                    let conversation = ConversationId(conversation.0);
                    out.push(owner(
                        conversation.shard(),
                        OwnerEvent::AgentSubscribe {
                            conversation,
                            agent: agent.clone(),
                            session,
                        },
                    ));
                }
            }
        }
    }
    out
}

impl Router {
    /// Sends what [`route_dispatch`] makes of `actions`.
    pub(super) fn run_dispatch(
        &self,
        actions: Vec<DispatchAction>,
        attaching_agent: Option<(String, String)>,
    ) {
        for routed in route_dispatch(actions, attaching_agent) {
            match routed {
                Routed::Owner { shard, event } => self.send(shard, ShardMessage::Owner(event)),
                Routed::Frame { to, frame, kind } => self.deliver_frame(to, frame, kind),
            }
        }
    }
}
