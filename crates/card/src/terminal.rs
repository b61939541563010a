//! What a terminal does with a card and its PSAM, in process: the purchase of spec 2.6
//! (SELECT and read the ASN, INITIALIZE FOR PURCHASE, the PSAM's MAC1, DEBIT, the PSAM's check
//! of MAC2), including the recovery of a torn DEBIT with GET TRANSACTION PROVE. Used by the
//! POS simulator and by the tests. Pure: the date-time and the randomness are arguments.
//! Every refusal is an answer ([`PurchaseEnd`]), never a panic.

use crate::apdu::{Response, StatusWord};
use crate::commands::{
    self, DebitResponse, EP_ADF_AID, PurchaseInitResponse, SamPurchaseInit,
    SamPurchaseInitResponse, TransactionProof,
};
use crate::crypto::Mac4;
use crate::psam::SoftPsam;
use crate::purse::{Asn, IssuerData, TerminalId, TxDateTime, TxType};
use crate::random::RandomSource;
use crate::soft_card::{SoftCard, Torn};

/// The PSAM application name onecard's software PSAMs carry.
pub const PSAM_AID_DEFAULT: &[u8] = b"ONECARD.PSAM";

fn send(card: &mut SoftCard, rng: &mut dyn RandomSource, apdu: &[u8]) -> Response {
    match card.transmit(apdu, rng) {
        Ok(r) => r,
        // A tear outside DEBIT: the card answers nothing; treat it as a refusal.
        Err(Torn) => Response::status(StatusWord::ConditionsNotSatisfied),
    }
}

/// SELECTs the EP application and reads the ASN.
fn select_and_read_asn(
    card: &mut SoftCard,
    rng: &mut dyn RandomSource,
) -> Result<Asn, PurchaseEnd> {
    let r = send(card, rng, &commands::select_by_name(&EP_ADF_AID));
    if !r.is_ok() {
        return Err(PurchaseEnd::InitRefused(r.sw()));
    }
    let r = send(card, rng, &commands::read_binary_sfi(0x15, 0, 30));
    IssuerData::parse(r.data())
        .map(|d| d.asn)
        .map_err(|_| PurchaseEnd::InitRefused(r.sw()))
}

/// The record a terminal keeps of a purchase for upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurchaseRecord {
    pub asn: Asn,
    pub balance_before_fen: u32,
    pub offline_counter: u16,
    pub ttc: u32,
    pub amount_fen: u32,
    pub terminal_id: TerminalId,
    pub date_time: TxDateTime,
    pub tac: Mac4,
}

/// What a purchase ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurchaseEnd {
    Done(PurchaseRecord),
    InitRefused(StatusWord),
    SamRefused(StatusWord),
    DebitRefused(StatusWord),
    /// The PSAM's 8072 refused the card's MAC2.
    Mac2Refused(StatusWord, PurchaseRecord),
    /// The card tore during DEBIT; the terminal re-read the card.
    Torn {
        counter_advanced: bool,
        recovered: Option<(TransactionProof, PurchaseRecord)>,
    },
}

/// A full purchase through APDUs between card and PSAM (spec §2.6).
pub fn purchase(
    card: &mut SoftCard,
    psam: &mut SoftPsam,
    rng: &mut dyn RandomSource,
    amount_fen: u32,
    date_time: &TxDateTime,
) -> PurchaseEnd {
    purchase_with(card, psam, PSAM_AID_DEFAULT, rng, amount_fen, date_time)
}

