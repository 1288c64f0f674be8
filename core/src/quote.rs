//! Quoting client input in error messages: at most a short prefix.
//!
//! Invariant: [`quote`] returns at most about [`QUOTE_CHARS`] characters of its input (plus
//! quotes, escapes and a size note), whatever the input's size, so an error about a 1 MB
//! field is a short message — not a 1 MB status that clients then refuse as oversized
//! metadata.

use std::fmt::Write;

/// Characters of the input an error message quotes at most.
pub const QUOTE_CHARS: usize = 64;

/// `s` quoted as Rust's `{:?}` does, cut to its first [`QUOTE_CHARS`] characters; a cut
/// input is followed by `…` and its full size in bytes.
pub fn quote(s: &str) -> String {
    let mut cut = s.char_indices().nth(QUOTE_CHARS).map(|(i, _)| i);
    // An exact-length input is shown whole.
    if cut == Some(s.len()) {
        cut = None;
    }
    match cut {
        None => format!("{s:?}"),
        Some(i) => {
            let mut out = format!("{:?}", &s[..i]);
            let _ = write!(out, "… ({} bytes)", s.len());
            out
        }
    }
}

/// `s` as it is (unquoted), cut like [`quote`]: for text known to be plain, such as digits.
pub fn prefix(s: &str) -> String {
    match s.char_indices().nth(QUOTE_CHARS).map(|(i, _)| i) {
        Some(i) if i < s.len() => format!("{}… ({} bytes)", &s[..i], s.len()),
        _ => s.to_string(),
    }
}

/// Cuts an owned message to at most `max` bytes (at a character boundary), saying how much
/// was left out. The last line of defence for any text put in a status or a result.
pub fn cap(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let total = s.len();
    let mut i = max.saturating_sub(40).min(s.len());
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    s.truncate(i);
    let _ = write!(s, "… ({total} bytes, cut)");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_inputs_are_quoted_whole() {
        assert_eq!(quote("cache:1"), "\"cache:1\"");
        let exact = "x".repeat(QUOTE_CHARS);
        assert_eq!(quote(&exact), format!("{exact:?}"));
    }

    #[test]
    fn long_inputs_are_cut_with_their_size() {
        let long = "é".repeat(1 << 20);
        let q = quote(&long);
        assert!(q.len() < 4 * QUOTE_CHARS, "{} bytes", q.len());
        assert!(q.ends_with(&format!("… ({} bytes)", long.len())), "{q}");
    }

    #[test]
    fn cap_bounds_any_text() {
        let s = "ü".repeat(10_000);
        let c = cap(s.clone(), 1000);
        assert!(c.len() <= 1000, "{}", c.len());
        assert!(c.ends_with("bytes, cut)"));
        assert_eq!(cap("short".into(), 1000), "short");
    }
}
