//! WebSocket (RFC 6455) support, sans-IO: the opening handshake ([`handshake`]), frame headers and masking
//! ([`frame`]) and the message-level state machine ([`connection`]). No extension (permessage-deflate) and no
//! subprotocol is negotiated. The driver owns the socket and moves bytes in and out.

pub mod connection;
pub mod frame;
pub mod handshake;

pub use connection::{
    close_code, is_valid_close_code, Connection, Message, Role, Sender, State, WsLimits,
};
