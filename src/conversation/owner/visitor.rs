//! The visitor side of the owner: a session attaching (its claim checked, or moved to a fresh
//! visitor id), greeted with its `hello` and replay, its frames (message, typing, read, handoff),
//! a conversation opened by its first message, and detaching.

use super::*;

/// The secret issued to `session`, once (its first hello carries it).
pub(super) fn take_issued(entry: &mut VisitorEntry, session: SessionRef) -> Option<Box<str>> {
    let at = entry.issued.iter().position(|(s, _)| *s == session)?;
    Some(entry.issued.swap_remove(at).1)
}

/// The visitor's `hello`: `conversation` is `null` (and `seq` 0) until the
/// visitor's first message or handoff creates one; `secret` is present when a
/// secret was issued to this session.
pub(super) fn hello_frame(
    key: &VisitorKey,
    conversation: Option<ConversationId>,
    seq: u64,
    secret: Option<&str>,
) -> Arc<str> {
    let mut hello = serde_json::json!({
        "type": "hello",
        "visitor": &*key.visitor,
        "site": &*key.site,
        "conversation": conversation.map(|c| c.0),
        "seq": seq,
    });
    if let Some(secret) = secret {
        hello["secret"] = secret.into();
    }
    frame(hello)
}

impl Owner {
    pub(super) fn visitor_attach(
        &mut self,
        key: VisitorKey,
        resume: Option<u64>,
        session: SessionRef,
        credentials: Box<Credentials>,
        stored: Option<Box<StoredVisitor>>,
        out: &mut Vec<OwnerAction>,
    ) {
        let presented_ok = |hash: Option<[u8; 32]>| {
            credentials.verified
                || matches!((hash, credentials.secret_hash),
                    (Some(stored), Some(presented)) if crate::conversation::identity::hashes_match(&stored, &presented))
        };
        let (key, issue) = if let Some(entry) = self.visitors.get(&key) {
            // Someone is connected as this visitor, or it is being opened.
            if presented_ok(entry.secret_hash) {
                (key, false)
            } else {
                (self.move_to_fresh(&key, session, &credentials), true)
            }
        } else {
            let Some(stored) = stored else {
                out.push(OwnerAction::LoadVisitor {
                    key: key.clone(),
                    event: Box::new(OwnerEvent::VisitorAttach {
                        key,
                        resume,
                        session,
                        credentials,
                        stored: None,
                    }),
                });
                return;
            };
            let StoredVisitor {
                secret_hash: stored_hash,
                conversation: stored_conversation,
            } = *stored;
            match (stored_hash, stored_conversation) {
                // Nothing is stored under this id: it becomes this visitor's, with a new secret.
                (None, None) => {
                    self.visitors.insert(
                        key.clone(),
                        VisitorEntry {
                            secret_hash: Some(credentials.fresh.secret_hash),
                            ..VisitorEntry::default()
                        },
                    );
                    (key, true)
                }
                (hash, conversation) if presented_ok(hash) => {
                    self.visitors.insert(
                        key.clone(),
                        VisitorEntry {
                            conversation,
                            secret_hash: hash,
                            secret_stored: hash.is_some(),
                            ..VisitorEntry::default()
                        },
                    );
                    (key, false)
                }
                _ => (self.move_to_fresh(&key, session, &credentials), true),
            }
        };
        let entry = self.visitors.get_mut(&key).expect("entry made above");
        if !entry.sessions.contains(&session) {
            entry.sessions.push(session);
        }
        if issue {
            entry.issued.push((session, credentials.fresh.secret));
        }
        match entry.conversation {
            Some(conversation) if !entry.opening => {
                if self.live.contains_key(&conversation) {
                    self.greet(conversation, session, resume, out);
                } else {
                    out.push(OwnerAction::Load {
                        conversation,
                        event: Box::new(OwnerEvent::Greet {
                            key,
                            conversation,
                            awaiting: vec![(session, resume)],
                            reattached: Vec::new(),
                            pending: Vec::new(),
                        }),
                    });
                }
            }
            // No conversation yet: it is created by the first message or handoff.
            None if !entry.opening => {
                let secret = take_issued(entry, session);
                out.push(OwnerAction::Hello {
                    to: session,
                    frame: hello_frame(&key, None, 0, secret.as_deref()),
                });
            }
            // Its conversation is being opened: greeted once it is.
            _ => entry.awaiting_hello.push((session, resume)),
        }
    }

