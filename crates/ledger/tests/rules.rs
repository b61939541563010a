//! One test per ledger rule: each rejection in its precedence, chains, holds, retries.

use ledger::{
    Account, AccountId, AccountKind, AccountStatus, Fen, HoldState, Ledger, Rejection, Timestamp,
    Transfer, TransferId, TransferKind,
};

const NOW: Timestamp = Timestamp(1_700_000_000_000);
const ALICE: i64 = 1; // cardholder online account, must not overdraw
const CANTEEN: i64 = 2; // merchant payable
const BANK: i64 = 3; // bank clearing, may go negative
const BOB: i64 = 4;

fn acc(id: i64) -> AccountId {
    AccountId::new(id).unwrap()
}

fn tid(id: u128) -> TransferId {
    TransferId::new(id).unwrap()
}

fn t(id: u128, debit: i64, credit: i64, amount: i64) -> Transfer {
    Transfer {
        id: tid(id),
        debit: acc(debit),
        credit: acc(credit),
        amount: Fen::new(amount),
        kind: TransferKind::Single,
        linked: false,
        code: 1,
    }
}

fn with_kind(mut x: Transfer, kind: TransferKind) -> Transfer {
    x.kind = kind;
    x
}

fn linked(mut x: Transfer) -> Transfer {
    x.linked = true;
    x
}

/// A ledger where Alice has 100.00 yuan from the bank.
fn setup() -> Ledger {
    let mut l = Ledger::new();
    l.load_account(Account::new(acc(ALICE), AccountKind::CardholderOnline));
    l.load_account(Account::new(acc(CANTEEN), AccountKind::MerchantPayable));
    l.load_account(Account::new(acc(BANK), AccountKind::BankClearing));
    l.load_account(Account::new(acc(BOB), AccountKind::CardholderOnline));
    assert_eq!(
        l.apply_batch(&[t(1, BANK, ALICE, 10_000)], NOW),
        vec![Ok(NOW)]
    );
    l.take_changes();
    l
}

fn balance(l: &Ledger, id: i64) -> i64 {
    l.account(acc(id)).unwrap().balance().get()
}

fn check(l: &mut Ledger, transfers: &[Transfer], expected: &[Result<(), Rejection>]) {
    let got: Vec<Result<(), Rejection>> = l
        .apply_batch(transfers, NOW)
        .into_iter()
        .map(|o| o.map(|_| ()))
        .collect();
    assert_eq!(got, expected);
    let sum: i128 = l.accounts().map(|a| i128::from(a.balance().get())).sum();
    assert_eq!(sum, 0, "postings must sum to zero");
}

#[test]
fn purchase_moves_money_and_sums_to_zero() {
    let mut l = setup();
    check(&mut l, &[t(2, ALICE, CANTEEN, 1_250)], &[Ok(())]);
    assert_eq!(balance(&l, ALICE), 8_750);
    assert_eq!(balance(&l, CANTEEN), 1_250);
    assert_eq!(balance(&l, BANK), -10_000);
}

#[test]
fn each_input_rejection_in_precedence_order_and_nothing_stored() {
    let mut l = setup();
    let cases = [
        (t(10, ALICE, CANTEEN, 0), Rejection::AmountMustNotBeZero),
        (
            t(11, ALICE, CANTEEN, -5),
            Rejection::AmountMustNotBeNegative,
        ),
        (t(12, ALICE, ALICE, 5), Rejection::AccountsMustBeDifferent),
        // Zero amount wins over same account: precedence.
        (t(13, ALICE, ALICE, 0), Rejection::AmountMustNotBeZero),
        (
            with_kind(
                t(14, ALICE, CANTEEN, 5),
                TransferKind::Post {
                    pending_id: tid(14),
                },
            ),
            Rejection::PendingIdMustBeDifferent,
        ),
        (
            with_kind(
                t(15, ALICE, CANTEEN, 5),
                TransferKind::Pending { timeout_s: 0 },
            ),
            Rejection::TimeoutOutOfRange,
        ),
        (
            with_kind(
                t(16, ALICE, CANTEEN, 5),
                TransferKind::Pending {
                    timeout_s: ledger::TIMEOUT_S_MAX + 1,
                },
            ),
            Rejection::TimeoutOutOfRange,
        ),
        (t(17, 99, CANTEEN, 5), Rejection::DebitAccountNotFound),
        (t(18, ALICE, 99, 5), Rejection::CreditAccountNotFound),
        (t(19, 98, 99, 5), Rejection::DebitAccountNotFound),
        (
            with_kind(
                t(20, ALICE, CANTEEN, 5),
                TransferKind::Post {
                    pending_id: tid(777),
                },
            ),
            Rejection::PendingTransferNotFound,
        ),
        (t(1, ALICE, CANTEEN, 5), Rejection::ExistsWithDifferentBody),
    ];
    for (transfer, reason) in cases {
        check(&mut l, &[transfer], &[Err(reason)]);
        assert!(!reason.is_stored());
    }
    let changes = l.take_changes();
    assert!(changes.records.is_empty(), "input rejections store nothing");
    assert!(
        changes.accounts.is_empty(),
        "input rejections change nothing"
    );
    // The ids stay free: a valid body under one of them is accepted.
    check(&mut l, &[t(10, ALICE, CANTEEN, 5)], &[Ok(())]);
}

