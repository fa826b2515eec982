//! The agent side of the owner: agent frames on conversations assigned to them (message, typing,
//! read, close, transfer), supervisors watching, subscriptions, and what the dispatcher tells the
//! owner (assigned, re-queued, no agents).

use super::*;

/// What a watcher is told about a conversation: where it stands and who holds it.
pub(super) fn watching_frame(live: &Live) -> Arc<str> {
    let agent = match &live.meta.state {
        ConversationState::Assigned { agent } => Some(agent.as_str()),
        _ => None,
    };
    frame(serde_json::json!({
        "type": "watching",
        "conversation": live.meta.id.0,
        "site": &*live.key.site,
        "visitor": &*live.key.visitor,
        "seq": live.meta.last_seq,
        "state": state_name(&live.meta.state),
        "agent": agent,
    }))
}

pub(super) fn state_name(state: &ConversationState) -> &'static str {
    match state {
        ConversationState::Bot => "bot",
        ConversationState::Queued => "queued",
        ConversationState::Assigned { .. } => "assigned",
        ConversationState::Closed => "closed",
    }
}

pub(super) fn assigned_to_agent(live: &Live) -> Arc<str> {
    frame(serde_json::json!({
        "type": "assigned",
        "conversation": live.meta.id.0,
        "site": &*live.key.site,
        "visitor": &*live.key.visitor,
        "seq": live.meta.last_seq,
        "read": live.meta.agent_read,
    }))
}

impl Owner {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn agent_frame(
        &mut self,
        agent: String,
        name: String,
        role: Role,
        session: SessionRef,
        frame_in: AgentFrame,
        now_ms: u64,
        out: &mut Vec<OwnerAction>,
    ) {
        let Some(conversation) = frame_in.conversation() else {
            return;
        };
        let Some(live) = self.live.get_mut(&conversation) else {
            out.push(OwnerAction::Load {
                conversation,
                event: Box::new(OwnerEvent::Agent {
                    agent,
                    name,
                    role,
                    session,
                    frame: frame_in,
                }),
            });
            return;
        };
        let action = match &frame_in {
            AgentFrame::Close { .. } => Action::CloseAssigned,
            AgentFrame::Watch { .. } | AgentFrame::Unwatch { .. } => Action::ReadAnyConversation,
            _ => Action::MessageAssigned,
        };
        if !rbac::allows(role, action) {
            crate::auth::events::access_denied(&agent, role, &format!("{action:?}"));
            out.push(OwnerAction::Send {
                to: session,
                frame: error(
                    "forbidden",
                    &format!(
                        "role {role} may not do this in conversation {}",
                        conversation.0
                    ),
                ),
            });
            return;
        }
        match frame_in {
            AgentFrame::Watch { .. } => return self.watch(conversation, agent, role, session, out),
            AgentFrame::Unwatch { .. } => {
                live.watchers.retain(|s| *s != session);
                out.push(OwnerAction::Send {
                    to: session,
                    frame: frame(serde_json::json!({
                        "type": "unwatched", "conversation": conversation.0,
                    })),
                });
                self.maybe_evict(conversation);
                return;
            }
            _ => {}
        }
        let assigned =
            matches!(&live.meta.state, ConversationState::Assigned { agent: a } if *a == agent);
        if !assigned {
            out.push(OwnerAction::Send {
                to: session,
                frame: error(
                    "not_assigned",
                    &format!("conversation {} is not assigned to you", conversation.0),
                ),
            });
            return;
        }
        // The display name travels with the session: a conversation loaded from storage
        // (which records only the agent id) learns it from its agent's first frame.
        if let Some((_, shown)) = &mut live.agent {
            if *shown != name {
                *shown = name.clone();
            }
        }
        match frame_in {
            AgentFrame::Message { id, text, .. } => out.push(OwnerAction::Store {
                op: Op::Append(NewMessage {
                    conversation,
                    from: Author::Agent,
                    name,
                    text,
                    client_id: Some(id.clone()),
                }),
                completion: Completion::AgentMessage {
                    session,
                    conversation,
                    client_id: id,
                },
            }),
            AgentFrame::Typing { on, .. } => {
                let Some(on) =
                    live.agent_typing
                        .request(on, now_ms, self.config.typing_interval_ms)
                else {
                    return;
                };
                let typing = frame(serde_json::json!({
                    "type": "typing", "conversation": conversation.0, "from": "agent", "on": on,
                }));
                let key = live.key.clone();
                for to in live.followers().filter(|s| **s != session) {
                    out.push(OwnerAction::Send {
                        to: *to,
                        frame: typing.clone(),
                    });
                }
                self.send_visitors(&key, None, &typing, out);
            }
            AgentFrame::Read { seq, .. } => out.push(OwnerAction::Store {
                op: Op::MarkRead {
                    conversation,
                    side: ReadSide::Agent,
                    seq,
                },
                completion: Completion::Read {
                    conversation,
                    side: ReadSide::Agent,
                },
            }),
            AgentFrame::Close { .. } => {
                live.meta.state = ConversationState::Closed;
                out.push(OwnerAction::Store {
                    op: Op::SetState {
                        conversation,
                        state: ConversationState::Closed,
                    },
                    completion: Completion::ClosedBy {
                        conversation,
                        agent,
                    },
                });
            }
            // Accept, transfer and status go to the dispatcher, not here; watch was
            // handled above.
            AgentFrame::Accept { .. }
            | AgentFrame::Transfer { .. }
            | AgentFrame::Status { .. }
            | AgentFrame::Watch { .. }
            | AgentFrame::Unwatch { .. } => {}
        }
    }

