//! `soak`: a mixed load held for `--duration` while the server's RSS is sampled, to show whether memory
//! creeps. Visitors live for a random time (exponential, mean `--mean-session`), then drop (half with a
//! close handshake, half abruptly) and reconnect as the same visitor with `resume` = the last sequence
//! number they hold, re-sending every message not yet acked (same id). Relay visitors (handed to agents)
//! send probes the agents echo; the others ask the bot (switchboard only).
//!
//! Checks, per visitor, against the exactly-once contract of issue 4: the sequence numbers seen (acks and
//! delivered messages) are dense from the conversation start (gaps counted), no seq is delivered twice on
//! one connection (a reconnect resumes from the contiguous prefix held, so what lies above a gap comes again),
//! nothing at or below the resume point is replayed, a resent id is acked with its original seq, and every
//! probe's reply arrives (lost counted after a final drain). With `--protocol relay` (the peers: no
//! storage, no resume) only the churn, relay and RSS parts apply, and messages sent while a visitor is
//! away are lost by design of those servers.
//!
//! The ledger (switchboard): after the final drain (a visitor still holding unacked messages reconnects
//! and re-sends them, a few times), every visitor reconnects with `resume=0` and reads its whole
//! conversation back: every message ever acked must be there, once, at the seq it was acked with, with
//! the text that was sent (`ledger_lost` counts the others), and no text sent once may be stored twice
//! (`ledger_stored_twice`). Together with the per-connection duplicate deliveries this is the verdict:
//! `switchboard-bench soak` exits 2 when anything acked was lost or anything duplicated.
//!
//! Chaos (`--server-cmd CMD --chaos`, see `crate::chaos`): the bench owns the server and SIGKILLs it at
//! random intervals, restarting it on the same data; visitors and agents notice the dead connection and
//! reconnect (resume, re-send), and `--flooders` visitors send as fast as their window allows, taking
//! their refusals (`rate_limited`: pause for `retry_after`; `overloaded`: re-send that id after
//! `retry_after`; close 1008/1013: reconnect), counted by kind.

use std::cell::{Cell, RefCell};
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::chaos::{Chaos, ChaosLog, ServerProc};
use crate::cli::SoakArgs;
use crate::payload::Probe;
use crate::progress::Bars;
use crate::protocol::{self, Protocol, ServerFrame};
use crate::report::Report;
use crate::runtime::{run_shards, with_timeout, Coordinator, Phase, Progress};
use crate::scenario::{
    agent_loop, bump, close_all, close_conversations, handoff_until_assigned, merge_tally,
    open_session, seed, AckedReplies, AgentStats, Ctx, Hello, Tally,
};
use crate::stats::{Arrival, Arrivals, Latency};
use crate::wsclient::{Incoming, WsReader, WsWriter};

/// What the read-back at the end found, summed over visitors.
#[derive(Debug, Default, Clone, PartialEq)]
struct Ledger {
    /// Visitors whose conversation was read back.
    visitors: u64,
    /// Visitors whose conversation could not be read back (no connection, incomplete history).
    unverified: u64,
    /// Distinct message ids acked.
    acked: u64,
    /// Acked ids found at their seq with their text.
    present: u64,
    /// Acked ids not found at their seq with their text.
    lost: u64,
    /// Extra copies of a text sent once (one id) stored at more than one seq.
    stored_twice: u64,
    /// Seqs missing from the read-back history (between the conversation start and its last seq).
    holes: u64,
    /// Duplicate deliveries on the read-back connections.
    duplicate_deliveries: u64,
    /// Read-backs that were given another visitor id (the secret no longer opened the conversation).
    identity_lost: u64,
    /// Acked messages whose echo (an agent's reply with the same text) is stored.
    echoed: u64,
    /// Agent replies acked in the conversations read back ...
    agent_acked: u64,
    /// ... and those not found at their seq as the echo of the message they answered.
    agent_lost: u64,
    /// The first few lost or duplicated messages, described for the report's notes.
    examples: Vec<String>,
}

/// Examples of lost or duplicated messages kept for the notes.
const EXAMPLES: usize = 12;

impl Ledger {
    fn merge(&mut self, o: &Ledger) {
        self.visitors += o.visitors;
        self.unverified += o.unverified;
        self.acked += o.acked;
        self.present += o.present;
        self.lost += o.lost;
        self.stored_twice += o.stored_twice;
        self.holes += o.holes;
        self.duplicate_deliveries += o.duplicate_deliveries;
        self.identity_lost += o.identity_lost;
        self.echoed += o.echoed;
        self.agent_acked += o.agent_acked;
        self.agent_lost += o.agent_lost;
        for e in &o.examples {
            if self.examples.len() < EXAMPLES {
                self.examples.push(e.clone());
            }
        }
    }
}

#[derive(Debug, Default)]
struct SoakTotals {
    connects: u64,
    connect_failures: Tally,
    errors: Tally,
    clean_disconnects: u64,
    abrupt_disconnects: u64,
    /// Connections the server side ended (a kill, a close 1008/1013, a reset).
    server_drops: u64,
    agent_reconnects: u64,
    /// Visitor messages an agent session received in a conversation it had not been sent
    /// `assigned` for (from this run's visitors or not): it does not answer them.
    agent_unassigned_messages: u64,
    sent: u64,
    resent: u64,
    acks: u64,
    acked_ids: u64,
    probes: u64,
    replies: u64,
    lost: u64,
    duplicate_replies: u64,
    bot_answers: u64,
    seq_gaps: u64,
    duplicate_deliveries: u64,
    replayed_below_resume: u64,
    ack_conflicts: u64,
    unacked_at_end: u64,
    flood_sent: u64,
    flood_resent: u64,
    flood_acked: u64,
    flood_unacked_at_end: u64,
    /// Refused frames by who and code (`visitor rate_limited`, `flooder overloaded`).
    refusals: Tally,
    /// Close codes the server sent, by who (`flooder close 1008`).
    closes: Tally,
    ledger: Ledger,
    latency: Latency,
}

impl SoakTotals {
    fn merge(&mut self, o: SoakTotals) {
        self.connects += o.connects;
        merge_tally(&mut self.connect_failures, &o.connect_failures);
        merge_tally(&mut self.errors, &o.errors);
        self.clean_disconnects += o.clean_disconnects;
        self.abrupt_disconnects += o.abrupt_disconnects;
        self.server_drops += o.server_drops;
        self.agent_reconnects += o.agent_reconnects;
        self.agent_unassigned_messages += o.agent_unassigned_messages;
        self.sent += o.sent;
        self.resent += o.resent;
        self.acks += o.acks;
        self.acked_ids += o.acked_ids;
        self.probes += o.probes;
        self.replies += o.replies;
        self.lost += o.lost;
        self.duplicate_replies += o.duplicate_replies;
        self.bot_answers += o.bot_answers;
        self.seq_gaps += o.seq_gaps;
        self.duplicate_deliveries += o.duplicate_deliveries;
        self.replayed_below_resume += o.replayed_below_resume;
        self.ack_conflicts += o.ack_conflicts;
        self.unacked_at_end += o.unacked_at_end;
        self.flood_sent += o.flood_sent;
        self.flood_resent += o.flood_resent;
        self.flood_acked += o.flood_acked;
        self.flood_unacked_at_end += o.flood_unacked_at_end;
        merge_tally(&mut self.refusals, &o.refusals);
        merge_tally(&mut self.closes, &o.closes);
        self.ledger.merge(&o.ledger);
        self.latency.merge(&o.latency);
    }
}

