//! A software PSAM (terminal secure access module): it holds the purchase master keys, knows
//! its terminal number, allocates terminal transaction counters (TTC), makes MAC1 for the
//! card and checks the card's MAC2 (spec §2).
//!
//! Files: MF EF0015 (14 bytes of PSAM public data), MF EF0016 (the 6-byte terminal number),
//! application EF0017 (25 bytes, starting with the purchase key index). Commands: SELECT,
//! READ BINARY, INIT SAM FOR PURCHASE (`80 70`, one to three diversification levels) and
//! CREDIT SAM FOR PURCHASE (`80 72`). The TTC is part of the saved state, so a PSAM file
//! never hands out a TTC twice.
//!
//! Diversification order with several factors (spec §2.2 marks it uncertain, §7.1 settles it): the factors
//! are applied from the last on the wire to the first, so the card ASN (always first) is
//! applied last.

use std::fmt;

use zeroize::Zeroizing;

use crate::apdu::{ApduError, Command, Response, StatusWord};
use crate::codec::{Reader, StateError, Writer};
use crate::commands::{
    CLA_ISO, CLA_PROPRIETARY, FID_MF, INS_CREDIT_SAM_FOR_PURCHASE, INS_INIT_SAM_FOR_PURCHASE,
    INS_READ_BINARY, INS_SELECT, SFI_ISSUER_DATA, SFI_PSAM_APP_DATA, SFI_TERMINAL_ID,
    SamPurchaseInit, SamPurchaseInitResponse,
};
use crate::crypto::{Mac4, MacKey, PurseAlgorithm, PurseKey, purchase_mac1, purchase_mac2};
use crate::purse::{TerminalId, TxType};

/// The most purchase master keys (versions) a PSAM holds.
pub const PSAM_KEYS_MAX: usize = 8;

const STATE_MAGIC: &[u8; 4] = b"OCSP";
const STATE_VERSION: u8 = 1;

/// MF EF0015: PSAM public information (14 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PsamInfo {
    pub serial: [u8; 10],
    pub version: u8,
    pub key_card_type: u8,
    pub issuer_custom: [u8; 2],
}

impl PsamInfo {
    pub fn to_bytes(&self) -> [u8; 14] {
        let mut out = [0u8; 14];
        out[..10].copy_from_slice(&self.serial);
        out[10] = self.version;
        out[11] = self.key_card_type;
        out[12..].copy_from_slice(&self.issuer_custom);
        out
    }

    fn parse(b: &[u8; 14]) -> PsamInfo {
        PsamInfo {
            serial: b[..10].try_into().expect("10"),
            version: b[10],
            key_card_type: b[11],
            issuer_custom: b[12..].try_into().expect("2"),
        }
    }
}

/// Application EF0017 (25 bytes): the purchase key index the terminal sends to the card,
/// then issuer and receiver ids and the validity dates.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PsamAppData {
    pub purchase_key_index: u8,
    pub issuer_id: [u8; 8],
    pub receiver_id: [u8; 8],
    pub start_date: [u8; 4],
    pub expiry_date: [u8; 4],
}

impl PsamAppData {
    pub fn to_bytes(&self) -> [u8; 25] {
        let mut out = [0u8; 25];
        out[0] = self.purchase_key_index;
        out[1..9].copy_from_slice(&self.issuer_id);
        out[9..17].copy_from_slice(&self.receiver_id);
        out[17..21].copy_from_slice(&self.start_date);
        out[21..].copy_from_slice(&self.expiry_date);
        out
    }

    fn parse(b: &[u8; 25]) -> PsamAppData {
        PsamAppData {
            purchase_key_index: b[0],
            issuer_id: b[1..9].try_into().expect("8"),
            receiver_id: b[9..17].try_into().expect("8"),
            start_date: b[17..21].try_into().expect("4"),
            expiry_date: b[21..].try_into().expect("4"),
        }
    }
}

/// A purchase master key and the card key version it serves.
#[derive(Clone, Debug)]
pub struct PsamKey {
    pub version: u8,
    pub master: PurseKey,
}

