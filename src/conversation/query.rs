//! Reads of stored conversations for the admin API: search, transcript, export and the queue.
//!
//! Conversations live in the store of the shard that owns them, so an API request on one shard
//! asks the others through the mesh ([`Query`], carried by `ShardMessage::Query`): each shard
//! reads its own store on its blocking thread ([`scan`], [`transcript`]) and answers through
//! the query's reply channel; the asking shard merges the pages ([`merge`]). The queue is the
//! dispatcher shard's state, asked the same way. No lock is shared between shards, and
//! nothing here runs on the message path.
//!
//! Paging: a search lists conversations newest id first. `before` (exclusive) is where a page
//! starts; each shard returns its first `limit` matches below it, stopping after the
//! conversation at which it has read [`SCAN_BUDGET`] conversation and message records or
//! gathered `byte_budget` bytes of message text (a conversation is always decided whole, so a
//! page reads at most about twice the budget and always moves on). A shard that stopped early says where (`ShardPage::frontier`: it has
//! reported every match at or above that id), and [`merge`] keeps only what is certain: the
//! matches at or above the highest frontier, the first `limit` of them, with the cursor of
//! the next page. So every page is bounded in memory and work, and paging through never
//! skips or repeats a conversation.
//!
//! Invariant: everything here is a read ([`crate::store::ReadView`], one LMDB read
//! transaction per shard and request); the owner state machine is never consulted, so a
//! query cannot disturb a conversation.

use std::fmt;

use super::dispatch;
use crate::store::{
    Author, Conversation, ConversationId, ConversationState, MessageRecord, ReadView, StoreError,
};

/// Most conversation and message records one shard reads for one search page.
pub const SCAN_BUDGET: usize = 50_000;
/// Most messages of one conversation the agent filter reads looking for the agent's own (in a
/// conversation not assigned to them now).
pub const MAX_AGENT_SCAN: usize = SCAN_BUDGET;
/// Most messages of one conversation a search with messages (the export) carries.
pub const MAX_EXPORT_MESSAGES: usize = 10_000;

/// Where a conversation is in its life, as a search names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Bot,
    Queued,
    Assigned,
    Closed,
}

impl Status {
    pub const NAMES: [&'static str; 4] = ["bot", "queued", "assigned", "closed"];

    pub fn of(state: &ConversationState) -> Status {
        match state {
            ConversationState::Bot => Status::Bot,
            ConversationState::Queued => Status::Queued,
            ConversationState::Assigned { .. } => Status::Assigned,
            ConversationState::Closed => Status::Closed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Bot => "bot",
            Status::Queued => "queued",
            Status::Assigned => "assigned",
            Status::Closed => "closed",
        }
    }

    pub fn parse(name: &str) -> Option<Status> {
        match name {
            "bot" => Some(Status::Bot),
            "queued" => Some(Status::Queued),
            "assigned" => Some(Status::Assigned),
            "closed" => Some(Status::Closed),
            _ => None,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An agent a search looks for: their account name (what an assignment stores) and the
/// display name their messages are signed with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentFilter {
    pub id: String,
    pub display: String,
}

/// What a searched conversation must be; every field set must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub site: Option<String>,
    pub visitor: Option<String>,
    /// Assigned to the agent now, or with a message the agent wrote (a closed conversation
    /// keeps no assignment, only its messages).
    pub agent: Option<AgentFilter>,
    pub status: Option<Status>,
    /// Active at or after this time (unix ms): last changed at or after it.
    pub from_ms: Option<u64>,
    /// Active at or before this time (unix ms): created at or before it. The two are
    /// independent conditions (a `to` before `from` finds the conversations active over the
    /// whole gap between them).
    pub to_ms: Option<u64>,
}

impl Filter {
    /// Whether `conversation`'s metadata alone decides: `Some(true|false)`, or `None` when
    /// only its messages can tell (the agent filter on a conversation not assigned to them).
    fn decide(&self, conversation: &Conversation) -> Option<bool> {
        let fails = self.site.as_deref().is_some_and(|s| s != conversation.site)
            || self
                .visitor
                .as_deref()
                .is_some_and(|v| v != conversation.visitor)
            || self
                .status
                .is_some_and(|s| s != Status::of(&conversation.state))
            || self
                .from_ms
                .is_some_and(|from| conversation.updated_ms < from)
            || self.to_ms.is_some_and(|to| conversation.created_ms > to);
        if fails {
            return Some(false);
        }
        match (&self.agent, &conversation.state) {
            (None, _) => Some(true),
            (Some(agent), ConversationState::Assigned { agent: holder }) if *holder == agent.id => {
                Some(true)
            }
            (Some(_), _) => None,
        }
    }
}

/// A search of one shard's conversations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Search {
    pub filter: Filter,
    /// Only ids below this one (the previous page's cursor).
    pub before: Option<u64>,
    pub limit: usize,
    /// Carry each conversation's messages (the export), at most [`MAX_EXPORT_MESSAGES`] each.
    pub with_messages: bool,
    /// Most bytes of message text one shard puts in its page (the export's memory bound).
    pub byte_budget: usize,
    /// Records one shard reads for the page ([`SCAN_BUDGET`]; smaller in tests).
    pub scan_budget: usize,
}

/// A conversation a search found, with its messages when the search asked for them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub conversation: Conversation,
    pub messages: Vec<MessageRecord>,
    /// More messages than [`MAX_EXPORT_MESSAGES`] were stored; the first ones are carried.
    pub truncated: bool,
}

