//! Unit tests of the shard store against real LMDB environments in temporary directories.

use std::path::Path;

use super::*;

const SHARD: usize = 3;

fn options(durability: Durability) -> StoreOptions {
    StoreOptions {
        map_size: 64 << 20,
        max_map_size: 64 << 20,
        durability,
        log_bytes: 1 << 20,
        apply_interval: std::time::Duration::ZERO,
    }
}

fn open(dir: &Path) -> ShardStore {
    ShardStore::open(dir, SHARD, options(Durability::Fsync)).expect("open store")
}

fn open_conversation(store: &mut ShardStore, site: &str, visitor: &str) -> ConversationId {
    let outcomes = store
        .apply(&[Op::Open {
            site: site.into(),
            visitor: visitor.into(),
        }])
        .expect("open conversation");
    match &outcomes[..] {
        [OpOutcome::Opened { conversation, .. }] => *conversation,
        other => panic!("unexpected outcome {other:?}"),
    }
}

fn message(conversation: ConversationId, text: &str, client_id: Option<&str>) -> NewMessage {
    NewMessage {
        conversation,
        from: Author::Visitor,
        name: "Visitor".into(),
        text: text.into(),
        client_id: client_id.map(str::to_owned),
    }
}

/// All stored messages of a conversation, copied out.
fn replay(store: &ShardStore, conversation: ConversationId) -> Vec<MessageRecord> {
    let mut out = Vec::new();
    store
        .messages_after(conversation, 0, usize::MAX, |m| {
            out.push(m.to_owned_record())
        })
        .expect("replay");
    out
}

fn seqs(outcomes: &[AppendOutcome]) -> Vec<Option<u64>> {
    outcomes.iter().map(AppendOutcome::seq).collect()
}

#[test]
fn open_creates_the_shard_directory_and_ids_name_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    assert_eq!(store.path(), dir.path().join("shard-3"));
    assert!(dir.path().join("shard-3").join("data.mdb").exists());
    let a = open_conversation(&mut store, "site", "v1");
    let b = open_conversation(&mut store, "site", "v2");
    assert_eq!((a.shard(), b.shard()), (SHARD, SHARD));
    assert_eq!((a.local(), b.local()), (1, 2));
    assert!(a.0 < (1 << 53) && b.0 < (1 << 53));
}

#[test]
fn seqs_are_dense_per_conversation_across_batches() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let a = open_conversation(&mut store, "site", "a");
    let b = open_conversation(&mut store, "site", "b");

    let first = store
        .append_batch(&[
            message(a, "a1", None),
            message(b, "b1", None),
            message(a, "a2", None),
        ])
        .unwrap();
    assert_eq!(seqs(&first), vec![Some(1), Some(1), Some(2)]);
    let second = store
        .append_batch(&[
            message(b, "b2", None),
            message(a, "a3", None),
            message(a, "a4", None),
        ])
        .unwrap();
    assert_eq!(seqs(&second), vec![Some(2), Some(3), Some(4)]);

    let texts: Vec<_> = replay(&store, a)
        .into_iter()
        .map(|m| (m.seq, m.text))
        .collect();
    assert_eq!(
        texts,
        vec![
            (1, "a1".into()),
            (2, "a2".into()),
            (3, "a3".into()),
            (4, "a4".into())
        ]
    );
    assert_eq!(store.last_seq(a).unwrap(), Some(4));
    assert_eq!(store.last_seq(b).unwrap(), Some(2));
    assert_eq!(
        store
            .last_seq(ConversationId::from_parts(SHARD, 99))
            .unwrap(),
        None
    );
}

#[test]
fn duplicate_client_id_returns_the_original_seq_and_is_not_stored_twice() {
    let dir = tempfile::tempdir().unwrap();
    let conversation;
    {
        let mut store = open(dir.path());
        conversation = open_conversation(&mut store, "site", "v");
        let first = store
            .append_batch(&[
                message(conversation, "hello", Some("c1")),
                message(conversation, "x", Some("c2")),
            ])
            .unwrap();
        assert!(matches!(first[0], AppendOutcome::Stored { seq: 1, .. }));
        assert!(matches!(first[1], AppendOutcome::Stored { seq: 2, .. }));
        let resent = store
            .append_batch(&[message(conversation, "hello again", Some("c1"))])
            .unwrap();
        assert_eq!(resent, vec![AppendOutcome::Duplicate { seq: 1 }]);
    }
    // Across a reopen the dedup index still answers with the original seq.
    let mut store = open(dir.path());
    let resent = store
        .append_batch(&[
            message(conversation, "x", Some("c2")),
            message(conversation, "new", Some("c3")),
        ])
        .unwrap();
    assert_eq!(resent[0], AppendOutcome::Duplicate { seq: 2 });
    assert!(matches!(resent[1], AppendOutcome::Stored { seq: 3, .. }));

    let stored = replay(&store, conversation);
    assert_eq!(stored.len(), 3);
    assert_eq!(
        stored[0].text, "hello",
        "the duplicate must not overwrite the original"
    );
    assert_eq!(stored[0].client_id.as_deref(), Some("c1"));
}