/// Everything a PSAM is issued with.
#[derive(Clone, Debug)]
pub struct PsamProfile {
    pub info: PsamInfo,
    pub terminal_id: TerminalId,
    pub app_data: PsamAppData,
    /// The FID of the PSAM application DF.
    pub app_fid: u16,
    /// The DF name of the PSAM application.
    pub app_name: Vec<u8>,
    pub purchase_keys: Vec<PsamKey>,
    /// The first TTC the PSAM hands out.
    pub first_ttc: u32,
}

/// Why a PSAM profile was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PsamProfileError {
    NoKeys,
    TooManyKeys,
    DuplicateKeyVersion(u8),
    /// The application name is not 5-16 bytes, or the FID is the MF's.
    Application,
}

impl fmt::Display for PsamProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PsamProfileError::NoKeys => f.write_str("a PSAM needs a purchase master key"),
            PsamProfileError::TooManyKeys => write!(f, "at most {PSAM_KEYS_MAX} keys"),
            PsamProfileError::DuplicateKeyVersion(v) => write!(f, "duplicate key version {v:02X}"),
            PsamProfileError::Application => f.write_str("bad application name or FID"),
        }
    }
}

impl std::error::Error for PsamProfileError {}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Selected {
    Mf,
    App,
}

/// A purchase between 8070 and 8072.
#[derive(Clone, Debug)]
struct Pending {
    session: MacKey,
    amount_fen: u32,
}

/// A software PSAM.
#[derive(Clone, Debug)]
pub struct SoftPsam {
    profile: PsamProfile,
    /// The next TTC to hand out.
    ttc: u32,
    selected: Selected,
    pending: Option<Pending>,
}

type Answer = Result<Response, StatusWord>;

impl SoftPsam {
    pub fn new(profile: PsamProfile) -> Result<SoftPsam, PsamProfileError> {
        check_profile(&profile)?;
        Ok(SoftPsam {
            ttc: profile.first_ttc,
            profile,
            selected: Selected::Mf,
            pending: None,
        })
    }

    pub fn terminal_id(&self) -> TerminalId {
        self.profile.terminal_id
    }

    /// The next TTC the PSAM will hand out.
    pub fn next_ttc(&self) -> u32 {
        self.ttc
    }

    /// Power cycle: forgets the selection and any purchase between 8070 and 8072.
    pub fn reset(&mut self) {
        self.selected = Selected::Mf;
        self.pending = None;
    }

    /// The PSAM's answer to a command APDU. Never panics on any input.
    pub fn transmit(&mut self, apdu: &[u8]) -> Response {
        let pending = self.pending.take();
        let command = match Command::parse(apdu) {
            Ok(c) => c,
            Err(e) => return Response::status(ApduError::status_word(e)),
        };
        self.dispatch(&command, pending)
            .unwrap_or_else(Response::status)
    }

    fn dispatch(&mut self, c: &Command<'_>, pending: Option<Pending>) -> Answer {
        let expected_cla = match c.ins() {
            INS_SELECT | INS_READ_BINARY => CLA_ISO,
            INS_INIT_SAM_FOR_PURCHASE | INS_CREDIT_SAM_FOR_PURCHASE => CLA_PROPRIETARY,
            _ if c.cla() == CLA_ISO || c.cla() == CLA_PROPRIETARY => {
                return Err(StatusWord::InsNotSupported);
            }
            _ => return Err(StatusWord::ClaNotSupported),
        };
        if c.cla() != expected_cla {
            return Err(StatusWord::ClaNotSupported);
        }
        match c.ins() {
            INS_SELECT => self.select(c),
            INS_READ_BINARY => self.read_binary(c),
            INS_INIT_SAM_FOR_PURCHASE => self.init_for_purchase(c),
            INS_CREDIT_SAM_FOR_PURCHASE => credit_for_purchase(c, pending),
            _ => Err(StatusWord::InsNotSupported),
        }
    }

