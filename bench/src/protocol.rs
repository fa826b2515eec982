//! The three wire protocols the harness speaks, kept in one place so that adapting to a server change means
//! editing this file only:
//! - `switchboard`: the appliance's visitor/agent protocol (docs/protocol.md, issue 4). A visitor connects to
//!   `/ws/visitor?site=S&visitor=V[&secret=X][&resume=SEQ]`, gets `hello` (keeps its `secret`), asks for a human with `handoff`, waits for
//!   `assigned`, then sends `{"type":"message","id":ID,"text":T}` and gets `ack`; the agent (on
//!   `/ws/agent?token=T`) receives the message with its `conversation` and replies to it; the reply reaches
//!   the visitor as `{"type":"message","from":"agent","text":T,...}`.
//! - `relay`: the plain protocol of the peers (../shared/peers/README.md): `/ws?room=R&role=visitor|agent`,
//!   every text frame is forwarded unchanged to the other side of the room.
//! - `echo`: switchboard's diagnostic `/ws/echo[?delay_ms=N]`; the visitor's own frames come back, no agent.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Switchboard,
    Relay,
    Echo,
}

impl Protocol {
    pub fn name(&self) -> &'static str {
        match self {
            Protocol::Switchboard => "switchboard",
            Protocol::Relay => "relay",
            Protocol::Echo => "echo",
        }
    }
}

/// Names that make up request paths: the site, the agent tokens, a run id that keeps rooms and visitor ids
/// of different runs apart, and the echo delay.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub protocol: Protocol,
    pub site: String,
    pub agent_tokens: Vec<String>,
    pub run_id: String,
    pub echo_delay_ms: Option<u64>,
    /// A new switchboard visitor connects without an id and takes the one the server issues.
    pub issued_visitor_ids: bool,
}

impl Endpoints {
    /// Path for visitor number `index` (one per conversation). `resume` and `secret` (the
    /// visitor's secret from an earlier `hello`, needed to reconnect to the same visitor)
    /// apply to switchboard only.
    pub fn visitor_path(&self, index: u64, resume: Option<u64>, secret: Option<&str>) -> String {
        match self.protocol {
            Protocol::Switchboard
                if self.issued_visitor_ids && resume.is_none() && secret.is_none() =>
            {
                format!("/ws/visitor?site={}", self.site)
            }
            Protocol::Switchboard => {
                let mut p = format!(
                    "/ws/visitor?site={}&visitor={}-{index}",
                    self.site, self.run_id
                );
                if let Some(secret) = secret {
                    p.push_str(&format!("&secret={secret}"));
                }
                if let Some(seq) = resume {
                    p.push_str(&format!("&resume={seq}"));
                }
                p
            }
            Protocol::Relay => format!("/ws?room={}-{index}&role=visitor", self.run_id),
            Protocol::Echo => match self.echo_delay_ms {
                Some(ms) => format!("/ws/echo?delay_ms={ms}"),
                None => "/ws/echo".to_string(),
            },
        }
    }

    /// Path for agent number `index`: with `relay` one agent per room, with `switchboard` one connection per
    /// token (it serves every conversation assigned to it), none with `echo`.
    pub fn agent_path(&self, index: u64) -> Option<String> {
        match self.protocol {
            Protocol::Switchboard => {
                let token = &self.agent_tokens[index as usize % self.agent_tokens.len()];
                Some(format!("/ws/agent?token={token}"))
            }
            Protocol::Relay => Some(format!("/ws?room={}-{index}&role=agent", self.run_id)),
            Protocol::Echo => None,
        }
    }
}

/// A switchboard server frame, with the fields the harness looks at. Unknown fields are ignored so the
/// protocol can grow.
#[derive(Debug, Deserialize)]
pub struct ServerFrame<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(default)]
    pub id: Option<Value>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default, borrow)]
    pub from: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub text: Option<Cow<'a, str>>,
    #[serde(default)]
    pub conversation: Option<Value>,
    /// The visitor id (`assigned` frames to agents).
    #[serde(default, borrow)]
    pub visitor: Option<Cow<'a, str>>,
    #[serde(default)]
    pub code: Option<Value>,
    /// Bot answers may say whether they came from the hot-query cache: `"cache":"hit"|"miss"` or
    /// `"cached":true|false`. Absent, the bot scenario classifies by query repetition instead.
    #[serde(default)]
    pub cache: Option<Value>,
    #[serde(default)]
    pub cached: Option<bool>,
    /// The visitor's secret (`hello` of a connection that was issued one); a reconnect to the
    /// same visitor id passes it as `&secret=`, or the server makes it a new visitor.
    #[serde(default, borrow)]
    pub secret: Option<Cow<'a, str>>,
    /// Milliseconds to wait before re-sending, on `rate_limited` and `overloaded` refusals.
    #[serde(default)]
    pub retry_after: Option<u64>,
}

