//! Canned replies: the short texts agents paste into a conversation from the console, kept in
//! an LMDB environment of their own (`<storage dir>/canned/`, one per process).
//!
//! Every agent reads them (`UseCannedReplies`); supervisors and admins create, change and
//! delete them (`ManageCannedReplies`). The HTTP side is `api::canned`; this module is the
//! record, its validation and the store.
//!
//! Records are serde_json, like accounts: a few hundred bytes each, read when an agent opens
//! the list, never on a per-message path.
//!
//! Invariants:
//! - Ids are assigned from a counter kept in the store, starting at 1, and never reused (a
//!   deleted reply's id stays gone); keys are the id as 8 big-endian bytes, so a scan lists
//!   replies in creation order.
//! - A `shortcut`, when set, names one reply only (compared ignoring case); a second reply
//!   claiming it is refused with [`CannedError::ShortcutTaken`] and nothing is written.
//! - Every write is one LMDB transaction, synced before it returns (the environment keeps
//!   LMDB's default sync): a reply the API confirmed survives a crash.
//! - heed refuses to open one environment twice in a process: `serve` opens the store once
//!   and shares it (`Arc`) with every shard.

use std::path::{Path, PathBuf};

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, Env, EnvOpenOptions, WithoutTls};
use serde::{Deserialize, Serialize};

/// Size of the map: room for well over 100,000 replies.
const MAP_SIZE: usize = 256 << 20;
/// Longest title, in characters.
pub const MAX_TITLE_CHARS: usize = 200;
/// Longest reply text, in characters.
pub const MAX_TEXT_CHARS: usize = 4000;
/// Longest shortcut; shortcuts are `[A-Za-z0-9_-]`.
pub const MAX_SHORTCUT_CHARS: usize = 32;
/// Most tags on one reply, and the longest tag in characters.
pub const MAX_TAGS: usize = 16;
pub const MAX_TAG_CHARS: usize = 64;

/// The key under which the next id is kept in the `info` table.
const NEXT_ID: &[u8] = b"next_id";

/// One canned reply as stored and as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CannedReply {
    pub id: u64,
    /// What the console lists.
    pub title: String,
    /// What is pasted into the conversation.
    pub text: String,
    /// Typed in the console after `/` to insert the reply, if set.
    #[serde(default)]
    pub shortcut: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Unix seconds.
    pub created: u64,
    pub updated: u64,
    /// Who wrote it last (`api:NAME`).
    pub updated_by: String,
}

/// The content of a reply as a client sends it (create, replace).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyContent {
    pub title: String,
    pub text: String,
    #[serde(default)]
    pub shortcut: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

impl ReplyContent {
    /// The content with its title, text and tags trimmed (of space, tab, CR and LF:
    /// [`crate::api::ASCII_BLANKS`]), or what is wrong with it. Lengths count characters, after
    /// trimming; a shortcut is taken as it is.
    pub fn checked(self) -> Result<ReplyContent, CannedError> {
        let blanks = crate::api::ASCII_BLANKS;
        let title = self.title.trim_matches(blanks).to_owned();
        let text = self.text.trim_matches(blanks).to_owned();
        let bad = |message: String| Err(CannedError::Invalid(message));
        let chars = |s: &str| s.chars().count();
        if title.is_empty() || chars(&title) > MAX_TITLE_CHARS {
            return bad(format!(
                "title must be 1 to {MAX_TITLE_CHARS} characters, not all blank"
            ));
        }
        if text.is_empty() || chars(&text) > MAX_TEXT_CHARS {
            return bad(format!(
                "text must be 1 to {MAX_TEXT_CHARS} characters, not all blank"
            ));
        }
        if let Some(shortcut) = &self.shortcut {
            let allowed = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
            if shortcut.is_empty()
                || shortcut.len() > MAX_SHORTCUT_CHARS
                || !shortcut.chars().all(allowed)
            {
                return bad(format!(
                    "shortcut must be 1 to {MAX_SHORTCUT_CHARS} of A-Z, a-z, 0-9, _ and - \
                     (or null for none)"
                ));
            }
        }
        let tags: Vec<String> = self
            .tags
            .iter()
            .map(|t| t.trim_matches(blanks).to_owned())
            .collect();
        if tags.len() > MAX_TAGS
            || tags
                .iter()
                .any(|t| t.is_empty() || chars(t) > MAX_TAG_CHARS)
        {
            return bad(format!(
                "at most {MAX_TAGS} tags, each 1 to {MAX_TAG_CHARS} characters, not all blank"
            ));
        }
        Ok(ReplyContent {
            title,
            text,
            shortcut: self.shortcut,
            tags,
        })
    }
}