    /// A session allowed `ReadAnyConversation` follows a conversation without taking it:
    /// a `watching` frame, the whole history (replay), then live frames until it unwatches
    /// or closes. A closed conversation's history is sent without subscribing. The caller
    /// has checked the role.
    pub(super) fn watch(
        &mut self,
        conversation: ConversationId,
        agent: String,
        role: Role,
        session: SessionRef,
        out: &mut Vec<OwnerAction>,
    ) {
        let Some(live) = self.live.get_mut(&conversation) else {
            return;
        };
        let holding = live.agent_sessions.contains(&session);
        let open = live.meta.state != ConversationState::Closed;
        out.push(OwnerAction::Send {
            to: session,
            frame: watching_frame(live),
        });
        // The conversation's own agent already hears everything.
        if holding {
            return;
        }
        let newly = open && !live.watchers.contains(&session);
        if newly {
            live.watchers.push(session);
            out.push(OwnerAction::Track {
                session,
                conversation,
            });
        }
        if live.meta.last_seq > 0 {
            out.push(OwnerAction::Replay {
                to: vec![session],
                conversation,
                after: 0,
                up_to: live.meta.last_seq,
            });
        }
        // The visitor's indicator is throttled per conversation, on what its followers were
        // last shown: a session that arrives while that is "on" (forwarded before it followed)
        // is shown the same now, else a later "on" is no change and it never hears it. A held
        // "off" still reaches it with the next tick.
        if live.visitor_typing.shown {
            out.push(OwnerAction::Send {
                to: session,
                frame: frame(serde_json::json!({
                    "type": "typing", "conversation": conversation.0, "from": "visitor", "on": true,
                })),
            });
        }
        out.push(OwnerAction::Audit(
            AuditEvent::new("conversation_watched", &agent)
                .target(conversation.0.to_string())
                .detail("role", role.as_str())
                .detail("state", state_name(&live.meta.state)),
        ));
    }

    /// Tells a conversation's watchers its current state.
    pub(super) fn tell_watchers(&self, conversation: ConversationId, out: &mut Vec<OwnerAction>) {
        let Some(live) = self.live.get(&conversation) else {
            return;
        };
        if live.watchers.is_empty() {
            return;
        }
        let note = watching_frame(live);
        for to in &live.watchers {
            out.push(OwnerAction::Send {
                to: *to,
                frame: note.clone(),
            });
        }
    }

    pub(super) fn agent_subscribe(
        &mut self,
        conversation: ConversationId,
        agent: String,
        session: SessionRef,
        out: &mut Vec<OwnerAction>,
    ) {
        let Some(live) = self.live.get_mut(&conversation) else {
            out.push(OwnerAction::Load {
                conversation,
                event: Box::new(OwnerEvent::AgentSubscribe {
                    conversation,
                    agent,
                    session,
                }),
            });
            return;
        };
        if !matches!(&live.meta.state, ConversationState::Assigned { agent: a } if *a == agent) {
            return;
        }
        // A watcher that gets the conversation assigned hears it once, as its agent.
        live.watchers.retain(|s| *s != session);
        if !live.agent_sessions.contains(&session) {
            live.agent_sessions.push(session);
        }
        out.push(OwnerAction::Track {
            session,
            conversation,
        });
        out.push(OwnerAction::Send {
            to: session,
            frame: assigned_to_agent(live),
        });
        // The whole history, so an agent who takes the conversation over (a transfer, a
        // re-queue) or reopens the console sees what came before; `assigned` carries the read
        // mark so the console counts only the messages after it as unread.
        if live.meta.last_seq > 0 {
            out.push(OwnerAction::Replay {
                to: vec![session],
                conversation,
                after: 0,
                up_to: live.meta.last_seq,
            });
        }
        // The visitor's indicator is throttled per conversation, on what its followers were
        // last shown: a session that arrives while that is "on" (forwarded before it followed)
        // is shown the same now, else a later "on" is no change and it never hears it. A held
        // "off" still reaches it with the next tick.
        if live.visitor_typing.shown {
            out.push(OwnerAction::Send {
                to: session,
                frame: frame(serde_json::json!({
                    "type": "typing", "conversation": conversation.0, "from": "visitor", "on": true,
                })),
            });
        }
    }

