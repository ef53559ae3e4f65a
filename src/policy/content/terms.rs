//! Deny terms, matched word by word: a term's words in order, with whatever separates them in
//! the text between them — spaces of any kind, punctuation, dashes, invisible characters (already
//! dropped by the normaliser), or nothing at all. So `project falcon` is found in
//! `project-falcon`, `project_falcon`, `project.falcon`, `project\u{200B}falcon` and
//! `projectfalcon`; within a word nothing may intervene, so `projection of falconry` and
//! `the rapist` (for a term `therapist`) are not matches.
//!
//! Look-alike letters from other scripts are read as the letters they imitate: every character
//! outside ASCII goes through its Unicode confusables skeleton (UTS #39), diacritics dropped, so
//! a Cyrillic `о` in `prоject` is an `o`. ASCII text is matched as it is (no copy), and the terms
//! are folded the same way when the policy is loaded.
//!
//! One regex for all of a filter's terms: linear in the text, whatever it holds; its prefix
//! literals (each term's first word) are found with a SIMD search, so clean text costs about
//! what a plain substring search does.

use std::borrow::Cow;

use regex::Regex;
use unicode_normalization::char::is_combining_mark;

/// What may stand between two words of a term: anything but a letter, a digit or a mark (`_`
/// too, which `\w` counts as a word character).
const BETWEEN_WORDS: &str = r"(?:[^\w]|_)*";

/// A filter's deny terms, compiled.
#[derive(Debug)]
pub(super) struct Terms {
    /// Each term's first word: text holding none of them holds no term, and nearly all text
    /// holds none. Aho-Corasick's SIMD search says so for a fraction of what starting the
    /// regex costs.
    first_words: super::detectors::Literals,
    any: Regex,
}

impl Terms {
    /// `terms`, already normalised. `Err` names a term that has no letter or digit to match.
    pub(super) fn compile(terms: &[String]) -> Result<Terms, (usize, String)> {
        let mut alternatives = Vec::with_capacity(terms.len());
        let mut first_words = Vec::with_capacity(terms.len());
        for (i, term) in terms.iter().enumerate() {
            let folded = fold_confusables(term);
            let words: Vec<&str> = words(&folded).collect();
            let Some(first) = words.first() else {
                return Err((i, "must contain a letter or a digit".to_owned()));
            };
            first_words.push(first.to_string());
            let escaped: Vec<String> = words.iter().map(|w| regex_syntax::escape(w)).collect();
            alternatives.push(format!("(?:{})", escaped.join(BETWEEN_WORDS)));
        }
        let any = Regex::new(&alternatives.join("|")).map_err(|e| (0, e.to_string()))?;
        let first_words = super::detectors::Literals::new(&first_words).map_err(|e| (0, e.to_string()))?;
        Ok(Terms { first_words, any })
    }

    /// Whether a term occurs in `normalized` (text the normaliser produced).
    pub(super) fn is_match(&self, normalized: &str) -> bool {
        let folded = fold_confusables(normalized);
        self.first_words.is_match(&folded) && self.any.is_match(&folded)
    }
}

/// A term's words: its runs of letters, digits and marks.
fn words(term: &str) -> impl Iterator<Item = &str> {
    term.split(|c: char| !(c.is_alphanumeric() || is_combining_mark(c)))
        .filter(|w| !w.is_empty())
}

/// Every character outside ASCII as its confusables skeleton, lowercase, without diacritics;
/// ASCII as it is. Borrowed when there is nothing to fold.
pub(super) fn fold_confusables(s: &str) -> Cow<'_, str> {
    if s.is_ascii() {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut one = [0u8; 4];
    for c in s.chars() {
        if c.is_ascii() {
            out.push(c);
            continue;
        }
        let skeleton = unicode_security::skeleton(c.encode_utf8(&mut one));
        for k in skeleton.filter(|k| !is_combining_mark(*k)) {
            out.extend(k.to_lowercase());
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::content::normalize;

    fn terms(list: &[&str]) -> Terms {
        let normalized: Vec<String> = list.iter().map(|t| normalize(t).trim().to_owned()).collect();
        Terms::compile(&normalized).unwrap()
    }

    fn found(t: &Terms, text: &str) -> bool {
        t.is_match(&normalize(text))
    }

    #[test]
    fn a_term_matches_whatever_separates_its_words() {
        let t = terms(&["project falcon"]);
        for text in [
            "project falcon",
            "about Project  Falcon today",
            "project-falcon",
            "project_falcon",
            "project.falcon",
            "project/falcon",
            "project\u{00A0}falcon",
            "project\u{2003}falcon",
            "project\u{200B}falcon",
            "project\u{200C}falcon",
            "project\u{00AD}falcon",
            "project\u{2011}falcon",
            "project\u{2014}falcon",
            "projectfalcon",
            "PROJECT - _ . FALCON",
            "x:project:falcon:y",
        ] {
            assert!(found(&t, text), "{text:?}");
        }
    }

    #[test]
    fn letters_across_words_are_not_a_term() {
        let t = terms(&["project falcon", "therapist"]);
        for text in [
            "projection of falconry",
            "the project team and a falcon",
            "the rapist",
            "pro ject falcon",
            "project eagle",
        ] {
            assert!(!found(&t, text), "{text:?}");
        }
        // A term inside a longer word is still found, as a substring always was.
        assert!(found(&t, "subproject falconry"));
    }

    #[test]
    fn look_alike_letters_and_smuggled_tags_are_read_as_what_they_show() {
        let t = terms(&["project falcon"]);
        for text in [
            "pr\u{043E}ject falcon",                                           // Cyrillic о
            "\u{0440}r\u{043E}j\u{0435}\u{0441}t falcon",                      // Cyrillic р, о, е, с
            "project f\u{0430}lcon",                                           // Cyrillic а
            "proj\u{00E9}ct falc\u{00F6}n",                                    // diacritics
            "\u{FF50}\u{FF52}\u{FF4F}\u{FF4A}\u{FF45}\u{FF43}\u{FF54} falcon", // full-width
        ] {
            assert!(found(&t, text), "{text:?}");
        }
        let tagged: String = "project falcon"
            .chars()
            .map(|c| char::from_u32(0xE0000 + u32::from(c)).unwrap())
            .collect();
        assert!(found(&t, &format!("hello \u{E0001}{tagged}\u{E007F}")));
        // A term written with look-alikes is folded the same way.
        let cyrillic = terms(&["\u{0441}\u{043E}de word"]);
        assert!(found(&cyrillic, "code word"));
    }

    #[test]
    fn a_term_needs_something_to_match() {
        assert!(Terms::compile(&["--- ...".to_owned()]).is_err());
    }
}
