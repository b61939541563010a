-- Looking a record up by its key: posted records through the unique index
-- offline_records_posted, quarantined ones through this one. The index over every record's key
-- it replaces duplicated the unique index for posted records, so that each posted record (nearly
-- every record) took two random index inserts instead of one.
DROP INDEX offline_records_key;
CREATE INDEX offline_records_quarantined_key ON offline_records (asn, tx_type, counter)
    WHERE status = 1;
