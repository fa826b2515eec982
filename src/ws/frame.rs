//! RFC 6455 frame headers: parsing, validation of the rules that hold for every frame, encoding, masking.
//!
//! Wire layout (§5.2): byte 0 = FIN | RSV1 | RSV2 | RSV3 | opcode(4); byte 1 = MASK | len7; then a 16-bit
//! (len7 = 126) or 64-bit (len7 = 127) big-endian extended length, then the 4-byte masking key when MASK is
//! set. Headers are therefore 2 to [`MAX_HEADER_LEN`] bytes.
//!
//! Invariants enforced by [`parse_header`] (all violations are protocol errors, close code 1002), checked as
//! soon as the bytes carrying them are present so a bad frame is rejected before its header is complete:
//! - RSV1-3 are zero (switchboard negotiates no extension);
//! - the opcode is one of the six defined ones;
//! - control frames (close, ping, pong) have FIN set and a payload of at most 125 bytes;
//! - a 64-bit length has its most significant bit clear.
//!
//! Non-minimal length encodings are accepted. Role-dependent rules (masking direction, message sequencing,
//! size limits) belong to [`crate::ws::connection`].

/// Longest possible frame header: 2 + 8 (64-bit length) + 4 (masking key).
pub const MAX_HEADER_LEN: usize = 14;
/// Largest payload a control frame may carry.
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Frame opcodes defined by RFC 6455.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    /// Decodes the low 4 bits of the first header byte; `None` for reserved opcodes.
    pub fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    /// The 4-bit wire value.
    pub fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Close, ping and pong.
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: OpCode,
    /// Masking key, present iff the MASK bit was set.
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
}

/// A frame-level protocol violation. Every variant maps to close code 1002.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    #[error("fragmented control frame")]
    FragmentedControl,
    #[error("control frame payload longer than 125 bytes")]
    ControlTooLong,
    #[error("64-bit payload length with the most significant bit set")]
    LengthOverflow,
}

impl FrameError {
    /// Close code to fail the connection with (always 1002, protocol error).
    pub fn close_code(&self) -> u16 {
        1002
    }
}

/// Total header length implied by the second header byte (MASK bit and 7-bit length).
pub fn header_len(byte1: u8) -> usize {
    let ext = match byte1 & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if byte1 & 0x80 != 0 { 4 } else { 0 }
}