    pub(super) fn assigned(
        &mut self,
        conversation: ConversationId,
        agent: String,
        agent_name: String,
        sessions: Vec<SessionRef>,
        transfer: bool,
        out: &mut Vec<OwnerAction>,
    ) {
        let Some(live) = self.live.get_mut(&conversation) else {
            out.push(OwnerAction::Load {
                conversation,
                event: Box::new(if transfer {
                    OwnerEvent::Transferred {
                        conversation,
                        to: agent,
                        to_name: agent_name,
                        sessions,
                    }
                } else {
                    OwnerEvent::Assigned {
                        conversation,
                        agent,
                        agent_name,
                        sessions,
                    }
                }),
            });
            return;
        };
        if live.meta.state == ConversationState::Closed {
            out.push(OwnerAction::Dispatch(DispatchEvent::Closed {
                conversation: crate::conversation::dispatch::ConversationId(conversation.0),
            }));
            return;
        }
        if transfer {
            let note = frame(serde_json::json!({
                "type": "transferred", "conversation": conversation.0, "to": &agent,
            }));
            for to in &live.agent_sessions {
                out.push(OwnerAction::Send {
                    to: *to,
                    frame: note.clone(),
                });
            }
        }
        live.agent_sessions.clear();
        live.meta.state = ConversationState::Assigned {
            agent: agent.clone(),
        };
        live.agent = Some((agent.clone(), agent_name.clone()));
        out.push(OwnerAction::Store {
            op: Op::SetState {
                conversation,
                state: ConversationState::Assigned {
                    agent: agent.clone(),
                },
            },
            completion: Completion::StateChanged { conversation },
        });
        let key = live.key.clone();
        let note = frame(serde_json::json!({
            "type": "assigned", "conversation": conversation.0, "agent": &agent_name,
        }));
        self.send_visitors(&key, None, &note, out);
        for session in sessions {
            self.agent_subscribe(conversation, agent.clone(), session, out);
        }
        self.tell_watchers(conversation, out);
    }

    /// Tells the connected visitors of queued conversations that no agent is
    /// online. A conversation not in memory (evicted while its visitor idles)
    /// is found through the visitors' entries, in one pass for all of them;
    /// one whose visitor is not connected needs nothing: a returning visitor's
    /// greeting enqueues it again and the dispatcher answers then.
    pub(super) fn no_agents(&self, conversations: &[ConversationId], out: &mut Vec<OwnerAction>) {
        let note = |conversation: ConversationId| {
            frame(serde_json::json!({"type": "no_agents", "conversation": conversation.0}))
        };
        let mut evicted = Vec::new();
        for &conversation in conversations {
            match self.live.get(&conversation) {
                Some(live) if live.meta.state == ConversationState::Queued => {
                    self.send_visitors(&live.key, None, &note(conversation), out)
                }
                Some(_) => {}
                None => evicted.push(conversation),
            }
        }
        if evicted.is_empty() {
            return;
        }
        for (key, entry) in &self.visitors {
            if entry.sessions.is_empty() {
                continue;
            }
            if let Some(conversation) = entry.conversation.filter(|c| evicted.contains(c)) {
                self.send_visitors(key, None, &note(conversation), out);
            }
        }
    }

    pub(super) fn requeued(&mut self, conversation: ConversationId, out: &mut Vec<OwnerAction>) {
        let Some(live) = self.live.get_mut(&conversation) else {
            out.push(OwnerAction::Load {
                conversation,
                event: Box::new(OwnerEvent::Requeued { conversation }),
            });
            return;
        };
        if live.meta.state == ConversationState::Closed {
            return;
        }
        let note = frame(serde_json::json!({
            "type": "requeued", "conversation": conversation.0,
        }));
        for to in live.agent_sessions.drain(..) {
            out.push(OwnerAction::Send {
                to,
                frame: note.clone(),
            });
        }
        live.agent = None;
        live.meta.state = ConversationState::Queued;
        out.push(OwnerAction::Store {
            op: Op::SetState {
                conversation,
                state: ConversationState::Queued,
            },
            completion: Completion::StateChanged { conversation },
        });
        self.tell_watchers(conversation, out);
    }
}
