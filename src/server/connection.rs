//! The shard-local driver of one connection: the only place that does socket
//! I/O for it.
//!
//! It runs over plain TCP or TLS alike (generic over [`SessionStream`]).
//!
//! Phase 1 reads an HTTP request head (bounded in size and, against slowloris,
//! in total time) and answers it or upgrades to WebSocket. Phase 2 runs the
//! sans-IO WebSocket [`Connection`] codec: bytes read are fed to it, and bytes it
//! produces are written out.
//!
//! Memory invariants (the per-idle-session budget):
//! - While waiting for bytes the task holds no buffer: [`wait`] borrows a pooled
//!   read buffer only for the duration of one non-blocking `recv` and returns it
//!   when the socket has nothing, so an idle session waits on a buffer-less
//!   io_uring poll.
//! - The outgoing buffer is taken from the pool for a burst and given back.
//! - No per-session timer: the shard's sweeper sets `ping_due` or `close` in the
//!   arena record and wakes the task.

use std::cell::Cell;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use futures_lite::io::AsyncWriteExt;

use super::admission::{self as driver, hostile};
use super::routes::{route, Endpoint, Route};
use super::stream::SessionStream;
use super::Shard;
use crate::admission::shed::{self, MessageVerdict, OwnerLoad};
use crate::admission::{self, AbuseVerdict, FrameClass, Level, SessionLimits, SessionRates};
use crate::arena::{CloseRequest, Outbound, SessionId};
use crate::auth::rbac::{self, Role as AgentRole};
use crate::conversation::dispatch::{self, AgentStatus, DispatchEvent};
use crate::conversation::identity;
use crate::conversation::owner::{Credentials, FreshVisitor, OwnerEvent, VisitorKey};
use crate::conversation::protocol::{self, AgentFrame, FrameError, Presence, VisitorFrame};
use crate::conversation::{dispatcher_shard, visitor_owner, SessionRef};
use crate::http::{self, HttpError, HttpLimits, RequestHead};
use crate::metrics::ShardMetrics;
use crate::server::ShardMessage;
use crate::store::ConversationId;
use crate::ws::connection::{Connection, Message, Role, Sender, State, WsLimits};
use crate::ws::handshake;

/// Serves one accepted connection: answers it or upgrades it.
///
/// The handshake and the session are separate tasks: this one (with the HTTP
/// parsing state) ends once the upgrade is done, and the long-lived session
/// task carries only what a session needs, which keeps an idle session's
/// memory small.
pub async fn serve<S: SessionStream>(shard: Rc<Shard>, stream: S, peer: Option<SocketAddr>) {
    if let Some(upgraded) = handshake(shard.clone(), stream, peer).await {
        glommio::spawn_local(session_task(shard, upgraded)).detach();
    }
}

async fn session_task<S: SessionStream>(shard: Rc<Shard>, upgraded: Upgraded<S>) {
    let Upgraded {
        mut stream,
        ws,
        session,
        buffer,
        leftover,
        out,
    } = upgraded;
    run_session(&shard, &mut stream, ws, session, buffer, leftover, out).await;
    shard.publish_session_counts();
    let _ = stream.close().await;
}

/// A fault drill (`/debug/panic`, `/debug/stall`): only loopback peers may ask (to anyone else
/// the endpoint does not exist); the drill goes to shard `target` as a mesh message.
async fn fault_drill<S: SessionStream>(
    shard: &Shard,
    stream: &mut S,
    peer: Option<SocketAddr>,
    target: usize,
    drill: crate::server::ShardMessage,
    what: &str,
    accepted: &[u8],
) {
    if !peer.is_some_and(|peer| peer.ip().is_loopback()) {
        respond(shard, stream, 404, b"no such endpoint", &[]).await;
    } else if target >= shard.shard_count {
        respond(shard, stream, 400, b"no such shard", &[]).await;
    } else {
        tracing::warn!(shard = shard.id.0, target, "{what}");
        respond(shard, stream, 202, accepted, &[]).await;
        shard.router.send(target, drill);
    }
}

/// A connection whose WebSocket handshake succeeded.
struct Upgraded<S> {
    stream: S,
    ws: Connection,
    session: Session,
    /// The buffer the request head was read into; `leftover` are the bytes
    /// the client sent right behind its upgrade request.
    buffer: Vec<u8>,
    leftover: std::ops::Range<usize>,
    /// The 101 response, to be written first.
    out: Vec<u8>,
}

