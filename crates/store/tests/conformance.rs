//! The store conformance suite: every test runs on SQLite and on PostgreSQL.

mod harness;

use std::sync::Arc;

use ledger::{
    AccountId, AccountKind, AccountStatus, Fen, HoldState, Rejection, Timestamp, Transfer,
    TransferId, TransferKind,
};
use store::{Store, StoreError};

const NOW: Timestamp = Timestamp(1_800_000_000_000);

fn tid(n: u128) -> TransferId {
    TransferId::new(n).unwrap()
}

fn t(id: u128, debit: AccountId, credit: AccountId, amount: i64) -> Transfer {
    Transfer {
        id: tid(id),
        debit,
        credit,
        amount: Fen::new(amount),
        kind: TransferKind::Single,
        linked: false,
        code: 7,
    }
}

struct Campus {
    bank: AccountId,
    alice: AccountId,
    bob: AccountId,
    canteen: AccountId,
}

/// A bank clearing account, two cardholders and a canteen; Alice has 100.00 yuan.
async fn campus(store: &Store) -> Campus {
    let bank = store
        .create_account(AccountKind::BankClearing, Some("bank:icbc"), NOW)
        .await;
    let bank = bank.unwrap().account.id;
    let alice = store
        .create_account(AccountKind::CardholderOnline, None, NOW)
        .await
        .unwrap();
    let bob = store
        .create_account(AccountKind::CardholderOnline, None, NOW)
        .await
        .unwrap();
    let canteen = store
        .create_account(AccountKind::MerchantPayable, Some("canteen-1"), NOW)
        .await;
    let c = Campus {
        bank,
        alice: alice.account.id,
        bob: bob.account.id,
        canteen: canteen.unwrap().account.id,
    };
    let top_up = store
        .submit(vec![t(1, c.bank, c.alice, 10_000)], NOW)
        .await
        .unwrap();
    assert_eq!(top_up, vec![Ok(NOW)]);
    c
}

async fn balance(store: &Store, id: AccountId) -> i64 {
    store
        .account(id)
        .await
        .unwrap()
        .unwrap()
        .account
        .balance()
        .get()
}

async fn assert_consistent(store: &Store) {
    let report = store.check().await.unwrap();
    assert!(report.is_ok(), "db-check failed:\n{report}");
}

conformance! {
    async fn purchase_posts_and_reads_back(db) {
        let s = &db.store;
        let c = campus(s).await;
        let out = s.submit(vec![t(2, c.alice, c.canteen, 1_250)], NOW).await.unwrap();
        assert_eq!(out, vec![Ok(NOW)]);
        assert_eq!(balance(s, c.alice).await, 8_750);
        assert_eq!(balance(s, c.canteen).await, 1_250);
        assert_eq!(balance(s, c.bank).await, -10_000);
        let e = s.transfer(tid(2)).await.unwrap().unwrap();
        assert_eq!(e.record.transfer, t(2, c.alice, c.canteen, 1_250));
        assert_eq!(e.record.outcome, Ok(NOW));
        let history = s.account_transfers(c.alice, None, 10).await.unwrap();
        let ids: Vec<TransferId> = history.iter().map(|e| e.record.transfer.id).collect();
        assert_eq!(ids, vec![tid(2), tid(1)], "newest first");
        // Paging: the cursor is the seq of the last entry of the previous page.
        let first = s.account_transfers(c.alice, None, 1).await.unwrap();
        assert_eq!(first[0].record.transfer.id, tid(2));
        let second = s.account_transfers(c.alice, Some(first[0].seq), 1).await.unwrap();
        assert_eq!(second[0].record.transfer.id, tid(1));
        let end = s.account_transfers(c.alice, Some(second[0].seq), 1).await.unwrap();
        assert!(end.is_empty());
        // A rejected transfer is stored but is not part of the account's history.
        let no = s.submit(vec![t(3, c.alice, c.canteen, 1_000_000)], NOW).await.unwrap();
        assert_eq!(no, vec![Err(Rejection::InsufficientBalance)]);
        assert_eq!(s.account_transfers(c.alice, None, 10).await.unwrap().len(), 2);
        let canteen = s.account_transfers(c.canteen, None, 10).await.unwrap();
        assert_eq!(canteen.len(), 1);
        let named = s.account_by_name("canteen-1").await.unwrap().unwrap();
        assert_eq!(named.account.id, c.canteen);
        assert_eq!(s.accounts(0, 2).await.unwrap().len(), 2);
        assert_consistent(s).await;
    }
}

