//! The bot's plugin chain: message handlers that look at a visitor message in turn and decide
//! what happens to it — let it through, answer it, hand the conversation to a human, or refuse it.
//!
//! Sans-IO and synchronous: no clocks (time comes in as `now_ms`), no sockets, no inference. The
//! driver (one per shard) owns a [`Chain`] and runs it for each visitor message:
//!
//! 1. build a [`BotContext`] (`intent: None`) and call [`Chain::run`] from index 0;
//! 2. on [`Verdict::NeedIntent`], ask the inference worker for an [`IntentMatch`] (with a
//!    deadline; on overload the worker answers with a lexical match and `degraded: true`), put it
//!    in `ctx.intent` and call `run` again from the index it returned;
//! 3. on [`Verdict::Later`] (a handler waiting for something outside the process, see
//!    [`later`]), await the answer without blocking the shard;
//! 4. act on the final verdict; a chain that ends in [`Verdict::Continue`] (no handler decided)
//!    is a fallback turn — [`Verdict::fallback`] builds the standard one.
//!
//! `ctx.text` is what gets stored: handlers may rewrite it (card-number masking), so the driver
//! stores it after the run, never the original. [`Verdict::next_failed_turns`] is the one rule for
//! the "consecutive failed bot turns" counter that `human_transfer` reads.
//!
//! Invariants:
//! - a chain runs its handlers by descending [`MessageHandler::priority`], ties in config order;
//! - a handler is never called twice for one message, except the handler that asked for the intent,
//!   which is called again (with `ctx.intent` filled) when the driver resumes — so a handler that
//!   returns `NeedIntent` must not have changed its own state in that call;
//! - `NeedIntent` is only returned while `ctx.intent` is `None`, so resuming always makes progress;
//! - while an agent has the conversation (`ctx.agent_assigned`), only guard handlers
//!   ([`MessageHandler::is_guard`], e.g. risk control) run: the bot stays silent.
//!
//! Modules: [`chain`] (registry and chain), [`gray`] (which `[[bot.variants]]` variant answers
//! a conversation), one module per built-in handler, [`words`] (whole-word
//! matching) and [`cards`] (card-number masking). `docs/plugins.md` shows how to add a handler.

pub mod cards;
pub mod chain;
pub mod echo;
pub mod fallback;
pub mod gray;
pub mod human_transfer;
pub mod intent;
pub mod later;
pub mod risk_control;
pub mod words;

pub use chain::{Chain, HandlerFactory, HandlerSpec, Registry};
pub use echo::Echo;
pub use fallback::{Fallback, FALLBACK_TEXT};
pub use human_transfer::HumanTransfer;
pub use intent::IntentAnswer;
pub use later::{later, Later, LaterAnswer};
pub use risk_control::RiskControl;

/// Priorities of the built-in handlers (higher runs first). Custom handlers pick a value in
/// between to run between two built-ins.
pub mod priority {
    pub const RISK_CONTROL: i32 = 400;
    pub const HUMAN_TRANSFER: i32 = 300;
    pub const INTENT: i32 = 200;
    pub const ECHO: i32 = 150;
    pub const FALLBACK: i32 = 100;
}

/// What a handler decided about a message.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Not mine: the next handler gets the message.
    Continue,
    /// The bot answers with `text`.
    Reply {
        text: String,
        /// The knowledge-base intent the answer came from, if any.
        intent: Option<String>,
        /// The score of the match behind the answer (0 when there is none).
        confidence: f32,
        /// The bot could not help (fallback): the turn counts as failed. A reply with
        /// `failed: false` resets the failed-turn counter.
        failed: bool,
        /// The answer came from the lexical fallback match, not the model (a metric counts these).
        degraded: bool,
    },
    /// Queue the conversation for a human agent.
    Handoff { reason: HandoffReason },
    /// Refuse the message: it is not stored, and the visitor gets an error frame with `code`
    /// and `message`.
    Block { code: &'static str, message: String },
    /// The handler needs `ctx.intent`; fill it and resume the chain at the returned index.
    NeedIntent,
    /// The handler answers later (it waits for something outside the process, on a thread of
    /// its own); the driver awaits the answer without blocking the shard. See [`later`].
    /// Answer handlers only: a guard's verdict is needed before the message is stored.
    Later(Later),
}

impl Verdict {
    /// The standard fallback turn: the reply the driver sends when the chain ended without a
    /// decision (and what the `fallback` handler answers).
    pub fn fallback(ctx: &BotContext<'_>) -> Verdict {
        Verdict::Reply {
            text: FALLBACK_TEXT.to_string(),
            intent: None,
            confidence: ctx.intent.as_ref().map_or(0.0, |m| m.score),
            failed: true,
            degraded: false,
        }
    }

