//! Database URLs: which backend, and where.

use std::fmt;
use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};

/// Where the data lives. Parsed from `sqlite:PATH`, `sqlite://PATH` or `postgres://...`
/// (`postgresql://...`). The PostgreSQL URL may carry a password, so it is kept secret and
/// printed without it.
#[derive(Clone)]
pub enum DatabaseUrl {
    Sqlite(PathBuf),
    Postgres(SecretString),
}

/// Why a text is not a database URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid database URL {shown}: {reason}")]
pub struct UrlError {
    /// The URL with any password replaced.
    pub shown: String,
    pub reason: String,
}

impl DatabaseUrl {
    pub fn parse(text: &str) -> Result<DatabaseUrl, UrlError> {
        let err = |reason: &str| UrlError {
            shown: redact(text),
            reason: reason.to_owned(),
        };
        let t = text.trim();
        if let Some(rest) = t.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(err(
                    "no file path after sqlite: (try sqlite:onecard-data/onecard.db)",
                ));
            }
            if path == ":memory:" {
                return Err(err(
                    "an in-memory SQLite database loses every fen at exit; name a file",
                ));
            }
            return Ok(DatabaseUrl::Sqlite(PathBuf::from(path)));
        }
        if t.starts_with("postgres://") || t.starts_with("postgresql://") {
            t.parse::<tokio_postgres::Config>()
                .map_err(|e| err(&e.to_string()))?;
            return Ok(DatabaseUrl::Postgres(SecretString::from(t.to_owned())));
        }
        Err(err(
            "expected sqlite:PATH or postgres://USER@HOST:PORT/DATABASE",
        ))
    }

    /// The same server with another database name (PostgreSQL only).
    pub fn with_database(&self, name: &str) -> Option<DatabaseUrl> {
        let DatabaseUrl::Postgres(url) = self else {
            return None;
        };
        let url = url.expose_secret();
        let (head, query) = match url.split_once('?') {
            Some((h, q)) => (h, format!("?{q}")),
            None => (url, String::new()),
        };
        let scheme_end = head.find("://").map_or(0, |i| i + 3);
        let head = match head[scheme_end..].find('/') {
            Some(i) => &head[..scheme_end + i],
            None => head,
        };
        Some(DatabaseUrl::Postgres(SecretString::from(format!(
            "{head}/{name}{query}"
        ))))
    }

    pub(crate) fn postgres_config(&self) -> Option<tokio_postgres::Config> {
        match self {
            DatabaseUrl::Postgres(url) => url.expose_secret().parse().ok(),
            DatabaseUrl::Sqlite(_) => None,
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseUrl::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            DatabaseUrl::Postgres(url) => f.write_str(&redact(url.expose_secret())),
        }
    }
}

/// Replaces the password, in `scheme://user:password@host` and in a `password=` parameter,
/// with `***`.
fn redact(url: &str) -> String {
    let (main, query) = match url.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (url, None),
    };
    let main = match main.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => main.to_owned(),
            },
            None => main.to_owned(),
        },
        None => main.to_owned(),
    };
    match query {
        None => main,
        Some(q) => {
            let params: Vec<String> = q
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => p.to_owned(),
                })
                .collect();
            format!("{main}?{}", params.join("&"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn parses_both_backends() {
        assert!(
            matches!(DatabaseUrl::parse("sqlite:data/x.db"), Ok(DatabaseUrl::Sqlite(p)) if p == Path::new("data/x.db"))
        );
        assert!(
            matches!(DatabaseUrl::parse("sqlite:///tmp/x.db"), Ok(DatabaseUrl::Sqlite(p)) if p == Path::new("/tmp/x.db"))
        );
        assert!(matches!(
            DatabaseUrl::parse("postgres://postgres@127.0.0.1:5432/postgres"),
            Ok(DatabaseUrl::Postgres(_))
        ));
    }

    #[test]
    fn another_database_on_the_same_server() {
        let url = DatabaseUrl::parse("postgres://u:pw@h:5432/postgres?sslmode=disable").unwrap();
        let other = url.with_database("scratch").unwrap();
        assert_eq!(
            other.to_string(),
            "postgres://u:***@h:5432/scratch?sslmode=disable"
        );
        let bare = DatabaseUrl::parse("postgres://h")
            .unwrap()
            .with_database("x")
            .unwrap();
        assert_eq!(bare.to_string(), "postgres://h/x");
    }

    #[test]
    fn malformed_urls_say_why_and_hide_passwords() {
        for bad in [
            "",
            "mysql://x",
            "sqlite:",
            "sqlite::memory:",
            "postgres://u:pw@h:notaport/db",
        ] {
            let e = DatabaseUrl::parse(bad).unwrap_err();
            assert!(!e.to_string().contains("pw@"), "{e}");
            assert!(!e.reason.is_empty());
        }
        let url = DatabaseUrl::parse("postgres://u:secret@h/db").unwrap();
        assert_eq!(url.to_string(), "postgres://u:***@h/db");
        assert!(!format!("{url:?}").contains("secret"));
        let url = DatabaseUrl::parse("postgres://u@h/db?sslmode=disable&password=secret").unwrap();
        assert_eq!(
            url.to_string(),
            "postgres://u@h/db?sslmode=disable&password=***"
        );
        let bad = DatabaseUrl::parse("postgres://u@h:x/db?password=secret").unwrap_err();
        assert!(!bad.to_string().contains("secret"), "{bad}");
    }
}