/// What one visitor knows across its reconnections.
#[derive(Default)]
struct VisitorBook {
    /// The visitor id asked for on every connection.
    visitor: String,
    /// `seq` of `hello` on the first connection: the conversation's messages before this run.
    baseline: Option<u64>,
    /// Sequence numbers seen in acks or delivered messages.
    seen: Arrivals,
    /// Sequence numbers delivered on the current connection. A reconnect resumes from the
    /// contiguous prefix it holds, so messages above a gap (its own message whose ack was lost
    /// in an abrupt drop) are rightly replayed again: only a second delivery within one
    /// connection breaks the contract (and anything at or below `resume`, counted apart).
    delivered: Arrivals,
    /// Duplicate deliveries of earlier connections.
    duplicate_deliveries: u64,
    max_seq: u64,
    /// Resume point given on the current connection.
    resume: Option<u64>,
    acked: HashMap<String, u64>,
    unacked: VecDeque<(String, String)>,
    /// Hash of the text sent under each id, for the ledger.
    texts: HashMap<String, u64>,
    /// After a `rate_limited` or `flood` refusal: send nothing before this instant ...
    pause_until: Option<Instant>,
    /// ... and then re-send the unacked messages (which one was refused is not said).
    resend_due: bool,
    replies: Arrivals,
    probes_sent: u64,
    assigned: bool,
    /// The visitor's secret from its first `hello`: reconnecting to the visitor id needs it.
    secret: Option<String>,
    /// Reconnects on which the server issued a new secret although messages had been acked.
    resets: Vec<String>,
    /// The conversation, from the acks.
    conversation: Option<String>,
}

impl VisitorBook {
    fn new(visitor: String) -> VisitorBook {
        VisitorBook {
            visitor,
            ..VisitorBook::default()
        }
    }

    /// Highest seq such that every seq from the baseline up to it has been seen.
    fn contiguous(&self) -> u64 {
        let base = self.baseline.unwrap_or(0);
        let mut s = base;
        while self.seen.contains(s + 1) {
            s += 1;
        }
        s
    }

    fn gaps(&self) -> u64 {
        let base = self.baseline.unwrap_or(0);
        (base + 1..=self.max_seq)
            .filter(|s| !self.seen.contains(*s))
            .count() as u64
    }

    /// A new connection's `hello`: the baseline of the first, the secret when one is issued, and a
    /// fresh per-connection delivery record.
    fn connected(&mut self, resume: Option<u64>, hello: Option<&Hello>) {
        self.resume = resume;
        self.duplicate_deliveries += std::mem::take(&mut self.delivered).duplicates;
        if self.baseline.is_none() {
            self.baseline = Some(hello.and_then(|h| h.seq).unwrap_or(0));
        }
        if let Some(secret) = hello.and_then(|h| h.secret.clone()) {
            if self.secret.is_some() && !self.acked.is_empty() {
                // The server made this a new visitor although it acked messages to it.
                self.resets.push(format!(
                    "identity reset: visitor {} was issued a new secret on a reconnect (hello {:?} seq {:?}) after {} acked messages (highest seq {})",
                    self.visitor,
                    hello.and_then(|h| h.visitor.clone()),
                    hello.and_then(|h| h.seq),
                    self.acked.len(),
                    self.acked.values().max().copied().unwrap_or(0)
                ));
            }
            self.secret = Some(secret);
        }
    }

    /// Records a message about to be sent: unacked until its ack, its text kept for the ledger.
    fn sending(&mut self, id: &str, frame: &str, text: &str) {
        self.texts.insert(id.to_string(), text_hash(text));
        self.unacked.push_back((id.to_string(), frame.to_string()));
    }
}

fn text_hash(text: &str) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Compares what a visitor was acked with its conversation read back (`seq -> (from visitor, text
/// hash)`, messages from `base + 1` to `last`).
fn reconcile(
    book: &VisitorBook,
    history: &HashMap<u64, (bool, u64)>,
    base: u64,
    last: u64,
    replies: &HashMap<u64, u64>,
) -> Ledger {
    let mut l = Ledger {
        visitors: 1,
        acked: book.acked.len() as u64,
        identity_lost: book.resets.len() as u64,
        examples: book.resets.iter().take(EXAMPLES).cloned().collect(),
        ..Ledger::default()
    };
    let mut acked: Vec<(&String, &u64)> = book.acked.iter().collect();
    acked.sort_by_key(|(_, seq)| **seq);
    for (id, seq) in acked {
        match (history.get(seq), book.texts.get(id)) {
            (Some((true, stored)), Some(sent)) if stored == sent => l.present += 1,
            (found, _) => {
                l.lost += 1;
                if l.examples.len() < EXAMPLES {
                    let what = match found {
                        None => "no message at that seq".to_string(),
                        Some((false, _)) => "an agent or bot message there".to_string(),
                        Some((true, _)) => "another text there".to_string(),
                    };
                    l.examples.push(format!(
                        "lost: visitor {} id {id} acked at seq {seq}, read back (last seq {last}): {what}",
                        book.visitor
                    ));
                }
            }
        }
    }
    // Agent replies acked in this conversation (by the time of the hello: seq <= last): at their
    // seq, the echo of the message they answer.
    for (reply_seq, answered) in replies.iter().filter(|(s, _)| **s <= last) {
        l.agent_acked += 1;
        let ok = match (history.get(reply_seq), history.get(answered)) {
            (Some((false, reply)), Some((true, question))) => reply == question,
            _ => false,
        };
        if !ok {
            l.agent_lost += 1;
            if l.examples.len() < EXAMPLES {
                let there = match history.get(reply_seq) {
                    None => "nothing",
                    Some((true, _)) => "a visitor message",
                    Some((false, _)) => "another reply",
                };
                l.examples.push(format!(
                    "lost: agent reply acked at seq {reply_seq} (answering seq {answered}) in visitor {}'s conversation {}: {there} there",
                    book.visitor,
                    book.conversation.as_deref().unwrap_or("?"),
                ));
            }
        }
    }
    let echoes: std::collections::HashSet<u64> = history
        .values()
        .filter(|(from_visitor, _)| !from_visitor)
        .map(|(_, h)| *h)
        .collect();
    l.echoed = book
        .acked
        .keys()
        .filter(|id| book.texts.get(*id).is_some_and(|h| echoes.contains(h)))
        .count() as u64;
    // Relay visitors wait for their replies before the read-back; bot visitors do not.
    if book.probes_sent > 0 && l.echoed < l.acked && l.examples.len() < EXAMPLES {
        let mut seqs: Vec<u64> = book
            .acked
            .iter()
            .filter(|(id, _)| !book.texts.get(*id).is_some_and(|h| echoes.contains(h)))
            .map(|(_, s)| *s)
            .collect();
        seqs.sort_unstable();
        l.examples.push(format!(
            "unanswered (not a contract figure): visitor {} conversation {}: {} of {} acked messages have no stored agent reply, seqs {:?}",
            book.visitor,
            book.conversation.as_deref().unwrap_or("?"),
            l.acked - l.echoed,
            l.acked,
            &seqs[..seqs.len().min(8)]
        ));
    }
    let mut sent_once: HashMap<u64, u32> = HashMap::new();
    for h in book.texts.values() {
        *sent_once.entry(*h).or_default() += 1;
    }
    let mut stored: HashMap<u64, u64> = HashMap::new();
    for (from_visitor, h) in history.values() {
        if *from_visitor {
            *stored.entry(*h).or_default() += 1;
        }
    }
    for (h, n) in stored {
        if n > 1 && sent_once.get(&h) == Some(&1) {
            l.stored_twice += n - 1;
            if l.examples.len() < EXAMPLES {
                let id = book
                    .texts
                    .iter()
                    .find(|(_, t)| **t == h)
                    .map(|(i, _)| i.as_str());
                l.examples.push(format!(
                    "stored {n} times: visitor {} id {}",
                    book.visitor,
                    id.unwrap_or("?")
                ));
            }
        }
    }
    l.holes = (base + 1..=last)
        .filter(|s| !history.contains_key(s))
        .count() as u64;
    l
}

