//! The accounting step: applies a batch of transfers to prefetched state.
//!
//! The store loads every account, stored transfer and hold that a batch names into a
//! [`Ledger`], calls [`Ledger::apply_batch`], then writes back [`Ledger::take_changes`] in one
//! database transaction. The same type, filled by hand, is an in-memory ledger for tests and
//! the benchmark.
//!
//! Rules, in the order they are checked (see [`Rejection`] for the precedence of reasons):
//! 1. Transfers form chains: a run of `linked` transfers and the first unlinked one after them.
//!    A chain applies whole or not at all; a lone transfer is a chain of one.
//! 2. An id that is already stored answers with its stored outcome when the body is the same,
//!    and with `ExistsWithDifferentBody` otherwise. A chain is a retry only if every member is.
//! 3. Input rejections store nothing; business rejections store the outcome of every member of
//!    the chain (the failing one with its reason, the others with `LinkedEventFailed`).

use rustc_hash::FxHashMap;

use crate::{
    Account, AccountId, AccountStatus, Fen, HoldState, Outcome, PendingHold, Rejection,
    TIMEOUT_S_MAX, Timestamp, Transfer, TransferId, TransferKind, TransferRecord,
};

#[derive(Debug)]
struct Slot<T> {
    value: T,
    dirty: bool,
}

/// What a batch changed, for the store to write back. Each account and hold appears once,
/// however many transfers touched it: a hot account is written once per batch.
#[derive(Debug, Default)]
pub struct Changes {
    /// Accounts whose sums changed, in ascending id order (the store's lock order).
    pub accounts: Vec<Account>,
    /// New stored outcomes, in the order they were decided.
    pub records: Vec<TransferRecord>,
    /// Holds created or whose state changed, in ascending id order.
    pub holds: Vec<PendingHold>,
}

/// The new values a valid transfer produces, computed before anything is written.
struct Effect {
    debit: Account,
    credit: Account,
    hold: Option<PendingHold>,
}

enum Undo {
    Account(Account),
    Hold(TransferId, Option<PendingHold>),
}

/// Ledger state: accounts, stored transfers and holds, in memory.
#[derive(Debug, Default)]
pub struct Ledger {
    accounts: FxHashMap<AccountId, Slot<Account>>,
    records: FxHashMap<TransferId, TransferRecord>,
    holds: FxHashMap<TransferId, Slot<PendingHold>>,
    new_records: Vec<TransferRecord>,
    /// Accounts and holds marked dirty since the last `take_changes`, each once: collecting
    /// changes costs what changed, not what was loaded.
    dirty_accounts: Vec<AccountId>,
    dirty_holds: Vec<TransferId>,
}

