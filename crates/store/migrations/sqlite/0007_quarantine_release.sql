-- A quarantined record an operator released (re-checked, and posted if it now passes).
ALTER TABLE offline_records ADD COLUMN resolved_at INTEGER;
ALTER TABLE offline_records ADD COLUMN resolution TEXT;
