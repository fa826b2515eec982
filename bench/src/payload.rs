//! The probe text a visitor sends in the relay scenario: `p s<stream> n<seq> t<sched_us> a<ahead_us>
//! <padding>`. `stream` names the sending visitor (so a misrouted reply is caught), `seq` numbers its
//! messages from 0 (so loss and duplication are counted by id), `sched_us` is the scheduled send time in
//! microseconds since the run's epoch (so latency is taken from the schedule, not from when a late send
//! happened), and `ahead_us` how long before its schedule the message was picked up to be sent (the relay
//! pacer sends up to one tick early; the latency of such a message is taken from then).
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
    /// How many microseconds before `sched_us` the message was sent (0 if on time or late).
    pub ahead_us: u64,
}

impl Probe {
    /// Writes the probe into `out`, padded with `x` to at least `size` bytes.
    pub fn encode_into(&self, size: usize, out: &mut String) {
        use std::fmt::Write;
        out.clear();
        let _ = write!(
            out,
            "p s{} n{} t{} a{} ",
            self.stream, self.seq, self.sched_us, self.ahead_us
        );
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
        let mut it = text.strip_prefix("p ")?.splitn(5, ' ');
        let stream = it.next()?.strip_prefix('s')?.parse().ok()?;
        let seq = it.next()?.strip_prefix('n')?.parse().ok()?;
        let sched_us = it.next()?.strip_prefix('t')?.parse().ok()?;
        let ahead_us = it.next()?.strip_prefix('a')?.parse().ok()?;
        it.next()?;
        Some(Probe {
            stream,
            seq,
            sched_us,
            ahead_us,
        })
    }

    /// When the message was sent, or was due if it went out late: the start of its latency, in
    /// microseconds since the run's epoch.
    pub fn start_us(&self) -> u64 {
        self.sched_us.saturating_sub(self.ahead_us)
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
            ahead_us: 150,
        };
        let text = p.encode(256);
        assert_eq!(text.len(), 256);
        assert_eq!(Probe::decode(&text), Some(p));
    }

    #[test]
    fn an_early_message_starts_when_it_was_sent() {
        let early = Probe {
            stream: 1,
            seq: 2,
            sched_us: 1_000,
            ahead_us: 120,
        };
        assert_eq!(early.start_us(), 880);
        let on_time = Probe {
            ahead_us: 0,
            ..early
        };
        assert_eq!(on_time.start_us(), 1_000);
    }

    #[test]
    fn short_size_still_carries_the_header() {
        let p = Probe {
            stream: 1,
            seq: 2,
            sched_us: 3,
            ahead_us: 0,
        };
        assert_eq!(Probe::decode(&p.encode(0)), Some(p));
    }

    #[test]
    fn rejects_foreign_text() {
        assert_eq!(Probe::decode("hello"), None);
        assert_eq!(Probe::decode("p s1 ntwo t3 x"), None);
        assert_eq!(Probe::decode("p 1 2"), None);
        assert_eq!(Probe::decode("p 1 2 3 x"), None);
        assert_eq!(Probe::decode("p s1 n2 t3 x"), None, "no ahead_us");
        assert_eq!(Probe::decode("p s1 n2 t3 a x"), None, "an empty ahead_us");
    }

    #[test]
    fn no_digit_run_looks_like_a_card_number() {
        // `p 10 1002 5123456` is a Luhn-valid 13-digit run that risk control masks.
        let p = Probe {
            stream: 10,
            seq: 1002,
            sched_us: 5_123_456,
            ahead_us: 199,
        };
        let mut text = p.encode(64);
        assert_eq!(switchboard::bot::cards::mask_card_numbers(&mut text), 0);
        assert_eq!(Probe::decode(&text), Some(p));
    }
}
