//! Scenarios and what they share: the run context built from the common options, session helpers per
//! protocol (open + hello, handoff until assigned, the agent's reply loop), and failure tallies.

pub mod bot;
pub mod compare;
pub mod density;
pub mod relay;
pub mod soak;
pub mod sweep;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cli::{Common, CoreList};
use crate::codec::Message;
use crate::limits;
use crate::net::SourceAddrs;
use crate::protocol::{self, Endpoints, Protocol, ServerFrame};
use crate::report::Report;
use crate::runtime::available_cpus;
use crate::stats::Arrivals;
use crate::target::Target;
use crate::wsclient::{self, Incoming, OpenError, WsReader, WsWriter};

/// Everything a run needs from the command line, shareable across shards.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub target: Target,
    pub pid: Option<u32>,
    pub protocol: Protocol,
    pub shards: usize,
    /// Cores the shards are pinned to (shard i on `cores[i % len]`); empty: unpinned.
    pub cores: Vec<usize>,
    /// The server's process and any helper whose CPU counts as the server's (`--pid`, `--cpu-pid`).
    pub cpu_pids: Vec<u32>,
    pub label: String,
    pub endpoints: Endpoints,
    pub sources: u32,
    pub handshake_timeout: Duration,
    pub progress: bool,
    pub file_limit: Option<limits::FileLimit>,
    /// The visitor ids the server issued to this run's visitors (`--issued-visitor-ids`): how its
    /// agents tell this run's conversations from older ones. Filled once per visitor, at set-up.
    pub issued_visitors: Arc<Mutex<HashSet<String>>>,
}

impl Ctx {
    pub fn new(c: &Common) -> Result<Ctx, String> {
        if c.issued_visitor_ids && c.protocol != Protocol::Switchboard {
            return Err("--issued-visitor-ids needs --protocol switchboard".into());
        }
        let mut target = Target::parse(&c.target).map_err(|e| e.to_string())?;
        if target.secure {
            let ca = c
                .tls_ca
                .as_deref()
                .ok_or("a wss:// target needs --tls-ca FILE (the server certificate to trust)")?;
            let name = c.tls_server_name.clone().unwrap_or_else(|| {
                let host = target.host_header.rsplit_once(':').map_or("", |(h, _)| h);
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string()
            });
            target.tls = Some((crate::tls::client_config(ca)?, name));
        }
        let available = available_cpus();
        let (shards, cores) = match &c.cores {
            Some(CoreList(list)) => {
                if !available.is_empty() {
                    crate::cpu::check_available(list, &available)
                        .map_err(|e| format!("--cores: {e}"))?;
                }
                (c.shards.unwrap_or(list.len()), list.clone())
            }
            None => {
                // One shard per available core, unpinned when there are more shards than cores.
                let shards = c.shards.unwrap_or(available.len().max(1));
                let cores = if shards <= available.len() {
                    available
                } else {
                    Vec::new()
                };
                (shards, cores)
            }
        };
        if shards == 0 {
            return Err("--shards must be at least 1".into());
        }
        if c.agent_tokens.is_empty() {
            return Err("at least one --agent-token is needed".into());
        }
        let file_limit = limits::raise_file_limit().ok();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let run_id = format!(
            "b{:x}",
            (nanos as u64 ^ std::process::id() as u64) & 0xff_ffff
        );
        let label = c
            .label
            .clone()
            .unwrap_or_else(|| format!("{} {}", c.protocol.name(), target.host_header));
        Ok(Ctx {
            target,
            pid: c.pid,
            protocol: c.protocol,
            shards,
            cores,
            cpu_pids: c
                .pid
                .into_iter()
                .chain(c.cpu_pids.iter().copied())
                .collect(),
            label,
            endpoints: Endpoints {
                protocol: c.protocol,
                site: c.site.clone(),
                agent_tokens: c.agent_tokens.clone(),
                run_id,
                echo_delay_ms: c.echo_delay_ms,
                issued_visitor_ids: c.issued_visitor_ids,
            },
            sources: c.sources,
            handshake_timeout: c.handshake_timeout,
            progress: !c.no_progress,
            file_limit,
            issued_visitors: Arc::default(),
        })
    }

    /// How this run's agents recognise its visitors ([`RunVisitors`]).
    pub fn run_visitors(&self) -> RunVisitors {
        if self.endpoints.issued_visitor_ids {
            RunVisitors::Issued(self.issued_visitors.clone())
        } else {
            RunVisitors::Prefix(self.endpoints.run_id.clone())
        }
    }

    /// A fresh run id (sweep steps must not reuse rooms or visitor ids of the previous step).
    pub fn with_new_run_id(&self, step: usize) -> Ctx {
        let mut c = self.clone();
        c.endpoints.run_id = format!("{}s{step}", self.endpoints.run_id);
        c
    }

