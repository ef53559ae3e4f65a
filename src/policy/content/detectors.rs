//! The built-in PII and secret detectors: one regex set finds which may match (after a cheap
//! byte scan rules most text out), and each confirms with the checks that keep false positives
//! down (Luhn for cards, the IBAN checksum, SSN ranges).

use std::sync::LazyLock;

use aho_corasick::AhoCorasick;
use regex::{Regex, RegexSet};
use serde::Deserialize;

/// A built-in PII or secret detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Detector {
    Email,
    Phone,
    Ssn,
    CreditCard,
    Iban,
    AwsAccessKey,
    AwsSecretKey,
    PrivateKey,
    BearerToken,
}

impl Detector {
    /// Every detector, in declaration order (the order of `DETECTOR_PATTERNS`).
    pub const ALL: [Detector; 9] = [
        Detector::Email,
        Detector::Phone,
        Detector::Ssn,
        Detector::CreditCard,
        Detector::Iban,
        Detector::AwsAccessKey,
        Detector::AwsSecretKey,
        Detector::PrivateKey,
        Detector::BearerToken,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Detector::Email => "email",
            Detector::Phone => "phone",
            Detector::Ssn => "ssn",
            Detector::CreditCard => "credit_card",
            Detector::Iban => "iban",
            Detector::AwsAccessKey => "aws_access_key",
            Detector::AwsSecretKey => "aws_secret_key",
            Detector::PrivateKey => "private_key",
            Detector::BearerToken => "bearer_token",
        }
    }

    /// Whether `text` (normalised) holds a real instance, given that the detector set matched:
    /// checksums rule out look-alikes (a 16-digit order reference that fails Luhn is not a card).
    pub(super) fn is_confirmed_in(self, text: &str) -> bool {
        let re = &DETECTORS.each[self as usize];
        match self {
            // The patterns are greedy: a card number followed by an expiry date, or an IBAN
            // followed by a word, matches as one longer run that fails its checksum. So whole
            // digit groups within the run are tried as cards (never a cut inside a group, so a
            // plain long number gains no new chances), read on for up to 19 digits past the
            // match (`2024 4111 1111 1111 1111` matches only up to the cap from `2024`), and
            // an IBAN's prefixes that end between words are tried too.
            Detector::CreditCard => re.find_iter(text).any(|m| {
                is_luhn_valid(m.as_str()) || card_in_run(&text[m.start()..extend_digit_run(text, m.end(), 19)])
            }),
            Detector::Iban => re.find_iter(text).any(|m| prefixes(m.as_str()).any(is_iban_valid)),
            Detector::Ssn => re.find_iter(text).any(|m| is_ssn_plausible(m.as_str())),
            _ => true,
        }
    }
}

/// Detector patterns, written for normalised (lowercased) text, in `Detector` order. Word
/// boundaries are ASCII (`(?-u:\b)`) so the lazy DFA handles any input in one linear pass.
const DETECTOR_PATTERNS: [&str; 9] = [
    r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.(?:[^\W\d_]{2,}|xn--[a-z0-9-]+)",
    r"\+[1-9][0-9]{7,14}(?-u:\b)|\+[1-9][0-9]{0,2}[ .-]?\(?[0-9]{2,4}\)?(?:[ .-]?[0-9]{2,4}){2,3}(?-u:\b)|\(?(?-u:\b)[2-9][0-9]{2}\)?[ .-][0-9]{3}[ .-][0-9]{4}(?-u:\b)|(?-u:\b)0[1-9][0-9]{2,3} [0-9]{3} ?[0-9]{3,4}(?-u:\b)",
    r"(?-u:\b)[0-9]{3}[ .-][0-9]{2}[ .-][0-9]{4}(?-u:\b)",
    r"(?-u:\b)(?:[0-9][ .-]?){12,18}[0-9](?-u:\b)",
    r"(?-u:\b)[a-z]{2}[0-9]{2}(?: ?[a-z0-9]){11,30}(?-u:\b)",
    r"(?:akia|asia|abia|acca)[a-z0-9]{16}",
    r"secret[a-z_ ]{0,20}[\x22']?\s?[:=]\s?[\x22']?[a-z0-9/+]{40}(?:[^a-z0-9/+]|$)",
    r"-----begin [a-z ]*private key-----",
    r"(?-u:\b)eyj[a-z0-9_-]{5,}\.[a-z0-9_-]{5,}\.[a-z0-9_-]{5,}|(?-u:\b)bearer [a-z0-9._~+/=-]{16,}",
];