conformance! {
    async fn retries_get_the_original_answer(db) {
        let s = &db.store;
        let c = campus(s).await;
        let later = Timestamp(NOW.0 + 60_000);
        s.submit(vec![t(2, c.alice, c.canteen, 500)], NOW).await.unwrap();
        let again = s.submit(vec![t(2, c.alice, c.canteen, 500)], later).await.unwrap();
        assert_eq!(again, vec![Ok(NOW)], "the original time, applied once");
        assert_eq!(balance(s, c.canteen).await, 500);
        // A failure is stored and replayed, even once the state would allow it.
        let big = t(3, c.alice, c.canteen, 20_000);
        assert_eq!(s.submit(vec![big], NOW).await.unwrap(), vec![Err(Rejection::InsufficientBalance)]);
        s.submit(vec![t(4, c.bank, c.alice, 50_000)], NOW).await.unwrap();
        assert_eq!(s.submit(vec![big], later).await.unwrap(), vec![Err(Rejection::InsufficientBalance)]);
        let stored = s.transfer(tid(3)).await.unwrap().unwrap();
        assert_eq!(stored.record.outcome, Err(Rejection::InsufficientBalance));
        // Another body under a used id is a conflict and changes nothing.
        let other = s.submit(vec![t(2, c.alice, c.canteen, 501)], later).await.unwrap();
        assert_eq!(other, vec![Err(Rejection::ExistsWithDifferentBody)]);
        assert_eq!(balance(s, c.canteen).await, 500);
        assert_consistent(s).await;
    }
}

conformance! {
    async fn bad_input_changes_nothing(db) {
        let s = &db.store;
        let c = campus(s).await;
        let nobody = AccountId::new(999_999).unwrap();
        let cases = [
            (t(10, c.alice, c.canteen, 0), Rejection::AmountMustNotBeZero),
            (t(11, c.alice, c.canteen, -1), Rejection::AmountMustNotBeNegative),
            (t(12, c.alice, c.alice, 1), Rejection::AccountsMustBeDifferent),
            (t(13, nobody, c.canteen, 1), Rejection::DebitAccountNotFound),
            (t(14, c.alice, nobody, 1), Rejection::CreditAccountNotFound),
        ];
        let before = s.check().await.unwrap();
        for (transfer, reason) in cases {
            assert_eq!(s.submit(vec![transfer], NOW).await.unwrap(), vec![Err(reason)]);
            assert!(s.transfer(transfer.id).await.unwrap().is_none(), "{reason:?} stored");
        }
        let after = s.check().await.unwrap();
        assert_eq!(before, after);
        // Too many transfers in one request is refused before anything happens.
        let many = vec![t(20, c.alice, c.canteen, 1); store::TRANSFERS_PER_REQUEST_MAX + 1];
        assert!(matches!(s.submit(many, NOW).await, Err(StoreError::Invalid(_))));
        // Account names are unique.
        let dup = s.create_account(AccountKind::BankClearing, Some("bank:icbc"), NOW).await;
        assert!(matches!(dup, Err(StoreError::AccountNameTaken(n)) if n == "bank:icbc"));
        let blank = s.create_account(AccountKind::BankClearing, Some("  "), NOW).await;
        assert!(matches!(blank, Err(StoreError::Invalid(_))));
        assert_eq!(s.check().await.unwrap().accounts, after.accounts);
    }
}