    /// Moves a session whose claim on `claimed` was refused to the fresh visitor
    /// drawn for it, and returns that visitor's key.
    pub(super) fn move_to_fresh(
        &mut self,
        claimed: &VisitorKey,
        session: SessionRef,
        credentials: &Credentials,
    ) -> VisitorKey {
        let key = VisitorKey {
            site: claimed.site.clone(),
            visitor: credentials.fresh.visitor.clone(),
        };
        self.moved.insert(session, key.clone());
        self.visitors
            .entry(key.clone())
            .or_insert_with(|| VisitorEntry {
                secret_hash: Some(credentials.fresh.secret_hash),
                ..VisitorEntry::default()
            });
        key
    }

    /// Opens a conversation for the visitor (its first, or a new one after a
    /// close); `frame` runs once it is open. The visitor's secret is stored
    /// first if it is not yet, and the conversation is opened only once that
    /// commit succeeded: queued together, the two ops may land in different
    /// group commits (the first batch full at `max_batch`), and an open that
    /// commits while the secret's batch failed leaves a conversation nobody
    /// can reattach to (a stored conversation without a secret is refused to
    /// every unverified connection, its own visitor's included).
    pub(super) fn open_conversation(
        &mut self,
        key: &VisitorKey,
        session: SessionRef,
        frame_in: VisitorFrame,
        out: &mut Vec<OwnerAction>,
    ) {
        let Some(entry) = self.visitors.get_mut(key) else {
            return;
        };
        entry.conversation = None;
        entry.opening = true;
        entry.pending.push((session, frame_in));
        if let (Some(secret_hash), false) = (entry.secret_hash, entry.secret_stored) {
            entry.secret_stored = true;
            out.push(OwnerAction::Store {
                op: Op::SetVisitorSecret {
                    site: key.site.to_string(),
                    visitor: key.visitor.to_string(),
                    secret_hash,
                },
                completion: Completion::SecretStored { key: key.clone() },
            });
            // The open follows once the secret is committed (see `committed`).
            return;
        }
        out.push(open_op(key));
    }

    /// Sends a session its hello, the messages it missed and the state.
    pub(super) fn greet(
        &mut self,
        conversation: ConversationId,
        session: SessionRef,
        resume: Option<u64>,
        out: &mut Vec<OwnerAction>,
    ) {
        let Some(live) = self.live.get(&conversation) else {
            return;
        };
        let last = live.meta.last_seq;
        let secret = self
            .visitors
            .get_mut(&live.key)
            .and_then(|entry| take_issued(entry, session));
        out.push(OwnerAction::Hello {
            to: session,
            frame: hello_frame(&live.key, Some(conversation), last, secret.as_deref()),
        });
        if let Some(after) = resume {
            if after < last {
                out.push(OwnerAction::Replay {
                    to: vec![session],
                    conversation,
                    after,
                    up_to: last,
                });
            }
        }
        match &live.meta.state {
            ConversationState::Assigned { .. } => {
                let name = live.agent.as_ref().map_or("", |(_, name)| name.as_str());
                out.push(OwnerAction::Send {
                    to: session,
                    frame: frame(serde_json::json!({
                        "type": "assigned",
                        "conversation": conversation.0,
                        "agent": name,
                    })),
                });
            }
            ConversationState::Queued => out.push(OwnerAction::Dispatch(DispatchEvent::Enqueue {
                // Idempotent: makes the dispatcher resend this conversation's position.
                conversation: crate::conversation::dispatch::ConversationId(conversation.0),
                owner: self.config.shard,
            })),
            _ => {}
        }
    }

