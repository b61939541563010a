//! Money as an integer number of fen (分, 1/100 yuan) with checked arithmetic.

use std::fmt;
use std::str::FromStr;

/// An amount of money in fen. Arithmetic is checked: an overflow is `None`, which the
/// ledger turns into [`crate::Rejection::Overflow`], never a wrapped value.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Fen(i64);

impl Fen {
    pub const ZERO: Fen = Fen(0);
    pub const MAX: Fen = Fen(i64::MAX);

    pub const fn new(fen: i64) -> Fen {
        Fen(fen)
    }

    pub const fn get(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: Fen) -> Option<Fen> {
        self.0.checked_add(other.0).map(Fen)
    }

    pub fn checked_sub(self, other: Fen) -> Option<Fen> {
        self.0.checked_sub(other.0).map(Fen)
    }

    pub const fn is_positive(self) -> bool {
        self.0 > 0
    }
}

impl fmt::Debug for Fen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}fen", self.0)
    }
}

/// Displays as yuan with two decimals: `Fen::new(-1234)` is `-12.34`.
impl fmt::Display for Fen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:02}", abs / 100, abs % 100)
    }
}

/// Why a text is not an amount of fen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseFenError {
    pub input: String,
    pub reason: &'static str,
}

impl fmt::Display for ParseFenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid amount {:?}: {}", self.input, self.reason)
    }
}

impl std::error::Error for ParseFenError {}

/// Parses a whole number of fen (`"1234"` is 12.34 yuan). Decimal points are refused on
/// purpose: a client that means yuan must say so by converting, not by guessing.
impl FromStr for Fen {
    type Err = ParseFenError;

    fn from_str(s: &str) -> Result<Fen, ParseFenError> {
        let err = |reason| ParseFenError {
            input: s.to_owned(),
            reason,
        };
        let t = s.trim();
        if t.is_empty() {
            return Err(err("empty"));
        }
        let digits = t.strip_prefix('-').unwrap_or(t);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err("expected a whole number of fen (1 yuan = 100 fen)"));
        }
        t.parse::<i64>()
            .map(Fen)
            .map_err(|_| err("out of range for a 64-bit amount"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_as_yuan() {
        assert_eq!(Fen::new(1234).to_string(), "12.34");
        assert_eq!(Fen::new(-5).to_string(), "-0.05");
        assert_eq!(Fen::new(i64::MIN).to_string(), "-92233720368547758.08");
    }

    #[test]
    fn parse_rejects_junk_with_a_reason() {
        assert_eq!("42".parse::<Fen>(), Ok(Fen::new(42)));
        assert_eq!("-42".parse::<Fen>(), Ok(Fen::new(-42)));
        for bad in ["", "-", "1.5", "1e3", "abc", "99999999999999999999"] {
            let e = bad.parse::<Fen>().unwrap_err();
            assert_eq!(e.input, bad);
        }
    }

    #[test]
    fn arithmetic_is_checked() {
        assert_eq!(Fen::MAX.checked_add(Fen::new(1)), None);
        assert_eq!(Fen::new(1).checked_sub(Fen::new(3)), Some(Fen::new(-2)));
    }
}
