-- Terminals (POS, kiosks, commerce gateways) and the offline records they upload: each record
-- once by (card ASN, purse counter, transaction type), posted or quarantined with a reason,
-- never dropped; and the purse anomalies the records reveal.

CREATE TABLE terminals (
    id                  INTEGER PRIMARY KEY,
    -- The 6-byte terminal number the PSAM puts in every MAC and TAC, as 12 hex digits.
    terminal_no         TEXT NOT NULL UNIQUE CHECK (length(terminal_no) = 12),
    kind                INTEGER NOT NULL CHECK (kind IN (1, 2, 3)), -- pos, kiosk, gateway
    merchant_account_id INTEGER REFERENCES accounts (id),
    location            TEXT NOT NULL,
    psam_serial         TEXT,
    enabled             INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    last_seen_at        INTEGER,
    signed_in_at        INTEGER,
    blacklist_version   INTEGER NOT NULL DEFAULT 0,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL
) STRICT;

CREATE TABLE offline_records (
    id                 INTEGER PRIMARY KEY,
    asn                TEXT NOT NULL,
    counter            INTEGER NOT NULL CHECK (counter BETWEEN 0 AND 65535),
    tx_type            INTEGER NOT NULL,
    terminal_no        TEXT NOT NULL,
    ttc                INTEGER NOT NULL,
    amount_fen         INTEGER NOT NULL,
    balance_before_fen INTEGER NOT NULL,
    tx_at              TEXT NOT NULL,
    tac                BLOB NOT NULL CHECK (length(tac) = 4),
    -- 0 posted, 1 quarantined
    status             INTEGER NOT NULL CHECK (status IN (0, 1)),
    reason             TEXT NOT NULL,
    transfer_id        BLOB,
    received_at        INTEGER NOT NULL
) STRICT;
-- At most one posted record per (ASN, type, counter); quarantined ones may repeat a key.
CREATE UNIQUE INDEX offline_records_posted ON offline_records (asn, tx_type, counter)
    WHERE status = 0;
CREATE INDEX offline_records_key ON offline_records (asn, tx_type, counter);
CREATE INDEX offline_records_quarantined ON offline_records (status, id) WHERE status = 1;

CREATE TABLE purse_anomalies (
    id          INTEGER PRIMARY KEY,
    asn         TEXT NOT NULL,
    -- missing_record, balance_mismatch
    kind        TEXT NOT NULL,
    counter     INTEGER NOT NULL,
    detail      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    resolved_at INTEGER
) STRICT;
CREATE INDEX purse_anomalies_asn ON purse_anomalies (asn, counter);
