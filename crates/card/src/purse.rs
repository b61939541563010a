//! The purse vocabulary shared by card, PSAM and platform: card serial (ASN), terminal id,
//! transaction types, transaction date-time, the EF0015 issuer data and EF0018 records.
//!
//! Byte layouts follow spec §1.1-1.2. Amounts on the card are 4-byte unsigned fen; counters
//! are 2-byte unsigned and never wrap.

use std::fmt;

/// Why bytes or text are not a valid purse value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// The input has the wrong length for the value.
    Length { expected: usize, actual: usize },
    /// A digit string has a character that is not `0`-`9`, or a BCD byte a nibble above 9.
    NotDecimal,
    /// A transaction type code that spec §1.2 does not define.
    UnknownTxType(u8),
    /// An amount that does not fit the on-card 3-byte overdraft field.
    OverdraftTooLarge,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Length { expected, actual } => {
                write!(f, "expected {expected} bytes or digits, got {actual}")
            }
            ParseError::NotDecimal => f.write_str("not a decimal digit string"),
            ParseError::UnknownTxType(code) => write!(f, "unknown transaction type {code:02X}"),
            ParseError::OverdraftTooLarge => f.write_str("overdraft limit over 3 bytes"),
        }
    }
}

impl std::error::Error for ParseError {}

fn fixed<const N: usize>(bytes: &[u8]) -> Result<[u8; N], ParseError> {
    bytes.try_into().map_err(|_| ParseError::Length {
        expected: N,
        actual: bytes.len(),
    })
}

/// Packs a decimal digit string into BCD, two digits per byte, exactly `N` bytes.
fn digits_to_bcd<const N: usize>(digits: &str) -> Result<[u8; N], ParseError> {
    let d = digits.as_bytes();
    if d.len() != 2 * N {
        return Err(ParseError::Length {
            expected: 2 * N,
            actual: d.len(),
        });
    }
    if !d.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::NotDecimal);
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(d.chunks_exact(2)) {
        *o = ((pair[0] - b'0') << 4) | (pair[1] - b'0');
    }
    Ok(out)
}

fn is_bcd(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| b >> 4 <= 9 && b & 0x0F <= 9)
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02X}")?;
    }
    Ok(())
}

/// The application serial number (应用序列号), 10 bytes of EF0015. Its rightmost 8 bytes are
/// the key-diversification factor.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Asn([u8; 10]);

impl Asn {
    pub const fn new(bytes: [u8; 10]) -> Asn {
        Asn(bytes)
    }

    pub fn from_slice(bytes: &[u8]) -> Result<Asn, ParseError> {
        fixed(bytes).map(Asn)
    }

    /// Parses 20 decimal digits (the usual printed form).
    pub fn parse_digits(digits: &str) -> Result<Asn, ParseError> {
        digits_to_bcd(digits).map(Asn)
    }

    pub const fn to_bytes(self) -> [u8; 10] {
        self.0
    }

    /// The rightmost 8 bytes: the card-level diversification factor (spec §1.1).
    pub fn diversification_factor(&self) -> [u8; 8] {
        self.0[2..].try_into().expect("8 of 10 bytes")
    }
}

impl fmt::Debug for Asn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Asn(")?;
        write_hex(f, &self.0)?;
        f.write_str(")")
    }
}

impl fmt::Display for Asn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

/// The 6-byte terminal number (终端机编号) of PSAM EF16, used in MAC1, TAC and EF0018.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TerminalId([u8; 6]);

impl TerminalId {
    pub const fn new(bytes: [u8; 6]) -> TerminalId {
        TerminalId(bytes)
    }

    pub fn from_slice(bytes: &[u8]) -> Result<TerminalId, ParseError> {
        fixed(bytes).map(TerminalId)
    }

    /// Parses 12 decimal digits as BCD.
    pub fn parse_digits(digits: &str) -> Result<TerminalId, ParseError> {
        digits_to_bcd(digits).map(TerminalId)
    }

