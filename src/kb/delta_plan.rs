//! The two-round delta: what makes a large snapshot with scattered small edits cost little on
//! the wire. One rsync round has to pick one block size: blocks small enough that each edit
//! spoils little make a signature too large to send, and blocks of about `sqrt(len)` (what
//! `kb::delta` uses) make every edit cost a whole block of literal bytes. So:
//!
//! 1. **Coarse round.** The replica sends the coarse signature of its base (`kb::signature`).
//!    The primary answers a [`Plan`] instead of a delta: for every stretch of its file, either
//!    "copy these base bytes" or "fetch this many bytes" ([`Plan::build`]). The plan has no data.
//! 2. **Fine round.** The replica gathers the base blocks no copy reads ([`Plan::unused_base`]:
//!    that is where the old versions of the edited stretches are) and sends a fine signature
//!    of just those bytes ([`fine_signature`], small blocks, a short strong hash), with the
//!    regions of the primary's file it still needs ([`Plan::fetch_regions`]). The primary
//!    answers the delta of those regions against the fine signature ([`regions_delta`]).
//! 3. The replica rebuilds the regions from its unused blocks, then the file from the plan
//!    ([`rebuild_planned`]), and checks the whole file's length and BLAKE3 hash.
//!
//! The primary keeps no state between the rounds: the fine request names the hash of the
//! file it was planned against, and a primary whose file changed meanwhile refuses it.
//!
//! Invariants:
//! - Bytes come out of [`rebuild_planned`] only when they are exactly the announced length and
//!   hash: a damaged plan, regions delta or a block collision is an error, never a wrong file.
//! - Everything a peer sends is bounded before it is used: plan steps must stay inside the
//!   base and add up to the announced length; regions must be sorted, disjoint and inside the
//!   file; signatures have bounded block and hash sizes (`kb::delta`'s checks).

use fast_rsync::{Signature, SignatureOptions};

use super::delta::{check_signature_within, rebuild_exact, DeltaError};

/// Smallest block of a fine signature.
pub const MIN_FINE_BLOCK: u32 = 128;
/// A fine signature aims at no more than this many blocks (half a MiB of signature at eight bytes
/// a block), so the block grows with the unused bytes.
const FINE_BLOCKS_BUDGET: usize = 64 * 1024;
/// Bytes of MD4 per fine block: a false match needs the 32-bit rolling checksum and these
/// 32 bits to collide, and the whole-file hash still catches it.
const FINE_STRONG_HASH_BYTES: u32 = 4;

/// One stretch of the primary's file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanStep {
    /// `len` bytes the replica copies from its base at `offset`.
    Copy { offset: u64, len: u64 },
    /// `len` bytes the replica does not have in whole blocks: fetched in the fine round.
    Fetch { len: u64 },
}

/// How the primary's file is made from the replica's base (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<PlanStep>,
}

const STEP_COPY: u8 = 0;
const STEP_FETCH: u8 = 1;

impl Plan {
    /// The coarse round on the primary: the plan that makes `target` from the signature's base.
    pub fn build(signature: &Signature, target: &[u8]) -> Result<Plan, DeltaError> {
        let delta = super::delta::delta(signature, target)?;
        let mut steps: Vec<PlanStep> = Vec::new();
        for command in DeltaCommands::new(&delta)? {
            let step = match command? {
                Command::Copy { offset, len } => PlanStep::Copy { offset, len },
                Command::Literal { len } => PlanStep::Fetch { len },
            };
            match (steps.last_mut(), step) {
                (Some(PlanStep::Fetch { len }), PlanStep::Fetch { len: more }) => *len += more,
                _ => steps.push(step),
            }
        }
        Ok(Plan { steps })
    }

