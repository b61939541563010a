//! PINs and ISO 9564 format-0 PIN blocks (spec §3.9), and the BCD form a card's VERIFY takes.
//!
//! A [`Pin`] and a clear [`PinBlock`] are secrets: they zeroise on drop and never print.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

use super::keys::Tdes2Key;

/// The fewest PIN digits accepted.
pub const PIN_DIGITS_MIN: usize = 4;
/// The most PIN digits accepted (the card's VERIFY takes at most 6 BCD bytes).
pub const PIN_DIGITS_MAX: usize = 12;
/// The fewest PAN digits accepted for a format-0 block (ISO/IEC 7812 allows 8).
pub const PAN_DIGITS_MIN: usize = 8;
/// The most PAN digits accepted.
pub const PAN_DIGITS_MAX: usize = 19;

/// Why a PIN, PAN or PIN block was refused. Never carries the PIN itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinError {
    /// The PIN is not 4-12 decimal digits.
    BadPin,
    /// The PAN is not 8-19 decimal digits.
    BadPan,
    /// A decrypted block is not a format-0 block for this PAN.
    BadBlock,
}

impl fmt::Display for PinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PinError::BadPin => "PIN must be 4 to 12 decimal digits",
            PinError::BadPan => "PAN must be 8 to 19 decimal digits",
            PinError::BadBlock => "not an ISO 9564 format-0 PIN block",
        })
    }
}

impl std::error::Error for PinError {}

/// A personal identification number: 4-12 decimal digits.
#[derive(Clone)]
pub struct Pin {
    /// Digit values 0-9, the unused tail zero.
    digits: [u8; PIN_DIGITS_MAX],
    len: u8,
}

impl Pin {
    pub fn parse(text: &str) -> Result<Pin, PinError> {
        let t = text.as_bytes();
        if !(PIN_DIGITS_MIN..=PIN_DIGITS_MAX).contains(&t.len())
            || !t.iter().all(u8::is_ascii_digit)
        {
            return Err(PinError::BadPin);
        }
        let mut digits = [0u8; PIN_DIGITS_MAX];
        for (d, c) in digits.iter_mut().zip(t) {
            *d = c - b'0';
        }
        Ok(Pin {
            digits,
            len: t.len() as u8,
        })
    }

    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The PIN as a card's VERIFY takes it: BCD, two digits a byte, an odd last digit padded
    /// with `F`. Returns the buffer and how many of its bytes are used (2-6).
    pub fn to_verify_bcd(&self) -> ([u8; 6], usize) {
        let mut out = [0xFFu8; 6];
        for (i, d) in self.digits[..self.len()].iter().enumerate() {
            let byte = &mut out[i / 2];
            if i % 2 == 0 {
                *byte = (d << 4) | 0x0F;
            } else {
                *byte = (*byte & 0xF0) | d;
            }
        }
        (out, self.len().div_ceil(2))
    }

    /// The PIN back from its VERIFY form (BCD, `F` padding only in the last nibble).
    pub fn from_verify_bcd(bytes: &[u8]) -> Result<Pin, PinError> {
        let mut digits = [0u8; PIN_DIGITS_MAX];
        let mut len = 0usize;
        let nibbles = bytes.iter().flat_map(|b| [b >> 4, b & 0x0F]);
        let total = bytes.len() * 2;
        for (i, n) in nibbles.enumerate() {
            match n {
                0..=9 if len < PIN_DIGITS_MAX => {
                    digits[len] = n;
                    len += 1;
                }
                0x0F if i == total - 1 => {}
                _ => return Err(PinError::BadPin),
            }
        }
        if len < PIN_DIGITS_MIN {
            return Err(PinError::BadPin);
        }
        Ok(Pin {
            digits,
            len: len as u8,
        })
    }

    fn digits(&self) -> &[u8] {
        &self.digits[..self.len()]
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.digits.zeroize();
        self.len.zeroize();
    }
}

impl ZeroizeOnDrop for Pin {}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(<redacted>)")
    }
}

/// A clear ISO 9564 format-0 PIN block. Secret: it is the PIN XOR a public value.
#[derive(Clone)]
pub struct PinBlock([u8; 8]);

