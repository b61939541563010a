//! ISO 7816-4 short APDUs: a command parser for cases 1-4, the response type and the status
//! words of spec §1.9.
//!
//! The parser never panics: any byte string is either a [`Command`] or an [`ApduError`],
//! and every error maps to a [`StatusWord`] a card can answer with. Extended-length APDUs
//! are refused (PBOC purse commands are all short).

use std::fmt;

/// The most data bytes a short command carries (Lc is one byte).
pub const COMMAND_DATA_MAX: usize = 255;
/// The most data bytes a short response carries (Le `00` means 256).
pub const RESPONSE_DATA_MAX: usize = 256;

/// Status words (SW1 SW2). The named ones are those of spec §1.9, plus the ISO 7816-4 codes
/// a card needs for commands it does not know.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum StatusWord {
    /// `9000`.
    Success,
    /// `6700` wrong Lc or Le.
    WrongLength,
    /// `6A86` wrong P1 or P2.
    WrongP1P2,
    /// `6A81` function not supported / application locked.
    FunctionNotSupported,
    /// `6A82` file or application not found.
    FileNotFound,
    /// `6A83` record not found.
    RecordNotFound,
    /// `6A80` incorrect data field (ISO 7816-4; used by the PSAM for bad 8070 data).
    WrongData,
    /// `6B00` offset outside the file (ISO 7816-4).
    WrongOffset,
    /// `6982` security status not satisfied.
    SecurityStatusNotSatisfied,
    /// `6983` authentication method or PIN blocked.
    AuthenticationBlocked,
    /// `6985` conditions of use not satisfied.
    ConditionsNotSatisfied,
    /// `63Cx` wrong PIN, `x` tries left (0-15).
    WrongPin { tries_left: u8 },
    /// `9302` MAC invalid.
    MacInvalid,
    /// `9303` application permanently locked.
    PermanentlyLocked,
    /// `9401` insufficient balance.
    InsufficientBalance,
    /// `9403` key index not supported.
    KeyIndexNotSupported,
    /// `9406` required MAC not available.
    MacNotAvailable,
    /// `6D00` instruction not supported (ISO 7816-4).
    InsNotSupported,
    /// `6E00` class not supported (ISO 7816-4).
    ClaNotSupported,
    /// Any other status word, as received from a real card. [`StatusWord::from_u16`] never
    /// makes one of these for a code that has a name above.
    Other(u16),
}

impl StatusWord {
    pub fn to_u16(self) -> u16 {
        match self {
            StatusWord::Success => 0x9000,
            StatusWord::WrongLength => 0x6700,
            StatusWord::WrongP1P2 => 0x6A86,
            StatusWord::FunctionNotSupported => 0x6A81,
            StatusWord::FileNotFound => 0x6A82,
            StatusWord::RecordNotFound => 0x6A83,
            StatusWord::WrongData => 0x6A80,
            StatusWord::WrongOffset => 0x6B00,
            StatusWord::SecurityStatusNotSatisfied => 0x6982,
            StatusWord::AuthenticationBlocked => 0x6983,
            StatusWord::ConditionsNotSatisfied => 0x6985,
            StatusWord::WrongPin { tries_left } => 0x63C0 | u16::from(tries_left.min(0x0F)),
            StatusWord::MacInvalid => 0x9302,
            StatusWord::PermanentlyLocked => 0x9303,
            StatusWord::InsufficientBalance => 0x9401,
            StatusWord::KeyIndexNotSupported => 0x9403,
            StatusWord::MacNotAvailable => 0x9406,
            StatusWord::InsNotSupported => 0x6D00,
            StatusWord::ClaNotSupported => 0x6E00,
            StatusWord::Other(sw) => sw,
        }
    }

    pub fn from_u16(sw: u16) -> StatusWord {
        match sw {
            0x9000 => StatusWord::Success,
            0x6700 => StatusWord::WrongLength,
            0x6A86 => StatusWord::WrongP1P2,
            0x6A81 => StatusWord::FunctionNotSupported,
            0x6A82 => StatusWord::FileNotFound,
            0x6A83 => StatusWord::RecordNotFound,
            0x6A80 => StatusWord::WrongData,
            0x6B00 => StatusWord::WrongOffset,
            0x6982 => StatusWord::SecurityStatusNotSatisfied,
            0x6983 => StatusWord::AuthenticationBlocked,
            0x6985 => StatusWord::ConditionsNotSatisfied,
            0x63C0..=0x63CF => StatusWord::WrongPin {
                tries_left: (sw & 0x0F) as u8,
            },
            0x9302 => StatusWord::MacInvalid,
            0x9303 => StatusWord::PermanentlyLocked,
            0x9401 => StatusWord::InsufficientBalance,
            0x9403 => StatusWord::KeyIndexNotSupported,
            0x9406 => StatusWord::MacNotAvailable,
            0x6D00 => StatusWord::InsNotSupported,
            0x6E00 => StatusWord::ClaNotSupported,
            other => StatusWord::Other(other),
        }
    }

    pub fn to_bytes(self) -> [u8; 2] {
        self.to_u16().to_be_bytes()
    }

    pub fn is_success(self) -> bool {
        self == StatusWord::Success
    }
}

impl fmt::Display for StatusWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04X}", self.to_u16())
    }
}

/// Why bytes are not a short command APDU. Every case is answered with `6700`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ApduError {
    /// Fewer than the 4 header bytes.
    TooShort { len: usize },
    /// Lc `00` followed by more bytes: an extended-length APDU, not supported.
    ExtendedLength,
    /// The body is neither `Lc data` nor `Lc data Le`.
    LcMismatch { lc: usize, body_len: usize },
}

