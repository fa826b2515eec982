//! Masking of payment-card numbers in free text, so card data never reaches storage or agents.
//!
//! A card number is 13 to 19 ASCII digits, optionally split into groups by single spaces or
//! dashes ("4111 1111 1111 1111", "4111-1111-1111-1111"), that passes the Luhn check. Inside a
//! longer separated run of digit groups (a card number followed by its security code, say) the
//! longest Luhn-valid span of whole groups is masked; a single unseparated run of more than 19
//! digits is some other identifier and is left alone.
//!
//! Masking replaces every digit but the last four with `*` and keeps the separators, so
//! "4111 1111 1111 1111" becomes "**** **** **** 1111". Texts without a candidate are not
//! copied; nothing is allocated for texts with fewer than 13 digits in a row.

use std::ops::Range;

const MIN_DIGITS: usize = 13;
const MAX_DIGITS: usize = 19;
const VISIBLE_DIGITS: usize = 4;

/// Masks the card numbers in `text`; returns how many it masked.
pub fn mask_card_numbers(text: &mut String) -> usize {
    let cards = find_card_numbers(text);
    if cards.is_empty() {
        return 0;
    }
    let mut masked = String::with_capacity(text.len());
    let mut copied = 0;
    for card in &cards {
        masked.push_str(&text[copied..card.start]);
        let span = &text[card.clone()];
        let digits = span.bytes().filter(u8::is_ascii_digit).count();
        let mut seen = 0;
        for c in span.chars() {
            if c.is_ascii_digit() {
                seen += 1;
                masked.push(if seen <= digits - VISIBLE_DIGITS {
                    '*'
                } else {
                    c
                });
            } else {
                masked.push(c);
            }
        }
        copied = card.end;
    }
    masked.push_str(&text[copied..]);
    *text = masked;
    cards.len()
}

/// Byte ranges of the card numbers in `text`, in order, not overlapping.
pub fn find_card_numbers(text: &str) -> Vec<Range<usize>> {
    let bytes = text.as_bytes();
    let mut cards = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        // A run: digit groups joined by single separators.
        let start = i;
        let mut digits = 0;
        loop {
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
                digits += 1;
            }
            if i + 1 < bytes.len() && is_separator(bytes[i]) && bytes[i + 1].is_ascii_digit() {
                i += 1;
            } else {
                break;
            }
        }
        if digits >= MIN_DIGITS {
            cards_in_run(text, start..i, &mut cards);
        }
    }
    cards
}

fn is_separator(byte: u8) -> bool {
    byte == b' ' || byte == b'-'
}

/// Adds the card numbers among the digit groups of `run` to `cards`: from each group on, the
/// longest span of whole groups with 13..=19 digits that passes Luhn.
fn cards_in_run(text: &str, run: Range<usize>, cards: &mut Vec<Range<usize>>) {
    let groups: Vec<Range<usize>> = text[run.clone()]
        .split([' ', '-'])
        .scan(run.start, |offset, group| {
            let range = *offset..*offset + group.len();
            *offset += group.len() + 1;
            Some(range)
        })
        .collect();
    let mut first = 0;
    while first < groups.len() {
        let mut digits = 0;
        let mut best = None;
        for (last, group) in groups.iter().enumerate().skip(first) {
            digits += group.len();
            if digits > MAX_DIGITS {
                break;
            }
            let span = groups[first].start..group.end;
            if digits >= MIN_DIGITS && luhn_valid(&text[span.clone()]) {
                best = Some((last, span));
            }
        }
        match best {
            Some((last, span)) => {
                cards.push(span);
                first = last + 1;
            }
            None => first += 1,
        }
    }
}

/// The Luhn (mod 10) check over the ASCII digits of `text`, ignoring anything else.
pub fn luhn_valid(text: &str) -> bool {
    let mut sum = 0u32;
    let mut count = 0usize;
    for digit in text.bytes().rev().filter(u8::is_ascii_digit) {
        let mut d = u32::from(digit - b'0');
        if count % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
        count += 1;
    }
    count > 0 && sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(text: &str) -> (String, usize) {
        let mut text = text.to_string();
        let n = mask_card_numbers(&mut text);
        (text, n)
    }

    #[test]
    fn luhn_known_numbers() {
        assert!(luhn_valid("4111111111111111"));
        assert!(luhn_valid("5555555555554444"));
        assert!(luhn_valid("378282246310005")); // Amex, 15 digits
        assert!(luhn_valid("79927398713"));
        assert!(!luhn_valid("4111111111111112"));
        assert!(!luhn_valid("79927398710"));
        assert!(!luhn_valid(""));
    }

    #[test]
    fn masks_valid_numbers_with_and_without_separators() {
        assert_eq!(
            masked("card 4111111111111111 ok"),
            ("card ************1111 ok".to_string(), 1)
        );
        assert_eq!(
            masked("4111 1111 1111 1111"),
            ("**** **** **** 1111".to_string(), 1)
        );
        assert_eq!(
            masked("my card is 5555-5555-5555-4444."),
            ("my card is ****-****-****-4444.".to_string(), 1)
        );
        assert_eq!(
            masked("amex 3782 822463 10005"),
            ("amex **** ****** *0005".to_string(), 1)
        );
    }

    #[test]
    fn leaves_luhn_invalid_numbers_alone() {
        assert_eq!(
            masked("order 4111 1111 1111 1112"),
            ("order 4111 1111 1111 1112".to_string(), 0)
        );
    }

    #[test]
    fn length_limits() {
        // 12 digits, Luhn-valid: too short for a card.
        assert!(luhn_valid("123456789015"));
        assert_eq!(masked("123456789015").1, 0);
        // 13 digits, Luhn-valid: masked.
        assert!(luhn_valid("4222222222222"));
        assert_eq!(masked("4222222222222"), ("*********2222".to_string(), 1));
        // 20 digits in one unseparated run: some other identifier, even if Luhn-valid.
        assert!(luhn_valid("41111111111111111115"));
        assert_eq!(masked("41111111111111111115").1, 0);
    }

    #[test]
    fn separators_must_be_single_and_between_digits() {
        // Double space splits the run; neither half is long enough.
        assert_eq!(masked("4111 1111  1111 1111").1, 0);
        // A trailing separator is not part of the number.
        assert_eq!(
            masked("4111-1111-1111-1111- next"),
            ("****-****-****-1111- next".to_string(), 1)
        );
        // Other separators are not accepted.
        assert_eq!(masked("4111.1111.1111.1111").1, 0);
    }

    #[test]
    fn card_followed_by_security_code_is_still_masked() {
        // 4111 1111 1111 1111 123 (19 digits) fails Luhn; the 16-digit span passes.
        assert!(!luhn_valid("4111111111111111123"));
        assert_eq!(
            masked("4111 1111 1111 1111 123"),
            ("**** **** **** 1111 123".to_string(), 1)
        );
    }

    #[test]
    fn several_cards_and_non_ascii_text_around_them() {
        let (text, n) = masked("über 4111111111111111 — und 5555 5555 5555 4444 ✓");
        assert_eq!(n, 2);
        assert_eq!(text, "über ************1111 — und **** **** **** 4444 ✓");
    }

    #[test]
    fn text_without_cards_is_unchanged() {
        for text in ["", "hello", "call 555-123-4567", "2024-01-15", "ünïcödé 12"] {
            assert_eq!(masked(text), (text.to_string(), 0));
        }
    }
}