/// What every detector's match contains at least one of, besides an ASCII digit or `@` (email,
/// phone, SSN, card and IBAN all need one of those): the AWS key prefixes, `secret`, a PEM
/// header, a JWT's `eyJ` and `bearer `. Text with none of them cannot match any detector, and
/// most argument text (prose, queries, names) has none: it is cleared by a byte scan and a
/// SIMD literal search instead of the detector set's automaton, several times slower per byte.
/// A pattern added to `DETECTOR_PATTERNS` must need one of these, a digit or `@`: add its
/// pieces to the property test's `DETECTOR_TEXT_PIECES`, which compares this shortcut with
/// the set itself.
const DETECTOR_ANCHORS: [&str; 8] = ["akia", "asia", "abia", "acca", "secret", "-----begin", "eyj", "bearer "];

/// A search for whether any of a set of literals occurs. Leftmost-first, though only
/// `is_match` is ever asked: with aho-corasick's default (standard) semantics it cannot use
/// its SIMD (Teddy) prefilter and walks the automaton byte by byte — 14× slower on 270 bytes
/// of prose with eight literals (measured: 563 ns against 40). Text shorter than the shortest
/// literal is answered without starting a search: most object keys (`query`, `limit`) are.
#[derive(Debug)]
pub(super) struct Literals {
    search: AhoCorasick,
    shortest: usize,
}

impl Literals {
    pub(super) fn new<I: AsRef<[u8]>>(literals: &[I]) -> Result<Self, aho_corasick::BuildError> {
        let search = AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostFirst)
            .build(literals)?;
        let shortest = search.min_pattern_len();
        Ok(Literals { search, shortest })
    }

    pub(super) fn is_match(&self, text: &str) -> bool {
        text.len() >= self.shortest && self.search.is_match(text)
    }
}

/// All detectors as one set (one pass finds which may match) plus each alone (to confirm).
pub(super) struct DetectorSet {
    pub(super) set: RegexSet,
    each: Vec<Regex>,
    anchors: Literals,
    /// The fewest bytes any detector can match (an email, `a@b.cc`), from the patterns' syntax:
    /// shorter text (most object keys) needs no look at all.
    shortest: usize,
}

impl DetectorSet {
    /// Whether any detector matches somewhere in `n` (normalised text).
    pub(super) fn is_match(&self, n: &str) -> bool {
        if n.len() < self.shortest {
            return false;
        }
        // A fold, not `any`: without the early exit the compiler vectorises it.
        let digit_or_at = n.bytes().fold(false, |hit, b| hit | b.is_ascii_digit() | (b == b'@'));
        (digit_or_at || self.anchors.is_match(n)) && self.set.is_match(n)
    }
}

pub(super) static DETECTORS: LazyLock<DetectorSet> = LazyLock::new(|| DetectorSet {
    set: RegexSet::new(DETECTOR_PATTERNS).expect("built-in detector regexes compile"),
    each: DETECTOR_PATTERNS
        .iter()
        .map(|p| Regex::new(p).expect("built-in detector regexes compile"))
        .collect(),
    anchors: Literals::new(&DETECTOR_ANCHORS).expect("literal anchors compile"),
    shortest: DETECTOR_PATTERNS
        .iter()
        .filter_map(|p| {
            let hir = regex_syntax::parse(p).expect("built-in detector regexes parse");
            hir.properties().minimum_len()
        })
        .min()
        .unwrap_or(0),
});

/// `m` cut at each separator (a space, `-` or `.`), and whole: its prefixes that end between words.
fn prefixes(m: &str) -> impl Iterator<Item = &str> {
    m.match_indices([' ', '-', '.'])
        .map(|(i, _)| &m[..i])
        .chain(std::iter::once(m))
}

