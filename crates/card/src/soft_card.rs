//! A software CPU card that answers APDUs like a PBOC electronic-purse (EP) card.
//!
//! It holds what a real card holds (EF0015, the purse, the counters, the EF0018 records, the
//! keys, the PIN) and follows the state rules of spec §1.10:
//! - an INITIALIZE opens one pending context; only the matching CREDIT or DEBIT consumes it,
//!   and any other command, a malformed APDU, a reset or a MAC failure clears it;
//! - balance, counter, detail record and the transaction proof change together or not at all
//!   (the new values are computed first, then assigned with nothing fallible in between);
//! - counters never wrap: a purse whose counter reached `FFFF` refuses new transactions of
//!   that family with `9303`.
//!
//! Personalisation is a Rust API ([`SoftCard::personalise`]), not APDUs. Randomness comes
//! from a [`RandomSource`] the caller passes to [`SoftCard::transmit`]. The state saves to
//! bytes ([`SoftCard::to_bytes`]) and loads back ([`SoftCard::from_bytes`]); volatile state
//! (selection, pending context, PIN status) is not saved, as a real card loses it on power-off.
//!
//! For tests of recovery and of the platform's defences it can tear (lose the answer before
//! or after committing, [`SoftCard::arm_tear`]) and misbehave ([`Misbehaviour`],
//! [`SoftCard::tamper_balance`]). Only EP is modelled; ED (P2 `01`) answers `6A81`.

use std::collections::VecDeque;
use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::apdu::{ApduError, Command, Response, StatusWord};
use crate::codec::{Reader, StateError, Writer};
use crate::commands::{
    CLA_ISO, CLA_PROPRIETARY, EP_ADF_AID, FID_MF, INS_CREDIT_FOR_LOAD, INS_DEBIT_FOR_PURCHASE,
    INS_GET_BALANCE, INS_GET_CHALLENGE, INS_GET_TRANSACTION_PROVE, INS_INITIALIZE, INS_READ_BINARY,
    INS_READ_RECORD, INS_SELECT, INS_VERIFY, LoadInitResponse, P1_INIT_LOAD, P1_INIT_PURCHASE,
    P2_ED, P2_EP, PSE_NAME, PurchaseInitResponse, SFI_ISSUER_DATA, SFI_RECORDS, TransactionProof,
};
use crate::crypto::{
    Mac4, MacKey, Pin, PurseAlgorithm, PurseKey, load_mac1, load_mac2, load_tac, purchase_mac1,
    purchase_mac2, purchase_tac,
};
use crate::purse::{IssuerData, TerminalId, TransactionRecord, TxDateTime, TxType};
use crate::random::RandomSource;

/// The most EF0018 records a card keeps (READ RECORD numbers records with one byte).
pub const RECORDS_MAX: u8 = 100;
/// The most keys of one usage (load or purchase) a card holds.
pub const KEYS_PER_USAGE_MAX: usize = 8;
/// The most PIN tries a card can be personalised with (the count travels in one nibble).
pub const PIN_TRIES_MAX: u8 = 15;

const STATE_MAGIC: &[u8; 4] = b"OCSC";
const STATE_VERSION: u8 = 1;
/// FID of EF0015 inside the ADF.
const FID_EF0015: u16 = 0x0015;
/// FID of EF0018 inside the ADF.
const FID_EF0018: u16 = 0x0018;

/// A purse key held by the card, with the identifiers INITIALIZE uses.
#[derive(Clone, Debug)]
pub struct CardKey {
    /// The key index the terminal names in INITIALIZE (密钥索引).
    pub index: u8,
    /// The key version the card returns, which tells the host which master to use.
    pub version: u8,
    pub key: PurseKey,
}

/// The DTK, the card's internal key for TAC. A card has one; its version tells the platform
/// which TAC master key to derive it from.
#[derive(Clone, Debug)]
pub struct TacKey {
    pub version: u8,
    pub key: PurseKey,
}

/// Everything written into a card at issuance.
#[derive(Clone, Debug)]
pub struct Personalisation {
    pub issuer_data: IssuerData,
    /// The FID the EP ADF answers to (`1001` or `3F01` on real cards).
    pub adf_fid: u16,
    /// DLKs, by key index.
    pub load_keys: Vec<CardKey>,
    /// DPKs, by key index.
    pub purchase_keys: Vec<CardKey>,
    pub tac_key: TacKey,
    pub pin: Pin,
    pub pin_tries_max: u8,
    /// A load that would take the balance above this is refused with `6985` (spec §7.6).
    pub balance_max_fen: u32,
    /// How many EF0018 records the cyclic file keeps, 1..=[`RECORDS_MAX`].
    pub record_capacity: u8,
}

/// Why a personalisation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersonaliseError {
    /// No DLK or no DPK.
    MissingKeys,
    /// More than [`KEYS_PER_USAGE_MAX`] keys of one usage.
    TooManyKeys,
    /// Two keys of one usage share a key index.
    DuplicateKeyIndex(u8),
    /// `pin_tries_max` outside 1..=[`PIN_TRIES_MAX`].
    PinTries,
    /// `record_capacity` outside 1..=[`RECORDS_MAX`].
    RecordCapacity,
    /// The ADF FID collides with the MF or an EF.
    AdfFid,
}