impl std::fmt::Debug for Undo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Undo")
    }
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// A ledger sized for a batch naming about `accounts` accounts and `transfers` transfers.
    pub fn with_capacity(accounts: usize, transfers: usize) -> Ledger {
        Ledger {
            accounts: FxHashMap::with_capacity_and_hasher(accounts, Default::default()),
            records: FxHashMap::with_capacity_and_hasher(transfers, Default::default()),
            new_records: Vec::with_capacity(transfers),
            dirty_accounts: Vec::with_capacity(accounts),
            ..Ledger::default()
        }
    }

    /// Forgets everything, keeping the memory: a writer reuses one ledger for every group
    /// instead of allocating (and page-faulting) fresh maps each time.
    pub fn clear(&mut self) {
        self.accounts.clear();
        self.records.clear();
        self.holds.clear();
        self.new_records.clear();
        self.dirty_accounts.clear();
        self.dirty_holds.clear();
    }

    /// Loads an account as it stands in the store (not a change).
    pub fn load_account(&mut self, account: Account) {
        self.accounts.insert(
            account.id,
            Slot {
                value: account,
                dirty: false,
            },
        );
    }

    /// Loads a stored transfer outcome (not a change).
    pub fn load_record(&mut self, record: TransferRecord) {
        self.records.insert(record.transfer.id, record);
    }

    /// Loads a hold as it stands in the store (not a change).
    pub fn load_hold(&mut self, hold: PendingHold) {
        self.holds.insert(
            hold.id,
            Slot {
                value: hold,
                dirty: false,
            },
        );
    }

    /// Creates a new account (a change the store must write).
    pub fn create_account(&mut self, account: Account) {
        self.accounts.insert(
            account.id,
            Slot {
                value: account,
                dirty: true,
            },
        );
        self.dirty_accounts.push(account.id);
    }

    /// Changes an account's status. Closing needs an empty account.
    pub fn set_status(&mut self, id: AccountId, status: AccountStatus) -> Result<(), String> {
        let slot = self
            .accounts
            .get_mut(&id)
            .ok_or_else(|| format!("no account {id}"))?;
        if status == AccountStatus::Closed && !slot.value.is_empty() {
            return Err(format!(
                "account {id} cannot close: balance {} and holds {}/{} remain",
                slot.value.balance(),
                slot.value.debits_pending,
                slot.value.credits_pending
            ));
        }
        slot.value.status = status;
        if !std::mem::replace(&mut slot.dirty, true) {
            self.dirty_accounts.push(id);
        }
        Ok(())
    }

    pub fn account(&self, id: AccountId) -> Option<&Account> {
        self.accounts.get(&id).map(|s| &s.value)
    }

    pub fn accounts(&self) -> impl Iterator<Item = &Account> {
        self.accounts.values().map(|s| &s.value)
    }

    pub fn record(&self, id: TransferId) -> Option<&TransferRecord> {
        self.records.get(&id)
    }

    pub fn hold(&self, id: TransferId) -> Option<&PendingHold> {
        self.holds.get(&id).map(|s| &s.value)
    }

    pub fn holds(&self) -> impl Iterator<Item = &PendingHold> {
        self.holds.values().map(|s| &s.value)
    }

    /// Takes what changed since the last call, clearing the change marks.
    pub fn take_changes(&mut self) -> Changes {
        let mut accounts: Vec<Account> = std::mem::take(&mut self.dirty_accounts)
            .into_iter()
            .filter_map(|id| {
                let slot = self.accounts.get_mut(&id).filter(|s| s.dirty)?;
                slot.dirty = false;
                Some(slot.value)
            })
            .collect();
        accounts.sort_unstable_by_key(|a| a.id);
        let mut holds: Vec<PendingHold> = std::mem::take(&mut self.dirty_holds)
            .into_iter()
            .filter_map(|id| {
                // A hold created and rolled back in a failed chain is gone: nothing to write.
                // The filter also drops a second mark of a hold re-created in the same batch.
                let slot = self.holds.get_mut(&id).filter(|s| s.dirty)?;
                slot.dirty = false;
                Some(slot.value)
            })
            .collect();
        holds.sort_unstable_by_key(|h| h.id);
        Changes {
            accounts,
            records: std::mem::take(&mut self.new_records),
            holds,
        }
    }

    /// Applies `transfers` in order at time `now` and answers each one.
    pub fn apply_batch(&mut self, transfers: &[Transfer], now: Timestamp) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(transfers.len());
        let mut start = 0;
        while start < transfers.len() {
            let Some(end) = transfers[start..].iter().position(|t| !t.linked) else {
                // The chain never closes: every member fails, nothing is stored.
                let last = transfers.len() - 1;
                outcomes.extend((start..=last).map(|i| {
                    Err(if i == last {
                        Rejection::LinkedEventChainOpen
                    } else {
                        Rejection::LinkedEventFailed
                    })
                }));
                break;
            };
            let chain = &transfers[start..=start + end];
            if let [t] = chain {
                outcomes.push(self.apply_one(t, now));
            } else {
                self.apply_chain(chain, now, &mut outcomes);
            }
            start += end + 1;
        }
        debug_assert_eq!(outcomes.len(), transfers.len());
        outcomes
    }

    /// Releases every pending hold whose time has come (`expires_at <= now`). The store must
    /// have loaded the holds it wants expired and their accounts. Returns how many expired.
    pub fn expire(&mut self, now: Timestamp) -> usize {
        let due: Vec<PendingHold> = self
            .holds
            .values()
            .map(|s| s.value)
            .filter(|h| h.state == HoldState::Pending && h.expires_at <= now)
            .collect();
        for hold in &due {
            for (id, is_debit) in [(hold.debit, true), (hold.credit, false)] {
                let slot = self
                    .accounts
                    .get_mut(&id)
                    .expect("store loads a hold's accounts");
                let sum = if is_debit {
                    &mut slot.value.debits_pending
                } else {
                    &mut slot.value.credits_pending
                };
                *sum = sum
                    .checked_sub(hold.amount)
                    .expect("a hold is within its account's sums");
                if !std::mem::replace(&mut slot.dirty, true) {
                    self.dirty_accounts.push(id);
                }
            }
            let slot = self.holds.get_mut(&hold.id).expect("hold was just read");
            slot.value.state = HoldState::Expired;
            if !std::mem::replace(&mut slot.dirty, true) {
                self.dirty_holds.push(hold.id);
            }
        }
        due.len()
    }

    fn apply_one(&mut self, t: &Transfer, now: Timestamp) -> Outcome {
        if let Some(existing) = self.records.get(&t.id) {
            return if existing.transfer == *t {
                existing.outcome
            } else {
                Err(Rejection::ExistsWithDifferentBody)
            };
        }
        match self.validate(t, now) {
            Ok(effect) => {
                self.commit(effect, None);
                self.store(t, Ok(now), now);
                Ok(now)
            }
            Err(r) => {
                if r.is_stored() {
                    self.store(t, Err(r), now);
                }
                Err(r)
            }
        }
    }

    fn apply_chain(&mut self, chain: &[Transfer], now: Timestamp, outcomes: &mut Vec<Outcome>) {
        let existing: Vec<Option<&TransferRecord>> =
            chain.iter().map(|t| self.records.get(&t.id)).collect();
        if existing.iter().all(|e| e.is_some()) {
            let same = chain
                .iter()
                .zip(&existing)
                .all(|(t, e)| e.is_some_and(|e| e.transfer == *t));
            if same {
                outcomes.extend(existing.iter().map(|e| e.expect("all exist").outcome));
                return;
            }
        }
        let repeated = |i: usize| chain[..i].iter().any(|p| p.id == chain[i].id);
        if existing.iter().any(|e| e.is_some()) || (0..chain.len()).any(repeated) {
            // Part of the chain exists, or the chain names one id twice: this is not a retry
            // of a stored chain, and it cannot be stored. Nothing applies.
            outcomes.extend((0..chain.len()).map(|i| {
                Err(if existing[i].is_some() || repeated(i) {
                    Rejection::ExistsWithDifferentBody
                } else {
                    Rejection::LinkedEventFailed
                })
            }));
            return;
        }

        // Input first, for every member: a chain with malformed input is refused whole and
        // stored nowhere, even when another member would also fail a business rule.
        let mut held_in_chain = Vec::new();
        for (i, t) in chain.iter().enumerate() {
            if let Err(reason) = self.check_input(t, &held_in_chain) {
                outcomes.extend((0..chain.len()).map(|j| {
                    Err(if j == i {
                        reason
                    } else {
                        Rejection::LinkedEventFailed
                    })
                }));
                return;
            }
            if let TransferKind::Pending { .. } = t.kind {
                held_in_chain.push(t.id);
            }
        }

        let mut undo = Vec::new();
        let mut failure = None;
        for (i, t) in chain.iter().enumerate() {
            match self.validate(t, now) {
                Ok(effect) => self.commit(effect, Some(&mut undo)),
                Err(r) => {
                    failure = Some((i, r));
                    break;
                }
            }
        }
        match failure {
            None => {
                for t in chain {
                    self.store(t, Ok(now), now);
                    outcomes.push(Ok(now));
                }
            }
            Some((failed, reason)) => {
                self.rollback(undo);
                for (i, t) in chain.iter().enumerate() {
                    let outcome = Err(if i == failed {
                        reason
                    } else {
                        Rejection::LinkedEventFailed
                    });
                    if reason.is_stored() {
                        self.store(t, outcome, now);
                    }
                    outcomes.push(outcome);
                }
            }
        }
    }

    /// The input checks: the body alone, and that what it names exists. `held_in_chain` are
    /// holds created by earlier members of the same chain, which count as existing.
    fn check_input(&self, t: &Transfer, held_in_chain: &[TransferId]) -> Result<(), Rejection> {
        check_body(t)?;
        if !self.accounts.contains_key(&t.debit) {
            return Err(Rejection::DebitAccountNotFound);
        }
        if !self.accounts.contains_key(&t.credit) {
            return Err(Rejection::CreditAccountNotFound);
        }
        if let Some(p) = t.kind.pending_id()
            && !self.holds.contains_key(&p)
            && !held_in_chain.contains(&p)
        {
            return Err(Rejection::PendingTransferNotFound);
        }
        Ok(())
    }

    /// Checks a new transfer against the state and computes its effect; changes nothing.
    /// The reference checks of [`Self::check_input`] are the lookups below, in the same
    /// order, so each account is looked up once on this hot path.
    fn validate(&self, t: &Transfer, now: Timestamp) -> Result<Effect, Rejection> {
        check_body(t)?;
        let mut debit = self
            .accounts
            .get(&t.debit)
            .ok_or(Rejection::DebitAccountNotFound)?
            .value;
        let mut credit = self
            .accounts
            .get(&t.credit)
            .ok_or(Rejection::CreditAccountNotFound)?
            .value;

        match t.kind {
            TransferKind::Single | TransferKind::Pending { .. } => {
                if debit.status == AccountStatus::Closed {
                    return Err(Rejection::DebitAccountClosed);
                }
                if credit.status == AccountStatus::Closed {
                    return Err(Rejection::CreditAccountClosed);
                }
                if debit.status == AccountStatus::Frozen {
                    return Err(Rejection::DebitAccountFrozen);
                }
                let pending = matches!(t.kind, TransferKind::Pending { .. });
                add(&mut debit, t.amount, Side::Debit, pending)?;
                add(&mut credit, t.amount, Side::Credit, pending)?;
                if debit.kind.must_not_overdraw()
                    && debit.debits_posted.get() + debit.debits_pending.get()
                        > debit.credits_posted.get()
                {
                    return Err(Rejection::InsufficientBalance);
                }
                let hold = match t.kind {
                    TransferKind::Pending { timeout_s } => Some(PendingHold {
                        id: t.id,
                        debit: t.debit,
                        credit: t.credit,
                        amount: t.amount,
                        expires_at: now.plus_seconds(timeout_s),
                        state: HoldState::Pending,
                    }),
                    _ => None,
                };
                Ok(Effect {
                    debit,
                    credit,
                    hold,
                })
            }
            TransferKind::Post { pending_id } | TransferKind::Void { pending_id } => {
                let mut hold = self
                    .holds
                    .get(&pending_id)
                    .ok_or(Rejection::PendingTransferNotFound)?
                    .value;
                if hold.debit != t.debit || hold.credit != t.credit {
                    return Err(Rejection::PendingTransferHasDifferentAccounts);
                }
                let post = matches!(t.kind, TransferKind::Post { .. });
                if post && t.amount > hold.amount {
                    return Err(Rejection::PendingTransferAmountExceeded);
                }
                if !post && t.amount != hold.amount {
                    return Err(Rejection::PendingTransferHasDifferentAmount);
                }
                match hold.state {
                    HoldState::Posted => return Err(Rejection::PendingTransferAlreadyPosted),
                    HoldState::Voided => return Err(Rejection::PendingTransferAlreadyVoided),
                    HoldState::Expired => return Err(Rejection::PendingTransferExpired),
                    HoldState::Pending if now >= hold.expires_at => {
                        return Err(Rejection::PendingTransferExpired);
                    }
                    HoldState::Pending => {}
                }
                release(&mut debit, hold.amount, Side::Debit);
                release(&mut credit, hold.amount, Side::Credit);
                if post {
                    add(&mut debit, t.amount, Side::Debit, false)?;
                    add(&mut credit, t.amount, Side::Credit, false)?;
                }
                hold.state = if post {
                    HoldState::Posted
                } else {
                    HoldState::Voided
                };
                Ok(Effect {
                    debit,
                    credit,
                    hold: Some(hold),
                })
            }
        }
    }

    fn commit(&mut self, effect: Effect, mut undo: Option<&mut Vec<Undo>>) {
        for account in [effect.debit, effect.credit] {
            let slot = self
                .accounts
                .get_mut(&account.id)
                .expect("validated account exists");
            if let Some(undo) = undo.as_deref_mut() {
                undo.push(Undo::Account(slot.value));
            }
            slot.value = account;
            if !std::mem::replace(&mut slot.dirty, true) {
                self.dirty_accounts.push(account.id);
            }
        }
        if let Some(hold) = effect.hold {
            let old = self.holds.insert(
                hold.id,
                Slot {
                    value: hold,
                    dirty: true,
                },
            );
            if !old.as_ref().is_some_and(|s| s.dirty) {
                self.dirty_holds.push(hold.id);
            }
            if let Some(undo) = undo {
                undo.push(Undo::Hold(hold.id, old.map(|s| s.value)));
            }
        }
    }

    fn rollback(&mut self, undo: Vec<Undo>) {
        for step in undo.into_iter().rev() {
            match step {
                Undo::Account(old) => {
                    self.accounts
                        .get_mut(&old.id)
                        .expect("undo of a loaded account")
                        .value = old;
                }
                Undo::Hold(id, Some(old)) => {
                    self.holds
                        .get_mut(&id)
                        .expect("undo of a loaded hold")
                        .value = old;
                }
                Undo::Hold(id, None) => {
                    self.holds.remove(&id);
                }
            }
        }
    }

    fn store(&mut self, t: &Transfer, outcome: Outcome, now: Timestamp) {
        let record = TransferRecord {
            transfer: *t,
            outcome,
            timestamp: now,
        };
        self.records.insert(t.id, record);
        self.new_records.push(record);
    }
}

