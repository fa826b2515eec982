//! Gray release: which variant of the bot (`[[bot.variants]]`) answers a conversation.
//!
//! A [`VariantSplit`] maps a conversation id onto the configured weights through a fixed hash
//! ([`stable_point`], not the process's randomly seeded hasher), so every shard and every
//! process computes the same variant for the same id and weights. The hash is Fibonacci
//! hashing of the id's per-shard counter (a Weyl sequence, offset per shard by a SHA-256 of the
//! shard index): a shard's consecutive conversations spread evenly over `[0, 1)`, so any run of
//! conversations splits within a small fraction of a point of the weights. A random-looking
//! hash would not hold the bound: at 50/50 one percentage point is two standard
//! deviations of 10,000 independent draws, so about one weight set in twenty would miss it.
//! On 10,000 ids each share lies within one point of its weight
//! (`the_split_holds_within_one_point_at_10000_conversations`, which prints the figures).
//!
//! Stickiness is [`VariantSplit::resolve`]: the variant a conversation got is stored with it
//! (`store::Op::SetVariant`), and a stored name that is still configured wins over the hash, so
//! a weight change (a reload) only moves conversations that have no variant yet.
//!
//! Invariants:
//! - sans-IO and deterministic: the same id, names and weights give the same variant;
//! - a variant of weight 0 is never picked by the hash (it keeps the conversations it has);
//! - a split always has at least one variant and a positive total weight (the configuration
//!   refuses anything else; [`VariantSplit::new`] falls back to one variant otherwise).

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::config::{BotConfig, DEFAULT_VARIANT};
use crate::store::ConversationId;

/// 2^64 divided by the golden ratio: the step of Fibonacci hashing.
const GOLDEN_STEP: u64 = 0x9E37_79B9_7F4A_7C15;

/// Where a conversation id falls in `[0, 1)`: its per-shard counter times [`GOLDEN_STEP`]
/// plus its shard's offset (the first 8 bytes of SHA-256 over a fixed label and the shard
/// index), modulo 2^64, as a fraction of 2^64.
pub fn stable_point(conversation: ConversationId) -> f64 {
    let mut hasher = Sha256::new();
    hasher.update(b"switchboard gray release v1\0");
    hasher.update((conversation.shard() as u64).to_le_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let offset = u64::from_be_bytes(first);
    let point = conversation
        .local()
        .wrapping_mul(GOLDEN_STEP)
        .wrapping_add(offset);
    // 53 bits keep the fraction exact in an f64 and below 1.0.
    (point >> 11) as f64 / (1u64 << 53) as f64
}

/// The variants' names and weights, as the hash maps ids onto them.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantSplit {
    names: Vec<Arc<str>>,
    /// Running sums of the weights, divided by their total: `bounds[i]` ends variant `i`'s
    /// slice of `[0, 1)`; the last is 1.
    bounds: Vec<f64>,
}

/// The variant a conversation is served by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Index into [`VariantSplit::names`].
    pub index: usize,
    /// The conversation had no stored variant: store this one (and count it as assigned).
    pub record: bool,
}

