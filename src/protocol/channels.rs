//! Channel paths (`/ch1/ch2.b3`) and the PostgreSQL channel names they map to.

use crate::config::values::PG_MAX_IDENTIFIER;

/// One channel of a subscriber's path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelRequest {
    pub id: String,
    /// `.bN`: how many stored messages to send first.
    pub backtrack: u32,
}

/// Why a channel path was refused; `explain()` is push-stream's wording where it has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("No channel id provided.")]
    NoChannel,
    #[error("Channel id is too large.")]
    TooLong,
    #[error("Channel id must be valid UTF-8 without NUL bytes.")]
    Invalid,
    /// `ALL` and ids with `*` are push-stream's statistics wildcards.
    #[error("Channel id not authorized for this method.")]
    Reserved,
    #[error("Subscribers limit per channel has been exceeded.")]
    TooManySubscribers,
    #[error("Subscriber could not create channels.")]
    NotCreated,
    #[error("Number of channels were exceeded.")]
    TooManyChannels,
    #[error("Subscribed too much wildcard channels.")]
    TooManyWildcards,
    #[error("Subscription to events channel is not allowed.")]
    EventsChannel,
}

impl ChannelError {
    /// The HTTP status push-stream answers with.
    pub fn status(&self) -> u16 {
        match self {
            ChannelError::Reserved
            | ChannelError::TooManySubscribers
            | ChannelError::NotCreated
            | ChannelError::TooManyChannels
            | ChannelError::TooManyWildcards
            | ChannelError::EventsChannel => 403,
            _ => 400,
        }
    }
}

/// Limits that apply to every channel id.
#[derive(Clone, Copy, Debug)]
pub struct Limits<'a> {
    /// `push_stream_max_channel_id_length`.
    pub max_id_length: Option<usize>,
    /// `push_stream_postgres_channel_prefix`.
    pub pg_prefix: &'a str,
}

/// Splits a channels path into channels, push-stream style: the value is percent-decoded,
/// then split into `/`-separated ids, each with an optional `.bN` backtrack suffix; empty
/// segments are ignored and repeats merged.
pub fn parse_path(path: &[u8], limits: Limits<'_>) -> Result<Vec<ChannelRequest>, ChannelError> {
    let mut out: Vec<ChannelRequest> = Vec::new();
    let path = unescape(path);
    for seg in path.split(|&b| b == b'/') {
        if seg.is_empty() {
            continue;
        }
        let (id, backtrack) = split_backtrack(seg);
        if id.is_empty() {
            continue;
        }
        let id = check_id(id, limits)?;
        match out.iter_mut().find(|c| c.id == id) {
            Some(c) => c.backtrack = c.backtrack.max(backtrack),
            None => out.push(ChannelRequest { id, backtrack }),
        }
    }
    if out.is_empty() {
        return Err(ChannelError::NoChannel);
    }
    Ok(out)
}

/// Checks one channel id (a publisher's, or one segment of a path).
pub fn check_id(id: &[u8], limits: Limits<'_>) -> Result<String, ChannelError> {
    if id.is_empty() {
        return Err(ChannelError::NoChannel);
    }
    if id == b"ALL" || id.contains(&b'*') {
        return Err(ChannelError::Reserved);
    }
    if limits.max_id_length.is_some_and(|max| id.len() > max) {
        return Err(ChannelError::TooLong);
    }
    if id.contains(&0) {
        return Err(ChannelError::Invalid);
    }
    let id = std::str::from_utf8(id).map_err(|_| ChannelError::Invalid)?;
    Ok(id.to_string())
}

/// A path segment without its `.bN` backtrack suffix, and N.
pub fn split_backtrack(seg: &[u8]) -> (&[u8], u32) {
    if let Some(pos) = seg.windows(2).rposition(|w| w == b".b") {
        let digits = &seg[pos + 2..];
        if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) {
            let n = std::str::from_utf8(digits).ok().and_then(|s| s.parse().ok());
            return (&seg[..pos], n.unwrap_or(u32::MAX));
        }
    }
    (seg, 0)
}

/// The PostgreSQL channel for a channel id; the same string serves LISTEN, UNLISTEN and
/// `pg_notify`, so case and bytes are kept exactly.
pub fn pg_channel(prefix: &str, id: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + id.len());
    s.push_str(prefix);
    s.push_str(id);
    s
}

/// How a derived LISTEN name starts.
pub const DERIVED_PREFIX: &str = "pgpush_";

/// The name LISTEN, UNLISTEN and `pg_notify` use for a channel (prefix + id): the channel
/// itself when it fits in a PostgreSQL identifier (63 bytes), else `pgpush_` and the MD5 of
/// it in hex, which SQL computes as
/// `CASE WHEN octet_length(c) <= 63 THEN c ELSE 'pgpush_' || md5(c) END`.
/// Two channels may share a derived name: the notification then carries the full id.
pub fn listen_name(channel: &str) -> std::borrow::Cow<'_, str> {
    use md5::Digest;
    if channel.len() <= PG_MAX_IDENTIFIER {
        return channel.into();
    }
    let digest = md5::Md5::digest(channel.as_bytes());
    let mut name = String::with_capacity(DERIVED_PREFIX.len() + 32);
    name.push_str(DERIVED_PREFIX);
    for b in digest.iter() {
        name.push_str(&format!("{b:02x}"));
    }
    name.into()
}

/// Whether a channel's notifications must carry its id (see [`listen_name`]).
pub fn is_derived(channel: &str) -> bool {
    channel.len() > PG_MAX_IDENTIFIER
}

/// Quotes a name as an SQL identifier: LISTEN takes no bind parameters, and an unquoted
/// name would be case-folded.
pub fn quote_ident(name: &str) -> String {
    let mut s = String::with_capacity(name.len() + 2);
    s.push('"');
    for c in name.chars() {
        if c == '"' {
            s.push('"');
        }
        s.push(c);
    }
    s.push('"');
    s
}