/// Why a canned-reply operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CannedError {
    #[error("no canned reply {0}")]
    NotFound(u64),
    #[error("the shortcut {0:?} is taken by canned reply {1}")]
    ShortcutTaken(String, u64),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("canned-reply store: {0}")]
    Store(#[from] heed::Error),
    #[error("canned reply {0} is unreadable: {1}")]
    Corrupt(u64, serde_json::Error),
}

/// A page of replies: the ones listed, and the id to continue after when there are more.
#[derive(Debug, PartialEq, Eq)]
pub struct ReplyPage {
    pub replies: Vec<CannedReply>,
    pub next_after: Option<u64>,
}

/// The canned replies of one storage directory.
pub struct CannedStore {
    env: Env<WithoutTls>,
    replies: Database<'static, Bytes, Bytes>,
    info: Database<'static, Bytes, Bytes>,
}

impl CannedStore {
    /// Opens (creating) `<storage_dir>/canned/`.
    pub fn open(storage_dir: &Path) -> Result<CannedStore, CannedError> {
        let path = storage_dir.join("canned");
        std::fs::create_dir_all(&path).map_err(|source| CannedError::Create {
            path: path.clone(),
            source,
        })?;
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        options.map_size(MAP_SIZE).max_dbs(2).max_readers(512);
        // SAFETY: the map is unsound only if the file changes behind LMDB's back; the
        // directory is ours and opened once per process.
        let env = unsafe { options.open(&path) }?;
        env.clear_stale_readers()?;
        let wtxn = env.write_txn()?;
        let (replies, info) = env
            .create_databases_and_commit(wtxn, |opener, wtxn| -> Result<_, CannedError> {
                let replies = opener.create_database::<Bytes, Bytes>(wtxn, Some("replies"))?;
                let info = opener.create_database::<Bytes, Bytes>(wtxn, Some("info"))?;
                Ok(CommitOrAbort::<_, ()>::Commit((replies, info)))
            })?
            .unwrap_commit();
        Ok(CannedStore { env, replies, info })
    }

    fn decode(id: u64, bytes: &[u8]) -> Result<CannedReply, CannedError> {
        serde_json::from_slice(bytes).map_err(|err| CannedError::Corrupt(id, err))
    }

    /// One reply.
    pub fn get(&self, id: u64) -> Result<CannedReply, CannedError> {
        let rtxn = self.env.read_txn()?;
        match self.replies.get(&rtxn, &id.to_be_bytes())? {
            Some(bytes) => Self::decode(id, bytes),
            None => Err(CannedError::NotFound(id)),
        }
    }

    /// Up to `limit` replies with an id above `after`, in id order, that contain `query`
    /// (ignoring case) in their title, text, shortcut or tags. Reads at most the whole table
    /// once; holds at most `limit` replies.
    pub fn list(
        &self,
        after: u64,
        limit: usize,
        query: Option<&str>,
    ) -> Result<ReplyPage, CannedError> {
        let needle = query
            .map(|q| q.trim().to_lowercase())
            .filter(|q| !q.is_empty());
        let rtxn = self.env.read_txn()?;
        let start = after.saturating_add(1).to_be_bytes();
        let range = (
            std::ops::Bound::Included(&start[..]),
            std::ops::Bound::Unbounded,
        );
        let mut replies = Vec::new();
        let mut next_after = None;
        if after == u64::MAX {
            return Ok(ReplyPage {
                replies,
                next_after,
            });
        }
        for entry in self.replies.range(&rtxn, &range)? {
            let (key, bytes) = entry?;
            let id = u64::from_be_bytes(key.try_into().unwrap_or([0; 8]));
            let reply = Self::decode(id, bytes)?;
            if let Some(needle) = &needle {
                if !reply_matches(&reply, needle) {
                    continue;
                }
            }
            if replies.len() == limit {
                next_after = replies.last().map(|r: &CannedReply| r.id);
                break;
            }
            replies.push(reply);
        }
        Ok(ReplyPage {
            replies,
            next_after,
        })
    }

