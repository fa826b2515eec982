//! The driver's periodic work: its one-second tick (metrics published, empty conversations
//! expired) and the restore of open conversations from storage at start.

use super::*;

/// The histograms the router records: written only on this shard, published by its tick.
pub(super) struct RouterHistograms {
    pub(super) relay_latency: Recorder,
    pub(super) bot_latency: Recorder,
    pub(super) commit_latency: Recorder,
    pub(super) commit_batch_size: Recorder,
}

impl RouterHistograms {
    pub(super) fn new(metrics: &Metrics, shard: usize) -> RouterHistograms {
        let histograms = metrics.histograms(shard);
        RouterHistograms {
            relay_latency: histograms.recorder(Family::RelayLatency),
            bot_latency: histograms.recorder(Family::BotLatency),
            commit_latency: histograms.recorder(Family::CommitLatency),
            commit_batch_size: histograms.recorder(Family::CommitBatchSize),
        }
    }

    pub(super) fn publish(&mut self) {
        self.relay_latency.publish();
        self.bot_latency.publish();
        self.commit_latency.publish();
        self.commit_batch_size.publish();
    }
}

impl Router {
    /// Publishes what the scrape reads but the hot path does not count: the histograms (see
    /// [`crate::metrics::histogram`]), the storage size and the inference queue depth.
    pub(super) fn publish_metrics(&self) {
        self.histograms.borrow_mut().publish();
        let counters = self.metrics();
        let size = self.reader.size();
        ShardMetrics::set(&counters.storage_used_bytes, size.used_bytes);
        ShardMetrics::set(&counters.storage_map_bytes, size.map_bytes);
        ShardMetrics::set(
            &counters.inference_queue_depth,
            self.inference_queue() as u64,
        );
    }

    /// Finds the open conversations in which no message was ever stored, that no agent
    /// holds and that were idle for `ttl`, and lets the owner delete them (it skips
    /// those someone is connected to).
    pub(super) fn expire_empty_conversations(&self, ttl: Duration) {
        // `updated_ms` is stored wall-clock data: compare it with the wall clock.
        let cutoff = now_ms().saturating_sub(ttl.as_millis() as u64);
        let Some(open) = self.open_conversations() else {
            return;
        };
        let empty: Vec<ConversationId> = open
            .into_iter()
            .filter(|c| {
                c.last_seq == 0
                    && c.updated_ms <= cutoff
                    && !matches!(c.state, crate::store::ConversationState::Assigned { .. })
            })
            .map(|c| c.id)
            .collect();
        if !empty.is_empty() {
            tracing::info!(
                shard = self.shard,
                count = empty.len(),
                "expiring idle empty conversations"
            );
        }
        for conversation in empty {
            self.on_owner(OwnerEvent::ExpireEmpty { conversation });
        }
    }

    /// The shard's open conversations from storage; a read failure is logged and gives `None`.
    pub(super) fn open_conversations(&self) -> Option<Vec<crate::store::Conversation>> {
        match self
            .reader
            .read()
            .and_then(|view| view.open_conversations())
        {
            Ok(open) => Some(open),
            Err(err) => {
                tracing::error!(shard = self.shard, error = %err, "cannot list open conversations");
                None
            }
        }
    }

    pub(super) fn restore(&self) {
        let Some(open) = self.open_conversations() else {
            return;
        };
        let mut restored = 0;
        for conversation in open {
            let assigned = match conversation.state {
                crate::store::ConversationState::Queued => None,
                crate::store::ConversationState::Assigned { agent } => Some(agent),
                _ => continue,
            };
            restored += 1;
            self.send(
                super::super::dispatcher_shard(self.shard_count),
                ShardMessage::Dispatch(DispatchEvent::Restore {
                    conversation: dispatch::ConversationId(conversation.id.0),
                    owner: self.shard,
                    assigned,
                }),
            );
        }
        if restored > 0 {
            tracing::info!(
                shard = self.shard,
                restored,
                "re-queued conversations after restart"
            );
        }
    }
}
