//! Role-based access control: the ONE table that says which role may do what.
//!
//! Every `/api/` endpoint and every agent command that depends on who asks checks
//! [`allows`]; nothing else in the code decides permissions. The table is written as one
//! row per [`Action`] with one column per [`Role`], so a reviewer reads a change as one
//! line. A table-driven test below walks every (role, action) pair.
//!
//! Roles, in words:
//! - `agent` works the queue and acts only on conversations assigned to them (the owner
//!   state machine additionally refuses `not_assigned` for everything else);
//! - `supervisor` does what an agent does, sees every conversation, transfers any
//!   conversation, manages the canned replies every agent reads, and reads metrics and the
//!   audit log;
//! - `admin` manages agent accounts, the knowledge base and the configuration, and has
//!   every supervisor right.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What an account is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Agent,
    Supervisor,
    Admin,
}

impl Role {
    /// Every role, in column order of the table.
    pub const ALL: [Role; 3] = [Role::Agent, Role::Supervisor, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Supervisor => "supervisor",
            Role::Admin => "admin",
        }
    }

    fn column(self) -> usize {
        match self {
            Role::Agent => 0,
            Role::Supervisor => 1,
            Role::Admin => 2,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of `admin`, `supervisor`, `agent`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: use admin, supervisor or agent")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        match s {
            "agent" => Ok(Role::Agent),
            "supervisor" => Ok(Role::Supervisor),
            "admin" => Ok(Role::Admin),
            other => Err(UnknownRole(other.to_owned())),
        }
    }
}

/// Something an account may be allowed to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// See the queue of waiting conversations.
    ViewQueue,
    /// Take a queued conversation.
    AcceptConversation,
    /// Write, type, mark read in a conversation assigned to oneself.
    MessageAssigned,
    /// Read any conversation, assigned to anyone.
    ReadAnyConversation,
    /// Hand a conversation assigned to oneself to another agent.
    TransferOwn,
    /// Move any assigned conversation to another agent.
    TransferAny,
    /// Close a conversation assigned to oneself.
    CloseAssigned,
    /// Create, list, disable, enable agent accounts and change their roles.
    ManageAgents,
    /// Import, list, change and delete knowledge-base entries.
    ManageKnowledgeBase,
    /// Ask the knowledge base a question as a visitor would (`POST /api/kb/try`).
    TryKnowledgeBase,
    /// Read the canned replies (to paste them into a conversation in the console).
    UseCannedReplies,
    /// Create, change and delete canned replies.
    ManageCannedReplies,
    /// Change the configuration.
    ManageConfig,
    /// Read the audit log.
    ViewAudit,
    /// Read the metrics.
    ViewMetrics,
    /// Read one's own account (`GET /api/me`) and refresh one's token.
    ViewOwnAccount,
}

impl Action {
    /// Every action, in row order of the table.
    pub const ALL: [Action; 16] = [
        Action::ViewQueue,
        Action::AcceptConversation,
        Action::MessageAssigned,
        Action::ReadAnyConversation,
        Action::TransferOwn,
        Action::TransferAny,
        Action::CloseAssigned,
        Action::ManageAgents,
        Action::ManageKnowledgeBase,
        Action::TryKnowledgeBase,
        Action::UseCannedReplies,
        Action::ManageCannedReplies,
        Action::ManageConfig,
        Action::ViewAudit,
        Action::ViewMetrics,
        Action::ViewOwnAccount,
    ];
}

const Y: bool = true;
const N: bool = false;

/// THE table. Columns: agent, supervisor, admin.
const fn row(action: Action) -> [bool; 3] {
    match action {
        //                                  agent supervisor admin
        Action::ViewQueue => [Y, Y, Y],
        Action::AcceptConversation => [Y, Y, Y],
        Action::MessageAssigned => [Y, Y, Y],
        Action::ReadAnyConversation => [N, Y, Y],
        Action::TransferOwn => [Y, Y, Y],
        Action::TransferAny => [N, Y, Y],
        Action::CloseAssigned => [Y, Y, Y],
        Action::ManageAgents => [N, N, Y],
        Action::ManageKnowledgeBase => [N, N, Y],
        Action::TryKnowledgeBase => [N, Y, Y],
        Action::UseCannedReplies => [Y, Y, Y],
        Action::ManageCannedReplies => [N, Y, Y],
        Action::ManageConfig => [N, N, Y],
        Action::ViewAudit => [N, Y, Y],
        Action::ViewMetrics => [N, Y, Y],
        Action::ViewOwnAccount => [Y, Y, Y],
    }
}

