//! Commit outcomes: what the owner does once storage answered. Acks, fan-out and state changes
//! happen only here, so nobody but the sender hears of a message before it is stored.

use super::*;

/// The conversation an operation writes to (none for `Open`, which creates it).
pub(super) fn op_conversation(op: &Op) -> Option<ConversationId> {
    match op {
        Op::Open { .. } | Op::SetVisitorSecret { .. } => None,
        Op::Append(message) => Some(message.conversation),
        Op::SetState { conversation, .. }
        | Op::DeleteEmpty { conversation }
        | Op::MarkRead { conversation, .. }
        | Op::SetFailedBotTurns { conversation, .. }
        | Op::SetVariant { conversation, .. } => Some(*conversation),
    }
}

impl Owner {
    pub(super) fn committed(
        &mut self,
        completion: Completion,
        op: Op,
        outcome: Result<OpOutcome, CommitFailure>,
        out: &mut Vec<OwnerAction>,
    ) {
        if let Some(live) = op_conversation(&op).and_then(|c| self.live.get_mut(&c)) {
            live.in_flight = live.in_flight.saturating_sub(1);
        }
        match completion {
            Completion::Opened { key } => self.opened(key, outcome, out),
            Completion::Expired { conversation } => {
                if !matches!(outcome, Ok(OpOutcome::Updated)) {
                    return;
                }
                if let Some(live) = self.live.remove(&conversation) {
                    if let Some(entry) = self.visitors.get_mut(&live.key) {
                        if entry.conversation == Some(conversation) && !entry.opening {
                            entry.conversation = None;
                        }
                    }
                }
                out.push(OwnerAction::Dispatch(DispatchEvent::Closed {
                    conversation: crate::conversation::dispatch::ConversationId(conversation.0),
                }));
            }
            Completion::SecretStored { key } => {
                let Some(entry) = self.visitors.get_mut(&key) else {
                    return;
                };
                let stored = matches!(outcome, Ok(OpOutcome::Updated));
                if !stored {
                    // Tried again with the next conversation the visitor opens.
                    entry.secret_stored = false;
                }
                // The conversation waiting for this secret: opened now, or not at all.
                if entry.opening {
                    if stored {
                        out.push(open_op(&key));
                    } else {
                        self.opened(key, outcome, out);
                    }
                }
            }
            Completion::VisitorMessage {
                key,
                session,
                conversation,
                client_id,
            } => {
                let ack = |seq: u64| ack_frame(&client_id, conversation, seq);
                self.message_committed(conversation, session, op, outcome, ack, Some(&key), out);
            }
            Completion::AgentMessage {
                session,
                conversation,
                client_id,
            } => {
                let ack = |seq: u64| ack_frame(&client_id, conversation, seq);
                self.message_committed(conversation, session, op, outcome, ack, None, out);
            }
            Completion::Read { conversation, side } => {
                let Ok(OpOutcome::ReadMarked { watermark }) = outcome else {
                    return;
                };
                let Some(live) = self.live.get_mut(&conversation) else {
                    return;
                };
                let (from, changed) = match side {
                    ReadSide::Visitor => {
                        let changed = watermark > live.meta.visitor_read;
                        live.meta.visitor_read = live.meta.visitor_read.max(watermark);
                        ("visitor", changed)
                    }
                    ReadSide::Agent => {
                        let changed = watermark > live.meta.agent_read;
                        live.meta.agent_read = live.meta.agent_read.max(watermark);
                        ("agent", changed)
                    }
                };
                if !changed {
                    return;
                }
                let note = frame(serde_json::json!({
                    "type": "read", "conversation": conversation.0, "from": from, "seq": watermark,
                }));
                match side {
                    ReadSide::Visitor => {
                        for to in live.followers() {
                            out.push(OwnerAction::Send {
                                to: *to,
                                frame: note.clone(),
                            });
                        }
                    }
                    ReadSide::Agent => {
                        for to in &live.watchers {
                            out.push(OwnerAction::Send {
                                to: *to,
                                frame: note.clone(),
                            });
                        }
                        let key = live.key.clone();
                        self.send_visitors(&key, None, &note, out);
                    }
                }
            }
            Completion::BotMessage { conversation } => {
                self.bot_message_committed(conversation, op, outcome, out)
            }
            Completion::ClosedBy {
                conversation,
                agent,
            } => {
                if matches!(outcome, Ok(OpOutcome::Updated)) {
                    out.push(OwnerAction::Audit(
                        AuditEvent::new("conversation_closed", &agent)
                            .target(conversation.0.to_string()),
                    ));
                } else if outcome.is_err() {
                    // Nothing was stored: the conversation is still open, and still this
                    // agent's (a close is accepted only from its agent). Left `Closed` in
                    // memory, the visitor's next message would open a new conversation,
                    // which storage answers with this same open one, whose pending message
                    // opens again, forever.
                    if let Some(live) = self.live.get_mut(&conversation) {
                        if live.meta.state == ConversationState::Closed {
                            live.meta.state = ConversationState::Assigned { agent };
                        }
                    }
                }
                self.state_committed(conversation, op, outcome, out);
            }
            Completion::StateChanged { conversation } => {
                self.state_committed(conversation, op, outcome, out)
            }
        }
    }