    pub(super) fn visitor_detach(&mut self, key: &VisitorKey, session: SessionRef) {
        let Some(entry) = self.visitors.get_mut(key) else {
            return;
        };
        entry.sessions.retain(|s| *s != session);
        entry.awaiting_hello.retain(|(s, _)| *s != session);
        entry.issued.retain(|(s, _)| *s != session);
        if entry.sessions.is_empty() && !entry.opening {
            let conversation = entry.conversation;
            self.visitors.remove(key);
            if let Some(conversation) = conversation {
                self.maybe_evict(conversation);
            }
        }
    }

    pub(super) fn visitor_frame(
        &mut self,
        key: VisitorKey,
        session: SessionRef,
        frame_in: VisitorFrame,
        now_ms: u64,
        out: &mut Vec<OwnerAction>,
    ) {
        let Some(entry) = self.visitors.get_mut(&key) else {
            // The session detached (or never attached) before its frame arrived.
            return;
        };
        let conversation = match entry.conversation {
            Some(conversation) if !entry.opening => conversation,
            None if !entry.opening => {
                // A first message or handoff creates the conversation; typing
                // and read have nobody to tell yet.
                if matches!(
                    frame_in,
                    VisitorFrame::Message { .. } | VisitorFrame::Handoff {}
                ) {
                    self.open_conversation(&key, session, frame_in, out);
                }
                return;
            }
            _ if entry.pending.len() >= self.config.max_opening_frames => {
                // The conversation is still being stored and this visitor keeps sending: refuse
                // rather than queue without bound. A message is re-sent with the same id.
                let frame = match &frame_in {
                    VisitorFrame::Message { id, .. } => Arc::from(shed::overloaded_frame(
                        id,
                        RetryAfter {
                            ms: OPENING_RETRY_MS,
                        },
                    )),
                    _ => error(
                        "overloaded",
                        "too many frames while the conversation opens; retry later",
                    ),
                };
                out.push(OwnerAction::Send { to: session, frame });
                return;
            }
            _ => {
                entry.pending.push((session, frame_in));
                return;
            }
        };
        let Some(live) = self.live.get_mut(&conversation) else {
            out.push(OwnerAction::Load {
                conversation,
                event: Box::new(OwnerEvent::Visitor {
                    key,
                    session,
                    frame: frame_in,
                }),
            });
            return;
        };
        let closed = live.meta.state == ConversationState::Closed;
        match frame_in {
            VisitorFrame::Message { id, text } => {
                if closed {
                    // The visitor writes again after a close: a new conversation.
                    self.open_conversation(&key, session, VisitorFrame::Message { id, text }, out);
                    return;
                }
                out.push(OwnerAction::Store {
                    op: Op::Append(NewMessage {
                        conversation,
                        from: Author::Visitor,
                        name: "visitor".into(),
                        text,
                        client_id: Some(id.clone()),
                    }),
                    completion: Completion::VisitorMessage {
                        key: key.clone(),
                        session,
                        conversation,
                        client_id: id,
                    },
                });
                if live.meta.state == ConversationState::Bot && !self.config.bot_enabled {
                    self.enqueue(conversation, out);
                }
            }
            VisitorFrame::Typing { on } => {
                if closed {
                    return;
                }
                let Some(on) =
                    live.visitor_typing
                        .request(on, now_ms, self.config.typing_interval_ms)
                else {
                    return;
                };
                let typing = frame(serde_json::json!({
                    "type": "typing", "conversation": conversation.0, "from": "visitor", "on": on,
                }));
                for to in live.followers() {
                    out.push(OwnerAction::Send {
                        to: *to,
                        frame: typing.clone(),
                    });
                }
            }
            VisitorFrame::Read { seq } => out.push(OwnerAction::Store {
                op: Op::MarkRead {
                    conversation,
                    side: ReadSide::Visitor,
                    seq,
                },
                completion: Completion::Read {
                    conversation,
                    side: ReadSide::Visitor,
                },
            }),
            VisitorFrame::Handoff {} => match live.meta.state {
                ConversationState::Bot => self.enqueue(conversation, out),
                ConversationState::Closed => out.push(OwnerAction::Send {
                    to: session,
                    frame: error("conversation_closed", "this conversation is closed"),
                }),
                // Already waiting for or talking to a human.
                _ => {}
            },
        }
    }

