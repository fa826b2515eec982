//! The probe text a visitor sends in the relay scenario: `p s<stream> n<seq> t<sched_us> <padding>`.
//! `stream` names the sending visitor (so a misrouted reply is caught), `seq` numbers its messages from 0
//! (so loss and duplication are counted by id), and `sched_us` is the scheduled send time in microseconds
//! since the run's epoch (so latency is taken from the schedule, not from when the send happened).
//! The text is plain ASCII: it needs no JSON escaping and survives any relay unchanged. Each number
//! carries a letter so that no run of digits can look like a payment-card number: switchboard's risk
//! control masks Luhn-valid runs of 13-19 digits split by spaces, which a bare `p 10 1002 5123456`
//! can be, and a masked probe would be counted as lost.

/// One decoded probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub stream: u64,
    pub seq: u64,
    pub sched_us: u64,
}

impl Probe {
    /// Writes the probe into `out`, padded with `x` to at least `size` bytes.
    pub fn encode_into(&self, size: usize, out: &mut String) {
        use std::fmt::Write;
        out.clear();
        let _ = write!(out, "p s{} n{} t{} ", self.stream, self.seq, self.sched_us);
        while out.len() < size {
            out.push('x');
        }
    }

    pub fn encode(&self, size: usize) -> String {
        let mut s = String::with_capacity(size.max(32));
        self.encode_into(size, &mut s);
        s
    }

    /// Parses a probe; `None` if the text is not one.
    pub fn decode(text: &str) -> Option<Probe> {
        let mut it = text.strip_prefix("p ")?.splitn(4, ' ');
        let stream = it.next()?.strip_prefix('s')?.parse().ok()?;
        let seq = it.next()?.strip_prefix('n')?.parse().ok()?;
        let sched_us = it.next()?.strip_prefix('t')?.parse().ok()?;
        it.next()?;
        Some(Probe {
            stream,
            seq,
            sched_us,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_padding() {
        let p = Probe {
            stream: 17,
            seq: 123_456,
            sched_us: 9_876_543,
        };
        let text = p.encode(256);
        assert_eq!(text.len(), 256);
        assert_eq!(Probe::decode(&text), Some(p));
    }

    #[test]
    fn short_size_still_carries_the_header() {
        let p = Probe {
            stream: 1,
            seq: 2,
            sched_us: 3,
        };
        assert_eq!(Probe::decode(&p.encode(0)), Some(p));
    }

    #[test]
    fn rejects_foreign_text() {
        assert_eq!(Probe::decode("hello"), None);
        assert_eq!(Probe::decode("p s1 ntwo t3 x"), None);
        assert_eq!(Probe::decode("p 1 2"), None);
        assert_eq!(Probe::decode("p 1 2 3 x"), None);
    }

    #[test]
    fn no_digit_run_looks_like_a_card_number() {
        // `p 10 1002 5123456` is a Luhn-valid 13-digit run that risk control masks.
        let p = Probe {
            stream: 10,
            seq: 1002,
            sched_us: 5_123_456,
        };
        let mut text = p.encode(64);
        assert_eq!(switchboard::bot::cards::mask_card_numbers(&mut text), 0);
        assert_eq!(Probe::decode(&text), Some(p));
    }
}
