//! CBC-MAC modes over the block ciphers: the PBOC MAC (ISO 9797-1 padding method 2), ANSI
//! X9.9, ISO 9797-1 algorithm 3 (ANSI X9.19 retail MAC) and the CUPS POS "ECB" MAC.
//!
//! The modes are written here rather than taken from the `cbc-mac`/`retail-mac` crates because
//! those pad with zeros only, and PBOC pads with `80 00..`. The block ciphers themselves come
//! from RustCrypto. No function allocates: inputs are streamed block by block.

use std::fmt;

use cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt};
use des::Des;
use sm4::Sm4;
use subtle::ConstantTimeEq;

use super::keys::{DesKey, Sm4Key, Tdes2Key, left4};

/// A 4-byte MAC or TAC as carried in PBOC APDUs. Not secret, so it prints; compare with
/// [`Mac4::verify`], which takes the same time whatever the bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac4([u8; 4]);

impl Mac4 {
    pub const fn new(bytes: [u8; 4]) -> Mac4 {
        Mac4(bytes)
    }

    pub const fn to_bytes(self) -> [u8; 4] {
        self.0
    }

    /// Constant-time comparison: use this, never `==`, to check a MAC received from outside.
    pub fn verify(&self, received: &Mac4) -> bool {
        self.0.ct_eq(&received.0).into()
    }
}

impl fmt::Debug for Mac4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mac4(")?;
        for b in self.0 {
            write!(f, "{b:02X}")?;
        }
        write!(f, ")")
    }
}

/// Constant-time equality of two byte strings of equal length (false if lengths differ).
pub fn mac_eq(expected: &[u8], received: &[u8]) -> bool {
    expected.len() == received.len() && bool::from(expected.ct_eq(received))
}

/// How the last partial block is completed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Padding {
    /// ISO 9797-1 method 1: zeros up to a multiple of the block size, nothing if already a
    /// multiple (and one zero block for empty data).
    Zeros,
    /// ISO 9797-1 method 2: `80` then zeros. Always adds at least one byte, so data that is
    /// already a multiple of the block size gets a whole `80 00..` block.
    Method2,
}

/// CBC over `data` with the given padding; returns the final chaining value.
fn cbc<const B: usize>(
    mut encrypt: impl FnMut(&mut [u8; B]),
    iv: [u8; B],
    data: &[u8],
    padding: Padding,
) -> [u8; B] {
    let mut state = iv;
    let mut chunks = data.chunks_exact(B);
    for chunk in &mut chunks {
        xor_into(&mut state, chunk);
        encrypt(&mut state);
    }
    let rest = chunks.remainder();
    match padding {
        Padding::Zeros => {
            if !rest.is_empty() || data.is_empty() {
                xor_into(&mut state, rest);
                encrypt(&mut state);
            }
        }
        Padding::Method2 => {
            xor_into(&mut state, rest);
            state[rest.len()] ^= 0x80;
            encrypt(&mut state);
        }
    }
    state
}

fn xor_into(state: &mut [u8], data: &[u8]) {
    for (s, d) in state.iter_mut().zip(data) {
        *s ^= d;
    }
}

fn des_cbc(key: &DesKey, iv: [u8; 8], data: &[u8], padding: Padding) -> [u8; 8] {
    des_cbc_with(&key.cipher(), iv, data, padding)
}

fn des_cbc_with(cipher: &Des, iv: [u8; 8], data: &[u8], padding: Padding) -> [u8; 8] {
    cbc(
        |block: &mut [u8; 8]| *block = DesKey::encrypt_with(cipher, *block),
        iv,
        data,
        padding,
    )
}

/// ISO 9797-1 algorithm 3: single-DES CBC with K_left, then `E_KL(D_KR(.))` on the final
/// block. Equivalent to DES-CBC over all but the last block and 3DES on the last.
fn retail_cbc(key: &Tdes2Key, iv: [u8; 8], data: &[u8], padding: Padding) -> [u8; 8] {
    let left = key.left().cipher();
    let right = key.right().cipher();
    let mut out = cbc(
        |block: &mut [u8; 8]| *block = DesKey::encrypt_with(&left, *block),
        iv,
        data,
        padding,
    );
    let mut b = Array::from(out);
    right.decrypt_block(&mut b);
    left.encrypt_block(&mut b);
    out = b.into();
    out
}