#[test]
fn same_client_id_in_different_conversations_is_not_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let a = open_conversation(&mut store, "site", "a");
    let b = open_conversation(&mut store, "site", "b");
    let outcomes = store
        .append_batch(&[message(a, "1", Some("same")), message(b, "1", Some("same"))])
        .unwrap();
    assert!(matches!(outcomes[0], AppendOutcome::Stored { seq: 1, .. }));
    assert!(matches!(outcomes[1], AppendOutcome::Stored { seq: 1, .. }));
}

#[test]
fn batch_with_mixed_conversations_and_duplicates_inside_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let a = open_conversation(&mut store, "site", "a");
    let b = open_conversation(&mut store, "site", "b");
    store
        .append_batch(&[message(b, "old", Some("b-old"))])
        .unwrap();

    let outcomes = store
        .append_batch(&[
            message(a, "a1", Some("x")),
            message(b, "b2", Some("y")),
            message(a, "a1 resent", Some("x")), // duplicate of the first op of this batch
            message(a, "a2", None),
            message(b, "b-old resent", Some("b-old")), // duplicate of an earlier batch
            message(b, "b3", Some("z")),
            message(a, "a3", Some("x2")),
        ])
        .unwrap();
    assert_eq!(
        seqs(&outcomes),
        vec![
            Some(1),
            Some(2),
            Some(1),
            Some(2),
            Some(1),
            Some(3),
            Some(3)
        ]
    );
    assert_eq!(outcomes[2], AppendOutcome::Duplicate { seq: 1 });
    assert_eq!(outcomes[4], AppendOutcome::Duplicate { seq: 1 });

    let a_texts: Vec<_> = replay(&store, a).into_iter().map(|m| m.text).collect();
    assert_eq!(a_texts, vec!["a1", "a2", "a3"]);
    let b_texts: Vec<_> = replay(&store, b).into_iter().map(|m| m.text).collect();
    assert_eq!(b_texts, vec!["old", "b2", "b3"]);
    assert_eq!(store.conversation(a).unwrap().unwrap().last_seq, 3);
    assert_eq!(store.conversation(b).unwrap().unwrap().last_seq, 3);
}

#[test]
fn replay_is_in_order_and_honours_after_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let a = open_conversation(&mut store, "site", "a");
    let b = open_conversation(&mut store, "site", "b");
    // Interleave two conversations over many batches so keys of both are mixed in pages.
    for round in 0..40 {
        let batch: Vec<_> = (0..8)
            .map(|i| {
                let conversation = if i % 2 == 0 { a } else { b };
                message(conversation, &format!("r{round}-{i}"), None)
            })
            .collect();
        store.append_batch(&batch).unwrap();
    }
    let all = replay(&store, a);
    assert_eq!(all.len(), 160);
    assert!(all.iter().enumerate().all(|(i, m)| m.seq == i as u64 + 1));
    assert_eq!(all[0].text, "r0-0");
    assert_eq!(all[159].text, "r39-6");

    let view = store.read().unwrap();
    let page: Vec<u64> = view
        .messages_after(a, 100, 5)
        .unwrap()
        .map(|m| m.unwrap().seq())
        .collect();
    assert_eq!(page, vec![101, 102, 103, 104, 105]);
    assert_eq!(view.messages_after(a, 160, 10).unwrap().count(), 0);
    assert_eq!(view.messages_after(a, u64::MAX, 10).unwrap().count(), 0);
    assert_eq!(view.messages_after(a, 0, 0).unwrap().count(), 0);
    let unknown = ConversationId::from_parts(SHARD, 77);
    assert_eq!(view.messages_after(unknown, 0, 10).unwrap().count(), 0);
    // Records are borrowed from the view, and their fields read in place.
    let m = view.message(b, 7).unwrap().unwrap();
    // b gets ops 1, 3, 5, 7 of each round: its 7th message is round 1, op 5.
    assert_eq!((m.seq(), m.text(), m.from()), (7, "r1-5", Author::Visitor));
    assert!(view.message(b, 161).unwrap().is_none());
}

