//! Why a transfer was not applied: one closed enum, in precedence order.

use std::fmt;

/// Why a transfer was rejected. When several reasons apply, the one declared first wins, so a
/// transfer always gets the same single answer.
///
/// Rejections come in two classes (see [`Rejection::is_stored`]):
/// - *input* rejections (up to and including [`Rejection::PendingTransferNotFound`]): the request
///   is malformed or refers to nothing. Nothing is stored and the id stays free: bad input
///   changes nothing.
/// - *business* rejections: the request was well formed but the ledger's state refused it. The
///   answer is stored under the id, and a retry with the same body gets the same answer forever,
///   even if the state has changed since.
///
/// The codes are stored in the database and sent on the wire: never renumber.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum Rejection {
    /// The last transfer of a batch has the `linked` flag: its chain never closes.
    LinkedEventChainOpen = 1,
    /// The id is taken by a transfer with another body (or, for a linked transfer, another
    /// chain).
    ExistsWithDifferentBody = 2,
    AmountMustNotBeZero = 3,
    AmountMustNotBeNegative = 4,
    AccountsMustBeDifferent = 5,
    /// A post or void names itself as the hold it completes.
    PendingIdMustBeDifferent = 6,
    /// A hold's timeout is zero or longer than [`crate::TIMEOUT_S_MAX`].
    TimeoutOutOfRange = 7,
    DebitAccountNotFound = 8,
    CreditAccountNotFound = 9,
    /// A post or void names no hold that was ever accepted.
    PendingTransferNotFound = 10,
    PendingTransferHasDifferentAccounts = 11,
    /// A post asks for more than the hold reserved.
    PendingTransferAmountExceeded = 12,
    /// A void names another amount than the hold's.
    PendingTransferHasDifferentAmount = 13,
    PendingTransferAlreadyPosted = 14,
    PendingTransferAlreadyVoided = 15,
    PendingTransferExpired = 16,
    DebitAccountClosed = 17,
    CreditAccountClosed = 18,
    DebitAccountFrozen = 19,
    /// A running sum would pass `i64::MAX` fen.
    Overflow = 20,
    /// The debit account may not go below zero and does not hold enough.
    InsufficientBalance = 21,
    /// Another transfer of the same linked chain failed, so this one did not apply.
    LinkedEventFailed = 22,
}

impl Rejection {
    pub const ALL: [Rejection; 22] = [
        Rejection::LinkedEventChainOpen,
        Rejection::ExistsWithDifferentBody,
        Rejection::AmountMustNotBeZero,
        Rejection::AmountMustNotBeNegative,
        Rejection::AccountsMustBeDifferent,
        Rejection::PendingIdMustBeDifferent,
        Rejection::TimeoutOutOfRange,
        Rejection::DebitAccountNotFound,
        Rejection::CreditAccountNotFound,
        Rejection::PendingTransferNotFound,
        Rejection::PendingTransferHasDifferentAccounts,
        Rejection::PendingTransferAmountExceeded,
        Rejection::PendingTransferHasDifferentAmount,
        Rejection::PendingTransferAlreadyPosted,
        Rejection::PendingTransferAlreadyVoided,
        Rejection::PendingTransferExpired,
        Rejection::DebitAccountClosed,
        Rejection::CreditAccountClosed,
        Rejection::DebitAccountFrozen,
        Rejection::Overflow,
        Rejection::InsufficientBalance,
        Rejection::LinkedEventFailed,
    ];

    pub const fn code(self) -> i16 {
        self as i16
    }

    pub fn from_code(code: i16) -> Option<Rejection> {
        Rejection::ALL.into_iter().find(|r| r.code() == code)
    }

    /// Business rejections are stored under the transfer id; input rejections are not.
    /// `LinkedEventFailed` is stored only when its chain failed for a business reason, which
    /// the ledger decides; on its own it counts as business.
    pub const fn is_stored(self) -> bool {
        self as i16 > Rejection::PendingTransferNotFound as i16
    }