    pub fn report(&self, scenario: &str) -> Report {
        let mut r = Report::new(
            scenario,
            &self.label,
            &self.target.url,
            self.protocol.name(),
            self.shards,
        );
        r.generator_cores = Some(self.generator_cores());
        r.server_cores = Some(self.server_cores());
        r.notes.push(format!(
            "client source addresses: {} (127.0.0.0/8 spread; 0 = kernel default)",
            self.source_addrs(0).len()
        ));
        if let Some(l) = self.file_limit {
            r.notes.push(format!(
                "load generator RLIMIT_NOFILE {} (hard {})",
                l.soft, l.hard
            ));
        }
        r
    }

    /// The cores the generator's shards run on, as a CPU list, or `unpinned`.
    pub fn generator_cores(&self) -> String {
        if self.cores.is_empty() {
            return "unpinned".into();
        }
        let used: Vec<usize> = (0..self.shards.min(self.cores.len()))
            .map(|i| self.cores[i])
            .collect();
        crate::cpu::format_core_list(&used)
    }

    /// The cores the server (`--pid`) may run on, as a CPU list, or `unknown` without a pid.
    pub fn server_cores(&self) -> String {
        self.pid
            .and_then(crate::cpu::process_cores)
            .map(|c| crate::cpu::format_core_list(&c))
            .unwrap_or_else(|| "unknown".into())
    }

    /// CPU seconds the server and its helpers have used so far; `None` without `--pid`.
    pub fn server_cpu_seconds(&self) -> Option<f64> {
        self.pid?;
        crate::cpu::total_cpu_seconds(&self.cpu_pids)
    }

    pub fn source_addrs(&self, shard: usize) -> SourceAddrs {
        SourceAddrs::new(self.target.addr, self.sources, shard * 7919)
    }

    pub fn rss(&self) -> Option<u64> {
        self.pid.and_then(crate::rss::rss_bytes)
    }
}

/// Failure reasons and their counts.
pub type Tally = BTreeMap<String, u64>;

pub fn bump(tally: &mut Tally, reason: impl Into<String>) {
    *tally.entry(reason.into()).or_default() += 1;
}

pub fn merge_tally(into: &mut Tally, from: &Tally) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// Connection key seed: unique per (shard, index, attempt) so every handshake uses a fresh key.
pub fn seed(shard: usize, index: u64, attempt: u64) -> u64 {
    ((shard as u64) << 56) ^ (index << 16) ^ attempt ^ 0x243F_6A88_85A3_08D3
}

/// Opens a session; with the switchboard protocol also waits for `hello` and returns it parsed.
pub async fn open_session(
    ctx: &Ctx,
    source: Option<Ipv4Addr>,
    path: &str,
    seed: u64,
) -> Result<(WsReader, WsWriter, Option<Hello>), String> {
    let (mut reader, writer) =
        wsclient::open(&ctx.target, source, path, seed, ctx.handshake_timeout)
            .await
            .map_err(|e: OpenError| e.reason())?;
    if ctx.protocol != Protocol::Switchboard {
        return Ok((reader, writer, None));
    }
    let hello = await_frame(&mut reader, ctx.handshake_timeout, &["hello"]).await?;
    Ok((reader, writer, Some(hello)))
}

/// What `hello` told a switchboard session.
#[derive(Debug, Clone, Default)]
pub struct Hello {
    pub seq: Option<u64>,
    /// The visitor secret the server issued on this connection, if it did.
    pub secret: Option<String>,
    /// The visitor id of the session (a refused id is replaced by a new one).
    pub visitor: Option<String>,
}

/// Reads frames until one whose `type` is in `kinds` arrives (others are skipped); errors on timeout,
/// close or a server `error` frame.
pub async fn await_frame(
    reader: &mut WsReader,
    limit: Duration,
    kinds: &[&str],
) -> Result<Hello, String> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match reader.recv_timeout(left).await {
            Ok(Some(Incoming::Text(t))) => {
                let f =
                    ServerFrame::parse(&t).map_err(|_| format!("{}: malformed json", kinds[0]))?;
                if kinds.iter().any(|k| *k == f.kind) {
                    return Ok(Hello {
                        seq: f.seq,
                        secret: f.secret.map(|s| s.into_owned()),
                        visitor: f.visitor.map(|v| v.into_owned()),
                    });
                }
                if f.kind == "error" {
                    return Err(format!(
                        "waiting for {}: server error {}",
                        kinds[0],
                        f.code.unwrap_or_default()
                    ));
                }
            }
            Ok(Some(Incoming::Binary(_))) => {}
            Ok(Some(Incoming::Close(code))) => {
                return Err(format!("waiting for {}: closed ({code})", kinds[0]))
            }
            Ok(None) => return Err(format!("no {} within {:?}", kinds[0], limit)),
            Err(e) => return Err(format!("waiting for {}: {}", kinds[0], e.reason())),
        }
    }
}