/// One shard's answer to a [`Search`]: matches newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardPage {
    pub found: Vec<Found>,
    /// `None`: the shard has no more matches below the last one. `Some(id)`: it stopped at
    /// `id` (limit or budget) and has reported every match with an id at or above it.
    pub frontier: Option<u64>,
}

/// Searches one shard's store, stopping after the conversation at which [`SCAN_BUDGET`]
/// records were read (or the limit or byte budget reached).
pub fn scan(view: &ReadView<'_>, search: &Search) -> Result<ShardPage, StoreError> {
    let mut page = ShardPage::default();
    let mut read = 0usize;
    let mut bytes = 0usize;
    for conversation in view.conversations_before(search.before.map(ConversationId))? {
        let conversation = conversation?;
        let id = conversation.id.0;
        read += 1;
        let matched = match search.filter.decide(&conversation) {
            Some(decided) => decided,
            None => {
                let agent = search
                    .filter
                    .agent
                    .as_ref()
                    .expect("undecided by the agent");
                // Decided whole, even past the page's budget, so that every page moves on
                // by at least one conversation: an agent's message among its first
                // MAX_AGENT_SCAN messages.
                let mut wrote = false;
                for message in view.messages_after(conversation.id, 0, MAX_AGENT_SCAN)? {
                    let message = message?;
                    read += 1;
                    if message.from() == Author::Agent
                        && (message.name() == agent.display || message.name() == agent.id)
                    {
                        wrote = true;
                        break;
                    }
                }
                wrote
            }
        };
        if matched {
            let mut found = Found {
                conversation,
                messages: Vec::new(),
                truncated: false,
            };
            if search.with_messages {
                let limit = MAX_EXPORT_MESSAGES + 1;
                for message in view.messages_after(found.conversation.id, 0, limit)? {
                    let message = message?;
                    if found.messages.len() == MAX_EXPORT_MESSAGES {
                        found.truncated = true;
                        break;
                    }
                    bytes += message.text().len() + message.name().len() + 64;
                    found.messages.push(message.to_owned_record());
                }
                read += found.messages.len();
            }
            page.found.push(found);
        }
        let full = page.found.len() >= search.limit
            || read >= search.scan_budget
            || (search.with_messages && bytes >= search.byte_budget);
        if full {
            page.frontier = Some(id);
            break;
        }
    }
    Ok(page)
}

/// The pages of every shard searched, merged: the conversations, newest id first, and the
/// cursor (`before`) of the next page when there may be more.
pub fn merge(pages: Vec<ShardPage>, limit: usize) -> (Vec<Found>, Option<u64>) {
    let cut = pages.iter().filter_map(|page| page.frontier).max();
    let mut found: Vec<Found> = pages
        .into_iter()
        .flat_map(|page| page.found)
        .filter(|f| cut.is_none_or(|cut| f.conversation.id.0 >= cut))
        .collect();
    found.sort_unstable_by_key(|f| std::cmp::Reverse(f.conversation.id));
    let dropped = found.len() > limit;
    found.truncate(limit);
    let next = if dropped {
        found.last().map(|f| f.conversation.id.0)
    } else {
        cut
    };
    (found, next)
}

/// A conversation and a run of its messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transcript {
    pub conversation: Conversation,
    /// Messages with seq above the request's `after`, in order, at most its `limit`.
    pub messages: Vec<MessageRecord>,
}