/// Kills, restarts and the server process of a `--server-cmd` run.
struct Owned {
    chaos: Chaos,
    pid: Arc<AtomicU32>,
    start: Arc<Mutex<Option<Instant>>>,
}

pub fn run(args: &SoakArgs) -> Result<Report, String> {
    if args.common.issued_visitor_ids {
        return Err(
            "--issued-visitor-ids: the soak reconnects visitors by their own ids; leave it out"
                .into(),
        );
    }
    let ctx = Arc::new(Ctx::new(&args.common)?);
    if ctx.protocol == Protocol::Echo {
        return Err("soak needs --protocol switchboard (or relay for the peers)".into());
    }
    if args.visitors == 0 || args.rate <= 0.0 {
        return Err("--visitors and --rate must be positive".into());
    }
    let flooders = args.flooders.unwrap_or(if args.chaos { 1 } else { 0 });
    if flooders > 0 && ctx.protocol != Protocol::Switchboard {
        return Err("--flooders needs --protocol switchboard".into());
    }
    let seed_value = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let queries: Arc<Vec<String>> = Arc::new(match &args.queries {
        Some(p) => crate::scenario::bot::load_queries(p)?,
        None => vec![
            "what are your opening hours?".into(),
            "how do I reset my password?".into(),
        ],
    });
    let owned = match &args.server_cmd {
        Some(cmd) => {
            if ctx.target.secure {
                return Err("--server-cmd needs a ws:// target (readiness is GET /readyz)".into());
            }
            let server = ServerProc::start(
                cmd,
                args.server_log.clone(),
                ctx.target.addr,
                args.ready_timeout,
            )?;
            let pid = server.pid.clone();
            let start = Arc::new(Mutex::new(None));
            let chaos = Chaos::spawn(
                server,
                args.chaos.then_some(args.kill_every),
                seed_value,
                start.clone(),
                args.duration,
                args.settle,
            );
            Some(Owned { chaos, pid, start })
        }
        None => None,
    };
    let bars = Bars::new(ctx.progress);
    let mut report = ctx.report("soak");
    let relay_visitors = if ctx.protocol == Protocol::Relay {
        args.visitors
    } else {
        args.relay_visitors.min(args.visitors)
    };
    report.settings = serde_json::json!({
        "duration_s": args.duration.as_secs_f64(), "visitors": args.visitors, "relay_visitors": relay_visitors,
        "agents": args.agents, "rate_per_s": args.rate, "mean_session_s": args.mean_session.as_secs_f64(),
        "sample_every_s": args.sample_every.as_secs_f64(), "size_bytes": args.size,
        "server_cmd": args.server_cmd, "chaos": args.chaos,
        "kill_every_s": [args.kill_every.min.as_secs_f64(), args.kill_every.max.as_secs_f64()],
        "settle_s": args.settle.as_secs_f64(), "seed": seed_value, "flooders": flooders,
        "flood_window": args.flood_window,
    });
    let coord = Coordinator::new(ctx.shards);
    let replies = AckedReplies::default();
    let run_bar = bars.timed("soak", args.duration.as_secs_f64());
    let work = {
        let (ctx, coord, args, queries, replies) = (
            ctx.clone(),
            coord.clone(),
            args.clone(),
            queries.clone(),
            replies.clone(),
        );
        move |shard| {
            shard_main(
                shard,
                ctx.clone(),
                coord.clone(),
                args.clone(),
                queries.clone(),
                relay_visitors,
                flooders,
                replies.clone(),
            )
        }
    };
    let mut started: Option<Instant> = None;
    let mut series: Vec<[f64; 2]> = Vec::new();
    let mut next_sample = Instant::now();
    let monitor = || {
        let p = &coord.progress;
        if coord.all_arrived(Phase::SetUp) && !coord.is_released(Phase::SetUp) {
            let at = Instant::now() + Duration::from_millis(50);
            started = Some(at);
            if let Some(o) = &owned {
                *o.start.lock().unwrap() = Some(at);
            }
            coord.release(Phase::SetUp, at);
        }
        if coord.all_arrived(Phase::Loaded) && !coord.is_released(Phase::Loaded) {
            coord.release(Phase::Loaded, Instant::now());
        }
        if let Some(at) = started {
            let t = Instant::now().saturating_duration_since(at);
            run_bar.set_position((t.as_secs_f64().min(args.duration.as_secs_f64()) * 10.0) as u64);
            let kills = owned
                .as_ref()
                .map(|o| o.chaos.log.lock().unwrap().kills)
                .unwrap_or(0);
            run_bar.set_message(format!(
                "connects {} sent {} received {} kills {kills}",
                Progress::get(&p.connected),
                Progress::get(&p.sent),
                Progress::get(&p.received)
            ));
            if Instant::now() >= next_sample && t <= args.duration {
                next_sample = Instant::now() + args.sample_every;
                let rss = match &owned {
                    Some(o) => match o.pid.load(Ordering::Relaxed) {
                        0 => None,
                        pid => crate::rss::rss_bytes(pid),
                    },
                    None => ctx.rss(),
                };
                if let Some(rss) = rss {
                    series.push([t.as_secs_f64(), rss as f64 / 1048576.0]);
                }
            }
        }
    };
    let results = run_shards(ctx.shards, &ctx.cores, work, monitor);
    let chaos_log: Option<ChaosLog> = owned.map(|o| o.chaos.finish());
    let results = results?;
    run_bar.finish();
    let mut t = SoakTotals::default();
    for r in results {
        t.merge(r);
    }
    report.set("connects", t.connects as f64);
    report.set(
        "connect_failures",
        t.connect_failures.values().sum::<u64>() as f64,
    );
    report.set("clean_disconnects", t.clean_disconnects as f64);
    report.set("abrupt_disconnects", t.abrupt_disconnects as f64);
    report.set("server_side_drops", t.server_drops as f64);
    report.set(
        "connection_drops",
        (t.clean_disconnects + t.abrupt_disconnects + t.server_drops) as f64,
    );
    report.set("agent_reconnects", t.agent_reconnects as f64);
    report.set(
        "agent_unassigned_messages",
        t.agent_unassigned_messages as f64,
    );
    report.set("messages_sent", (t.sent + t.flood_sent) as f64);
    report.set("messages_resent", t.resent as f64);
    report.set("acks", t.acks as f64);
    report.set("probes", t.probes as f64);
    report.set("replies", t.replies as f64);
    report.set("lost", t.lost as f64);
    report.set("duplicate_replies", t.duplicate_replies as f64);
    report.set("bot_answers", t.bot_answers as f64);
    if ctx.protocol == Protocol::Switchboard {
        report.set("seq_gaps", t.seq_gaps as f64);
        report.set("duplicate_deliveries", t.duplicate_deliveries as f64);
        report.set("replayed_below_resume", t.replayed_below_resume as f64);
        report.set("ack_conflicts", t.ack_conflicts as f64);
        report.set("unacked_at_end", t.unacked_at_end as f64);
        report.set("flooders", flooders as f64);
        report.set("flood_messages_sent", t.flood_sent as f64);
        report.set("flood_messages_resent", t.flood_resent as f64);
        report.set("flood_acked", t.flood_acked as f64);
        report.set("flood_unacked_at_end", t.flood_unacked_at_end as f64);
        report.set("refusals", t.refusals.values().sum::<u64>() as f64);
        let l = t.ledger.clone();
        for e in &l.examples {
            report.notes.push(e.clone());
        }
        report.set("ledger_visitors", l.visitors as f64);
        report.set("ledger_unverified", l.unverified as f64);
        report.set("ledger_acked", l.acked as f64);
        report.set("ledger_present", l.present as f64);
        report.set("ledger_lost", l.lost as f64);
        report.set("ledger_stored_twice", l.stored_twice as f64);
        report.set("ledger_holes", l.holes as f64);
        report.set("ledger_echoed", l.echoed as f64);
        report.set("ledger_agent_acked", l.agent_acked as f64);
        report.set("ledger_agent_lost", l.agent_lost as f64);
        report.set("ledger_identity_lost", l.identity_lost as f64);
        let duplicated = l.stored_twice + t.duplicate_deliveries + l.duplicate_deliveries;
        report.set("ledger_duplicated", duplicated as f64);
    } else {
        report.notes.push(
            "relay protocol: no storage or resume; messages sent while a visitor is away are lost"
                .into(),
        );
    }
    if let Some(c) = &chaos_log {
        if args.chaos {
            report.notes.push(format!(
                "chaos: --seed {seed_value} --kill-every {:?}..{:?} --settle {:?}",
                args.kill_every.min, args.kill_every.max, args.settle
            ));
        }
        report.set("kills", c.kills as f64);
        report.set("server_restarts", c.restarts as f64);
        report.set("server_unexpected_exits", c.unexpected_exits.len() as f64);
        report.set("server_restart_failures", c.restart_failures.len() as f64);
        if !c.outages.is_empty() {
            let ms: Vec<f64> = c.outages.iter().map(|d| d.as_secs_f64() * 1e3).collect();
            report.set("outage_mean_ms", ms.iter().sum::<f64>() / ms.len() as f64);
            report.set("outage_max_ms", ms.iter().copied().fold(0.0, f64::max));
        }
        for e in &c.unexpected_exits {
            report
                .notes
                .push(format!("the server exited by itself: {e}"));
        }
        for e in &c.restart_failures {
            report.notes.push(format!("a restart failed: {e}"));
        }
    }
    let s = t.latency.summary();
    report.set("reply_p50_ms", s.p50_ms);
    report.set("reply_p99_ms", s.p99_ms);
    report.set("reply_max_ms", s.max_ms);
    if let (Some(first), Some(last)) = (series.first(), series.last()) {
        let max = series.iter().map(|p| p[1]).fold(0f64, f64::max);
        report.set("rss_start_mib", first[1]);
        report.set("rss_end_mib", last[1]);
        report.set("rss_max_mib", max);
        let half: Vec<[f64; 2]> = series
            .iter()
            .copied()
            .filter(|p| p[0] >= last[0] / 2.0)
            .collect();
        if let Some(slope) = slope_per_second(&half) {
            report.set("rss_slope_second_half_mib_per_min", slope * 60.0);
        }
    } else {
        report.notes.push("no --pid: server RSS not sampled".into());
    }
    report.series.insert("server_rss_mib".into(), series);
    report
        .histograms
        .insert("reply_latency".into(), t.latency.to_json());
    report.add_failures(&t.connect_failures);
    report.add_failures(&t.errors);
    let refusals: Tally = t
        .refusals
        .iter()
        .chain(t.closes.iter())
        .map(|(k, v)| (format!("refused: {k}"), *v))
        .collect();
    report.add_failures(&refusals);
    report.finish();
    if let Some(path) = &args.common.plot {
        crate::plot::line_plot(
            path,
            "soak: server RSS over time",
            "time (s)",
            "RSS (MiB)",
            vec![crate::plot::Line {
                label: ctx.label.clone(),
                points: report.series["server_rss_mib"].clone(),
            }],
        )?;
    }
    Ok(report)
}

