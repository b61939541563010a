//! The PBOC EP and PSAM command set on the wire: instruction codes, APDU builders for the
//! terminal side, and parsers of the answers (spec §1.4-1.8, §2.2-2.3).
//!
//! The software card and PSAM use the same constants to decode, so a layout is written down
//! once for both sides.
//!
//! The builders panic on arguments that cannot form a short APDU (a name over 255 bytes, an
//! Le outside 1-256): those are programming errors, see [`Command::new`].

use crate::apdu::Command;
use crate::crypto::{Mac4, PurseAlgorithm};
use crate::purse::{ParseError, TerminalId, TxDateTime, TxType};

/// CLA of ISO 7816-4 inter-industry commands.
pub const CLA_ISO: u8 = 0x00;
/// CLA of PBOC proprietary commands.
pub const CLA_PROPRIETARY: u8 = 0x80;

pub const INS_SELECT: u8 = 0xA4;
pub const INS_READ_BINARY: u8 = 0xB0;
pub const INS_READ_RECORD: u8 = 0xB2;
pub const INS_VERIFY: u8 = 0x20;
pub const INS_GET_CHALLENGE: u8 = 0x84;
pub const INS_GET_BALANCE: u8 = 0x5C;
pub const INS_INITIALIZE: u8 = 0x50;
pub const INS_CREDIT_FOR_LOAD: u8 = 0x52;
pub const INS_DEBIT_FOR_PURCHASE: u8 = 0x54;
pub const INS_GET_TRANSACTION_PROVE: u8 = 0x5A;
pub const INS_INIT_SAM_FOR_PURCHASE: u8 = 0x70;
pub const INS_CREDIT_SAM_FOR_PURCHASE: u8 = 0x72;

/// INITIALIZE P1: load.
pub const P1_INIT_LOAD: u8 = 0x00;
/// INITIALIZE P1: purchase.
pub const P1_INIT_PURCHASE: u8 = 0x01;
/// P2 naming the electronic deposit (ED, 存折).
pub const P2_ED: u8 = 0x01;
/// P2 naming the electronic purse (EP, 钱包).
pub const P2_EP: u8 = 0x02;

/// The EP ADF name seen on many city and campus cards.
pub const EP_ADF_AID: [u8; 9] = [0xA0, 0x00, 0x00, 0x00, 0x03, 0x86, 0x98, 0x07, 0x01];
/// The payment system environment name.
pub const PSE_NAME: &[u8; 14] = b"1PAY.SYS.DDF01";
/// FID of the master file.
pub const FID_MF: u16 = 0x3F00;
/// SFI of EF0015, the public application basic data.
pub const SFI_ISSUER_DATA: u8 = 0x15;
/// SFI of PSAM EF0016, the terminal number.
pub const SFI_TERMINAL_ID: u8 = 0x16;
/// SFI of PSAM EF0017, the application data with the purchase key index.
pub const SFI_PSAM_APP_DATA: u8 = 0x17;
/// SFI of EF0018, the transaction detail records.
pub const SFI_RECORDS: u8 = 0x18;

/// `00 A4 04 00 Lc name 00`: SELECT by DF name.
pub fn select_by_name(name: &[u8]) -> Vec<u8> {
    Command::new(CLA_ISO, INS_SELECT, 0x04, 0x00, name, Some(256)).to_bytes()
}

/// `00 A4 00 00 02 fid`: SELECT by file identifier.
pub fn select_by_fid(fid: u16) -> Vec<u8> {
    Command::new(CLA_ISO, INS_SELECT, 0x00, 0x00, &fid.to_be_bytes(), None).to_bytes()
}

/// `00 B0 (80|sfi) offset le`: READ BINARY by short file identifier.
pub fn read_binary_sfi(sfi: u8, offset: u8, le: u16) -> Vec<u8> {
    Command::new(CLA_ISO, INS_READ_BINARY, 0x80 | sfi, offset, &[], Some(le)).to_bytes()
}

/// `00 B2 nn (sfi<<3|4) le`: READ RECORD number `record` by short file identifier.
pub fn read_record_sfi(sfi: u8, record: u8, le: u16) -> Vec<u8> {
    Command::new(
        CLA_ISO,
        INS_READ_RECORD,
        record,
        (sfi << 3) | 4,
        &[],
        Some(le),
    )
    .to_bytes()
}

/// `00 20 00 00 Lc pin`: VERIFY with the PIN in BCD.
pub fn verify(pin_bcd: &[u8]) -> Vec<u8> {
    Command::new(CLA_ISO, INS_VERIFY, 0x00, 0x00, pin_bcd, None).to_bytes()
}

