//! Helpers shared by the card crate's integration tests.
#![allow(dead_code)] // Each test binary uses a different subset of the helpers.

/// Decodes hex, ignoring spaces; panics on bad input (test data is fixed).
pub fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    assert_eq!(digits.len() & 1, 0, "odd hex length in {s:?}");
    digits
        .chunks_exact(2)
        .map(|p| {
            let v = |c: u8| (c as char).to_digit(16).expect("hex digit") as u8;
            (v(p[0]) << 4) | v(p[1])
        })
        .collect()
}

/// Decodes hex into a fixed-size array.
pub fn arr<const N: usize>(s: &str) -> [u8; N] {
    hex(s).try_into().expect("hex of the right length")
}

/// Encodes bytes as uppercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}
