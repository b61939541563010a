//! History chains through the journal.
//!
//! A B-tree index on (account, seq) takes one random insert per transfer per side, and those
//! random page writes are what limits a journal's write rate as it grows. Instead, each account
//! row keeps `last_seq`, the newest applied transfer touching it, and each applied transfer
//! keeps `debit_prev_seq` and `credit_prev_seq`, the previous applied transfer of each of its
//! accounts. The account row is written by the group anyway, so a chain costs no extra write;
//! reading a page of history follows the pointers. Rejected transfers are stored but are not
//! part of any account's history. `db-check` verifies every chain.

use ledger::{AccountId, TransferRecord};
use rustc_hash::FxHashMap;

/// Where a stored transfer sits in the journal and in its accounts' chains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Link {
    pub seq: i64,
    pub debit_prev: Option<i64>,
    pub credit_prev: Option<i64>,
}

/// The head of each loaded account's chain (`None`: no history yet).
pub(crate) type Heads = FxHashMap<AccountId, Option<i64>>;

/// Gives each record the next seq from `seqs` (ascending) and links the applied ones into the
/// chains of their two accounts, moving `heads` forward.
pub(crate) fn link(
    records: &[TransferRecord],
    seqs: impl IntoIterator<Item = i64>,
    heads: &mut Heads,
) -> Vec<Link> {
    let mut seqs = seqs.into_iter();
    records
        .iter()
        .map(|r| {
            let seq = seqs.next().expect("a seq for every record");
            if r.outcome.is_err() {
                return Link {
                    seq,
                    debit_prev: None,
                    credit_prev: None,
                };
            }
            let t = &r.transfer;
            let debit_prev = heads.insert(t.debit, Some(seq)).flatten();
            let credit_prev = heads.insert(t.credit, Some(seq)).flatten();
            Link {
                seq,
                debit_prev,
                credit_prev,
            }
        })
        .collect()
}

/// A page of one account's history, newest first, walking its chain. Parameters: 1 the account,
/// 2 the cursor (the `seq` of the last transfer of the previous page, or NULL for the newest
/// page), 3 the page size. `$` is the backend's placeholder sign (`?` or `$`).
pub(crate) fn history_sql(sign: char) -> String {
    let p = |n: u8| format!("CAST({sign}{n} AS BIGINT)");
    let (account, cursor, limit) = (p(1), p(2), p(3));
    format!(
        "WITH RECURSIVE chain(seq, n) AS ( \
           SELECT CASE WHEN {cursor} IS NULL \
                       THEN (SELECT last_seq FROM accounts WHERE id = {account}) \
                       ELSE (SELECT CASE WHEN debit_account_id = {account} THEN debit_prev_seq \
                                         WHEN credit_account_id = {account} THEN credit_prev_seq END \
                             FROM transfers WHERE seq = {cursor}) END, 1 \
           UNION ALL \
           SELECT CASE WHEN t.debit_account_id = {account} THEN t.debit_prev_seq \
                       ELSE t.credit_prev_seq END, chain.n + 1 \
           FROM chain JOIN transfers t ON t.seq = chain.seq \
           WHERE chain.n < {limit}) \
         SELECT t.id, t.debit_account_id, t.credit_account_id, t.amount, t.kind, t.pending_id, \
                t.timeout_s, t.linked, t.code, t.result, t.timestamp, t.seq \
         FROM chain JOIN transfers t ON t.seq = chain.seq ORDER BY t.seq DESC"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledger::{Fen, Rejection, Timestamp, Transfer, TransferId, TransferKind};

    fn record(id: u128, debit: i64, credit: i64, ok: bool) -> TransferRecord {
        TransferRecord {
            transfer: Transfer {
                id: TransferId::new(id).unwrap(),
                debit: AccountId::new(debit).unwrap(),
                credit: AccountId::new(credit).unwrap(),
                amount: Fen::new(1),
                kind: TransferKind::Single,
                linked: false,
                code: 0,
            },
            outcome: if ok {
                Ok(Timestamp(0))
            } else {
                Err(Rejection::InsufficientBalance)
            },
            timestamp: Timestamp(0),
        }
    }

    #[test]
    fn applied_transfers_chain_per_account_and_rejections_do_not() {
        let a = |i| AccountId::new(i).unwrap();
        let mut heads: Heads = [(a(1), Some(7)), (a(2), None), (a(3), None)]
            .into_iter()
            .collect();
        let records = [
            record(1, 1, 2, true),
            record(2, 1, 3, false),
            record(3, 2, 1, true),
        ];
        let links = link(&records, 10.., &mut heads);
        assert_eq!(
            links[0],
            Link {
                seq: 10,
                debit_prev: Some(7),
                credit_prev: None
            }
        );
        assert_eq!(
            links[1],
            Link {
                seq: 11,
                debit_prev: None,
                credit_prev: None
            }
        );
        assert_eq!(
            links[2],
            Link {
                seq: 12,
                debit_prev: Some(10),
                credit_prev: Some(10)
            }
        );
        assert_eq!(heads[&a(1)], Some(12));
        assert_eq!(heads[&a(2)], Some(12));
        assert_eq!(heads[&a(3)], None);
    }
}
