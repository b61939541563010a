//! PBOC purse keys: diversification, session (process) keys, the TAC key, and the MAC1 /
//! MAC2 / TAC layouts of load and purchase (spec §1.3, §1.5, §1.6, §7.1-7.2).
//!
//! A purse key is 16 bytes and belongs to an algorithm: 2-key 3DES (algorithm id `00`) or SM4
//! (`04`). The same 16-byte master key diversifies to a card key, the card key encrypts an
//! 8-byte input into a session key, and session and TAC keys make 4-byte PBOC MACs:
//!
//! | algorithm | card key from master `MK`, factor `F` | session key | TAC key |
//! |---|---|---|---|
//! | 3DES | `E_MK(F) ‖ E_MK(~F)` | `E_K(input)`, a DES key | `DTK_L ⊕ DTK_R`, a DES key |
//! | SM4 | `SM4_MK(F ‖ ~F)` | `SM4_K(input ‖ ~input)`, an SM4 key | DTK itself (our choice) |

use std::fmt;

use cipher::{Array, BlockCipherEncrypt};
use des::{Des, TdesEde2};
use sm4::Sm4;

use super::keys::{DesKey, Sm4Key, Tdes2Key};
use super::mac::{Mac4, pboc_mac_des, pboc_mac_des_with, pboc_mac_sm4, pboc_mac_sm4_with};
use crate::purse::{Asn, TerminalId, TxDateTime, TxType};

/// The purse algorithm identifier returned by INITIALIZE (spec §1.5, §7.2).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
pub enum PurseAlgorithm {
    /// Double-length triple DES with single-DES session keys.
    Tdes = 0x00,
    /// SM4 (国密) with SM4 session keys.
    Sm4 = 0x04,
}

impl PurseAlgorithm {
    pub const fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<PurseAlgorithm> {
        match code {
            0x00 => Some(PurseAlgorithm::Tdes),
            0x04 => Some(PurseAlgorithm::Sm4),
            _ => None,
        }
    }
}

/// A 16-byte purse key (master key or diversified card key) of a given algorithm.
#[derive(Clone, Debug)]
pub enum PurseKey {
    Tdes(Tdes2Key),
    Sm4(Sm4Key),
}

impl PurseKey {
    pub fn new(algorithm: PurseAlgorithm, bytes: [u8; 16]) -> PurseKey {
        match algorithm {
            PurseAlgorithm::Tdes => PurseKey::Tdes(Tdes2Key::from_bytes(bytes)),
            PurseAlgorithm::Sm4 => PurseKey::Sm4(Sm4Key::from_bytes(bytes)),
        }
    }

    pub fn algorithm(&self) -> PurseAlgorithm {
        match self {
            PurseKey::Tdes(_) => PurseAlgorithm::Tdes,
            PurseKey::Sm4(_) => PurseAlgorithm::Sm4,
        }
    }

    /// The key in clear. Named so that every use stands out in review.
    pub fn expose_bytes(&self) -> &[u8; 16] {
        match self {
            PurseKey::Tdes(k) => k.expose_bytes(),
            PurseKey::Sm4(k) => k.expose_bytes(),
        }
    }

    /// The key check value (leftmost 4 bytes of the encryption of a zero block).
    pub fn check_value(&self) -> [u8; 4] {
        match self {
            PurseKey::Tdes(k) => k.check_value(),
            PurseKey::Sm4(k) => k.check_value(),
        }
    }

    /// One level of diversification (分散) with an 8-byte factor.
    pub fn diversify(&self, factor: &[u8; 8]) -> PurseKey {
        self.prepare().diversify(factor)
    }

    /// The card key for a card: the master diversified by each higher-level factor in the
    /// order given (issuer or city first), then by the card's ASN (spec §7.1). With no
    /// higher-level factor this is the usual one-level diversification.
    pub fn derive_card_key(&self, higher_factors: &[[u8; 8]], asn: &Asn) -> PurseKey {
        self.prepare().derive_card_key(higher_factors, asn)
    }

