-- The ledger: accounts with their four running sums, the append-only journal of transfers
-- (every id with its body and answer), and holds.

CREATE TABLE accounts (
    id              INTEGER PRIMARY KEY,
    kind            INTEGER NOT NULL CHECK (kind BETWEEN 1 AND 9),
    status          INTEGER NOT NULL DEFAULT 0 CHECK (status IN (0, 1, 2)),
    name            TEXT UNIQUE,
    debits_posted   INTEGER NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_posted  INTEGER NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    debits_pending  INTEGER NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    credits_pending INTEGER NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    created_at      INTEGER NOT NULL,
    -- The newest applied transfer of this account: the head of its history chain.
    last_seq        INTEGER,
    -- Liability accounts never go below zero (the ledger checks it too).
    CHECK (kind NOT IN (1, 2, 3, 6, 7) OR debits_posted + debits_pending <= credits_posted)
) STRICT;

CREATE TABLE transfers (
    seq               INTEGER PRIMARY KEY,
    id                BLOB NOT NULL UNIQUE CHECK (length(id) = 16),
    debit_account_id  INTEGER NOT NULL,
    credit_account_id INTEGER NOT NULL,
    amount            INTEGER NOT NULL,
    kind              INTEGER NOT NULL CHECK (kind IN (0, 1, 2, 3)),
    pending_id        BLOB CHECK ((kind IN (2, 3)) = (pending_id IS NOT NULL)),
    timeout_s         INTEGER NOT NULL CHECK ((kind = 1) OR timeout_s = 0),
    linked            INTEGER NOT NULL CHECK (linked IN (0, 1)),
    code              INTEGER NOT NULL,
    -- 0: applied; otherwise the stored rejection's code.
    result            INTEGER NOT NULL,
    timestamp         INTEGER NOT NULL,
    -- History chains: the previous applied transfer of the debit (credit) account.
    debit_prev_seq    INTEGER,
    credit_prev_seq   INTEGER,
    CHECK (result <> 0 OR (amount > 0 AND debit_account_id <> credit_account_id)),
    CHECK (result = 0 OR (debit_prev_seq IS NULL AND credit_prev_seq IS NULL)),
    CHECK (debit_prev_seq < seq AND credit_prev_seq < seq)
) STRICT;

-- No index by account: one random index insert per transfer is what limits a B-tree journal.
-- An account's history is a chain through debit_prev_seq/credit_prev_seq from last_seq.
CREATE INDEX transfers_pending ON transfers (pending_id) WHERE pending_id IS NOT NULL;

CREATE TRIGGER transfers_append_only_update BEFORE UPDATE ON transfers
BEGIN SELECT RAISE(ABORT, 'transfers are append-only'); END;
CREATE TRIGGER transfers_append_only_delete BEFORE DELETE ON transfers
BEGIN SELECT RAISE(ABORT, 'transfers are append-only'); END;

CREATE TABLE holds (
    id                BLOB PRIMARY KEY REFERENCES transfers (id),
    debit_account_id  INTEGER NOT NULL,
    credit_account_id INTEGER NOT NULL,
    amount            INTEGER NOT NULL CHECK (amount > 0),
    expires_at        INTEGER NOT NULL,
    state             INTEGER NOT NULL CHECK (state IN (0, 1, 2, 3))
) STRICT, WITHOUT ROWID;

CREATE INDEX holds_due ON holds (expires_at) WHERE state = 0;