    /// A stable snake_case name for APIs and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Rejection::LinkedEventChainOpen => "linked_event_chain_open",
            Rejection::ExistsWithDifferentBody => "exists_with_different_body",
            Rejection::AmountMustNotBeZero => "amount_must_not_be_zero",
            Rejection::AmountMustNotBeNegative => "amount_must_not_be_negative",
            Rejection::AccountsMustBeDifferent => "accounts_must_be_different",
            Rejection::PendingIdMustBeDifferent => "pending_id_must_be_different",
            Rejection::TimeoutOutOfRange => "timeout_out_of_range",
            Rejection::DebitAccountNotFound => "debit_account_not_found",
            Rejection::CreditAccountNotFound => "credit_account_not_found",
            Rejection::PendingTransferNotFound => "pending_transfer_not_found",
            Rejection::PendingTransferHasDifferentAccounts => {
                "pending_transfer_has_different_accounts"
            }
            Rejection::PendingTransferAmountExceeded => "pending_transfer_amount_exceeded",
            Rejection::PendingTransferHasDifferentAmount => "pending_transfer_has_different_amount",
            Rejection::PendingTransferAlreadyPosted => "pending_transfer_already_posted",
            Rejection::PendingTransferAlreadyVoided => "pending_transfer_already_voided",
            Rejection::PendingTransferExpired => "pending_transfer_expired",
            Rejection::DebitAccountClosed => "debit_account_closed",
            Rejection::CreditAccountClosed => "credit_account_closed",
            Rejection::DebitAccountFrozen => "debit_account_frozen",
            Rejection::Overflow => "overflow",
            Rejection::InsufficientBalance => "insufficient_balance",
            Rejection::LinkedEventFailed => "linked_event_failed",
        }
    }

    /// A sentence for a person.
    pub const fn message(self) -> &'static str {
        match self {
            Rejection::LinkedEventChainOpen => {
                "the last transfer of the batch is linked to nothing"
            }
            Rejection::ExistsWithDifferentBody => {
                "a transfer with this id exists with a different body"
            }
            Rejection::AmountMustNotBeZero => "the amount must not be zero",
            Rejection::AmountMustNotBeNegative => "the amount must not be negative",
            Rejection::AccountsMustBeDifferent => "debit and credit accounts must be different",
            Rejection::PendingIdMustBeDifferent => "a transfer cannot complete itself",
            Rejection::TimeoutOutOfRange => "the hold's timeout is out of range",
            Rejection::DebitAccountNotFound => "the debit account does not exist",
            Rejection::CreditAccountNotFound => "the credit account does not exist",
            Rejection::PendingTransferNotFound => "no pending transfer has that id",
            Rejection::PendingTransferHasDifferentAccounts => {
                "the pending transfer has other accounts"
            }
            Rejection::PendingTransferAmountExceeded => "the amount exceeds the pending amount",
            Rejection::PendingTransferHasDifferentAmount => {
                "the pending transfer has another amount"
            }
            Rejection::PendingTransferAlreadyPosted => "the pending transfer was already posted",
            Rejection::PendingTransferAlreadyVoided => "the pending transfer was already voided",
            Rejection::PendingTransferExpired => "the pending transfer has expired",
            Rejection::DebitAccountClosed => "the debit account is closed",
            Rejection::CreditAccountClosed => "the credit account is closed",
            Rejection::DebitAccountFrozen => "the debit account is frozen",
            Rejection::Overflow => "the amount would overflow an account's totals",
            Rejection::InsufficientBalance => "insufficient balance",
            Rejection::LinkedEventFailed => "another transfer of the linked chain failed",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for Rejection {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_follow_declaration_order() {
        for (i, r) in Rejection::ALL.iter().enumerate() {
            assert_eq!(r.code() as usize, i + 1);
            assert_eq!(Rejection::from_code(r.code()), Some(*r));
        }
        assert_eq!(Rejection::from_code(0), None);
        assert!(!Rejection::PendingTransferNotFound.is_stored());
        assert!(Rejection::PendingTransferHasDifferentAccounts.is_stored());
    }
}
