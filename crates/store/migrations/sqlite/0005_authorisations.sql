-- Online purchase authorisations from terminals (0200), by (terminal, batch, trace): a
-- replayed request is answered from this row, a reversal (0400) finds its authorisation here,
-- and a card's approved amounts of a business day count against its daily limit.
CREATE TABLE authorisations (
    id            INTEGER PRIMARY KEY,
    terminal_no   TEXT NOT NULL,
    batch         TEXT NOT NULL,
    stan          TEXT NOT NULL,
    asn           TEXT NOT NULL,
    amount_fen    INTEGER NOT NULL,
    -- 0 approved, 1 declined, 2 reversed, 3 confirmed
    status        INTEGER NOT NULL CHECK (status BETWEEN 0 AND 3),
    response_code TEXT NOT NULL,
    business_date TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    UNIQUE (terminal_no, batch, stan)
) STRICT;
CREATE INDEX authorisations_card_day ON authorisations (asn, business_date);