conformance! {
    async fn linked_transfers_apply_together(db) {
        let s = &db.store;
        let c = campus(s).await;
        let mut purchase = t(2, c.alice, c.canteen, 9_000);
        purchase.linked = true;
        let fee = t(3, c.alice, c.bob, 1_001);
        let out = s.submit(vec![purchase, fee], NOW).await.unwrap();
        assert_eq!(out, vec![Err(Rejection::LinkedEventFailed), Err(Rejection::InsufficientBalance)]);
        assert_eq!(balance(s, c.alice).await, 10_000);
        let fee = t(4, c.alice, c.bob, 1_000);
        let mut purchase = t(5, c.alice, c.canteen, 9_000);
        purchase.linked = true;
        assert_eq!(s.submit(vec![purchase, fee], NOW).await.unwrap(), vec![Ok(NOW), Ok(NOW)]);
        assert_eq!(balance(s, c.alice).await, 0);
        assert_consistent(s).await;
    }
}

conformance! {
    async fn holds_post_void_and_expire(db) {
        let s = &db.store;
        let c = campus(s).await;
        let hold = |id, amount, timeout_s| Transfer {
            kind: TransferKind::Pending { timeout_s },
            ..t(id, c.alice, c.canteen, amount)
        };
        let out = s.submit(vec![hold(2, 3_000, 60), hold(3, 1_000, 60), hold(4, 500, 10)], NOW).await;
        assert_eq!(out.unwrap(), vec![Ok(NOW); 3]);
        let a = s.account(c.alice).await.unwrap().unwrap().account;
        assert_eq!((a.balance().get(), a.available().get()), (10_000, 5_500));
        let post = Transfer { kind: TransferKind::Post { pending_id: tid(2) }, ..t(5, c.alice, c.canteen, 2_500) };
        let void = Transfer { kind: TransferKind::Void { pending_id: tid(3) }, ..t(6, c.alice, c.canteen, 1_000) };
        assert_eq!(s.submit(vec![post, void], NOW).await.unwrap(), vec![Ok(NOW), Ok(NOW)]);
        assert_eq!(s.hold(tid(2)).await.unwrap().unwrap().state, HoldState::Posted);
        assert_eq!(s.hold(tid(3)).await.unwrap().unwrap().state, HoldState::Voided);
        assert_consistent(s).await;
        assert_eq!(s.expire_holds(NOW.plus_seconds(9)).await.unwrap(), 0);
        assert_eq!(s.expire_holds(NOW.plus_seconds(10)).await.unwrap(), 1);
        assert_eq!(s.hold(tid(4)).await.unwrap().unwrap().state, HoldState::Expired);
        let late = Transfer { kind: TransferKind::Post { pending_id: tid(4) }, ..t(7, c.alice, c.canteen, 500) };
        assert_eq!(s.submit(vec![late], NOW.plus_seconds(11)).await.unwrap(), vec![Err(Rejection::PendingTransferExpired)]);
        let a = s.account(c.alice).await.unwrap().unwrap().account;
        assert_eq!((a.balance().get(), a.debits_pending.get()), (7_500, 0));
        assert_consistent(s).await;
    }
}

conformance! {
    async fn account_status_rules(db) {
        let s = &db.store;
        let c = campus(s).await;
        s.set_account_status(c.alice, AccountStatus::Frozen).await.unwrap();
        let out = s.submit(vec![t(2, c.alice, c.canteen, 1)], NOW).await.unwrap();
        assert_eq!(out, vec![Err(Rejection::DebitAccountFrozen)]);
        let closing = s.set_account_status(c.alice, AccountStatus::Closed).await;
        assert!(matches!(closing, Err(StoreError::Invalid(m)) if m.contains("cannot close")));
        let closed = s.set_account_status(c.bob, AccountStatus::Closed).await.unwrap();
        assert_eq!(closed.account.status, AccountStatus::Closed);
        let out = s.submit(vec![t(3, c.bank, c.bob, 1)], NOW).await.unwrap();
        assert_eq!(out, vec![Err(Rejection::CreditAccountClosed)]);
        let missing = s.set_account_status(AccountId::new(424_242).unwrap(), AccountStatus::Frozen).await;
        assert!(matches!(missing, Err(StoreError::AccountNotFound(_))));
        assert_consistent(s).await;
    }
}