/// The soak's verdict on the ledger: `Err` with the reason when anything acked was lost, anything was
/// duplicated, a resent id was acked with another seq, or a conversation could not be read back.
pub fn verdict(report: &Report) -> Result<(), String> {
    if report.protocol != "switchboard" {
        return Ok(());
    }
    let get = |n: &str| report.get(n).unwrap_or(0.0) as u64;
    let mut bad = Vec::new();
    for (figure, what) in [
        ("ledger_lost", "acked messages lost"),
        ("ledger_agent_lost", "acked agent replies lost"),
        ("ledger_duplicated", "messages duplicated"),
        ("ack_conflicts", "re-sent ids acked with another seq"),
        ("ledger_unverified", "conversations not read back"),
    ] {
        if get(figure) > 0 {
            bad.push(format!("{} {what}", get(figure)));
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!("the ledger fails: {}", bad.join(", ")))
    }
}

/// The ledger as a table (after the report's own).
pub fn print_ledger(report: &Report) {
    if report.protocol != "switchboard" {
        return;
    }
    let f = |n: &str| crate::report::format_value(report.get(n).unwrap_or(0.0));
    println!();
    println!("== ledger");
    if report.get("kills").is_some() {
        println!(
            "   kills (SIGKILL)        {:>10}   restarts {}, unexpected exits {}, outage mean {} ms / max {} ms",
            f("kills"),
            f("server_restarts"),
            f("server_unexpected_exits"),
            f("outage_mean_ms"),
            f("outage_max_ms")
        );
    }
    println!(
        "   connection drops       {:>10}   client clean {}, client abrupt {}, server side {}",
        f("connection_drops"),
        f("clean_disconnects"),
        f("abrupt_disconnects"),
        f("server_side_drops")
    );
    println!(
        "   messages sent          {:>10}   of which flooders {}; re-sent {} + {}",
        f("messages_sent"),
        f("flood_messages_sent"),
        f("messages_resent"),
        f("flood_messages_resent")
    );
    println!(
        "   acked                  {:>10}   of which flooders {}; unacked at the end: visitors {}, flooders {}",
        f("ledger_acked"),
        f("flood_acked"),
        f("unacked_at_end"),
        f("flood_unacked_at_end")
    );
    println!(
        "   lost (acked, missing)  {:>10}   read back: {} visitors, {} acked present, {} unverified, {} seq holes",
        f("ledger_lost"),
        f("ledger_visitors"),
        f("ledger_present"),
        f("ledger_unverified"),
        f("ledger_holes")
    );
    println!(
        "   agent replies lost     {:>10}   of {} acked in the conversations read back",
        f("ledger_agent_lost"),
        f("ledger_agent_acked")
    );
    println!(
        "   duplicated             {:>10}   stored twice {}, delivered twice on one connection {}",
        f("ledger_duplicated"),
        f("ledger_stored_twice"),
        f("duplicate_deliveries")
    );
    let refusals: Vec<String> = report
        .failures
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("refused: ").map(|k| format!("{k} {v}")))
        .collect();
    println!(
        "   refusals               {:>10}   {}",
        f("refusals"),
        if refusals.is_empty() {
            "-".to_string()
        } else {
            refusals.join(", ")
        }
    );
    match verdict(report) {
        Ok(()) => println!("   verdict: nothing acked lost, nothing duplicated"),
        Err(e) => println!("   verdict: {e}"),
    }
}

/// Least-squares slope of y over x; `None` with fewer than 3 points.
pub fn slope_per_second(points: &[[f64; 2]]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p[0]).sum::<f64>() / n;
    let my = points.iter().map(|p| p[1]).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p[0] - mx) * (p[1] - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p[0] - mx).powi(2)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

struct ShardState {
    /// Every shard's agents' acked replies.
    replies: AckedReplies,
    totals: RefCell<SoakTotals>,
    closing: Rc<Cell<bool>>,
}

/// One agent slot: its current connection's writer and the conversations assigned to it in this run.
struct AgentSlot {
    writer: Rc<RefCell<Option<WsWriter>>>,
    assigned: Rc<RefCell<Vec<serde_json::Value>>>,
}