/// Reads the request head, answers plain HTTP requests, and upgrades
/// WebSocket ones.
async fn handshake<S: SessionStream>(
    shard: Rc<Shard>,
    mut stream: S,
    peer: Option<SocketAddr>,
) -> Option<Upgraded<S>> {
    let config = shard.config();
    stream.set_write_timeout(Some(config.websocket.write_timeout));
    let limits = HttpLimits {
        max_header_bytes: config.http.max_header_bytes,
        max_headers: config.http.max_headers,
    };
    let head = futures_lite::future::or(read_head(&shard, &mut stream, &limits), async {
        glommio::timer::sleep(config.http.handshake_timeout).await;
        Err(HeadError::Timeout)
    })
    .await;
    let (head, buffer, leftover) = match head {
        Ok(parsed) => parsed,
        Err(HeadError::Http(err)) => {
            ShardMetrics::add(&shard.counters().http_errors, 1);
            hostile(&shard, peer, "bad request", &err.to_string());
            respond(
                &shard,
                &mut stream,
                err.status(),
                err.to_string().as_bytes(),
                &[],
            )
            .await;
            return None;
        }
        Err(HeadError::Timeout) => {
            ShardMetrics::add(&shard.counters().handshake_timeouts, 1);
            hostile(&shard, peer, "408", "request head not received in time");
            respond(
                &shard,
                &mut stream,
                408,
                b"request head not received in time",
                &[],
            )
            .await;
            return None;
        }
        Err(HeadError::Closed) => return None,
    };

    let endpoint = match route(
        &head,
        &config,
        &shard.authority,
        crate::auth::clock::unix_now(),
    ) {
        Route::Api => {
            let peer = peer.map(|addr| addr.ip());
            super::api_driver::serve(&shard, &mut stream, head, buffer, leftover, peer).await;
            return None;
        }
        Route::Health => {
            let (status, body): (u16, &[u8]) = if crate::fault::has_failed() {
                (503, b"failed: a shard panicked; the process is exiting\n")
            } else {
                (200, b"ok\n")
            };
            respond(&shard, &mut stream, status, body, &[]).await;
            return None;
        }
        Route::Ready => {
            let (status, body): (u16, &[u8]) = if crate::fault::has_failed() {
                (503, b"failed: a shard panicked; the process is exiting\n")
            } else if shard.is_shutting_down() {
                (503, b"draining\n")
            } else {
                (200, b"ready\n")
            };
            respond(&shard, &mut stream, status, body, &[]).await;
            return None;
        }
        Route::Metrics => {
            let authorized = crate::api::authorize_metrics(
                head.header_str("authorization"),
                peer.map(|peer| peer.ip()),
                &shard.authority,
                crate::auth::clock::unix_now(),
            );
            let (status, content_type, body) = match authorized {
                Ok(_) => (
                    200,
                    crate::metrics::CONTENT_TYPE,
                    shard.metrics.render(crate::system::resident_bytes()),
                ),
                Err(refusal) => {
                    ShardMetrics::add(&shard.counters().http_errors, 1);
                    (refusal.status, "application/json", refusal.body)
                }
            };
            // Not a pooled buffer: a scrape's text is larger than the pool's buffers, and rare.
            let mut out = Vec::with_capacity(body.len() + 256);
            http::write_response(&mut out, status, content_type, body.as_bytes(), &[]);
            let _ = stream.write_all(&out).await;
            let _ = stream.close().await;
            return None;
        }
        Route::DebugPanic { shard: target } => {
            let drill = crate::server::ShardMessage::InjectPanic;
            let what = format!("POST /debug/panic: asking shard {target} to panic");
            fault_drill(
                &shard,
                &mut stream,
                peer,
                target,
                drill,
                &what,
                b"panicking\n",
            )
            .await;
            return None;
        }
        Route::DebugStall {
            shard: target,
            millis,
        } => {
            let drill = crate::server::ShardMessage::InjectStall { millis };
            let what = format!("POST /debug/stall: asking shard {target} to block for {millis} ms");
            fault_drill(
                &shard,
                &mut stream,
                peer,
                target,
                drill,
                &what,
                b"stalling\n",
            )
            .await;
            return None;
        }
        Route::Reject(status, message) => {
            ShardMetrics::add(&shard.counters().http_errors, 1);
            if head.path.starts_with("/ws/") {
                hostile(&shard, peer, "refused upgrade", message);
            }
            respond(&shard, &mut stream, status, message.as_bytes(), &[]).await;
            return None;
        }
        Route::Asset(asset) => {
            let response = crate::web::respond(
                asset,
                &head.path,
                head.header_str("accept-encoding"),
                head.header_str("if-none-match"),
            );
            // Not a pooled buffer: assets are larger than the pool's buffers and rare.
            let mut out = Vec::with_capacity(response.body.len() + 512);
            http::write_response(
                &mut out,
                response.status,
                response.content_type,
                response.body,
                &response.headers,
            );
            let _ = stream.write_all(&out).await;
            let _ = stream.close().await;
            return None;
        }
        Route::Upgrade(endpoint) => endpoint,
    };
    if shard.is_shutting_down() {
        respond(&shard, &mut stream, 503, b"draining\n", &[]).await;
        return None;
    }
    if let Some(limit) = config.shards.session_limit() {
        if shard.arena.borrow().len() >= limit {
            ShardMetrics::add(&shard.counters().http_errors, 1);
            hostile(&shard, peer, "refused upgrade", "session limit reached");
            respond(&shard, &mut stream, 503, b"session limit reached\n", &[]).await;
            return None;
        }
    }
    let accept = match handshake::validate_upgrade(&head) {
        Ok(accept) => accept,
        Err(err) => {
            ShardMetrics::add(&shard.counters().http_errors, 1);
            hostile(&shard, peer, "refused upgrade", &err.to_string());
            let mut out = shard.buffers.take();
            err.write_response(&mut out);
            let _ = stream.write_all(&out).await;
            shard.buffers.give(out);
            return None;
        }
    };
    drop(head);

    let mut out = shard.buffers.take();
    handshake::write_101(&mut out, &accept);
    let mut ws = Connection::new(
        Role::Server,
        WsLimits {
            max_message_bytes: config.websocket.max_message_bytes,
        },
    );
    if driver::refusing(&shard) {
        // The shard is overloaded: existing conversations continue, new sessions are refused.
        // A browser cannot read an HTTP status from a failed upgrade, so a visitor gets the
        // upgrade and an immediate close 1013 (try again later); other clients get a 503.
        ShardMetrics::add(&shard.counters().admission_overloaded, 1);
        hostile(&shard, peer, "refused upgrade", "overloaded");
        if let Endpoint::Visitor { .. } = endpoint {
            ws.close(1013, "server overloaded; retry later", &mut out);
            let _ = stream.write_all(&out).await;
            let _ = stream.close().await;
        } else {
            let _ = stream.write_all(&driver::overload_response()).await;
            let _ = stream.close().await;
        }
        shard.buffers.give(out);
        shard.buffers.give(buffer);
        return None;
    }
    let session = Session::open(&shard, endpoint, peer);
    ShardMetrics::add(&shard.counters().handshakes_completed, 1);
    shard.publish_session_counts();

    Some(Upgraded {
        stream,
        ws,
        session,
        buffer,
        leftover,
        out,
    })
}