#[test]
fn message_fields_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let c = open_conversation(&mut store, "site", "v");
    let before = now_ms();
    let outcomes = store
        .append_batch(&[
            NewMessage {
                conversation: c,
                from: Author::Agent,
                name: "Ana Agent".into(),
                text: "¿Cómo puedo ayudar? 👋".into(),
                client_id: Some("agent-17".into()),
            },
            NewMessage {
                conversation: c,
                from: Author::System,
                name: String::new(),
                text: String::new(),
                client_id: None,
            },
        ])
        .unwrap();
    let after = now_ms();
    let AppendOutcome::Stored { seq, ts_ms } = outcomes[0] else {
        panic!("not stored: {outcomes:?}");
    };
    assert_eq!(seq, 1);
    assert!(before <= ts_ms && ts_ms <= after);
    let stored = replay(&store, c);
    assert_eq!(
        stored[0],
        MessageRecord {
            seq: 1,
            from: Author::Agent,
            name: "Ana Agent".into(),
            text: "¿Cómo puedo ayudar? 👋".into(),
            ts_ms,
            client_id: Some("agent-17".into()),
        }
    );
    assert_eq!(stored[1].from, Author::System);
    assert_eq!(stored[1].client_id, None);
    assert!(stored[1].ts_ms >= stored[0].ts_ms);
}

#[test]
fn returning_visitor_resumes_the_same_conversation_until_it_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let first;
    {
        let mut store = open(dir.path());
        first = open_conversation(&mut store, "shop", "alice");
        store.append_batch(&[message(first, "hi", None)]).unwrap();
        let again = store
            .apply(&[Op::Open {
                site: "shop".into(),
                visitor: "alice".into(),
            }])
            .unwrap();
        assert_eq!(
            again,
            vec![OpOutcome::Opened {
                conversation: first,
                created: false,
                last_seq: 1
            }]
        );
        // Same visitor id on another site, and another visitor, are other conversations.
        assert_ne!(open_conversation(&mut store, "blog", "alice"), first);
        assert_ne!(open_conversation(&mut store, "shop", "bob"), first);
        // Site/visitor split must not alias ("sho","palice") with ("shop","alice").
        assert_ne!(open_conversation(&mut store, "sho", "palice"), first);
    }
    let mut store = open(dir.path());
    assert_eq!(
        store.conversation_of_visitor("shop", "alice").unwrap(),
        Some(first)
    );
    assert_eq!(
        store.conversation_of_visitor("shop", "nobody").unwrap(),
        None
    );
    assert_eq!(open_conversation(&mut store, "shop", "alice"), first);

    store
        .apply(&[Op::SetState {
            conversation: first,
            state: ConversationState::Closed,
        }])
        .unwrap();
    assert_eq!(
        store.conversation_of_visitor("shop", "alice").unwrap(),
        None
    );
    let second = open_conversation(&mut store, "shop", "alice");
    assert_ne!(second, first);
    assert_eq!(
        store.conversation_of_visitor("shop", "alice").unwrap(),
        Some(second)
    );
    assert_eq!(store.last_seq(second).unwrap(), Some(0));
}

#[test]
fn two_opens_of_one_visitor_in_one_batch_share_a_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let open_op = Op::Open {
        site: "s".into(),
        visitor: "v".into(),
    };
    let outcomes = store.apply(&[open_op.clone(), open_op]).unwrap();
    let [OpOutcome::Opened {
        conversation: one,
        created: true,
        ..
    }, OpOutcome::Opened {
        conversation: two,
        created: false,
        ..
    }] = &outcomes[..]
    else {
        panic!("unexpected outcomes {outcomes:?}");
    };
    assert_eq!(one, two);
}

#[test]
fn metadata_round_trips_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let c;
    let created;
    {
        let mut store = open(dir.path());
        c = open_conversation(&mut store, "shop", "v");
        created = store.conversation(c).unwrap().unwrap();
        assert_eq!(created.state, ConversationState::Bot);
        assert_eq!(
            (created.site.as_str(), created.visitor.as_str()),
            ("shop", "v")
        );
        store
            .append_batch(&[
                message(c, "1", None),
                message(c, "2", None),
                message(c, "3", None),
            ])
            .unwrap();
        let outcomes = store
            .apply(&[
                Op::SetFailedBotTurns {
                    conversation: c,
                    count: 2,
                },
                Op::SetState {
                    conversation: c,
                    state: ConversationState::Queued,
                },
                Op::MarkRead {
                    conversation: c,
                    side: ReadSide::Visitor,
                    seq: 3,
                },
                Op::SetState {
                    conversation: c,
                    state: ConversationState::Assigned {
                        agent: "ana".into(),
                    },
                },
                Op::MarkRead {
                    conversation: c,
                    side: ReadSide::Agent,
                    seq: 2,
                },
            ])
            .unwrap();
        assert_eq!(
            outcomes,
            vec![
                OpOutcome::Updated,
                OpOutcome::Updated,
                OpOutcome::ReadMarked { watermark: 3 },
                OpOutcome::Updated,
                OpOutcome::ReadMarked { watermark: 2 },
            ]
        );
    }
    let store = open(dir.path());
    let meta = store.conversation(c).unwrap().unwrap();
    assert_eq!(meta.id, c);
    assert_eq!(
        meta.state,
        ConversationState::Assigned {
            agent: "ana".into()
        }
    );
    assert_eq!(meta.last_seq, 3);
    assert_eq!((meta.visitor_read, meta.agent_read), (3, 2));
    assert_eq!(meta.failed_bot_turns, 2);
    assert_eq!(meta.created_ms, created.created_ms);
    assert!(meta.updated_ms >= created.updated_ms);
    assert!(meta.state_since_ms >= created.state_since_ms);
}