#[allow(clippy::too_many_arguments)]
async fn shard_main(
    shard: usize,
    ctx: Arc<Ctx>,
    coord: Arc<Coordinator>,
    args: SoakArgs,
    queries: Arc<Vec<String>>,
    relay_visitors: u64,
    flooders: u64,
    replies: AckedReplies,
) -> SoakTotals {
    let state = Rc::new(ShardState {
        replies: replies.clone(),
        totals: RefCell::default(),
        closing: Rc::new(Cell::new(false)),
    });
    let agent_stats = Rc::new(RefCell::new(AgentStats {
        acked_replies: replies.clone(),
        ..AgentStats::default()
    }));
    let sources = Rc::new(RefCell::new(ctx.source_addrs(shard)));
    let mut slots = Vec::new();
    let mut agent_tasks = Vec::new();
    // Agents: with switchboard a few token sessions; with relay one per relay visitor's room.
    let agent_ids: Vec<u64> = match ctx.protocol {
        Protocol::Switchboard => (shard as u64..args.agents).step_by(ctx.shards).collect(),
        _ => (shard as u64..relay_visitors).step_by(ctx.shards).collect(),
    };
    for a in agent_ids {
        let path = ctx.endpoints.agent_path(a).expect("protocol has agents");
        let source = sources.borrow_mut().next();
        let first = match open_session(&ctx, source, &path, seed(shard, 1 << 30 | a, 0)).await {
            Ok((reader, writer, _)) => {
                if ctx.protocol == Protocol::Switchboard {
                    let _ = writer.send_text(&protocol::agent_online()).await;
                }
                Some((reader, writer))
            }
            Err(reason) => {
                bump(
                    &mut state.totals.borrow_mut().connect_failures,
                    format!("agent: {reason}"),
                );
                None
            }
        };
        let slot = AgentSlot {
            writer: Rc::new(RefCell::new(None)),
            assigned: Rc::new(RefCell::new(Vec::new())),
        };
        agent_tasks.push(glommio::spawn_local(agent_life(
            ctx.clone(),
            shard,
            a,
            first,
            agent_stats.clone(),
            state.clone(),
            sources.clone(),
            slot.writer.clone(),
            slot.assigned.clone(),
        )));
        slots.push(slot);
    }
    coord.arrive(Phase::SetUp);
    let Some(start) = coord
        .wait_release(Phase::SetUp, Duration::from_secs(3600))
        .await
    else {
        return SoakTotals::default();
    };
    let end = start + args.duration;
    let interval = args.visitors as f64 / args.rate;
    let mut visitors = Vec::new();
    for v in (shard as u64..args.visitors).step_by(ctx.shards) {
        let (ctx, coord, state, sources, queries, args) = (
            ctx.clone(),
            coord.clone(),
            state.clone(),
            sources.clone(),
            queries.clone(),
            args.clone(),
        );
        let relay = v < relay_visitors;
        let offset = interval * (v as f64 / args.visitors as f64);
        visitors.push(glommio::spawn_local(async move {
            let plan = VisitorPlan {
                v,
                shard,
                relay,
                start,
                end,
                offset,
                interval,
            };
            visitor_life(&ctx, &coord, &state, &sources, &queries, &args, plan).await
        }));
    }
    for f in (shard as u64..flooders).step_by(ctx.shards) {
        let (ctx, coord, state, sources, args) = (
            ctx.clone(),
            coord.clone(),
            state.clone(),
            sources.clone(),
            args.clone(),
        );
        visitors.push(glommio::spawn_local(async move {
            flooder_life(&ctx, &coord, &state, &sources, &args, shard, f, end).await
        }));
    }
    for t in visitors {
        t.await;
    }
    // Agents serve conversations of every shard's visitors: none closes one before every visitor has
    // read its conversation back.
    coord.arrive(Phase::Loaded);
    coord
        .wait_release(Phase::Loaded, Duration::from_secs(3600))
        .await;
    state.closing.set(true);
    let writers: Vec<WsWriter> = slots
        .iter()
        .filter_map(|s| s.writer.borrow().clone())
        .collect();
    if ctx.protocol == Protocol::Switchboard {
        let convs: Vec<(WsWriter, Rc<RefCell<Vec<serde_json::Value>>>)> = slots
            .iter()
            .filter_map(|s| {
                let w = s.writer.borrow().clone()?;
                let mut seen = std::collections::HashSet::new();
                let unique: Vec<serde_json::Value> = s
                    .assigned
                    .borrow()
                    .iter()
                    .filter(|c| seen.insert(c.to_string()))
                    .cloned()
                    .collect();
                Some((w, Rc::new(RefCell::new(unique))))
            })
            .collect();
        close_conversations(&convs).await;
    }
    close_all(&writers, agent_tasks, Duration::from_secs(5)).await;
    let mut totals = std::mem::take(&mut *state.totals.borrow_mut());
    merge_tally(&mut totals.errors, &agent_stats.borrow().errors);
    totals.agent_unassigned_messages = agent_stats.borrow().foreign;
    totals
}

/// An agent session and its reconnections (after a kill of the server, or any drop) until the run
/// closes. The conversations assigned to it persist on the server: a reconnected agent is sent them
/// again, with their history, and answers what it has not answered yet (`AgentStats::answered`).
#[allow(clippy::too_many_arguments)]
async fn agent_life(
    ctx: Arc<Ctx>,
    shard: usize,
    a: u64,
    first: Option<(WsReader, WsWriter)>,
    stats: Rc<RefCell<AgentStats>>,
    state: Rc<ShardState>,
    sources: Rc<RefCell<crate::net::SourceAddrs>>,
    current: Rc<RefCell<Option<WsWriter>>>,
    assigned: Rc<RefCell<Vec<serde_json::Value>>>,
) {
    let path = ctx.endpoints.agent_path(a).expect("protocol has agents");
    let mut session = first;
    let mut attempt = 0;
    loop {
        if let Some((reader, writer)) = session.take() {
            *current.borrow_mut() = Some(writer.clone());
            agent_loop(
                ctx.protocol,
                reader,
                writer,
                stats.clone(),
                state.closing.clone(),
                ctx.run_visitors(),
                assigned.clone(),
            )
            .await;
        }
        if state.closing.get() {
            return;
        }
        glommio::timer::sleep(Duration::from_millis(200)).await;
        if state.closing.get() {
            return;
        }
        attempt += 1;
        let source = sources.borrow_mut().next();
        match open_session(&ctx, source, &path, seed(shard, 1 << 30 | a, attempt)).await {
            Ok((reader, writer, _)) => {
                if ctx.protocol == Protocol::Switchboard {
                    let _ = writer.send_text(&protocol::agent_online()).await;
                }
                state.totals.borrow_mut().agent_reconnects += 1;
                session = Some((reader, writer));
            }
            Err(reason) => bump(
                &mut state.totals.borrow_mut().connect_failures,
                format!("agent: {reason}"),
            ),
        }
    }
}

struct VisitorPlan {
    v: u64,
    shard: usize,
    relay: bool,
    start: Instant,
    end: Instant,
    offset: f64,
    interval: f64,
}

/// Sleeps until `at` (yielding once if it is past); `false`, early, once the connection is dead.
async fn sleep_alive(at: Instant, dead: &Cell<bool>) -> bool {
    loop {
        if dead.get() {
            return false;
        }
        let now = Instant::now();
        if now >= at {
            futures_lite::future::yield_now().await;
            return !dead.get();
        }
        glommio::timer::sleep((at - now).min(Duration::from_millis(50))).await;
    }
}

/// After the end of the load: keep reconnecting (re-sending what is unacked) this many times at most.
const FINAL_ROUNDS: u32 = 4;
/// ... and for at most this long after the end.
const FINAL_LIMIT: Duration = Duration::from_secs(60);

/// Whether a visitor is done after the end of the load: nothing unacked (or no more rounds).
fn finished(
    book: &RefCell<VisitorBook>,
    end: Instant,
    rounds: u32,
    max_rounds: u32,
    switchboard: bool,
) -> bool {
    let now = Instant::now();
    now >= end
        && (!switchboard
            || book.borrow().unacked.is_empty()
            || rounds >= max_rounds
            || now >= end + FINAL_LIMIT)
}

