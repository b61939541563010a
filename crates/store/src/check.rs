//! `db-check`: recomputes every account's sums from the journal and proves that postings sum to
//! zero. The queries are written once for both backends; [`Dialect`] covers the differences.

use std::fmt;

/// One account whose stored sum differs from what its transfers say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub account_id: i64,
    pub field: &'static str,
    pub stored: i64,
    pub recomputed: i64,
}

/// What db-check found. [`CheckReport::is_ok`] is true only if nothing is off.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub accounts: i64,
    pub transfers: i64,
    pub debits_posted_total: i128,
    pub credits_posted_total: i128,
    pub debits_pending_total: i128,
    pub credits_pending_total: i128,
    pub mismatches: Vec<Mismatch>,
    /// Other broken rules, one sentence each, naming the account or transfer.
    pub problems: Vec<String>,
    /// Accounts named by those problems.
    pub problem_accounts: Vec<i64>,
}

impl CheckReport {
    pub fn is_ok(&self) -> bool {
        self.mismatches.is_empty()
            && self.problems.is_empty()
            && self.debits_posted_total == self.credits_posted_total
            && self.debits_pending_total == self.credits_pending_total
    }

    /// Accounts named by a mismatch or a problem, sorted, once each.
    pub fn bad_accounts(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.mismatches.iter().map(|m| m.account_id).collect();
        ids.extend_from_slice(&self.problem_accounts);
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "accounts checked:   {}", self.accounts)?;
        writeln!(f, "transfers checked:  {}", self.transfers)?;
        writeln!(
            f,
            "posted debits:      {}  credits: {}  difference: {}",
            self.debits_posted_total,
            self.credits_posted_total,
            self.credits_posted_total - self.debits_posted_total
        )?;
        writeln!(
            f,
            "pending debits:     {}  credits: {}  difference: {}",
            self.debits_pending_total,
            self.credits_pending_total,
            self.credits_pending_total - self.debits_pending_total
        )?;
        for m in &self.mismatches {
            writeln!(
                f,
                "account {}: {} is {} but its transfers say {}",
                m.account_id, m.field, m.stored, m.recomputed
            )?;
        }
        for p in &self.problems {
            writeln!(f, "{p}")?;
        }
        if self.is_ok() {
            write!(
                f,
                "OK: every balance matches its postings and postings sum to zero"
            )
        } else {
            write!(f, "FAILED: the ledger is inconsistent")
        }
    }
}

/// Most mismatches and problems one check reports; the first ones are enough to act on.
pub(crate) const REPORT_ROWS_MAX: i64 = 1_000;

#[derive(Clone, Copy)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// Casts an integer expression so both backends return a 64-bit integer.
    fn int(self, expr: &str) -> String {
        match self {
            Dialect::Sqlite => expr.to_owned(),
            Dialect::Postgres => format!("({expr})::bigint"),
        }
    }

    /// Null-safe "differs".
    fn differs(self, a: &str, b: &str) -> String {
        match self {
            Dialect::Sqlite => format!("{a} IS NOT {b}"),
            Dialect::Postgres => format!("{a} IS DISTINCT FROM {b}"),
        }
    }

    fn id_text(self, col: &str) -> String {
        match self {
            Dialect::Sqlite => format!("lower(hex({col}))"),
            Dialect::Postgres => format!("replace({col}::text, '-', '')"),
        }
    }
}

/// Totals: accounts, transfers, and the four sums as text (so no backend overflows an integer).
pub(crate) fn totals_sql() -> String {
    // Each sum in two halves (high and low 32 bits of every value), so that no backend's
    // integer SUM can overflow however much money the accounts hold; joined in Rust.
    let split = |col: &str| {
        format!(
            "CAST(COALESCE(SUM({col} >> 32), 0) AS TEXT) || ':' || \
             CAST(COALESCE(SUM({col} & 4294967295), 0) AS TEXT)"
        )
    };
    format!(
        "SELECT (SELECT COUNT(*) FROM accounts), (SELECT COUNT(*) FROM transfers), {}, {}, {}, {} \
         FROM accounts",
        split("debits_posted"),
        split("credits_posted"),
        split("debits_pending"),
        split("credits_pending")
    )
}

