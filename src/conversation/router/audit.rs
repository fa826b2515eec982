//! The audit records of conversation routing: an agent's accept, transfer or watch is recorded
//! once its outcome is known, and only when it was carried out.

use super::*;

/// Appends an agent's action on a conversation to the audit chain (the sink logs it too).
pub(super) fn record(event: AuditEvent) {
    crate::audit::emit(event);
}

/// Whether a dispatcher event is an agent's action whose outcome is audited.
pub(super) fn auditable(event: &DispatchEvent) -> bool {
    matches!(
        event,
        DispatchEvent::Accept { .. } | DispatchEvent::Transfer { .. }
    )
}

/// The audit records of an agent's `accept` or `transfer` once the dispatcher has handled
/// it: what it carried out (`conversation_accepted`, `conversation_transferred` with `from`
/// and `to`), or `access_denied` when a role without `TransferAny` tried to move a
/// conversation `held_by` someone else. Other refusals (queue races, capacity) are not
/// security events and leave no record. Pure, so it is unit-tested.
pub(super) fn dispatch_audit(
    event: &DispatchEvent,
    held_by: Option<&str>,
    actions: &[DispatchAction],
) -> Vec<AuditEvent> {
    let mut records = Vec::new();
    match event {
        DispatchEvent::Accept {
            agent,
            conversation,
            ..
        } => {
            let taken = actions.iter().any(|action| {
                matches!(action, DispatchAction::Assigned { conversation: c, agent: a, .. }
                    if c == conversation && a == agent)
            });
            if taken {
                records.push(
                    AuditEvent::new("conversation_accepted", agent)
                        .target(conversation.0.to_string()),
                );
            }
        }
        DispatchEvent::Transfer {
            from: requester,
            conversation,
            role,
            ..
        } => {
            let done = actions.iter().find_map(|action| match action {
                DispatchAction::Transferred {
                    conversation: c,
                    from,
                    to,
                    ..
                } if c == conversation => Some((from, to)),
                _ => None,
            });
            if let Some((from, to)) = done {
                records.push(
                    AuditEvent::new("conversation_transferred", requester)
                        .target(conversation.0.to_string())
                        .detail("from", from.as_str())
                        .detail("to", to.as_str())
                        .detail("role", role.as_str()),
                );
            } else if held_by.is_some_and(|holder| holder != requester)
                && !crate::auth::rbac::allows(*role, crate::auth::rbac::Action::TransferAny)
            {
                records.push(
                    AuditEvent::new("access_denied", requester)
                        .target(conversation.0.to_string())
                        .detail("role", role.as_str())
                        .detail("action", "TransferAny"),
                );
            }
        }
        _ => {}
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::rbac::Role;

    pub(super) fn sess() -> dispatch::SessionRef {
        dispatch::SessionRef {
            shard: 0,
            session: 1,
        }
    }

    pub(super) fn transfer(requester: &str, role: Role) -> DispatchEvent {
        DispatchEvent::Transfer {
            from: requester.into(),
            session: sess(),
            conversation: dispatch::ConversationId(9),
            to: "carol".into(),
            role,
        }
    }

    #[test]
    pub(super) fn accepts_and_transfers_are_audited_only_when_carried_out() {
        let accept = DispatchEvent::Accept {
            agent: "alice".into(),
            session: sess(),
            conversation: dispatch::ConversationId(9),
        };
        let assigned = DispatchAction::Assigned {
            conversation: dispatch::ConversationId(9),
            owner: 0,
            agent: "alice".into(),
            agent_name: "Alice".into(),
            sessions: vec![sess()],
        };
        let records = dispatch_audit(&accept, None, std::slice::from_ref(&assigned));
        assert_eq!(records.len(), 1);
        assert_eq!(
            (
                records[0].kind.as_str(),
                records[0].actor.as_str(),
                records[0].target.as_str()
            ),
            ("conversation_accepted", "alice", "9")
        );
        let refused = DispatchAction::Rejected {
            session: sess(),
            code: "not_queued",
            message: "taken".into(),
        };
        assert!(dispatch_audit(&accept, None, std::slice::from_ref(&refused)).is_empty());

        // A supervisor moves alice's conversation: the supervisor is the actor.
        let moved = DispatchAction::Transferred {
            conversation: dispatch::ConversationId(9),
            owner: 0,
            from: "alice".into(),
            to: "carol".into(),
            to_name: "Carol".into(),
            sessions: vec![],
            from_sessions: vec![],
        };
        let records = dispatch_audit(
            &transfer("sue", Role::Supervisor),
            Some("alice"),
            std::slice::from_ref(&moved),
        );
        assert_eq!(records.len(), 1);
        let record = &records[0];
        assert_eq!(record.kind, "conversation_transferred");
        assert_eq!(record.actor, "sue");
        assert_eq!(record.target, "9");
        assert_eq!(record.detail["from"], "alice");
        assert_eq!(record.detail["to"], "carol");
        assert_eq!(record.detail["role"], "supervisor");

        // An agent trying to move someone else's conversation is refused by role: audited.
        let denied = DispatchAction::Rejected {
            session: sess(),
            code: "not_assigned",
            message: "no".into(),
        };
        let records = dispatch_audit(
            &transfer("bob", Role::Agent),
            Some("alice"),
            std::slice::from_ref(&denied),
        );
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].kind, "access_denied");
        assert_eq!(records[0].actor, "bob");
        // Its own conversation refused for another reason (target offline): no record.
        assert!(dispatch_audit(
            &transfer("alice", Role::Agent),
            Some("alice"),
            std::slice::from_ref(&denied)
        )
        .is_empty());
        // Other events are not agent actions.
        assert!(dispatch_audit(&DispatchEvent::Tick, None, &[assigned]).is_empty());
    }
}