impl PinBlock {
    pub const fn from_bytes(bytes: [u8; 8]) -> PinBlock {
        PinBlock(bytes)
    }

    /// The block in clear. Named so that every use stands out in review.
    pub fn expose_bytes(&self) -> &[u8; 8] {
        &self.0
    }

    /// Builds the format-0 block: `0 ‖ L ‖ PIN ‖ F..F` XOR `0000 ‖ 12 rightmost PAN digits
    /// without the check digit`.
    pub fn format0(pin: &Pin, pan: &str) -> Result<PinBlock, PinError> {
        let pan_field = pan_field(pan)?;
        let mut pin_field = [0xFFu8; 8];
        pin_field[0] = pin.len;
        for (i, d) in pin.digits().iter().enumerate() {
            let nibble = i + 2;
            let byte = &mut pin_field[nibble / 2];
            if nibble % 2 == 0 {
                *byte = (d << 4) | (*byte & 0x0F);
            } else {
                *byte = (*byte & 0xF0) | d;
            }
        }
        let mut block = [0u8; 8];
        for ((b, p), q) in block.iter_mut().zip(&pin_field).zip(&pan_field) {
            *b = p ^ q;
        }
        pin_field.zeroize();
        Ok(PinBlock(block))
    }

    /// Recovers the PIN from a clear format-0 block and the PAN it was made with.
    pub fn pin(&self, pan: &str) -> Result<Pin, PinError> {
        let pan_field = pan_field(pan)?;
        let mut field = [0u8; 8];
        for ((f, b), q) in field.iter_mut().zip(&self.0).zip(&pan_field) {
            *f = b ^ q;
        }
        let result = parse_pin_field(&field);
        field.zeroize();
        result
    }

    /// Encrypts the block under a PIN key (3DES ECB), as in field 52.
    pub fn encrypt(&self, pik: &Tdes2Key) -> [u8; 8] {
        pik.encrypt_block(self.0)
    }

    /// Decrypts a field 52 value under a PIN key.
    pub fn decrypt(pik: &Tdes2Key, encrypted: [u8; 8]) -> PinBlock {
        PinBlock(pik.decrypt_block(encrypted))
    }
}

impl Drop for PinBlock {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for PinBlock {}

impl fmt::Debug for PinBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PinBlock(<redacted>)")
    }
}

fn parse_pin_field(field: &[u8; 8]) -> Result<Pin, PinError> {
    let control = field[0] >> 4;
    let len = usize::from(field[0] & 0x0F);
    if control != 0 || !(PIN_DIGITS_MIN..=PIN_DIGITS_MAX).contains(&len) {
        return Err(PinError::BadBlock);
    }
    let mut digits = [0u8; PIN_DIGITS_MAX];
    // The 14 nibbles after the control and length nibbles: PIN digits, then `F` fill.
    let nibbles = field[1..].iter().flat_map(|b| [b >> 4, b & 0x0F]);
    for (i, n) in nibbles.enumerate() {
        match (i < len, n) {
            (true, 0..=9) => digits[i] = n,
            (false, 0x0F) => {}
            _ => return Err(PinError::BadBlock),
        }
    }
    Ok(Pin {
        digits,
        len: len as u8,
    })
}

/// `0000` followed by the 12 rightmost PAN digits excluding the check digit, left-padded with
/// zeros for short PANs.
fn pan_field(pan: &str) -> Result<[u8; 8], PinError> {
    let p = pan.as_bytes();
    if !(PAN_DIGITS_MIN..=PAN_DIGITS_MAX).contains(&p.len()) || !p.iter().all(u8::is_ascii_digit) {
        return Err(PinError::BadPan);
    }
    let without_check = &p[..p.len() - 1];
    let take = without_check.len().min(12);
    let digits = &without_check[without_check.len() - take..];
    let mut nibbles = [0u8; 16];
    for (n, c) in nibbles[16 - take..].iter_mut().zip(digits) {
        *n = c - b'0';
    }
    let mut out = [0u8; 8];
    for (o, pair) in out.iter_mut().zip(nibbles.chunks_exact(2)) {
        *o = (pair[0] << 4) | pair[1];
    }
    Ok(out)
}
