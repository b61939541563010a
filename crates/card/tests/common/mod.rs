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

use card::apdu::{Response, StatusWord};
use card::commands::{self, EP_ADF_AID, LoadInitResponse, TransactionProof};
use card::crypto::{
    Mac4, Pin, PurseAlgorithm, PurseKey, load_mac1, load_mac2, load_tac, purchase_tac,
};
use card::psam::{PsamAppData, PsamInfo, PsamKey, PsamProfile, SoftPsam};
use card::purse::{Asn, IssuerData, TerminalId, TxDateTime, TxType};
use card::random::{FixedRandom, RandomSource, SeededRandom};
use card::soft_card::{CardKey, Personalisation, SoftCard, TacKey, Torn};

pub const MLK: &str = "00112233445566778899AABBCCDDEEFF";
pub const MPK: &str = "0123456789ABCDEFFEDCBA9876543210";
pub const MTK: &str = "F0E1D2C3B4A5968778695A4B3C2D1E0F";
pub const KEY_INDEX: u8 = 1;
pub const KEY_VERSION: u8 = 1;
pub const BALANCE_MAX_FEN: u32 = 10_000_000;
pub const PSAM_AID: &[u8] = b"ONECARD.PSAM";
pub const PSAM_FID: u16 = 0x1001;

/// A stand-in for the platform's security module: it holds the master keys of spec 5.3 and
/// does the host side of loads and the TAC checks of the back office.
pub struct Issuer {
    pub mlk: PurseKey,
    pub mpk: PurseKey,
    pub mtk: PurseKey,
    /// Higher-level diversification factors (issuer first), empty for one level.
    pub higher_factors: Vec<[u8; 8]>,
}

impl Issuer {
    pub fn spec_5_3() -> Issuer {
        Issuer::with_algorithm(PurseAlgorithm::Tdes)
    }

    pub fn with_algorithm(algorithm: PurseAlgorithm) -> Issuer {
        Issuer {
            mlk: PurseKey::new(algorithm, arr(MLK)),
            mpk: PurseKey::new(algorithm, arr(MPK)),
            mtk: PurseKey::new(algorithm, arr(MTK)),
            higher_factors: Vec::new(),
        }
    }

    pub fn card_keys(&self, asn: &Asn) -> (PurseKey, PurseKey, PurseKey) {
        let f = &self.higher_factors;
        (
            self.mlk.derive_card_key(f, asn),
            self.mpk.derive_card_key(f, asn),
            self.mtk.derive_card_key(f, asn),
        )
    }

    pub fn personalisation(&self, asn: Asn, record_capacity: u8) -> Personalisation {
        let (dlk, dpk, dtk) = self.card_keys(&asn);
        Personalisation {
            issuer_data: IssuerData {
                issuer_id: arr("0000000000000001"),
                application_type: 0x02,
                application_version: 0x01,
                asn,
                start_date: arr("20240101"),
                expiry_date: arr("20341231"),
                issuer_custom: [0, 0],
            },
            adf_fid: 0x1001,
            load_keys: vec![CardKey {
                index: KEY_INDEX,
                version: KEY_VERSION,
                key: dlk,
            }],
            purchase_keys: vec![CardKey {
                index: KEY_INDEX,
                version: KEY_VERSION,
                key: dpk,
            }],
            tac_key: TacKey {
                version: KEY_VERSION,
                key: dtk,
            },
            pin: Pin::parse("123456").unwrap(),
            pin_tries_max: 3,
            balance_max_fen: BALANCE_MAX_FEN,
            record_capacity,
        }
    }

    pub fn issue(&self, asn: Asn) -> SoftCard {
        SoftCard::personalise(self.personalisation(asn, 10)).unwrap()
    }

    pub fn psam(&self, terminal_id: TerminalId) -> SoftPsam {
        SoftPsam::new(PsamProfile {
            info: PsamInfo {
                serial: arr("00000000000000000042"),
                version: 1,
                key_card_type: 0,
                issuer_custom: [0, 0],
            },
            terminal_id,
            app_data: PsamAppData {
                purchase_key_index: KEY_INDEX,
                issuer_id: arr("0000000000000001"),
                receiver_id: arr("0000000000000002"),
                start_date: arr("20240101"),
                expiry_date: arr("20341231"),
            },
            app_fid: PSAM_FID,
            app_name: PSAM_AID.to_vec(),
            purchase_keys: vec![PsamKey {
                version: KEY_VERSION,
                master: self.mpk.clone(),
            }],
            first_ttc: 1,
        })
        .unwrap()
    }

