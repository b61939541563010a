//! PBOC purse cryptography, the software CPU card and the software PSAM of onecard.
//!
//! This crate is pure: it does no IO, reads no clock, uses no async and knows no database.
//! Time (the transaction date-time) and randomness are arguments.
//!
//! What it owns:
//! - [`crypto`]: DES / 3DES / SM4 on RustCrypto primitives, the PBOC MAC, X9.9, X9.19, the
//!   CUPS POS "ECB" MAC, key diversification, session keys, MAC1 / MAC2 / TAC, PIN blocks and
//!   key check values;
//! - [`purse`]: the vocabulary shared by card, PSAM and platform (ASN, terminal id,
//!   transaction types, EF0015, EF0018 records).
//!
//! Invariants:
//! - keys live only in wrapper types that zeroise on drop and whose `Debug` prints a
//!   placeholder; reading key bytes goes through a method named `expose_bytes`;
//! - MACs received from outside are compared in constant time;
//! - every vector of spec section 5 that concerns these primitives is a known-answer test
//!   (`tests/vectors.rs`).

pub mod apdu;
mod codec;
pub mod commands;
pub mod crypto;
pub mod psam;
pub mod purse;
pub mod random;
pub mod soft_card;

pub use codec::StateError;