conformance! {
    async fn same_transfer_sent_concurrently_posts_once(db) {
        let c = campus(&db.store).await;
        // Several tasks on this store, and as many on a second, independent store (another
        // process's connection pool and committer), all sending the same two transfers.
        let stores = [db.store.clone(), db.second_store().await];
        let mut tasks = Vec::new();
        for i in 0..16 {
            let s = stores[i % 2].clone();
            let (alice, canteen) = (c.alice, c.canteen);
            tasks.push(tokio::spawn(async move {
                let when = Timestamp(NOW.0 + i as i64);
                s.submit(vec![t(2, alice, canteen, 700), t(3, alice, canteen, 300)], when).await.unwrap()
            }));
        }
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(task.await.unwrap());
        }
        assert!(answers.iter().all(|a| a == &answers[0]), "every sender gets the same answer: {answers:?}");
        assert!(answers[0].iter().all(|o| o.is_ok()));
        assert_eq!(balance(&db.store, c.canteen).await, 1_000, "posted once");
        assert_consistent(&db.store).await;
    }
}

conformance! {
    async fn concurrent_submitters_share_commits_and_stay_consistent(db) {
        let c = Arc::new(campus(&db.store).await);
        let mut tasks = Vec::new();
        for task in 0..8u128 {
            let s = db.store.clone();
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50u128 {
                    let id = 1_000 + task * 100 + i;
                    let out = s.submit(vec![t(id, c.alice, c.canteen, 10)], NOW).await.unwrap();
                    assert_eq!(out, vec![Ok(NOW)]);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(balance(&db.store, c.canteen).await, 4_000);
        assert_eq!(balance(&db.store, c.alice).await, 6_000);
        assert_consistent(&db.store).await;
    }
}

conformance! {
    async fn waiting_submits_share_one_commit(db) {
        let s = &db.store;
        let c = campus(s).await;
        let blocker = db.block_writes(c.canteen.get()).await;
        let before = s.group_commits();
        let mut tasks = Vec::new();
        for i in 0..20u128 {
            let s = s.clone();
            let (alice, canteen) = (c.alice, c.canteen);
            tasks.push(tokio::spawn(async move {
                s.submit(vec![t(100 + i, alice, canteen, 1)], NOW).await.unwrap()
            }));
        }
        // Let every submit reach the writer's queue while its first group waits on the lock.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        blocker.release().await;
        for task in tasks {
            assert_eq!(task.await.unwrap(), vec![Ok(NOW)]);
        }
        let used = s.group_commits() - before;
        assert!((1..=3).contains(&used), "20 waiting submits took {used} commits");
        assert_eq!(balance(s, c.canteen).await, 20);
        assert_consistent(s).await;
    }
}

conformance! {
    async fn opposite_transfers_from_two_stores_do_not_deadlock(db) {
        let c = campus(&db.store).await;
        db.store.submit(vec![t(2, c.bank, c.bob, 10_000)], NOW).await.unwrap();
        let stores = [db.store.clone(), db.second_store().await];
        let mut tasks = Vec::new();
        for (k, s) in stores.into_iter().enumerate() {
            let (a, b, m) = if k == 0 { (c.alice, c.bob, c.canteen) } else { (c.bob, c.alice, c.canteen) };
            tasks.push(tokio::spawn(async move {
                for i in 0..40u128 {
                    let base = 1_000 + k as u128 * 1_000 + i * 2;
                    // Each batch takes its two cardholders in opposite order to the other task's.
                    let out = s.submit(vec![t(base, a, b, 3), t(base + 1, b, m, 1)], NOW).await.unwrap();
                    assert_eq!(out, vec![Ok(NOW), Ok(NOW)]);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(balance(&db.store, c.canteen).await, 80);
        assert_eq!(balance(&db.store, c.alice).await + balance(&db.store, c.bob).await, 20_000 - 80);
        assert_consistent(&db.store).await;
    }
}

conformance! {
    async fn durability_settings_are_in_force(db) {
        let settings: std::collections::HashMap<String, String> =
            db.store.settings().await.unwrap().into_iter().collect();
        if db.is_postgres() {
            assert_eq!(settings["synchronous_commit"], "on");
            assert_eq!(settings["fsync"], "on");
        } else {
            assert_eq!(settings["journal_mode"], "wal");
            assert_eq!(settings["synchronous"], "2", "FULL");
            assert_eq!(settings["foreign_keys"], "1");
        }
    }
}

conformance! {
    async fn db_check_names_a_corrupted_account(db) {
        let s = &db.store;
        let c = campus(s).await;
        s.submit(vec![t(2, c.alice, c.canteen, 100)], NOW).await.unwrap();
        assert_consistent(s).await;
        db.raw(&format!(
            "UPDATE accounts SET credits_posted = credits_posted + 1 WHERE id = {}",
            c.canteen.get()
        ))
        .await
        .unwrap();
        let report = s.check().await.unwrap();
        assert!(!report.is_ok());
        assert_eq!(report.bad_accounts(), vec![c.canteen.get()]);
        assert_eq!(report.credits_posted_total - report.debits_posted_total, 1);
        assert!(report.to_string().contains(&format!("account {}", c.canteen.get())));
        // A broken history chain is named too.
        db.raw(&format!("UPDATE accounts SET last_seq = NULL WHERE id = {}", c.alice.get()))
            .await
            .unwrap();
        let report = s.check().await.unwrap();
        let expected = format!("account {} history starts at seq none", c.alice.get());
        assert!(report.problems.iter().any(|p| p.starts_with(&expected)), "{report}");
        assert!(report.bad_accounts().contains(&c.alice.get()), "{:?}", report.bad_accounts());
    }
}

conformance! {
    async fn journal_is_append_only(db) {
        let s = &db.store;
        campus(s).await;
        let update = db.raw("UPDATE transfers SET amount = 1").await.unwrap_err();
        assert!(update.contains("append-only"), "{update}");
        let delete = db.raw("DELETE FROM transfers").await.unwrap_err();
        assert!(delete.contains("append-only"), "{delete}");
        // The schema refuses an overdrawn liability even if the code were wrong.
        let overdraw = db.raw("UPDATE accounts SET debits_posted = 1 WHERE kind = 1 AND credits_posted = 0").await;
        assert!(overdraw.is_err());
        assert_consistent(s).await;
    }
}

conformance! {
    async fn migrations_are_recorded_and_idempotent(db) {
        let s = &db.store;
        let applied = s.applied_migrations().await.unwrap();
        assert_eq!(applied.iter().map(|m| m.version).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
        assert!(s.migrate().await.unwrap().is_empty(), "nothing left to apply");
        let again = db.second_store().await;
        assert_eq!(again.applied_migrations().await.unwrap(), applied);
    }
}

conformance! {
    async fn master_keys_are_stored_once_and_never_changed(db) {
        let s = &db.store;
        let key = |kind: i16, version: i16| store::WrappedKey {
            kind,
            version,
            algorithm: 0,
            wrapped: vec![kind as u8; 24],
            check_value: vec![1, 2, 3, 4],
            created_at: NOW,
        };
        s.insert_master_keys(vec![key(1, 1), key(2, 1)]).await.unwrap();
        // All or none: the second key of this batch exists, so the first is not stored either.
        let dup = s.insert_master_keys(vec![key(3, 1), key(2, 1)]).await;
        assert!(matches!(dup, Err(StoreError::Invalid(m)) if m.contains("exists already")));
        let stored = s.master_keys().await.unwrap();
        assert_eq!(stored, vec![key(1, 1), key(2, 1)]);
        for sql in ["UPDATE master_keys SET version = 9", "DELETE FROM master_keys"] {
            let refused = db.raw(sql).await.unwrap_err();
            assert!(refused.contains("insert-only"), "{sql}: {refused}");
        }
        // The schema refuses a key that is not wrapped (24 bytes).
        assert!(db.raw("INSERT INTO master_keys VALUES (4, 1, 0, '\\x00', '\\x00000000', 0)").await.is_err());
        assert_eq!(s.master_keys().await.unwrap().len(), 2);
    }
}

conformance! {
    async fn db_check_totals_do_not_overflow(db) {
        // Three merchants each owed half of i64::MAX fen: the sum of all credits passes
        // i64::MAX, which an integer SUM in the database would overflow.
        let s = &db.store;
        let half = i64::MAX / 2;
        let mut transfers = Vec::new();
        for i in 0..3u128 {
            let bank = s.create_account(AccountKind::BankClearing, None, NOW).await.unwrap().account.id;
            let shop = s.create_account(AccountKind::MerchantPayable, None, NOW).await.unwrap().account.id;
            transfers.push(t(10 + i, bank, shop, half));
        }
        assert_eq!(s.submit(transfers, NOW).await.unwrap(), vec![Ok(NOW); 3]);
        let report = s.check().await.unwrap();
        assert!(report.is_ok(), "{report}");
        assert_eq!(report.credits_posted_total, 3 * i128::from(half));
        assert_eq!(report.debits_posted_total, 3 * i128::from(half));
    }
}

/// A tiny deterministic generator, so a failing workload can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

conformance! {
    async fn random_workload_passes_db_check(db) {
        // The property workload of the ledger tests, through the store: transfers, holds, posts,
        // voids, expiries and retries, in concurrent batches. db-check must pass after it.
        let s = &db.store;
        let mut accounts = Vec::new();
        for kind in [
            AccountKind::BankClearing,
            AccountKind::CardholderOnline,
            AccountKind::CardholderOnline,
            AccountKind::CardholderPurse,
            AccountKind::MerchantPayable,
            AccountKind::Cash,
        ] {
            accounts.push(s.create_account(kind, None, NOW).await.unwrap().account.id);
        }
        let seed = 0x9e37_79b9_7f4a_7c15_u64;
        eprintln!("workload seed {seed:#x}");
        let mut rng = Rng(seed);
        let mut now = NOW;
        let mut sent: Vec<Vec<Transfer>> = Vec::new();
        for round in 0..40 {
            let mut handles = Vec::new();
            for _ in 0..4 {
                let batch: Vec<Transfer> = if !sent.is_empty() && rng.below(5) == 0 {
                    sent[rng.below(sent.len() as u64) as usize].clone()
                } else {
                    let n = 1 + rng.below(20) as usize;
                    (0..n)
                        .map(|i| {
                            let id = 1 + rng.below(600) as u128;
                            let pending_id = tid(1 + rng.below(600) as u128);
                            Transfer {
                                id: tid(id),
                                debit: accounts[rng.below(6) as usize],
                                credit: accounts[rng.below(6) as usize],
                                amount: Fen::new(rng.below(3_000) as i64 - 1),
                                kind: match rng.below(10) {
                                    0..=4 => TransferKind::Single,
                                    5 | 6 => TransferKind::Pending { timeout_s: 30 },
                                    7 | 8 => TransferKind::Post { pending_id },
                                    _ => TransferKind::Void { pending_id },
                                },
                                linked: i + 1 < n && rng.below(4) == 0,
                                code: 0,
                            }
                        })
                        .collect()
                };
                sent.push(batch.clone());
                let s = s.clone();
                handles.push(tokio::spawn(async move { s.submit(batch, now).await }));
            }
            for h in handles {
                h.await.unwrap().unwrap();
            }
            if round % 5 == 4 {
                now = now.plus_seconds(20);
                s.expire_holds(now).await.unwrap();
            }
            let report = s.check().await.unwrap();
            assert!(report.is_ok(), "round {round}, seed {seed:#x}:\n{report}");
        }
        let report = s.check().await.unwrap();
        assert!(report.transfers > 100, "the workload stored {} transfers", report.transfers);
    }
}

conformance! {
    async fn a_transaction_commits_rows_and_transfers_together_or_not_at_all(db) {
        let s = &db.store;
        let c = campus(s).await;
        let (alice, canteen) = (c.alice, c.canteen);
        // Committed: a domain row and a transfer.
        let outcomes = s
            .transaction(move |tx| {
                Box::pin(async move {
                    tx.execute(
                        "INSERT INTO card_stock (asn, state, batch, updated_at) VALUES ($1, $2, $3, $4)",
                        store::params!["10000000000000000001", 0i64, "b1", NOW.0],
                    )
                    .await?;
                    let o = tx.submit(&[t(50, alice, canteen, 1_000)], NOW).await?;
                    Ok::<_, anyhow::Error>(o)
                })
            })
            .await
            .unwrap();
        assert_eq!(outcomes, vec![Ok(NOW)]);
        assert_eq!(balance(s, c.alice).await, 9_000);
        let rows = s
            .query("SELECT asn, state, batch FROM card_stock WHERE asn = $1", store::params!["10000000000000000001"])
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].text(2).unwrap(), "b1");

        // Rolled back: an error after a row and a transfer leaves neither.
        let err = s
            .transaction(move |tx| {
                Box::pin(async move {
                    tx.execute(
                        "INSERT INTO card_stock (asn, state, batch, updated_at) VALUES ($1, $2, $3, $4)",
                        store::params!["10000000000000000002", 0i64, "b2", NOW.0],
                    )
                    .await?;
                    tx.submit(&[t(51, alice, canteen, 2_000)], NOW).await?;
                    // Reads inside the transaction see its own writes.
                    let seen = tx
                        .query_one("SELECT count(*) FROM card_stock", &[])
                        .await?
                        .int(0)?;
                    anyhow::ensure!(seen == 2, "saw {seen}");
                    Err::<(), _>(anyhow::anyhow!("changed my mind"))
                })
            })
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "changed my mind");
        assert_eq!(balance(s, c.alice).await, 9_000);
        assert!(s.transfer(tid(51)).await.unwrap().is_none());
        let n = s.query_opt("SELECT count(*) FROM card_stock", &[]).await.unwrap().unwrap();
        assert_eq!(n.int(0).unwrap(), 1);

        // A constraint violation is reported as such and rolls back.
        let dup = s
            .transaction(move |tx| {
                Box::pin(async move {
                    tx.execute(
                        "INSERT INTO card_stock (asn, state, batch, updated_at) VALUES ($1, $2, $3, $4)",
                        store::params!["10000000000000000001", 0i64, "again", NOW.0],
                    )
                    .await?;
                    Ok::<_, anyhow::Error>(())
                })
            })
            .await
            .unwrap_err();
        assert!(store::is_unique_violation(&dup), "{dup:#}");
        // The same transfer id replayed inside a transaction gets the stored answer.
        let again = s
            .transaction(move |tx| {
                Box::pin(async move { tx.submit(&[t(50, alice, canteen, 1_000)], NOW).await })
            })
            .await
            .unwrap();
        assert_eq!(again, vec![Ok(NOW)]);
        assert_eq!(balance(s, c.alice).await, 9_000);
        assert_consistent(s).await;
    }
}

conformance! {
    async fn concurrent_transactions_share_commits_and_fail_alone(db) {
        let s = &db.store;
        let before = s.group_commits();
        let mut tasks = Vec::new();
        for i in 0..60u64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.transaction(move |tx| {
                    Box::pin(async move {
                        tx.execute(
                            "INSERT INTO card_stock (asn, state, batch, updated_at) VALUES ($1, 0, 'g', 0)",
                            store::params![format!("{:020}", 50_000 + i)],
                        )
                        .await?;
                        if i % 5 == 0 {
                            anyhow::bail!("task {i} changed its mind");
                        }
                        Ok::<_, anyhow::Error>(i)
                    })
                })
                .await
            }));
        }
        let mut failed = 0;
        for t in tasks {
            if t.await.unwrap().is_err() {
                failed += 1;
            }
        }
        assert_eq!(failed, 12);
        let n = s.query_opt("SELECT count(*) FROM card_stock", &[]).await.unwrap().unwrap().int(0).unwrap();
        assert_eq!(n, 48, "the failed ones left nothing, the others everything");
        if !db.is_postgres() {
            let commits = s.group_commits() - before;
            assert!(commits < 60, "60 transactions took {commits} commits");
        }
    }
}