    /// Deletes an empty, abandoned conversation (see [`OwnerEvent::ExpireEmpty`]).
    pub(super) fn expire_empty(
        &mut self,
        conversation: ConversationId,
        out: &mut Vec<OwnerAction>,
    ) {
        let Some(live) = self.live.get(&conversation) else {
            out.push(OwnerAction::Load {
                conversation,
                event: Box::new(OwnerEvent::ExpireEmpty { conversation }),
            });
            return;
        };
        let someone_connected = !live.agent_sessions.is_empty()
            || !live.watchers.is_empty()
            || self.visitors.get(&live.key).is_some_and(|entry| {
                entry.conversation == Some(conversation) && !entry.sessions.is_empty()
            });
        let abandoned = live.meta.last_seq == 0
            && live.in_flight == 0
            && matches!(
                live.meta.state,
                ConversationState::Bot | ConversationState::Queued
            );
        if someone_connected || !abandoned {
            return;
        }
        out.push(OwnerAction::Store {
            op: Op::DeleteEmpty { conversation },
            completion: Completion::Expired { conversation },
        });
    }

    /// Moves a conversation to the queue (once).
    pub(super) fn enqueue(&mut self, conversation: ConversationId, out: &mut Vec<OwnerAction>) {
        let Some(live) = self.live.get_mut(&conversation) else {
            return;
        };
        if live.meta.state != ConversationState::Bot {
            return;
        }
        live.meta.state = ConversationState::Queued;
        out.push(OwnerAction::Store {
            op: Op::SetState {
                conversation,
                state: ConversationState::Queued,
            },
            completion: Completion::StateChanged { conversation },
        });
        out.push(OwnerAction::Dispatch(DispatchEvent::Enqueue {
            conversation: crate::conversation::dispatch::ConversationId(conversation.0),
            owner: self.config.shard,
        }));
    }

    pub(super) fn greet_all(
        &mut self,
        key: VisitorKey,
        conversation: ConversationId,
        awaiting: Vec<(SessionRef, Option<u64>)>,
        reattached: Vec<SessionRef>,
        pending: Vec<(SessionRef, VisitorFrame)>,
        out: &mut Vec<OwnerAction>,
    ) {
        for (session, resume) in awaiting {
            self.greet(conversation, session, resume, out);
        }
        for session in reattached {
            self.greet(conversation, session, None, out);
        }
        for (session, frame_in) in pending {
            self.visitor_frame(key.clone(), session, frame_in, 0, out);
        }
        // Every session left while the conversation was opened: nothing keeps the entry.
        if self
            .visitors
            .get(&key)
            .is_some_and(|entry| entry.sessions.is_empty() && !entry.opening)
        {
            self.visitors.remove(&key);
            self.maybe_evict(conversation);
        }
    }

    /// Sends `frame` to every connected session of a visitor except `except`.
    pub(super) fn send_visitors(
        &self,
        key: &VisitorKey,
        except: Option<SessionRef>,
        frame: &Arc<str>,
        out: &mut Vec<OwnerAction>,
    ) {
        if let Some(entry) = self.visitors.get(key) {
            for to in entry.sessions.iter().filter(|s| Some(**s) != except) {
                out.push(OwnerAction::Send {
                    to: *to,
                    frame: frame.clone(),
                });
            }
        }
    }
}