impl<'a> ServerFrame<'a> {
    pub fn parse(text: &'a str) -> Result<ServerFrame<'a>, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// `Some(true)` for a cache hit, `Some(false)` for a miss, `None` if the server does not say.
    pub fn cache_hit(&self) -> Option<bool> {
        if let Some(c) = self.cached {
            return Some(c);
        }
        match self.cache.as_ref()? {
            Value::String(s) => Some(s == "hit"),
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

/// `{"type":"message","id":ID,"text":TEXT}` from a visitor.
pub fn visitor_message(id: &str, text: &str) -> String {
    serde_json::json!({"type": "message", "id": id, "text": text}).to_string()
}

/// `{"type":"handoff"}`: the visitor asks for a human.
pub fn visitor_handoff() -> String {
    r#"{"type":"handoff"}"#.to_string()
}

/// `{"type":"message","conversation":CID,"id":ID,"text":TEXT}` from an agent.
pub fn agent_message(conversation: &Value, id: &str, text: &str) -> String {
    serde_json::json!({"type": "message", "conversation": conversation, "id": id, "text": text})
        .to_string()
}

/// `{"type":"status","status":"online"}`.
pub fn agent_online() -> String {
    r#"{"type":"status","status":"online"}"#.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(p: Protocol) -> Endpoints {
        Endpoints {
            protocol: p,
            site: "demo".into(),
            agent_tokens: vec!["t1".into(), "t2".into()],
            run_id: "r9".into(),
            echo_delay_ms: Some(20),
            issued_visitor_ids: false,
        }
    }

    #[test]
    fn issued_visitor_ids_leave_the_id_out_of_a_first_connection_only() {
        let sb = Endpoints {
            issued_visitor_ids: true,
            ..endpoints(Protocol::Switchboard)
        };
        assert_eq!(sb.visitor_path(4, None, None), "/ws/visitor?site=demo");
        assert_eq!(
            sb.visitor_path(4, Some(7), Some("s3")),
            "/ws/visitor?site=demo&visitor=r9-4&secret=s3&resume=7"
        );
    }

    #[test]
    fn paths_per_protocol() {
        let sb = endpoints(Protocol::Switchboard);
        assert_eq!(
            sb.visitor_path(4, Some(7), None),
            "/ws/visitor?site=demo&visitor=r9-4&resume=7"
        );
        assert_eq!(sb.agent_path(3).unwrap(), "/ws/agent?token=t2");
        let relay = endpoints(Protocol::Relay);
        assert_eq!(
            relay.visitor_path(4, None, None),
            "/ws?room=r9-4&role=visitor"
        );
        assert_eq!(relay.agent_path(4).unwrap(), "/ws?room=r9-4&role=agent");
        let echo = endpoints(Protocol::Echo);
        assert_eq!(echo.visitor_path(0, None, None), "/ws/echo?delay_ms=20");
        assert!(echo.agent_path(0).is_none());
    }

    #[test]
    fn parses_server_frames_and_ignores_unknown_fields() {
        let f = ServerFrame::parse(
            r#"{"type":"message","seq":5,"from":"agent","name":"Ann","text":"p 1 2 3 \"x","ts":"2024-01-01T00:00:00Z","conversation":"c1"}"#,
        )
        .unwrap();
        assert_eq!(f.kind, "message");
        assert_eq!(f.seq, Some(5));
        assert_eq!(f.from.as_deref(), Some("agent"));
        assert_eq!(f.text.as_deref(), Some("p 1 2 3 \"x"));
        assert_eq!(f.cache_hit(), None);
        let bot =
            ServerFrame::parse(r#"{"type":"message","from":"bot","text":"hi","cache":"hit"}"#)
                .unwrap();
        assert_eq!(bot.cache_hit(), Some(true));
    }

    #[test]
    fn agent_reply_escapes_text() {
        let m = agent_message(&Value::String("c1".into()), "a1", "say \"hi\"");
        let back: Value = serde_json::from_str(&m).unwrap();
        assert_eq!(back["text"], "say \"hi\"");
        assert_eq!(back["conversation"], "c1");
    }
}