#[test]
fn read_watermarks_never_go_down_nor_past_the_last_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let c = open_conversation(&mut store, "s", "v");
    store
        .append_batch(&[
            message(c, "1", None),
            message(c, "2", None),
            message(c, "3", None),
        ])
        .unwrap();
    let mark = |seq| Op::MarkRead {
        conversation: c,
        side: ReadSide::Agent,
        seq,
    };
    let outcomes = store.apply(&[mark(2), mark(1), mark(99)]).unwrap();
    assert_eq!(
        outcomes,
        vec![
            OpOutcome::ReadMarked { watermark: 2 },
            OpOutcome::ReadMarked { watermark: 2 },
            OpOutcome::ReadMarked { watermark: 3 },
        ]
    );
    let meta = store.conversation(c).unwrap().unwrap();
    assert_eq!((meta.agent_read, meta.visitor_read), (3, 0));
}

#[test]
fn open_conversations_lists_every_non_closed_conversation_with_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let (bot, queued, assigned, closed);
    {
        let mut store = open(dir.path());
        bot = open_conversation(&mut store, "s", "1");
        queued = open_conversation(&mut store, "s", "2");
        assigned = open_conversation(&mut store, "s", "3");
        closed = open_conversation(&mut store, "s", "4");
        store
            .apply(&[
                Op::SetState {
                    conversation: queued,
                    state: ConversationState::Queued,
                },
                Op::SetState {
                    conversation: assigned,
                    state: ConversationState::Assigned { agent: "bo".into() },
                },
                Op::SetState {
                    conversation: closed,
                    state: ConversationState::Closed,
                },
            ])
            .unwrap();
    }
    let store = open(dir.path());
    let open_list: Vec<_> = store
        .open_conversations()
        .unwrap()
        .into_iter()
        .map(|c| (c.id, c.state))
        .collect();
    assert_eq!(
        open_list,
        vec![
            (bot, ConversationState::Bot),
            (queued, ConversationState::Queued),
            (assigned, ConversationState::Assigned { agent: "bo".into() }),
        ]
    );
    assert_eq!(
        store.conversation(closed).unwrap().unwrap().state,
        ConversationState::Closed
    );
}

#[test]
fn refused_ops_write_nothing_and_do_not_stop_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let live = open_conversation(&mut store, "s", "live");
    let closed = open_conversation(&mut store, "s", "closed");
    store
        .apply(&[Op::SetState {
            conversation: closed,
            state: ConversationState::Closed,
        }])
        .unwrap();
    let unknown = ConversationId::from_parts(SHARD, 999);
    let foreign = ConversationId::from_parts(SHARD + 1, 1);
    let long_id = "x".repeat(MAX_CLIENT_ID_BYTES + 1);

    let outcomes = store
        .append_batch(&[
            message(unknown, "u", None),
            message(live, "ok 1", Some("a")),
            message(foreign, "f", None),
            message(closed, "late", None),
            message(live, "long id", Some(&long_id)),
            message(live, "empty id", Some("")),
            message(live, "ok 2", Some(&"y".repeat(MAX_CLIENT_ID_BYTES))),
        ])
        .unwrap();
    assert_eq!(
        outcomes[0],
        AppendOutcome::Rejected(Rejection::UnknownConversation(unknown))
    );
    assert!(matches!(outcomes[1], AppendOutcome::Stored { seq: 1, .. }));
    assert_eq!(
        outcomes[2],
        AppendOutcome::Rejected(Rejection::ForeignConversation {
            conversation: foreign,
            owner: SHARD + 1
        })
    );
    assert_eq!(
        outcomes[3],
        AppendOutcome::Rejected(Rejection::ConversationClosed(closed))
    );
    assert_eq!(
        outcomes[4],
        AppendOutcome::Rejected(Rejection::TooLong {
            field: "client message id",
            len: MAX_CLIENT_ID_BYTES + 1,
            max: MAX_CLIENT_ID_BYTES
        })
    );
    assert_eq!(
        outcomes[5],
        AppendOutcome::Rejected(Rejection::Empty {
            field: "client message id"
        })
    );
    assert!(matches!(outcomes[6], AppendOutcome::Stored { seq: 2, .. }));
    assert_eq!(replay(&store, live).len(), 2);
    assert_eq!(replay(&store, closed).len(), 0);

    let more = store
        .apply(&[
            Op::Open {
                site: String::new(),
                visitor: "v".into(),
            },
            Op::Open {
                site: "s".into(),
                visitor: "v".repeat(MAX_VISITOR_BYTES + 1),
            },
            Op::SetState {
                conversation: closed,
                state: ConversationState::Queued,
            },
            Op::MarkRead {
                conversation: unknown,
                side: ReadSide::Visitor,
                seq: 1,
            },
        ])
        .unwrap();
    assert_eq!(
        more[0],
        OpOutcome::Rejected(Rejection::Empty { field: "site" })
    );
    assert!(matches!(
        more[1],
        OpOutcome::Rejected(Rejection::TooLong {
            field: "visitor id",
            ..
        })
    ));
    assert_eq!(
        more[2],
        OpOutcome::Rejected(Rejection::ConversationClosed(closed))
    );
    assert_eq!(
        more[3],
        OpOutcome::Rejected(Rejection::UnknownConversation(unknown))
    );
    assert_eq!(store.open_conversations().unwrap().len(), 1);
}