    /// The compact form sent to the replica: per step a kind byte and LEB128 numbers.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.steps.len() * 8);
        for step in &self.steps {
            match *step {
                PlanStep::Copy { offset, len } => {
                    out.push(STEP_COPY);
                    put_varint(&mut out, offset);
                    put_varint(&mut out, len);
                }
                PlanStep::Fetch { len } => {
                    out.push(STEP_FETCH);
                    put_varint(&mut out, len);
                }
            }
        }
        out
    }

    /// Decodes a plan received for a base of `base_len` bytes and a file of `target_len`,
    /// refusing copies outside the base, empty steps and lengths that do not add up.
    pub fn decode(bytes: &[u8], base_len: u64, target_len: u64) -> Result<Plan, DeltaError> {
        let bad = |why: &str| DeltaError::Apply(format!("invalid plan: {why}"));
        let mut reader = Reader { bytes, at: 0 };
        let mut steps = Vec::new();
        let mut total: u64 = 0;
        while !reader.done() {
            let kind = reader.byte().ok_or_else(|| bad("truncated"))?;
            let step = match kind {
                STEP_COPY => {
                    let offset = reader.varint().ok_or_else(|| bad("truncated"))?;
                    let len = reader.varint().ok_or_else(|| bad("truncated"))?;
                    if offset.checked_add(len).is_none_or(|end| end > base_len) {
                        return Err(bad("a copy reads past the end of the base"));
                    }
                    PlanStep::Copy { offset, len }
                }
                STEP_FETCH => PlanStep::Fetch {
                    len: reader.varint().ok_or_else(|| bad("truncated"))?,
                },
                other => return Err(bad(&format!("unknown step kind {other}"))),
            };
            let len = match step {
                PlanStep::Copy { len, .. } | PlanStep::Fetch { len } => len,
            };
            if len == 0 {
                return Err(bad("an empty step"));
            }
            total = total
                .checked_add(len)
                .filter(|&total| total <= target_len)
                .ok_or_else(|| bad("the steps add up to more than the file"))?;
            steps.push(step);
        }
        if total != target_len {
            return Err(DeltaError::LengthMismatch {
                expected: target_len,
                found: total,
            });
        }
        Ok(Plan { steps })
    }

    /// The stretches of the primary's file to fetch, as `(offset, len)` in that file.
    pub fn fetch_regions(&self) -> Vec<(u64, u64)> {
        let mut regions = Vec::new();
        let mut at = 0;
        for step in &self.steps {
            match *step {
                PlanStep::Copy { len, .. } => at += len,
                PlanStep::Fetch { len } => {
                    regions.push((at, len));
                    at += len;
                }
            }
        }
        regions
    }

    /// The bytes of the fetched regions.
    pub fn fetched_bytes(&self) -> u64 {
        self.fetch_regions().iter().map(|&(_, len)| len).sum()
    }

    /// The base's blocks of `block` bytes (the coarse signature's) that no copy reads,
    /// concatenated in base order: where the fine round looks for the edited stretches.
    pub fn unused_base(&self, base: &[u8], block: u32) -> Vec<u8> {
        let block = block.max(1) as usize;
        let blocks = base.len().div_ceil(block);
        let mut used = vec![false; blocks];
        for step in &self.steps {
            if let PlanStep::Copy { offset, len } = *step {
                // Copies are whole base blocks (`fast_rsync` matches only those), so mark
                // the blocks a copy covers entirely.
                let first = (offset as usize).div_ceil(block);
                let end = (offset + len) as usize / block;
                for slot in used.iter_mut().take(end).skip(first) {
                    *slot = true;
                }
            }
        }
        let mut out = Vec::new();
        for (index, used) in used.iter().enumerate() {
            if !used {
                let start = index * block;
                out.extend_from_slice(&base[start..(start + block).min(base.len())]);
            }
        }
        out
    }
}

/// The fine signature of the replica's unused base bytes (see the module docs).
pub fn fine_signature(unused: &[u8]) -> Vec<u8> {
    Signature::calculate(
        unused,
        SignatureOptions {
            block_size: fine_block_size_for(unused.len()),
            crypto_hash_size: FINE_STRONG_HASH_BYTES,
        },
    )
    .into_serialized()
}