    pub const fn to_bytes(self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Debug for TerminalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TerminalId(")?;
        write_hex(f, &self.0)?;
        f.write_str(")")
    }
}

impl fmt::Display for TerminalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

/// Transaction type identifiers (spec §1.2), as they appear in MAC/TAC inputs and EF0018.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
pub enum TxType {
    EdLoad = 0x01,
    EpLoad = 0x02,
    EdUnload = 0x03,
    EdCashWithdrawal = 0x04,
    EdPurchase = 0x05,
    EpPurchase = 0x06,
    EdOverdraftUpdate = 0x07,
    CappPurchase = 0x09,
}

impl TxType {
    pub const fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Result<TxType, ParseError> {
        Ok(match code {
            0x01 => TxType::EdLoad,
            0x02 => TxType::EpLoad,
            0x03 => TxType::EdUnload,
            0x04 => TxType::EdCashWithdrawal,
            0x05 => TxType::EdPurchase,
            0x06 => TxType::EpPurchase,
            0x07 => TxType::EdOverdraftUpdate,
            0x09 => TxType::CappPurchase,
            other => return Err(ParseError::UnknownTxType(other)),
        })
    }

    /// Whether the transaction adds to the purse (load) or takes from it.
    pub const fn is_credit(self) -> bool {
        matches!(self, TxType::EdLoad | TxType::EpLoad)
    }
}

/// Transaction date `YYYYMMDD` (4 bytes BCD) and time `hhmmss` (3 bytes BCD), as sent by the
/// terminal. The card does not interpret them (it has no clock); they are covered by the MACs.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TxDateTime {
    date: [u8; 4],
    time: [u8; 3],
}

impl TxDateTime {
    /// From raw bytes, as received in an APDU. Not checked: a card takes what it is sent.
    pub const fn from_raw(date: [u8; 4], time: [u8; 3]) -> TxDateTime {
        TxDateTime { date, time }
    }

    /// From 7 raw bytes `YYYYMMDDhhmmss` BCD.
    pub fn from_slice(bytes: &[u8]) -> Result<TxDateTime, ParseError> {
        let all: [u8; 7] = fixed(bytes)?;
        Ok(TxDateTime::from_raw(
            all[..4].try_into().expect("4 bytes"),
            all[4..].try_into().expect("3 bytes"),
        ))
    }

    /// Parses 14 digits `YYYYMMDDhhmmss`; checks digits only, not the calendar.
    pub fn parse_digits(digits: &str) -> Result<TxDateTime, ParseError> {
        let all: [u8; 7] = digits_to_bcd(digits)?;
        TxDateTime::from_slice(&all)
    }

    pub const fn date(&self) -> [u8; 4] {
        self.date
    }

    pub const fn time(&self) -> [u8; 3] {
        self.time
    }

    pub fn to_bytes(&self) -> [u8; 7] {
        let mut out = [0u8; 7];
        out[..4].copy_from_slice(&self.date);
        out[4..].copy_from_slice(&self.time);
        out
    }

    /// Whether every nibble is a decimal digit (a platform check; the card does not care).
    pub fn is_bcd(&self) -> bool {
        is_bcd(&self.date) && is_bcd(&self.time)
    }
}

impl fmt::Debug for TxDateTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TxDateTime(")?;
        write_hex(f, &self.date)?;
        write_hex(f, &self.time)?;
        f.write_str(")")
    }
}

/// EF0015, the 30-byte public application basic data (spec §1.1).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct IssuerData {
    pub issuer_id: [u8; 8],
    pub application_type: u8,
    pub application_version: u8,
    pub asn: Asn,
    /// `YYYYMMDD` BCD.
    pub start_date: [u8; 4],
    /// `YYYYMMDD` BCD.
    pub expiry_date: [u8; 4],
    pub issuer_custom: [u8; 2],
}

impl IssuerData {
    pub const LEN: usize = 30;