#[test]
fn everything_persists_across_reopen_in_every_durability_mode() {
    for durability in [Durability::Fsync, Durability::Batch, Durability::None] {
        let dir = tempfile::tempdir().unwrap();
        let c;
        {
            let mut store = ShardStore::open(dir.path(), 0, options(durability)).unwrap();
            assert_eq!(store.durability(), durability);
            c = open_conversation(&mut store, "s", "v");
            for i in 0..50 {
                let id = format!("m{i}");
                store.append_batch(&[message(c, &id, Some(&id))]).unwrap();
            }
            store.flush().unwrap();
        }
        let mut store = ShardStore::open(dir.path(), 0, options(durability)).unwrap();
        let stored = replay(&store, c);
        assert_eq!(stored.len(), 50, "{durability:?}");
        assert!(stored.iter().enumerate().all(|(i, m)| m.seq == i as u64 + 1
            && m.client_id.as_deref() == Some(format!("m{i}").as_str())));
        // A new conversation after reopen does not reuse an id.
        let next = open_conversation(&mut store, "s", "other");
        assert_eq!(next.local(), 2, "{durability:?}");
    }
}

#[test]
fn timestamps_never_decrease_within_a_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let c = open_conversation(&mut store, "s", "v");
    for i in 0..20 {
        store
            .append_batch(&[message(c, &i.to_string(), None)])
            .unwrap();
    }
    let stored = replay(&store, c);
    assert!(stored.windows(2).all(|pair| pair[0].ts_ms <= pair[1].ts_ms));
}

#[test]
fn full_map_is_a_typed_error_that_stores_nothing_and_can_be_grown() {
    let dir = tempfile::tempdir().unwrap();
    let small = StoreOptions {
        map_size: 256 << 10,
        // No growth: this test is about the error at the ceiling.
        max_map_size: 256 << 10,
        durability: Durability::None,
        log_bytes: 0,
        apply_interval: std::time::Duration::ZERO,
    };
    let mut store = ShardStore::open(dir.path(), 0, small).unwrap();
    let c = open_conversation(&mut store, "s", "v");
    let text = "x".repeat(1000);
    let mut stored = 0u64;
    let mut full = None;
    let mut failed_batch = Vec::new();
    for i in 0..10_000 {
        let id = format!("m{i}");
        let batch: Vec<_> = (0..4)
            .map(|j| message(c, &text, Some(&format!("{id}-{j}"))))
            .collect();
        match store.append_batch(&batch) {
            Ok(outcomes) => stored += outcomes.len() as u64,
            Err(error) => {
                full = Some(error);
                failed_batch = batch;
                break;
            }
        }
    }
    let Some(StoreError::MapFull { map_size }) = full else {
        panic!("expected MapFull, got {full:?}");
    };
    assert_eq!(map_size, 256 << 10);
    assert!(stored > 0);
    // The failed batch left no trace: last_seq and the replay agree with what was acked.
    assert_eq!(store.last_seq(c).unwrap(), Some(stored));
    assert_eq!(replay(&store, c).len() as u64, stored);

    store.set_map_size(4 << 20).unwrap();
    assert_eq!(store.map_size(), 4 << 20);
    let after = store
        .append_batch(&[message(c, "after growth", Some("g"))])
        .unwrap();
    assert!(matches!(after[0], AppendOutcome::Stored { seq, .. } if seq == stored + 1));
    // The ids of the failed batch were never stored, so sending them again stores them:
    // nothing the failed transaction staged is remembered as a re-send.
    let retried = store.append_batch(&failed_batch).unwrap();
    assert_eq!(
        seqs(&retried),
        (stored + 2..stored + 6).map(Some).collect::<Vec<_>>()
    );
    assert!(retried
        .iter()
        .all(|outcome| matches!(outcome, AppendOutcome::Stored { .. })));
}