/// Decodes `%XX` escapes, so `?id=a%22b` names the channel `a"b`. Anything that is not
/// a complete escape is kept as it is; `+` is kept too (it is a literal in a path).
pub fn unescape(v: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'%' && i + 2 < v.len() {
            if let (Some(h), Some(l)) = (hex(v[i + 1]), hex(v[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(v[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits<'static> = Limits { max_id_length: None, pg_prefix: "" };

    fn ids(v: &[ChannelRequest]) -> Vec<(&str, u32)> {
        v.iter().map(|c| (c.id.as_str(), c.backtrack)).collect()
    }

    #[test]
    fn paths() {
        assert_eq!(ids(&parse_path(b"ch1", L).unwrap()), [("ch1", 0)]);
        assert_eq!(ids(&parse_path(b"/ch1/ch2.b3/", L).unwrap()), [("ch1", 0), ("ch2", 3)]);
        assert_eq!(ids(&parse_path(b"a//a.b2", L).unwrap()), [("a", 2)]);
        assert_eq!(ids(&parse_path(b"v1.bx", L).unwrap()), [("v1.bx", 0)]);
        assert_eq!(ids(&parse_path(b"x.b", L).unwrap()), [("x.b", 0)]);
        assert_eq!(parse_path(b"", L), Err(ChannelError::NoChannel));
        assert_eq!(parse_path(b"//", L), Err(ChannelError::NoChannel));
        assert_eq!(parse_path(b".b5", L), Err(ChannelError::NoChannel));
        assert_eq!(
            ids(&parse_path(b"a%2Fb/c%22d.b1", L).unwrap()),
            [("a", 0), ("b", 0), ("c\"d", 1)]
        );
    }

    /// Channel paths come from the network: random bytes never panic, and whatever is
    /// accepted is a valid PostgreSQL channel (UTF-8, no NUL, prefix + id within 63 bytes).
    #[test]
    fn random_paths() {
        let limits = Limits { max_id_length: None, pg_prefix: "app_" };
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let alphabet = b"ab/%.b0123456789fF\"';\0\xc3\xa9\xff ";
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 90) as usize;
            let path: Vec<u8> = (0..len)
                .map(|i| alphabet[((seed >> (i % 56)) as usize + i * 7) % alphabet.len()])
                .collect();
            if let Ok(list) = parse_path(&path, limits) {
                assert!(!list.is_empty());
                for c in list {
                    assert!(!c.id.is_empty() && !c.id.contains('\0'), "{path:?}");
                    let pg = pg_channel(limits.pg_prefix, &c.id);
                    assert!(listen_name(&pg).len() <= PG_MAX_IDENTIFIER);
                    let q = quote_ident(&c.id);
                    assert!(q.starts_with('"') && q.ends_with('"'));
                    assert_eq!(q[1..q.len() - 1].replace("\"\"", "\""), c.id);
                }
            }
        }
    }

    #[test]
    fn unescapes() {
        assert_eq!(unescape(b"a%20b%c3%bc"), "a bü".as_bytes());
        assert_eq!(unescape(b"100%"), b"100%");
        assert_eq!(unescape(b"%4"), b"%4");
        assert_eq!(unescape(b"%zz+"), b"%zz+");
        assert_eq!(unescape(b"%00"), b"\0");
    }

    #[test]
    fn limits() {
        let l = Limits { max_id_length: Some(3), pg_prefix: "" };
        assert!(parse_path(b"abc", l).is_ok());
        assert_eq!(parse_path(b"abcd", l), Err(ChannelError::TooLong));
        // any length: a long channel is LISTENed under a derived name
        assert!(parse_path("x".repeat(500).as_bytes(), L).is_ok());
        assert!(parse_path("é".repeat(32).as_bytes(), L).is_ok());
        assert_eq!(parse_path(b"a\0b", L), Err(ChannelError::Invalid));
        assert_eq!(parse_path(b"\xff", L), Err(ChannelError::Invalid));
    }

    #[test]
    fn derived_names() {
        let short = "x".repeat(63);
        assert_eq!(listen_name(&short), short);
        assert!(!is_derived(&short));
        let long = "x".repeat(64);
        assert!(is_derived(&long));
        // SELECT 'pgpush_' || md5(repeat('x', 64)) in PostgreSQL
        assert_eq!(listen_name(&long), "pgpush_c1bb4f81d892b2d57947682aeb252456");
        assert_eq!(listen_name(&long).len(), 39);
        // bytes, not characters: 32 two-byte characters are 64 bytes
        assert!(is_derived(&"é".repeat(32)));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("news"), "\"news\"");
        assert_eq!(quote_ident("News"), "\"News\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_ident("x\"; DROP TABLE t; --"), "\"x\"\"; DROP TABLE t; --\"");
        assert_eq!(quote_ident("l'été"), "\"l'été\"");
        assert_eq!(pg_channel("app_", "News"), "app_News");
    }
}

#[test]
fn statistics_wildcards_are_reserved() {
    let l = Limits { max_id_length: Some(3), pg_prefix: "" };
    for id in ["ALL", "a*", "*", "ne*ws"] {
        assert_eq!(check_id(id.as_bytes(), l), Err(ChannelError::Reserved), "{id}");
    }
    assert_eq!(ChannelError::Reserved.status(), 403);
    assert_eq!(parse_path(b"ok/ALL", l), Err(ChannelError::Reserved));
    // checked before the length, as push-stream does
    assert_eq!(check_id(b"long*", l), Err(ChannelError::Reserved));
    assert!(check_id(b"all", l).is_ok());
}
