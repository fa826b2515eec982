//! Byte encodings of the LMDB keys of a shard store.
//!
//! Invariants:
//! - Integers are big-endian, so LMDB's byte-wise key order is numeric order: a range scan
//!   over `(conversation, seq)` replays a conversation in seq order.
//! - Variable-length parts are bounded so every key stays under LMDB's 511-byte limit;
//!   the bounds are checked by the store before a key is built.

use super::records::ConversationId;

/// Longest client message id accepted (re-sends are recognised by it).
pub const MAX_CLIENT_ID_BYTES: usize = 128;
/// Longest site name accepted.
pub const MAX_SITE_BYTES: usize = 128;
/// Longest visitor id accepted.
pub const MAX_VISITOR_BYTES: usize = 128;

/// `messages` table key: conversation (8 bytes BE) then seq (8 bytes BE).
pub fn message_key(conversation: ConversationId, seq: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&conversation.0.to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// Splits a `messages` key back into `(conversation, seq)`.
pub fn decode_message_key(key: &[u8]) -> Option<(ConversationId, u64)> {
    let key: &[u8; 16] = key.try_into().ok()?;
    let conversation = u64::from_be_bytes(key[..8].try_into().ok()?);
    let seq = u64::from_be_bytes(key[8..].try_into().ok()?);
    Some((ConversationId(conversation), seq))
}

/// `conversations` and `open` table key.
pub fn conversation_key(conversation: ConversationId) -> [u8; 8] {
    conversation.0.to_be_bytes()
}

/// A key of bounded length built on the stack.
pub struct KeyBuf<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> KeyBuf<N> {
    fn new() -> Self {
        KeyBuf {
            bytes: [0; N],
            len: 0,
        }
    }

    fn push(&mut self, part: &[u8]) {
        self.bytes[self.len..self.len + part.len()].copy_from_slice(part);
        self.len += part.len();
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// `visitors` table key: site length (1 byte), site, visitor id. The length prefix keeps
/// `("ab", "c")` and `("a", "bc")` apart. The caller has checked both bounds.
pub fn visitor_key(
    site: &str,
    visitor: &str,
) -> KeyBuf<{ 1 + MAX_SITE_BYTES + MAX_VISITOR_BYTES }> {
    let mut key = KeyBuf::new();
    key.push(&[site.len() as u8]);
    key.push(site.as_bytes());
    key.push(visitor.as_bytes());
    key
}

/// Encodes a seq or conversation id stored as a value.
pub fn u64_value(value: u64) -> [u8; 8] {
    value.to_be_bytes()
}

/// Decodes a value written by [`u64_value`].
pub fn decode_u64_value(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_keys_sort_by_conversation_then_seq() {
        let a = ConversationId(1);
        let b = ConversationId(256);
        let mut keys = [
            message_key(b, 1),
            message_key(a, 300),
            message_key(a, 2),
            message_key(b, 0x1_0000_0000),
            message_key(a, 255),
        ];
        keys.sort();
        let decoded: Vec<_> = keys
            .iter()
            .map(|k| decode_message_key(k).unwrap())
            .collect();
        assert_eq!(
            decoded,
            vec![(a, 2), (a, 255), (a, 300), (b, 1), (b, 0x1_0000_0000)]
        );
        assert_eq!(decode_message_key(&[0u8; 15]), None);
    }

    #[test]
    fn visitor_keys_do_not_collide_across_the_site_boundary() {
        assert_ne!(
            visitor_key("ab", "c").as_bytes(),
            visitor_key("a", "bc").as_bytes()
        );
        let longest = visitor_key(&"s".repeat(MAX_SITE_BYTES), &"v".repeat(MAX_VISITOR_BYTES));
        assert_eq!(
            longest.as_bytes().len(),
            1 + MAX_SITE_BYTES + MAX_VISITOR_BYTES
        );
        assert!(longest.as_bytes().len() <= 511);
    }
}