/// Accounts whose stored sums differ from their postings and open holds. Columns: id, then
/// stored and recomputed for each of the four sums.
pub(crate) fn mismatches_sql(d: Dialect) -> String {
    format!(
        "WITH p AS ( \
           SELECT account_id, SUM(dr) AS dr, SUM(cr) AS cr FROM ( \
             SELECT debit_account_id AS account_id, amount AS dr, 0 AS cr FROM transfers \
               WHERE result = 0 AND kind IN (0, 2) \
             UNION ALL \
             SELECT credit_account_id, 0, amount FROM transfers WHERE result = 0 AND kind IN (0, 2) \
           ) x GROUP BY account_id), \
         h AS ( \
           SELECT account_id, SUM(dr) AS dr, SUM(cr) AS cr FROM ( \
             SELECT debit_account_id AS account_id, amount AS dr, 0 AS cr FROM holds WHERE state = 0 \
             UNION ALL \
             SELECT credit_account_id, 0, amount FROM holds WHERE state = 0 \
           ) y GROUP BY account_id) \
         SELECT a.id, a.debits_posted, {pd}, a.credits_posted, {pc}, \
                a.debits_pending, {hd}, a.credits_pending, {hc} \
         FROM accounts a LEFT JOIN p ON p.account_id = a.id LEFT JOIN h ON h.account_id = a.id \
         WHERE a.debits_posted <> COALESCE(p.dr, 0) OR a.credits_posted <> COALESCE(p.cr, 0) \
            OR a.debits_pending <> COALESCE(h.dr, 0) OR a.credits_pending <> COALESCE(h.cr, 0) \
         ORDER BY a.id LIMIT {REPORT_ROWS_MAX}",
        pd = d.int("COALESCE(p.dr, 0)"),
        pc = d.int("COALESCE(p.cr, 0)"),
        hd = d.int("COALESCE(h.dr, 0)"),
        hc = d.int("COALESCE(h.cr, 0)"),
    )
}