/// The fine block for `len` unused bytes: at most [`FINE_BLOCKS_BUDGET`] blocks.
pub fn fine_block_size_for(len: usize) -> u32 {
    let block = len.div_ceil(FINE_BLOCKS_BUDGET).div_ceil(64) * 64;
    (block as u32).clamp(MIN_FINE_BLOCK, super::MAX_BLOCK)
}

/// Parses a fine signature received from a replica (as `kb::check_signature`, with the
/// fine round's smaller blocks allowed).
pub fn check_fine_signature(bytes: Vec<u8>) -> Result<Signature, DeltaError> {
    check_signature_within(bytes, MIN_FINE_BLOCK)
}

/// Encodes fetch regions for the fine request: LEB128 gap from the previous region's end,
/// then length.
pub fn encode_regions(regions: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(regions.len() * 6);
    let mut end = 0;
    for &(offset, len) in regions {
        put_varint(&mut out, offset - end);
        put_varint(&mut out, len);
        end = offset + len;
    }
    out
}

/// Decodes fetch regions of a file of `file_len` bytes: sorted, disjoint, non-empty, inside.
pub fn decode_regions(bytes: &[u8], file_len: u64) -> Result<Vec<(u64, u64)>, DeltaError> {
    let bad = |why: &str| DeltaError::InvalidSignature(format!("invalid regions: {why}"));
    let mut reader = Reader { bytes, at: 0 };
    let mut regions = Vec::new();
    let mut end: u64 = 0;
    while !reader.done() {
        let gap = reader.varint().ok_or_else(|| bad("truncated"))?;
        let len = reader.varint().ok_or_else(|| bad("truncated"))?;
        let offset = end.checked_add(gap).ok_or_else(|| bad("overflow"))?;
        if len == 0 {
            return Err(bad("an empty region"));
        }
        end = offset
            .checked_add(len)
            .filter(|&end| end <= file_len)
            .ok_or_else(|| bad("a region ends past the file"))?;
        regions.push((offset, len));
    }
    Ok(regions)
}

/// The fine round on the primary: the delta that makes the concatenated `regions` of
/// `target` from the fine signature's base (the replica's unused blocks).
pub fn regions_delta(
    fine: &Signature,
    target: &[u8],
    regions: &[(u64, u64)],
) -> Result<Vec<u8>, DeltaError> {
    let total: u64 = regions.iter().map(|&(_, len)| len).sum();
    let mut wanted = Vec::with_capacity(total as usize);
    for &(offset, len) in regions {
        let range = offset as usize..(offset + len) as usize;
        let bytes = target
            .get(range)
            .ok_or_else(|| DeltaError::Diff("a region ends past the file".into()))?;
        wanted.extend_from_slice(bytes);
    }
    super::delta::delta(fine, &wanted)
}

/// The replica's last step: the regions from `unused` and `regions_delta`, then the file from
/// `base` and the plan; returned only if it is `expected_len` bytes with BLAKE3 `expected_hash`.
pub fn rebuild_planned(
    base: &[u8],
    plan: &Plan,
    unused: &[u8],
    regions_delta: &[u8],
    expected_len: u64,
    expected_hash: &str,
) -> Result<Vec<u8>, DeltaError> {
    let fetched = plan.fetched_bytes();
    let mut regions = Vec::with_capacity(fetched as usize);
    // A plan that fetches nothing needs no fine round (and then has no regions delta).
    if fetched > 0 || !regions_delta.is_empty() {
        fast_rsync::apply_limited(unused, regions_delta, &mut regions, fetched as usize)
            .map_err(|err| DeltaError::Apply(err.to_string()))?;
    }
    if regions.len() as u64 != fetched {
        return Err(DeltaError::Apply(format!(
            "the regions delta gives {} bytes, the plan fetches {fetched}",
            regions.len()
        )));
    }
    let mut out = Vec::with_capacity(expected_len as usize);
    let mut next = 0usize;
    for step in &plan.steps {
        match *step {
            PlanStep::Copy { offset, len } => {
                let range = offset as usize..(offset + len) as usize;
                let bytes = base
                    .get(range)
                    .ok_or_else(|| DeltaError::Apply("a copy reads past the base".into()))?;
                out.extend_from_slice(bytes);
            }
            PlanStep::Fetch { len } => {
                out.extend_from_slice(&regions[next..next + len as usize]);
                next += len as usize;
            }
        }
    }
    rebuild_exact(out, expected_len, expected_hash)
}