/// Up to `limit` messages of conversation `id` after seq `after`; `None` when the shard has
/// no such conversation.
pub fn transcript(
    view: &ReadView<'_>,
    id: ConversationId,
    after: u64,
    limit: usize,
) -> Result<Option<Transcript>, StoreError> {
    let Some(conversation) = view.conversation(id)? else {
        return Ok(None);
    };
    let mut messages = Vec::new();
    for message in view.messages_after(id, after, limit)? {
        messages.push(message?.to_owned_record());
    }
    Ok(Some(Transcript {
        conversation,
        messages,
    }))
}

/// A conversation waiting in the queue, as the dispatcher sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub conversation: u64,
    /// 1-based.
    pub position: usize,
    pub waited_ms: u64,
}

/// The dispatcher's queue: the first `limit` waiting conversations and how many wait.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueView {
    pub waiting: Vec<Waiting>,
    pub total: usize,
    /// Agents present (online or away, with a session) and available to take one.
    pub agents_present: bool,
}

/// The first `limit` conversations of the dispatcher's queue.
pub fn queue(dispatcher: &dispatch::Dispatcher, limit: usize) -> QueueView {
    QueueView {
        waiting: dispatcher
            .queue()
            .zip(dispatcher.queue_waits())
            .take(limit)
            .enumerate()
            .map(|(index, (conversation, waited_ms))| Waiting {
                conversation: conversation.0,
                position: index + 1,
                waited_ms,
            })
            .collect(),
        total: dispatcher.queue_len(),
        agents_present: dispatcher.anyone_present(),
    }
}

/// What a shard answers.
#[derive(Debug)]
pub enum Answer {
    Page(Result<ShardPage, StoreError>),
    Transcript(Result<Option<Transcript>, StoreError>),
    Queue(QueueView),
}

/// What one shard is asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Question {
    Search(Search),
    Transcript {
        id: ConversationId,
        after: u64,
        limit: usize,
    },
    /// Only the dispatcher shard answers this.
    Queue {
        limit: usize,
    },
}

/// A question for a shard and where its answer goes (see `ShardMessage::Query`).
pub struct Query {
    pub question: Question,
    pub reply: futures_channel::oneshot::Sender<Answer>,
}