    /// The conversation's consecutive-failed-turns counter after this verdict, given its value
    /// before: a failed reply (fallback) adds one; a successful reply or a handoff resets it to 0;
    /// a block (the message never reached the bot) and `Continue`/`NeedIntent` (no decision yet)
    /// leave it unchanged. Treat a chain that ended in `Continue` as [`Verdict::fallback`] first.
    pub fn next_failed_turns(&self, failed_turns: u32) -> u32 {
        match self {
            Verdict::Reply { failed: true, .. } => failed_turns.saturating_add(1),
            Verdict::Reply { failed: false, .. } | Verdict::Handoff { .. } => 0,
            Verdict::Block { .. } | Verdict::Continue | Verdict::NeedIntent | Verdict::Later(_) => {
                failed_turns
            }
        }
    }
}

/// Why a conversation goes to a human.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HandoffReason {
    /// The visitor asked for one ("talk to a human").
    Explicit,
    /// The knowledge base recognised a "talk to a human" intent.
    Intent,
    /// `failed_turns_before_handoff` consecutive turns the bot could not answer.
    TooManyFailures,
}

impl HandoffReason {
    /// A stable lower-case name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            HandoffReason::Explicit => "explicit",
            HandoffReason::Intent => "intent",
            HandoffReason::TooManyFailures => "too_many_failures",
        }
    }
}

/// The knowledge base's best match for a message.
#[derive(Clone, Debug, PartialEq)]
pub struct IntentMatch {
    /// The best intent.
    pub intent: String,
    /// Its answer; `None` when the entry has none (the bot cannot answer with it).
    pub answer: Option<String>,
    /// Score of the best intent, 0..=1 (cosine similarity; the lexical fallback must use the same
    /// scale so the thresholds apply).
    pub score: f32,
    /// Score of the second-best intent (0 when there is none).
    pub second_score: f32,
    /// The lexical fallback produced this match because the inference queue was overloaded.
    pub degraded: bool,
}

/// One visitor message and what the chain knows about its conversation.
#[derive(Clone, Debug)]
pub struct BotContext<'a> {
    pub conversation: u64,
    pub visitor: &'a str,
    pub site: &'a str,
    /// The message text. Handlers may rewrite it (masking); the rewritten text is what is stored.
    pub text: String,
    /// Consecutive failed bot turns so far (see [`Verdict::next_failed_turns`]).
    pub failed_turns: u32,
    /// An agent has the conversation: only guard handlers run.
    pub agent_assigned: bool,
    /// The knowledge-base match, filled by the driver after [`Verdict::NeedIntent`].
    pub intent: Option<IntentMatch>,
    /// The time the message arrived, in milliseconds (any monotonic origin).
    pub now_ms: u64,
}

impl<'a> BotContext<'a> {
    /// A context for a message of a conversation with no failed turns, no agent and no intent.
    pub fn new(
        conversation: u64,
        site: &'a str,
        visitor: &'a str,
        text: impl Into<String>,
    ) -> Self {
        BotContext {
            conversation,
            visitor,
            site,
            text: text.into(),
            failed_turns: 0,
            agent_assigned: false,
            intent: None,
            now_ms: 0,
        }
    }
}

/// A step of the chain. Built by a factory registered in the [`Registry`], once per shard, so
/// it may keep state (`&mut self`) without locks.
pub trait MessageHandler {
    /// The name used in logs (the registry name by convention).
    fn name(&self) -> &'static str;
    /// Higher runs first; see [`priority`] for the built-ins.
    fn priority(&self) -> i32;
    /// The handler always needs the intent: the chain returns [`Verdict::NeedIntent`] before
    /// calling it while `ctx.intent` is `None`. A handler that needs it only sometimes returns
    /// `NeedIntent` from [`handle`](Self::handle) instead.
    fn needs_intent(&self) -> bool {
        false
    }
    /// The handler also runs after an agent took the conversation (risk control). Others are
    /// skipped then.
    fn is_guard(&self) -> bool {
        false
    }
    /// Decides about `ctx`; may rewrite `ctx.text`.
    fn handle(&mut self, ctx: &mut BotContext<'_>) -> Verdict;
    /// Drops per-visitor state idle at `now_ms`. Called by [`Chain::prune`] from a timer.
    fn prune(&mut self, _now_ms: u64) {}
}

/// Errors building a chain. Each names the handler or the config key at fault.
#[derive(Debug, thiserror::Error)]
pub enum BotError {
    #[error("bot.handlers: unknown handler \"{name}\" (registered: {registered})")]
    UnknownHandler { name: String, registered: String },
    #[error("bot.handlers: handler \"{name}\" is listed twice")]
    DuplicateHandler { name: String },
    #[error("a bot handler named \"{name}\" is already registered")]
    AlreadyRegistered { name: String },
    #[error("risk_control.blocked_patterns: invalid pattern {pattern:?}: {source}")]
    BadPattern {
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error("{key}: cannot compile the list: {source}")]
    BadList {
        key: &'static str,
        #[source]
        source: regex::Error,
    },
    /// For custom handlers' factories.
    #[error("bot handler \"{name}\": {message}")]
    Handler { name: String, message: String },
}