impl VariantSplit {
    /// A split over `(name, weight)` pairs in order. Without a positive total weight (which the
    /// configuration never allows) every id goes to the first variant, or to
    /// [`DEFAULT_VARIANT`] when the list is empty.
    pub fn new<'n>(variants: impl IntoIterator<Item = (&'n str, f64)>) -> VariantSplit {
        let (names, weights): (Vec<Arc<str>>, Vec<f64>) = variants
            .into_iter()
            .map(|(name, weight)| (Arc::from(name), weight.max(0.0)))
            .unzip();
        let total: f64 = weights.iter().sum();
        if names.is_empty() || total <= 0.0 || !total.is_finite() {
            let name = names
                .first()
                .cloned()
                .unwrap_or_else(|| Arc::from(DEFAULT_VARIANT));
            return VariantSplit {
                names: vec![name],
                bounds: vec![1.0],
            };
        }
        let mut running = 0.0;
        let mut bounds: Vec<f64> = weights
            .iter()
            .map(|weight| {
                running += weight;
                running / total
            })
            .collect();
        // Rounding must not leave a gap just below 1 that no variant covers.
        if let Some(last) = bounds.last_mut() {
            *last = 1.0;
        }
        VariantSplit { names, bounds }
    }

    /// The split `[bot]` configures ([`BotConfig::effective_variants`]).
    pub fn from_config(bot: &BotConfig) -> VariantSplit {
        let variants = bot.effective_variants();
        VariantSplit::new(variants.iter().map(|v| (v.name.as_str(), v.weight)))
    }

    /// The variants' names, in configuration order.
    pub fn names(&self) -> &[Arc<str>] {
        &self.names
    }

    /// The index of the variant called `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| &**n == name)
    }

    /// The variant the hash picks for `conversation` under these weights.
    pub fn pick(&self, conversation: ConversationId) -> usize {
        let point = stable_point(conversation);
        // A weight-0 variant has an empty slice (its bound equals the previous one), so the
        // first bound above the point never names it.
        self.bounds
            .iter()
            .position(|&bound| point < bound)
            .unwrap_or(self.bounds.len() - 1)
    }

    /// The variant that serves `conversation`, given the name stored with it (if any): a
    /// stored name that is still configured; otherwise the hash's pick, to be stored when
    /// nothing was (a stored name that is no longer configured stays as it is, so the
    /// conversation goes back to it if the variant returns).
    pub fn resolve(&self, conversation: ConversationId, stored: Option<&str>) -> Assignment {
        match stored {
            Some(name) => match self.position(name) {
                Some(index) => Assignment {
                    index,
                    record: false,
                },
                None => Assignment {
                    index: self.pick(conversation),
                    record: false,
                },
            },
            None => Assignment {
                index: self.pick(conversation),
                record: true,
            },
        }
    }

    /// How the first `count` conversation ids of a store with `shards` shards (local counters
    /// 1.., taken round-robin over the shards) split between the variants, per variant.
    pub fn tally(&self, shards: usize, count: usize) -> Vec<usize> {
        let mut counts = vec![0; self.names.len()];
        let shards = shards.max(1);
        for n in 0..count {
            let id = ConversationId::from_parts(n % shards, 1 + (n / shards) as u64);
            counts[self.pick(id)] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(weights: &[(&str, f64)]) -> VariantSplit {
        VariantSplit::new(weights.iter().copied())
    }

    /// Each variant's share of 10,000 conversation ids (numbered as two shards number them)
    /// lies within one percentage point of its weight, for several weight sets. Run with
    /// `--nocapture` to print the figures.
    #[test]
    fn the_split_holds_within_one_point_at_10000_conversations() {
        let sets: &[&[(&str, f64)]] = &[
            &[("a", 50.0), ("b", 50.0)],
            &[("control", 90.0), ("treatment", 10.0)],
            &[("control", 99.0), ("canary", 1.0)],
            &[("a", 1.0), ("b", 1.0), ("c", 1.0)],
            &[("a", 70.0), ("b", 20.0), ("c", 10.0)],
            &[("a", 25.0), ("off", 0.0), ("b", 75.0)],
        ];
        for shards in [1, 2, 8] {
            for set in sets {
                let split = split(set);
                let counts = split.tally(shards, 10_000);
                let total: f64 = set.iter().map(|(_, w)| w).sum();
                let mut line = format!("shards {shards}:");
                for ((name, weight), count) in set.iter().zip(&counts) {
                    let expected = 100.0 * weight / total;
                    let got = 100.0 * *count as f64 / 10_000.0;
                    line.push_str(&format!(
                        "  {name} {expected:.2}% -> {got:.2}% ({:+.2})",
                        got - expected
                    ));
                    assert!(
                        (got - expected).abs() <= 1.0,
                        "{name}: weight {expected:.2}%, got {got:.2}% of 10,000 ({set:?}, {shards} shards)"
                    );
                }
                println!("{line}");
            }
        }
    }

    /// Not every conversation gets a bot turn (a visitor who asks for a human at once): a
    /// subset picked independently of the hash (here by SHA-256 of the id, about 70%) still
    /// splits within a point.
    #[test]
    fn a_subset_of_the_conversations_splits_within_one_point_too() {
        for set in [
            &[("a", 50.0), ("b", 50.0)][..],
            &[("a", 90.0), ("b", 10.0)][..],
        ] {
            let split = split(set);
            let mut counts = [0usize; 2];
            let mut kept = 0;
            for n in 0..14_000usize {
                let id = ConversationId::from_parts(n % 2, 1 + (n / 2) as u64);
                let digest = Sha256::digest(id.0.to_le_bytes());
                if digest[0] >= 77 {
                    counts[split.pick(id)] += 1;
                    kept += 1;
                }
            }
            let total: f64 = set.iter().map(|(_, w)| w).sum();
            for ((name, weight), count) in set.iter().zip(counts) {
                let got = 100.0 * count as f64 / kept as f64;
                let expected = 100.0 * weight / total;
                assert!((got - expected).abs() <= 1.0, "{name}: {got:.2}% of {kept}");
            }
        }
    }

    #[test]
    fn the_pick_is_stable_and_spread_over_the_whole_range() {
        let split = split(&[("a", 1.0), ("b", 1.0)]);
        for n in 1..200u64 {
            let id = ConversationId::from_parts(1, n);
            assert_eq!(split.pick(id), split.pick(id));
            let point = stable_point(id);
            assert!((0.0..1.0).contains(&point), "{point}");
        }
        // A fixed hash: the same id lands at the same point in every process and build.
        let point = stable_point(ConversationId::from_parts(0, 1));
        assert_eq!(point, stable_point(ConversationId(256)));
        assert!(
            (0.0..1.0).contains(&point) && point != stable_point(ConversationId(257)),
            "{point}"
        );
    }

    #[test]
    fn a_weight_of_zero_takes_no_new_conversation() {
        let split = split(&[("a", 0.0), ("b", 3.0), ("c", 0.0)]);
        assert_eq!(split.tally(2, 5_000), vec![0, 5_000, 0]);
    }

    #[test]
    fn a_stored_variant_wins_over_the_weights_while_it_is_configured() {
        let before = split(&[("a", 1.0), ("b", 1.0)]);
        let after = split(&[("a", 0.0), ("b", 1.0)]);
        let id = (1..)
            .map(|n| ConversationId::from_parts(0, n))
            .find(|id| before.pick(*id) == 0)
            .unwrap();
        let first = before.resolve(id, None);
        assert_eq!(
            first,
            Assignment {
                index: 0,
                record: true
            }
        );
        // The weights changed: the stored "a" still serves it, and nothing is stored again.
        let stored = &*before.names()[first.index];
        assert_eq!(
            after.resolve(id, Some(stored)),
            Assignment {
                index: 0,
                record: false
            }
        );
        // A new conversation gets the new weights.
        assert_eq!(
            after
                .resolve(ConversationId::from_parts(0, 999_999), None)
                .index,
            1
        );
        // A stored variant that is gone: the hash decides now, the record stays.
        let retired = split(&[("b", 1.0), ("c", 1.0)]);
        let assignment = retired.resolve(id, Some("a"));
        assert!(!assignment.record);
        assert_eq!(assignment.index, retired.pick(id));
    }

    #[test]
    fn no_variants_is_the_default_variant_of_bot() {
        let config = crate::config::Config::default();
        let split = VariantSplit::from_config(&config.bot);
        assert_eq!(split.names(), &[Arc::from(DEFAULT_VARIANT)]);
        assert_eq!(split.pick(ConversationId(12_345)), 0);
        assert_eq!(VariantSplit::new([("x", 0.0)]).pick(ConversationId(1)), 0);
    }
}