impl fmt::Debug for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Query")
            .field("question", &self.question)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Durability, NewMessage, Op, OpOutcome, ShardStore, StoreOptions};

    fn found(id: u64) -> Found {
        Found {
            conversation: Conversation {
                id: ConversationId(id),
                site: "s".into(),
                visitor: "v".into(),
                state: ConversationState::Closed,
                state_since_ms: 0,
                last_seq: 0,
                created_ms: 0,
                updated_ms: 0,
                visitor_read: 0,
                agent_read: 0,
                failed_bot_turns: 0,
            },
            messages: vec![],
            truncated: false,
        }
    }

    fn page(ids: &[u64], frontier: Option<u64>) -> ShardPage {
        ShardPage {
            found: ids.iter().map(|&id| found(id)).collect(),
            frontier,
        }
    }

    fn ids(found: &[Found]) -> Vec<u64> {
        found.iter().map(|f| f.conversation.id.0).collect()
    }

    #[test]
    fn merge_keeps_only_what_every_shard_has_reported() {
        // Both exhausted: everything, newest first, no cursor.
        let (all, next) = merge(vec![page(&[9, 5], None), page(&[8, 2], None)], 10);
        assert_eq!((ids(&all), next), (vec![9, 8, 5, 2], None));
        // The limit cuts: the cursor is the last id returned.
        let (first, next) = merge(vec![page(&[9, 5], None), page(&[8, 2], None)], 3);
        assert_eq!((ids(&first), next), (vec![9, 8, 5], Some(5)));
        // Shard A stopped at 7 (budget): shard B's 2 is below what A has reported, so it waits
        // for the next page, which starts below 7.
        let (first, next) = merge(vec![page(&[9], Some(7)), page(&[8, 2], None)], 10);
        assert_eq!((ids(&first), next), (vec![9, 8], Some(7)));
        // A budget stop with nothing found yet still moves the cursor.
        let (none, next) = merge(vec![page(&[], Some(40)), page(&[], None)], 10);
        assert_eq!((ids(&none), next), (vec![], Some(40)));
    }

    fn open(store: &mut ShardStore, visitor: &str) -> ConversationId {
        match &store
            .apply(&[Op::Open {
                site: "shop".into(),
                visitor: visitor.into(),
            }])
            .unwrap()[..]
        {
            [OpOutcome::Opened { conversation, .. }] => *conversation,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn scan_filters_and_pages_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            map_size: 16 << 20,
            max_map_size: 16 << 20,
            durability: Durability::None,
            log_bytes: 0,
            apply_interval: std::time::Duration::ZERO,
        };
        let mut store = ShardStore::open(dir.path(), 0, options).unwrap();
        // ann's first conversation (closed, with Alice's message), bob's, ann's second.
        let first = open(&mut store, "ann");
        store
            .apply(&[
                Op::Append(NewMessage {
                    conversation: first,
                    from: Author::Agent,
                    name: "Alice".into(),
                    text: "hello".into(),
                    client_id: None,
                }),
                Op::SetState {
                    conversation: first,
                    state: ConversationState::Closed,
                },
            ])
            .unwrap();
        let bob = open(&mut store, "bob");
        std::thread::sleep(std::time::Duration::from_millis(5));
        let ids_made = vec![first, bob, open(&mut store, "ann")];
        let newest_created = store
            .read()
            .unwrap()
            .conversation(ids_made[2])
            .unwrap()
            .unwrap()
            .created_ms;
        let view = store.read().unwrap();
        let search = |filter: Filter, before, limit| Search {
            filter,
            before,
            limit,
            with_messages: false,
            byte_budget: usize::MAX,
            scan_budget: SCAN_BUDGET,
        };
        let all = scan(&view, &search(Filter::default(), None, 10)).unwrap();
        assert_eq!(all.frontier, None);
        let listed: Vec<ConversationId> =
            all.found.iter().map(|f| f.conversation.id).rev().collect();
        assert_eq!(listed, ids_made, "newest first");
        let ann = Filter {
            visitor: Some("ann".into()),
            ..Filter::default()
        };
        let page = scan(&view, &search(ann.clone(), None, 1)).unwrap();
        assert_eq!(page.found.len(), 1);
        assert_eq!(page.frontier, Some(ids_made[2].0));
        let rest = scan(&view, &search(ann, page.frontier, 1)).unwrap();
        assert_eq!(rest.found[0].conversation.id, ids_made[0]);
        // The agent filter reads the messages of a conversation not assigned to them.
        let alice_filter = || Filter {
            agent: Some(AgentFilter {
                id: "alice".into(),
                display: "Alice".into(),
            }),
            ..Filter::default()
        };
        let page = scan(&view, &search(alice_filter(), None, 10)).unwrap();
        assert_eq!(
            page.found
                .iter()
                .map(|f| f.conversation.id)
                .collect::<Vec<_>>(),
            [ids_made[0]]
        );
        // Time: active up to before the newest was created leaves the other two; closed only
        // the first.
        let early = Filter {
            to_ms: Some(newest_created - 1),
            ..Filter::default()
        };
        let closed = Filter {
            status: Some(Status::Closed),
            ..Filter::default()
        };
        for filter in [early, closed] {
            let page = scan(&view, &search(filter.clone(), None, 10)).unwrap();
            assert_eq!(
                page.found.len(),
                if filter.status.is_some() { 1 } else { 2 }
            );
            assert!(page.found.iter().all(|f| f.conversation.id != ids_made[2]));
        }
        // With messages: the export carries them.
        let mut export = search(Filter::default(), None, 10);
        export.with_messages = true;
        let page = scan(&view, &export).unwrap();
        let first = page.found.last().unwrap();
        assert_eq!(first.messages.len(), 1);
        assert_eq!(first.messages[0].text, "hello");
        let transcript = transcript(&view, ids_made[0], 0, 10).unwrap().unwrap();
        assert_eq!(transcript.messages.len(), 1);
        // A budget of one record: every page decides one conversation (the agent filter reads
        // a whole conversation past the budget) and paging on finds each match once.
        let mut tiny = search(alice_filter(), None, 10);
        tiny.scan_budget = 1;
        let mut pages = 0;
        let mut matched = Vec::new();
        loop {
            let page = scan(&view, &tiny).unwrap();
            let (found, next) = merge(vec![page], 10);
            matched.extend(found.iter().map(|f| f.conversation.id));
            pages += 1;
            match next {
                Some(next) => tiny.before = Some(next),
                None => break,
            }
        }
        // Three conversations, one a page, and a last empty page that finds nothing below.
        assert_eq!((matched, pages), (vec![ids_made[0]], 4));
    }
}