    /// The key with its cipher key schedule computed once, for deriving many card keys from
    /// one master (TAC verification of a batch of offline records).
    pub fn prepare(&self) -> PreparedPurseKey {
        PreparedPurseKey(match self {
            PurseKey::Tdes(k) => Prepared::Tdes(k.cipher()),
            PurseKey::Sm4(k) => Prepared::Sm4(k.cipher()),
        })
    }

    /// Encrypts an 8-byte session-key input into a session key.
    fn session_key(&self, input: [u8; 8]) -> MacKey {
        match self {
            PurseKey::Tdes(k) => MacKey::Des(DesKey::from_bytes(k.encrypt_block(input))),
            PurseKey::Sm4(k) => {
                let mut block = [0u8; 16];
                block[..8].copy_from_slice(&input);
                block[8..].copy_from_slice(&input.map(|b| !b));
                MacKey::Sm4(Sm4Key::from_bytes(k.encrypt_block(block)))
            }
        }
    }

    /// The load session key SESLK from this DLK: `E_DLK(random ‖ onlineCounter ‖ 80 00)`.
    pub fn load_session_key(&self, random: [u8; 4], online_counter: u16) -> MacKey {
        self.session_key(load_session_input(random, online_counter))
    }

    /// The purchase session key SESPK from this DPK:
    /// `E_DPK(random ‖ offlineCounter ‖ rightmost 2 bytes of the TTC)`.
    pub fn purchase_session_key(&self, random: [u8; 4], offline_counter: u16, ttc: u32) -> MacKey {
        self.session_key(purchase_session_input(random, offline_counter, ttc))
    }

    /// The TAC key from this DTK: `DTK_L ⊕ DTK_R` for 3DES; the DTK itself for SM4.
    pub fn tac_key(&self) -> MacKey {
        match self {
            PurseKey::Tdes(k) => MacKey::Des(k.fold()),
            PurseKey::Sm4(k) => MacKey::Sm4(k.clone()),
        }
    }
}

/// A purse master key with its key schedule ready; zeroised on drop by the cipher crates.
pub struct PreparedPurseKey(Prepared);

enum Prepared {
    Tdes(TdesEde2),
    Sm4(Sm4),
}

impl fmt::Debug for PreparedPurseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PreparedPurseKey(<redacted>)")
    }
}

impl PreparedPurseKey {
    /// One level of diversification: `E_MK(F) ‖ E_MK(~F)` (3DES) or `SM4_MK(F ‖ ~F)`.
    pub fn diversify(&self, factor: &[u8; 8]) -> PurseKey {
        let not_factor = factor.map(|b| !b);
        match &self.0 {
            Prepared::Tdes(cipher) => {
                let mut out = [0u8; 16];
                for (half, input) in out.chunks_exact_mut(8).zip([factor, &not_factor]) {
                    let mut b = Array::from(*input);
                    cipher.encrypt_block(&mut b);
                    half.copy_from_slice(&b);
                }
                PurseKey::Tdes(Tdes2Key::from_bytes(out))
            }
            Prepared::Sm4(cipher) => {
                let mut input = [0u8; 16];
                input[..8].copy_from_slice(factor);
                input[8..].copy_from_slice(&not_factor);
                let mut b = Array::from(input);
                cipher.encrypt_block(&mut b);
                PurseKey::Sm4(Sm4Key::from_bytes(b.into()))
            }
        }
    }

    /// See [`PurseKey::derive_card_key`].
    pub fn derive_card_key(&self, higher_factors: &[[u8; 8]], asn: &Asn) -> PurseKey {
        let factor = asn.diversification_factor();
        match higher_factors.split_first() {
            None => self.diversify(&factor),
            Some((first, rest)) => {
                let mut key = self.diversify(first);
                for f in rest {
                    key = key.diversify(f);
                }
                key.diversify(&factor)
            }
        }
    }
}