impl fmt::Display for PersonaliseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PersonaliseError::MissingKeys => f.write_str("a card needs a load and a purchase key"),
            PersonaliseError::TooManyKeys => {
                write!(f, "at most {KEYS_PER_USAGE_MAX} keys of one usage")
            }
            PersonaliseError::DuplicateKeyIndex(i) => write!(f, "duplicate key index {i:02X}"),
            PersonaliseError::PinTries => write!(f, "PIN tries must be 1 to {PIN_TRIES_MAX}"),
            PersonaliseError::RecordCapacity => {
                write!(f, "record capacity must be 1 to {RECORDS_MAX}")
            }
            PersonaliseError::AdfFid => f.write_str("ADF FID collides with the MF or an EF"),
        }
    }
}

impl std::error::Error for PersonaliseError {}

/// Ways the card lies, for tests of the platform's defences. A real card cannot be made to do
/// these without its keys or its chip being compromised.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Misbehaviour {
    /// MAC1 of INITIALIZE FOR LOAD and MAC2 of DEBIT FOR PURCHASE are wrong.
    pub forge_mac: bool,
    /// Every TAC is wrong.
    pub forge_tac: bool,
    /// Counters never advance, so every transaction reuses the same counter.
    pub replay_counter: bool,
}

impl Misbehaviour {
    fn to_byte(self) -> u8 {
        u8::from(self.forge_mac)
            | u8::from(self.forge_tac) << 1
            | u8::from(self.replay_counter) << 2
    }

    fn from_byte(b: u8) -> Result<Misbehaviour, StateError> {
        if b & !0b111 != 0 {
            return Err(StateError::Invalid("misbehaviour flags"));
        }
        Ok(Misbehaviour {
            forge_mac: b & 1 != 0,
            forge_tac: b & 2 != 0,
            replay_counter: b & 4 != 0,
        })
    }

    fn mac(self, mac: Mac4) -> Mac4 {
        if self.forge_mac { forge(mac) } else { mac }
    }

    fn tac(self, tac: Mac4) -> Mac4 {
        if self.forge_tac { forge(tac) } else { tac }
    }
}

fn forge(mac: Mac4) -> Mac4 {
    Mac4::new(mac.to_bytes().map(|b| !b))
}

/// Where a tear cuts the next CREDIT FOR LOAD or DEBIT FOR PURCHASE whose MAC checks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TearPoint {
    /// Power is lost before anything is written: the transaction did not happen.
    BeforeCommit,
    /// Power is lost after the commit, before the answer: the purse changed but the terminal
    /// never hears of it, and must use GET TRANSACTION PROVE.
    AfterCommit,
}

/// The card lost power before answering; its volatile state is gone (as after a reset).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Torn;

impl fmt::Display for Torn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("card lost power before answering")
    }
}

impl std::error::Error for Torn {}

/// The MAC and TAC of the last completed transaction of one family, kept for GET
/// TRANSACTION PROVE.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Proof {
    counter: u16,
    mac: Mac4,
    tac: Mac4,
}

/// The purse: balance and its two counters.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Purse {
    balance_fen: u32,
    online_counter: u16,
    offline_counter: u16,
}

/// What the card keeps across power-off.
#[derive(Clone, Debug)]
struct Persistent {
    issuer_data: IssuerData,
    adf_fid: u16,
    load_keys: Vec<CardKey>,
    purchase_keys: Vec<CardKey>,
    tac_key: TacKey,
    pin: Pin,
    pin_tries_left: u8,
    pin_tries_max: u8,
    balance_max_fen: u32,
    purse: Purse,
    record_capacity: u8,
    /// Newest first: record 1 is the most recent.
    records: VecDeque<TransactionRecord>,
    last_load: Option<Proof>,
    last_purchase: Option<Proof>,
    misbehaviour: Misbehaviour,
}

/// The current directory and elementary file.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Selected {
    Mf,
    Adf,
    Ef0015,
    Ef0018,
}

impl Selected {
    fn in_adf(self) -> bool {
        matches!(self, Selected::Adf | Selected::Ef0015 | Selected::Ef0018)
    }
}

/// An INITIALIZE waiting for its CREDIT or DEBIT.
#[derive(Clone, Debug)]
enum Pending {
    Load {
        session: MacKey,
        amount_fen: u32,
        terminal_id: TerminalId,
        counter: u16,
    },
    Purchase {
        key: PurseKey,
        random: [u8; 4],
        amount_fen: u32,
        terminal_id: TerminalId,
        counter: u16,
    },
}

/// A software PBOC EP card.
#[derive(Clone, Debug)]
pub struct SoftCard {
    state: Persistent,
    selected: Selected,
    pending: Option<Pending>,
    pin_verified: bool,
    tear: Option<TearPoint>,
}

type Answer = Result<Response, StatusWord>;

