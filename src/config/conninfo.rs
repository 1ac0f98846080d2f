//! `push_stream_postgres` connection strings: libpq key/value (`host=... dbname=...`) and
//! `postgres://` URLs, parsed by tokio-postgres and checked for what the side connection needs.
//!
//! Everything that reaches a log goes through [`mask_password`] first.

use core::fmt;
use core::str::FromStr;
use core::time::Duration;

use tokio_postgres::config::{Host, SslMode};

/// Where libpq (and Debian's PostgreSQL) put the server socket when no host is given.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";

/// Why a connection string was refused. Messages never contain the password.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnInfoError {
    #[error("empty connection string")]
    Empty,
    #[error("{0}")]
    Syntax(String),
    #[error("no \"user\" given (add user=... or postgres://user@host/db)")]
    MissingUser,
    #[error("\"sslmode=require\" is not supported yet: use a local or tunnelled connection")]
    TlsUnsupported,
}

/// A validated connection string.
#[derive(Clone)]
pub struct ConnInfo {
    config: tokio_postgres::Config,
    masked: String,
}

impl ConnInfo {
    /// The tokio-postgres configuration, with libpq's defaults applied.
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The original string with any password replaced by `********`, fit for logs.
    pub fn masked(&self) -> &str {
        &self.masked
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ConnInfo").field(&self.masked).finish()
    }
}

impl FromStr for ConnInfo {
    type Err = ConnInfoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

/// Parses and checks a libpq key/value string or a `postgres://`/`postgresql://` URL.
pub fn parse(s: &str) -> Result<ConnInfo, ConnInfoError> {
    if s.trim().is_empty() {
        return Err(ConnInfoError::Empty);
    }

    let mut config = tokio_postgres::Config::from_str(s).map_err(|e| {
        // The cause says which option is wrong; tokio-postgres names options, never their
        // values, but strip any echo of the string all the same.
        let msg = match std::error::Error::source(&e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        };
        ConnInfoError::Syntax(mask_password(&msg))
    })?;

    if config.get_user().is_none() {
        return Err(ConnInfoError::MissingUser);
    }
    if matches!(config.get_ssl_mode(), SslMode::Require) {
        return Err(ConnInfoError::TlsUnsupported);
    }

    if config.get_hosts().is_empty() {
        config.host(DEFAULT_SOCKET_DIR);
    }
    // A side connection that never gives up on a dead peer stalls every subscriber of the
    // worker: bound the connect and let TCP keepalives find half-open links.
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config.keepalives(true);
    if config.get_keepalives_idle() > Duration::from_secs(60) {
        config.keepalives_idle(Duration::from_secs(30));
    }
    if config.get_application_name().is_none() {
        config.application_name("pgpush");
    }

    Ok(ConnInfo { config, masked: mask_password(s) })
}

/// Describes the target for log lines: `user@host:port/dbname`, never the password.
pub fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => String::from("?"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("?");
    let db = config.get_dbname().unwrap_or(user);
    format!("{user}@{host}:{port}/{db}")
}

const MASK: &str = "********";

/// Replaces the password of a key/value or URL connection string with `********`.
///
/// It works on malformed input too, since that is exactly what ends up in error messages.
pub fn mask_password(s: &str) -> String {
    let t = s.trim_start();
    if t.starts_with("postgres://") || t.starts_with("postgresql://") {
        mask_url(s)
    } else {
        mask_keyvalue(s)
    }
}

fn mask_url(s: &str) -> String {
    let scheme_end = s.find("://").map(|i| i + 3).unwrap_or(0);
    let rest = &s[scheme_end..];
    let auth_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..auth_len];

    let mut out = String::with_capacity(s.len());
    out.push_str(&s[..scheme_end]);
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => {
                    out.push_str(&userinfo[..=colon]);
                    out.push_str(MASK);
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }

    // ?password=... in the query string
    let tail = &rest[auth_len..];
    match tail.find('?') {
        Some(q) => {
            out.push_str(&tail[..=q]);
            let params: Vec<String> = tail[q + 1..]
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}={MASK}"),
                    _ => kv.to_string(),
                })
                .collect();
            out.push_str(&params.join("&"));
        }
        None => out.push_str(tail),
    }
    out
}