#[test]
fn resends_are_recognised_within_the_newest_window_messages_also_after_a_reopen() {
    use super::recent_ids::WINDOW;
    let dir = tempfile::tempdir().unwrap();
    let conversation;
    let total = WINDOW + 10;
    {
        let mut store = open(dir.path());
        conversation = open_conversation(&mut store, "site", "v");
        // Every other message has a client id; the others are like bot replies.
        let batch: Vec<_> = (1..=total)
            .map(|seq| {
                let id = format!("id-{seq}");
                message(conversation, "m", (seq % 2 == 1).then_some(id.as_str()))
            })
            .collect();
        let outcomes = store.append_batch(&batch).unwrap();
        assert_eq!(seqs(&outcomes), (1..=total).map(Some).collect::<Vec<_>>());
    }
    // A fresh process: the window is rebuilt from the stored records.
    let mut store = open(dir.path());
    let oldest_in_window = total - WINDOW + 1;
    let newest_with_id = if total % 2 == 1 { total } else { total - 1 };
    let first_with_id_in_window = oldest_in_window + (1 - oldest_in_window % 2);
    let outcomes = store
        .append_batch(&[
            message(conversation, "m", Some(&format!("id-{newest_with_id}"))),
            message(
                conversation,
                "m",
                Some(&format!("id-{first_with_id_in_window}")),
            ),
        ])
        .unwrap();
    assert_eq!(
        outcomes,
        vec![
            AppendOutcome::Duplicate {
                seq: newest_with_id
            },
            AppendOutcome::Duplicate {
                seq: first_with_id_in_window
            },
        ]
    );
    // The documented limit: an original older than the newest WINDOW messages is not
    // recognised, and the re-send is stored as a new message.
    let outcomes = store
        .append_batch(&[message(conversation, "m", Some("id-1"))])
        .unwrap();
    assert!(matches!(outcomes[0], AppendOutcome::Stored { seq, .. } if seq == total + 1));
}

#[test]
fn a_shard_directory_cannot_be_opened_as_another_shard_or_twice() {
    let dir = tempfile::tempdir().unwrap();
    {
        let _store = ShardStore::open(dir.path(), 0, options(Durability::Fsync)).unwrap();
        let again = ShardStore::open(dir.path(), 0, options(Durability::Fsync));
        assert!(
            matches!(again, Err(StoreError::AlreadyOpen { .. })),
            "{:?}",
            again.err()
        );
    }
    std::fs::rename(dir.path().join("shard-0"), dir.path().join("shard-1")).unwrap();
    let moved = ShardStore::open(dir.path(), 1, options(Durability::Fsync));
    assert!(
        matches!(
            moved,
            Err(StoreError::ShardMismatch {
                expected: 1,
                found: 0,
                ..
            })
        ),
        "{:?}",
        moved.err()
    );
    assert!(matches!(
        ShardStore::open(dir.path(), MAX_SHARDS, options(Durability::Fsync)),
        Err(StoreError::ShardOutOfRange(_))
    ));
}

#[test]
fn durability_config_values_parse() {
    for mode in [Durability::Fsync, Durability::Batch, Durability::None] {
        assert_eq!(Durability::parse(mode.as_str()), Some(mode));
    }
    assert_eq!(Durability::parse("sometimes"), None);
    assert!(Durability::Batch.needs_periodic_flush());
    assert!(!Durability::Fsync.needs_periodic_flush());
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn damaged_records_are_reported_as_corrupt_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let c = open_conversation(&mut store, "s", "v");
    store
        .append_batch(&[message(c, "one", None), message(c, "two", None)])
        .unwrap();
    let view = store.read().unwrap();
    let mut valid = view.message(c, 2).unwrap().unwrap().to_owned_record();
    drop(view);

    // Garbage bytes: the string length points far outside the value.
    store.put_raw_message(c, 1, &[0xff; 40]).unwrap();
    // A valid record stored under the wrong key.
    valid.seq = 9;
    let misplaced = rkyv::to_bytes::<rkyv::rancor::Error>(&valid).unwrap();
    store.put_raw_message(c, 2, &misplaced).unwrap();

    let view = store.read().unwrap();
    let results: Vec<_> = view.messages_after(c, 0, 10).unwrap().collect();
    assert_eq!(results.len(), 2);
    assert!(
        matches!(
            &results[0],
            Err(StoreError::Corrupt {
                table: "messages",
                ..
            })
        ),
        "{:?}",
        results[0]
    );
    assert!(
        matches!(&results[1], Err(StoreError::Corrupt { detail, .. }) if detail.contains("seq")),
        "{:?}",
        results[1]
    );
    assert!(matches!(
        view.message(c, 1),
        Err(StoreError::Corrupt { .. })
    ));
}