fn load_session_input(random: [u8; 4], online_counter: u16) -> [u8; 8] {
    let mut input = [0u8; 8];
    input[..4].copy_from_slice(&random);
    input[4..6].copy_from_slice(&online_counter.to_be_bytes());
    input[6] = 0x80;
    input
}

fn purchase_session_input(random: [u8; 4], offline_counter: u16, ttc: u32) -> [u8; 8] {
    let mut input = [0u8; 8];
    input[..4].copy_from_slice(&random);
    input[4..6].copy_from_slice(&offline_counter.to_be_bytes());
    input[6..].copy_from_slice(&ttc.to_be_bytes()[2..]);
    input
}

/// Anything that makes 4-byte PBOC MACs: a [`MacKey`] or a [`PreparedMacKey`]. The MAC1 /
/// MAC2 / TAC functions take either.
pub trait PbocMac {
    /// The PBOC MAC of `data` (zero IV, padding `80 00..`, leftmost 4 bytes).
    fn pboc_mac(&self, data: &[u8]) -> Mac4;
}

impl PbocMac for MacKey {
    fn pboc_mac(&self, data: &[u8]) -> Mac4 {
        self.mac(data)
    }
}

impl PbocMac for PreparedMacKey {
    fn pboc_mac(&self, data: &[u8]) -> Mac4 {
        self.mac(data)
    }
}

/// A key that makes PBOC MACs: a session key or a TAC key.
#[derive(Clone)]
pub enum MacKey {
    Des(DesKey),
    Sm4(Sm4Key),
}

impl fmt::Debug for MacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MacKey::Des(k) => f.debug_tuple("MacKey::Des").field(k).finish(),
            MacKey::Sm4(k) => f.debug_tuple("MacKey::Sm4").field(k).finish(),
        }
    }
}

impl MacKey {
    /// The PBOC MAC of `data` (zero IV, padding `80 00..`, leftmost 4 bytes).
    pub fn mac(&self, data: &[u8]) -> Mac4 {
        match self {
            MacKey::Des(k) => pboc_mac_des(k, [0; 8], data),
            MacKey::Sm4(k) => pboc_mac_sm4(k, [0; 16], data),
        }
    }

    /// The key in clear. Named so that every use stands out in review.
    pub fn expose_bytes(&self) -> &[u8] {
        match self {
            MacKey::Des(k) => k.expose_bytes(),
            MacKey::Sm4(k) => k.expose_bytes(),
        }
    }

    /// The key with its schedule computed once, for many MACs under one key (a cache of
    /// per-card TAC keys in bulk TAC verification).
    pub fn prepare(&self) -> PreparedMacKey {
        PreparedMacKey(match self {
            MacKey::Des(k) => PreparedMac::Des(k.cipher()),
            MacKey::Sm4(k) => PreparedMac::Sm4(k.cipher()),
        })
    }
}

/// A [`MacKey`] with its key schedule ready; zeroised on drop by the cipher crates.
pub struct PreparedMacKey(PreparedMac);

enum PreparedMac {
    Des(Des),
    Sm4(Sm4),
}

impl fmt::Debug for PreparedMacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PreparedMacKey(<redacted>)")
    }
}

impl PreparedMacKey {
    /// The PBOC MAC of `data`, as [`MacKey::mac`].
    pub fn mac(&self, data: &[u8]) -> Mac4 {
        match &self.0 {
            PreparedMac::Des(c) => pboc_mac_des_with(c, [0; 8], data),
            PreparedMac::Sm4(c) => pboc_mac_sm4_with(c, [0; 16], data),
        }
    }
}

/// Writes byte strings one after the other into a fixed buffer: MAC inputs never allocate.
struct Input<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Input<N> {
    fn new() -> Self {
        Input {
            buf: [0; N],
            len: 0,
        }
    }

    fn put(mut self, bytes: &[u8]) -> Self {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
        self
    }

    fn finish(self) -> [u8; N] {
        assert_eq!(self.len, N, "MAC input layout");
        self.buf
    }
}

