//! Ledger accounts: identity, kind, status and the four running sums.

use std::fmt;
use std::str::FromStr;

use crate::Fen;

/// A ledger account's id. Positive; allocated by the store.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct AccountId(i64);

impl AccountId {
    /// `None` unless `id` is positive.
    pub const fn new(id: i64) -> Option<AccountId> {
        if id > 0 { Some(AccountId(id)) } else { None }
    }

    pub const fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for AccountId {
    type Err = String;

    fn from_str(s: &str) -> Result<AccountId, String> {
        s.trim()
            .parse::<i64>()
            .ok()
            .and_then(AccountId::new)
            .ok_or_else(|| format!("invalid account id {s:?}: expected a positive integer"))
    }
}

/// What an account is for. The kind decides whether the account may go below zero.
///
/// The codes are stored in the database: never renumber.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum AccountKind {
    /// A cardholder's money held in the database (以库为准).
    CardholderOnline = 1,
    /// The server's shadow of a card's electronic purse (以卡为准).
    CardholderPurse = 2,
    /// What the platform owes a merchant until settlement.
    MerchantPayable = 3,
    /// Money in transit from one bank (one account per bank).
    BankClearing = 4,
    /// The school's fund that subsidies are paid from.
    SubsidyFund = 5,
    /// Card deposits held for cardholders.
    CardDeposit = 6,
    /// Fees the platform has earned.
    FeeIncome = 7,
    /// Cash taken at card desks.
    Cash = 8,
    /// Money whose owner is not yet known (reconciliation differences, unmatched records).
    Suspense = 9,
}

impl AccountKind {
    pub const ALL: [AccountKind; 9] = [
        AccountKind::CardholderOnline,
        AccountKind::CardholderPurse,
        AccountKind::MerchantPayable,
        AccountKind::BankClearing,
        AccountKind::SubsidyFund,
        AccountKind::CardDeposit,
        AccountKind::FeeIncome,
        AccountKind::Cash,
        AccountKind::Suspense,
    ];

    /// Money the platform owes someone (a liability) must never go below zero: its debits,
    /// posted and held, never exceed its posted credits. Asset-side accounts (bank clearing,
    /// cash), the subsidy fund (funded by the school, settled outside) and suspense may.
    pub const fn must_not_overdraw(self) -> bool {
        matches!(
            self,
            AccountKind::CardholderOnline
                | AccountKind::CardholderPurse
                | AccountKind::MerchantPayable
                | AccountKind::CardDeposit
                | AccountKind::FeeIncome
        )
    }

    pub const fn code(self) -> i16 {
        self as i16
    }

    pub fn from_code(code: i16) -> Option<AccountKind> {
        AccountKind::ALL.into_iter().find(|k| k.code() == code)
    }

    pub const fn name(self) -> &'static str {
        match self {
            AccountKind::CardholderOnline => "cardholder_online",
            AccountKind::CardholderPurse => "cardholder_purse",
            AccountKind::MerchantPayable => "merchant_payable",
            AccountKind::BankClearing => "bank_clearing",
            AccountKind::SubsidyFund => "subsidy_fund",
            AccountKind::CardDeposit => "card_deposit",
            AccountKind::FeeIncome => "fee_income",
            AccountKind::Cash => "cash",
            AccountKind::Suspense => "suspense",
        }
    }
}

impl FromStr for AccountKind {
    type Err = String;

    fn from_str(s: &str) -> Result<AccountKind, String> {
        AccountKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = AccountKind::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "unknown account kind {s:?}: expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Whether an account takes part in new movements.
///
/// The codes are stored in the database: never renumber.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum AccountStatus {
    Open = 0,
    /// Money may come in, nothing may go out (for example a card reported lost).
    Frozen = 1,
    /// No new movement either way. Only an account with nothing on it can be closed.
    Closed = 2,
}

impl AccountStatus {
    pub const fn code(self) -> i16 {
        self as i16
    }

    pub fn from_code(code: i16) -> Option<AccountStatus> {
        match code {
            0 => Some(AccountStatus::Open),
            1 => Some(AccountStatus::Frozen),
            2 => Some(AccountStatus::Closed),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            AccountStatus::Open => "open",
            AccountStatus::Frozen => "frozen",
            AccountStatus::Closed => "closed",
        }
    }
}

/// An account and its four running sums. The sums only grow by postings and holds applied by
/// [`crate::Ledger`]; each is non-negative.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Account {
    pub id: AccountId,
    pub kind: AccountKind,
    pub status: AccountStatus,
    pub debits_posted: Fen,
    pub credits_posted: Fen,
    pub debits_pending: Fen,
    pub credits_pending: Fen,
}

impl Account {
    pub fn new(id: AccountId, kind: AccountKind) -> Account {
        Account {
            id,
            kind,
            status: AccountStatus::Open,
            debits_posted: Fen::ZERO,
            credits_posted: Fen::ZERO,
            debits_pending: Fen::ZERO,
            credits_pending: Fen::ZERO,
        }
    }

    /// Posted credits minus posted debits: what the platform owes the owner. Negative for
    /// asset-side accounts such as bank clearing and cash.
    pub fn balance(&self) -> Fen {
        // Both sums are non-negative i64, so the difference cannot overflow.
        Fen::new(self.credits_posted.get() - self.debits_posted.get())
    }

    /// The balance less what is held for pending debits: what may still be spent.
    pub fn available(&self) -> Fen {
        Fen::new(
            self.balance()
                .get()
                .saturating_sub(self.debits_pending.get()),
        )
    }

    /// True when nothing is on the account, posted or held: only then may it close.
    pub fn is_empty(&self) -> bool {
        self.balance() == Fen::ZERO
            && self.debits_pending == Fen::ZERO
            && self.credits_pending == Fen::ZERO
    }
}
