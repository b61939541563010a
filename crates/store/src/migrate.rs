//! Schema migrations: SQL embedded in the binary, one folder per backend, applied in order and
//! recorded with a checksum so that an edited migration is caught instead of silently skipped.

/// One schema step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Migration {
    pub version: i64,
    pub name: String,
    pub checksum: String,
}

#[derive(Debug)]
pub(crate) struct Source {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

impl Source {
    pub fn migration(&self) -> Migration {
        Migration {
            version: self.version,
            name: self.name.to_owned(),
            checksum: checksum(self.sql),
        }
    }
}

pub(crate) const SQLITE: &[Source] = &[
    Source {
        version: 1,
        name: "ledger",
        sql: include_str!("../migrations/sqlite/0001_ledger.sql"),
    },
    Source {
        version: 2,
        name: "master_keys",
        sql: include_str!("../migrations/sqlite/0002_master_keys.sql"),
    },
    Source {
        version: 3,
        name: "cards",
        sql: include_str!("../migrations/sqlite/0003_cards.sql"),
    },
    Source {
        version: 4,
        name: "terminals",
        sql: include_str!("../migrations/sqlite/0004_terminals.sql"),
    },
    Source {
        version: 5,
        name: "authorisations",
        sql: include_str!("../migrations/sqlite/0005_authorisations.sql"),
    },
    Source {
        version: 6,
        name: "record_batches",
        sql: include_str!("../migrations/sqlite/0006_record_batches.sql"),
    },
    Source {
        version: 7,
        name: "quarantine_release",
        sql: include_str!("../migrations/sqlite/0007_quarantine_release.sql"),
    },
    Source {
        version: 8,
        name: "gateways",
        sql: include_str!("../migrations/sqlite/0008_gateways.sql"),
    },
    Source {
        version: 9,
        name: "record_key_index",
        sql: include_str!("../migrations/sqlite/0009_record_key_index.sql"),
    },
    Source {
        version: 10,
        name: "purchase_key",
        sql: include_str!("../migrations/sqlite/0010_purchase_key.sql"),
    },
    Source {
        version: 11,
        name: "key_versions",
        sql: include_str!("../migrations/sqlite/0011_key_versions.sql"),
    },
    Source {
        version: 12,
        name: "terminal_f41",
        sql: include_str!("../migrations/sqlite/0012_terminal_f41.sql"),
    },
    Source {
        version: 13,
        name: "bank_topups",
        sql: include_str!("../migrations/sqlite/0013_bank_topups.sql"),
    },
    Source {
        version: 14,
        name: "reconciliation",
        sql: include_str!("../migrations/sqlite/0014_reconciliation.sql"),
    },
];

pub(crate) const POSTGRES: &[Source] = &[
    Source {
        version: 1,
        name: "ledger",
        sql: include_str!("../migrations/postgres/0001_ledger.sql"),
    },
    Source {
        version: 2,
        name: "master_keys",
        sql: include_str!("../migrations/postgres/0002_master_keys.sql"),
    },
    Source {
        version: 3,
        name: "cards",
        sql: include_str!("../migrations/postgres/0003_cards.sql"),
    },
    Source {
        version: 4,
        name: "terminals",
        sql: include_str!("../migrations/postgres/0004_terminals.sql"),
    },
    Source {
        version: 5,
        name: "authorisations",
        sql: include_str!("../migrations/postgres/0005_authorisations.sql"),
    },
    Source {
        version: 6,
        name: "record_batches",
        sql: include_str!("../migrations/postgres/0006_record_batches.sql"),
    },
    Source {
        version: 7,
        name: "quarantine_release",
        sql: include_str!("../migrations/postgres/0007_quarantine_release.sql"),
    },
    Source {
        version: 8,
        name: "gateways",
        sql: include_str!("../migrations/postgres/0008_gateways.sql"),
    },
    Source {
        version: 9,
        name: "record_key_index",
        sql: include_str!("../migrations/postgres/0009_record_key_index.sql"),
    },
    Source {
        version: 10,
        name: "purchase_key",
        sql: include_str!("../migrations/postgres/0010_purchase_key.sql"),
    },
    Source {
        version: 11,
        name: "key_versions",
        sql: include_str!("../migrations/postgres/0011_key_versions.sql"),
    },
    Source {
        version: 12,
        name: "terminal_f41",
        sql: include_str!("../migrations/postgres/0012_terminal_f41.sql"),
    },
    Source {
        version: 13,
        name: "bank_topups",
        sql: include_str!("../migrations/postgres/0013_bank_topups.sql"),
    },
    Source {
        version: 14,
        name: "reconciliation",
        sql: include_str!("../migrations/postgres/0014_reconciliation.sql"),
    },
];

/// FNV-1a, 64 bits, as hex: enough to notice an edited migration; not a security measure.
pub(crate) fn checksum(sql: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Checks the applied migrations against the embedded ones and returns those still to apply.
pub(crate) fn pending<'a>(
    sources: &'a [Source],
    applied: &[Migration],
) -> anyhow::Result<Vec<&'a Source>> {
    for m in applied {
        match sources.iter().find(|s| s.version == m.version) {
            None => anyhow::bail!(
                "the database has migration {} ({}) that this onecard does not know: \
                 it was written by a newer version",
                m.version,
                m.name
            ),
            Some(s) if checksum(s.sql) != m.checksum => anyhow::bail!(
                "migration {} ({}) was changed after it was applied (checksum {} in the \
                 database, {} here)",
                m.version,
                m.name,
                m.checksum,
                checksum(s.sql)
            ),
            Some(_) => {}
        }
    }
    Ok(sources
        .iter()
        .filter(|s| !applied.iter().any(|m| m.version == s.version))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edited_or_unknown_migrations_are_refused() {
        let mut applied: Vec<Migration> = SQLITE.iter().map(Source::migration).collect();
        assert!(pending(SQLITE, &applied).unwrap().is_empty());
        assert_eq!(pending(SQLITE, &[]).unwrap().len(), SQLITE.len());
        applied[0].checksum = "0".into();
        assert!(
            pending(SQLITE, &applied)
                .unwrap_err()
                .to_string()
                .contains("changed")
        );
        applied[0] = Migration {
            version: 999,
            name: "future".into(),
            checksum: "x".into(),
        };
        assert!(
            pending(SQLITE, &applied)
                .unwrap_err()
                .to_string()
                .contains("newer")
        );
    }
}