enum HeadError {
    Http(HttpError),
    Timeout,
    Closed,
}

/// Reads until a whole request head is buffered. Returns the head, the buffer
/// and the byte range after the head (bytes a client sent right behind its
/// upgrade request).
async fn read_head<S: SessionStream>(
    shard: &Shard,
    stream: &mut S,
    limits: &HttpLimits,
) -> Result<(RequestHead, Vec<u8>, std::ops::Range<usize>), HeadError> {
    let mut buffer = shard.buffers.take_filled();
    let mut filled = 0;
    loop {
        match http::parse_request(&buffer[..filled], limits) {
            Ok(Some((head, consumed))) => return Ok((head, buffer, consumed..filled)),
            Ok(None) => {}
            Err(err) => {
                shard.buffers.give(buffer);
                return Err(HeadError::Http(err));
            }
        }
        if filled == buffer.len() {
            let grown = (buffer.len() * 2)
                .min(limits.max_header_bytes + 1)
                .max(filled + 1);
            buffer.resize(grown, 0);
        }
        match futures_lite::io::AsyncReadExt::read(stream, &mut buffer[filled..]).await {
            Ok(0) | Err(_) => {
                shard.buffers.give(buffer);
                return Err(HeadError::Closed);
            }
            Ok(read) => filled += read,
        }
    }
}

/// Writes a complete HTTP response and lets the connection close.
async fn respond<S: SessionStream>(
    shard: &Shard,
    stream: &mut S,
    status: u16,
    body: &[u8],
    extra_headers: &[(&str, &str)],
) {
    let mut out = shard.buffers.take();
    http::write_response(
        &mut out,
        status,
        "text/plain; charset=utf-8",
        body,
        extra_headers,
    );
    let _ = stream.write_all(&out).await;
    let _ = stream.close().await;
    shard.buffers.give(out);
}

/// A live WebSocket session: its arena entry and what the endpoint does with
/// messages.
struct Session {
    shard: Rc<Shard>,
    id: SessionId,
    role: SessionRole,
    /// Message, frame and abuse budgets (see [`crate::admission::SessionLimits`]).
    limits: SessionLimits,
    /// For the hostile-input log.
    peer: Option<SocketAddr>,
}