    fn select(&mut self, c: &Command<'_>) -> Answer {
        if !matches!(c.p2(), 0x00 | 0x0C) {
            return Err(StatusWord::WrongP1P2);
        }
        self.selected = match c.p1() {
            0x00 => {
                let fid: [u8; 2] = c.data().try_into().map_err(|_| StatusWord::WrongLength)?;
                match u16::from_be_bytes(fid) {
                    FID_MF => Selected::Mf,
                    fid if fid == self.profile.app_fid => Selected::App,
                    _ => return Err(StatusWord::FileNotFound),
                }
            }
            0x04 if c.data().is_empty() => return Err(StatusWord::WrongLength),
            0x04 if c.data() == self.profile.app_name.as_slice() => Selected::App,
            0x04 => return Err(StatusWord::FileNotFound),
            _ => return Err(StatusWord::WrongP1P2),
        };
        Ok(Response::ok(Vec::new()))
    }

    fn read_binary(&self, c: &Command<'_>) -> Answer {
        if !c.data().is_empty() {
            return Err(StatusWord::WrongLength);
        }
        if c.p1() & 0xE0 != 0x80 {
            // Only reads by short file identifier are supported.
            return Err(StatusWord::WrongP1P2);
        }
        let file: Vec<u8> = match c.p1() & 0x1F {
            SFI_ISSUER_DATA => self.profile.info.to_bytes().to_vec(),
            SFI_TERMINAL_ID => self.profile.terminal_id.to_bytes().to_vec(),
            SFI_PSAM_APP_DATA if self.selected == Selected::App => {
                self.profile.app_data.to_bytes().to_vec()
            }
            _ => return Err(StatusWord::FileNotFound),
        };
        let offset = usize::from(c.p2());
        let le = usize::from(c.le().ok_or(StatusWord::WrongLength)?);
        let rest = file
            .get(offset..)
            .filter(|r| !r.is_empty())
            .ok_or(StatusWord::WrongOffset)?;
        let n = if le == 256 { rest.len() } else { le };
        if n > rest.len() {
            return Err(StatusWord::WrongLength);
        }
        Ok(Response::ok(rest[..n].to_vec()))
    }

    fn init_for_purchase(&mut self, c: &Command<'_>) -> Answer {
        if c.p1() != 0 || c.p2() != 0 {
            return Err(StatusWord::WrongP1P2);
        }
        let init = SamPurchaseInit::parse(c.data()).map_err(|_| StatusWord::WrongLength)?;
        if !matches!(c.le(), None | Some(8) | Some(256)) {
            return Err(StatusWord::WrongLength);
        }
        if self.selected != Selected::App {
            return Err(StatusWord::ConditionsNotSatisfied);
        }
        let tx_type = match TxType::from_code(init.tx_type) {
            Ok(t @ (TxType::EpPurchase | TxType::CappPurchase)) => t,
            _ => return Err(StatusWord::WrongData),
        };
        let key = self
            .profile
            .purchase_keys
            .iter()
            .find(|k| k.version == init.key_version)
            .ok_or(StatusWord::KeyIndexNotSupported)?;
        if PurseAlgorithm::from_code(init.algorithm_id) != Some(key.master.algorithm()) {
            return Err(StatusWord::KeyIndexNotSupported);
        }
        let ttc = self.ttc;
        let next_ttc = ttc
            .checked_add(1)
            .ok_or(StatusWord::ConditionsNotSatisfied)?;
        // Higher-level factors apply from the last on the wire to the first; the card factor,
        // first on the wire, applies last.
        let mut dpk = key.master.clone();
        for factor in init.higher_factors().iter().rev() {
            dpk = dpk.diversify(factor);
        }
        let dpk = dpk.diversify(&init.card_factor);
        let session = dpk.purchase_session_key(init.card_random, init.offline_counter, ttc);
        let mac1 = purchase_mac1(
            &session,
            init.amount_fen,
            tx_type,
            &self.profile.terminal_id,
            &init.date_time,
        );
        self.ttc = next_ttc;
        self.pending = Some(Pending {
            session,
            amount_fen: init.amount_fen,
        });
        Ok(Response::ok(
            SamPurchaseInitResponse { ttc, mac1 }.to_bytes().to_vec(),
        ))
    }

