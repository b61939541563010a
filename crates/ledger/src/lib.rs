//! The double-entry ledger core of onecard: money, accounts, transfers and the rules that
//! accept or reject a transfer.
//!
//! This crate is pure: it does no IO, reads no clock and knows nothing of async or SQL. The
//! store prefetches the state a batch needs into a [`Ledger`], calls [`Ledger::apply_batch`]
//! with the time as an argument, and writes back what [`Ledger::take_changes`] returns.
//!
//! Vocabulary (one meaning per word, see ARCHITECTURE.md):
//! - an *account* holds four running sums: debits and credits, posted and pending;
//! - a *transfer* moves an amount from a debit account to a credit account; its id is chosen
//!   by the sender and is the idempotency key;
//! - a *hold* (pending transfer) reserves an amount until it is posted, voided or expires;
//! - a *posting* is the balanced effect of a posted transfer: the debit account's debits and the
//!   credit account's credits grow by the same amount, so the sum of all postings is zero.

mod account;
mod apply;
mod money;
mod rejection;
mod transfer;

pub use account::{Account, AccountId, AccountKind, AccountStatus};
pub use apply::{Changes, Ledger};
pub use money::{Fen, ParseFenError};
pub use rejection::Rejection;
pub use transfer::{
    HoldState, Outcome, ParseIdError, PendingHold, TIMEOUT_S_MAX, Timestamp, Transfer, TransferId,
    TransferKind, TransferRecord,
};
