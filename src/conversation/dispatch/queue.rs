//! The dispatcher's queue: FIFO order, the place each tracked conversation holds, queue
//! positions and snapshots reported after an event, and `NoAgents` when nobody is present.
//!
//! Invariant: a tracked conversation is queued at most once, and positions are reported only for
//! conversations whose position changed.

use super::*;

impl Dispatcher {
    pub(super) fn track(&mut self, conversation: ConversationId, owner: usize, place: Place) {
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.conversations.insert(
            conversation,
            Conversation {
                owner,
                arrival,
                place,
            },
        );
    }

    pub(super) fn mark_moved_from(&mut self, index: usize) {
        let from = self.positions_dirty_from.map_or(index, |f| f.min(index));
        self.positions_dirty_from = Some(from);
    }

    pub(super) fn note_left_queue(&mut self, conversation: ConversationId) {
        match self
            .pushed_this_event
            .iter()
            .position(|c| *c == conversation)
        {
            Some(i) => {
                self.pushed_this_event.swap_remove(i);
            }
            None => self.removed_earlier = true,
        }
    }

    pub(super) fn queue_push_back(&mut self, conversation: ConversationId, owner: usize) {
        self.mark_moved_from(self.queue.len());
        self.queue
            .push_back(Waiting::new(conversation, owner, self.now_ms));
        self.pushed_this_event.push(conversation);
    }

    pub(super) fn queue_push_front(&mut self, conversation: ConversationId, owner: usize) {
        self.mark_moved_from(0);
        self.queue
            .push_front(Waiting::new(conversation, owner, self.now_ms));
        self.pushed_this_event.push(conversation);
    }

    pub(super) fn queue_pop_front(&mut self) -> Option<Waiting> {
        let waiting = self.queue.pop_front()?;
        self.mark_moved_from(0);
        self.note_left_queue(waiting.conversation);
        Some(waiting)
    }

    /// O(queue): linear search.
    pub(super) fn queue_remove(&mut self, conversation: ConversationId) {
        if let Some(index) = self
            .queue
            .iter()
            .position(|w| w.conversation == conversation)
        {
            self.queue.remove(index);
            self.mark_moved_from(index);
            self.note_left_queue(conversation);
        }
    }

    /// Emits `QueuePositions` for moved conversations and a `QueueSnapshot`
    /// if the queue's content differs from before the event.
    pub(super) fn report_queue_changes(&mut self, out: &mut Vec<DispatchAction>) {
        if let Some(from) = self.positions_dirty_from.take() {
            let from = from.min(self.queue.len());
            let mut updates = Vec::new();
            for (offset, waiting) in self.queue.range_mut(from..).enumerate() {
                let position = from + offset + 1;
                if waiting.reported_position != position {
                    waiting.reported_position = position;
                    updates.push((waiting.conversation, waiting.owner, position));
                }
            }
            if !updates.is_empty() {
                out.push(DispatchAction::QueuePositions { updates });
            }
        }
        // Items pushed during the event are new to the queue, and removals
        // keep the relative order of the rest, so the content is unchanged
        // exactly when nothing older left and nothing pushed stayed.
        let changed = self.removed_earlier || !self.pushed_this_event.is_empty();
        self.removed_earlier = false;
        self.pushed_this_event.clear();
        if changed {
            let sessions: Vec<SessionRef> = self
                .agent_index
                .values()
                .flat_map(|&idx| self.agents[idx].sessions.iter().copied())
                .collect();
            if !sessions.is_empty() {
                out.push(DispatchAction::QueueSnapshot {
                    sessions,
                    queue: self.queue().collect(),
                    waited_ms: self.queue_waits().collect(),
                });
            }
        }
    }

    /// Emits `NoAgents` when nobody is present after the event: for every
    /// queued conversation if the last agent just left, else for those that
    /// entered the queue during the event and are still in it.
    pub(super) fn report_no_agents(&mut self, out: &mut Vec<DispatchAction>) {
        let everyone = std::mem::take(&mut self.last_agent_left);
        let mut entered = std::mem::take(&mut self.entered_this_event);
        if self.present_agents > 0 || self.queue.is_empty() {
            entered.clear();
            self.entered_this_event = entered;
            return;
        }
        let conversations: Vec<(ConversationId, usize)> = if everyone {
            self.queue
                .iter()
                .map(|w| (w.conversation, w.owner))
                .collect()
        } else {
            // One event lets few conversations in (one enqueue, or a tick's
            // re-queued ones in queue order), so the dedup is cheap.
            let mut listed: Vec<(ConversationId, usize)> = Vec::with_capacity(entered.len());
            for &conversation in &entered {
                if let Some(entry) = self.conversations.get(&conversation) {
                    if matches!(entry.place, Place::Queued)
                        && !listed.iter().any(|(c, _)| *c == conversation)
                    {
                        listed.push((conversation, entry.owner));
                    }
                }
            }
            listed
        };
        entered.clear();
        self.entered_this_event = entered;
        if !conversations.is_empty() {
            out.push(DispatchAction::NoAgents { conversations });
        }
    }

    pub(super) fn on_enqueue(&mut self, conversation: ConversationId, owner: usize) {
        // Queued already: its visitor came back (the owner enqueues again on every
        // greeting), so it hears again if nobody is online.
        self.entered_this_event.push(conversation);
        if self.conversations.contains_key(&conversation) {
            return;
        }
        self.track(conversation, owner, Place::Queued);
        self.queue_push_back(conversation, owner);
    }

    pub(super) fn assign_waiting(&mut self, out: &mut Vec<DispatchAction>) {
        while !self.queue.is_empty() {
            let Some(idx) = self.pick_agent() else {
                break;
            };
            let waiting = self.queue_pop_front().expect("queue is not empty");
            self.assign(waiting.conversation, idx, out);
        }
    }
}
