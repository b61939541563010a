//! Personalising a card from the security module: the card's keys are the master keys of the
//! current versions, diversified by the card's ASN. Today the card is the software card; a
//! real card will take the same `Personalisation` through a card transport.

use anyhow::Context as _;
use card::crypto::Pin;
use card::psam::{PsamAppData, PsamInfo, PsamKey, PsamProfile, SoftPsam};
use card::purse::{Asn, IssuerData, TerminalId};
use card::soft_card::{CardKey, Personalisation, SoftCard, TacKey};

use crate::security::{KeyKind, SecurityModule};

/// The key index cards and PSAMs name in INITIALIZE; one key per usage for now.
pub const KEY_INDEX: u8 = 1;
/// EF0018 records a card keeps (the most a PBOC card has).
pub const RECORD_CAPACITY: u8 = 10;
/// Wrong PINs before a card blocks its PIN.
pub const PIN_TRIES_MAX: u8 = 3;

/// Randomness for a software card serving real terminals (card challenges protect against
/// replayed MACs): the operating system's generator.
#[derive(Debug, Default)]
pub struct OsRandom;

impl card::random::RandomSource for OsRandom {
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        getrandom::fill(dest).expect("the operating system's random generator");
    }
}

/// What the card desk chooses when issuing.
#[derive(Clone)]
pub struct CardProfile {
    /// Eight bytes naming the issuer (the school or city).
    pub issuer_id: [u8; 8],
    /// `YYYYMMDD`.
    pub start_date: String,
    /// `YYYYMMDD`.
    pub expiry_date: String,
    pub balance_max_fen: u32,
    pub pin: String,
}

impl std::fmt::Debug for CardProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CardProfile")
            .field("start_date", &self.start_date)
            .field("expiry_date", &self.expiry_date)
            .field("balance_max_fen", &self.balance_max_fen)
            .field("pin", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// `YYYYMMDD` as four BCD bytes; the error names the field.
pub fn bcd_date(digits: &str, field: &str) -> anyhow::Result<[u8; 4]> {
    let d = digits.as_bytes();
    anyhow::ensure!(
        d.len() == 8 && d.iter().all(u8::is_ascii_digit),
        "{field} {digits:?} must be a date as YYYYMMDD"
    );
    let (month, day) = (&digits[4..6], &digits[6..8]);
    anyhow::ensure!(
        ("01"..="12").contains(&month) && ("01"..="31").contains(&day),
        "{field} {digits:?} is not a calendar date"
    );
    let mut out = [0u8; 4];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = ((d[2 * i] - b'0') << 4) | (d[2 * i + 1] - b'0');
    }
    Ok(out)
}

/// Personalises a software card: EF0015 and the DLK, DPK and DTK of the newest master key
/// versions.
pub fn personalise_soft_card(
    module: &dyn SecurityModule,
    asn: Asn,
    profile: &CardProfile,
) -> anyhow::Result<SoftCard> {
    let version = |kind| {
        module
            .current_version(kind)
            .with_context(|| format!("no {} master key: run `onecard keys ceremony`", kind.name()))
    };
    let (load_v, purchase_v, tac_v) = (
        version(KeyKind::Load)?,
        version(KeyKind::Purchase)?,
        version(KeyKind::Tac)?,
    );
    let start_date = bcd_date(&profile.start_date, "start date")?;
    let expiry_date = bcd_date(&profile.expiry_date, "expiry date")?;
    anyhow::ensure!(
        profile.expiry_date > profile.start_date,
        "expiry date {} is not after start date {}",
        profile.expiry_date,
        profile.start_date
    );
    let pin = Pin::parse(&profile.pin).map_err(|e| anyhow::anyhow!("PIN: {e}"))?;
    let p = Personalisation {
        issuer_data: IssuerData {
            issuer_id: profile.issuer_id,
            application_type: 0x02,
            application_version: 0x01,
            asn,
            start_date,
            expiry_date,
            issuer_custom: [0, 0],
        },
        adf_fid: 0x1001,
        load_keys: vec![CardKey {
            index: KEY_INDEX,
            version: load_v,
            key: module.card_key(KeyKind::Load, load_v, &asn)?,
        }],
        purchase_keys: vec![CardKey {
            index: KEY_INDEX,
            version: purchase_v,
            key: module.card_key(KeyKind::Purchase, purchase_v, &asn)?,
        }],
        tac_key: TacKey {
            version: tac_v,
            key: module.card_key(KeyKind::Tac, tac_v, &asn)?,
        },
        pin,
        pin_tries_max: PIN_TRIES_MAX,
        balance_max_fen: profile.balance_max_fen,
        record_capacity: RECORD_CAPACITY,
    };
    SoftCard::personalise(p).map_err(|e| anyhow::anyhow!("personalising the card: {e}"))
}

/// A software PSAM for terminal `terminal`, with serial `serial` (10 bytes, BCD), holding the
/// module's newest purchase master key: what a key-loading station makes for a new POS.
pub fn personalise_soft_psam(
    module: &dyn SecurityModule,
    terminal: TerminalId,
    serial: [u8; 10],
) -> anyhow::Result<SoftPsam> {
    let version = module
        .current_version(KeyKind::Purchase)
        .context("no purchase master key: run the key ceremony")?;
    SoftPsam::new(PsamProfile {
        info: PsamInfo {
            serial,
            version: 1,
            key_card_type: 0,
            issuer_custom: [0, 0],
        },
        terminal_id: terminal,
        app_data: PsamAppData {
            purchase_key_index: KEY_INDEX,
            issuer_id: *b"ONECARD1",
            receiver_id: [0, 0, 0, 0, 0, 0, 0, 2],
            start_date: [0x20, 0x26, 0x01, 0x01],
            expiry_date: [0x20, 0x36, 0x12, 0x31],
        },
        app_fid: 0x1001,
        app_name: card::terminal::PSAM_AID_DEFAULT.to_vec(),
        purchase_keys: vec![PsamKey {
            version,
            master: module.psam_purchase_master(version)?,
        }],
        first_ttc: 1,
    })
    .map_err(|e| anyhow::anyhow!("making a PSAM: {e:?}"))
}