impl ApduError {
    /// The status word a card answers to this malformed command.
    pub fn status_word(self) -> StatusWord {
        match self {
            ApduError::TooShort { .. }
            | ApduError::ExtendedLength
            | ApduError::LcMismatch { .. } => StatusWord::WrongLength,
        }
    }
}

impl fmt::Display for ApduError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApduError::TooShort { len } => write!(f, "APDU of {len} bytes has no full header"),
            ApduError::ExtendedLength => f.write_str("extended-length APDUs are not supported"),
            ApduError::LcMismatch { lc, body_len } => {
                write!(f, "Lc {lc} does not match a body of {body_len} bytes")
            }
        }
    }
}

impl std::error::Error for ApduError {}

/// A short command APDU, borrowing its data from the input.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Command<'a> {
    cla: u8,
    ins: u8,
    p1: u8,
    p2: u8,
    data: &'a [u8],
    le: Option<u16>,
}

impl<'a> Command<'a> {
    /// Parses a short APDU:
    /// case 1 `CLA INS P1 P2`; case 2 `.. Le`; case 3 `.. Lc data`; case 4 `.. Lc data Le`.
    pub fn parse(bytes: &'a [u8]) -> Result<Command<'a>, ApduError> {
        let (header, body) = match bytes.split_first_chunk::<4>() {
            Some(split) => split,
            None => return Err(ApduError::TooShort { len: bytes.len() }),
        };
        let [cla, ins, p1, p2] = *header;
        let (data, le): (&[u8], Option<u8>) = match body {
            [] => (&[], None),
            [le] => (&[], Some(*le)),
            [0, ..] => return Err(ApduError::ExtendedLength),
            [lc, rest @ ..] => {
                let lc = usize::from(*lc);
                if rest.len() == lc {
                    (rest, None)
                } else if rest.len() == lc + 1 {
                    (&rest[..lc], Some(rest[lc]))
                } else {
                    return Err(ApduError::LcMismatch {
                        lc,
                        body_len: rest.len(),
                    });
                }
            }
        };
        Ok(Command {
            cla,
            ins,
            p1,
            p2,
            data,
            le: le.map(decode_le),
        })
    }

    /// A command to send. `le` is the expected response length, 1-256.
    ///
    /// Panics if `data` is longer than [`COMMAND_DATA_MAX`] or `le` is outside 1-256: those are
    /// programming errors of the caller, not input.
    pub fn new(cla: u8, ins: u8, p1: u8, p2: u8, data: &'a [u8], le: Option<u16>) -> Self {
        assert!(data.len() <= COMMAND_DATA_MAX, "short APDU data too long");
        assert!(
            le.is_none_or(|le| (1..=RESPONSE_DATA_MAX as u16).contains(&le)),
            "Le out of range"
        );
        Command {
            cla,
            ins,
            p1,
            p2,
            data,
            le,
        }
    }

    pub fn cla(&self) -> u8 {
        self.cla
    }

    pub fn ins(&self) -> u8 {
        self.ins
    }

    pub fn p1(&self) -> u8 {
        self.p1
    }

    pub fn p2(&self) -> u8 {
        self.p2
    }

    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// The expected response length, 1-256 (a wire `00` is 256), if the command has an Le.
    pub fn le(&self) -> Option<u16> {
        self.le
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + self.data.len());
        out.extend_from_slice(&[self.cla, self.ins, self.p1, self.p2]);
        if !self.data.is_empty() {
            out.push(self.data.len() as u8);
            out.extend_from_slice(self.data);
        }
        if let Some(le) = self.le {
            // 256 travels as 00; `new` keeps le within 1..=256.
            out.push((le & 0xFF) as u8);
        }
        out
    }
}

fn decode_le(raw: u8) -> u16 {
    if raw == 0 { 256 } else { u16::from(raw) }
}

/// A response APDU: data (at most 256 bytes) and a status word.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Response {
    data: Vec<u8>,
    sw: StatusWord,
}

impl Response {
    /// A successful response with data. Panics if `data` is longer than
    /// [`RESPONSE_DATA_MAX`], a programming error.
    pub fn ok(data: Vec<u8>) -> Response {
        assert!(data.len() <= RESPONSE_DATA_MAX, "response data too long");
        Response {
            data,
            sw: StatusWord::Success,
        }
    }

    /// A response with no data.
    pub fn status(sw: StatusWord) -> Response {
        Response {
            data: Vec::new(),
            sw,
        }
    }

    /// Splits `data ‖ SW1 SW2` as received from a card.
    pub fn parse(bytes: &[u8]) -> Result<Response, ApduError> {
        match bytes.split_last_chunk::<2>() {
            Some((data, sw)) if data.len() <= RESPONSE_DATA_MAX => Ok(Response {
                data: data.to_vec(),
                sw: StatusWord::from_u16(u16::from_be_bytes(*sw)),
            }),
            Some((data, _)) => Err(ApduError::LcMismatch {
                lc: RESPONSE_DATA_MAX,
                body_len: data.len(),
            }),
            None => Err(ApduError::TooShort { len: bytes.len() }),
        }
    }

    pub fn data(&self) -> &[u8] {
        &self.data
    }

    pub fn sw(&self) -> StatusWord {
        self.sw
    }

    pub fn is_ok(&self) -> bool {
        self.sw.is_success()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.data.len() + 2);
        out.extend_from_slice(&self.data);
        out.extend_from_slice(&self.sw.to_bytes());
        out
    }
}