#[test]
fn too_many_live_read_views_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut views = Vec::new();
    let error = loop {
        match store.read() {
            Ok(view) => views.push(view),
            Err(error) => break error,
        }
        assert!(
            views.len() <= MAX_READERS as usize,
            "reader limit not enforced"
        );
    };
    assert!(matches!(error, StoreError::ReadersFull), "{error:?}");
    // One slot holds the log's pinned checkpoint snapshot (`wal::meta_pages`).
    assert_eq!(views.len(), MAX_READERS as usize - 1);
    views.clear();
    assert!(store.read().is_ok(), "slots are released with their views");
}

#[test]
fn flusher_syncs_from_another_thread_without_keeping_the_store_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = ShardStore::open(dir.path(), 0, options(Durability::Batch)).unwrap();
    let c = open_conversation(&mut store, "s", "v");
    let flusher = store.flusher().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (started_tx, started) = std::sync::mpsc::channel();
    let background = {
        let (flusher, stop) = (flusher.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut flushes = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && flushes < 10_000 {
                flusher.flush().unwrap();
                flushes += 1;
                if flushes == 1 {
                    let _ = started_tx.send(());
                }
            }
            flushes
        })
    };
    // Writes start once the flusher runs, so the two overlap even on a loaded machine.
    started.recv().unwrap();
    for i in 0..200 {
        let id = format!("m{i}");
        store.append_batch(&[message(c, &id, Some(&id))]).unwrap();
    }
    store.set_map_size(128 << 20).unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(background.join().unwrap() > 0);
    drop(store);
    // The flusher holds only a file descriptor: the environment can be reopened.
    flusher.flush().unwrap();
    let store = ShardStore::open(dir.path(), 0, options(Durability::Batch)).unwrap();
    assert_eq!(store.last_seq(c).unwrap(), Some(200));
}

#[test]
fn visitor_secrets_keep_the_first_hash_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let set = |hash: [u8; 32]| Op::SetVisitorSecret {
        site: "acme".into(),
        visitor: "v1".into(),
        secret_hash: hash,
    };
    assert_eq!(
        store.apply(&[set([1; 32]), set([2; 32])]).unwrap(),
        vec![OpOutcome::Updated, OpOutcome::Updated]
    );
    drop(store);
    let store = open(dir.path());
    let view = store.read().unwrap();
    assert_eq!(view.visitor_secret("acme", "v1").unwrap(), Some([1; 32]));
    assert_eq!(view.visitor_secret("acme", "v2").unwrap(), None);
    assert_eq!(view.visitor_secret("acm", "ev1").unwrap(), None);
}

#[test]
fn delete_empty_removes_only_conversations_without_messages_or_agent() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let empty = open_conversation(&mut store, "acme", "silent");
    let spoken = open_conversation(&mut store, "acme", "talker");
    store
        .append_batch(&[message(spoken, "hi", Some("m1"))])
        .unwrap();
    let outcomes = store
        .apply(&[
            Op::DeleteEmpty {
                conversation: empty,
            },
            Op::DeleteEmpty {
                conversation: spoken,
            },
        ])
        .unwrap();
    assert_eq!(outcomes[0], OpOutcome::Updated);
    assert_eq!(
        outcomes[1],
        OpOutcome::Rejected(crate::store::Rejection::NotEmpty(spoken))
    );
    assert_eq!(store.conversation(empty).unwrap(), None);
    assert_eq!(
        store.conversation_of_visitor("acme", "silent").unwrap(),
        None
    );
    assert_eq!(
        store.conversation_of_visitor("acme", "talker").unwrap(),
        Some(spoken)
    );
    let open: Vec<ConversationId> = store
        .open_conversations()
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(open, vec![spoken]);
    // The visitor's next Open creates a new conversation.
    assert_ne!(open_conversation(&mut store, "acme", "silent"), empty);
}

#[test]
fn a_conversations_variant_is_stored_once_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (kept, empty);
    {
        let mut store = open(dir.path());
        kept = open_conversation(&mut store, "shop", "v");
        empty = open_conversation(&mut store, "shop", "w");
        assert_eq!(store.read().unwrap().variant(kept).unwrap(), None);
        let set = |conversation, variant: &str| Op::SetVariant {
            conversation,
            variant: variant.into(),
        };
        let outcomes = store
            .apply(&[
                set(kept, "strict"),
                set(kept, "control"),
                set(empty, "control"),
                set(kept, ""),
                set(kept, &"x".repeat(MAX_VARIANT_BYTES + 1)),
                set(ConversationId::from_parts(SHARD, 999), "a"),
            ])
            .unwrap();
        assert_eq!(
            outcomes[..3],
            [OpOutcome::Updated, OpOutcome::Updated, OpOutcome::Updated]
        );
        assert!(
            matches!(outcomes[3], OpOutcome::Rejected(Rejection::Empty { .. })),
            "{outcomes:?}"
        );
        assert!(
            matches!(outcomes[4], OpOutcome::Rejected(Rejection::TooLong { .. })),
            "{outcomes:?}"
        );
        assert!(
            matches!(
                outcomes[5],
                OpOutcome::Rejected(Rejection::UnknownConversation(_))
            ),
            "{outcomes:?}"
        );
        // The first variant stored stays.
        let view = store.read().unwrap();
        assert_eq!(view.variant(kept).unwrap().as_deref(), Some("strict"));
        assert_eq!(view.variant(empty).unwrap().as_deref(), Some("control"));
        drop(view);
        // Deleting an empty conversation deletes its variant too.
        let deleted = store
            .apply(&[Op::DeleteEmpty {
                conversation: empty,
            }])
            .unwrap();
        assert_eq!(deleted, [OpOutcome::Updated]);
        assert_eq!(store.read().unwrap().variant(empty).unwrap(), None);
    }
    let store = open(dir.path());
    let view = store.read().unwrap();
    assert_eq!(view.variant(kept).unwrap().as_deref(), Some("strict"));
}

