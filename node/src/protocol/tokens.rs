//! memcached's command-line tokenizer.
//!
//! memcached splits a request line on single spaces only (tabs and other control characters
//! are part of a token), keeps at most 23 tokens and leaves whatever follows for commands that
//! continue (multi-key `get`). Token counts below use memcached's convention: the count
//! includes one terminal token, so `get a` has `ntokens() == 3`.

/// Most tokens memcached keeps from one line, counting its terminal token.
pub const MAX_TOKENS: usize = 24;

/// The tokens of one request line.
#[derive(Clone, Copy, Debug)]
pub struct Tokens<'a> {
    items: [&'a [u8]; MAX_TOKENS - 1],
    len: usize,
    rest: Option<&'a [u8]>,
}

impl<'a> Tokens<'a> {
    /// Splits `line` (without its line terminator) into tokens.
    pub fn new(line: &'a [u8]) -> Self {
        // memcached measures the line with strlen(): an embedded NUL ends it.
        let line = match memchr(0, line) {
            Some(nul) => &line[..nul],
            None => line,
        };
        let mut items: [&'a [u8]; MAX_TOKENS - 1] = [&[]; MAX_TOKENS - 1];
        let mut len = 0;
        let mut rest = None;
        let mut start = 0;
        let mut i = 0;
        while i < line.len() {
            if line[i] == b' ' {
                if start != i {
                    items[len] = &line[start..i];
                    len += 1;
                    if len == MAX_TOKENS - 1 {
                        if i + 1 < line.len() {
                            rest = Some(&line[i + 1..]);
                        }
                        return Tokens { items, len, rest };
                    }
                }
                start = i + 1;
            }
            i += 1;
        }
        if start < line.len() {
            items[len] = &line[start..];
            len += 1;
        }
        Tokens { items, len, rest }
    }

    /// memcached's token count: real tokens plus the terminal one.
    pub fn ntokens(&self) -> usize {
        self.len + 1
    }

    /// Number of real tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `i`-th real token, or an empty slice past the end (memcached's terminal token).
    pub fn get(&self, i: usize) -> &'a [u8] {
        if i < self.len {
            self.items[i]
        } else {
            &[]
        }
    }

    /// Real tokens from `from` on.
    pub fn slice(&self, from: usize) -> &[&'a [u8]] {
        if from < self.len {
            &self.items[from..self.len]
        } else {
            &[]
        }
    }

    /// Text after the 23rd token, if the line had more.
    pub fn rest(&self) -> Option<&'a [u8]> {
        self.rest
    }

    /// memcached's `noreply` rule: the last real token is exactly `noreply`.
    pub fn noreply(&self) -> bool {
        self.len > 0 && self.items[self.len - 1] == b"noreply"
    }
}

/// Position of `needle` in `haystack`.
pub fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_single_spaces_only() {
        let t = Tokens::new(b"  set a\tb 0  0 1 ");
        assert_eq!(t.ntokens(), 6);
        assert_eq!(t.get(0), b"set");
        assert_eq!(t.get(1), b"a\tb");
        assert_eq!(t.get(4), b"1");
        assert_eq!(t.get(5), b"");
        assert!(t.rest().is_none());
    }

    #[test]
    fn keeps_at_most_23_tokens_and_the_rest() {
        let line: Vec<u8> = (0..30)
            .map(|i| format!("k{i}"))
            .collect::<Vec<_>>()
            .join(" ")
            .into_bytes();
        let t = Tokens::new(&line);
        assert_eq!(t.ntokens(), MAX_TOKENS);
        assert_eq!(t.get(22), b"k22");
        assert_eq!(t.rest(), Some(&b"k23 k24 k25 k26 k27 k28 k29"[..]));
    }

    #[test]
    fn nul_ends_the_line() {
        let t = Tokens::new(b"get a\0b c");
        assert_eq!(t.ntokens(), 3);
        assert_eq!(t.get(1), b"a");
    }

    #[test]
    fn noreply_is_the_last_token() {
        assert!(Tokens::new(b"delete a noreply").noreply());
        assert!(!Tokens::new(b"delete noreply a").noreply());
    }
}