    /// A state change was committed: a close tells everyone and frees the dispatcher's slot.
    pub(super) fn state_committed(
        &mut self,
        conversation: ConversationId,
        op: Op,
        outcome: Result<OpOutcome, CommitFailure>,
        out: &mut Vec<OwnerAction>,
    ) {
        if !matches!(
            op,
            Op::SetState {
                state: ConversationState::Closed,
                ..
            }
        ) {
            return;
        }
        if !matches!(outcome, Ok(OpOutcome::Updated)) {
            return;
        }
        let Some(mut live) = self.live.remove(&conversation) else {
            return;
        };
        let note = frame(serde_json::json!({
            "type": "closed", "conversation": conversation.0,
        }));
        for to in live.followers() {
            out.push(OwnerAction::Send {
                to: *to,
                frame: note.clone(),
            });
        }
        self.send_visitors(&live.key, None, &note, out);
        // Watchers heard `closed`; nothing more happens in this conversation.
        live.watchers.clear();
        out.push(OwnerAction::Dispatch(DispatchEvent::Closed {
            conversation: crate::conversation::dispatch::ConversationId(conversation.0),
        }));
        // The visitor's next message opens a new conversation.
        if let Some(entry) = self.visitors.get_mut(&live.key) {
            if entry.conversation == Some(conversation) && !entry.opening {
                self.live.insert(conversation, live);
            }
        }
    }