#[test]
fn business_rejections_are_stored_and_replayed_even_after_state_changes() {
    let mut l = setup();
    check(
        &mut l,
        &[t(2, ALICE, CANTEEN, 10_001)],
        &[Err(Rejection::InsufficientBalance)],
    );
    let changes = l.take_changes();
    assert_eq!(changes.records.len(), 1);
    assert_eq!(
        changes.records[0].outcome,
        Err(Rejection::InsufficientBalance)
    );
    // Alice gets more money, but the retry keeps its original answer.
    check(&mut l, &[t(3, BANK, ALICE, 5_000)], &[Ok(())]);
    check(
        &mut l,
        &[t(2, ALICE, CANTEEN, 10_001)],
        &[Err(Rejection::InsufficientBalance)],
    );
    assert_eq!(balance(&l, ALICE), 15_000);
}

#[test]
fn retry_of_a_success_answers_the_original_time_and_applies_once() {
    let mut l = setup();
    check(&mut l, &[t(2, ALICE, CANTEEN, 100)], &[Ok(())]);
    let later = Timestamp(NOW.0 + 5_000);
    assert_eq!(
        l.apply_batch(&[t(2, ALICE, CANTEEN, 100)], later),
        vec![Ok(NOW)]
    );
    // The same id twice in one batch applies once too.
    assert_eq!(
        l.apply_batch(
            &[t(3, ALICE, CANTEEN, 100), t(3, ALICE, CANTEEN, 100)],
            later
        ),
        vec![Ok(later), Ok(later)]
    );
    assert_eq!(balance(&l, CANTEEN), 200);
}

#[test]
fn status_rules() {
    let mut l = setup();
    l.set_status(acc(ALICE), AccountStatus::Frozen).unwrap();
    check(
        &mut l,
        &[t(2, ALICE, CANTEEN, 100)],
        &[Err(Rejection::DebitAccountFrozen)],
    );
    // A frozen account still receives money.
    check(&mut l, &[t(3, BANK, ALICE, 100)], &[Ok(())]);
    assert!(l.set_status(acc(BOB), AccountStatus::Closed).is_ok());
    check(
        &mut l,
        &[t(4, BOB, CANTEEN, 100)],
        &[Err(Rejection::DebitAccountClosed)],
    );
    check(
        &mut l,
        &[t(5, BANK, BOB, 100)],
        &[Err(Rejection::CreditAccountClosed)],
    );
    // Closed wins over frozen: precedence.
    check(
        &mut l,
        &[t(6, ALICE, BOB, 100)],
        &[Err(Rejection::CreditAccountClosed)],
    );
    // Only an empty account can close.
    assert!(l.set_status(acc(ALICE), AccountStatus::Closed).is_err());
}

#[test]
fn overflow_is_a_rejection_not_a_wrap() {
    let mut l = setup();
    // The bank account already has 100.00 of debits.
    check(&mut l, &[t(2, BANK, CANTEEN, i64::MAX - 10_010)], &[Ok(())]);
    check(
        &mut l,
        &[t(3, BANK, CANTEEN, 11)],
        &[Err(Rejection::Overflow)],
    );
    check(&mut l, &[t(4, BANK, CANTEEN, 10)], &[Ok(())]);
}