/// `00 84 00 00 len`: GET CHALLENGE of 4 or 8 bytes.
pub fn get_challenge(len: u16) -> Vec<u8> {
    Command::new(CLA_ISO, INS_GET_CHALLENGE, 0x00, 0x00, &[], Some(len)).to_bytes()
}

/// `80 5C 00 02 04`: GET BALANCE of the EP.
pub fn get_balance() -> Vec<u8> {
    Command::new(CLA_PROPRIETARY, INS_GET_BALANCE, 0x00, P2_EP, &[], Some(4)).to_bytes()
}

/// The 11 data bytes of INITIALIZE: key index, amount, terminal id.
fn init_data(key_index: u8, amount_fen: u32, terminal_id: &TerminalId) -> [u8; 11] {
    let mut data = [0u8; 11];
    data[0] = key_index;
    data[1..5].copy_from_slice(&amount_fen.to_be_bytes());
    data[5..].copy_from_slice(&terminal_id.to_bytes());
    data
}

/// `80 50 00 02 0B <keyIndex amount terminalId> 10`: INITIALIZE FOR LOAD of the EP.
pub fn initialize_for_load(key_index: u8, amount_fen: u32, terminal_id: &TerminalId) -> Vec<u8> {
    let data = init_data(key_index, amount_fen, terminal_id);
    Command::new(
        CLA_PROPRIETARY,
        INS_INITIALIZE,
        P1_INIT_LOAD,
        P2_EP,
        &data,
        Some(0x10),
    )
    .to_bytes()
}

/// `80 52 00 00 0B <date time MAC2> 04`: CREDIT FOR LOAD.
pub fn credit_for_load(date_time: &TxDateTime, mac2: Mac4) -> Vec<u8> {
    let mut data = [0u8; 11];
    data[..7].copy_from_slice(&date_time.to_bytes());
    data[7..].copy_from_slice(&mac2.to_bytes());
    Command::new(CLA_PROPRIETARY, INS_CREDIT_FOR_LOAD, 0, 0, &data, Some(4)).to_bytes()
}

/// `80 50 01 02 0B <keyIndex amount terminalId> 0F`: INITIALIZE FOR PURCHASE of the EP.
pub fn initialize_for_purchase(
    key_index: u8,
    amount_fen: u32,
    terminal_id: &TerminalId,
) -> Vec<u8> {
    let data = init_data(key_index, amount_fen, terminal_id);
    Command::new(
        CLA_PROPRIETARY,
        INS_INITIALIZE,
        P1_INIT_PURCHASE,
        P2_EP,
        &data,
        Some(0x0F),
    )
    .to_bytes()
}

/// `80 54 01 00 0F <TTC date time MAC1> 08`: DEBIT FOR PURCHASE.
pub fn debit_for_purchase(ttc: u32, date_time: &TxDateTime, mac1: Mac4) -> Vec<u8> {
    let mut data = [0u8; 15];
    data[..4].copy_from_slice(&ttc.to_be_bytes());
    data[4..11].copy_from_slice(&date_time.to_bytes());
    data[11..].copy_from_slice(&mac1.to_bytes());
    Command::new(
        CLA_PROPRIETARY,
        INS_DEBIT_FOR_PURCHASE,
        0x01,
        0,
        &data,
        Some(8),
    )
    .to_bytes()
}

/// `80 5A 00 type 02 <counter> 08`: GET TRANSACTION PROVE for the transaction of this type
/// that used this counter.
pub fn get_transaction_prove(tx_type: TxType, counter: u16) -> Vec<u8> {
    Command::new(
        CLA_PROPRIETARY,
        INS_GET_TRANSACTION_PROVE,
        0x00,
        tx_type.code(),
        &counter.to_be_bytes(),
        Some(8),
    )
    .to_bytes()
}

fn take<const N: usize>(data: &[u8], at: usize) -> [u8; N] {
    data[at..at + N]
        .try_into()
        .expect("length checked by caller")
}

fn check_len(data: &[u8], expected: usize) -> Result<(), ParseError> {
    if data.len() == expected {
        Ok(())
    } else {
        Err(ParseError::Length {
            expected,
            actual: data.len(),
        })
    }
}

/// The 16-byte answer to INITIALIZE FOR LOAD.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct LoadInitResponse {
    pub old_balance_fen: u32,
    /// The online counter the load uses (not yet incremented).
    pub online_counter: u16,
    pub key_version: u8,
    pub algorithm_id: u8,
    pub random: [u8; 4],
    pub mac1: Mac4,
}

impl LoadInitResponse {
    pub const LEN: usize = 16;

    pub fn parse(data: &[u8]) -> Result<LoadInitResponse, ParseError> {
        check_len(data, Self::LEN)?;
        Ok(LoadInitResponse {
            old_balance_fen: u32::from_be_bytes(take(data, 0)),
            online_counter: u16::from_be_bytes(take(data, 4)),
            key_version: data[6],
            algorithm_id: data[7],
            random: take(data, 8),
            mac1: Mac4::new(take(data, 12)),
        })
    }

