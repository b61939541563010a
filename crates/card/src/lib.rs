//! PBOC purse cryptography, the software CPU card and the software PSAM of onecard.
//!
//! This crate is pure: it does no IO, reads no clock, uses no async and knows no database.
//! The transaction date-time, randomness ([`random::RandomSource`]) and saved state (bytes)
//! are arguments; files, readers and sockets belong to the crates that use this one.
//!
//! What it owns:
//! - [`crypto`]: DES / 2-key 3DES / SM4 on RustCrypto primitives; the PBOC MAC, X9.9, X9.19,
//!   the CUPS POS "ECB" MAC; key diversification, session keys, MAC1 / MAC2 / TAC; ISO 9564
//!   format-0 PIN blocks; key check values; key wrappers;
//! - [`purse`]: the vocabulary shared by card, PSAM and platform (ASN, terminal id,
//!   transaction types, date-time, EF0015, EF0018 records);
//! - [`apdu`]: the short-APDU parser, responses and status words;
//! - [`commands`]: the EP and PSAM command set on the wire (builders and answer parsers);
//! - [`soft_card`]: a software PBOC EP card, with tears and misbehaviour for tests;
//! - [`psam`]: a software PSAM.
//!
//! Invariants (each has a test):
//! - keys live only in wrapper types that zeroise on drop and whose `Debug` prints a
//!   placeholder; reading key bytes goes through a method named `expose_bytes`;
//! - MACs received from outside are compared in constant time;
//! - the APDU parsers of the card and the PSAM never panic: every input gets a status word;
//! - a card's balance, counter, EF0018 record and transaction proof change together or not
//!   at all, and only after a MAC from a key holder verified; a failed MAC changes nothing;
//! - on an honest card whose records have not wrapped, the balance is the sum of the EF0018
//!   records' effects; purse counters and the PSAM's TTC never wrap;
//! - every vector of spec section 5 that concerns these primitives is a known-answer test
//!   (`tests/vectors.rs`), and the 5.3 flow is reproduced byte for byte through APDUs.

pub mod apdu;
mod codec;
pub mod commands;
pub mod crypto;
pub mod psam;
pub mod purse;
pub mod random;
pub mod soft_card;
pub mod terminal;

pub use codec::StateError;
