//! Read-only views of a shard store: zero-copy message replay and metadata lookups.
//!
//! Invariants:
//! - A [`ReadView`] is one LMDB read transaction: everything read through it is one
//!   consistent snapshot, and the `&ArchivedMessageRecord`s it hands out point straight
//!   into the memory-mapped pages, valid for the life of the view.
//! - A view also reads the store's acked writes not yet in LMDB (see `overlay`), taken before
//!   its transaction began: what it shows is what was acked by then.
//! - Every record is validated with bytecheck (`rkyv::access`) before it is handed out,
//!   so a damaged file yields [`StoreError::Corrupt`], never undefined behaviour. The cost
//!   is measured in `examples/store_bench.rs` (see the module docs of `store`).

use std::ops::Bound;
use std::sync::Arc;

use heed::types::Bytes;
use heed::{RoRange, RoRevRange, RoTxn, WithoutTls};
use rkyv::rancor;

use super::error::StoreError;
use super::keys::{self, MAX_SITE_BYTES, MAX_VISITOR_BYTES};
use super::overlay::{Merged, Overlay, OverlayRange};
use super::records::{ArchivedConversation, ArchivedMessageRecord, Conversation, ConversationId};
use super::resize_gate::ReadPass;
use super::shard_store::{corrupt, Tables};
use super::wal::redo::RedoTable;

/// A consistent read-only snapshot of a shard store.
pub struct ReadView<'s> {
    txn: RoTxn<'s, WithoutTls>,
    tables: &'s Tables,
    /// Acked writes not in `txn`'s snapshot (see `overlay`), if any.
    overlay: Option<Arc<Overlay>>,
    /// Keeps the map from being remapped while `txn` lives; declared after `txn` so it is
    /// released after the transaction ends (see `resize_gate`).
    _pass: ReadPass<'s>,
}

impl<'s> ReadView<'s> {
    /// `pass` and `overlay` must have been taken before `txn` began.
    pub(crate) fn new(
        pass: ReadPass<'s>,
        overlay: Option<Arc<Overlay>>,
        txn: RoTxn<'s, WithoutTls>,
        tables: &'s Tables,
    ) -> Self {
        ReadView {
            txn,
            tables,
            overlay,
            _pass: pass,
        }
    }

    /// The value of `key` in `table`: its pending write if it has one, else LMDB's.
    fn get(&self, table: RedoTable, key: &[u8]) -> Result<Option<&[u8]>, StoreError> {
        if let Some(pending) = self.overlay.as_deref().and_then(|o| o.get(table, key)) {
            return Ok(pending);
        }
        Ok(self.tables.of(table).get(&self.txn, key)?)
    }

