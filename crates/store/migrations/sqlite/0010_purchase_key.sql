-- Posted purchases by what their TAC covers (terminal, TTC): a purchase sent again under
-- another purse counter is found here and quarantined instead of posting twice.
CREATE INDEX offline_records_terminal_ttc ON offline_records (terminal_no, ttc) WHERE status = 0;
