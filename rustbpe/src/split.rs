//! Regex pre-split: text -> chunks that BPE merges never cross.
//!
//! The GPT-4 style pattern needs one lookahead (`\s+(?!\S)`), which only fancy-regex's backtracking
//! engine supports. Pre-splitting is most of the training time, so for the GPT-4 family of patterns we
//! run an equivalent lookahead-free pattern on regex-automata's DFA engine and apply the lookahead by
//! hand; any other pattern goes through fancy-regex unchanged. Both give the chunks tiktoken gives.

use std::sync::OnceLock;

use fancy_regex::Regex as FancyRegex;
use regex_automata::dfa::{dense, Automaton, StartKind};
use regex_automata::util::{primitives::StateID, start};
use regex_automata::Anchored;

type Dfa = dense::DFA<Vec<u32>>;

/// A fully built DFA needs no per-thread scratch space, unlike regex-automata's lazy engines, so
/// the rayon workers share it freely. Building one takes tens of milliseconds: once per process.
static GPT4_STYLE_DFAS: [OnceLock<Dfa>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];

/// GPT-4's split pattern with numbers cut into groups of at most `max_digits` digits.
/// Echo reports are full of measurements ("LVEF 55-60%", "PASP 35 mmHg"); groups of at most 2 digits
/// stop a small vocabulary from spending hundreds of tokens on individual 3-digit numbers.
pub fn gpt4_style_pattern(max_digits: u32) -> String {
    format!(
        r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{{L}}\p{{N}}]?+\p{{L}}+|\p{{N}}{{1,{max_digits}}}| ?[^\s\p{{L}}\p{{N}}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
    )
}

pub fn default_pattern() -> String {
    gpt4_style_pattern(2)
}

/// The same pattern as two DFA patterns, tried in order like an alternation: every alternative before
/// the lookahead, then plain `\s+`, whose matches `Splitter::next_end` shortens as the lookahead would.
/// The possessive quantifiers are dropped, which changes nothing here: each possessive item is followed
/// by something it cannot match itself, so backtracking into it never yields a match.
fn lookahead_free_dfa(max_digits: u32) -> Dfa {
    let before = format!(
        r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{{1,{max_digits}}}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]"
    );
    dense::Builder::new()
        .configure(dense::Config::new().start_kind(StartKind::Anchored))
        .build_many(&[before.as_str(), r"\s+"])
        .expect("the lookahead-free GPT-4 style patterns compile")
}

pub enum Splitter {
    /// the DFA and its start state (the patterns look at nothing before the match, so there is one)
    Dfa(&'static Dfa, StateID),
    Fancy(FancyRegex),
}

impl Splitter {
    pub fn new(pattern: &str) -> Result<Splitter, String> {
        // compile with fancy-regex first even when it will not be used, so a bad pattern is reported
        // the way tiktoken (which uses fancy-regex) would see it
        let fancy = FancyRegex::new(pattern).map_err(|e| format!("invalid split pattern: {e}"))?;
        for max_digits in 1..=3 {
            if pattern == gpt4_style_pattern(max_digits) {
                let dfa = GPT4_STYLE_DFAS[max_digits as usize - 1]
                    .get_or_init(|| lookahead_free_dfa(max_digits));
                let start = dfa
                    .start_state(&start::Config::new().anchored(Anchored::Yes))
                    .map_err(|e| e.to_string())?;
                return Ok(Splitter::Dfa(dfa, start));
            }
        }
        Ok(Splitter::Fancy(fancy))
    }

    /// Call `f` on every chunk of `text`, in order.
    pub fn for_each<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<(), String> {
        match self {
            Splitter::Fancy(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| format!("split pattern failed on the input: {e}"))?;
                    f(m.as_str());
                }
            }
            Splitter::Dfa(dfa, start) => {
                let mut pos = 0;
                while pos < text.len() {
                    let end = Self::next_end(dfa, *start, text, pos);
                    f(&text[pos..end]);
                    pos = end;
                }
            }
        }
        Ok(())
    }

    /// End of the chunk starting at `pos`: the leftmost-first match, found by walking the DFA until it
    /// dies (a hand-written loop: the library's search entry point costs more than a short chunk does).
    fn next_end(dfa: &Dfa, start: StateID, text: &str, pos: usize) -> usize {
        let bytes = text.as_bytes();
        let mut state = start;
        // (end, pattern) of the longest match so far; every character starts some alternative, so the
        // loop always records one. DFA match states are reported one byte late, hence `end = i`.
        let mut found = (pos, 0);
        let mut i = pos;
        while i < bytes.len() {
            state = dfa.next_state(state, bytes[i]);
            if dfa.is_special_state(state) {
                if dfa.is_match_state(state) {
                    found = (i, dfa.match_pattern(state, 0).as_usize());
                } else if dfa.is_dead_state(state) {
                    break;
                }
            }
            i += 1;
        }
        if i == bytes.len() {
            state = dfa.next_eoi_state(state);
            if dfa.is_match_state(state) {
                found = (bytes.len(), dfa.match_pattern(state, 0).as_usize());
            }
        }
        let (end, pattern) = found;
        assert!(end > pos, "every character starts a match");
        // `\s+` matched a whole run of spaces. The original `\s+(?!\S)` stops one character short when
        // more text follows, leaving that last space to the word after it (" foo"); a run of one space
        // falls through to the original's own `\s+` and stays whole.
        if pattern == 1 && end < bytes.len() {
            let last = text[..end]
                .chars()
                .next_back()
                .expect("the match is not empty");
            if end - last.len_utf8() > pos {
                return end - last.len_utf8();
            }
        }
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(s: &Splitter, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        s.for_each(text, |c| out.push(c.to_string())).unwrap();
        out
    }

    #[test]
    fn dfa_path_matches_fancy_regex() {
        let pieces = [
            "a", "Ab", " ", "  ", "\n", "\r\n", "\t", "\u{a0}", "\u{2003}", "\u{85}", "\u{b}",
            "\u{c}", "1", "234", "x", "é", "ß", "中文", "!", "?!", "'s", "'LL", "'ve", "/", "(",
            ".", "\u{0301}", "🫀", "٣", "Ⅻ", "_",
        ];
        let mut state: u64 = 42;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize
        };
        for max_digits in 1..=3 {
            let pattern = gpt4_style_pattern(max_digits);
            let fast = Splitter::new(&pattern).unwrap();
            assert!(matches!(fast, Splitter::Dfa(..)));
            let slow = Splitter::Fancy(FancyRegex::new(&pattern).unwrap());
            // pseudo-random strings over pieces that exercise every alternative and both ends of the text
            for _ in 0..10_000 {
                let text: String = (0..next() % 12)
                    .map(|_| pieces[next() % pieces.len()])
                    .collect();
                assert_eq!(chunks(&fast, &text), chunks(&slow, &text), "text {text:?}");
            }
        }
    }

    #[test]
    fn other_patterns_use_fancy_regex() {
        assert!(matches!(
            Splitter::new(r"\w+|\s+").unwrap(),
            Splitter::Fancy(_)
        ));
        assert!(Splitter::new("(unclosed").is_err());
    }
}