    pub fn to_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..4].copy_from_slice(&self.old_balance_fen.to_be_bytes());
        out[4..6].copy_from_slice(&self.online_counter.to_be_bytes());
        out[6] = self.key_version;
        out[7] = self.algorithm_id;
        out[8..12].copy_from_slice(&self.random);
        out[12..].copy_from_slice(&self.mac1.to_bytes());
        out
    }

    pub fn algorithm(&self) -> Option<PurseAlgorithm> {
        PurseAlgorithm::from_code(self.algorithm_id)
    }
}

/// The 15-byte answer to INITIALIZE FOR PURCHASE.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PurchaseInitResponse {
    pub balance_fen: u32,
    /// The offline counter the purchase uses (not yet incremented).
    pub offline_counter: u16,
    /// 3 bytes on the wire.
    pub overdraft_limit_fen: u32,
    pub key_version: u8,
    pub algorithm_id: u8,
    pub random: [u8; 4],
}

impl PurchaseInitResponse {
    pub const LEN: usize = 15;

    pub fn parse(data: &[u8]) -> Result<PurchaseInitResponse, ParseError> {
        check_len(data, Self::LEN)?;
        Ok(PurchaseInitResponse {
            balance_fen: u32::from_be_bytes(take(data, 0)),
            offline_counter: u16::from_be_bytes(take(data, 4)),
            overdraft_limit_fen: u32::from_be_bytes([0, data[6], data[7], data[8]]),
            key_version: data[9],
            algorithm_id: data[10],
            random: take(data, 11),
        })
    }

    /// Panics if the overdraft limit needs more than 3 bytes (the card never holds one).
    pub fn to_bytes(&self) -> [u8; 15] {
        assert!(self.overdraft_limit_fen <= crate::purse::OVERDRAFT_LIMIT_FEN_MAX);
        let mut out = [0u8; 15];
        out[..4].copy_from_slice(&self.balance_fen.to_be_bytes());
        out[4..6].copy_from_slice(&self.offline_counter.to_be_bytes());
        out[6..9].copy_from_slice(&self.overdraft_limit_fen.to_be_bytes()[1..]);
        out[9] = self.key_version;
        out[10] = self.algorithm_id;
        out[11..].copy_from_slice(&self.random);
        out
    }

    pub fn algorithm(&self) -> Option<PurseAlgorithm> {
        PurseAlgorithm::from_code(self.algorithm_id)
    }
}

/// The 8-byte answer to DEBIT FOR PURCHASE: TAC then MAC2.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DebitResponse {
    pub tac: Mac4,
    pub mac2: Mac4,
}

impl DebitResponse {
    pub fn parse(data: &[u8]) -> Result<DebitResponse, ParseError> {
        check_len(data, 8)?;
        Ok(DebitResponse {
            tac: Mac4::new(take(data, 0)),
            mac2: Mac4::new(take(data, 4)),
        })
    }

    pub fn to_bytes(&self) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&self.tac.to_bytes());
        out[4..].copy_from_slice(&self.mac2.to_bytes());
        out
    }
}

/// The 8-byte answer to GET TRANSACTION PROVE: the MAC (MAC2) then the TAC.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TransactionProof {
    pub mac: Mac4,
    pub tac: Mac4,
}

impl TransactionProof {
    pub fn parse(data: &[u8]) -> Result<TransactionProof, ParseError> {
        check_len(data, 8)?;
        Ok(TransactionProof {
            mac: Mac4::new(take(data, 0)),
            tac: Mac4::new(take(data, 4)),
        })
    }

    pub fn to_bytes(&self) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&self.mac.to_bytes());
        out[4..].copy_from_slice(&self.tac.to_bytes());
        out
    }
}

/// The most diversification factors INIT SAM FOR PURCHASE carries (spec §2.2).
pub const SAM_FACTORS_MAX: usize = 3;

/// The data of INIT SAM FOR PURCHASE (8070), `0x14 + 8·N` bytes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SamPurchaseInit {
    pub card_random: [u8; 4],
    pub offline_counter: u16,
    pub amount_fen: u32,
    pub tx_type: u8,
    pub date_time: TxDateTime,
    pub key_version: u8,
    pub algorithm_id: u8,
    /// The card ASN's diversification factor (always first on the wire).
    pub card_factor: [u8; 8],
    /// Higher-level factors (issuer, city) in wire order; at most
    /// [`SAM_FACTORS_MAX`]` - 1`.
    higher_factors: [[u8; 8]; SAM_FACTORS_MAX - 1],
    higher_count: u8,
}

