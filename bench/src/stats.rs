//! Latency statistics: HDR histograms in microseconds (1 µs to 10 min, 3 significant digits), their
//! summary percentiles, and their serialised form for reports (a dense percentile table for replotting and
//! the full histogram as base64 of the HdrHistogram V2 encoding, which any HdrHistogram tool can decode).
//! Invariant: values above the histogram's range are clamped to its top, never dropped, so that every
//! sample is counted.

use std::time::Duration;

use base64::Engine;
#[cfg(test)]
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::serialization::{Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest recordable latency, in microseconds (10 minutes).
const MAX_US: u64 = 600_000_000;

/// A latency histogram in microseconds.
#[derive(Debug, Clone)]
pub struct Latency {
    hist: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency::new()
    }
}

impl Latency {
    pub fn new() -> Latency {
        Latency {
            hist: Histogram::new_with_bounds(1, MAX_US, 3).expect("static histogram bounds"),
        }
    }

    pub fn record(&mut self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, MAX_US);
        self.hist.record(us).expect("value clamped into range");
    }

    pub fn merge(&mut self, other: &Latency) {
        self.hist.add(&other.hist).expect("same bounds");
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// Latency at quantile `q` (0..=1), in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        self.hist.max() as f64 / 1000.0
    }

    pub fn mean_ms(&self) -> f64 {
        self.hist.mean() / 1000.0
    }

    pub fn summary(&self) -> Summary {
        if self.count() == 0 {
            return Summary::default();
        }
        Summary {
            count: self.count(),
            p50_ms: self.quantile_ms(0.50),
            p90_ms: self.quantile_ms(0.90),
            p99_ms: self.quantile_ms(0.99),
            p999_ms: self.quantile_ms(0.999),
            max_ms: self.max_ms(),
            mean_ms: self.mean_ms(),
        }
    }

    /// The serialised form carried in JSON reports.
    pub fn to_json(&self) -> HistogramJson {
        let mut percentiles = Vec::new();
        if self.count() > 0 {
            for v in self.hist.iter_quantiles(5) {
                percentiles.push([
                    v.quantile_iterated_to() * 100.0,
                    v.value_iterated_to() as f64 / 1000.0,
                ]);
                if v.quantile_iterated_to() >= 1.0 {
                    break;
                }
            }
        }
        let mut bytes = Vec::new();
        V2Serializer::new()
            .serialize(&self.hist, &mut bytes)
            .expect("serialise into memory");
        HistogramJson {
            unit: "ms".into(),
            summary: self.summary(),
            percentiles,
            hdr_v2_base64: base64::engine::general_purpose::STANDARD.encode(bytes),
        }
    }

    /// Rebuilds a histogram from its JSON form.
    #[cfg(test)]
    pub fn from_json(j: &HistogramJson) -> Result<Latency, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&j.hdr_v2_base64)
            .map_err(|e| format!("histogram base64: {e}"))?;
        let hist: Histogram<u64> = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| format!("histogram: {e:?}"))?;
        Ok(Latency { hist })
    }
}

/// The usual percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// A histogram as written to JSON: `percentiles` holds `[percentile, latency_ms]` pairs dense enough to
/// replot (5 steps per halving of the distance to 100%), `hdr_v2_base64` the exact histogram.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistogramJson {
    pub unit: String,
    pub summary: Summary,
    pub percentiles: Vec<[f64; 2]>,
    pub hdr_v2_base64: String,
}

/// Which sequence numbers of one stream arrived: counts first arrivals, duplicates and ids that were never
/// sent. Memory is one bit per message sent.
#[derive(Debug, Default, Clone)]
pub struct Arrivals {
    bits: Vec<u64>,
    pub unique: u64,
    pub duplicates: u64,
}

/// What one arrival was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    First,
    Duplicate,
}

impl Arrivals {
    pub fn record(&mut self, seq: u64) -> Arrival {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & (1 << bit) != 0 {
            self.duplicates += 1;
            Arrival::Duplicate
        } else {
            self.bits[word] |= 1 << bit;
            self.unique += 1;
            Arrival::First
        }
    }

    pub fn contains(&self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        self.bits.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut l = Latency::new();
        for ms in 1..=1000u64 {
            l.record(Duration::from_millis(ms));
        }
        let s = l.summary();
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 500.0).abs() < 1.0, "{s:?}");
        assert!((s.p99_ms - 990.0).abs() < 1.0, "{s:?}");
        assert!((s.max_ms - 1000.0).abs() < 1.0, "{s:?}");
    }

    #[test]
    fn out_of_range_values_are_clamped_not_lost() {
        let mut l = Latency::new();
        l.record(Duration::from_secs(3600));
        l.record(Duration::ZERO);
        assert_eq!(l.count(), 2);
    }

    #[test]
    fn json_round_trip_keeps_the_histogram() {
        let mut l = Latency::new();
        for us in [120u64, 450, 9_000, 20_000, 20_500] {
            l.record(Duration::from_micros(us));
        }
        let j = l.to_json();
        let back = Latency::from_json(&j).unwrap();
        assert_eq!(back.summary(), l.summary());
        assert!(j.percentiles.last().unwrap()[0] >= 100.0 - 1e-9);
    }

    #[test]
    fn arrivals_count_duplicates() {
        let mut a = Arrivals::default();
        assert_eq!(a.record(3), Arrival::First);
        assert_eq!(a.record(130), Arrival::First);
        assert_eq!(a.record(3), Arrival::Duplicate);
        assert_eq!((a.unique, a.duplicates), (2, 1));
        assert!(a.contains(130) && !a.contains(4));
    }
}
