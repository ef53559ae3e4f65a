//! Text as the filters read it: NFKC, lowercase, invisible characters dropped, Unicode tag
//! characters read as the ASCII they smuggle, dashes of every kind one `-`, digits of every
//! script ASCII digits, every run of whitespace one space. So full-width letters, ligatures,
//! zero-width joiners, non-breaking spaces, an en dash in an SSN or Arabic-Indic digits in a card
//! number cannot slip past a term, a pattern or a detector.

use std::borrow::Cow;

use unicode_normalization::UnicodeNormalization;

/// Characters that render as nothing and could split a term: format controls, joiners, variation
/// selectors, tags, the soft hyphen, musical formatting controls, and control characters other
/// than whitespace (C0, DEL, C1).
fn is_invisible(c: char) -> bool {
    (c.is_control() && !c.is_whitespace())
        || matches!(c,
        '\u{1D173}'..='\u{1D17A}' |
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}'
        | '\u{1BCA0}'..='\u{1BCA3}' | '\u{E0000}'..='\u{E0FFF}')
}

/// Whether `text` holds a character that renders as nothing (see [`is_invisible`]; tag
/// characters included).
pub fn has_invisible(text: &str) -> bool {
    !text.is_ascii() && text.chars().any(is_invisible)
}

/// A Unicode tag character (U+E0020 to U+E007E) as the ASCII character it mirrors; any other
/// invisible character as nothing. Tags render as nothing, so text can be smuggled in them:
/// it is read, not dropped.
fn untag(c: char) -> Option<char> {
    match u32::from(c) {
        t @ 0xE0020..=0xE007E => char::from_u32(t - 0xE0000),
        _ if is_invisible(c) => None,
        _ => Some(c),
    }
}

/// The first code point of each run of ten decimal digits (zero to nine) that NFKC leaves as
/// they are: Arabic-Indic, Devanagari, Bengali, Thai and the rest (Unicode 14, general category
/// `Nd`). Full-width and mathematical digits NFKC already makes ASCII.
const DIGIT_ZEROS: [u32; 58] = [
    0x0660, 0x06F0, 0x07C0, 0x0966, 0x09E6, 0x0A66, 0x0AE6, 0x0B66, 0x0BE6, 0x0C66, 0x0CE6, 0x0D66, 0x0DE6, 0x0E50,
    0x0ED0, 0x0F20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1A80, 0x1A90, 0x1B50, 0x1BB0, 0x1C40, 0x1C50,
    0xA620, 0xA8D0, 0xA900, 0xA9D0, 0xA9F0, 0xAA50, 0xABF0, 0x104A0, 0x10D30, 0x11066, 0x110F0, 0x11136, 0x111D0,
    0x112F0, 0x11450, 0x114D0, 0x11650, 0x116C0, 0x11730, 0x118E0, 0x11950, 0x11C50, 0x11D50, 0x11DA0, 0x16A60,
    0x16AC0, 0x16B50, 0x1E140, 0x1E2F0, 0x1E950,
];

/// A non-ASCII dash as `-`, a non-ASCII decimal digit as its ASCII digit; anything else as it is.
fn fold(c: char) -> char {
    match c {
        '\u{2010}'..='\u{2015}' | '\u{2212}' | '\u{2E3A}' | '\u{2E3B}' | '\u{FE31}' | '\u{FE32}' | '\u{FE58}' => '-',
        _ if c.is_ascii() => c,
        _ => {
            let cp = u32::from(c);
            let i = DIGIT_ZEROS.partition_point(|&zero| zero <= cp);
            match i.checked_sub(1).map(|i| cp - DIGIT_ZEROS[i]) {
                Some(d @ 0..=9) => char::from(b'0' + d as u8),
                _ => c,
            }
        }
    }
}

/// NFKC, tags read as ASCII, invisible characters removed, dashes and digits folded to ASCII,
/// lowercase, whitespace runs collapsed to one space.
pub fn normalize(s: &str) -> Cow<'_, str> {
    if s.is_ascii() {
        return normalize_ascii(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut in_space = false;
    // Invisible characters go before NFKC too, so they cannot keep a ligature apart.
    for c in s.chars().filter_map(untag).nfkc().map(fold) {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else if !is_invisible(c) {
            in_space = false;
            out.extend(c.to_lowercase());
        }
    }
    Cow::Owned(out)
}

/// The ASCII case (most traffic): already NFKC, no invisible characters; lowercase and collapse
/// whitespace byte by byte, borrowing when nothing changes.
fn normalize_ascii(s: &str) -> Cow<'_, str> {
    let b = s.as_bytes();
    // A fold, not `any`: without the early exit the compiler vectorises it (~6x fewer
    // instructions on a typical argument string).
    let plain = b
        .iter()
        .fold(true, |ok, &c| ok & !c.is_ascii_uppercase() & (c >= 0x20) & (c != 0x7f));
    // Two spaces in a row, the same way (a substring search costs more than this on the short
    // strings most arguments and answers hold).
    let double_space = b
        .iter()
        .zip(b.iter().skip(1))
        .fold(false, |found, (&x, &y)| found | ((x == b' ') & (y == b' ')));
    if plain && !double_space {
        return Cow::Borrowed(s);
    }
    let mut out = Vec::with_capacity(b.len());
    let mut in_space = false;
    for &c in b {
        // `char::is_whitespace` for ASCII: \t \n \x0b \x0c \r and space.
        if matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r') {
            if !in_space {
                out.push(b' ');
            }
            in_space = true;
        } else if c < 0x20 || c == 0x7f {
            // Other control characters render as nothing: dropped, like invisible ones.
        } else {
            in_space = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    Cow::Owned(String::from_utf8(out).expect("ASCII in, ASCII out"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn tags_are_read_dashes_and_digits_are_folded() {
        let tagged: String = "project falcon"
            .chars()
            .map(|c| char::from_u32(0xE0000 + u32::from(c)).unwrap())
            .collect();
        assert_eq!(normalize(&format!("\u{E0001}{tagged}\u{E007F}")), "project falcon");
        assert_eq!(normalize("123\u{2013}45\u{2014}6789 \u{2212}5"), "123-45-6789 -5");
        assert_eq!(
            normalize("\u{0661}\u{0662}\u{0663} \u{0967}\u{0968} \u{0E59}"),
            "123 12 9"
        );
        // Letters of those scripts are not digits.
        assert_eq!(normalize("\u{0915}"), "\u{0915}");
    }

    use super::super::{Finding, filter};
    use super::*;
    use serde_json::json;

    #[test]
    fn ascii_and_unicode_paths_normalise_alike() {
        for (input, want) in [
            ("A  B\tC\x0bD", "a b c d"),
            ("plain text", "plain text"),
            ("É  X", "é x"),
        ] {
            assert_eq!(normalize(input), want, "{input:?}");
        }
    }

    #[test]
    fn ligatures_are_folded_by_nfkc() {
        let f = filter(json!({"deny_terms": ["office"], "action": "block"}));
        assert_eq!(f.scan("the o\u{FB03}ce"), Some(Finding::Term));
    }
}