/// Switchboard: the visitor asks for a human and waits until an agent is assigned.
pub async fn handoff_until_assigned(
    reader: &mut WsReader,
    writer: &WsWriter,
    limit: Duration,
) -> Result<(), String> {
    writer
        .send_text(&protocol::visitor_handoff())
        .await
        .map_err(|e| format!("handoff: {}", e.reason()))?;
    await_frame(reader, limit, &["assigned"]).await.map(|_| ())
}

/// Counters of an agent loop.
#[derive(Debug, Default, Clone)]
pub struct AgentStats {
    pub replies: u64,
    /// Visitor messages of conversations from earlier runs (an agent account reconnecting is sent its
    /// older open conversations); not answered.
    pub foreign: u64,
    pub other_frames: u64,
    pub errors: Tally,
    /// Visitor messages (conversation, seq) whose reply was acked: an agent that reconnects is sent
    /// each conversation's whole history again and answers only the others. A reply's id is `r{seq}`
    /// of the visitor message it answers, so answering one again (a reply in flight when the
    /// connection or the server died) is recognised by the server as a re-send, not stored twice.
    pub answered: HashMap<String, Arrivals>,
    /// Acked agent replies, shared by every shard's agents: conversation -> (reply seq -> seq of the
    /// visitor message it answers). The soak's ledger checks them in the conversations it reads back.
    pub acked_replies: AckedReplies,
}

/// See [`AgentStats::acked_replies`].
pub type AckedReplies = std::sync::Arc<std::sync::Mutex<HashMap<String, HashMap<u64, u64>>>>;

/// An agent: replies to every visitor message with the same text, until the session closes. With the relay
/// protocol every text frame is a visitor message and is echoed unchanged; with switchboard, `message`
/// frames from a visitor are answered in their `conversation`, but only in conversations `assigned` to it
/// for a visitor of this run (`run_id`): agent accounts persist on the server, and a reconnecting agent is
/// sent its older open conversations, which must not be answered ([`RunVisitors`]). Replies are written from the codec
/// callback, without a copy of the text for relay.
#[allow(clippy::too_many_arguments)]
pub async fn agent_loop(
    protocol: Protocol,
    mut reader: WsReader,
    writer: WsWriter,
    stats: Rc<RefCell<AgentStats>>,
    closing: Rc<std::cell::Cell<bool>>,
    run: RunVisitors,
    assigned: Rc<RefCell<Vec<serde_json::Value>>>,
) {
    let mut ctx = AgentSession {
        next_id: 0,
        run,
        mine: HashSet::new(),
        assigned,
    };
    // Frames that came in the same read as `hello` (open_session queued them): with switchboard
    // the `assigned` of the conversations the agent already holds follow the hello at once.
    for m in reader.take_queued() {
        if let (Protocol::Switchboard, Incoming::Text(t)) = (protocol, m) {
            let reply = agent_frame(&t, &mut stats.borrow_mut(), &mut ctx);
            if let Some(reply) = reply {
                if writer.send_text(&reply).await.is_ok() {
                    stats.borrow_mut().replies += 1;
                }
            }
        }
    }
    loop {
        let result = reader
            .read_with(|m, sender| match (protocol, m) {
                (Protocol::Relay, Message::Text(t)) => {
                    if sender.send_text(t) {
                        stats.borrow_mut().replies += 1;
                    }
                }
                (Protocol::Switchboard, Message::Text(t)) => {
                    let mut st = stats.borrow_mut();
                    if let Some(reply) = agent_frame(t, &mut st, &mut ctx) {
                        if sender.send_text(&reply) {
                            st.replies += 1;
                        }
                    }
                }
                _ => stats.borrow_mut().other_frames += 1,
            })
            .await;
        match result {
            Ok(None) => {}
            Ok(Some(_)) => return,
            Err(e) => {
                if !closing.get() {
                    bump(
                        &mut stats.borrow_mut().errors,
                        format!("agent session lost: {}", e.reason()),
                    );
                }
                return;
            }
        }
    }
}

/// How an agent tells this run's visitors from older runs' (their conversations may still be
/// open and assigned to the same accounts).
#[derive(Debug, Clone)]
pub enum RunVisitors {
    /// The bench named them: their ids start with `<run id>-`.
    Prefix(String),
    /// The server issued their ids (`--issued-visitor-ids`); set-up records each one before the
    /// visitor asks for an agent.
    Issued(Arc<Mutex<HashSet<String>>>),
}