    /// Saves the persistent state (profile and next TTC). It holds master keys in clear, as a
    /// real PSAM's memory does: treat the bytes as a secret.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let p = &self.profile;
        let mut w = Writer::new(STATE_MAGIC, STATE_VERSION);
        w.bytes(&p.info.to_bytes());
        w.bytes(&p.terminal_id.to_bytes());
        w.bytes(&p.app_data.to_bytes());
        w.u16(p.app_fid);
        w.u8(p.app_name.len() as u8);
        w.bytes(&p.app_name);
        w.u8(p.purchase_keys.len() as u8);
        for k in &p.purchase_keys {
            w.u8(k.version);
            w.u8(k.master.algorithm().code());
            w.bytes(k.master.expose_bytes());
        }
        w.u32(p.first_ttc);
        w.u32(self.ttc);
        w.finish()
    }

    /// Loads a state saved by [`SoftPsam::to_bytes`], checking every field.
    pub fn from_bytes(bytes: &[u8]) -> Result<SoftPsam, StateError> {
        let mut r = Reader::open(bytes, STATE_MAGIC, STATE_VERSION)?;
        let info = PsamInfo::parse(&r.array()?);
        let terminal_id = TerminalId::new(r.array()?);
        let app_data = PsamAppData::parse(&r.array()?);
        let app_fid = r.u16()?;
        let name_len = usize::from(r.u8()?);
        let mut app_name = Vec::with_capacity(name_len);
        for _ in 0..name_len {
            app_name.push(r.u8()?);
        }
        let n = usize::from(r.u8()?);
        let mut purchase_keys = Vec::with_capacity(n.min(PSAM_KEYS_MAX));
        for _ in 0..n {
            let version = r.u8()?;
            let algorithm =
                PurseAlgorithm::from_code(r.u8()?).ok_or(StateError::Invalid("key algorithm"))?;
            let bytes = Zeroizing::new(r.array::<16>()?);
            purchase_keys.push(PsamKey {
                version,
                master: PurseKey::new(algorithm, *bytes),
            });
        }
        let first_ttc = r.u32()?;
        let ttc = r.u32()?;
        r.finish()?;
        let profile = PsamProfile {
            info,
            terminal_id,
            app_data,
            app_fid,
            app_name,
            purchase_keys,
            first_ttc,
        };
        check_profile(&profile).map_err(|_| StateError::Invalid("PSAM profile"))?;
        if ttc < first_ttc {
            return Err(StateError::Invalid("TTC before the first TTC"));
        }
        Ok(SoftPsam {
            profile,
            ttc,
            selected: Selected::Mf,
            pending: None,
        })
    }
}

fn credit_for_purchase(c: &Command<'_>, pending: Option<Pending>) -> Answer {
    if c.p1() != 0 || c.p2() != 0 {
        return Err(StatusWord::WrongP1P2);
    }
    let mac2: [u8; 4] = c.data().try_into().map_err(|_| StatusWord::WrongLength)?;
    let pending = pending.ok_or(StatusWord::ConditionsNotSatisfied)?;
    let expected = purchase_mac2(&pending.session, pending.amount_fen);
    if expected.verify(&Mac4::new(mac2)) {
        Ok(Response::ok(Vec::new()))
    } else {
        Err(StatusWord::MacInvalid)
    }
}

fn check_profile(p: &PsamProfile) -> Result<(), PsamProfileError> {
    if p.purchase_keys.is_empty() {
        return Err(PsamProfileError::NoKeys);
    }
    if p.purchase_keys.len() > PSAM_KEYS_MAX {
        return Err(PsamProfileError::TooManyKeys);
    }
    for (i, k) in p.purchase_keys.iter().enumerate() {
        if p.purchase_keys[..i].iter().any(|o| o.version == k.version) {
            return Err(PsamProfileError::DuplicateKeyVersion(k.version));
        }
    }
    if !(5..=16).contains(&p.app_name.len()) || p.app_fid == FID_MF {
        return Err(PsamProfileError::Application);
    }
    Ok(())
}
