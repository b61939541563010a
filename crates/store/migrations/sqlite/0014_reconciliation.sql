-- Reconciliation with the banks' files (app::reconcile): one run per (bank, settlement date)
-- and its items, the queue of differences an operator resolves.
--
-- A run is recomputed from the file and the campus's top-ups each time it is run again: its
-- row is updated in place (`runs` counts them) and its open and noted items are replaced by
-- the new computation (an item that comes out the same keeps its id). Resolved items are never
-- changed or deleted (triggers below), and a resolved (serial, occurrence) whose bank line is
-- unchanged is not opened again, so running a day again gives the same queue.
CREATE TABLE reconciliation_runs (
    id               INTEGER PRIMARY KEY,
    bank_id          TEXT NOT NULL,
    settle_date      TEXT NOT NULL CHECK (length(settle_date) = 8), -- YYYYMMDD
    file_name        TEXT NOT NULL,
    file_sha256      TEXT NOT NULL,
    line_count       INTEGER NOT NULL CHECK (line_count >= 0),   -- D lines in the file
    bank_total_fen   INTEGER NOT NULL CHECK (bank_total_fen >= 0), -- sum of the OK lines
    campus_count     INTEGER NOT NULL CHECK (campus_count >= 0),  -- the day's credited top-ups
    campus_total_fen INTEGER NOT NULL CHECK (campus_total_fen >= 0),
    matched          INTEGER NOT NULL,
    bank_only        INTEGER NOT NULL,
    campus_only      INTEGER NOT NULL,
    amount_mismatch  INTEGER NOT NULL,
    duplicate        INTEGER NOT NULL,
    not_at_bank      INTEGER NOT NULL,
    runs             INTEGER NOT NULL CHECK (runs >= 1),
    first_run_at     INTEGER NOT NULL,
    run_at           INTEGER NOT NULL,
    run_by           TEXT NOT NULL,
    UNIQUE (bank_id, settle_date)
) STRICT;

-- class: 0 matched (kept only as a note: matched under another settlement date), 1 bank_only,
-- 2 campus_only, 3 amount_mismatch, 4 duplicate, 5 not_at_bank (undecided at the campus,
-- absent from the file: nothing moved). state: 0 open, 1 resolved, 2 noted (nothing to do).
-- bank_status: 0 OK, 1 REVERSED; NULL with bank_amount_fen and file_line when the file has no
-- line. difference_fen is what a resolution moves: positive when the bank holds more than the
-- campus credited, negative when the campus credited more than the bank holds.
CREATE TABLE reconciliation_items (
    id                INTEGER PRIMARY KEY,
    run_id            INTEGER NOT NULL REFERENCES reconciliation_runs (id),
    class             INTEGER NOT NULL CHECK (class BETWEEN 0 AND 5),
    serial            TEXT NOT NULL CHECK (length(serial) = 12),
    occurrence        INTEGER NOT NULL CHECK (occurrence >= 1),
    topup_id          INTEGER REFERENCES bank_topups (id),
    bank_reference    TEXT,
    bank_amount_fen   INTEGER,
    bank_status       INTEGER CHECK (bank_status IN (0, 1)),
    bank_account      TEXT,
    bank_line         TEXT,
    file_line         INTEGER,
    campus_amount_fen INTEGER,
    campus_state      INTEGER,
    difference_fen    INTEGER NOT NULL,
    note              TEXT NOT NULL,
    state             INTEGER NOT NULL CHECK (state IN (0, 1, 2)),
    action            TEXT CHECK (action IN ('credit', 'reverse', 'write_off')),
    reason            TEXT,
    resolved_by       TEXT,
    resolved_at       INTEGER,
    transfer_id       TEXT,
    created_at        INTEGER NOT NULL,
    CHECK ((state = 1) = (action IS NOT NULL AND resolved_by IS NOT NULL AND resolved_at IS NOT NULL)),
    CHECK (action IS NULL OR action <> 'write_off' OR length(trim(coalesce(reason, ''))) > 0),
    CHECK ((bank_amount_fen IS NULL) = (file_line IS NULL)),
    CHECK ((bank_status IS NULL) = (file_line IS NULL))
) STRICT;
CREATE INDEX reconciliation_items_run ON reconciliation_items (run_id, state);
CREATE INDEX reconciliation_items_open ON reconciliation_items (state) WHERE state = 0;
CREATE INDEX reconciliation_items_topup ON reconciliation_items (topup_id) WHERE topup_id IS NOT NULL;
-- One live (open or noted) item per serial and occurrence in a run.
CREATE UNIQUE INDEX reconciliation_items_live ON reconciliation_items (run_id, serial, occurrence)
    WHERE state <> 1;

-- A resolution is history: it posted money. Open and noted items are replaced by a re-run.
CREATE TRIGGER reconciliation_items_resolved_update BEFORE UPDATE ON reconciliation_items
WHEN OLD.state = 1
BEGIN SELECT RAISE(ABORT, 'resolved reconciliation items are final'); END;
CREATE TRIGGER reconciliation_items_resolved_delete BEFORE DELETE ON reconciliation_items
WHEN OLD.state = 1
BEGIN SELECT RAISE(ABORT, 'resolved reconciliation items are final'); END;