    pub fn to_bytes(&self) -> [u8; 30] {
        let mut out = [0u8; 30];
        out[..8].copy_from_slice(&self.issuer_id);
        out[8] = self.application_type;
        out[9] = self.application_version;
        out[10..20].copy_from_slice(&self.asn.0);
        out[20..24].copy_from_slice(&self.start_date);
        out[24..28].copy_from_slice(&self.expiry_date);
        out[28..].copy_from_slice(&self.issuer_custom);
        out
    }

    pub fn parse(bytes: &[u8]) -> Result<IssuerData, ParseError> {
        let b: [u8; 30] = fixed(bytes)?;
        Ok(IssuerData {
            issuer_id: b[..8].try_into().expect("8"),
            application_type: b[8],
            application_version: b[9],
            asn: Asn(b[10..20].try_into().expect("10")),
            start_date: b[20..24].try_into().expect("4"),
            expiry_date: b[24..28].try_into().expect("4"),
            issuer_custom: b[28..].try_into().expect("2"),
        })
    }
}

/// The largest overdraft limit the 3-byte EF0018 field can hold.
pub const OVERDRAFT_LIMIT_FEN_MAX: u32 = 0x00FF_FFFF;

/// One 23-byte EF0018 transaction-detail record (spec §1.1): counter (2) | overdraft limit (3)
/// | amount (4) | type (1) | terminal id (6) | date (4) | time (3).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct TransactionRecord {
    /// The online (load) or offline (purchase) counter the transaction used: the value
    /// INITIALIZE returned, before the card incremented it.
    pub counter: u16,
    overdraft_limit_fen: u32,
    pub amount_fen: u32,
    pub tx_type: TxType,
    pub terminal_id: TerminalId,
    pub date_time: TxDateTime,
}

impl TransactionRecord {
    pub const LEN: usize = 23;

    pub fn new(
        counter: u16,
        overdraft_limit_fen: u32,
        amount_fen: u32,
        tx_type: TxType,
        terminal_id: TerminalId,
        date_time: TxDateTime,
    ) -> Result<TransactionRecord, ParseError> {
        if overdraft_limit_fen > OVERDRAFT_LIMIT_FEN_MAX {
            return Err(ParseError::OverdraftTooLarge);
        }
        Ok(TransactionRecord {
            counter,
            overdraft_limit_fen,
            amount_fen,
            tx_type,
            terminal_id,
            date_time,
        })
    }

    pub const fn overdraft_limit_fen(&self) -> u32 {
        self.overdraft_limit_fen
    }

    /// The signed effect of this record on the purse balance, in fen.
    pub fn balance_effect_fen(&self) -> i64 {
        let amount = i64::from(self.amount_fen);
        if self.tx_type.is_credit() {
            amount
        } else {
            -amount
        }
    }

    pub fn to_bytes(&self) -> [u8; 23] {
        let mut out = [0u8; 23];
        out[..2].copy_from_slice(&self.counter.to_be_bytes());
        out[2..5].copy_from_slice(&self.overdraft_limit_fen.to_be_bytes()[1..]);
        out[5..9].copy_from_slice(&self.amount_fen.to_be_bytes());
        out[9] = self.tx_type.code();
        out[10..16].copy_from_slice(&self.terminal_id.0);
        out[16..23].copy_from_slice(&self.date_time.to_bytes());
        out
    }

    pub fn parse(bytes: &[u8]) -> Result<TransactionRecord, ParseError> {
        let b: [u8; 23] = fixed(bytes)?;
        Ok(TransactionRecord {
            counter: u16::from_be_bytes([b[0], b[1]]),
            overdraft_limit_fen: u32::from_be_bytes([0, b[2], b[3], b[4]]),
            amount_fen: u32::from_be_bytes(b[5..9].try_into().expect("4")),
            tx_type: TxType::from_code(b[9])?,
            terminal_id: TerminalId(b[10..16].try_into().expect("6")),
            date_time: TxDateTime::from_slice(&b[16..23])?,
        })
    }
}