impl SoftCard {
    /// Issues a card: an empty purse with both counters at zero and no records.
    pub fn personalise(p: Personalisation) -> Result<SoftCard, PersonaliseError> {
        check_keys(&p.load_keys)?;
        check_keys(&p.purchase_keys)?;
        if !(1..=PIN_TRIES_MAX).contains(&p.pin_tries_max) {
            return Err(PersonaliseError::PinTries);
        }
        if !(1..=RECORDS_MAX).contains(&p.record_capacity) {
            return Err(PersonaliseError::RecordCapacity);
        }
        if [FID_MF, FID_EF0015, FID_EF0018].contains(&p.adf_fid) {
            return Err(PersonaliseError::AdfFid);
        }
        Ok(SoftCard::from_state(Persistent {
            issuer_data: p.issuer_data,
            adf_fid: p.adf_fid,
            load_keys: p.load_keys,
            purchase_keys: p.purchase_keys,
            tac_key: p.tac_key,
            pin: p.pin,
            pin_tries_left: p.pin_tries_max,
            pin_tries_max: p.pin_tries_max,
            balance_max_fen: p.balance_max_fen,
            purse: Purse {
                balance_fen: 0,
                online_counter: 0,
                offline_counter: 0,
            },
            record_capacity: p.record_capacity,
            records: VecDeque::new(),
            last_load: None,
            last_purchase: None,
            misbehaviour: Misbehaviour::default(),
        }))
    }

    fn from_state(state: Persistent) -> SoftCard {
        SoftCard {
            state,
            selected: Selected::Mf,
            pending: None,
            pin_verified: false,
            tear: None,
        }
    }

    /// The card's answer to a command APDU. Never panics on any input.
    ///
    /// Returns [`Torn`] instead of an answer when an armed tear fires; the volatile state is
    /// then reset as after a power cycle.
    pub fn transmit(
        &mut self,
        apdu: &[u8],
        random: &mut dyn RandomSource,
    ) -> Result<Response, Torn> {
        // Any command other than the matching completion clears the pending context, so take
        // it now and hand it only to CREDIT and DEBIT.
        let pending = self.pending.take();
        let command = match Command::parse(apdu) {
            Ok(c) => c,
            Err(e) => return Ok(Response::status(ApduError::status_word(e))),
        };
        let answer = match self.dispatch(&command, pending, random) {
            Ok(answer) => answer,
            Err(Torn) => {
                self.reset();
                return Err(Torn);
            }
        };
        Ok(answer.unwrap_or_else(Response::status))
    }

    /// Power cycle: forgets the selection, the pending context and the PIN status.
    pub fn reset(&mut self) {
        self.selected = Selected::Mf;
        self.pending = None;
        self.pin_verified = false;
    }

