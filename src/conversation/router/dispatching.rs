//! Carries out the dispatcher's actions: assignment, transfer and queue changes go to the owner
//! shards of their conversations, and frames to agent sessions wherever they are connected.

use super::*;

impl Router {
    /// `attaching_agent` is the id and display name of the agent whose attach caused these
    /// actions (its `AgentHello` greets it by name).
    pub(super) fn run_dispatch(
        &self,
        actions: Vec<DispatchAction>,
        attaching_agent: Option<(String, String)>,
    ) {
        for action in actions {
            match action {
                DispatchAction::Assigned {
                    conversation,
                    owner,
                    agent,
                    agent_name,
                    sessions,
                } => self.send(
                    owner,
                    ShardMessage::Owner(OwnerEvent::Assigned {
                        conversation: ConversationId(conversation.0),
                        agent,
                        agent_name,
                        sessions: sessions
                            .into_iter()
                            .map(SessionRef::from_dispatch)
                            .collect(),
                    }),
                ),
                DispatchAction::Requeued {
                    conversation,
                    owner,
                    ..
                } => self.send(
                    owner,
                    ShardMessage::Owner(OwnerEvent::Requeued {
                        conversation: ConversationId(conversation.0),
                    }),
                ),
                DispatchAction::QueuePositions { updates } => {
                    for (conversation, owner, position) in updates {
                        self.send(
                            owner,
                            ShardMessage::Owner(OwnerEvent::QueuePosition {
                                conversation: ConversationId(conversation.0),
                                position,
                            }),
                        );
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
                        self.deliver(SessionRef::from_dispatch(session), frame.clone());
                    }
                }
                DispatchAction::Transferred {
                    conversation,
                    owner,
                    to,
                    to_name,
                    sessions,
                    ..
                } => self.send(
                    owner,
                    ShardMessage::Owner(OwnerEvent::Transferred {
                        conversation: ConversationId(conversation.0),
                        to,
                        to_name,
                        sessions: sessions
                            .into_iter()
                            .map(SessionRef::from_dispatch)
                            .collect(),
                    }),
                ),
                DispatchAction::NoAgents { conversations } => {
                    // One message per owner shard, in the dispatcher's order.
                    let mut by_owner: Vec<(usize, Vec<ConversationId>)> = Vec::new();
                    for (conversation, owner) in conversations {
                        let conversation = ConversationId(conversation.0);
                        match by_owner.iter_mut().find(|(o, _)| *o == owner) {
                            Some((_, list)) => list.push(conversation),
                            None => by_owner.push((owner, vec![conversation])),
                        }
                    }
                    for (owner, conversations) in by_owner {
                        self.send(
                            owner,
                            ShardMessage::Owner(OwnerEvent::NoAgents { conversations }),
                        );
                    }
                }
                DispatchAction::Rejected {
                    session,
                    code,
                    message,
                } => self.deliver(
                    SessionRef::from_dispatch(session),
                    Arc::from(protocol::error_frame(code, &message)),
                ),
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
                    self.deliver_hello(session, Arc::from(hello.to_string()));
                    for conversation in conversations {
                        let conversation = ConversationId(conversation.0);
                        self.send(
                            conversation.shard(),
                            ShardMessage::Owner(OwnerEvent::AgentSubscribe {
                                conversation,
                                agent: agent.clone(),
                                session,
                            }),
                        );
                    }
                }
            }
        }
    }
}
