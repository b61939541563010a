-- Bank top-up (圈存): bindings of bank cards to cardholders, top-ups with their one visible
-- state, the reversal journal written before a transfer is sent, automatic top-up rules,
-- the traces used at each bank, and alarms.

-- One bank card per cardholder (status 0 active; 1 ended, kept for history).
CREATE TABLE bank_bindings (
    id            INTEGER PRIMARY KEY,
    cardholder_id INTEGER NOT NULL REFERENCES cardholders (id),
    bank_id       TEXT NOT NULL,
    pan           TEXT NOT NULL,
    status        INTEGER NOT NULL CHECK (status IN (0, 1)),
    bound_at      INTEGER NOT NULL,
    ended_at      INTEGER,
    end_reason    TEXT
) STRICT;
CREATE UNIQUE INDEX bank_bindings_one_per_holder ON bank_bindings (cardholder_id) WHERE status = 0;
CREATE UNIQUE INDEX bank_bindings_one_per_pan ON bank_bindings (bank_id, pan) WHERE status = 0;

-- A transfer from a bank card to the campus and what became of it (app::topup::State):
-- 0 requested, 1 approved, 2 credited (a pending load), 3 loading (MAC2 issued), 4 loaded,
-- 5 returned (the pending load's deadline passed; the money stays online), 6 refused,
-- 7 reversing, 8 reversed, 9 manual (reversal not acknowledged: an operator decides),
-- 10 queued (from a batch file or an automatic rule; not sent yet, the bank knows nothing).
-- `origin` is the request's idempotency key; (bank_id, batch, stan) is the campus serial the
-- bank knows it by.
CREATE TABLE bank_topups (
    id              INTEGER PRIMARY KEY,
    origin          TEXT NOT NULL UNIQUE,
    kind            INTEGER NOT NULL CHECK (kind IN (0, 1, 2)), -- kiosk, automatic, batch
    state           INTEGER NOT NULL CHECK (state BETWEEN 0 AND 10),
    bank_id         TEXT NOT NULL,
    batch           TEXT NOT NULL,
    stan            TEXT NOT NULL,
    pan             TEXT NOT NULL,
    cardholder_id   INTEGER NOT NULL REFERENCES cardholders (id),
    amount_fen      INTEGER NOT NULL CHECK (amount_fen > 0),
    terminal_no     TEXT,
    bank_code       TEXT,
    bank_reference  TEXT,
    auth_code       TEXT,
    settle_date     TEXT NOT NULL,
    credit_transfer TEXT,
    load_deadline   INTEGER,
    load_card_id    INTEGER,
    load_terminal   TEXT,
    load_counter    INTEGER,
    load_date_time  TEXT,
    load_hold       TEXT,
    load_key_version INTEGER,
    requested_at    INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    UNIQUE (bank_id, batch, stan)
) STRICT;
CREATE INDEX bank_topups_holder_state ON bank_topups (cardholder_id, state);
CREATE INDEX bank_topups_settle ON bank_topups (bank_id, settle_date);
CREATE INDEX bank_topups_pending_load ON bank_topups (load_deadline) WHERE state = 2;
CREATE INDEX bank_topups_queued ON bank_topups (id) WHERE state = 10;

-- The reversal journal: a row is written (armed) before the transfer request is sent.
-- 0 armed (request in flight), 1 due (to be sent), 2 acknowledged, 3 disarmed (the bank
-- approved and the campus credited: nothing to undo), 4 manual.
CREATE TABLE bank_reversals (
    topup_id   INTEGER PRIMARY KEY REFERENCES bank_topups (id),
    state      INTEGER NOT NULL CHECK (state BETWEEN 0 AND 4),
    reason     TEXT NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_at    INTEGER NOT NULL,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;
CREATE INDEX bank_reversals_open ON bank_reversals (next_at) WHERE state IN (0, 1);

-- The next trace (F11) of each bank's batch (business day).
CREATE TABLE bank_traces (
    bank_id   TEXT NOT NULL,
    batch     TEXT NOT NULL,
    next_stan INTEGER NOT NULL,
    PRIMARY KEY (bank_id, batch)
) STRICT;

-- A cardholder's signed authorisation for automatic top-up from the bound bank card.
CREATE TABLE auto_topup_rules (
    cardholder_id INTEGER PRIMARY KEY REFERENCES cardholders (id),
    threshold_fen INTEGER NOT NULL CHECK (threshold_fen > 0),
    amount_fen    INTEGER NOT NULL CHECK (amount_fen > 0),
    daily_cap_fen INTEGER NOT NULL CHECK (daily_cap_fen >= amount_fen),
    signature     TEXT NOT NULL,
    signed_at     INTEGER NOT NULL,
    enabled       INTEGER NOT NULL CHECK (enabled IN (0, 1))
) STRICT;

-- Alarms for the console and notifications: one open alarm per (kind, subject).
CREATE TABLE alarms (
    id         INTEGER PRIMARY KEY,
    kind       TEXT NOT NULL,
    subject    TEXT NOT NULL,
    message    TEXT NOT NULL,
    raised_at  INTEGER NOT NULL,
    cleared_at INTEGER
) STRICT;
CREATE UNIQUE INDEX alarms_open ON alarms (kind, subject) WHERE cleared_at IS NULL;
