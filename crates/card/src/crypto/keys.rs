//! Key wrappers: DES, 2-key 3DES and SM4 keys that zeroise on drop and never print.
//!
//! Every key type keeps its bytes private. `Debug` prints a placeholder; the only way to see
//! the bytes is [`DesKey::expose_bytes`] and its siblings, whose name makes each use easy to
//! find in review. Check values ([`Tdes2Key::check_value`]) are what people and logs see
//! instead of keys.

use std::fmt;

use cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use des::{Des, TdesEde2};
use sm4::Sm4;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A key of the wrong length was given to a key constructor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLengthError {
    pub expected: usize,
    pub actual: usize,
}

impl fmt::Display for KeyLengthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "key must be {} bytes, got {}",
            self.expected, self.actual
        )
    }
}

impl std::error::Error for KeyLengthError {}

macro_rules! secret_key {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name {
            bytes: [u8; $len],
        }

        impl $name {
            pub const LEN: usize = $len;

            pub const fn from_bytes(bytes: [u8; $len]) -> Self {
                Self { bytes }
            }

            pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyLengthError> {
                let bytes: [u8; $len] = bytes.try_into().map_err(|_| KeyLengthError {
                    expected: $len,
                    actual: bytes.len(),
                })?;
                Ok(Self { bytes })
            }

            /// The key in clear. Named so that every use stands out in review.
            pub fn expose_bytes(&self) -> &[u8; $len] {
                &self.bytes
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                self.bytes.zeroize();
            }
        }

        impl ZeroizeOnDrop for $name {}

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }
    };
}

secret_key!(
    /// A single-length (8-byte) DES key: PBOC session keys, the TAC key, a single-length MAK.
    DesKey,
    8
);

secret_key!(
    /// A double-length (16-byte) 2-key triple-DES key (EDE, K1 = K3): card master and card
    /// keys, PSAM keys, TMK/PIK/MAK for the bank link.
    Tdes2Key,
    16
);

secret_key!(
    /// A 16-byte SM4 key (GB/T 32907).
    Sm4Key,
    16
);

fn des_cipher(key: &[u8; 8]) -> Des {
    Des::new(&Array::from(*key))
}

impl DesKey {
    pub fn encrypt_block(&self, block: [u8; 8]) -> [u8; 8] {
        Self::encrypt_with(&self.cipher(), block)
    }

    pub fn decrypt_block(&self, block: [u8; 8]) -> [u8; 8] {
        let mut b = Array::from(block);
        self.cipher().decrypt_block(&mut b);
        b.into()
    }

    /// The key check value: the leftmost 4 bytes of `E_K(00..00)`.
    pub fn check_value(&self) -> [u8; 4] {
        left4(&self.encrypt_block([0; 8]))
    }

    pub(crate) fn cipher(&self) -> Des {
        des_cipher(&self.bytes)
    }

    pub(crate) fn encrypt_with(cipher: &Des, block: [u8; 8]) -> [u8; 8] {
        let mut b = Array::from(block);
        cipher.encrypt_block(&mut b);
        b.into()
    }
}

impl Tdes2Key {
    /// 3DES-EDE encryption of one block (ECB).
    pub fn encrypt_block(&self, block: [u8; 8]) -> [u8; 8] {
        let mut b = Array::from(block);
        self.cipher().encrypt_block(&mut b);
        b.into()
    }

    /// 3DES-EDE decryption of one block (ECB).
    pub fn decrypt_block(&self, block: [u8; 8]) -> [u8; 8] {
        let mut b = Array::from(block);
        self.cipher().decrypt_block(&mut b);
        b.into()
    }

    /// The key check value: the leftmost 4 bytes of `E_K(00..00)`.
    pub fn check_value(&self) -> [u8; 4] {
        left4(&self.encrypt_block([0; 8]))
    }

    /// The left half K1 as a single DES key.
    pub fn left(&self) -> DesKey {
        DesKey::from_bytes(self.half(0))
    }

    /// The right half K2 as a single DES key.
    pub fn right(&self) -> DesKey {
        DesKey::from_bytes(self.half(8))
    }

    /// `K_left XOR K_right`: how PBOC turns the 16-byte DTK into the 8-byte TAC key.
    pub fn fold(&self) -> DesKey {
        let mut out = self.half(0);
        for (o, r) in out.iter_mut().zip(&self.bytes[8..]) {
            *o ^= r;
        }
        DesKey::from_bytes(out)
    }

    /// Encrypts a single-length key under this key (ECB), as keys travel in field 62.
    pub fn wrap_des_key(&self, key: &DesKey) -> [u8; 8] {
        self.encrypt_block(key.bytes)
    }

    /// Decrypts a single-length key encrypted under this key (ECB).
    pub fn unwrap_des_key(&self, wrapped: [u8; 8]) -> DesKey {
        DesKey::from_bytes(self.decrypt_block(wrapped))
    }

    /// Encrypts a double-length key under this key, each half ECB.
    pub fn wrap_tdes_key(&self, key: &Tdes2Key) -> [u8; 16] {
        let cipher = self.cipher();
        let mut out = [0u8; 16];
        for (o, k) in out.chunks_exact_mut(8).zip(key.bytes.chunks_exact(8)) {
            let mut b = Array::from(<[u8; 8]>::try_from(k).expect("8-byte chunk"));
            cipher.encrypt_block(&mut b);
            o.copy_from_slice(&b);
        }
        out
    }

    /// Decrypts a double-length key encrypted under this key, each half ECB.
    pub fn unwrap_tdes_key(&self, wrapped: [u8; 16]) -> Tdes2Key {
        let cipher = self.cipher();
        let mut out = [0u8; 16];
        for (o, k) in out.chunks_exact_mut(8).zip(wrapped.chunks_exact(8)) {
            let mut b = Array::from(<[u8; 8]>::try_from(k).expect("8-byte chunk"));
            cipher.decrypt_block(&mut b);
            o.copy_from_slice(&b);
        }
        Tdes2Key::from_bytes(out)
    }

    pub(crate) fn cipher(&self) -> TdesEde2 {
        TdesEde2::new(&Array::from(self.bytes))
    }

    fn half(&self, at: usize) -> [u8; 8] {
        self.bytes[at..at + 8].try_into().expect("8-byte half")
    }
}

impl Sm4Key {
    pub fn encrypt_block(&self, block: [u8; 16]) -> [u8; 16] {
        let mut b = Array::from(block);
        self.cipher().encrypt_block(&mut b);
        b.into()
    }

    pub fn decrypt_block(&self, block: [u8; 16]) -> [u8; 16] {
        let mut b = Array::from(block);
        self.cipher().decrypt_block(&mut b);
        b.into()
    }

    /// The key check value: the leftmost 4 bytes of `SM4_K(00..00)`.
    pub fn check_value(&self) -> [u8; 4] {
        left4(&self.encrypt_block([0; 16]))
    }

    pub(crate) fn cipher(&self) -> Sm4 {
        Sm4::new(&Array::from(self.bytes))
    }
}

pub(crate) fn left4(block: &[u8]) -> [u8; 4] {
    block[..4].try_into().expect("block of at least 4 bytes")
}