#[test]
fn linked_chain_succeeds_or_fails_together() {
    let mut l = setup();
    // Purchase of 50.00 with a 0.50 fee to the canteen... paid by Alice: both or neither.
    let purchase = linked(t(2, ALICE, CANTEEN, 5_000));
    let fee = t(3, ALICE, BOB, 5_001);
    check(
        &mut l,
        &[purchase, fee],
        &[
            Err(Rejection::LinkedEventFailed),
            Err(Rejection::InsufficientBalance),
        ],
    );
    assert_eq!(balance(&l, ALICE), 10_000, "the first leg was rolled back");
    let changes = l.take_changes();
    assert_eq!(
        changes.records.len(),
        2,
        "a business failure stores the whole chain"
    );
    // Retrying the same chain replays both answers.
    check(
        &mut l,
        &[purchase, fee],
        &[
            Err(Rejection::LinkedEventFailed),
            Err(Rejection::InsufficientBalance),
        ],
    );
    // A chain reusing one stored id is not a retry: nothing applies or is stored.
    check(
        &mut l,
        &[purchase, t(4, ALICE, BOB, 1)],
        &[
            Err(Rejection::ExistsWithDifferentBody),
            Err(Rejection::LinkedEventFailed),
        ],
    );
    let ok = [linked(t(5, ALICE, CANTEEN, 5_000)), t(6, ALICE, BOB, 50)];
    check(&mut l, &ok, &[Ok(()), Ok(())]);
    assert_eq!(balance(&l, ALICE), 4_950);
    check(&mut l, &ok, &[Ok(()), Ok(())]);
    assert_eq!(balance(&l, ALICE), 4_950, "a retried chain applies once");
}

#[test]
fn chain_with_an_input_error_stores_nothing() {
    let mut l = setup();
    check(
        &mut l,
        &[linked(t(2, ALICE, CANTEEN, 100)), t(3, ALICE, 99, 1)],
        &[
            Err(Rejection::LinkedEventFailed),
            Err(Rejection::CreditAccountNotFound),
        ],
    );
    assert!(l.take_changes().records.is_empty());
    // Duplicate id inside one chain.
    check(
        &mut l,
        &[linked(t(2, ALICE, CANTEEN, 100)), t(2, ALICE, CANTEEN, 100)],
        &[
            Err(Rejection::LinkedEventFailed),
            Err(Rejection::ExistsWithDifferentBody),
        ],
    );
    assert_eq!(balance(&l, ALICE), 10_000);
}

#[test]
fn open_chain_fails() {
    let mut l = setup();
    check(
        &mut l,
        &[
            t(2, ALICE, CANTEEN, 1),
            linked(t(3, ALICE, CANTEEN, 1)),
            linked(t(4, ALICE, BOB, 1)),
        ],
        &[
            Ok(()),
            Err(Rejection::LinkedEventFailed),
            Err(Rejection::LinkedEventChainOpen),
        ],
    );
    assert_eq!(balance(&l, ALICE), 9_999);
}

#[test]
fn hold_then_partial_post_releases_the_rest() {
    let mut l = setup();
    let hold = with_kind(
        t(2, ALICE, CANTEEN, 3_000),
        TransferKind::Pending { timeout_s: 60 },
    );
    check(&mut l, &[hold], &[Ok(())]);
    let a = *l.account(acc(ALICE)).unwrap();
    assert_eq!((a.balance().get(), a.available().get()), (10_000, 7_000));
    // The hold counts against the balance.
    check(
        &mut l,
        &[t(3, ALICE, BOB, 7_001)],
        &[Err(Rejection::InsufficientBalance)],
    );
    let post = with_kind(
        t(4, ALICE, CANTEEN, 2_000),
        TransferKind::Post { pending_id: tid(2) },
    );
    check(&mut l, &[post], &[Ok(())]);
    assert_eq!(balance(&l, ALICE), 8_000);
    assert_eq!(l.account(acc(ALICE)).unwrap().debits_pending, Fen::ZERO);
    assert_eq!(l.hold(tid(2)).unwrap().state, HoldState::Posted);
    let again = with_kind(
        t(5, ALICE, CANTEEN, 1),
        TransferKind::Post { pending_id: tid(2) },
    );
    check(
        &mut l,
        &[again],
        &[Err(Rejection::PendingTransferAlreadyPosted)],
    );
    let void = with_kind(
        t(6, ALICE, CANTEEN, 3_000),
        TransferKind::Void { pending_id: tid(2) },
    );
    check(
        &mut l,
        &[void],
        &[Err(Rejection::PendingTransferAlreadyPosted)],
    );
}