/// Parses the frame header at the start of `buf`. `Ok(None)`: more bytes needed (no violation seen in the
/// bytes present). `Ok(Some((header, header_len)))`: the payload starts at `buf[header_len]`.
pub fn parse_header(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, FrameError> {
    let Some(&b0) = buf.first() else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(FrameError::ReservedOpcode(b0 & 0x0F))?;
    let fin = b0 & 0x80 != 0;
    if opcode.is_control() && !fin {
        return Err(FrameError::FragmentedControl);
    }
    let Some(&b1) = buf.get(1) else {
        return Ok(None);
    };
    let len7 = b1 & 0x7F;
    if opcode.is_control() && usize::from(len7) > MAX_CONTROL_PAYLOAD {
        return Err(FrameError::ControlTooLong);
    }
    let hlen = header_len(b1);
    let (payload_len, mask_at) = match len7 {
        126 => {
            let Some(ext) = buf.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([ext[0], ext[1]])), 4)
        }
        127 => {
            let Some(ext) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut raw = [0u8; 8];
            raw.copy_from_slice(ext);
            let len = u64::from_be_bytes(raw);
            if len >> 63 != 0 {
                return Err(FrameError::LengthOverflow);
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    if buf.len() < hlen {
        return Ok(None);
    }
    let mask = if b1 & 0x80 != 0 {
        let mut key = [0u8; 4];
        key.copy_from_slice(&buf[mask_at..mask_at + 4]);
        Some(key)
    } else {
        None
    };
    Ok(Some((
        FrameHeader {
            fin,
            opcode,
            mask,
            payload_len,
        },
        hlen,
    )))
}

/// XORs `data` with the masking `key`, where `data` starts `offset` bytes into the frame payload (so a payload
/// can be unmasked piecewise as it arrives). Masking is an involution: the same call masks and unmasks.
///
/// Hot path: processes 32 bytes per iteration as four 64-bit words (the compiler turns this into SIMD on x86-64),
/// then 8-byte words, then single bytes.
pub fn apply_mask(data: &mut [u8], key: [u8; 4], offset: usize) {
    let rot = offset & 3;
    let k = [
        key[rot],
        key[(rot + 1) & 3],
        key[(rot + 2) & 3],
        key[(rot + 3) & 3],
    ];
    let word = u64::from_ne_bytes([k[0], k[1], k[2], k[3], k[0], k[1], k[2], k[3]]);
    let mut blocks = data.chunks_exact_mut(32);
    for block in &mut blocks {
        for lane in block.chunks_exact_mut(8) {
            let v = u64::from_ne_bytes(lane.try_into().expect("8-byte lane")) ^ word;
            lane.copy_from_slice(&v.to_ne_bytes());
        }
    }
    let rest = blocks.into_remainder();
    let mut words = rest.chunks_exact_mut(8);
    for lane in &mut words {
        let v = u64::from_ne_bytes((&*lane).try_into().expect("8-byte lane")) ^ word;
        lane.copy_from_slice(&v.to_ne_bytes());
    }
    // Each processed chunk was a multiple of 4 bytes long, so the key phase is unchanged here.
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b ^= k[i & 3];
    }
}

/// Appends a frame header. `mask` must be `Some` for client-to-server frames and `None` for server frames.
pub fn encode_header(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: OpCode,
    payload_len: usize,
    mask: Option<[u8; 4]>,
) {
    let b0 = if fin { 0x80 } else { 0 } | opcode.bits();
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if payload_len < 126 {
        out.extend_from_slice(&[b0, mask_bit | payload_len as u8]);
    } else if let Ok(len16) = u16::try_from(payload_len) {
        out.extend_from_slice(&[b0, mask_bit | 126]);
        out.extend_from_slice(&len16.to_be_bytes());
    } else {
        out.extend_from_slice(&[b0, mask_bit | 127]);
        out.extend_from_slice(&(payload_len as u64).to_be_bytes());
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
}

/// Appends a complete frame (header + payload, masked with `mask` if given).
pub fn encode_frame(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: OpCode,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) {
    out.reserve(MAX_HEADER_LEN + payload.len());
    encode_header(out, fin, opcode, payload.len(), mask);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_mask(data: &mut [u8], key: [u8; 4], offset: usize) {
        for (i, b) in data.iter_mut().enumerate() {
            *b ^= key[(offset + i) % 4];
        }
    }

    #[test]
    fn rfc6455_examples() {
        // §5.7: unmasked "Hello".
        let (h, n) = parse_header(b"\x81\x05\x48\x65\x6c\x6c\x6f")
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.mask, h.payload_len, n),
            (true, OpCode::Text, None, 5, 2)
        );
        // Masked "Hello".
        let mut frame = *b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58";
        let (h, n) = parse_header(&frame).unwrap().unwrap();
        assert_eq!(h.mask, Some([0x37, 0xfa, 0x21, 0x3d]));
        apply_mask(&mut frame[n..], h.mask.unwrap(), 0);
        assert_eq!(&frame[n..], b"Hello");
        // Fragmented unmasked text "Hel" + "lo".
        let (h, _) = parse_header(b"\x01\x03\x48\x65\x6c").unwrap().unwrap();
        assert_eq!((h.fin, h.opcode), (false, OpCode::Text));
        let (h, _) = parse_header(b"\x80\x02\x6c\x6f").unwrap().unwrap();
        assert_eq!((h.fin, h.opcode), (true, OpCode::Continuation));
        // Ping "Hello" and masked pong "Hello".
        let (h, _) = parse_header(b"\x89\x05Hello").unwrap().unwrap();
        assert_eq!(h.opcode, OpCode::Ping);
        let (h, n) = parse_header(b"\x8a\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58")
            .unwrap()
            .unwrap();
        assert_eq!((h.opcode, n), (OpCode::Pong, 6));
        // 256 bytes binary in one unmasked frame; 64 KiB binary.
        let (h, n) = parse_header(b"\x82\x7E\x01\x00").unwrap().unwrap();
        assert_eq!((h.payload_len, n), (256, 4));
        let (h, n) = parse_header(b"\x82\x7F\x00\x00\x00\x00\x00\x01\x00\x00")
            .unwrap()
            .unwrap();
        assert_eq!((h.payload_len, n), (65536, 10));
    }

    #[test]
    fn encode_matches_rfc_examples() {
        let mut out = Vec::new();
        encode_frame(&mut out, true, OpCode::Text, b"Hello", None);
        assert_eq!(out, b"\x81\x05\x48\x65\x6c\x6c\x6f");
        out.clear();
        encode_frame(
            &mut out,
            true,
            OpCode::Text,
            b"Hello",
            Some([0x37, 0xfa, 0x21, 0x3d]),
        );
        assert_eq!(out, b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58");
    }

    #[test]
    fn length_encodings_round_trip() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 70000] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let payload = vec![0xA5u8; len];
                let mut out = Vec::new();
                encode_frame(&mut out, true, OpCode::Binary, &payload, mask);
                let (h, n) = parse_header(&out).unwrap().unwrap();
                let expected_hlen = match len {
                    0..=125 => 2,
                    126..=65535 => 4,
                    _ => 10,
                } + if mask.is_some() { 4 } else { 0 };
                assert_eq!(n, expected_hlen);
                assert_eq!(header_len(out[1]), n);
                assert_eq!(h.payload_len, len as u64);
                assert_eq!(h.mask, mask);
                let mut body = out[n..].to_vec();
                if let Some(k) = mask {
                    apply_mask(&mut body, k, 0);
                }
                assert_eq!(body, payload);
                // Every strict prefix of the header is "need more".
                for end in 0..n {
                    assert_eq!(parse_header(&out[..end]), Ok(None));
                }
            }
        }
    }

    #[test]
    fn non_minimal_lengths_are_accepted() {
        let (h, n) = parse_header(b"\x82\x7E\x00\x05").unwrap().unwrap();
        assert_eq!((h.payload_len, n), (5, 4));
        let (h, n) = parse_header(b"\x82\x7F\x00\x00\x00\x00\x00\x00\x00\x05")
            .unwrap()
            .unwrap();
        assert_eq!((h.payload_len, n), (5, 10));
    }

    #[test]
    fn violations() {
        for b0 in [0xC1u8, 0xA1, 0x91, 0xF1] {
            assert_eq!(parse_header(&[b0]), Err(FrameError::ReservedBits));
        }
        for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            assert_eq!(
                parse_header(&[0x80 | op]),
                Err(FrameError::ReservedOpcode(op))
            );
        }
        for op in [0x8u8, 0x9, 0xA] {
            assert_eq!(parse_header(&[op]), Err(FrameError::FragmentedControl));
            assert_eq!(
                parse_header(&[0x80 | op, 126]),
                Err(FrameError::ControlTooLong)
            );
            assert_eq!(
                parse_header(&[0x80 | op, 0x80 | 127]),
                Err(FrameError::ControlTooLong)
            );
            assert!(parse_header(&[0x80 | op, 125]).unwrap().is_some());
        }
        assert_eq!(
            parse_header(b"\x82\x7F\x80\x00\x00\x00\x00\x00\x00\x00"),
            Err(FrameError::LengthOverflow)
        );
        assert_eq!(
            parse_header(b"\x82\x7F\x7F\xFF\xFF\xFF\xFF\xFF\xFF\xFF")
                .unwrap()
                .unwrap()
                .0
                .payload_len,
            u64::MAX >> 1
        );
        assert_eq!(FrameError::ReservedBits.close_code(), 1002);
    }

    #[test]
    fn mask_matches_naive_for_all_lengths_and_offsets() {
        let key = [0x12, 0x34, 0x56, 0x78];
        for len in 0..100 {
            for offset in 0..8 {
                let original: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
                let mut fast = original.clone();
                let mut slow = original.clone();
                apply_mask(&mut fast, key, offset);
                naive_mask(&mut slow, key, offset);
                assert_eq!(fast, slow, "len {len} offset {offset}");
            }
        }
    }

    #[test]
    fn piecewise_masking_equals_whole() {
        let key = [9, 8, 7, 6];
        let original: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let mut whole = original.clone();
        apply_mask(&mut whole, key, 0);
        let mut pieces = original.clone();
        let mut at = 0;
        for step in [1usize, 3, 7, 33, 64, 5, 200, 1000].iter().cycle() {
            if at >= pieces.len() {
                break;
            }
            let end = (at + step).min(pieces.len());
            apply_mask(&mut pieces[at..end], key, at);
            at = end;
        }
        assert_eq!(whole, pieces);
    }
}