/// What a session is, keeping only what the session needs after its
/// handshake (the query string's strings are not kept twice).
enum SessionRole {
    Echo {
        delay_ms: u32,
        /// Delayed echoes not yet queued (each is a sleeping task); bounded by
        /// `[limits] max_outbox_frames` like the outbox they end up in.
        in_flight: Rc<Cell<usize>>,
    },
    /// `owner` is the shard owning the visitor's conversation, computed once.
    Visitor { key: VisitorKey, owner: usize },
    Agent {
        id: Box<str>,
        name: Box<str>,
        role: AgentRole,
    },
}

impl Session {
    /// Registers the session in the arena and announces it to whoever owns
    /// its conversations (a visitor's owner shard, or the dispatcher for an
    /// agent), which answers with the `hello` frame.
    fn open(shard: &Rc<Shard>, endpoint: Endpoint, peer: Option<SocketAddr>) -> Session {
        let id = shard
            .arena
            .borrow_mut()
            .insert(endpoint.kind(), shard.now_secs());
        let me = SessionRef {
            shard: shard.id.0,
            session: id,
        };
        let router = &shard.router;
        let role = match endpoint {
            Endpoint::Echo { delay_ms } => SessionRole::Echo {
                delay_ms,
                in_flight: Rc::default(),
            },
            Endpoint::Visitor {
                site,
                visitor,
                resume,
                secret,
                verified,
            } => {
                // A new visitor (no id yet: the widget's first connection) gets an id whose
                // conversations this shard owns, so its messages, acks and replies never cross
                // to another shard while this connection lasts. A returning visitor's id keeps
                // its owner, wherever the connection landed.
                let visitor = visitor.unwrap_or_else(|| {
                    identity::new_visitor_on(&site, shard.id.0, router.shard_count())
                });
                let key = VisitorKey {
                    site: site.into(),
                    visitor: visitor.into(),
                };
                let owner = visitor_owner(&key.site, &key.visitor, router.shard_count());
                let credentials =
                    visitor_credentials(&key, owner, router.shard_count(), secret, verified);
                router.send(
                    owner,
                    ShardMessage::Owner(OwnerEvent::VisitorAttach {
                        key: key.clone(),
                        resume,
                        session: me,
                        credentials: Box::new(credentials),
                        stored: None,
                    }),
                );
                SessionRole::Visitor { key, owner }
            }
            Endpoint::Agent {
                id,
                name,
                max_open,
                role,
            } => {
                router.send(
                    dispatcher_shard(router.shard_count()),
                    ShardMessage::Dispatch(DispatchEvent::AgentAttached {
                        agent: id.to_string(),
                        name: name.clone(),
                        max_open,
                        session: me.to_dispatch(),
                    }),
                );
                SessionRole::Agent {
                    id: id.into(),
                    name: name.into(),
                    role,
                }
            }
        };
        let limits = SessionLimits::new(&session_rates(shard, &role), shard.admission.now_ms());
        Session {
            shard: shard.clone(),
            id,
            role,
            limits,
            peer,
        }
    }

    fn rates(&self) -> SessionRates {
        session_rates(&self.shard, &self.role)
    }

    /// Takes a frame of `class` from the session's budgets; a refusal is answered with a
    /// `rate_limited` error frame (and counts toward the abuse limit).
    fn admit(&mut self, class: FrameClass, reply: &mut Sender<'_>) -> bool {
        let now = self.shard.admission.now_ms();
        let rates = self.rates();
        match self.limits.admit(&rates, class, now) {
            Ok(()) => true,
            Err(retry) => {
                ShardMetrics::add(&self.shard.counters().frames_rate_limited, 1);
                let what = match class {
                    FrameClass::Message => "messages",
                    FrameClass::Other => "frames",
                };
                reply.send_text(&admission::rate_limited_frame(what, retry));
                self.count_refusal(reply);
                false
            }
        }
    }

    /// Counts one refused frame; closes the session with 1008 when the abuse budget is spent.
    /// `false` once the session is closing.
    fn count_refusal(&mut self, reply: &mut Sender<'_>) -> bool {
        let now = self.shard.admission.now_ms();
        let rates = self.rates();
        match self.limits.refused(&rates, now) {
            AbuseVerdict::Tolerate => true,
            AbuseVerdict::Close => {
                if reply.close(1008, "too many refused frames") {
                    ShardMetrics::add(&self.shard.counters().abuse_closes, 1);
                    hostile(
                        &self.shard,
                        self.peer,
                        "close 1008",
                        "too many refused frames",
                    );
                }
                false
            }
        }
    }