/// The PBOC MAC with a single-length key (the "DES-MAC" of PBOC session and TAC keys):
/// DES-CBC from `iv`, padding `80 00..`, leftmost 4 bytes.
pub fn pboc_mac_des(key: &DesKey, iv: [u8; 8], data: &[u8]) -> Mac4 {
    Mac4(left4(&des_cbc(key, iv, data, Padding::Method2)))
}

/// The PBOC MAC with a double-length key (line protection, CLA `84`; IV = the challenge):
/// ISO 9797-1 algorithm 3 with padding `80 00..`, leftmost 4 bytes.
pub fn pboc_mac_tdes(key: &Tdes2Key, iv: [u8; 8], data: &[u8]) -> Mac4 {
    Mac4(left4(&retail_cbc(key, iv, data, Padding::Method2)))
}

/// The PBOC MAC with an SM4 key: SM4-CBC over 16-byte blocks from `iv`, padding `80 00..`,
/// leftmost 4 bytes (spec §7.2).
pub fn pboc_mac_sm4(key: &Sm4Key, iv: [u8; 16], data: &[u8]) -> Mac4 {
    pboc_mac_sm4_with(&key.cipher(), iv, data)
}

pub(crate) fn pboc_mac_des_with(cipher: &Des, iv: [u8; 8], data: &[u8]) -> Mac4 {
    Mac4(left4(&des_cbc_with(cipher, iv, data, Padding::Method2)))
}

pub(crate) fn pboc_mac_sm4_with(cipher: &Sm4, iv: [u8; 16], data: &[u8]) -> Mac4 {
    let out = cbc(
        |block: &mut [u8; 16]| {
            let mut b = Array::from(*block);
            cipher.encrypt_block(&mut b);
            *block = b.into();
        },
        iv,
        data,
        Padding::Method2,
    );
    Mac4(left4(&out))
}

/// ANSI X9.9 / FIPS 113 / ISO 9797-1 algorithm 1: single-DES CBC-MAC over zero-padded data,
/// the whole 8-byte final block.
pub fn x9_9_mac(key: &DesKey, iv: [u8; 8], data: &[u8]) -> [u8; 8] {
    des_cbc(key, iv, data, Padding::Zeros)
}

/// ANSI X9.19 / ISO 9797-1 algorithm 3 ("retail MAC") over zero-padded data, 8 bytes.
pub fn x9_19_mac(key: &Tdes2Key, iv: [u8; 8], data: &[u8]) -> [u8; 8] {
    retail_cbc(key, iv, data, Padding::Zeros)
}

/// CBC-MAC where every block is 3DES-encrypted, over zero-padded data, 8 bytes.
pub fn tdes_cbc_mac(key: &Tdes2Key, iv: [u8; 8], data: &[u8]) -> [u8; 8] {
    let cipher = key.cipher();
    cbc(
        |block: &mut [u8; 8]| {
            let mut b = Array::from(*block);
            cipher.encrypt_block(&mut b);
            *block = b.into();
        },
        iv,
        data,
        Padding::Zeros,
    )
}

/// The CUPS POS "ECB" MAC of spec §3.8 with a single-length MAK: XOR of the zero-padded
/// blocks, hex-expanded, two DES steps, and the first 8 uppercase hex characters of the result
/// as ASCII (which is what field 64 carries).
pub fn cups_ecb_mac(key: &DesKey, mab: &[u8]) -> [u8; 8] {
    let mut r = [0u8; 8];
    for chunk in mab.chunks(8) {
        xor_into(&mut r, chunk);
    }
    let h = hex_upper(&r);
    let cipher = key.cipher();
    let h1: [u8; 8] = h[..8].try_into().expect("8 chars");
    let mut t = DesKey::encrypt_with(&cipher, h1);
    xor_into(&mut t, &h[8..]);
    let t = DesKey::encrypt_with(&cipher, t);
    let out = hex_upper(&t);
    out[..8].try_into().expect("8 chars")
}

fn hex_upper(bytes: &[u8; 8]) -> [u8; 16] {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = [0u8; 16];
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0x0F)];
    }
    out
}