impl RunVisitors {
    fn is_ours(&self, visitor: &str) -> bool {
        match self {
            RunVisitors::Prefix(run_id) => visitor
                .strip_prefix(run_id.as_str())
                .is_some_and(|rest| rest.starts_with('-')),
            RunVisitors::Issued(ids) => ids.lock().expect("issued ids").contains(visitor),
        }
    }
}

/// What an agent session knows of itself.
struct AgentSession {
    next_id: u64,
    run: RunVisitors,
    /// Conversations this session was sent `assigned` for (a visitor of this run's).
    mine: HashSet<String>,
    assigned: Rc<RefCell<Vec<serde_json::Value>>>,
}

/// One switchboard frame to an agent: the reply to send, if any.
fn agent_frame(t: &str, st: &mut AgentStats, ctx: &mut AgentSession) -> Option<String> {
    let f = match ServerFrame::parse(t) {
        Ok(f) => f,
        Err(_) => {
            bump(&mut st.errors, "agent: malformed json");
            return None;
        }
    };
    let from_visitor = f.from.as_deref().unwrap_or("visitor") == "visitor";
    match (f.kind.as_ref(), &f.conversation, &f.text) {
        ("assigned", Some(conv), _) => {
            let ours = f.visitor.as_deref().is_none_or(|v| ctx.run.is_ours(v));
            if ours && ctx.mine.insert(conv.to_string()) {
                ctx.assigned.borrow_mut().push(conv.clone());
            }
        }
        ("message", Some(conv), Some(text)) if from_visitor => {
            let key = conv.to_string();
            if !ctx.mine.contains(&key) {
                st.foreign += 1;
                return None;
            }
            let id = match f.seq {
                Some(seq) if st.answered.get(&key).is_some_and(|a| a.contains(seq)) => return None,
                Some(seq) => format!("r{seq}"),
                None => {
                    ctx.next_id += 1;
                    format!("a{}", ctx.next_id)
                }
            };
            return Some(protocol::agent_message(conv, &id, text));
        }
        ("ack", Some(conv), _) => {
            let seq = match &f.id {
                Some(serde_json::Value::String(id)) => {
                    id.strip_prefix('r').and_then(|n| n.parse::<u64>().ok())
                }
                _ => None,
            };
            if let Some(seq) = seq {
                st.answered.entry(conv.to_string()).or_default().record(seq);
                if let Some(reply_seq) = f.seq {
                    st.acked_replies
                        .lock()
                        .unwrap()
                        .entry(conv.to_string())
                        .or_default()
                        .insert(reply_seq, seq);
                }
            }
            st.other_frames += 1;
        }
        ("message", _, _) if from_visitor => bump(
            &mut st.errors,
            "agent: message without conversation or text",
        ),
        ("error", _, _) => bump(
            &mut st.errors,
            format!("agent: server error {}", f.code.clone().unwrap_or_default()),
        ),
        _ => st.other_frames += 1,
    }
    None
}

/// Switchboard: each agent closes the conversations assigned to it in this run, so they do not pile up
/// on the agent accounts (and get replayed to them) across runs.
pub async fn close_conversations(agents: &[(WsWriter, Rc<RefCell<Vec<serde_json::Value>>>)]) {
    for (writer, assigned) in agents {
        let convs = std::mem::take(&mut *assigned.borrow_mut());
        for conv in convs {
            let frame = serde_json::json!({"type": "close", "conversation": conv}).to_string();
            if writer.send_text(&frame).await.is_err() {
                break;
            }
        }
    }
}

/// Sends a close to every writer, then waits (bounded) for the given tasks to finish; returns how many did
/// not finish in time (they are cancelled).
pub async fn close_all(
    writers: &[WsWriter],
    tasks: Vec<glommio::Task<()>>,
    limit: Duration,
) -> u64 {
    for w in writers {
        let _ = w.close(1000).await;
    }
    let total = tasks.len() as u64;
    let done = Rc::new(std::cell::Cell::new(0u64));
    let d = done.clone();
    crate::runtime::with_timeout(limit, async move {
        for t in tasks {
            t.await;
            d.set(d.get() + 1);
        }
    })
    .await;
    total - done.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_answers_only_this_runs_visitors() {
        let named = RunVisitors::Prefix("r7".into());
        assert!(named.is_ours("r7-12"));
        assert!(
            !named.is_ours("r70-12"),
            "another run whose id starts the same"
        );
        assert!(!named.is_ours("v-1f"));
        let ids = Arc::new(Mutex::new(HashSet::new()));
        let issued = RunVisitors::Issued(ids.clone());
        assert!(!issued.is_ours("v-1f"));
        ids.lock().unwrap().insert("v-1f".to_string());
        assert!(issued.is_ours("v-1f"));
        assert!(!issued.is_ours("v-2e"), "an older run's issued id");
    }
}