fn mask_keyvalue(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        // key
        let key_start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'=' {
            i += 1;
        }
        let key = &s[key_start..i];
        out.push_str(key);
        // spaces and '='
        let sep_start = i;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() || b[i] != b'=' {
            out.push_str(&s[sep_start..i]);
            continue;
        }
        i += 1;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        out.push_str(&s[sep_start..i]);
        // value: quoted with backslash escapes, or up to whitespace
        let val_start = i;
        if i < b.len() && b[i] == b'\'' {
            i += 1;
            while i < b.len() && b[i] != b'\'' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(b.len());
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                i += 1;
            }
        }
        if key.eq_ignore_ascii_case("password") {
            out.push_str(MASK);
        } else {
            out.push_str(&s[val_start..i]);
        }
        let ws_start = i;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        out.push_str(&s[ws_start..i]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyvalue_form() {
        let ci = parse("host=127.0.0.1 port=5433 user=app dbname=push password=s3cret").unwrap();
        assert_eq!(ci.config().get_user(), Some("app"));
        assert_eq!(ci.config().get_dbname(), Some("push"));
        assert_eq!(ci.config().get_ports(), &[5433]);
        assert_eq!(ci.masked(), "host=127.0.0.1 port=5433 user=app dbname=push password=********");
        assert_eq!(describe(ci.config()), "app@127.0.0.1:5433/push");
        assert!(!format!("{ci:?}").contains("s3cret"));
    }

    #[test]
    fn url_form() {
        let ci = parse("postgres://app:s3cret@db.local:6543/push?application_name=x").unwrap();
        assert_eq!(ci.config().get_user(), Some("app"));
        assert_eq!(ci.config().get_ports(), &[6543]);
        assert_eq!(ci.config().get_application_name(), Some("x"));
        assert_eq!(ci.masked(), "postgres://app:********@db.local:6543/push?application_name=x");
        let ci = parse("postgresql://app@localhost/push").unwrap();
        assert_eq!(ci.masked(), "postgresql://app@localhost/push");
    }

    #[test]
    fn defaults_applied() {
        let ci = parse("user=app").unwrap();
        assert_eq!(describe(ci.config()), "app@/var/run/postgresql:5432/app");
        assert!(ci.config().get_keepalives());
        assert_eq!(ci.config().get_connect_timeout(), Some(&Duration::from_secs(10)));
        assert_eq!(ci.config().get_application_name(), Some("pgpush"));
    }

    #[test]
    fn rejects() {
        assert_eq!(parse("").unwrap_err(), ConnInfoError::Empty);
        assert_eq!(parse("   ").unwrap_err(), ConnInfoError::Empty);
        assert_eq!(parse("host=x dbname=y").unwrap_err(), ConnInfoError::MissingUser);
        assert_eq!(parse("user=a sslmode=require").unwrap_err(), ConnInfoError::TlsUnsupported);
        assert!(matches!(parse("user=a port=notaport"), Err(ConnInfoError::Syntax(_))));
        assert_eq!(
            parse("user=a bogus=1").unwrap_err().to_string(),
            "invalid connection string: unknown option `bogus`"
        );
        assert!(matches!(parse("user=a host='unterminated"), Err(ConnInfoError::Syntax(_))));
        assert!(matches!(parse("postgres://a:b@h:xx/db"), Err(ConnInfoError::Syntax(_))));
    }

    #[test]
    fn syntax_errors_do_not_leak_password() {
        let e = parse("user=a password=topsecret port=bad").unwrap_err().to_string();
        assert!(!e.contains("topsecret"), "{e}");
    }

    #[test]
    fn masks_malformed_strings() {
        assert_eq!(mask_password("password = 'a b\\' c' user=x"), "password = ******** user=x");
        assert_eq!(mask_password("PASSWORD=x"), "PASSWORD=********");
        assert_eq!(mask_password("user=x password="), "user=x password=********");
        assert_eq!(mask_password("password"), "password");
        assert_eq!(mask_password("postgres://u:p@h:bad/db"), "postgres://u:********@h:bad/db");
        assert_eq!(mask_password("postgres://u:p:q@@h/db"), "postgres://u:********@h/db");
        assert_eq!(
            mask_password("postgres://u@h/db?password=x&sslmode=disable"),
            "postgres://u@h/db?password=********&sslmode=disable"
        );
        assert_eq!(mask_password("postgres://"), "postgres://");
    }
}
