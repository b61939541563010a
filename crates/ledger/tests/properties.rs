//! Property test: random sequences of transfers, holds, posts, voids, expiries and retries.
//! After every step the postings sum to zero, no account that must not overdraw is below zero,
//! and every account's sums equal what its stored transfers say, so a retried id never applied
//! twice.

use std::collections::HashMap;

use ledger::{
    Account, AccountId, AccountKind, Fen, HoldState, Ledger, Timestamp, Transfer, TransferId,
    TransferKind,
};
use proptest::prelude::*;

const ACCOUNTS: [AccountKind; 6] = [
    AccountKind::BankClearing,
    AccountKind::CardholderOnline,
    AccountKind::CardholderOnline,
    AccountKind::MerchantPayable,
    AccountKind::Cash,
    AccountKind::CardholderPurse,
];

#[derive(Clone, Debug)]
enum Op {
    /// A chain of one or two transfers.
    Submit(Vec<(u8, u8, u8, i64, u8, u8)>),
    /// Send an earlier transfer again, unchanged.
    Retry(usize),
    /// Let time pass and expire due holds.
    Tick(u32),
}

fn op() -> impl Strategy<Value = Op> {
    // (id, debit, credit, amount, kind selector, pending selector)
    let transfer = (1u8..40, 0u8..7, 0u8..7, -2i64..3_000, 0u8..10, 0u8..40);
    prop_oneof![
        6 => proptest::collection::vec(transfer, 1..3).prop_map(Op::Submit),
        2 => any::<usize>().prop_map(Op::Retry),
        1 => (1u32..120).prop_map(Op::Tick),
    ]
}

fn account_id(i: u8) -> AccountId {
    // Index 6 names an account that does not exist.
    AccountId::new(i64::from(i) + 1).unwrap()
}

fn build(raw: &[(u8, u8, u8, i64, u8, u8)]) -> Vec<Transfer> {
    let n = raw.len();
    raw.iter()
        .enumerate()
        .map(|(i, &(id, d, c, amount, kind, pending))| {
            let pending_id = TransferId::new(u128::from(pending) + 1).unwrap();
            Transfer {
                id: TransferId::new(u128::from(id)).unwrap(),
                debit: account_id(d),
                credit: account_id(c),
                amount: Fen::new(amount),
                kind: match kind {
                    0..=4 => TransferKind::Single,
                    5 | 6 => TransferKind::Pending { timeout_s: 30 },
                    7 | 8 => TransferKind::Post { pending_id },
                    _ => TransferKind::Void { pending_id },
                },
                linked: i + 1 < n,
                code: 0,
            }
        })
        .collect()
}

/// Recomputes every account's four sums from stored records and holds, as db-check does.
fn check_invariants(l: &Ledger, records: &HashMap<TransferId, ledger::TransferRecord>) {
    let mut sums: HashMap<AccountId, [i64; 4]> = HashMap::new();
    for r in records.values().filter(|r| r.outcome.is_ok()) {
        let t = r.transfer;
        match t.kind {
            TransferKind::Single | TransferKind::Post { .. } => {
                sums.entry(t.debit).or_default()[0] += t.amount.get();
                sums.entry(t.credit).or_default()[1] += t.amount.get();
            }
            TransferKind::Pending { .. } => {
                if l.hold(t.id).unwrap().state == HoldState::Pending {
                    sums.entry(t.debit).or_default()[2] += t.amount.get();
                    sums.entry(t.credit).or_default()[3] += t.amount.get();
                }
            }
            TransferKind::Void { .. } => {}
        }
    }
    let mut total = 0i128;
    for a in l.accounts() {
        let s = sums.get(&a.id).copied().unwrap_or_default();
        let got = [
            a.debits_posted,
            a.credits_posted,
            a.debits_pending,
            a.credits_pending,
        ]
        .map(Fen::get);
        assert_eq!(got, s, "account {} sums differ from its transfers", a.id);
        total += i128::from(a.balance().get());
        if a.kind.must_not_overdraw() {
            assert!(
                a.debits_posted.get() + a.debits_pending.get() <= a.credits_posted.get(),
                "account {} overdrawn",
                a.id
            );
        }
    }
    assert_eq!(total, 0, "postings must sum to zero");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn ledger_invariants_hold_after_every_step(ops in proptest::collection::vec(op(), 1..80)) {
        let mut l = Ledger::new();
        for (i, kind) in ACCOUNTS.iter().enumerate() {
            l.load_account(Account::new(AccountId::new(i as i64 + 1).unwrap(), *kind));
        }
        let mut now = Timestamp(1_000_000);
        let mut sent: Vec<(Vec<Transfer>, Vec<ledger::Outcome>)> = Vec::new();
        let mut records = HashMap::new();
        for op in ops {
            match op {
                Op::Submit(raw) => {
                    let batch = build(&raw);
                    let outcomes = l.apply_batch(&batch, now);
                    sent.push((batch, outcomes));
                }
                Op::Retry(k) if !sent.is_empty() => {
                    let batch = sent[k % sent.len()].0.clone();
                    let again = l.apply_batch(&batch, now);
                    // Every chain whose members are all stored with these bodies is a retry:
                    // each member must get exactly its stored answer, success or failure.
                    let mut start = 0;
                    while start < batch.len() {
                        let end = batch[start..]
                            .iter()
                            .position(|t| !t.linked)
                            .map_or(batch.len(), |e| start + e + 1);
                        let chain = &batch[start..end];
                        let stored = chain.iter().all(|t| {
                            records.get(&t.id).is_some_and(|r: &ledger::TransferRecord| r.transfer == *t)
                        });
                        if stored && end <= batch.len() && chain.last().is_some_and(|t| !t.linked) {
                            for (i, t) in chain.iter().enumerate() {
                                prop_assert_eq!(again[start + i], records[&t.id].outcome);
                            }
                        }
                        start = end;
                    }
                }
                Op::Retry(_) => {}
                Op::Tick(seconds) => {
                    now = now.plus_seconds(seconds);
                    l.expire(now);
                }
            }
            for r in l.take_changes().records {
                prop_assert!(records.insert(r.transfer.id, r).is_none(), "an id stored twice");
            }
            check_invariants(&l, &records);
        }
    }
}