#[test]
fn hold_rules_in_order() {
    let mut l = setup();
    let hold = with_kind(
        t(2, ALICE, CANTEEN, 3_000),
        TransferKind::Pending { timeout_s: 60 },
    );
    check(&mut l, &[hold], &[Ok(())]);
    let p = |id, d, c, amount| {
        with_kind(
            t(id, d, c, amount),
            TransferKind::Post { pending_id: tid(2) },
        )
    };
    let v = |id, amount| {
        with_kind(
            t(id, ALICE, CANTEEN, amount),
            TransferKind::Void { pending_id: tid(2) },
        )
    };
    check(
        &mut l,
        &[p(3, ALICE, BOB, 1)],
        &[Err(Rejection::PendingTransferHasDifferentAccounts)],
    );
    check(
        &mut l,
        &[p(4, ALICE, CANTEEN, 3_001)],
        &[Err(Rejection::PendingTransferAmountExceeded)],
    );
    check(
        &mut l,
        &[v(5, 2_999)],
        &[Err(Rejection::PendingTransferHasDifferentAmount)],
    );
    check(&mut l, &[v(6, 3_000)], &[Ok(())]);
    check(
        &mut l,
        &[v(7, 3_000)],
        &[Err(Rejection::PendingTransferAlreadyVoided)],
    );
    assert_eq!(l.account(acc(ALICE)).unwrap().available().get(), 10_000);
    // A post naming a transfer that is not a hold.
    let not_hold = with_kind(
        t(8, BANK, ALICE, 1),
        TransferKind::Post { pending_id: tid(1) },
    );
    check(
        &mut l,
        &[not_hold],
        &[Err(Rejection::PendingTransferNotFound)],
    );
}

#[test]
fn expired_holds_refuse_posting_and_are_released_by_expire() {
    let mut l = setup();
    let hold = with_kind(
        t(2, ALICE, CANTEEN, 3_000),
        TransferKind::Pending { timeout_s: 60 },
    );
    check(&mut l, &[hold], &[Ok(())]);
    let at_expiry = NOW.plus_seconds(60);
    let post = with_kind(
        t(3, ALICE, CANTEEN, 3_000),
        TransferKind::Post { pending_id: tid(2) },
    );
    assert_eq!(
        l.apply_batch(&[post], at_expiry),
        vec![Err(Rejection::PendingTransferExpired)]
    );
    assert_eq!(l.expire(Timestamp(at_expiry.0 - 1)), 0);
    assert_eq!(l.expire(at_expiry), 1);
    assert_eq!(l.hold(tid(2)).unwrap().state, HoldState::Expired);
    assert_eq!(l.account(acc(ALICE)).unwrap().available().get(), 10_000);
    assert_eq!(l.account(acc(CANTEEN)).unwrap().credits_pending, Fen::ZERO);
    let post2 = with_kind(
        t(4, ALICE, CANTEEN, 1),
        TransferKind::Post { pending_id: tid(2) },
    );
    check(&mut l, &[post2], &[Err(Rejection::PendingTransferExpired)]);
}

#[test]
fn changes_list_a_hot_account_once() {
    let mut l = setup();
    let batch: Vec<Transfer> = (0..100)
        .map(|i| t(100 + i, if i % 2 == 0 { ALICE } else { BANK }, CANTEEN, 1))
        .collect();
    check(&mut l, &batch, &[Ok(()); 100]);
    let changes = l.take_changes();
    assert_eq!(changes.records.len(), 100);
    let ids: Vec<i64> = changes.accounts.iter().map(|a| a.id.get()).collect();
    assert_eq!(
        ids,
        vec![ALICE, CANTEEN, BANK],
        "each account once, in id order"
    );
}

#[test]
fn chain_input_is_checked_for_every_member_before_business_rules() {
    let mut l = setup();
    // The first member fails a business rule, the second is malformed: the chain is refused as
    // input (the malformed member's reason wins) and nothing is stored, so no id is used up.
    check(
        &mut l,
        &[
            linked(t(2, ALICE, CANTEEN, 999_999)),
            t(3, ALICE, CANTEEN, 0),
        ],
        &[
            Err(Rejection::LinkedEventFailed),
            Err(Rejection::AmountMustNotBeZero),
        ],
    );
    assert!(l.take_changes().records.is_empty());
    // A post of a hold created earlier in the same chain is valid input.
    let hold = with_kind(
        linked(t(4, ALICE, CANTEEN, 500)),
        TransferKind::Pending { timeout_s: 60 },
    );
    let post = with_kind(
        t(5, ALICE, CANTEEN, 500),
        TransferKind::Post { pending_id: tid(4) },
    );
    check(&mut l, &[hold, post], &[Ok(()), Ok(())]);
    assert_eq!(balance(&l, CANTEEN), 500);
}