    /// Whether the queues toward where this session's frames go are past their bounds: the
    /// session then stops reading its socket until they drain (TCP pushes back on the client).
    fn congested(&self) -> bool {
        let router = &self.shard.router;
        let config = self.shard.config();
        let limits = &config.limits;
        let over = |to: usize| {
            router.queued_to(to) >= limits.max_queued_per_shard
                || self
                    .shard
                    .metrics
                    .shard(to)
                    .commit_pending
                    .load(Ordering::Relaxed) as usize
                    >= limits.max_pending_commits
        };
        match &self.role {
            SessionRole::Echo { .. } => false,
            SessionRole::Visitor { owner, .. } => over(*owner),
            // An agent's frames go to the dispatcher and to its conversations' shards.
            SessionRole::Agent { .. } => (0..router.shard_count()).any(over),
        }
    }

    /// Message-level shedding (see [`crate::admission::shed`]): whether a message for the
    /// conversation owned by shard `owner` would wait past the latency budget. The owner's
    /// backlog counts the messages this shard still holds for it on the mesh.
    fn shed_message(&self, owner: usize) -> MessageVerdict {
        let config = self.shard.config();
        let published = self.shard.metrics.shard(owner);
        let mut lag = driver::lag_samples(published, driver::process_ms());
        if owner == self.shard.id.0 {
            // This shard is running (it runs this code): whatever it has not sampled yet is
            // a stall that has ended, not one going on.
            lag.age_micros = 0;
        }
        let load = OwnerLoad {
            pending_commits: published.commit_pending.load(Ordering::Relaxed) as usize
                + self.shard.router.queued_to(owner),
            commit_micros: published.commit_recent_micros.load(Ordering::Relaxed),
            max_batch: config.storage.max_batch,
            lag_micros: lag.predicted_micros(),
        };
        shed::decide(load, config.limits.admit_latency_budget.as_millis() as u64)
    }

    fn me(&self) -> SessionRef {
        SessionRef {
            shard: self.shard.id.0,
            session: self.id,
        }
    }