/// Other broken rules: each row the account it concerns (or NULL) and one sentence.
pub(crate) fn problems_sql(d: Dialect) -> Vec<String> {
    let hold_id = d.id_text("h.id");
    let t_id = d.id_text("t.id");
    let applied_sides = "SELECT seq, debit_account_id AS account_id, debit_prev_seq AS prev \
         FROM transfers WHERE result = 0 \
         UNION ALL SELECT seq, credit_account_id, credit_prev_seq FROM transfers WHERE result = 0";
    let head_differs = d.differs("a.last_seq", "m.newest");
    let link_differs = d.differs("w.prev", "w.expected");
    vec![
        // History chains (see journal.rs): each account's head is its newest applied transfer,
        // and each applied transfer links to the previous one of each of its accounts.
        format!(
            "SELECT a.id, 'account ' || a.id || ' history starts at seq ' || \
                    COALESCE(CAST(a.last_seq AS TEXT), 'none') || \
                    ' but its newest applied transfer is seq ' || \
                    COALESCE(CAST(m.newest AS TEXT), 'none') \
             FROM accounts a LEFT JOIN ( \
               SELECT account_id, MAX(seq) AS newest FROM ({applied_sides}) s GROUP BY account_id \
             ) m ON m.account_id = a.id \
             WHERE {head_differs} LIMIT {REPORT_ROWS_MAX}"
        ),
        format!(
            "SELECT w.account_id, 'transfer at seq ' || w.seq || ' links the history of account ' || \
                    w.account_id || ' to seq ' || COALESCE(CAST(w.prev AS TEXT), 'none') || \
                    ' instead of ' || COALESCE(CAST(w.expected AS TEXT), 'none') \
             FROM (SELECT seq, account_id, prev, \
                          LAG(seq) OVER (PARTITION BY account_id ORDER BY seq) AS expected \
                   FROM ({applied_sides}) s) w \
             WHERE {link_differs} LIMIT {REPORT_ROWS_MAX}"
        ),
        format!(
            "SELECT id, 'account ' || id || ' must not overdraw but its debits exceed its credits' \
             FROM accounts WHERE kind IN (1, 2, 3, 6, 7) \
             AND debits_posted + debits_pending > credits_posted LIMIT {REPORT_ROWS_MAX}"
        ),
        format!(
            "SELECT CASE WHEN d.id IS NULL THEN t.debit_account_id ELSE t.credit_account_id END, \
                    'transfer ' || {t_id} || ' posts to account ' || \
                    CASE WHEN d.id IS NULL THEN t.debit_account_id ELSE t.credit_account_id END \
                    || ', which does not exist' \
             FROM transfers t LEFT JOIN accounts d ON d.id = t.debit_account_id \
             LEFT JOIN accounts c ON c.id = t.credit_account_id \
             WHERE t.result = 0 AND (d.id IS NULL OR c.id IS NULL) LIMIT {REPORT_ROWS_MAX}"
        ),
        format!(
            "SELECT CAST(NULL AS BIGINT), 'hold ' || {hold_id} || ' does not match an applied pending transfer' \
             FROM holds h LEFT JOIN transfers t ON t.id = h.id \
             WHERE t.id IS NULL OR t.result <> 0 OR t.kind <> 1 OR t.amount <> h.amount \
                OR t.debit_account_id <> h.debit_account_id \
                OR t.credit_account_id <> h.credit_account_id LIMIT {REPORT_ROWS_MAX}"
        ),
        format!(
            "SELECT CAST(NULL AS BIGINT), 'pending transfer ' || {t_id} || ' has no hold' \
             FROM transfers t LEFT JOIN holds h ON h.id = t.id \
             WHERE t.result = 0 AND t.kind = 1 AND h.id IS NULL LIMIT {REPORT_ROWS_MAX}"
        ),
        format!(
            "SELECT CAST(NULL AS BIGINT), 'hold ' || {hold_id} || ' is in state ' || h.state || ' but has ' || \
                    COALESCE(r.posts, 0) || ' posts and ' || COALESCE(r.voids, 0) || ' voids' \
             FROM holds h LEFT JOIN ( \
               SELECT pending_id, SUM(CASE WHEN kind = 2 THEN 1 ELSE 0 END) AS posts, \
                      SUM(CASE WHEN kind = 3 THEN 1 ELSE 0 END) AS voids \
               FROM transfers WHERE result = 0 AND kind IN (2, 3) GROUP BY pending_id \
             ) r ON r.pending_id = h.id \
             WHERE NOT ( \
               (h.state = 1 AND COALESCE(r.posts, 0) = 1 AND COALESCE(r.voids, 0) = 0) \
               OR (h.state = 2 AND COALESCE(r.posts, 0) = 0 AND COALESCE(r.voids, 0) = 1) \
               OR (h.state IN (0, 3) AND COALESCE(r.posts, 0) = 0 AND COALESCE(r.voids, 0) = 0)) \
             LIMIT {REPORT_ROWS_MAX}"
        ),
    ]
}

pub(crate) fn parse_total(text: &str) -> anyhow::Result<i128> {
    let bad = || anyhow::anyhow!("db-check: total {text:?} is not HIGH:LOW");
    let (high, low) = text.split_once(':').ok_or_else(bad)?;
    let high: i128 = high.trim().parse().map_err(|_| bad())?;
    let low: i128 = low.trim().parse().map_err(|_| bad())?;
    Ok((high << 32) + low)
}