/// [`purchase`] with the PSAM application's name given.
pub fn purchase_with(
    card: &mut SoftCard,
    psam: &mut SoftPsam,
    psam_aid: &[u8],
    rng: &mut dyn RandomSource,
    amount_fen: u32,
    date_time: &TxDateTime,
) -> PurchaseEnd {
    // 1. PSAM: terminal id and key index.
    let r = psam.transmit(&commands::read_binary_sfi(0x16, 0, 6));
    let Ok(terminal_id) = TerminalId::from_slice(r.data()) else {
        return PurchaseEnd::SamRefused(r.sw());
    };
    let r = psam.transmit(&commands::select_by_name(psam_aid));
    if !r.is_ok() {
        return PurchaseEnd::SamRefused(r.sw());
    }
    let r = psam.transmit(&commands::read_binary_sfi(0x17, 0, 25));
    let Some(&key_index) = r.data().first().filter(|_| r.is_ok()) else {
        return PurchaseEnd::SamRefused(r.sw());
    };
    // 2-3. Card: ASN, INITIALIZE FOR PURCHASE.
    let asn = match select_and_read_asn(card, rng) {
        Ok(a) => a,
        Err(e) => return e,
    };
    let r = send(
        card,
        rng,
        &commands::initialize_for_purchase(key_index, amount_fen, &terminal_id),
    );
    if !r.is_ok() {
        return PurchaseEnd::InitRefused(r.sw());
    }
    let Ok(init) = PurchaseInitResponse::parse(r.data()) else {
        return PurchaseEnd::InitRefused(r.sw());
    };
    // 4. PSAM: TTC and MAC1.
    let sam_init = SamPurchaseInit::new(
        init.random,
        init.offline_counter,
        amount_fen,
        TxType::EpPurchase,
        *date_time,
        init.key_version,
        init.algorithm_id,
        asn.diversification_factor(),
        &[],
    );
    let Ok(sam_init) = sam_init else {
        return PurchaseEnd::SamRefused(StatusWord::WrongData);
    };
    let r = psam.transmit(&sam_init.to_apdu());
    if !r.is_ok() {
        return PurchaseEnd::SamRefused(r.sw());
    }
    let Ok(sam) = SamPurchaseInitResponse::parse(r.data()) else {
        return PurchaseEnd::SamRefused(r.sw());
    };
    let mut record = PurchaseRecord {
        asn,
        balance_before_fen: init.balance_fen,
        offline_counter: init.offline_counter,
        ttc: sam.ttc,
        amount_fen,
        terminal_id,
        date_time: *date_time,
        tac: Mac4::new([0; 4]),
    };
    // 5. Card: DEBIT.
    let debit = match card.transmit(
        &commands::debit_for_purchase(sam.ttc, date_time, sam.mac1),
        rng,
    ) {
        Ok(r) if r.is_ok() => match DebitResponse::parse(r.data()) {
            Ok(d) => d,
            Err(_) => return PurchaseEnd::DebitRefused(r.sw()),
        },
        Ok(r) => return PurchaseEnd::DebitRefused(r.sw()),
        Err(Torn) => {
            // 8. Re-select, re-read the counter; if it advanced, fetch the proof.
            if let Err(e) = select_and_read_asn(card, rng) {
                return e;
            }
            let r = send(
                card,
                rng,
                &commands::initialize_for_purchase(key_index, 0, &terminal_id),
            );
            let Ok(now) = PurchaseInitResponse::parse(r.data()) else {
                return PurchaseEnd::InitRefused(r.sw());
            };
            let counter_advanced = now.offline_counter != init.offline_counter;
            let recovered = if counter_advanced {
                let r = send(
                    card,
                    rng,
                    &commands::get_transaction_prove(TxType::EpPurchase, init.offline_counter),
                );
                TransactionProof::parse(r.data())
                    .ok()
                    .filter(|_| r.is_ok())
                    .map(|proof| {
                        record.tac = proof.tac;
                        (proof, record.clone())
                    })
            } else {
                None
            };
            return PurchaseEnd::Torn {
                counter_advanced,
                recovered,
            };
        }
    };
    record.tac = debit.tac;
    // 6. PSAM: check MAC2.
    let r = psam.transmit(&commands::credit_sam_for_purchase(debit.mac2));
    if !r.is_ok() {
        return PurchaseEnd::Mac2Refused(r.sw(), record);
    }
    PurchaseEnd::Done(record)
}