/// The checks of the body alone, in precedence order.
fn check_body(t: &Transfer) -> Result<(), Rejection> {
    if t.amount == Fen::ZERO {
        return Err(Rejection::AmountMustNotBeZero);
    }
    if t.amount < Fen::ZERO {
        return Err(Rejection::AmountMustNotBeNegative);
    }
    if t.debit == t.credit {
        return Err(Rejection::AccountsMustBeDifferent);
    }
    if t.kind.pending_id() == Some(t.id) {
        return Err(Rejection::PendingIdMustBeDifferent);
    }
    if let TransferKind::Pending { timeout_s } = t.kind
        && (timeout_s == 0 || timeout_s > TIMEOUT_S_MAX)
    {
        return Err(Rejection::TimeoutOutOfRange);
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Side {
    Debit,
    Credit,
}

/// Adds `amount` to one side of an account, posted or pending, refusing overflow of the sum
/// itself and of posted + pending (so that available-balance checks cannot overflow either).
fn add(account: &mut Account, amount: Fen, side: Side, pending: bool) -> Result<(), Rejection> {
    let (posted, held) = match side {
        Side::Debit => (&mut account.debits_posted, &mut account.debits_pending),
        Side::Credit => (&mut account.credits_posted, &mut account.credits_pending),
    };
    let target = if pending { held } else { posted };
    *target = target.checked_add(amount).ok_or(Rejection::Overflow)?;
    let (posted, held) = match side {
        Side::Debit => (account.debits_posted, account.debits_pending),
        Side::Credit => (account.credits_posted, account.credits_pending),
    };
    posted.checked_add(held).ok_or(Rejection::Overflow)?;
    Ok(())
}

fn release(account: &mut Account, amount: Fen, side: Side) {
    let held = match side {
        Side::Debit => &mut account.debits_pending,
        Side::Credit => &mut account.credits_pending,
    };
    *held = held
        .checked_sub(amount)
        .expect("a hold is within its account's pending sum");
    assert!(
        *held >= Fen::ZERO,
        "pending sum of account {} went negative",
        account.id
    );
}