/// The final drain on a visitor's last connection: waits (at most 5 s, less if the connection dies)
/// for its acks and, for relay visitors, its replies; then closes.
async fn drain_and_close(
    book: &RefCell<VisitorBook>,
    relay: bool,
    dead: &Cell<bool>,
    writer: &WsWriter,
    receiver: glommio::Task<()>,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !dead.get() {
        let done = {
            let b = book.borrow();
            b.unacked.is_empty() && (!relay || b.replies.unique >= b.probes_sent)
        };
        if done {
            break;
        }
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    let _ = writer.close(1000).await;
    with_timeout(Duration::from_secs(2), receiver).await;
}

async fn visitor_life(
    ctx: &Ctx,
    coord: &Coordinator,
    state: &Rc<ShardState>,
    sources: &Rc<RefCell<crate::net::SourceAddrs>>,
    queries: &[String],
    args: &SoakArgs,
    plan: VisitorPlan,
) {
    let book = Rc::new(RefCell::new(VisitorBook::new(format!(
        "{}-{}",
        ctx.endpoints.run_id, plan.v
    ))));
    let mut rng = StdRng::seed_from_u64(seed(plan.shard, plan.v, 99));
    let mut k: u64 = 0;
    let mut attempt: u64 = 0;
    let mut rounds: u32 = 0;
    let switchboard = ctx.protocol == Protocol::Switchboard;
    let epoch_start = plan.start;
    while !finished(&book, plan.end, rounds, FINAL_ROUNDS, switchboard) {
        attempt += 1;
        let resume = if switchboard && book.borrow().baseline.is_some() {
            Some(book.borrow().contiguous())
        } else {
            None
        };
        let secret = book.borrow().secret.clone();
        let path = ctx
            .endpoints
            .visitor_path(plan.v, resume, secret.as_deref());
        let source = sources.borrow_mut().next();
        let (mut reader, writer, hello) =
            match open_session(ctx, source, &path, seed(plan.shard, plan.v, attempt)).await {
                Ok(s) => s,
                Err(reason) => {
                    bump(&mut state.totals.borrow_mut().connect_failures, reason);
                    glommio::timer::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
        state.totals.borrow_mut().connects += 1;
        Progress::add(&coord.progress.connected, 1);
        book.borrow_mut().connected(resume, hello.as_ref());
        if switchboard && plan.relay && !book.borrow().assigned {
            match handoff_until_assigned(&mut reader, &writer, ctx.handshake_timeout).await {
                Ok(()) => book.borrow_mut().assigned = true,
                Err(reason) => bump(&mut state.totals.borrow_mut().errors, reason),
            }
        }
        // Re-send what was never acked, with the same ids.
        let resend: Vec<(String, String)> = book.borrow().unacked.iter().cloned().collect();
        for (_, frame) in &resend {
            if writer.send_text(frame).await.is_err() {
                break;
            }
            state.totals.borrow_mut().resent += 1;
        }
        let dead = Rc::new(Cell::new(false));
        let receiver = glommio::spawn_local(receive(
            reader,
            Receiving {
                book: book.clone(),
                state: state.clone(),
                instant_at: Rc::new(coord_instant_fn(coord)),
                v: plan.v,
                writer: writer.clone(),
                dead: dead.clone(),
                who: "visitor",
            },
        ));
        let mean = args.mean_session.as_secs_f64().max(0.001);
        let life = -mean * (1.0f64 - rng.gen::<f64>()).ln();
        let until = (Instant::now() + Duration::from_secs_f64(life)).min(plan.end);
        // Send on the schedule until this connection's life is over (or the server ends it).
        loop {
            let sched =
                epoch_start + Duration::from_secs_f64(plan.offset + k as f64 * plan.interval);
            if sched >= until || !sleep_alive(sched, &dead).await {
                break;
            }
            let id = format!("s{}-{k}", plan.v);
            let text = if plan.relay {
                let probe = Probe {
                    stream: plan.v,
                    seq: k,
                    sched_us: coord.micros(sched),
                    ahead_us: 0,
                };
                book.borrow_mut().probes_sent = k + 1;
                probe.encode(args.size)
            } else if args.chaos {
                // Unique texts, so the ledger can tell a message stored twice.
                format!("{} [{id}]", queries[(k as usize) % queries.len()])
            } else {
                queries[(k as usize) % queries.len()].clone()
            };
            k += 1;
            let frame = if switchboard {
                protocol::visitor_message(&id, &text)
            } else {
                text.clone()
            };
            if switchboard {
                book.borrow_mut().sending(&id, &frame, &text);
            }
            state.totals.borrow_mut().sent += 1;
            Progress::add(&coord.progress.sent, 1);
            if writer.send_text(&frame).await.is_err() {
                break;
            }
        }
        // A clean session lives its full span; an abrupt one is cut right after its last send, with that
        // message (usually) still unacked, so the reconnect has to re-send it and the server to dedup it.
        let abrupt = until < plan.end && rng.gen_bool(0.5);
        if !dead.get() && !abrupt {
            sleep_alive(until, &dead).await;
        }
        if dead.get() {
            // The server ended the connection (killed, or closed it): reconnect shortly.
            state.totals.borrow_mut().server_drops += 1;
            drop(receiver);
            glommio::timer::sleep(Duration::from_millis(100)).await;
            continue;
        }
        if Instant::now() >= plan.end {
            // Final connection: stop sending, let replies and acks drain, close cleanly; reconnect
            // (re-sending) if something is still unacked.
            rounds += 1;
            drain_and_close(&book, plan.relay, &dead, &writer, receiver).await;
            continue;
        }
        if !abrupt {
            let _ = writer.close(1000).await;
            with_timeout(Duration::from_secs(2), receiver).await;
            state.totals.borrow_mut().clean_disconnects += 1;
        } else {
            // Abrupt: cancel the receiver and drop the socket without a close frame.
            drop(receiver);
            drop(writer);
            state.totals.borrow_mut().abrupt_disconnects += 1;
        }
    }
    let ledger = if switchboard {
        Some(read_back(ctx, &book, plan.shard, plan.v, sources, &state.replies).await)
    } else {
        None
    };
    let b = book.borrow();
    let mut t = state.totals.borrow_mut();
    t.probes += b.probes_sent;
    t.replies += b.replies.unique;
    t.lost += b.probes_sent.saturating_sub(b.replies.unique);
    t.duplicate_replies += b.replies.duplicates;
    if switchboard {
        t.seq_gaps += b.gaps();
        t.duplicate_deliveries += b.duplicate_deliveries + b.delivered.duplicates;
        t.unacked_at_end += b.unacked.len() as u64;
        t.acked_ids += b.acked.len() as u64;
    }
    if let Some(l) = ledger {
        t.ledger.merge(&l);
    }
}

/// A visitor that sends as fast as it can: a new message whenever it holds fewer than
/// `--flood-window` unacked, pausing only for a `rate_limited` refusal's `retry_after`; after a close
/// (1008 for abuse, 1013, a kill) it reconnects at once with resume and re-sends its unacked messages.
#[allow(clippy::too_many_arguments)]
async fn flooder_life(
    ctx: &Ctx,
    coord: &Coordinator,
    state: &Rc<ShardState>,
    sources: &Rc<RefCell<crate::net::SourceAddrs>>,
    args: &SoakArgs,
    shard: usize,
    f: u64,
    end: Instant,
) {
    // Visitor indexes after the ordinary visitors'.
    let v = args.visitors + f;
    let book = Rc::new(RefCell::new(VisitorBook::new(format!(
        "{}-{v}",
        ctx.endpoints.run_id
    ))));
    let mut k: u64 = 0;
    let mut attempt: u64 = 0;
    let mut rounds: u32 = 0;
    let window = args.flood_window.max(1);
    // One final round: what the flood guard refuses stays refused however often it is re-sent.
    while !finished(&book, end, rounds, 1, true) {
        attempt += 1;
        let resume = book
            .borrow()
            .baseline
            .is_some()
            .then(|| book.borrow().contiguous());
        let secret = book.borrow().secret.clone();
        let path = ctx.endpoints.visitor_path(v, resume, secret.as_deref());
        let source = sources.borrow_mut().next();
        let (reader, writer, hello) =
            match open_session(ctx, source, &path, seed(shard, v, attempt)).await {
                Ok(s) => s,
                Err(reason) => {
                    bump(
                        &mut state.totals.borrow_mut().connect_failures,
                        format!("flooder: {reason}"),
                    );
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
        state.totals.borrow_mut().connects += 1;
        book.borrow_mut().connected(resume, hello.as_ref());
        // Re-sends go through the paced loop below, like new messages.
        book.borrow_mut().resend_due = true;
        let mut resend: VecDeque<String> = VecDeque::new();
        let dead = Rc::new(Cell::new(false));
        let receiver = glommio::spawn_local(receive(
            reader,
            Receiving {
                book: book.clone(),
                state: state.clone(),
                instant_at: Rc::new(coord_instant_fn(coord)),
                v,
                writer: writer.clone(),
                dead: dead.clone(),
                who: "flooder",
            },
        ));
        while Instant::now() < end && !dead.get() {
            let pause = book.borrow().pause_until;
            if let Some(p) = pause.filter(|p| *p > Instant::now()) {
                sleep_alive(p, &dead).await;
                continue;
            }
            if std::mem::take(&mut book.borrow_mut().resend_due) {
                resend = book
                    .borrow()
                    .unacked
                    .iter()
                    .map(|(i, _)| i.clone())
                    .collect();
            }
            if let Some(id) = resend.pop_front() {
                let frame = book
                    .borrow()
                    .unacked
                    .iter()
                    .find(|(i, _)| *i == id)
                    .map(|(_, f)| f.clone());
                if let Some(frame) = frame {
                    if writer.send_text(&frame).await.is_err() {
                        break;
                    }
                    state.totals.borrow_mut().flood_resent += 1;
                    futures_lite::future::yield_now().await;
                }
                continue;
            }
            if book.borrow().unacked.len() >= window {
                glommio::timer::sleep(Duration::from_millis(1)).await;
                continue;
            }
            let id = format!("f{v}-{k}");
            k += 1;
            let text = format!("flood {id}");
            let frame = protocol::visitor_message(&id, &text);
            book.borrow_mut().sending(&id, &frame, &text);
            state.totals.borrow_mut().flood_sent += 1;
            Progress::add(&coord.progress.sent, 1);
            if writer.send_text(&frame).await.is_err() {
                break;
            }
            futures_lite::future::yield_now().await;
        }
        if dead.get() || Instant::now() < end {
            state.totals.borrow_mut().server_drops += 1;
            drop(receiver);
            glommio::timer::sleep(Duration::from_millis(50)).await;
            continue;
        }
        rounds += 1;
        drain_and_close(&book, false, &dead, &writer, receiver).await;
    }
    let ledger = read_back(ctx, &book, shard, v, sources, &state.replies).await;
    let b = book.borrow();
    let mut t = state.totals.borrow_mut();
    t.duplicate_deliveries += b.duplicate_deliveries + b.delivered.duplicates;
    t.flood_unacked_at_end += b.unacked.len() as u64;
    t.flood_acked += b.acked.len() as u64;
    t.ledger.merge(&ledger);
}

/// The ledger of one visitor: reconnects with `resume=0`, reads the whole conversation back and
/// reconciles it with what was acked. Retries (a new connection) for up to 30 s.
async fn read_back(
    ctx: &Ctx,
    book: &RefCell<VisitorBook>,
    shard: usize,
    v: u64,
    sources: &Rc<RefCell<crate::net::SourceAddrs>>,
    replies: &AckedReplies,
) -> Ledger {
    let (secret, expected, base) = {
        let b = book.borrow();
        (b.secret.clone(), b.visitor.clone(), b.baseline.unwrap_or(0))
    };
    if book.borrow().texts.is_empty() {
        return Ledger {
            visitors: 1,
            ..Ledger::default()
        };
    }
    let path = ctx.endpoints.visitor_path(v, Some(0), secret.as_deref());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut attempt = 1 << 20;
    while Instant::now() < deadline {
        attempt += 1;
        let source = sources.borrow_mut().next();
        let (mut reader, writer, hello) =
            match open_session(ctx, source, &path, seed(shard, v, attempt)).await {
                Ok(s) => s,
                Err(_) => {
                    glommio::timer::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
        let hello = hello.unwrap_or_default();
        if hello.visitor.as_deref() != Some(expected.as_str()) {
            let _ = writer.close(1000).await;
            let acked = book.borrow().acked.len() as u64;
            return Ledger {
                visitors: 1,
                acked,
                lost: acked,
                identity_lost: 1,
                ..Ledger::default()
            };
        }
        let last = hello.seq.unwrap_or(0);
        let mut history: HashMap<u64, (bool, u64)> = HashMap::new();
        let mut delivered = Arrivals::default();
        let read_until = Instant::now() + Duration::from_secs(15);
        let mut complete = last <= base;
        while !complete {
            let left = read_until.saturating_duration_since(Instant::now());
            let text = match reader.recv_timeout(left).await {
                Ok(Some(Incoming::Text(t))) => t,
                Ok(Some(Incoming::Binary(_))) => continue,
                _ => break,
            };
            let Ok(f) = ServerFrame::parse(&text) else {
                continue;
            };
            if f.kind != "message" {
                continue;
            }
            let Some(seq) = f.seq else { continue };
            delivered.record(seq);
            let from_visitor = f.from.as_deref() == Some("visitor");
            history.insert(
                seq,
                (from_visitor, text_hash(f.text.as_deref().unwrap_or(""))),
            );
            complete = seq >= last;
        }
        let _ = writer.close(1000).await;
        if !complete {
            glommio::timer::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let conv_replies = {
            let b = book.borrow();
            let all = replies.lock().unwrap();
            b.conversation
                .as_ref()
                .and_then(|c| all.get(c).cloned())
                .unwrap_or_default()
        };
        let mut l = reconcile(&book.borrow(), &history, base, last, &conv_replies);
        l.duplicate_deliveries = delivered.duplicates;
        return l;
    }
    Ledger {
        visitors: 1,
        unverified: 1,
        acked: book.borrow().acked.len() as u64,
        ..Ledger::default()
    }
}

/// Maps a probe's microsecond timestamp back to an instant.
fn coord_instant_fn(coord: &Coordinator) -> impl Fn(u64) -> Instant {
    let epoch = coord.epoch;
    move |us| epoch + Duration::from_micros(us)
}

/// What a connection's receiving task updates.
struct Receiving<F> {
    book: Rc<RefCell<VisitorBook>>,
    state: Rc<ShardState>,
    instant_at: Rc<F>,
    v: u64,
    /// For re-sending a message refused `overloaded` after its `retry_after`.
    writer: WsWriter,
    /// Set when the connection ends, whoever ended it.
    dead: Rc<Cell<bool>>,
    /// `visitor` or `flooder`, in the refusal and close tallies.
    who: &'static str,
}

async fn receive<F: Fn(u64) -> Instant>(mut reader: WsReader, r: Receiving<F>) {
    let Receiving {
        book,
        state,
        instant_at,
        v,
        writer,
        dead,
        who,
    } = r;
    loop {
        let text = match reader.recv().await {
            Ok(Incoming::Text(t)) => t,
            Ok(Incoming::Binary(_)) => continue,
            Ok(Incoming::Close(code)) => {
                // 1000 answers the client's own close.
                if code != 1000 {
                    bump(
                        &mut state.totals.borrow_mut().closes,
                        format!("{who} close {code}"),
                    );
                }
                dead.set(true);
                return;
            }
            Err(_) => {
                dead.set(true);
                return;
            }
        };
        let now = Instant::now();
        let mut b = book.borrow_mut();
        let mut t = state.totals.borrow_mut();
        let probe_text: Option<String> = match ServerFrame::parse(&text) {
            Ok(f) => match f.kind.as_ref() {
                "ack" => {
                    t.acks += 1;
                    let id = match &f.id {
                        Some(serde_json::Value::String(s)) => s.clone(),
                        Some(other) => other.to_string(),
                        None => String::new(),
                    };
                    if let Some(c) = &f.conversation {
                        b.conversation = Some(c.to_string());
                    }
                    if let Some(seq) = f.seq {
                        if let Some(prev) = b.acked.insert(id.clone(), seq) {
                            if prev != seq {
                                t.ack_conflicts += 1;
                            }
                        }
                        b.seen.record(seq);
                        b.max_seq = b.max_seq.max(seq);
                    }
                    b.unacked.retain(|(i, _)| *i != id);
                    None
                }
                "message" => {
                    if let Some(seq) = f.seq {
                        if b.resume.is_some_and(|r| seq <= r) {
                            t.replayed_below_resume += 1;
                        }
                        b.delivered.record(seq);
                        b.seen.record(seq);
                        b.max_seq = b.max_seq.max(seq);
                    }
                    match f.from.as_deref() {
                        Some("agent") => f.text.map(|c| c.into_owned()),
                        Some("bot") => {
                            t.bot_answers += 1;
                            None
                        }
                        _ => None,
                    }
                }
                "error" => {
                    let code = match &f.code {
                        Some(serde_json::Value::String(s)) => s.clone(),
                        Some(other) => other.to_string(),
                        None => "?".into(),
                    };
                    bump(&mut t.refusals, format!("{who} {code}"));
                    let retry = Duration::from_millis(f.retry_after.unwrap_or(500));
                    match (code.as_str(), &f.id) {
                        ("overloaded", Some(serde_json::Value::String(id))) => {
                            // Not stored: re-send it with the same id after retry_after.
                            let frame = b
                                .unacked
                                .iter()
                                .find(|(i, _)| i == id)
                                .map(|(_, fr)| fr.clone());
                            if let Some(frame) = frame {
                                let (book, dead, writer, state, id) = (
                                    book.clone(),
                                    dead.clone(),
                                    writer.clone(),
                                    state.clone(),
                                    id.clone(),
                                );
                                glommio::spawn_local(async move {
                                    glommio::timer::sleep(retry).await;
                                    let still = book.borrow().unacked.iter().any(|(i, _)| *i == id);
                                    if still
                                        && !dead.get()
                                        && writer.send_text(&frame).await.is_ok()
                                    {
                                        state.totals.borrow_mut().resent += 1;
                                    }
                                })
                                .detach();
                            }
                        }
                        ("rate_limited" | "flood", _) => {
                            // Which message was refused is not said: pause, then re-send the
                            // unacked ones (a flooder does; a visitor on its next connection).
                            let retry = Duration::from_millis(f.retry_after.unwrap_or(1000));
                            b.pause_until = Some(now + retry);
                            b.resend_due = true;
                        }
                        _ => {}
                    }
                    None
                }
                _ => None,
            },
            // The relay protocol carries bare probes.
            Err(_) => Some(text),
        };
        if let Some(p) = probe_text.as_deref().and_then(Probe::decode) {
            if p.stream == v && p.seq < b.probes_sent && b.replies.record(p.seq) == Arrival::First {
                t.latency
                    .record(now.saturating_duration_since(instant_at(p.start_us())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line() {
        let pts: Vec<[f64; 2]> = (0..10).map(|i| [i as f64, 3.0 + 0.5 * i as f64]).collect();
        assert!((slope_per_second(&pts).unwrap() - 0.5).abs() < 1e-9);
        assert!(slope_per_second(&pts[..2]).is_none());
    }

    #[test]
    fn book_tracks_contiguity_and_gaps() {
        let mut b = VisitorBook {
            baseline: Some(2),
            ..Default::default()
        };
        for s in [3, 4, 6] {
            b.seen.record(s);
            b.max_seq = b.max_seq.max(s);
        }
        assert_eq!(b.contiguous(), 4);
        assert_eq!(b.gaps(), 1);
    }

    fn book_with(sent: &[(&str, &str)], acked: &[(&str, u64)]) -> VisitorBook {
        let mut b = VisitorBook::new("v".into());
        for (id, text) in sent {
            b.sending(id, &protocol::visitor_message(id, text), text);
        }
        for (id, seq) in acked {
            b.acked.insert(id.to_string(), *seq);
        }
        b
    }

    #[test]
    fn ledger_finds_every_acked_message_at_its_seq() {
        let b = book_with(
            &[("a", "one"), ("b", "two"), ("c", "three")],
            &[("a", 1), ("b", 3)],
        );
        let history: HashMap<u64, (bool, u64)> = [
            (1, (true, text_hash("one"))),
            (2, (false, text_hash("reply"))),
            (3, (true, text_hash("two"))),
        ]
        .into();
        let l = reconcile(&b, &history, 0, 3, &[(2, 1)].into());
        // An agent reply acked at seq 2 answering seq 1 must be its echo: "reply" is not "one".
        assert_eq!((l.agent_acked, l.agent_lost), (1, 1));
        let mut echoed = history.clone();
        echoed.insert(2, (false, text_hash("one")));
        let l = reconcile(&b, &echoed, 0, 3, &[(2, 1)].into());
        assert_eq!((l.agent_acked, l.agent_lost, l.echoed), (1, 0, 1));
        // A reply acked after the read-back's hello (seq > last) is not checked.
        let l = reconcile(&b, &echoed, 0, 3, &[(7, 1)].into());
        assert_eq!((l.agent_acked, l.agent_lost), (0, 0));
        assert_eq!(
            (l.acked, l.present, l.lost, l.stored_twice, l.holes),
            (2, 2, 0, 0, 0)
        );
    }

    #[test]
    fn ledger_counts_lost_misplaced_and_stored_twice() {
        let b = book_with(
            &[
                ("a", "one"),
                ("b", "two"),
                ("c", "three"),
                ("q1", "hi"),
                ("q2", "hi"),
            ],
            &[("a", 1), ("b", 2), ("c", 9)],
        );
        let history: HashMap<u64, (bool, u64)> = [
            (1, (true, text_hash("one"))),
            // b's seq holds another text: b is lost.
            (2, (true, text_hash("one"))),
            (4, (true, text_hash("hi"))),
            (5, (true, text_hash("hi"))),
        ]
        .into();
        let l = reconcile(&b, &history, 0, 5, &HashMap::new());
        // c's seq 9 is not there at all.
        assert_eq!(l.lost, 2);
        assert_eq!(l.present, 1);
        // "one" was sent once and stored twice; "hi" was sent twice (two ids), so two copies are right.
        assert_eq!(l.stored_twice, 1);
        // seq 3 is missing.
        assert_eq!(l.holes, 1);
    }

    #[test]
    fn verdict_fails_on_lost_or_duplicated() {
        let mut r = Report::new("soak", "x", "ws://127.0.0.1:1", "switchboard", 1);
        r.set("ledger_lost", 0.0);
        r.set("ledger_duplicated", 0.0);
        assert!(verdict(&r).is_ok());
        r.set("ledger_lost", 2.0);
        assert!(verdict(&r).unwrap_err().contains("2 acked messages lost"));
        r.set("ledger_lost", 0.0);
        r.set("ledger_duplicated", 1.0);
        assert!(verdict(&r).is_err());
    }
}
