//! The canned-reply endpoints of the `/api/` core: parsed and authorized by [`super::plan`]
//! into a [`CannedPlan`], carried out by [`execute`] against the process's
//! [`CannedStore`] (LMDB reads and commits: the driver runs it on the shard's blocking thread).
//!
//! Endpoints (documented in `docs/api.md` and `docs/openapi.yaml`):
//! - `GET /api/canned?q=TEXT&after=ID&limit=N` (`UseCannedReplies`: every role) →
//!   `{"replies":[REPLY,...],"next_after":ID|null}`, in id order
//! - `GET /api/canned/ID` (`UseCannedReplies`) → REPLY
//! - `POST /api/canned` `{"title","text","shortcut"?,"tags"?}` (`ManageCannedReplies`:
//!   supervisors and admins) → `201` REPLY
//! - `PUT /api/canned/ID` (same body, `ManageCannedReplies`) → REPLY
//! - `DELETE /api/canned/ID` (`ManageCannedReplies`) → `{"deleted":ID}`
//!
//! Errors: `400 bad_request` (a bad field), `404 unknown_reply`, `409 shortcut_taken`.
//! Changes are recorded in the audit chain (`canned_reply_created|updated|deleted`).

use serde_json::json;

use super::ApiResponse;
use crate::audit::{self, AuditEvent};
use crate::canned::{CannedError, CannedStore, ReplyContent};

/// Replies a list returns without `limit`, and at most.
pub const DEFAULT_LIST: usize = 100;
pub const MAX_LIST: usize = 1000;

/// A canned-reply request, parsed and authorized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CannedPlan {
    List {
        after: u64,
        limit: usize,
        query: Option<String>,
    },
    Get {
        id: u64,
    },
    Create {
        by: String,
        content: ReplyContent,
    },
    Replace {
        by: String,
        id: u64,
        content: ReplyContent,
    },
    Delete {
        by: String,
        id: u64,
    },
}

fn error(err: CannedError) -> ApiResponse {
    match &err {
        CannedError::NotFound(_) => ApiResponse::error(404, "unknown_reply", &err),
        CannedError::ShortcutTaken(..) => ApiResponse::error(409, "shortcut_taken", &err),
        CannedError::Invalid(_) => ApiResponse::error(400, "bad_request", &err),
        _ => {
            tracing::error!(error = %err, "canned-reply store");
            ApiResponse::error(500, "internal", "the canned-reply store failed")
        }
    }
}

fn audited(kind: &str, by: &str, id: u64) {
    audit::emit(AuditEvent::new(kind, by).target(format!("canned:{id}")));
}

/// Does what `plan` asked at `now` (Unix seconds). Blocking (LMDB): run it off the event loop.
pub fn execute(plan: CannedPlan, store: &CannedStore, now: u64) -> ApiResponse {
    match plan {
        CannedPlan::List {
            after,
            limit,
            query,
        } => match store.list(after, limit, query.as_deref()) {
            Ok(page) => ApiResponse::json(
                200,
                json!({"replies": page.replies, "next_after": page.next_after}),
            ),
            Err(err) => error(err),
        },
        CannedPlan::Get { id } => match store.get(id) {
            Ok(reply) => ApiResponse::json(200, json!(reply)),
            Err(err) => error(err),
        },
        CannedPlan::Create { by, content } => match store.create(content, &by, now) {
            Ok(reply) => {
                audited("canned_reply_created", &by, reply.id);
                ApiResponse::json(201, json!(reply))
            }
            Err(err) => error(err),
        },
        CannedPlan::Replace { by, id, content } => match store.replace(id, content, &by, now) {
            Ok(reply) => {
                audited("canned_reply_updated", &by, id);
                ApiResponse::json(200, json!(reply))
            }
            Err(err) => error(err),
        },
        CannedPlan::Delete { by, id } => match store.delete(id) {
            Ok(_) => {
                audited("canned_reply_deleted", &by, id);
                ApiResponse::json(200, json!({"deleted": id}))
            }
            Err(err) => error(err),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(response: &ApiResponse) -> serde_json::Value {
        serde_json::from_str(&response.body).unwrap()
    }

    #[test]
    fn crud_answers_with_the_right_statuses() {
        let dir = tempfile::tempdir().unwrap();
        let store = CannedStore::open(dir.path()).unwrap();
        let content = |title: &str, shortcut: Option<&str>| ReplyContent {
            title: title.into(),
            text: "Thanks for waiting.".into(),
            shortcut: shortcut.map(Into::into),
            tags: vec![],
        };
        let by = || "api:sue".to_string();
        let created = execute(
            CannedPlan::Create {
                by: by(),
                content: content("Wait", Some("wait")),
            },
            &store,
            5,
        );
        assert_eq!(created.status, 201, "{}", created.body);
        assert_eq!(body(&created)["id"], 1);
        let taken = execute(
            CannedPlan::Create {
                by: by(),
                content: content("Wait 2", Some("WAIT")),
            },
            &store,
            5,
        );
        assert_eq!(
            (taken.status, body(&taken)["error"]["code"].clone()),
            (409, json!("shortcut_taken"))
        );
        let blank = execute(
            CannedPlan::Create {
                by: by(),
                content: content("  ", None),
            },
            &store,
            5,
        );
        assert_eq!(blank.status, 400);
        let listed = execute(
            CannedPlan::List {
                after: 0,
                limit: 10,
                query: None,
            },
            &store,
            5,
        );
        assert_eq!(body(&listed)["replies"][0]["shortcut"], "wait");
        assert_eq!(body(&listed)["next_after"], serde_json::Value::Null);
        let replaced = execute(
            CannedPlan::Replace {
                by: by(),
                id: 1,
                content: content("Please wait", None),
            },
            &store,
            6,
        );
        assert_eq!(body(&replaced)["title"], "Please wait");
        assert_eq!(execute(CannedPlan::Get { id: 9 }, &store, 6).status, 404);
        assert_eq!(
            execute(CannedPlan::Delete { by: by(), id: 1 }, &store, 7).status,
            200
        );
        assert_eq!(
            execute(CannedPlan::Delete { by: by(), id: 1 }, &store, 7).status,
            404
        );
    }
}
