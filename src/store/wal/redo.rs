//! What a log record holds: the LMDB writes of one group commit, as a physical redo list of
//! puts (table, key, value) and deletes (table, key), in the order the transaction made them.
//!
//! Invariant: replaying a redo list is idempotent. Applying the writes of records `r..n` in
//! order to a store holding the state after any record `k` in `r - 1..=n` gives the state
//! after `n`: a key's final value is set by the last write to it, and a key no record
//! touches keeps the value it had. So recovery may replay records that already reached
//! LMDB (a message is found again under its conversation and seq, with the same bytes).

use thiserror::Error;

/// The tables a redo write may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedoTable {
    Messages = 1,
    Conversations = 2,
    Open = 3,
    Visitors = 4,
    Info = 5,
    VisitorSecrets = 6,
    Variants = 7,
}

impl RedoTable {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => RedoTable::Messages,
            2 => RedoTable::Conversations,
            3 => RedoTable::Open,
            4 => RedoTable::Visitors,
            5 => RedoTable::Info,
            6 => RedoTable::VisitorSecrets,
            7 => RedoTable::Variants,
            _ => return None,
        })
    }
}

/// One write of a redo list; `value: None` is a delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedoWrite<'a> {
    pub table: RedoTable,
    pub key: &'a [u8],
    pub value: Option<&'a [u8]>,
}

/// A redo list that does not parse: its record passed the checksum, so this is a bug or a
/// log written by another format.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("malformed redo list at byte {at}: {reason}")]
pub struct RedoError {
    pub at: usize,
    pub reason: &'static str,
}

const PUT: u8 = 1;
const DELETE: u8 = 2;

/// Appends a put to the redo list `out`.
pub fn put(out: &mut Vec<u8>, table: RedoTable, key: &[u8], value: &[u8]) {
    head(out, PUT, table, key);
    let length = u32::try_from(value.len()).expect("an LMDB value is smaller than 4 GiB");
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(value);
}

/// Appends a delete to the redo list `out`.
pub fn delete(out: &mut Vec<u8>, table: RedoTable, key: &[u8]) {
    head(out, DELETE, table, key);
}

fn head(out: &mut Vec<u8>, kind: u8, table: RedoTable, key: &[u8]) {
    let length = u16::try_from(key.len()).expect("an LMDB key is at most 511 bytes");
    out.push(kind);
    out.push(table as u8);
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(key);
}

/// The writes of a redo list, in order.
pub fn decode(mut bytes: &[u8]) -> Result<Vec<RedoWrite<'_>>, RedoError> {
    let total = bytes.len();
    let mut writes = Vec::new();
    while !bytes.is_empty() {
        let at = total - bytes.len();
        let error = |reason| RedoError { at, reason };
        let [kind, table, k0, k1, rest @ ..] = bytes else {
            return Err(error("truncated write header"));
        };
        let table = RedoTable::from_byte(*table).ok_or(error("unknown table"))?;
        let key_length = u16::from_le_bytes([*k0, *k1]) as usize;
        let key = rest.get(..key_length).ok_or(error("truncated key"))?;
        let rest = &rest[key_length..];
        let (value, rest) = match *kind {
            DELETE => (None, rest),
            PUT => {
                let length = rest.get(..4).ok_or(error("truncated value length"))?;
                let length = u32::from_le_bytes(length.try_into().expect("4 bytes")) as usize;
                let value = rest.get(4..4 + length).ok_or(error("truncated value"))?;
                (Some(value), &rest[4 + length..])
            }
            _ => return Err(error("unknown write kind")),
        };
        writes.push(RedoWrite { table, key, value });
        bytes = rest;
    }
    Ok(writes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_round_trip_in_order() {
        let mut list = Vec::new();
        put(&mut list, RedoTable::Messages, b"key-1", b"value one");
        delete(&mut list, RedoTable::Open, b"key-2");
        put(&mut list, RedoTable::Info, b"", b"");
        let writes = decode(&list).unwrap();
        assert_eq!(
            writes,
            vec![
                RedoWrite {
                    table: RedoTable::Messages,
                    key: b"key-1",
                    value: Some(b"value one"),
                },
                RedoWrite {
                    table: RedoTable::Open,
                    key: b"key-2",
                    value: None,
                },
                RedoWrite {
                    table: RedoTable::Info,
                    key: b"",
                    value: Some(b""),
                },
            ]
        );
    }

    #[test]
    fn a_truncated_list_is_an_error_not_a_shorter_list() {
        let mut list = Vec::new();
        put(&mut list, RedoTable::Messages, b"key", b"value");
        for cut in 1..list.len() {
            assert!(decode(&list[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(
            decode(&[9, 1, 0, 0]).unwrap_err().reason,
            "unknown write kind"
        );
        assert_eq!(decode(&[1, 77, 0, 0]).unwrap_err().reason, "unknown table");
    }
}
