//! The `order_status` handler: recognises "where is my order 12345" (English or Chinese,
//! e.g. 我的订单12345到哪了) and answers with the order's status from the order service.
//!
//! Not blocking the shard: `handle` runs on the shard's event loop, which serves every
//! session of that shard, so it must never wait for the network. It hands the lookup to the
//! handler's own worker thread (one per shard) and returns `Verdict::Later`; the server awaits
//! the answer without blocking. The worker gives each lookup a tight deadline
//! ([`CONNECT_TIMEOUT`], [`LOOKUP_DEADLINE`]) and answers politely when the service is down or
//! slow. A lookup queue that is full is answered at once ("busy"), never waited on.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use switchboard::bot::{
    later, BotContext, BotError, LaterAnswer, MessageHandler, Registry, Verdict,
};

/// Longest wait for the order service to accept the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// Longest a whole lookup (connect, request, response) may take.
pub const LOOKUP_DEADLINE: Duration = Duration::from_millis(1500);
/// Lookups waiting for the worker thread of one shard.
const QUEUE: usize = 64;

/// Registers `order_status` (the name `[bot] handlers` uses) for an order service at `service`.
pub fn register(registry: &mut Registry, service: SocketAddr) -> Result<(), BotError> {
    registry.register("order_status", move |_bot, _risk| {
        let handler = OrderStatus::start(service).map_err(|err| BotError::Handler {
            name: "order_status".into(),
            message: format!("cannot start the lookup thread: {err}"),
        })?;
        Ok(Box::new(handler) as Box<dyn MessageHandler>)
    })
}

/// Which language to answer in: the visitor's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    En,
    Zh,
}

/// What a message asks, if it is about an order.
#[derive(Debug, PartialEq, Eq)]
pub enum Question {
    /// "Where is my order 12345?"
    Order { number: String, lang: Lang },
    /// About an order, but without its number.
    NoNumber { lang: Lang },
}

/// Recognises an order question: a mention of an order ("order", "订单") and, usually, a
/// number of 4 to 12 digits.
pub fn recognise(text: &str) -> Option<Question> {
    let lang = if text.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)) {
        Lang::Zh
    } else {
        Lang::En
    };
    let lower = text.to_lowercase();
    let mentions_order = lower.contains("订单")
        || lower
            .split(|c: char| !c.is_alphanumeric())
            .any(|word| word == "order" || word == "orders");
    if !mentions_order {
        return None;
    }
    let number = text
        .split(|c: char| !c.is_ascii_digit())
        .find(|run| (4..=12).contains(&run.len()));
    Some(match number {
        Some(number) => Question::Order {
            number: number.to_owned(),
            lang,
        },
        None => Question::NoNumber { lang },
    })
}

struct Lookup {
    number: String,
    lang: Lang,
    answer: LaterAnswer,
}

/// The handler: one per shard, with its lookup thread.
pub struct OrderStatus {
    lookups: SyncSender<Lookup>,
}

impl OrderStatus {
    fn start(service: SocketAddr) -> std::io::Result<OrderStatus> {
        let (lookups, queue) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("order-lookups".into())
            .spawn(move || lookup_loop(service, queue))?;
        Ok(OrderStatus { lookups })
    }
}

impl MessageHandler for OrderStatus {
    fn name(&self) -> &'static str {
        "order_status"
    }

    fn priority(&self) -> i32 {
        250 // after human_transfer (300), before intent (200): no model run for an order
    }

    fn handle(&mut self, ctx: &mut BotContext<'_>) -> Verdict {
        match recognise(&ctx.text) {
            None => Verdict::Continue,
            Some(Question::NoNumber { lang }) => reply(ask_number(lang), false),
            Some(Question::Order { number, lang }) => {
                let (answer, later) = later();
                match self.lookups.try_send(Lookup {
                    number,
                    lang,
                    answer,
                }) {
                    Ok(()) => Verdict::Later(later),
                    Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                        reply(unavailable(lang), true)
                    }
                }
            }
        }
    }
}

fn lookup_loop(service: SocketAddr, queue: Receiver<Lookup>) {
    while let Ok(Lookup {
        number,
        lang,
        answer,
    }) = queue.recv()
    {
        let verdict = match fetch(service, &number) {
            Ok(Some(order)) => reply(describe(&order, lang), false),
            Ok(None) => reply(unknown(&number, lang), false),
            Err(_) => reply(unavailable(lang), true),
        };
        answer.send(verdict);
    }
}

/// An order as the service describes it.
#[derive(Debug, PartialEq, Eq)]
pub struct Order {
    pub number: String,
    pub status: String,
    pub carrier: String,
    pub date: String,
}

