//! The dispatcher's agents: sessions attaching and leaving, status, presence and its grace timer,
//! and the choice of the agent a queued conversation goes to.
//!
//! Invariant: an assignment never takes an agent above its `max_open`.

use super::*;

impl Dispatcher {
    pub(super) fn on_attached(
        &mut self,
        agent: AgentId,
        name: String,
        max_open: u32,
        session: SessionRef,
        now_ms: u64,
        out: &mut Vec<DispatchAction>,
    ) {
        let idx = self.agent_or_placeholder(agent);
        let entry = &mut self.agents[idx];
        let was_present = entry.present();
        entry.name = name;
        entry.max_open = Some(max_open);
        if !entry.sessions.contains(&session) {
            entry.sessions.push(session);
        }
        self.presence_changed(idx, was_present, now_ms);
        let entry = &self.agents[idx];
        out.push(DispatchAction::AgentHello {
            session,
            conversations: entry.open.clone(),
            queue: self.queue().collect(),
            waited_ms: self.queue_waits().collect(),
            status: entry.status,
        });
    }

    pub(super) fn on_detached(&mut self, agent: &str, session: SessionRef, now_ms: u64) {
        let Some(&idx) = self.agent_index.get(agent) else {
            return;
        };
        let entry = &mut self.agents[idx];
        let was_present = entry.present();
        entry.sessions.retain(|s| *s != session);
        self.presence_changed(idx, was_present, now_ms);
    }

    pub(super) fn on_status(&mut self, agent: &str, status: AgentStatus, now_ms: u64) {
        let Some(&idx) = self.agent_index.get(agent) else {
            return;
        };
        let entry = &mut self.agents[idx];
        let was_present = entry.present();
        entry.status = status;
        self.presence_changed(idx, was_present, now_ms);
    }

    /// The available agent with the fewest open conversations, then the one
    /// assigned least recently, then the smallest id.
    pub(super) fn pick_agent(&self) -> Option<usize> {
        self.agents
            .iter()
            .enumerate()
            .filter(|(_, agent)| agent.present() && agent.has_room())
            .min_by(|(_, a), (_, b)| {
                a.open
                    .len()
                    .cmp(&b.open.len())
                    .then(a.last_assigned.cmp(&b.last_assigned))
                    .then_with(|| a.id.cmp(&b.id))
            })
            .map(|(idx, _)| idx)
    }

    /// Gives a conversation that has already left the queue to an agent.
    pub(super) fn assign(
        &mut self,
        conversation: ConversationId,
        idx: usize,
        out: &mut Vec<DispatchAction>,
    ) {
        let entry = self
            .conversations
            .get_mut(&conversation)
            .expect("queued conversations are tracked");
        entry.place = Place::Assigned { agent: idx };
        self.assignments += 1;
        let agent = &mut self.agents[idx];
        agent.open.push(conversation);
        agent.last_assigned = self.assignments;
        out.push(DispatchAction::Assigned {
            conversation,
            owner: entry.owner,
            agent: agent.id.clone(),
            agent_name: agent.name.clone(),
            sessions: agent.sessions.clone(),
        });
    }

    // Agents.

    /// The agent's index, creating an entry (no sessions, cap unknown, status
    /// Online) for an agent seen for the first time.
    pub(super) fn agent_or_placeholder(&mut self, agent: AgentId) -> usize {
        if let Some(&idx) = self.agent_index.get(&agent) {
            return idx;
        }
        let idx = self.agents.len();
        self.agents.push(Agent {
            id: agent.clone(),
            name: agent.clone(),
            max_open: None,
            status: AgentStatus::Online,
            sessions: Vec::new(),
            open: Vec::new(),
            last_assigned: 0,
            grace_deadline: None,
        });
        self.agent_index.insert(agent, idx);
        idx
    }

    pub(super) fn attached_agent(
        &self,
        agent: &str,
        session: SessionRef,
    ) -> Result<usize, Rejection> {
        let Some(&idx) = self.agent_index.get(agent) else {
            return Err(Rejection::UnknownAgent {
                agent: agent.to_owned(),
            });
        };
        if !self.agents[idx].sessions.contains(&session) {
            return Err(Rejection::NotAttached {
                agent: agent.to_owned(),
            });
        }
        Ok(idx)
    }

    /// Starts or cancels the grace period after the agent's presence may
    /// have changed.
    pub(super) fn presence_changed(&mut self, idx: usize, was_present: bool, now_ms: u64) {
        let agent = &mut self.agents[idx];
        match (was_present, agent.present()) {
            (true, false) => {
                agent.grace_deadline = Some(now_ms.saturating_add(self.config.agent_grace_ms));
                self.present_agents -= 1;
                if self.present_agents == 0 {
                    self.last_agent_left = true;
                }
            }
            (false, true) => {
                agent.grace_deadline = None;
                self.present_agents += 1;
            }
            _ => {}
        }
    }

    // Queue bookkeeping: every change goes through these so that positions
    // and snapshots are reported exactly.

    pub(super) fn on_tick(&mut self, now_ms: u64, out: &mut Vec<DispatchAction>) {
        // (arrival, conversation, agent index) of every conversation to re-queue.
        let mut expired = Vec::new();
        for (idx, agent) in self.agents.iter_mut().enumerate() {
            if agent
                .grace_deadline
                .is_some_and(|deadline| now_ms >= deadline)
            {
                agent.grace_deadline = None;
                for conversation in agent.open.drain(..) {
                    let arrival = self.conversations[&conversation].arrival;
                    expired.push((arrival, conversation, idx));
                }
            }
        }
        expired.sort_unstable_by_key(|&(arrival, _, _)| arrival);
        for &(_, conversation, idx) in &expired {
            let entry = self
                .conversations
                .get_mut(&conversation)
                .expect("open conversations are tracked");
            entry.place = Place::Queued;
            let agent = &self.agents[idx];
            out.push(DispatchAction::Requeued {
                conversation,
                owner: entry.owner,
                from_agent: agent.id.clone(),
                sessions: agent.sessions.clone(),
            });
        }
        for &(_, conversation, _) in expired.iter().rev() {
            let owner = self.conversations[&conversation].owner;
            self.queue_push_front(conversation, owner);
        }
        self.entered_this_event
            .extend(expired.iter().map(|&(_, conversation, _)| conversation));
    }

    // Assignment.
}
