//! Transfers, their ids, holds and stored outcomes.

use std::fmt;
use std::str::FromStr;

use crate::{AccountId, Fen, Rejection};

/// The longest a hold may wait to be posted or voided: 30 days.
pub const TIMEOUT_S_MAX: u32 = 30 * 24 * 3600;

/// Milliseconds since the Unix epoch. The ledger never reads a clock: time is an argument.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn plus_seconds(self, seconds: u32) -> Timestamp {
        Timestamp(self.0.saturating_add(i64::from(seconds) * 1000))
    }
}

/// A transfer id chosen by the sender: 128 bits, never zero, written as a UUID.
/// It is the idempotency key of the transfer.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct TransferId(u128);

impl TransferId {
    pub const fn new(id: u128) -> Option<TransferId> {
        if id == 0 { None } else { Some(TransferId(id)) }
    }

    pub const fn get(self) -> u128 {
        self.0
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Option<TransferId> {
        TransferId::new(u128::from_be_bytes(bytes))
    }

    pub fn to_uuid(self) -> uuid::Uuid {
        uuid::Uuid::from_u128(self.0)
    }
}

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_uuid().hyphenated())
    }
}

/// Why a text is not a transfer id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseIdError {
    pub input: String,
    pub reason: &'static str,
}

impl fmt::Display for ParseIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid transfer id {:?}: {}", self.input, self.reason)
    }
}

impl std::error::Error for ParseIdError {}

impl FromStr for TransferId {
    type Err = ParseIdError;

    /// Accepts a UUID in any of its usual spellings (hyphenated, 32 hex digits, braced, urn).
    fn from_str(s: &str) -> Result<TransferId, ParseIdError> {
        let err = |reason| ParseIdError {
            input: s.to_owned(),
            reason,
        };
        let uuid = uuid::Uuid::parse_str(s.trim())
            .map_err(|_| err("expected a UUID such as 0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"))?;
        TransferId::new(uuid.as_u128()).ok_or_else(|| err("the zero id is reserved"))
    }
}

/// What a transfer does.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum TransferKind {
    /// Posts at once.
    Single,
    /// Holds the amount (a pending transfer) until posted, voided or `timeout_s` has passed.
    Pending { timeout_s: u32 },
    /// Posts (part of) a hold; what is not posted is released.
    Post { pending_id: TransferId },
    /// Releases a hold.
    Void { pending_id: TransferId },
}

impl TransferKind {
    /// The code stored in the database: never renumber.
    pub const fn code(self) -> i16 {
        match self {
            TransferKind::Single => 0,
            TransferKind::Pending { .. } => 1,
            TransferKind::Post { .. } => 2,
            TransferKind::Void { .. } => 3,
        }
    }

    pub const fn pending_id(self) -> Option<TransferId> {
        match self {
            TransferKind::Post { pending_id } | TransferKind::Void { pending_id } => {
                Some(pending_id)
            }
            TransferKind::Single | TransferKind::Pending { .. } => None,
        }
    }

    pub const fn timeout_s(self) -> u32 {
        match self {
            TransferKind::Pending { timeout_s } => timeout_s,
            _ => 0,
        }
    }

    /// Rebuilds a kind from its stored columns; `None` if they do not fit together.
    pub fn from_parts(
        code: i16,
        pending_id: Option<TransferId>,
        timeout_s: u32,
    ) -> Option<TransferKind> {
        match (code, pending_id) {
            (0, None) if timeout_s == 0 => Some(TransferKind::Single),
            (1, None) => Some(TransferKind::Pending { timeout_s }),
            (2, Some(pending_id)) if timeout_s == 0 => Some(TransferKind::Post { pending_id }),
            (3, Some(pending_id)) if timeout_s == 0 => Some(TransferKind::Void { pending_id }),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            TransferKind::Single => "single",
            TransferKind::Pending { .. } => "pending",
            TransferKind::Post { .. } => "post",
            TransferKind::Void { .. } => "void",
        }
    }
}

/// A request to move `amount` from `debit` to `credit`. Its body is every field; a retry must
/// send the same body to get the original answer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Transfer {
    pub id: TransferId,
    pub debit: AccountId,
    pub credit: AccountId,
    pub amount: Fen,
    pub kind: TransferKind,
    /// Linked to the next transfer of the batch: the chain succeeds or fails together.
    pub linked: bool,
    /// The business meaning (purchase, load, fee, ...), chosen by the use case.
    pub code: u16,
}

/// The answer to a transfer: the time it was applied, or why not.
pub type Outcome = Result<Timestamp, Rejection>;

/// A transfer as stored under its id, with its answer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TransferRecord {
    pub transfer: Transfer,
    pub outcome: Outcome,
    /// When the ledger answered (also for a stored rejection).
    pub timestamp: Timestamp,
}

/// Where a hold stands.
///
/// The codes are stored in the database: never renumber.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum HoldState {
    Pending = 0,
    Posted = 1,
    Voided = 2,
    Expired = 3,
}

impl HoldState {
    pub const fn code(self) -> i16 {
        self as i16
    }

    pub fn from_code(code: i16) -> Option<HoldState> {
        match code {
            0 => Some(HoldState::Pending),
            1 => Some(HoldState::Posted),
            2 => Some(HoldState::Voided),
            3 => Some(HoldState::Expired),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            HoldState::Pending => "pending",
            HoldState::Posted => "posted",
            HoldState::Voided => "voided",
            HoldState::Expired => "expired",
        }
    }
}

/// An accepted pending transfer and where it stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PendingHold {
    pub id: TransferId,
    pub debit: AccountId,
    pub credit: AccountId,
    pub amount: Fen,
    pub expires_at: Timestamp,
    pub state: HoldState,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_from_uuid_spellings_and_refuse_zero() {
        let id: TransferId = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".parse().unwrap();
        assert_eq!(id.to_string(), "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b");
        assert_eq!(
            "0190a1b2c3d47e5f8a9b0c1d2e3f4a5b".parse::<TransferId>(),
            Ok(id)
        );
        assert_eq!(TransferId::from_bytes(id.to_bytes()), Some(id));
        let zero = "00000000-0000-0000-0000-000000000000"
            .parse::<TransferId>()
            .unwrap_err();
        assert_eq!(zero.reason, "the zero id is reserved");
        assert!("not-an-id".parse::<TransferId>().is_err());
        assert!(
            "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5"
                .parse::<TransferId>()
                .is_err()
        );
    }

    #[test]
    fn kinds_round_trip_through_parts() {
        let p = TransferId::new(7).unwrap();
        for k in [
            TransferKind::Single,
            TransferKind::Pending { timeout_s: 60 },
            TransferKind::Post { pending_id: p },
            TransferKind::Void { pending_id: p },
        ] {
            assert_eq!(
                TransferKind::from_parts(k.code(), k.pending_id(), k.timeout_s()),
                Some(k)
            );
        }
        assert_eq!(TransferKind::from_parts(2, None, 0), None);
        assert_eq!(TransferKind::from_parts(0, Some(p), 0), None);
    }
}