    /// The reply holding `shortcut` (ignoring case), other than `except`.
    fn shortcut_holder(
        &self,
        rtxn: &heed::RoTxn<'_, WithoutTls>,
        shortcut: &str,
        except: Option<u64>,
    ) -> Result<Option<u64>, CannedError> {
        for entry in self.replies.iter(rtxn)? {
            let (key, bytes) = entry?;
            let id = u64::from_be_bytes(key.try_into().unwrap_or([0; 8]));
            if Some(id) == except {
                continue;
            }
            let reply = Self::decode(id, bytes)?;
            if reply
                .shortcut
                .as_deref()
                .is_some_and(|s| s.eq_ignore_ascii_case(shortcut))
            {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    /// Stores a new reply (checked content) at `now` (Unix seconds).
    pub fn create(
        &self,
        content: ReplyContent,
        by: &str,
        now: u64,
    ) -> Result<CannedReply, CannedError> {
        let content = content.checked()?;
        let mut wtxn = self.env.write_txn()?;
        if let Some(shortcut) = &content.shortcut {
            if let Some(holder) = self.shortcut_holder(&wtxn, shortcut, None)? {
                return Err(CannedError::ShortcutTaken(shortcut.clone(), holder));
            }
        }
        let id = match self.info.get(&wtxn, NEXT_ID)? {
            Some(bytes) => u64::from_be_bytes(bytes.try_into().unwrap_or([0; 8])).max(1),
            None => 1,
        };
        let reply = CannedReply {
            id,
            title: content.title,
            text: content.text,
            shortcut: content.shortcut,
            tags: content.tags,
            created: now,
            updated: now,
            updated_by: by.to_owned(),
        };
        let bytes = serde_json::to_vec(&reply).expect("a reply serialises");
        self.replies.put(&mut wtxn, &id.to_be_bytes(), &bytes)?;
        self.info.put(&mut wtxn, NEXT_ID, &(id + 1).to_be_bytes())?;
        wtxn.commit()?;
        Ok(reply)
    }

    /// Replaces the content of reply `id`.
    pub fn replace(
        &self,
        id: u64,
        content: ReplyContent,
        by: &str,
        now: u64,
    ) -> Result<CannedReply, CannedError> {
        let content = content.checked()?;
        let mut wtxn = self.env.write_txn()?;
        let old = match self.replies.get(&wtxn, &id.to_be_bytes())? {
            Some(bytes) => Self::decode(id, bytes)?,
            None => return Err(CannedError::NotFound(id)),
        };
        if let Some(shortcut) = &content.shortcut {
            if let Some(holder) = self.shortcut_holder(&wtxn, shortcut, Some(id))? {
                return Err(CannedError::ShortcutTaken(shortcut.clone(), holder));
            }
        }
        let reply = CannedReply {
            id,
            title: content.title,
            text: content.text,
            shortcut: content.shortcut,
            tags: content.tags,
            created: old.created,
            updated: now,
            updated_by: by.to_owned(),
        };
        let bytes = serde_json::to_vec(&reply).expect("a reply serialises");
        self.replies.put(&mut wtxn, &id.to_be_bytes(), &bytes)?;
        wtxn.commit()?;
        Ok(reply)
    }

    /// Deletes reply `id`; its id is not reused.
    pub fn delete(&self, id: u64) -> Result<CannedReply, CannedError> {
        let mut wtxn = self.env.write_txn()?;
        let old = match self.replies.get(&wtxn, &id.to_be_bytes())? {
            Some(bytes) => Self::decode(id, bytes)?,
            None => return Err(CannedError::NotFound(id)),
        };
        self.replies.delete(&mut wtxn, &id.to_be_bytes())?;
        wtxn.commit()?;
        Ok(old)
    }
}

/// Whether `reply` contains the lowercased `needle` in its title, text, shortcut or tags.
fn reply_matches(reply: &CannedReply, needle: &str) -> bool {
    let hit = |text: &str| text.to_lowercase().contains(needle);
    hit(&reply.title)
        || hit(&reply.text)
        || reply.shortcut.as_deref().is_some_and(hit)
        || reply.tags.iter().any(|tag| hit(tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(title: &str, shortcut: Option<&str>) -> ReplyContent {
        ReplyContent {
            title: title.into(),
            text: format!("  {title}: thank you for waiting.  "),
            shortcut: shortcut.map(Into::into),
            tags: vec!["greeting".into()],
        }
    }

    #[test]
    fn create_list_replace_delete_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = CannedStore::open(dir.path()).unwrap();
            let hello = store
                .create(content("Hello", Some("hi")), "api:sue", 10)
                .unwrap();
            assert_eq!(hello.id, 1);
            assert_eq!(hello.text, "Hello: thank you for waiting.");
            let bye = store.create(content("Bye", None), "api:sue", 11).unwrap();
            assert_eq!(bye.id, 2);
            // A taken shortcut, in another case: refused, nothing written.
            let taken = store.create(content("Hi again", Some("HI")), "api:sue", 12);
            assert!(
                matches!(taken, Err(CannedError::ShortcutTaken(_, 1))),
                "{taken:?}"
            );
            let replaced = store
                .replace(2, content("Goodbye", Some("bye")), "api:root", 20)
                .unwrap();
            assert_eq!((replaced.created, replaced.updated), (11, 20));
            assert_eq!(replaced.updated_by, "api:root");
            // Keeping its own shortcut is not a conflict.
            store
                .replace(2, content("Goodbye", Some("bye")), "api:root", 21)
                .unwrap();
            assert_eq!(store.delete(1).unwrap().title, "Hello");
            assert!(matches!(store.get(1), Err(CannedError::NotFound(1))));
            assert!(matches!(store.delete(1), Err(CannedError::NotFound(1))));
        }
        let store = CannedStore::open(dir.path()).unwrap();
        assert_eq!(store.get(2).unwrap().title, "Goodbye");
        // Ids are never reused.
        assert_eq!(store.create(content("Third", None), "x", 30).unwrap().id, 3);
    }

    #[test]
    fn lists_page_and_filter() {
        let dir = tempfile::tempdir().unwrap();
        let store = CannedStore::open(dir.path()).unwrap();
        for n in 0..5 {
            store
                .create(content(&format!("Reply {n}"), None), "x", n)
                .unwrap();
        }
        let page = store.list(0, 2, None).unwrap();
        assert_eq!(
            page.replies.iter().map(|r| r.id).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(page.next_after, Some(2));
        let page = store.list(4, 2, None).unwrap();
        assert_eq!(page.replies.len(), 1);
        assert_eq!(page.next_after, None);
        let found = store.list(0, 10, Some("REPLY 3")).unwrap();
        assert_eq!(found.replies.len(), 1);
        assert_eq!(found.replies[0].id, 4);
        assert!(store.list(u64::MAX, 10, None).unwrap().replies.is_empty());
    }

    #[test]
    fn content_is_checked() {
        let bad = [
            content(" ", None),
            content("ok", Some("no spaces")),
            ReplyContent {
                text: "x".repeat(MAX_TEXT_CHARS + 1),
                ..content("ok", None)
            },
            content("ok", Some("")),
            ReplyContent {
                tags: vec!["".into()],
                ..content("ok", None)
            },
        ];
        for content in bad {
            assert!(matches!(content.checked(), Err(CannedError::Invalid(_))));
        }
        assert_eq!(content("ok", None).checked().unwrap().shortcut, None);
        // Characters, not bytes.
        let wide = ReplyContent {
            title: "é".repeat(MAX_TITLE_CHARS),
            ..content("ok", None)
        };
        assert!(wide.checked().is_ok());
    }
}