impl SamPurchaseInit {
    /// The fixed part before the factors.
    pub const FIXED_LEN: usize = 0x14;

    #[allow(clippy::too_many_arguments)] // The 8070 data has this many fields; a builder would only hide them.
    pub fn new(
        card_random: [u8; 4],
        offline_counter: u16,
        amount_fen: u32,
        tx_type: TxType,
        date_time: TxDateTime,
        key_version: u8,
        algorithm_id: u8,
        card_factor: [u8; 8],
        higher_factors: &[[u8; 8]],
    ) -> Result<SamPurchaseInit, ParseError> {
        if higher_factors.len() > SAM_FACTORS_MAX - 1 {
            return Err(ParseError::Length {
                expected: SAM_FACTORS_MAX - 1,
                actual: higher_factors.len(),
            });
        }
        let mut stored = [[0u8; 8]; SAM_FACTORS_MAX - 1];
        stored[..higher_factors.len()].copy_from_slice(higher_factors);
        Ok(SamPurchaseInit {
            card_random,
            offline_counter,
            amount_fen,
            tx_type: tx_type.code(),
            date_time,
            key_version,
            algorithm_id,
            card_factor,
            higher_factors: stored,
            higher_count: higher_factors.len() as u8,
        })
    }

    pub fn higher_factors(&self) -> &[[u8; 8]] {
        &self.higher_factors[..usize::from(self.higher_count)]
    }

    /// Parses the 8070 data field; its length must be `0x14 + 8·N` with N in 1..=3.
    pub fn parse(data: &[u8]) -> Result<SamPurchaseInit, ParseError> {
        let factors_len = data.len().checked_sub(Self::FIXED_LEN);
        let n = match factors_len {
            Some(len) if len % 8 == 0 && (1..=SAM_FACTORS_MAX).contains(&(len / 8)) => len / 8,
            _ => {
                return Err(ParseError::Length {
                    expected: Self::FIXED_LEN + 8,
                    actual: data.len(),
                });
            }
        };
        let mut higher = [[0u8; 8]; SAM_FACTORS_MAX - 1];
        for (i, h) in higher.iter_mut().enumerate().take(n - 1) {
            *h = take(data, Self::FIXED_LEN + 8 * (i + 1));
        }
        Ok(SamPurchaseInit {
            card_random: take(data, 0),
            offline_counter: u16::from_be_bytes(take(data, 4)),
            amount_fen: u32::from_be_bytes(take(data, 6)),
            tx_type: data[10],
            date_time: TxDateTime::from_slice(&data[11..18])?,
            key_version: data[18],
            algorithm_id: data[19],
            card_factor: take(data, Self::FIXED_LEN),
            higher_factors: higher,
            higher_count: (n - 1) as u8,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::FIXED_LEN + 8 * SAM_FACTORS_MAX);
        out.extend_from_slice(&self.card_random);
        out.extend_from_slice(&self.offline_counter.to_be_bytes());
        out.extend_from_slice(&self.amount_fen.to_be_bytes());
        out.push(self.tx_type);
        out.extend_from_slice(&self.date_time.to_bytes());
        out.push(self.key_version);
        out.push(self.algorithm_id);
        out.extend_from_slice(&self.card_factor);
        for f in self.higher_factors() {
            out.extend_from_slice(f);
        }
        out
    }

    /// `80 70 00 00 Lc <data> 08`.
    pub fn to_apdu(&self) -> Vec<u8> {
        let data = self.to_bytes();
        Command::new(
            CLA_PROPRIETARY,
            INS_INIT_SAM_FOR_PURCHASE,
            0,
            0,
            &data,
            Some(8),
        )
        .to_bytes()
    }
}

/// The 8-byte answer to INIT SAM FOR PURCHASE: the TTC the PSAM allocated, and MAC1.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SamPurchaseInitResponse {
    pub ttc: u32,
    pub mac1: Mac4,
}

impl SamPurchaseInitResponse {
    pub fn parse(data: &[u8]) -> Result<SamPurchaseInitResponse, ParseError> {
        check_len(data, 8)?;
        Ok(SamPurchaseInitResponse {
            ttc: u32::from_be_bytes(take(data, 0)),
            mac1: Mac4::new(take(data, 4)),
        })
    }

    pub fn to_bytes(&self) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&self.ttc.to_be_bytes());
        out[4..].copy_from_slice(&self.mac1.to_bytes());
        out
    }
}

/// `80 72 00 00 04 <MAC2>`: CREDIT SAM FOR PURCHASE.
pub fn credit_sam_for_purchase(mac2: Mac4) -> Vec<u8> {
    Command::new(
        CLA_PROPRIETARY,
        INS_CREDIT_SAM_FOR_PURCHASE,
        0,
        0,
        &mac2.to_bytes(),
        None,
    )
    .to_bytes()
}