/// Whether `role` may do `action`.
pub fn allows(role: Role, action: Action) -> bool {
    row(action)[role.column()]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The expected matrix, written out pair by pair independently of `row`: every
    /// (role, action) pair appears exactly once, allowed or denied.
    const EXPECTED: &[(Role, Action, bool)] = &[
        (Role::Agent, Action::ViewQueue, true),
        (Role::Agent, Action::AcceptConversation, true),
        (Role::Agent, Action::MessageAssigned, true),
        (Role::Agent, Action::ReadAnyConversation, false),
        (Role::Agent, Action::TransferOwn, true),
        (Role::Agent, Action::TransferAny, false),
        (Role::Agent, Action::CloseAssigned, true),
        (Role::Agent, Action::ManageAgents, false),
        (Role::Agent, Action::ManageKnowledgeBase, false),
        (Role::Agent, Action::UseCannedReplies, true),
        (Role::Agent, Action::ManageCannedReplies, false),
        (Role::Agent, Action::TryKnowledgeBase, false),
        (Role::Agent, Action::ManageConfig, false),
        (Role::Agent, Action::ViewAudit, false),
        (Role::Agent, Action::ViewMetrics, false),
        (Role::Agent, Action::ViewOwnAccount, true),
        (Role::Supervisor, Action::ViewQueue, true),
        (Role::Supervisor, Action::AcceptConversation, true),
        (Role::Supervisor, Action::MessageAssigned, true),
        (Role::Supervisor, Action::ReadAnyConversation, true),
        (Role::Supervisor, Action::TransferOwn, true),
        (Role::Supervisor, Action::TransferAny, true),
        (Role::Supervisor, Action::CloseAssigned, true),
        (Role::Supervisor, Action::ManageAgents, false),
        (Role::Supervisor, Action::ManageKnowledgeBase, false),
        (Role::Supervisor, Action::UseCannedReplies, true),
        (Role::Supervisor, Action::ManageCannedReplies, true),
        (Role::Supervisor, Action::TryKnowledgeBase, true),
        (Role::Supervisor, Action::ManageConfig, false),
        (Role::Supervisor, Action::ViewAudit, true),
        (Role::Supervisor, Action::ViewMetrics, true),
        (Role::Supervisor, Action::ViewOwnAccount, true),
        (Role::Admin, Action::ViewQueue, true),
        (Role::Admin, Action::AcceptConversation, true),
        (Role::Admin, Action::MessageAssigned, true),
        (Role::Admin, Action::ReadAnyConversation, true),
        (Role::Admin, Action::TransferOwn, true),
        (Role::Admin, Action::TransferAny, true),
        (Role::Admin, Action::CloseAssigned, true),
        (Role::Admin, Action::ManageAgents, true),
        (Role::Admin, Action::ManageKnowledgeBase, true),
        (Role::Admin, Action::UseCannedReplies, true),
        (Role::Admin, Action::ManageCannedReplies, true),
        (Role::Admin, Action::TryKnowledgeBase, true),
        (Role::Admin, Action::ManageConfig, true),
        (Role::Admin, Action::ViewAudit, true),
        (Role::Admin, Action::ViewMetrics, true),
        (Role::Admin, Action::ViewOwnAccount, true),
    ];

    #[test]
    fn every_role_action_pair_matches_the_matrix() {
        assert_eq!(EXPECTED.len(), Role::ALL.len() * Action::ALL.len());
        for role in Role::ALL {
            for action in Action::ALL {
                let expected: Vec<bool> = EXPECTED
                    .iter()
                    .filter(|(r, a, _)| *r == role && *a == action)
                    .map(|(_, _, allowed)| *allowed)
                    .collect();
                assert_eq!(expected.len(), 1, "{role} {action:?} listed once");
                assert_eq!(
                    allows(role, action),
                    expected[0],
                    "{role} may {}do {action:?}",
                    if expected[0] { "" } else { "not " }
                );
            }
        }
    }

    #[test]
    fn roles_parse_and_print() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("root".parse::<Role>().is_err());
        assert!("Admin".parse::<Role>().is_err());
    }
}
