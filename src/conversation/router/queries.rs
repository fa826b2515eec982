//! Answers the admin API's questions about this shard's conversations and, on the dispatcher
//! shard, the queue (see [`crate::conversation::query`]). Store reads run on the shard's
//! blocking thread with the router's reader, never on the event loop; the queue is read from
//! the dispatcher's state on the loop (a bounded copy). A question arriving while the shard
//! stops is dropped, so the asker's reply channel closes and it answers 503.

use super::*;
use crate::conversation::query::{self, Answer, Query, Question};
use crate::store::{ReadView, StoreError};

type Reply = futures_channel::oneshot::Sender<Answer>;

impl Router {
    pub(super) fn answer_query(&self, query: Query) {
        let Query { question, reply } = query;
        match question {
            Question::Queue { limit } => {
                let Some(dispatcher) = &self.dispatcher else {
                    tracing::error!(
                        shard = self.shard,
                        "queue asked of a shard that is not the dispatcher"
                    );
                    return;
                };
                let _ = reply.send(Answer::Queue(query::queue(&dispatcher.borrow(), limit)));
            }
            Question::Search(search) => self.read_then(reply, move |view| {
                Answer::Page(view.and_then(|view| query::scan(&view, &search)))
            }),
            Question::Transcript { id, after, limit } => self.read_then(reply, move |view| {
                Answer::Transcript(view.and_then(|view| query::transcript(&view, id, after, limit)))
            }),
        }
    }

    /// Runs `job` on a read view of this shard's store, on the blocking thread, and sends its
    /// answer to `reply`.
    fn read_then(
        &self,
        reply: Reply,
        job: impl FnOnce(Result<ReadView<'_>, StoreError>) -> Answer + Send + 'static,
    ) {
        let reader = self.reader.clone();
        let jobs = self.jobs.clone();
        glommio::spawn_local(async move {
            if let Ok(answer) = jobs.run(move || job(reader.read())).await {
                let _ = reply.send(answer);
            }
        })
        .detach();
    }
}