    /// The host side of a load: checks the card's MAC1, then makes MAC2.
    pub fn authorise_load(
        &self,
        asn: &Asn,
        init: &LoadInitResponse,
        amount_fen: u32,
        terminal_id: &TerminalId,
        date_time: &TxDateTime,
    ) -> Result<Mac4, &'static str> {
        let dlk = self.mlk.derive_card_key(&self.higher_factors, asn);
        let session = dlk.load_session_key(init.random, init.online_counter);
        let mac1 = load_mac1(
            &session,
            init.old_balance_fen,
            amount_fen,
            TxType::EpLoad,
            terminal_id,
        );
        if !mac1.verify(&init.mac1) {
            return Err("MAC1 invalid");
        }
        Ok(load_mac2(
            &session,
            amount_fen,
            TxType::EpLoad,
            terminal_id,
            date_time,
        ))
    }

    #[allow(clippy::too_many_arguments)] // The TAC covers this many fields.
    pub fn load_tac_ok(
        &self,
        asn: &Asn,
        new_balance_fen: u32,
        counter: u16,
        amount_fen: u32,
        terminal_id: &TerminalId,
        date_time: &TxDateTime,
        tac: Mac4,
    ) -> bool {
        let tac_key = self
            .mtk
            .derive_card_key(&self.higher_factors, asn)
            .tac_key();
        load_tac(
            &tac_key,
            new_balance_fen,
            counter,
            amount_fen,
            TxType::EpLoad,
            terminal_id,
            date_time,
        )
        .verify(&tac)
    }

    pub fn purchase_tac_ok(&self, asn: &Asn, p: &PurchaseRecord) -> bool {
        let tac_key = self
            .mtk
            .derive_card_key(&self.higher_factors, asn)
            .tac_key();
        purchase_tac(
            &tac_key,
            p.amount_fen,
            TxType::EpPurchase,
            &p.terminal_id,
            p.ttc,
            &p.date_time,
        )
        .verify(&p.tac)
    }
}

/// Sends an APDU that must not tear.
pub fn send(card: &mut SoftCard, rng: &mut dyn RandomSource, apdu: &[u8]) -> Response {
    card.transmit(apdu, rng).expect("no tear armed")
}

/// SELECTs the EP ADF by name and reads the ASN from EF0015.
pub fn select_and_read_asn(card: &mut SoftCard, rng: &mut dyn RandomSource) -> Asn {
    let r = send(card, rng, &commands::select_by_name(&EP_ADF_AID));
    assert_eq!(r.sw(), StatusWord::Success);
    let r = send(card, rng, &commands::read_binary_sfi(0x15, 0, 30));
    assert_eq!(r.sw(), StatusWord::Success);
    IssuerData::parse(r.data()).unwrap().asn
}

/// What a load ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadEnd {
    Done {
        new_balance_fen: u32,
        counter: u16,
        tac: Mac4,
    },
    /// The card answered INITIALIZE with this status word.
    InitRefused(StatusWord),
    /// The host refused to authorise: the card's MAC1 was wrong.
    Mac1Invalid,
    /// The card answered CREDIT with this status word.
    CreditRefused(StatusWord),
    /// The card's TAC did not verify.
    TacInvalid,
    /// The card tore during CREDIT; `recovered` holds the proof if GET TRANSACTION PROVE gave one.
    Torn { recovered: Option<TransactionProof> },
}

/// A full load through APDUs: SELECT, READ BINARY, INITIALIZE, host authorisation, CREDIT,
/// TAC check; on a tear, re-select and GET TRANSACTION PROVE.
pub fn load(
    issuer: &Issuer,
    card: &mut SoftCard,
    rng: &mut dyn RandomSource,
    amount_fen: u32,
    terminal_id: &TerminalId,
    date_time: &TxDateTime,
) -> LoadEnd {
    let asn = select_and_read_asn(card, rng);
    let r = send(
        card,
        rng,
        &commands::initialize_for_load(KEY_INDEX, amount_fen, terminal_id),
    );
    if !r.is_ok() {
        return LoadEnd::InitRefused(r.sw());
    }
    let init = LoadInitResponse::parse(r.data()).unwrap();
    let Ok(mac2) = issuer.authorise_load(&asn, &init, amount_fen, terminal_id, date_time) else {
        return LoadEnd::Mac1Invalid;
    };
    let new_balance_fen = init.old_balance_fen + amount_fen;
    let tac = match card.transmit(&commands::credit_for_load(date_time, mac2), rng) {
        Ok(r) if r.is_ok() => Mac4::new(r.data().try_into().unwrap()),
        Ok(r) => return LoadEnd::CreditRefused(r.sw()),
        Err(Torn) => {
            select_and_read_asn(card, rng);
            let r = send(
                card,
                rng,
                &commands::get_transaction_prove(TxType::EpLoad, init.online_counter),
            );
            return LoadEnd::Torn {
                recovered: r
                    .is_ok()
                    .then(|| TransactionProof::parse(r.data()).unwrap()),
            };
        }
    };
    if !issuer.load_tac_ok(
        &asn,
        new_balance_fen,
        init.online_counter,
        amount_fen,
        terminal_id,
        date_time,
        tac,
    ) {
        return LoadEnd::TacInvalid;
    }
    LoadEnd::Done {
        new_balance_fen,
        counter: init.online_counter,
        tac,
    }
}

// The purchase flow is the library's (the POS simulator uses it too).
#[allow(unused_imports)] // Each test binary uses a different subset.
pub use card::terminal::{PurchaseEnd, PurchaseRecord, purchase};

pub fn terminal() -> TerminalId {
    TerminalId::parse_digits("000000000001").unwrap()
}

pub fn when(digits: &str) -> TxDateTime {
    TxDateTime::parse_digits(digits).unwrap()
}

pub fn asn(n: u64) -> Asn {
    let mut b = [0u8; 10];
    b[0] = 0x00;
    b[1] = 0x01;
    b[2..].copy_from_slice(&n.to_be_bytes());
    Asn::new(b)
}

pub fn rng(seed: u64) -> SeededRandom {
    SeededRandom::new(seed)
}

pub fn fixed(hex_bytes: &str) -> FixedRandom {
    FixedRandom(hex(hex_bytes))
}
