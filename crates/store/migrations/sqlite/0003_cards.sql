-- Cardholders, cards, card stock, the blacklist, operators and their sessions, the audit log
-- and API idempotency. No money is kept here: money is only in accounts and transfers.

CREATE TABLE cardholders (
    id                INTEGER PRIMARY KEY,
    number            TEXT NOT NULL UNIQUE,
    name              TEXT NOT NULL,
    kind              INTEGER NOT NULL CHECK (kind IN (1, 2, 3)), -- student, staff, temporary
    department        TEXT NOT NULL,
    id_number         TEXT,
    phone             TEXT,
    online_account_id INTEGER NOT NULL UNIQUE REFERENCES accounts (id),
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
) STRICT;
CREATE INDEX cardholders_name ON cardholders (name);
CREATE INDEX cardholders_department ON cardholders (department, id);

-- Card stock: every physical card the campus holds, by ASN (20 digits).
CREATE TABLE card_stock (
    asn        TEXT PRIMARY KEY CHECK (length(asn) = 20),
    state      INTEGER NOT NULL CHECK (state BETWEEN 0 AND 3), -- blank, initialised, issued, void
    batch      TEXT NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
CREATE INDEX card_stock_state ON card_stock (state, asn);

CREATE TABLE stock_movements (
    id         INTEGER PRIMARY KEY,
    at         INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    asn_first  TEXT NOT NULL,
    asn_last   TEXT NOT NULL,
    count      INTEGER NOT NULL CHECK (count > 0),
    from_state INTEGER,
    to_state   INTEGER NOT NULL,
    note       TEXT NOT NULL
) STRICT;

CREATE TABLE cards (
    id               INTEGER PRIMARY KEY,
    asn              TEXT NOT NULL UNIQUE REFERENCES card_stock (asn),
    cardholder_id    INTEGER NOT NULL REFERENCES cardholders (id),
    -- active, lost, frozen, replaced, cancelled
    status           INTEGER NOT NULL CHECK (status BETWEEN 0 AND 4),
    purse_account_id INTEGER NOT NULL UNIQUE REFERENCES accounts (id),
    deposit_fen      INTEGER NOT NULL CHECK (deposit_fen >= 0),
    expires_on       TEXT NOT NULL,
    issued_at        INTEGER NOT NULL,
    replaced_by      INTEGER REFERENCES cards (id),
    -- When a replaced or cancelled card's purse shadow moves to the online account.
    purse_settle_at  INTEGER,
    purse_settled_at INTEGER,
    updated_at       INTEGER NOT NULL
) STRICT;
-- One card per cardholder that is active, lost or frozen.
CREATE UNIQUE INDEX cards_one_live_card ON cards (cardholder_id) WHERE status IN (0, 1, 2);
CREATE INDEX cards_cardholder ON cards (cardholder_id, id);
CREATE INDEX cards_purse_due ON cards (purse_settle_at)
    WHERE purse_settle_at IS NOT NULL AND purse_settled_at IS NULL;

CREATE TABLE card_events (
    id          INTEGER PRIMARY KEY,
    card_id     INTEGER NOT NULL REFERENCES cards (id),
    at          INTEGER NOT NULL,
    action      TEXT NOT NULL,
    from_status INTEGER,
    to_status   INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    note        TEXT NOT NULL
) STRICT;
CREATE INDEX card_events_card ON card_events (card_id, id);

-- The blacklist as a log of changes: version n is the n-th change; terminals download the
-- changes after the version they hold. Every writer updates blacklist_head first, so versions
-- are handed out (and, on PostgreSQL, committed) in order.
CREATE TABLE blacklist (
    version INTEGER PRIMARY KEY,
    asn     TEXT NOT NULL,
    listed  INTEGER NOT NULL CHECK (listed IN (0, 1)),
    reason  TEXT NOT NULL,
    at      INTEGER NOT NULL
) STRICT;
CREATE INDEX blacklist_asn ON blacklist (asn, version);
CREATE TABLE blacklist_head (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
) STRICT;
INSERT INTO blacklist_head VALUES (1, 0);

CREATE TABLE operators (
    id                  INTEGER PRIMARY KEY,
    username            TEXT NOT NULL UNIQUE,
    display_name        TEXT NOT NULL,
    -- administrator, card desk, finance, auditor, merchant operator
    role                INTEGER NOT NULL CHECK (role BETWEEN 1 AND 5),
    merchant_account_id INTEGER REFERENCES accounts (id),
    password_hash       TEXT NOT NULL,
    disabled            INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL
) STRICT;

-- Sessions by the SHA-256 of their token: the token itself is never stored.
CREATE TABLE sessions (
    token_hash  BLOB PRIMARY KEY CHECK (length(token_hash) = 32),
    operator_id INTEGER NOT NULL REFERENCES operators (id),
    source      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE login_attempts (
    id       INTEGER PRIMARY KEY,
    username TEXT NOT NULL,
    source   TEXT NOT NULL,
    at       INTEGER NOT NULL,
    ok       INTEGER NOT NULL CHECK (ok IN (0, 1))
) STRICT;
CREATE INDEX login_attempts_username ON login_attempts (username, at);
CREATE INDEX login_attempts_source ON login_attempts (source, at);

-- The audit log: hash = SHA-256(previous hash, this row's fields). audit_head holds the last
-- seq and hash, so a deleted tail is noticed too.
CREATE TABLE audit_log (
    seq     INTEGER PRIMARY KEY,
    at      INTEGER NOT NULL,
    actor   TEXT NOT NULL,
    source  TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT NOT NULL,
    summary TEXT NOT NULL,
    hash    BLOB NOT NULL CHECK (length(hash) = 32)
) STRICT;
CREATE INDEX audit_log_actor ON audit_log (actor, seq);
CREATE INDEX audit_log_action ON audit_log (action, seq);
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash BLOB NOT NULL CHECK (length(hash) = 32)
) STRICT;
INSERT INTO audit_head VALUES (1, 0, zeroblob(32));
CREATE TRIGGER audit_log_append_only_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_log_append_only_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;

-- API requests by Idempotency-Key, per caller: the first answer is kept and replayed.
CREATE TABLE idempotency (
    actor        TEXT NOT NULL,
    key          TEXT NOT NULL,
    request_hash BLOB NOT NULL,
    status       INTEGER NOT NULL,
    response     TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (actor, key)
) STRICT;