    /// Handles one complete data message.
    fn on_message(&mut self, message: Message<'_>, reply: &mut Sender<'_>) {
        let text = match (&self.role, message) {
            (SessionRole::Echo { delay_ms: 0, .. }, Message::Text(text)) => {
                reply.send_text(text);
                return;
            }
            (SessionRole::Echo { delay_ms: 0, .. }, Message::Binary(data)) => {
                reply.send_binary(data);
                return;
            }
            (
                SessionRole::Echo {
                    delay_ms,
                    in_flight,
                },
                message,
            ) => {
                if in_flight.get() >= self.shard.config().limits.max_outbox_frames {
                    // The client sends faster than its echoes come due: stop it as a client
                    // that does not read would be stopped, before the tasks pile up.
                    self.shard.arena.borrow_mut().request_close(
                        self.id,
                        CloseRequest {
                            code: 1013,
                            reason: "too many echoes waiting; slow down",
                        },
                    );
                    return;
                }
                let frame = match message {
                    Message::Text(text) => Outbound::Text(text.into()),
                    Message::Binary(data) => Outbound::Binary(data.into()),
                };
                let delay = Duration::from_millis(u64::from(*delay_ms));
                let (shard, id, in_flight) = (self.shard.clone(), self.id, in_flight.clone());
                in_flight.set(in_flight.get() + 1);
                glommio::spawn_local(async move {
                    glommio::timer::sleep(delay).await;
                    in_flight.set(in_flight.get() - 1);
                    shard.arena.borrow_mut().push(id, frame);
                })
                .detach();
                return;
            }
            (_, Message::Binary(_)) => {
                self.refuse(
                    reply,
                    FrameError::new(
                        "binary_unsupported",
                        "this endpoint speaks JSON text frames",
                    ),
                );
                return;
            }
            (_, Message::Text(text)) => text,
        };
        let shard = self.shard.clone();
        let router = &shard.router;
        let max_text = shard.config().conversations.max_text_bytes;
        let me = self.me();
        match &self.role {
            SessionRole::Visitor { key, owner } => match protocol::parse_visitor(text, max_text) {
                Ok(frame) => {
                    let class = match frame {
                        VisitorFrame::Message { .. } => FrameClass::Message,
                        _ => FrameClass::Other,
                    };
                    let shed_typing = matches!(frame, VisitorFrame::Typing { .. })
                        && self.shard.router.level() >= Level::Shed;
                    let key = key.clone();
                    let owner = *owner;
                    if !self.admit(class, reply) {
                        return;
                    }
                    if shed_typing {
                        ShardMetrics::add(&self.shard.counters().typing_shed, 1);
                        return;
                    }
                    if let VisitorFrame::Message { id, .. } = &frame {
                        // Past the owner's latency budget, or past this shard's rated
                        // capacity (`[limits] shard_messages_per_second`; only admitted
                        // messages spend it), refusing is cheaper than any queue.
                        let verdict = match self.shed_message(owner) {
                            MessageVerdict::Admit => {
                                match self.shard.admission.take_message_capacity() {
                                    Err(retry) => MessageVerdict::Overloaded(retry),
                                    Ok(()) => MessageVerdict::Admit,
                                }
                            }
                            refused => refused,
                        };
                        if let MessageVerdict::Overloaded(retry) = verdict {
                            // Not stored and not counted as abuse: the client re-sends it later
                            // with the same id.
                            ShardMetrics::add(&self.shard.counters().messages_overloaded, 1);
                            reply.send_text(&shed::overloaded_frame(id, retry));
                            return;
                        }
                    }
                    router.send(
                        owner,
                        ShardMessage::Owner(OwnerEvent::Visitor {
                            key,
                            session: me,
                            frame,
                        }),
                    );
                }
                Err(err) => self.refuse(reply, err),
            },
            SessionRole::Agent { id, name, role } => match protocol::parse_agent(text, max_text) {
                Ok(frame) => {
                    let class = match frame {
                        AgentFrame::Message { .. } => FrameClass::Message,
                        _ => FrameClass::Other,
                    };
                    let shed_typing = matches!(frame, AgentFrame::Typing { .. })
                        && self.shard.router.level() >= Level::Shed;
                    let (id, name, role) = (id.clone(), name.clone(), *role);
                    if !self.admit(class, reply) {
                        return;
                    }
                    if shed_typing {
                        ShardMetrics::add(&self.shard.counters().typing_shed, 1);
                        return;
                    }
                    let dispatcher = dispatcher_shard(router.shard_count());
                    let to_dispatcher =
                        |event| router.send(dispatcher, ShardMessage::Dispatch(event));
                    match frame {
                        AgentFrame::Status { status } => {
                            to_dispatcher(DispatchEvent::AgentStatus {
                                agent: id.to_string(),
                                status: match status {
                                    Presence::Online => AgentStatus::Online,
                                    Presence::Away => AgentStatus::Away,
                                },
                            })
                        }
                        AgentFrame::Accept { .. }
                            if !rbac::allows(role, rbac::Action::AcceptConversation) =>
                        {
                            self.refuse(
                                reply,
                                FrameError::new("forbidden", format!("role {role} may not accept")),
                            );
                        }
                        AgentFrame::Accept { conversation } => {
                            to_dispatcher(DispatchEvent::Accept {
                                agent: id.to_string(),
                                session: me.to_dispatch(),
                                conversation: dispatch::ConversationId(conversation),
                            })
                        }
                        AgentFrame::Transfer { conversation, to } => {
                            to_dispatcher(DispatchEvent::Transfer {
                                from: id.to_string(),
                                session: me.to_dispatch(),
                                conversation: dispatch::ConversationId(conversation),
                                to,
                                role,
                            })
                        }
                        frame => {
                            let conversation =
                                frame.conversation().expect("scoped frames name one");
                            if conversation.shard() >= router.shard_count() {
                                self.refuse(
                                    reply,
                                    FrameError::new(
                                        "unknown_conversation",
                                        format!("no conversation {}", conversation.0),
                                    ),
                                );
                                return;
                            }
                            router.send(
                                conversation.shard(),
                                ShardMessage::Owner(OwnerEvent::Agent {
                                    agent: id.to_string(),
                                    name: name.to_string(),
                                    role,
                                    session: me,
                                    frame,
                                }),
                            );
                        }
                    }
                }
                Err(err) => self.refuse(reply, err),
            },
            SessionRole::Echo { .. } => unreachable!("echo sessions returned above"),
        }
    }

    /// Answers a refused frame with an `error` frame; closes with 1008 past
    /// the abuse limit.
    fn refuse(&mut self, reply: &mut Sender<'_>, err: FrameError) {
        reply.send_text(&protocol::error_frame(err.code, &err.message));
        self.count_refusal(reply);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let follows = self
            .shard
            .arena
            .borrow_mut()
            .get_mut(self.id)
            .map(|record| std::mem::take(&mut record.follows))
            .unwrap_or_default();
        self.shard.arena.borrow_mut().remove(self.id);
        let router = &self.shard.router;
        let me = self.me();
        match &self.role {
            SessionRole::Echo { .. } => {}
            SessionRole::Visitor { key, owner } => {
                let owner = *owner;
                router.send(
                    owner,
                    ShardMessage::Owner(OwnerEvent::VisitorDetach {
                        key: key.clone(),
                        session: me,
                    }),
                );
            }
            SessionRole::Agent { id, .. } => {
                router.send(
                    dispatcher_shard(router.shard_count()),
                    ShardMessage::Dispatch(DispatchEvent::AgentDetached {
                        agent: id.to_string(),
                        session: me.to_dispatch(),
                    }),
                );
                for conversation in follows {
                    let conversation = ConversationId(conversation);
                    router.send(
                        conversation.shard(),
                        ShardMessage::Owner(OwnerEvent::AgentUnsubscribe {
                            conversation,
                            session: me,
                        }),
                    );
                }
            }
        }
    }
}