    /// The answer-to-reset bytes a reader would see (T=1, no historical meaning).
    pub fn atr(&self) -> &'static [u8] {
        // TS, T0 (TD1 and 10 historical bytes), TD1 (T=0, TD2), TD2 (T=1), "ONECARD-EP",
        // and TCK, the XOR of T0 to the last historical byte.
        &[
            0x3B, 0x8A, 0x80, 0x01, b'O', b'N', b'E', b'C', b'A', b'R', b'D', b'-', b'E', b'P',
            0x63,
        ]
    }

    /// Makes the next CREDIT FOR LOAD or DEBIT FOR PURCHASE whose MAC checks lose power at
    /// `point`. One-shot.
    pub fn arm_tear(&mut self, point: TearPoint) {
        self.tear = Some(point);
    }

    pub fn set_misbehaviour(&mut self, m: Misbehaviour) {
        self.state.misbehaviour = m;
    }

    pub fn misbehaviour(&self) -> Misbehaviour {
        self.state.misbehaviour
    }

    /// Overwrites the balance without a record, as a card whose memory was tampered with.
    pub fn tamper_balance(&mut self, balance_fen: u32) {
        self.state.purse.balance_fen = balance_fen;
    }

    pub fn issuer_data(&self) -> &IssuerData {
        &self.state.issuer_data
    }

    pub fn balance_fen(&self) -> u32 {
        self.state.purse.balance_fen
    }

    pub fn online_counter(&self) -> u16 {
        self.state.purse.online_counter
    }

    pub fn offline_counter(&self) -> u16 {
        self.state.purse.offline_counter
    }

    pub fn balance_max_fen(&self) -> u32 {
        self.state.balance_max_fen
    }

    /// EF0018, newest first.
    pub fn records(&self) -> impl ExactSizeIterator<Item = &TransactionRecord> {
        self.state.records.iter()
    }

    pub fn pin_tries_left(&self) -> u8 {
        self.state.pin_tries_left
    }

    /// Sets both counters, for tests of the counter limit. Not reachable through APDUs.
    pub fn set_counters_for_test(&mut self, online_counter: u16, offline_counter: u16) {
        self.state.purse.online_counter = online_counter;
        self.state.purse.offline_counter = offline_counter;
    }

    fn dispatch(
        &mut self,
        c: &Command<'_>,
        pending: Option<Pending>,
        random: &mut dyn RandomSource,
    ) -> Result<Answer, Torn> {
        let expected_cla = match c.ins() {
            INS_SELECT | INS_READ_BINARY | INS_READ_RECORD | INS_VERIFY | INS_GET_CHALLENGE => {
                CLA_ISO
            }
            INS_GET_BALANCE
            | INS_INITIALIZE
            | INS_CREDIT_FOR_LOAD
            | INS_DEBIT_FOR_PURCHASE
            | INS_GET_TRANSACTION_PROVE => CLA_PROPRIETARY,
            _ => {
                let cla_known = c.cla() == CLA_ISO || c.cla() == CLA_PROPRIETARY;
                return Ok(Err(if cla_known {
                    StatusWord::InsNotSupported
                } else {
                    StatusWord::ClaNotSupported
                }));
            }
        };
        if c.cla() != expected_cla {
            return Ok(Err(StatusWord::ClaNotSupported));
        }
        Ok(match c.ins() {
            INS_SELECT => self.select(c),
            INS_READ_BINARY => self.read_binary(c),
            INS_READ_RECORD => self.read_record(c),
            INS_VERIFY => self.verify(c),
            INS_GET_CHALLENGE => get_challenge(c, random),
            INS_GET_BALANCE => self.get_balance(c),
            INS_INITIALIZE => self.initialize(c, random),
            INS_CREDIT_FOR_LOAD => return self.credit_for_load(c, pending),
            INS_DEBIT_FOR_PURCHASE => return self.debit_for_purchase(c, pending),
            INS_GET_TRANSACTION_PROVE => self.get_transaction_prove(c),
            _ => Err(StatusWord::InsNotSupported),
        })
    }

    fn select(&mut self, c: &Command<'_>) -> Answer {
        if !matches!(c.p2(), 0x00 | 0x0C) {
            return Err(StatusWord::WrongP1P2);
        }
        let with_fci = c.p2() == 0x00;
        let target = match c.p1() {
            0x00 => {
                let fid: [u8; 2] = c.data().try_into().map_err(|_| StatusWord::WrongLength)?;
                match u16::from_be_bytes(fid) {
                    FID_MF => Selected::Mf,
                    fid if fid == self.state.adf_fid => Selected::Adf,
                    FID_EF0015 if self.selected.in_adf() => Selected::Ef0015,
                    FID_EF0018 if self.selected.in_adf() => Selected::Ef0018,
                    _ => return Err(StatusWord::FileNotFound),
                }
            }
            0x04 => match c.data() {
                [] => return Err(StatusWord::WrongLength),
                name if name == EP_ADF_AID => Selected::Adf,
                name if name == PSE_NAME => Selected::Mf,
                _ => return Err(StatusWord::FileNotFound),
            },
            _ => return Err(StatusWord::WrongP1P2),
        };
        let changes_df = matches!(target, Selected::Mf | Selected::Adf);
        if changes_df {
            // A new DF resets its security status.
            self.pin_verified = false;
        }
        self.selected = target;
        let data = match target {
            Selected::Mf if with_fci => fci(PSE_NAME),
            Selected::Adf if with_fci => fci(&EP_ADF_AID),
            _ => Vec::new(),
        };
        Ok(Response::ok(data))
    }

    fn read_binary(&self, c: &Command<'_>) -> Answer {
        if !c.data().is_empty() {
            return Err(StatusWord::WrongLength);
        }
        let offset = if c.p1() & 0x80 != 0 {
            if c.p1() & 0x60 != 0 {
                return Err(StatusWord::WrongP1P2);
            }
            if c.p1() & 0x1F != SFI_ISSUER_DATA || !self.selected.in_adf() {
                return Err(StatusWord::FileNotFound);
            }
            usize::from(c.p2())
        } else {
            if self.selected != Selected::Ef0015 {
                return Err(StatusWord::ConditionsNotSatisfied);
            }
            usize::from(u16::from_be_bytes([c.p1(), c.p2()]))
        };
        let file = self.state.issuer_data.to_bytes();
        let le = usize::from(c.le().ok_or(StatusWord::WrongLength)?);
        let available = file.get(offset..).filter(|rest| !rest.is_empty());
        let rest = available.ok_or(StatusWord::WrongOffset)?;
        let n = if le == 256 { rest.len().min(256) } else { le };
        if n > rest.len() {
            return Err(StatusWord::WrongLength);
        }
        Ok(Response::ok(rest[..n].to_vec()))
    }

    fn read_record(&self, c: &Command<'_>) -> Answer {
        if !c.data().is_empty() {
            return Err(StatusWord::WrongLength);
        }
        if c.p2() & 0x07 != 0x04 || c.p1() == 0 {
            return Err(StatusWord::WrongP1P2);
        }
        let sfi = c.p2() >> 3;
        let addressed = match sfi {
            0 => self.selected == Selected::Ef0018,
            SFI_RECORDS => self.selected.in_adf(),
            _ => false,
        };
        if !addressed {
            return Err(if sfi == 0 {
                StatusWord::ConditionsNotSatisfied
            } else {
                StatusWord::FileNotFound
            });
        }
        expect_le(c, TransactionRecord::LEN)?;
        let record = self
            .state
            .records
            .get(usize::from(c.p1()) - 1)
            .ok_or(StatusWord::RecordNotFound)?;
        Ok(Response::ok(record.to_bytes().to_vec()))
    }

    fn verify(&mut self, c: &Command<'_>) -> Answer {
        if c.p1() != 0 || c.p2() != 0 {
            return Err(StatusWord::WrongP1P2);
        }
        if !(2..=6).contains(&c.data().len()) {
            return Err(StatusWord::WrongLength);
        }
        if !self.selected.in_adf() {
            return Err(StatusWord::ConditionsNotSatisfied);
        }
        let s = &mut self.state;
        if s.pin_tries_left == 0 {
            return Err(StatusWord::AuthenticationBlocked);
        }
        let (bcd, len) = s.pin.to_verify_bcd();
        let bcd = Zeroizing::new(bcd);
        let stored = &bcd[..len];
        // Lengths are public (they are the APDU's Lc); the digits are compared in constant time.
        let matches = stored.len() == c.data().len() && bool::from(stored.ct_eq(c.data()));
        if matches {
            s.pin_tries_left = s.pin_tries_max;
            self.pin_verified = true;
            Ok(Response::ok(Vec::new()))
        } else {
            // The failure that uses the last try answers 63C0; from then on the PIN is
            // blocked and every VERIFY answers 6983.
            s.pin_tries_left -= 1;
            self.pin_verified = false;
            Err(StatusWord::WrongPin {
                tries_left: s.pin_tries_left,
            })
        }
    }

    /// Whether VERIFY succeeded since the last reset or DF selection.
    pub fn pin_verified(&self) -> bool {
        self.pin_verified
    }

    fn get_balance(&self, c: &Command<'_>) -> Answer {
        if c.p1() != 0 {
            return Err(StatusWord::WrongP1P2);
        }
        purse_p2(c.p2())?;
        if !c.data().is_empty() {
            return Err(StatusWord::WrongLength);
        }
        expect_le(c, 4)?;
        self.require_adf()?;
        Ok(Response::ok(
            self.state.purse.balance_fen.to_be_bytes().to_vec(),
        ))
    }

    fn initialize(&mut self, c: &Command<'_>, random: &mut dyn RandomSource) -> Answer {
        match c.p1() {
            P1_INIT_LOAD | P1_INIT_PURCHASE => {}
            // Cash withdrawal, CAPP, overdraft update, unload: defined, not on this card.
            0x02..=0x05 => return Err(StatusWord::FunctionNotSupported),
            _ => return Err(StatusWord::WrongP1P2),
        }
        purse_p2(c.p2())?;
        let data: &[u8; 11] = c.data().try_into().map_err(|_| StatusWord::WrongLength)?;
        let is_load = c.p1() == P1_INIT_LOAD;
        expect_le(c, if is_load { 16 } else { 15 })?;
        self.require_adf()?;
        let key_index = data[0];
        let amount_fen = u32::from_be_bytes(data[1..5].try_into().expect("4 bytes"));
        let terminal_id = TerminalId::from_slice(&data[5..]).expect("6 bytes");
        let keys = if is_load {
            &self.state.load_keys
        } else {
            &self.state.purchase_keys
        };
        let card_key = keys
            .iter()
            .find(|k| k.index == key_index)
            .ok_or(StatusWord::KeyIndexNotSupported)?;
        let purse = self.state.purse;
        let mut rnd = [0u8; 4];
        if is_load {
            if purse.online_counter == u16::MAX {
                return Err(StatusWord::PermanentlyLocked);
            }
            let within_max = purse
                .balance_fen
                .checked_add(amount_fen)
                .is_some_and(|b| b <= self.state.balance_max_fen);
            if !within_max {
                return Err(StatusWord::ConditionsNotSatisfied);
            }
            random.fill_bytes(&mut rnd);
            let counter = purse.online_counter;
            let session = card_key.key.load_session_key(rnd, counter);
            let mac1 = load_mac1(
                &session,
                purse.balance_fen,
                amount_fen,
                TxType::EpLoad,
                &terminal_id,
            );
            let answer = LoadInitResponse {
                old_balance_fen: purse.balance_fen,
                online_counter: counter,
                key_version: card_key.version,
                algorithm_id: card_key.key.algorithm().code(),
                random: rnd,
                mac1: self.state.misbehaviour.mac(mac1),
            };
            self.pending = Some(Pending::Load {
                session,
                amount_fen,
                terminal_id,
                counter,
            });
            Ok(Response::ok(answer.to_bytes().to_vec()))
        } else {
            if purse.offline_counter == u16::MAX {
                return Err(StatusWord::PermanentlyLocked);
            }
            if amount_fen > purse.balance_fen {
                return Err(StatusWord::InsufficientBalance);
            }
            random.fill_bytes(&mut rnd);
            let answer = PurchaseInitResponse {
                balance_fen: purse.balance_fen,
                offline_counter: purse.offline_counter,
                overdraft_limit_fen: 0,
                key_version: card_key.version,
                algorithm_id: card_key.key.algorithm().code(),
                random: rnd,
            };
            self.pending = Some(Pending::Purchase {
                key: card_key.key.clone(),
                random: rnd,
                amount_fen,
                terminal_id,
                counter: purse.offline_counter,
            });
            Ok(Response::ok(answer.to_bytes().to_vec()))
        }
    }

    fn credit_for_load(
        &mut self,
        c: &Command<'_>,
        pending: Option<Pending>,
    ) -> Result<Answer, Torn> {
        if c.p1() != 0 || c.p2() != 0 {
            return Ok(Err(StatusWord::WrongP1P2));
        }
        let Ok(data) = <&[u8; 11]>::try_from(c.data()) else {
            return Ok(Err(StatusWord::WrongLength));
        };
        if let Err(sw) = expect_le(c, 4) {
            return Ok(Err(sw));
        }
        let Some(Pending::Load {
            session,
            amount_fen,
            terminal_id,
            counter,
        }) = pending
        else {
            return Ok(Err(StatusWord::ConditionsNotSatisfied));
        };
        let date_time = TxDateTime::from_slice(&data[..7]).expect("7 bytes");
        let received = Mac4::new(data[7..].try_into().expect("4 bytes"));
        let expected = load_mac2(
            &session,
            amount_fen,
            TxType::EpLoad,
            &terminal_id,
            &date_time,
        );
        if !expected.verify(&received) {
            return Ok(Err(StatusWord::MacInvalid));
        }
        let purse = self.state.purse;
        let Some(new_balance) = purse
            .balance_fen
            .checked_add(amount_fen)
            .filter(|b| *b <= self.state.balance_max_fen)
        else {
            return Ok(Err(StatusWord::ConditionsNotSatisfied));
        };
        let record = TransactionRecord::new(
            counter,
            0,
            amount_fen,
            TxType::EpLoad,
            terminal_id,
            date_time,
        )
        .expect("zero overdraft fits");
        let tac_key = self.state.tac_key.key.tac_key();
        let tac = load_tac(
            &tac_key,
            new_balance,
            counter,
            amount_fen,
            TxType::EpLoad,
            &terminal_id,
            &date_time,
        );
        let m = self.state.misbehaviour;
        let proof = Proof {
            counter,
            mac: received,
            tac: m.tac(tac),
        };
        let new_purse = Purse {
            balance_fen: new_balance,
            online_counter: if m.replay_counter {
                counter
            } else {
                counter + 1
            },
            ..purse
        };
        self.commit(new_purse, record, |s| s.last_load = Some(proof))?;
        Ok(Ok(Response::ok(proof.tac.to_bytes().to_vec())))
    }

    fn debit_for_purchase(
        &mut self,
        c: &Command<'_>,
        pending: Option<Pending>,
    ) -> Result<Answer, Torn> {
        if c.p1() != 0x01 || c.p2() != 0 {
            return Ok(Err(StatusWord::WrongP1P2));
        }
        let Ok(data) = <&[u8; 15]>::try_from(c.data()) else {
            return Ok(Err(StatusWord::WrongLength));
        };
        if let Err(sw) = expect_le(c, 8) {
            return Ok(Err(sw));
        }
        let Some(Pending::Purchase {
            key,
            random,
            amount_fen,
            terminal_id,
            counter,
        }) = pending
        else {
            return Ok(Err(StatusWord::ConditionsNotSatisfied));
        };
        let ttc = u32::from_be_bytes(data[..4].try_into().expect("4 bytes"));
        let date_time = TxDateTime::from_slice(&data[4..11]).expect("7 bytes");
        let received = Mac4::new(data[11..].try_into().expect("4 bytes"));
        let session = key.purchase_session_key(random, counter, ttc);
        let expected = purchase_mac1(
            &session,
            amount_fen,
            TxType::EpPurchase,
            &terminal_id,
            &date_time,
        );
        if !expected.verify(&received) {
            return Ok(Err(StatusWord::MacInvalid));
        }
        let purse = self.state.purse;
        let Some(new_balance) = purse.balance_fen.checked_sub(amount_fen) else {
            return Ok(Err(StatusWord::InsufficientBalance));
        };
        let record = TransactionRecord::new(
            counter,
            0,
            amount_fen,
            TxType::EpPurchase,
            terminal_id,
            date_time,
        )
        .expect("zero overdraft fits");
        let tac_key = self.state.tac_key.key.tac_key();
        let tac = purchase_tac(
            &tac_key,
            amount_fen,
            TxType::EpPurchase,
            &terminal_id,
            ttc,
            &date_time,
        );
        let mac2 = purchase_mac2(&session, amount_fen);
        let m = self.state.misbehaviour;
        let proof = Proof {
            counter,
            mac: m.mac(mac2),
            tac: m.tac(tac),
        };
        let new_purse = Purse {
            balance_fen: new_balance,
            offline_counter: if m.replay_counter {
                counter
            } else {
                counter + 1
            },
            ..purse
        };
        self.commit(new_purse, record, |s| s.last_purchase = Some(proof))?;
        let answer = crate::commands::DebitResponse {
            tac: proof.tac,
            mac2: proof.mac,
        };
        Ok(Ok(Response::ok(answer.to_bytes().to_vec())))
    }

    /// Writes the purse, the record and the proof together, honouring an armed tear.
    fn commit(
        &mut self,
        purse: Purse,
        record: TransactionRecord,
        set_proof: impl FnOnce(&mut Persistent),
    ) -> Result<(), Torn> {
        if self.tear == Some(TearPoint::BeforeCommit) {
            self.tear = None;
            return Err(Torn);
        }
        // Everything below is infallible: the commit is all or nothing.
        let s = &mut self.state;
        s.purse = purse;
        if s.records.len() == usize::from(s.record_capacity) {
            s.records.pop_back();
        }
        s.records.push_front(record);
        set_proof(s);
        if self.tear == Some(TearPoint::AfterCommit) {
            self.tear = None;
            return Err(Torn);
        }
        Ok(())
    }

    fn get_transaction_prove(&self, c: &Command<'_>) -> Answer {
        if c.p1() != 0 {
            return Err(StatusWord::WrongP1P2);
        }
        let tx_type = TxType::from_code(c.p2()).map_err(|_| StatusWord::WrongP1P2)?;
        let counter: [u8; 2] = c.data().try_into().map_err(|_| StatusWord::WrongLength)?;
        expect_le(c, 8)?;
        self.require_adf()?;
        let proof = match tx_type {
            TxType::EpLoad => self.state.last_load,
            TxType::EpPurchase => self.state.last_purchase,
            _ => None,
        };
        let counter = u16::from_be_bytes(counter);
        match proof {
            Some(p) if p.counter == counter => Ok(Response::ok(
                TransactionProof {
                    mac: p.mac,
                    tac: p.tac,
                }
                .to_bytes()
                .to_vec(),
            )),
            _ => Err(StatusWord::MacNotAvailable),
        }
    }

    fn require_adf(&self) -> Result<(), StatusWord> {
        if self.selected.in_adf() {
            Ok(())
        } else {
            Err(StatusWord::ConditionsNotSatisfied)
        }
    }

    /// Saves the persistent state. The bytes hold the card's keys in clear, as a real card's
    /// memory does: treat them as a secret. The buffer zeroises on drop.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let s = &self.state;
        let mut w = Writer::new(STATE_MAGIC, STATE_VERSION);
        w.bytes(&s.issuer_data.to_bytes());
        w.u16(s.adf_fid);
        w.u8(s.tac_key.version);
        write_key(&mut w, &s.tac_key.key);
        for keys in [&s.load_keys, &s.purchase_keys] {
            w.u8(keys.len() as u8);
            for k in keys {
                w.u8(k.index);
                w.u8(k.version);
                write_key(&mut w, &k.key);
            }
        }
        let (pin_bcd, pin_bcd_len) = s.pin.to_verify_bcd();
        let pin_bcd = Zeroizing::new(pin_bcd);
        w.bytes(&pin_bcd[..]);
        w.u8(pin_bcd_len as u8);
        w.u8(s.pin_tries_left);
        w.u8(s.pin_tries_max);
        w.u32(s.balance_max_fen);
        w.u32(s.purse.balance_fen);
        w.u16(s.purse.online_counter);
        w.u16(s.purse.offline_counter);
        w.u8(s.record_capacity);
        w.u8(s.records.len() as u8);
        for r in &s.records {
            w.bytes(&r.to_bytes());
        }
        for proof in [&s.last_load, &s.last_purchase] {
            match proof {
                None => w.u8(0),
                Some(p) => {
                    w.u8(1);
                    w.u16(p.counter);
                    w.bytes(&p.mac.to_bytes());
                    w.bytes(&p.tac.to_bytes());
                }
            }
        }
        w.u8(s.misbehaviour.to_byte());
        w.finish()
    }

    /// Loads a state saved by [`SoftCard::to_bytes`], checking every field. The card starts
    /// as after power-on: MF selected, nothing pending, PIN not verified.
    pub fn from_bytes(bytes: &[u8]) -> Result<SoftCard, StateError> {
        let mut r = Reader::open(bytes, STATE_MAGIC, STATE_VERSION)?;
        let issuer_data = IssuerData::parse(&r.array::<30>()?).expect("30 bytes");
        let adf_fid = r.u16()?;
        if [FID_MF, FID_EF0015, FID_EF0018].contains(&adf_fid) {
            return Err(StateError::Invalid("ADF FID"));
        }
        let tac_version = r.u8()?;
        let tac_key = TacKey {
            version: tac_version,
            key: read_key(&mut r)?,
        };
        let mut key_lists = [Vec::new(), Vec::new()];
        for keys in &mut key_lists {
            let n = usize::from(r.u8()?);
            for _ in 0..n {
                let index = r.u8()?;
                let version = r.u8()?;
                let key = read_key(&mut r)?;
                keys.push(CardKey {
                    index,
                    version,
                    key,
                });
            }
            check_keys(keys).map_err(|_| StateError::Invalid("key table"))?;
        }
        let [load_keys, purchase_keys] = key_lists;
        let pin_bcd = Zeroizing::new(r.array::<6>()?);
        let pin_bcd_len = r.u8()?;
        let pin = pin_bcd
            .get(..usize::from(pin_bcd_len))
            .and_then(|bcd| Pin::from_verify_bcd(bcd).ok())
            .ok_or(StateError::Invalid("PIN"))?;
        let pin_tries_left = r.u8()?;
        let pin_tries_max = r.u8()?;
        if !(1..=PIN_TRIES_MAX).contains(&pin_tries_max) || pin_tries_left > pin_tries_max {
            return Err(StateError::Invalid("PIN tries"));
        }
        let balance_max_fen = r.u32()?;
        let purse = Purse {
            balance_fen: r.u32()?,
            online_counter: r.u16()?,
            offline_counter: r.u16()?,
        };
        let record_capacity = r.u8()?;
        let count = r.u8()?;
        if !(1..=RECORDS_MAX).contains(&record_capacity) || count > record_capacity {
            return Err(StateError::Invalid("record count"));
        }
        let mut records = VecDeque::with_capacity(usize::from(record_capacity));
        for _ in 0..count {
            let raw = r.array::<23>()?;
            records.push_back(
                TransactionRecord::parse(&raw).map_err(|_| StateError::Invalid("record"))?,
            );
        }
        let mut proofs = [None, None];
        for proof in &mut proofs {
            *proof = match r.u8()? {
                0 => None,
                1 => Some(Proof {
                    counter: r.u16()?,
                    mac: Mac4::new(r.array()?),
                    tac: Mac4::new(r.array()?),
                }),
                _ => return Err(StateError::Invalid("proof flag")),
            };
        }
        let [last_load, last_purchase] = proofs;
        let misbehaviour = Misbehaviour::from_byte(r.u8()?)?;
        r.finish()?;
        Ok(SoftCard::from_state(Persistent {
            issuer_data,
            adf_fid,
            load_keys,
            purchase_keys,
            tac_key,
            pin,
            pin_tries_left,
            pin_tries_max,
            balance_max_fen,
            purse,
            record_capacity,
            records,
            last_load,
            last_purchase,
            misbehaviour,
        }))
    }
}