/// A log left by a run with `durability = "fsync"` is recovered and removed by a run without
/// one; otherwise its saved meta pages would later take LMDB back past that run's commits.
#[test]
fn switching_the_log_off_and_on_again_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir
        .path()
        .join(format!("shard-{SHARD}"))
        .join(shard_store::LOG_FILE);
    let mut store = open(dir.path());
    let conversation = open_conversation(&mut store, "site", "v");
    store
        .append_batch(&[message(conversation, "with the log", None)])
        .unwrap();
    drop(store);
    assert!(log.exists());

    let mut store = ShardStore::open(dir.path(), SHARD, options(Durability::None)).unwrap();
    assert!(!log.exists(), "the run without a log removes the old one");
    store
        .append_batch(&[message(conversation, "without the log", None)])
        .unwrap();
    drop(store);

    let store = open(dir.path());
    let texts: Vec<String> = replay(&store, conversation)
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(texts, ["with the log", "without the log"]);
}

/// The pinned checkpoint snapshot keeps LMDB from reusing pages until the next checkpoint;
/// a checkpoint every [`shard_store::CHECKPOINT_COMMITS`] commits bounds what that costs.
/// Pinned across a whole 64 MiB log instead, these 600 commits (about 0.5 MB of copied pages
/// each) would leave a data file of about 300 MB; bounded, it stays near the live data.
#[test]
fn pinned_checkpoints_bound_the_data_file() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        map_size: 1 << 30,
        max_map_size: 1 << 30,
        durability: Durability::Fsync,
        log_bytes: 64 << 20,
        apply_interval: std::time::Duration::ZERO,
    };
    // Before the open, so that any write-behind the store makes falls inside the window.
    let started = std::time::Instant::now();
    let mut store = ShardStore::open(dir.path(), SHARD, options).unwrap();
    let conversations: Vec<_> = (0..100)
        .map(|i| open_conversation(&mut store, "site", &format!("v{i}")))
        .collect();
    let text = "x".repeat(100);
    for _ in 0..600 {
        let batch: Vec<_> = conversations
            .iter()
            .map(|&c| message(c, &text, None))
            .collect();
        store.append_batch(&batch).unwrap();
    }
    let used = store.reader().size().used_bytes;
    eprintln!("data file in use after 60,000 messages: {} MB", used >> 20);
    assert!(used < 120 << 20, "{} MB in use", used >> 20);
    assert_eq!(store.checkpoints(), (0, 0), "the log never filled");
    // Commits handed their pages to writeback at most once per WRITE_BEHIND_INTERVAL (the
    // first at once), and the file written behind is LMDB's data file.
    let elapsed = started.elapsed();
    let most = elapsed.as_millis() / shard_store::WRITE_BEHIND_INTERVAL.as_millis() + 1;
    let behind = u128::from(store.writes_behind());
    assert!(
        (1..=most).contains(&behind),
        "{behind} write-behinds in {elapsed:?} (at most {most})"
    );
    let data_file = std::fs::metadata(store.path().join("data.mdb")).unwrap();
    assert_eq!(
        store.write_behind_inode(),
        Some(std::os::unix::fs::MetadataExt::ino(&data_file))
    );
}

/// Write-behind is paced: the first commit's at once, then one per interval, whatever the
/// commit rate (a clock going backwards counts as no time passed).
#[test]
fn write_behind_is_paced() {
    use shard_store::{write_behind_due, WRITE_BEHIND_INTERVAL};
    let start = std::time::Instant::now();
    assert!(write_behind_due(None, start));
    assert!(!write_behind_due(Some(start), start));
    assert!(!write_behind_due(
        Some(start),
        start + WRITE_BEHIND_INTERVAL - std::time::Duration::from_micros(1)
    ));
    assert!(write_behind_due(Some(start), start + WRITE_BEHIND_INTERVAL));
    assert!(!write_behind_due(
        Some(start + WRITE_BEHIND_INTERVAL),
        start
    ));
}
