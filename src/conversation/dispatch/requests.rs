//! What agents ask of the dispatcher (accept, transfer) and what owners tell it (a conversation
//! closed, assignments restored at start), with the rules that refuse a request.

use super::*;

fn rejected(session: SessionRef, rejection: &Rejection) -> DispatchAction {
    DispatchAction::Rejected {
        session,
        code: rejection.code(),
        message: rejection.to_string(),
    }
}

fn at_capacity(agent: &Agent) -> Rejection {
    Rejection::AtCapacity {
        agent: agent.id.clone(),
        open: agent.open.len(),
        max_open: agent.max_open.unwrap_or(0),
    }
}

impl Dispatcher {
    pub(super) fn on_accept(
        &mut self,
        agent: &str,
        session: SessionRef,
        conversation: ConversationId,
        out: &mut Vec<DispatchAction>,
    ) {
        match self.check_accept(agent, session, conversation) {
            Err(rejection) => out.push(rejected(session, &rejection)),
            Ok(idx) => {
                self.queue_remove(conversation);
                self.assign(conversation, idx, out);
            }
        }
    }

    pub(super) fn check_accept(
        &self,
        agent: &str,
        session: SessionRef,
        conversation: ConversationId,
    ) -> Result<usize, Rejection> {
        let idx = self.attached_agent(agent, session)?;
        let entry = &self.agents[idx];
        if !entry.present() {
            return Err(Rejection::AgentOffline {
                agent: entry.id.clone(),
            });
        }
        let reason = match self.conversations.get(&conversation).map(|c| c.place) {
            Some(Place::Queued) => None,
            Some(Place::Assigned { agent }) if agent == idx => {
                Some("it is already assigned to you")
            }
            Some(Place::Assigned { .. }) => Some("it is already assigned to another agent"),
            None => Some("it is not waiting for an agent"),
        };
        if let Some(reason) = reason {
            return Err(Rejection::NotQueued {
                conversation,
                reason,
            });
        }
        if !entry.has_room() {
            return Err(at_capacity(entry));
        }
        Ok(idx)
    }

    pub(super) fn on_transfer(
        &mut self,
        from: &str,
        role: Role,
        session: SessionRef,
        conversation: ConversationId,
        to: &str,
        out: &mut Vec<DispatchAction>,
    ) {
        let (from_idx, to_idx) = match self.check_transfer(from, role, session, conversation, to) {
            Ok(pair) => pair,
            Err(rejection) => {
                out.push(rejected(session, &rejection));
                return;
            }
        };
        let owner = {
            let entry = self
                .conversations
                .get_mut(&conversation)
                .expect("checked: conversation is assigned");
            entry.place = Place::Assigned { agent: to_idx };
            entry.owner
        };
        self.agents[from_idx].open.retain(|c| *c != conversation);
        self.assignments += 1;
        let target = &mut self.agents[to_idx];
        target.open.push(conversation);
        target.last_assigned = self.assignments;
        let (target, source) = (&self.agents[to_idx], &self.agents[from_idx]);
        out.push(DispatchAction::Transferred {
            conversation,
            owner,
            from: source.id.clone(),
            to: target.id.clone(),
            to_name: target.name.clone(),
            sessions: target.sessions.clone(),
            from_sessions: source.sessions.clone(),
        });
    }

    /// Returns the index of the conversation's current agent (the requester, or for a
    /// `TransferAny` role whoever holds it) and of the target.
    pub(super) fn check_transfer(
        &self,
        from: &str,
        role: Role,
        session: SessionRef,
        conversation: ConversationId,
        to: &str,
    ) -> Result<(usize, usize), Rejection> {
        let requester = self.attached_agent(from, session)?;
        let from_idx = match self.conversations.get(&conversation).map(|c| c.place) {
            Some(Place::Assigned { agent })
                if agent == requester && rbac::allows(role, Action::TransferOwn) =>
            {
                agent
            }
            Some(Place::Assigned { agent }) if rbac::allows(role, Action::TransferAny) => agent,
            _ => {
                return Err(Rejection::NotAssigned {
                    conversation,
                    agent: from.to_owned(),
                })
            }
        };
        let Some(&to_idx) = self.agent_index.get(to) else {
            return Err(Rejection::UnknownAgent {
                agent: to.to_owned(),
            });
        };
        let target = &self.agents[to_idx];
        if to_idx == from_idx {
            return Err(Rejection::SameAgent {
                conversation,
                agent: target.id.clone(),
            });
        }
        if !target.present() {
            return Err(Rejection::AgentOffline {
                agent: target.id.clone(),
            });
        }
        if !target.has_room() {
            return Err(at_capacity(target));
        }
        Ok((from_idx, to_idx))
    }

    pub(super) fn on_closed(&mut self, conversation: ConversationId) {
        let Some(entry) = self.conversations.remove(&conversation) else {
            return;
        };
        match entry.place {
            Place::Queued => self.queue_remove(conversation),
            Place::Assigned { agent } => self.agents[agent].open.retain(|c| *c != conversation),
        }
    }

    pub(super) fn on_restore(
        &mut self,
        conversation: ConversationId,
        owner: usize,
        assigned: Option<AgentId>,
        now_ms: u64,
    ) {
        if self.conversations.contains_key(&conversation) {
            return;
        }
        match assigned {
            None => {
                self.track(conversation, owner, Place::Queued);
                self.queue_push_back(conversation, owner);
            }
            Some(agent) => {
                let idx = self.agent_or_placeholder(agent);
                self.track(conversation, owner, Place::Assigned { agent: idx });
                let entry = &mut self.agents[idx];
                entry.open.push(conversation);
                if !entry.present() && entry.grace_deadline.is_none() {
                    entry.grace_deadline = Some(now_ms.saturating_add(self.config.agent_grace_ms));
                }
            }
        }
    }
}