/// Whether some stretch of whole digit groups in `run` is a card: groups of at least four
/// digits (as every card network prints them), 13 to 19 digits in all, Luhn-valid. Bounded by
/// the group sizes, so a soup of single digits costs one pass.
fn card_in_run(run: &str) -> bool {
    let groups: Vec<(usize, usize)> = run
        .split([' ', '-', '.'])
        .scan(0, |at, g| {
            let start = *at;
            *at += g.len() + 1;
            Some((start, start + g.len()))
        })
        .collect();
    (0..groups.len()).any(|i| {
        let mut count = 0;
        for &(start, end) in &groups[i..] {
            if end - start < 4 {
                return false;
            }
            count += end - start;
            if count > 19 {
                return false;
            }
            if count >= 13 && is_luhn_valid(&run[groups[i].0..end]) {
                return true;
            }
        }
        false
    })
}

/// `end` moved on past groups of digits that continue the run (`[ -]?[0-9]`), by at most
/// `digits` digits: bounded, so a long run of digit groups costs linear time.
fn extend_digit_run(text: &str, mut end: usize, mut digits: usize) -> usize {
    let b = text.as_bytes();
    while digits > 0 {
        let step = match b.get(end..end + 2) {
            Some([b' ' | b'-' | b'.', d]) if d.is_ascii_digit() => 2,
            _ if b.get(end).is_some_and(u8::is_ascii_digit) => 1,
            _ => break,
        };
        end += step;
        digits -= 1;
    }
    end
}

fn is_luhn_valid(s: &str) -> bool {
    // No allocation: this runs for every piece of every digit run a match covers.
    let digits = || s.bytes().filter(u8::is_ascii_digit).map(|b| u32::from(b - b'0'));
    if !(13..=19).contains(&digits().count()) {
        return false;
    }
    let sum: u32 = digits()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            if i % 2 == 1 {
                if d * 2 > 9 { d * 2 - 9 } else { d * 2 }
            } else {
                d
            }
        })
        .sum();
    sum % 10 == 0
}