/// MAC1 of INITIALIZE FOR LOAD, made by the card, checked by the host:
/// `MAC_SESLK(oldBalance ‖ amount ‖ txType ‖ terminalId)`.
pub fn load_mac1(
    session: &impl PbocMac,
    old_balance_fen: u32,
    amount_fen: u32,
    tx_type: TxType,
    terminal_id: &TerminalId,
) -> Mac4 {
    let data: [u8; 15] = Input::new()
        .put(&old_balance_fen.to_be_bytes())
        .put(&amount_fen.to_be_bytes())
        .put(&[tx_type.code()])
        .put(&terminal_id.to_bytes())
        .finish();
    session.pboc_mac(&data)
}

/// MAC2 of CREDIT FOR LOAD, made by the host (security module), checked by the card:
/// `MAC_SESLK(amount ‖ txType ‖ terminalId ‖ date ‖ time)`.
pub fn load_mac2(
    session: &impl PbocMac,
    amount_fen: u32,
    tx_type: TxType,
    terminal_id: &TerminalId,
    date_time: &TxDateTime,
) -> Mac4 {
    let data: [u8; 18] = Input::new()
        .put(&amount_fen.to_be_bytes())
        .put(&[tx_type.code()])
        .put(&terminal_id.to_bytes())
        .put(&date_time.to_bytes())
        .finish();
    session.pboc_mac(&data)
}

/// The TAC of a load, made by the card:
/// `MAC_TAC(newBalance ‖ onlineCounter ‖ amount ‖ txType ‖ terminalId ‖ date ‖ time)`,
/// where the counter is the one INITIALIZE returned.
pub fn load_tac(
    tac_key: &impl PbocMac,
    new_balance_fen: u32,
    online_counter: u16,
    amount_fen: u32,
    tx_type: TxType,
    terminal_id: &TerminalId,
    date_time: &TxDateTime,
) -> Mac4 {
    let data: [u8; 24] = Input::new()
        .put(&new_balance_fen.to_be_bytes())
        .put(&online_counter.to_be_bytes())
        .put(&amount_fen.to_be_bytes())
        .put(&[tx_type.code()])
        .put(&terminal_id.to_bytes())
        .put(&date_time.to_bytes())
        .finish();
    tac_key.pboc_mac(&data)
}

/// MAC1 of DEBIT FOR PURCHASE, made by the PSAM, checked by the card:
/// `MAC_SESPK(amount ‖ txType ‖ terminalId ‖ date ‖ time)`.
pub fn purchase_mac1(
    session: &impl PbocMac,
    amount_fen: u32,
    tx_type: TxType,
    terminal_id: &TerminalId,
    date_time: &TxDateTime,
) -> Mac4 {
    // The same layout as load MAC2.
    load_mac2(session, amount_fen, tx_type, terminal_id, date_time)
}

/// MAC2 of DEBIT FOR PURCHASE, made by the card, checked by the PSAM: `MAC_SESPK(amount)`.
pub fn purchase_mac2(session: &impl PbocMac, amount_fen: u32) -> Mac4 {
    session.pboc_mac(&amount_fen.to_be_bytes())
}

/// The TAC of a purchase, made by the card, checked by the platform:
/// `MAC_TAC(amount ‖ txType ‖ terminalId ‖ TTC ‖ date ‖ time)`. It covers neither the purse
/// counter nor the balance.
pub fn purchase_tac(
    tac_key: &impl PbocMac,
    amount_fen: u32,
    tx_type: TxType,
    terminal_id: &TerminalId,
    ttc: u32,
    date_time: &TxDateTime,
) -> Mac4 {
    let data: [u8; 22] = Input::new()
        .put(&amount_fen.to_be_bytes())
        .put(&[tx_type.code()])
        .put(&terminal_id.to_bytes())
        .put(&ttc.to_be_bytes())
        .put(&date_time.to_bytes())
        .finish();
    tac_key.pboc_mac(&data)
}
