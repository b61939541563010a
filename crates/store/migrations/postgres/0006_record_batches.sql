-- The terminal's batch (F60.2) each record was uploaded in: settlement (0500) totals a batch.
ALTER TABLE offline_records ADD COLUMN batch TEXT;
CREATE INDEX offline_records_batch ON offline_records (terminal_no, batch);