/// What a visitor connection presents to its owner shard (see `conversation::identity`):
/// the hash of its secret, whether its identity was verified, and a fresh id and secret
/// in case it starts a visitor.
fn visitor_credentials(
    key: &VisitorKey,
    owner: usize,
    shard_count: usize,
    secret: Option<String>,
    verified: bool,
) -> Credentials {
    let (fresh_secret, fresh_hash) = identity::new_secret();
    Credentials {
        secret_hash: secret.as_deref().map(identity::hash_secret),
        verified,
        fresh: FreshVisitor {
            visitor: identity::new_visitor_on(&key.site, owner, shard_count).into(),
            secret: fresh_secret.into(),
            secret_hash: fresh_hash,
        },
    }
}

/// The rates a session of `role` gets (read at every frame: a reload changes them for open
/// sessions too).
fn session_rates(shard: &Shard, role: &SessionRole) -> SessionRates {
    match role {
        SessionRole::Agent { .. } => shard.admission.agent_rates.get(),
        _ => shard.admission.visitor_rates.get(),
    }
}

/// What woke a waiting session.
enum Wake {
    /// `read` bytes arrived in `buffer`.
    Bytes { buffer: Vec<u8>, read: usize },
    /// The peer closed or the socket failed.
    Gone,
    /// The arena record has work: outbox, ping or close.
    Work,
    /// A paused session's back-pressure check is due.
    Recheck,
}

/// How often a session paused by back-pressure checks whether the queues drained.
const BACKPRESSURE_RECHECK: Duration = Duration::from_millis(2);

/// Waits for bytes or arena work without holding a buffer while waiting.
async fn wait<S: SessionStream>(shard: &Shard, id: SessionId, stream: &mut S, read: bool) -> Wake {
    poll_fn(|cx| {
        {
            let mut arena = shard.arena.borrow_mut();
            let Some(record) = arena.get_mut(id) else {
                return Poll::Ready(Wake::Gone);
            };
            if record.has_work() {
                return Poll::Ready(Wake::Work);
            }
            record.set_waker(cx.waker());
        }
        if !read {
            return Poll::Pending;
        }
        let mut buffer = shard.buffers.take_filled();
        match Pin::new(&mut *stream).poll_read(cx, &mut buffer) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                shard.buffers.give(buffer);
                Poll::Ready(Wake::Gone)
            }
            Poll::Ready(Ok(read)) => Poll::Ready(Wake::Bytes { buffer, read }),
            Poll::Pending => {
                shard.buffers.give(buffer);
                Poll::Pending
            }
        }
    })
    .await
}

/// Resolves (to `None`) once the session's write should be abandoned: the session is gone, the
/// sweeper gave up on its close handshake (`abort`), or its backlog passed its bound
/// (`overflowed`) while the write was blocked.
async fn abandoned(shard: &Shard, id: SessionId) -> Option<bool> {
    poll_fn(|cx| {
        let mut arena = shard.arena.borrow_mut();
        match arena.get_mut(id) {
            None => Poll::Ready(None),
            Some(record) if record.abort || record.overflowed => Poll::Ready(None),
            Some(record) => {
                record.set_waker(cx.waker());
                Poll::Pending
            }
        }
    })
    .await
}