fn check_keys(keys: &[CardKey]) -> Result<(), PersonaliseError> {
    if keys.is_empty() {
        return Err(PersonaliseError::MissingKeys);
    }
    if keys.len() > KEYS_PER_USAGE_MAX {
        return Err(PersonaliseError::TooManyKeys);
    }
    for (i, k) in keys.iter().enumerate() {
        if keys[..i].iter().any(|other| other.index == k.index) {
            return Err(PersonaliseError::DuplicateKeyIndex(k.index));
        }
    }
    Ok(())
}

fn write_key(w: &mut Writer, key: &PurseKey) {
    w.u8(key.algorithm().code());
    w.bytes(key.expose_bytes());
}

fn read_key(r: &mut Reader<'_>) -> Result<PurseKey, StateError> {
    let algorithm =
        PurseAlgorithm::from_code(r.u8()?).ok_or(StateError::Invalid("key algorithm"))?;
    let bytes = Zeroizing::new(r.array::<16>()?);
    Ok(PurseKey::new(algorithm, *bytes))
}

/// P2 of purse commands: `02` is the EP; `01` (ED) exists in PBOC but not on this card.
fn purse_p2(p2: u8) -> Result<(), StatusWord> {
    match p2 {
        P2_EP => Ok(()),
        P2_ED => Err(StatusWord::FunctionNotSupported),
        _ => Err(StatusWord::WrongP1P2),
    }
}