/// `GET /orders/NUMBER` with a total deadline: `Ok(None)` for 404, an error when the service
/// is down, slow or answers something else.
pub fn fetch(service: SocketAddr, number: &str) -> std::io::Result<Option<Order>> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&service, CONNECT_TIMEOUT)?;
    let left = |started: Instant| {
        LOOKUP_DEADLINE
            .checked_sub(started.elapsed())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::TimedOut, "lookup deadline"))
    };
    stream.set_write_timeout(Some(left(started)?))?;
    write!(
        stream,
        "GET /orders/{number} HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        stream.set_read_timeout(Some(left(started)?))?;
        match stream.read(&mut chunk)? {
            0 => break,
            n => response.extend_from_slice(&chunk[..n]),
        }
        if response.len() > 64 * 1024 {
            return Err(std::io::Error::other("response too large"));
        }
    }
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP response"))?;
    match head.split_whitespace().nth(1) {
        Some("200") => {
            let value: serde_json::Value =
                serde_json::from_str(body).map_err(std::io::Error::other)?;
            let field = |key: &str| value[key].as_str().unwrap_or("").to_owned();
            Ok(Some(Order {
                number: field("order"),
                status: field("status"),
                carrier: field("carrier"),
                date: field("date"),
            }))
        }
        Some("404") => Ok(None),
        other => Err(std::io::Error::other(format!("HTTP status {other:?}"))),
    }
}

fn reply(text: String, failed: bool) -> Verdict {
    Verdict::Reply {
        text,
        intent: Some("order_status".into()),
        confidence: 1.0,
        // A lookup that could not be made counts as a failed turn, so repeated failures lead
        // to a human (`failed_turns_before_handoff`).
        failed,
        degraded: false,
    }
}

/// The answer for a known order.
pub fn describe(order: &Order, lang: Lang) -> String {
    let Order {
        number,
        status,
        carrier,
        date,
    } = order;
    match (lang, status.as_str()) {
        (Lang::En, "processing") => {
            format!("Order {number} is being prepared; it should ship by {date}.")
        }
        (Lang::En, "shipped") => {
            format!("Order {number} has shipped with {carrier} and should arrive on {date}.")
        }
        (Lang::En, "delivered") => format!("Order {number} was delivered on {date}."),
        (Lang::En, other) => format!("Order {number}: {other}."),
        (Lang::Zh, "processing") => format!("订单 {number} 正在备货，预计 {date} 前发货。"),
        (Lang::Zh, "shipped") => format!("订单 {number} 已由 {carrier} 发出，预计 {date} 送达。"),
        (Lang::Zh, "delivered") => format!("订单 {number} 已于 {date} 送达。"),
        (Lang::Zh, other) => format!("订单 {number}：{other}。"),
    }
}

/// The answer for a number the service does not know.
pub fn unknown(number: &str, lang: Lang) -> String {
    match lang {
        Lang::En => format!(
            "I could not find an order numbered {number}. Please check the number in your \
             confirmation email."
        ),
        Lang::Zh => format!("没有找到订单号为 {number} 的订单，请核对确认邮件中的订单号。"),
    }
}

/// The answer when the service cannot be asked (down, slow, or too many lookups at once).
pub fn unavailable(lang: Lang) -> String {
    match lang {
        Lang::En => "Sorry, I cannot look up orders right now. Please try again in a few \
                     minutes, or ask to talk to a human."
            .into(),
        Lang::Zh => "抱歉，订单查询暂时不可用。请稍后再试，或转人工客服。".into(),
    }
}

fn ask_number(lang: Lang) -> String {
    match lang {
        Lang::En => "What is your order number? For example: where is my order 12345".into(),
        Lang::Zh => "请告诉我您的订单号，例如：我的订单12345到哪了".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_order_questions_in_english_and_chinese() {
        let order = |number: &str, lang| {
            Some(Question::Order {
                number: number.into(),
                lang,
            })
        };
        assert_eq!(
            recognise("Where is my order 12345?"),
            order("12345", Lang::En)
        );
        assert_eq!(recognise("order #77777 status"), order("77777", Lang::En));
        assert_eq!(recognise("我的订单12345到哪了"), order("12345", Lang::Zh));
        assert_eq!(recognise("查一下订单 20240"), order("20240", Lang::Zh));
        assert_eq!(
            recognise("where is my order?"),
            Some(Question::NoNumber { lang: Lang::En })
        );
        assert_eq!(recognise("my card 12345 is blocked"), None);
        assert_eq!(recognise("how do I reorder 12345"), None);
    }
}