async fn run_session<S: SessionStream>(
    shard: &Rc<Shard>,
    stream: &mut S,
    mut ws: Connection,
    mut session: Session,
    mut buffer: Vec<u8>,
    leftover: std::ops::Range<usize>,
    mut out: Vec<u8>,
) {
    let counters = shard.counters();
    let mut received = 0u64;
    let mut was_paused = false;
    // Bytes the client sent right behind its upgrade request.
    if !leftover.is_empty() {
        ws.receive(&mut buffer[leftover], &mut out, |message, reply| {
            received += 1;
            session.on_message(message, reply)
        });
    }
    shard.buffers.give(buffer);

    loop {
        if !out.is_empty() {
            // A client that stops reading blocks this write once the socket buffers are full;
            // meanwhile the arena bounds its backlog, and when that bound is passed (or the
            // sweeper gives up on a close) the write is abandoned and the connection dropped:
            // a frame may be cut, but the client resumes from storage.
            let written = futures_lite::future::or(
                async { Some(stream.write_all(&out).await.is_ok()) },
                abandoned(shard, session.id),
            )
            .await;
            match written {
                Some(true) => {}
                Some(false) => break,
                None => {
                    let overflowed = shard
                        .arena
                        .borrow_mut()
                        .get_mut(session.id)
                        .is_some_and(|record| std::mem::take(&mut record.overflowed));
                    if overflowed {
                        ShardMetrics::add(&counters.slow_consumer_closes, 1);
                        hostile(shard, session.peer, "dropped", "client is not reading");
                    }
                    break;
                }
            }
            out.clear();
        }
        shard.buffers.give(std::mem::take(&mut out));
        if ws.state() == State::Closed {
            break;
        }

        // A session with a steady stream of work never waits in `wait`; let the shard's
        // other tasks (accepts, sweeper, commits) run between its rounds.
        glommio::yield_if_needed().await;
        // Back-pressure: while the queues toward this session's owner are full, read nothing
        // (the kernel's receive buffer fills and TCP pushes back on the client), but keep
        // writing what the session is sent.
        let paused = ws.state() == State::Open && session.congested();
        if paused && !was_paused {
            ShardMetrics::add(&counters.backpressure_pauses, 1);
        }
        was_paused = paused;
        let wake = if paused {
            futures_lite::future::or(wait(shard, session.id, stream, false), async {
                glommio::timer::sleep(BACKPRESSURE_RECHECK).await;
                Wake::Recheck
            })
            .await
        } else {
            wait(shard, session.id, stream, true).await
        };
        out = shard.buffers.take();
        match wake {
            Wake::Gone => break,
            Wake::Recheck => {}
            Wake::Bytes { mut buffer, read } => {
                if let Some(record) = shard.arena.borrow_mut().get_mut(session.id) {
                    record.last_activity = shard.now_secs();
                    record.ping_sent_at = None;
                }
                let state = ws.receive(&mut buffer[..read], &mut out, |message, reply| {
                    received += 1;
                    session.on_message(message, reply)
                });
                shard.buffers.give(buffer);
                if state != State::Open {
                    let mut arena = shard.arena.borrow_mut();
                    if let Some(record) = arena.get_mut(session.id) {
                        if record.closing_since.is_none() {
                            record.closing_since = Some(shard.now_secs());
                            if ws.close_code_received().is_none() {
                                ShardMetrics::add(&counters.protocol_errors, 1);
                                if let Some(code @ (1002 | 1007 | 1009)) = ws.close_code_sent() {
                                    drop(arena);
                                    hostile(
                                        shard,
                                        session.peer,
                                        &format!("close {code}"),
                                        "protocol error",
                                    );
                                }
                            }
                        }
                    }
                }
            }
            Wake::Work => {
                let mut arena = shard.arena.borrow_mut();
                let Some(record) = arena.get_mut(session.id) else {
                    break;
                };
                if record.abort {
                    // The peer did not finish the close handshake in time.
                    break;
                }
                if std::mem::take(&mut record.overflowed) {
                    // The arena dropped the backlog past `[limits] max_outbox_frames` and asked
                    // for the 1013 below; every message is stored and the client resumes.
                    ShardMetrics::add(&counters.slow_consumer_closes, 1);
                    hostile(shard, session.peer, "close 1013", "client is not reading");
                }
                if let Some(CloseRequest { code, reason }) = record.close.take() {
                    record.closing_since.get_or_insert(shard.now_secs());
                    drop(arena);
                    ws.close(code, reason, &mut out);
                    continue;
                }
                let refusals = std::mem::take(&mut record.refusals);
                if record.ping_due {
                    record.ping_due = false;
                    record.ping_sent_at = Some(shard.now_secs());
                    ws.send_ping(b"", &mut out);
                }
                let mut sent = 0u64;
                record.drain_outbox(|frame| {
                    sent += 1;
                    match frame {
                        Outbound::Text(text) => ws.send_text(&text, &mut out),
                        Outbound::Binary(data) => ws.send_binary(&data, &mut out),
                    };
                });
                ShardMetrics::add(&counters.messages_sent, sent);
                drop(arena);
                if refusals > 0 {
                    // Frames the conversation's owner refused (e.g. the flood guard), counted
                    // after their error frames are written so the close comes behind them.
                    let now = shard.admission.now_ms();
                    let rates = session.rates();
                    let spent = (0..refusals)
                        .any(|_| session.limits.refused(&rates, now) == AbuseVerdict::Close);
                    if spent && ws.close(1008, "too many refused frames", &mut out) {
                        ShardMetrics::add(&counters.abuse_closes, 1);
                        hostile(shard, session.peer, "close 1008", "too many refused frames");
                        if let Some(record) = shard.arena.borrow_mut().get_mut(session.id) {
                            record.closing_since.get_or_insert(shard.now_secs());
                        }
                    }
                }
            }
        }
        ShardMetrics::add(&counters.messages_received, std::mem::take(&mut received));
    }
    shard.buffers.give(out);
}