/// Le may be absent (T=0 style), the exact length, or `00` (256, "all there is").
fn expect_le(c: &Command<'_>, len: usize) -> Result<(), StatusWord> {
    match c.le() {
        None | Some(256) => Ok(()),
        Some(le) if usize::from(le) == len => Ok(()),
        Some(_) => Err(StatusWord::WrongLength),
    }
}

fn get_challenge(c: &Command<'_>, random: &mut dyn RandomSource) -> Answer {
    if c.p1() != 0 || c.p2() != 0 {
        return Err(StatusWord::WrongP1P2);
    }
    if !c.data().is_empty() {
        return Err(StatusWord::WrongLength);
    }
    let n = match c.le() {
        Some(4) => 4,
        Some(8) => 8,
        _ => return Err(StatusWord::WrongLength),
    };
    let mut challenge = vec![0u8; n];
    random.fill_bytes(&mut challenge);
    Ok(Response::ok(challenge))
}

/// A minimal FCI: `6F L 84 L <name> A5 00`.
fn fci(name: &[u8]) -> Vec<u8> {
    let mut out = vec![0x6F, (name.len() + 4) as u8, 0x84, name.len() as u8];
    out.extend_from_slice(name);
    out.extend_from_slice(&[0xA5, 0x00]);
    out
}