    /// The pending writes of `table` in `range` (none without an overlay).
    fn pending(
        &self,
        table: RedoTable,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        descending: bool,
    ) -> OverlayRange<'_> {
        match &self.overlay {
            Some(overlay) => overlay.range(table, range, descending),
            None => OverlayRange::empty(),
        }
    }

    /// The metadata of a conversation.
    pub fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>, StoreError> {
        let key = keys::conversation_key(id);
        match self.get(RedoTable::Conversations, &key)? {
            Some(bytes) => decode_conversation(&key, bytes).map(Some),
            None => Ok(None),
        }
    }

    /// The seq of a conversation's newest message (0 if none), `None` if it does not exist.
    pub fn last_seq(&self, id: ConversationId) -> Result<Option<u64>, StoreError> {
        let key = keys::conversation_key(id);
        match self.get(RedoTable::Conversations, &key)? {
            Some(bytes) => Ok(Some(access_conversation(&key, bytes)?.last_seq.to_native())),
            None => Ok(None),
        }
    }

    /// The open conversation of a visitor of a site. Ids too long to have been stored
    /// simply have none.
    pub fn conversation_of_visitor(
        &self,
        site: &str,
        visitor: &str,
    ) -> Result<Option<ConversationId>, StoreError> {
        if site.len() > MAX_SITE_BYTES || visitor.len() > MAX_VISITOR_BYTES {
            return Ok(None);
        }
        let key = keys::visitor_key(site, visitor);
        match self.get(RedoTable::Visitors, key.as_bytes())? {
            Some(bytes) => keys::decode_u64_value(bytes)
                .map(|id| Some(ConversationId(id)))
                .ok_or_else(|| corrupt("visitors", key.as_bytes(), "bad id")),
            None => Ok(None),
        }
    }

    /// The SHA-256 of a visitor's secret, if one was stored (see
    /// [`Op::SetVisitorSecret`](super::Op::SetVisitorSecret)).
    pub fn visitor_secret(
        &self,
        site: &str,
        visitor: &str,
    ) -> Result<Option<[u8; 32]>, StoreError> {
        if site.len() > MAX_SITE_BYTES || visitor.len() > MAX_VISITOR_BYTES {
            return Ok(None);
        }
        let key = keys::visitor_key(site, visitor);
        match self.get(RedoTable::VisitorSecrets, key.as_bytes())? {
            Some(bytes) => <[u8; 32]>::try_from(bytes)
                .map(Some)
                .map_err(|_| corrupt("visitor_secrets", key.as_bytes(), "not 32 bytes")),
            None => Ok(None),
        }
    }

    /// The gray-release variant stored with a conversation (see
    /// [`Op::SetVariant`](super::Op::SetVariant)), if any.
    pub fn variant(&self, id: ConversationId) -> Result<Option<String>, StoreError> {
        let key = keys::conversation_key(id);
        match self.get(RedoTable::Variants, &key)? {
            Some(bytes) => std::str::from_utf8(bytes)
                .map(|name| Some(name.to_owned()))
                .map_err(|_| corrupt("variants", &key, "not UTF-8")),
            None => Ok(None),
        }
    }

    /// Every conversation that is not closed, in id order.
    pub fn open_conversations(&self) -> Result<Vec<Conversation>, StoreError> {
        let mut open = Vec::new();
        let all = (Bound::Unbounded, Bound::Unbounded);
        let entries = Merged::new(
            self.tables.open.iter(&self.txn)?,
            self.pending(RedoTable::Open, all, false),
        );
        for entry in entries {
            let (key, _) = entry?;
            let bytes = self
                .get(RedoTable::Conversations, key)?
                .ok_or_else(|| corrupt("open", key, "no conversation record"))?;
            open.push(decode_conversation(key, bytes)?);
        }
        Ok(open)
    }

    /// Every conversation (closed ones too) with an id below `before` (all of them without
    /// one), highest id (newest) first, each validated and copied out as it is reached.
    pub fn conversations_before(
        &self,
        before: Option<ConversationId>,
    ) -> Result<ConversationIter<'_>, StoreError> {
        let end = before.map(keys::conversation_key);
        let range: (Bound<&[u8]>, Bound<&[u8]>) = match &end {
            Some(end) => (Bound::Unbounded, Bound::Excluded(&end[..])),
            None => (Bound::Unbounded, Bound::Unbounded),
        };
        Ok(ConversationIter {
            range: Merged::new(
                self.tables.conversations.rev_range(&self.txn, &range)?,
                self.pending(RedoTable::Conversations, range, true),
            ),
        })
    }

    /// One stored message, read in place.
    pub fn message(
        &self,
        id: ConversationId,
        seq: u64,
    ) -> Result<Option<&ArchivedMessageRecord>, StoreError> {
        let key = keys::message_key(id, seq);
        match self.get(RedoTable::Messages, &key)? {
            Some(bytes) => access_message(&key, bytes).map(Some),
            None => Ok(None),
        }
    }

    /// The stored messages of `id` with seq > `after_seq`, in seq order, at most `limit`,
    /// each read in place from the LMDB pages.
    pub fn messages_after(
        &self,
        id: ConversationId,
        after_seq: u64,
        limit: usize,
    ) -> Result<MessageIter<'_>, StoreError> {
        let first = keys::message_key(id, after_seq.saturating_add(1));
        let last = keys::message_key(id, u64::MAX);
        let range: (Bound<&[u8]>, Bound<&[u8]>) = if after_seq == u64::MAX {
            // Nothing can follow; an empty range keeps the iterator type uniform.
            (Bound::Excluded(&last[..]), Bound::Included(&last[..]))
        } else {
            (Bound::Included(&first[..]), Bound::Included(&last[..]))
        };
        Ok(MessageIter {
            range: Merged::new(
                self.tables.messages.range(&self.txn, &range)?,
                self.pending(RedoTable::Messages, range, false),
            ),
            remaining: limit,
        })
    }
}

/// Iterator over stored messages of one conversation; see [`ReadView::messages_after`].
pub struct MessageIter<'v> {
    range: Merged<'v, RoRange<'v, Bytes, Bytes>>,
    remaining: usize,
}

impl<'v> Iterator for MessageIter<'v> {
    type Item = Result<&'v ArchivedMessageRecord, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let entry = self.range.next()?;
        Some(entry.map_err(StoreError::from).and_then(|(key, bytes)| {
            let record = access_message(key, bytes)?;
            match keys::decode_message_key(key) {
                Some((_, seq)) if seq == record.seq() => Ok(record),
                _ => Err(corrupt("messages", key, "record seq differs from its key")),
            }
        }))
    }
}

/// Iterator over conversations, newest first; see [`ReadView::conversations_before`].
pub struct ConversationIter<'v> {
    range: Merged<'v, RoRevRange<'v, Bytes, Bytes>>,
}

impl Iterator for ConversationIter<'_> {
    type Item = Result<Conversation, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        let entry = self.range.next()?;
        Some(
            entry
                .map_err(StoreError::from)
                .and_then(|(key, bytes)| decode_conversation(key, bytes)),
        )
    }
}

/// Validates and views a message record in place.
pub(crate) fn access_message<'b>(
    key: &[u8],
    bytes: &'b [u8],
) -> Result<&'b ArchivedMessageRecord, StoreError> {
    rkyv::access::<ArchivedMessageRecord, rancor::Error>(bytes)
        .map_err(|error| corrupt("messages", key, &error.to_string()))
}

fn access_conversation<'b>(
    key: &[u8],
    bytes: &'b [u8],
) -> Result<&'b ArchivedConversation, StoreError> {
    rkyv::access::<ArchivedConversation, rancor::Error>(bytes)
        .map_err(|error| corrupt("conversations", key, &error.to_string()))
}

/// Validates and copies out a conversation record.
pub(crate) fn decode_conversation(key: &[u8], bytes: &[u8]) -> Result<Conversation, StoreError> {
    let archived = access_conversation(key, bytes)?;
    rkyv::deserialize::<Conversation, rancor::Error>(archived)
        .map_err(|error| corrupt("conversations", key, &error.to_string()))
}