/// A command of a librsync delta (the format `fast_rsync::diff` writes).
enum Command {
    Copy { offset: u64, len: u64 },
    Literal { len: u64 },
}

/// Walks the commands of a librsync delta, skipping literal data.
struct DeltaCommands<'a> {
    reader: Reader<'a>,
    ended: bool,
}

const DELTA_MAGIC: u64 = 0x7273_0236;
const OP_END: u8 = 0;
const OP_LITERAL_64: u8 = 0x40;
const OP_LITERAL_N1: u8 = 0x41;
const OP_LITERAL_N8: u8 = 0x44;
const OP_COPY_N1_N1: u8 = 0x45;
const OP_COPY_N8_N8: u8 = 0x54;

impl<'a> DeltaCommands<'a> {
    fn new(delta: &'a [u8]) -> Result<DeltaCommands<'a>, DeltaError> {
        let mut reader = Reader {
            bytes: delta,
            at: 0,
        };
        match reader.be(4) {
            Some(DELTA_MAGIC) => Ok(DeltaCommands {
                reader,
                ended: false,
            }),
            _ => Err(DeltaError::Diff("not a librsync delta".into())),
        }
    }
}

impl Iterator for DeltaCommands<'_> {
    type Item = Result<Command, DeltaError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.ended {
            return None;
        }
        let truncated = || Some(Err(DeltaError::Diff("truncated delta".into())));
        let Some(op) = self.reader.byte() else {
            return truncated();
        };
        // Width in bytes of the size classes 0..=3.
        let width = |class: u8| 1usize << class;
        let command = match op {
            OP_END => {
                self.ended = true;
                return None;
            }
            1..=OP_LITERAL_64 => Command::Literal { len: op as u64 },
            OP_LITERAL_N1..=OP_LITERAL_N8 => match self.reader.be(width(op - OP_LITERAL_N1)) {
                Some(len) => Command::Literal { len },
                None => return truncated(),
            },
            OP_COPY_N1_N1..=OP_COPY_N8_N8 => {
                let class = op - OP_COPY_N1_N1;
                let offset = self.reader.be(width(class / 4));
                let len = self.reader.be(width(class % 4));
                match (offset, len) {
                    (Some(offset), Some(len)) => Command::Copy { offset, len },
                    _ => return truncated(),
                }
            }
            other => {
                return Some(Err(DeltaError::Diff(format!(
                    "unknown delta command {other:#04x}"
                ))))
            }
        };
        if let Command::Literal { len } = command {
            if !self.reader.skip(len) {
                return truncated();
            }
        }
        Some(Ok(command))
    }
}

/// A cursor over received bytes; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn byte(&mut self) -> Option<u8> {
        let byte = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(byte)
    }

    /// A big-endian number of `width` bytes (1 to 8).
    fn be(&mut self, width: usize) -> Option<u64> {
        let bytes = self.bytes.get(self.at..self.at.checked_add(width)?)?;
        self.at += width;
        Some(bytes.iter().fold(0, |n, &b| (n << 8) | b as u64))
    }

    fn skip(&mut self, len: u64) -> bool {
        match usize::try_from(len)
            .ok()
            .and_then(|len| self.at.checked_add(len))
        {
            Some(end) if end <= self.bytes.len() => {
                self.at = end;
                true
            }
            _ => false,
        }
    }

    /// An unsigned LEB128 number of at most ten bytes.
    fn varint(&mut self) -> Option<u64> {
        let mut value: u64 = 0;
        for shift in (0..70).step_by(7) {
            let byte = self.byte()?;
            let bits = (byte & 0x7f) as u64;
            if shift == 63 && bits > 1 {
                return None;
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests;
