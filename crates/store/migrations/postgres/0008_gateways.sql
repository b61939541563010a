-- A POS behind a commerce gateway: the gateway speaks for it (its messages carry the
-- gateway's MAC), so the front end must know which gateway that is.
ALTER TABLE terminals ADD COLUMN gateway_no TEXT;