fn is_iban_valid(s: &str) -> bool {
    let compact: Vec<char> = s
        .chars()
        .filter(|c| !c.is_whitespace())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let rearranged = compact[4..].iter().chain(&compact[..4]);
    let mut rem: u32 = 0;
    for c in rearranged {
        let v = match c.to_digit(36) {
            Some(v) => v,
            None => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

fn is_ssn_plausible(s: &str) -> bool {
    let area = &s[0..3];
    let group = &s[4..6];
    let serial = &s[7..11];
    area != "000" && area != "666" && !area.starts_with('9') && group != "00" && serial != "0000"
}

#[cfg(test)]
mod tests {
    use super::super::filter;
    use super::super::normalize::normalize;
    use super::*;
    use serde_json::json;

    #[test]
    fn cards_need_a_valid_luhn_checksum() {
        let f = filter(json!({"detect": ["credit_card"], "action": "block"}));
        assert!(f.scan("card 4111 1111 1111 1111").is_some());
        assert!(f.scan("ref 4111111111111112").is_none());
        // Followed or preceded by other numbers: the run as a whole fails Luhn, the card in it
        // does not.
        for text in [
            "card 4111 1111 1111 1111 12/27",
            "4111111111111111 123",
            "ref 7 4111111111111111",
            "4111-1111-1111-1111-99",
            "2024 4111 1111 1111 1111",
        ] {
            assert!(f.scan(text).is_some(), "{text}");
        }
        // A long run of digits without separators gains no new chances: only the whole run.
        assert!(f.scan("order 1234567890123456789").is_none());
    }

    #[test]
    fn an_iban_followed_by_words_is_still_found() {
        let f = filter(json!({"detect": ["iban"], "action": "block"}));
        assert!(f.scan("send to GB82 WEST 1234 5698 7654 32 today").is_some());
        assert!(f.scan("GB82WEST12345698765432 please").is_some());
        assert!(f.scan("GB00 WEST 1234 5698 7654 32 today").is_none());
    }

    #[test]
    fn text_shorter_than_any_detector_can_match_is_not_searched_and_the_shortest_is_found() {
        assert_eq!(DETECTORS.shortest, "a@b.cc".len());
        let f = filter(json!({"detect": ["email"], "action": "block"}));
        assert!(f.scan("a@b.cc").is_some());
        assert!(f.scan("a@b.c").is_none());
    }

    #[test]
    fn detectors_see_the_forms_people_and_attackers_write() {
        let f =
            filter(json!({"detect": ["email", "phone", "ssn", "credit_card", "aws_access_key"], "action": "block"}));
        let found = |text: &str| f.scan(text).map(|finding| finding.kind());
        for (text, kind) in [
            // SSNs with spaces, dots, dashes of any kind and digits of other scripts.
            ("ssn 123 45 6789", "ssn"),
            ("ssn 123.45.6789", "ssn"),
            ("ssn 123\u{2013}45\u{2013}6789", "ssn"),
            ("ssn 123\u{2212}45\u{2010}6789", "ssn"),
            (
                "ssn \u{0661}\u{0662}\u{0663}-\u{0664}\u{0665}-\u{0666}\u{0667}\u{0668}\u{0669}",
                "ssn",
            ),
            ("ssn \u{FF11}\u{FF12}\u{FF13}-45-6789", "ssn"),
            // Cards and phones with dots and Unicode dashes.
            ("card 4111.1111.1111.1111", "credit_card"),
            ("card 4111\u{2013}1111\u{2013}1111\u{2013}1111", "credit_card"),
            ("card \u{0664}\u{0661}\u{0661}\u{0661} 1111 1111 1111", "credit_card"),
            ("call 415.555.0123", "phone"),
            ("call 415\u{2013}555\u{2013}0123", "phone"),
            ("call +44\u{2011}20\u{2011}7946\u{2011}0958", "phone"),
            // Emails with internationalised domains and local parts.
            ("mail ada@b\u{00FC}cher.de", "email"),
            (
                "mail \u{0430}\u{0434}\u{0430}@\u{043F}\u{0440}\u{0438}\u{043C}\u{0435}\u{0440}.\u{0440}\u{0444}",
                "email",
            ),
            ("mail ada@example.xn--p1ai", "email"),
            // AWS key ids glued to other text.
            ("keyAKIAIOSFODNN7EXAMPLE", "aws_access_key"),
            ("AKIAIOSFODNN7EXAMPLEsuffix", "aws_access_key"),
            ("x_AKIAIOSFODNN7EXAMPLE_y", "aws_access_key"),
        ] {
            assert_eq!(found(text), Some(kind), "{text:?}");
        }
        // The checks that keep false positives out still hold in every form.
        for text in [
            "ssn 000.12.3456",
            "ssn 666 12 3456",
            "ref 4111.1111.1111.1112",
            "version 1.2.3",
            "2024-12-07 12:00",
        ] {
            assert_eq!(found(text), None, "{text:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]

        /// The anchors' shortcut never hides a match: on text made of the detectors' own
        /// pieces (so the set often matches), it says "maybe" wherever the set matches.
        #[test]
        fn the_detector_shortcut_never_hides_a_match(
            pieces in proptest::collection::vec(proptest::sample::select(DETECTOR_TEXT_PIECES), 0..24)
        ) {
            let text = pieces.concat();
            let n = normalize(&text);
            proptest::prop_assert_eq!(DETECTORS.is_match(&n), DETECTORS.set.is_match(&n), "{:?}", n);
        }
    }

    /// Fragments of every detector's matches and near-misses, for the shortcut's property test.
    const DETECTOR_TEXT_PIECES: &[&str] = &[
        "a",
        "z",
        "x.",
        " ",
        "-",
        "_",
        "/",
        "+",
        "=",
        ":",
        "'",
        "\"",
        "(",
        ")",
        "@",
        "5",
        "0",
        "42",
        "ak",
        "ia",
        "akia",
        "asia",
        "abia",
        "acca",
        "secret",
        "secret_key",
        "-----",
        "begin",
        "-----begin",
        " private key-----",
        "rsa",
        "ey",
        "j",
        "eyj",
        "bearer",
        "bearer ",
        "abcdefgh",
        "abcdefghijklmnopqrst",
        "gb",
        "de89",
        "se",
        "cret",
        "ABCDEFGHIJKLMNOP",
        "ｅｙｊ",
        "Ａｋｉａ",
        // Whole matches with neither a digit nor `@`: only an anchor lets these through.
        "akiaabcdefghijklmnop",
        "secret = abcdefghijabcdefghijabcdefghijabcdefghij",
        "-----begin private key-----",
        "eyjabcdefgh.abcdefgh.abcdefgh",
        "bearer abcdefghijklmnopqrst",
    ];
}