    /// Acks a stored message to its sender and fans it out to everyone else.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn message_committed(
        &mut self,
        conversation: ConversationId,
        session: SessionRef,
        op: Op,
        outcome: Result<OpOutcome, CommitFailure>,
        ack: impl Fn(u64) -> Arc<str>,
        visitor_key: Option<&VisitorKey>,
        out: &mut Vec<OwnerAction>,
    ) {
        let (seq, ts_ms) = match outcome {
            Ok(OpOutcome::Stored { seq, ts_ms }) => (seq, ts_ms),
            Ok(OpOutcome::Duplicate { seq }) => {
                out.push(OwnerAction::Send {
                    to: session,
                    frame: ack(seq),
                });
                return;
            }
            Ok(OpOutcome::Rejected(rejection)) => {
                out.push(OwnerAction::Send {
                    to: session,
                    frame: error("rejected", &rejection.to_string()),
                });
                return;
            }
            Ok(other) => {
                out.push(OwnerAction::Send {
                    to: session,
                    frame: error("rejected", &format!("unexpected outcome {other:?}")),
                });
                return;
            }
            Err(err) => {
                out.push(OwnerAction::Send {
                    to: session,
                    frame: error(err.code, &err.message),
                });
                return;
            }
        };
        out.push(OwnerAction::Send {
            to: session,
            frame: ack(seq),
        });
        let Op::Append(message) = op else {
            return;
        };
        let bot_enabled = self.config.bot_enabled;
        // The sender has its ack; its other tabs and the other side get the message.
        let Some(live) = self.fan_out(conversation, seq, ts_ms, &message, Some(session), out)
        else {
            return;
        };
        let key = live.key.clone();
        let bot_turn =
            visitor_key.is_some() && bot_enabled && live.meta.state == ConversationState::Bot;
        if bot_turn {
            // The bot's work counts as in flight: the conversation stays in
            // memory until its verdict is handled.
            live.in_flight += 1;
            out.push(OwnerAction::Bot {
                conversation,
                site: key.site.clone(),
                visitor: key.visitor.clone(),
                text: message.text,
                failed_turns: live.meta.failed_bot_turns,
            });
        }
    }

    /// Applies the bot's verdict on a visitor message: store the variant the turn assigned (if
    /// it did), then its answer, or queue the conversation for a human.
    pub(super) fn bot_verdict(
        &mut self,
        conversation: ConversationId,
        verdict: BotOutcome,
        variant: Option<String>,
        out: &mut Vec<OwnerAction>,
    ) {
        let Some(live) = self.live.get_mut(&conversation) else {
            // Cannot happen while in flight; a conversation loaded again has no
            // pending bot turn to finish.
            return;
        };
        live.in_flight = live.in_flight.saturating_sub(1);
        if let Some(variant) = variant {
            // Queued before the answer: a visitor who saw the bot's answer has its variant
            // stored (the same commit or an earlier one).
            out.push(OwnerAction::Store {
                op: Op::SetVariant {
                    conversation,
                    variant,
                },
                completion: Completion::StateChanged { conversation },
            });
        }
        if live.meta.state != ConversationState::Bot {
            // A human took over (or the conversation closed) meanwhile: the bot stays silent.
            return;
        }
        match verdict {
            BotOutcome::Reply { text, failed_turns } => {
                out.push(OwnerAction::Store {
                    op: Op::Append(NewMessage {
                        conversation,
                        from: Author::Bot,
                        name: "bot".into(),
                        text,
                        client_id: None,
                    }),
                    completion: Completion::BotMessage { conversation },
                });
                if failed_turns != live.meta.failed_bot_turns {
                    live.meta.failed_bot_turns = failed_turns;
                    out.push(OwnerAction::Store {
                        op: Op::SetFailedBotTurns {
                            conversation,
                            count: failed_turns,
                        },
                        completion: Completion::StateChanged { conversation },
                    });
                }
            }
            BotOutcome::Handoff => {
                if live.meta.failed_bot_turns != 0 {
                    live.meta.failed_bot_turns = 0;
                    out.push(OwnerAction::Store {
                        op: Op::SetFailedBotTurns {
                            conversation,
                            count: 0,
                        },
                        completion: Completion::StateChanged { conversation },
                    });
                }
                self.enqueue(conversation, out);
            }
            BotOutcome::Silent => {}
        }
    }

    /// Fans a stored bot answer out to everyone in the conversation.
    pub(super) fn bot_message_committed(
        &mut self,
        conversation: ConversationId,
        op: Op,
        outcome: Result<OpOutcome, CommitFailure>,
        out: &mut Vec<OwnerAction>,
    ) {
        let Ok(OpOutcome::Stored { seq, ts_ms }) = outcome else {
            return;
        };
        if let Op::Append(message) = op {
            self.fan_out(conversation, seq, ts_ms, &message, None, out);
        }
    }

    /// Sends a stored message to every session of the conversation except
    /// `except`, and records its seq as delivered. Returns the conversation.
    pub(super) fn fan_out(
        &mut self,
        conversation: ConversationId,
        seq: u64,
        ts_ms: u64,
        message: &NewMessage,
        except: Option<SessionRef>,
        out: &mut Vec<OwnerAction>,
    ) -> Option<&mut Live> {
        let live = self.live.get_mut(&conversation)?;
        live.meta.last_seq = live.meta.last_seq.max(seq);
        let rendered: Arc<str> = Arc::from(message_frame(
            conversation,
            seq,
            message.from,
            &message.name,
            &message.text,
            ts_ms,
        ));
        // A visitor session still waiting for its hello is left out: its hello carries
        // the conversation's last seq as of its greeting, which includes this message,
        // and its resume replay (from storage) delivers it. Sent here as well, it arrived
        // twice when a visitor reconnected while its previous tab's message was committing.
        let entry = self.visitors.get(&live.key);
        let awaiting = entry
            .map(|entry| entry.awaiting_hello.as_slice())
            .unwrap_or_default();
        let targets = live
            .followers()
            .chain(
                entry
                    .map(|entry| entry.sessions.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .filter(|s| !awaiting.iter().any(|(waiting, _)| waiting == *s)),
            )
            .filter(|s| Some(**s) != except);
        for to in targets {
            out.push(OwnerAction::Send {
                to: *to,
                frame: rendered.clone(),
            });
        }
        Some(live)
    }

    pub(super) fn opened(
        &mut self,
        key: VisitorKey,
        outcome: Result<OpOutcome, CommitFailure>,
        out: &mut Vec<OwnerAction>,
    ) {
        let Some(entry) = self.visitors.get_mut(&key) else {
            return;
        };
        entry.opening = false;
        let conversation = match outcome {
            Ok(OpOutcome::Opened { conversation, .. }) => conversation,
            other => {
                let code = match &other {
                    Err(failure) => failure.code,
                    Ok(_) => "storage_error",
                };
                let message = format!("cannot open the conversation: {other:?}");
                for (session, _) in entry.awaiting_hello.drain(..) {
                    // In place of the hello, so it is not held back.
                    out.push(OwnerAction::Hello {
                        to: session,
                        frame: error(code, &message),
                    });
                }
                entry.pending.clear();
                return;
            }
        };
        entry.conversation = Some(conversation);
        let awaiting = std::mem::take(&mut entry.awaiting_hello);
        let pending = std::mem::take(&mut entry.pending);
        // Sessions already attached to a previous (closed) conversation get a new hello too.
        let reattached: Vec<SessionRef> = entry
            .sessions
            .iter()
            .filter(|s| !awaiting.iter().any(|(a, _)| a == *s))
            .copied()
            .collect();
        if !self.live.contains_key(&conversation) {
            out.push(OwnerAction::Load {
                conversation,
                event: Box::new(OwnerEvent::Greet {
                    key,
                    conversation,
                    awaiting,
                    reattached,
                    pending,
                }),
            });
            return;
        }
        self.greet_all(key, conversation, awaiting, reattached, pending, out);
    }
}
