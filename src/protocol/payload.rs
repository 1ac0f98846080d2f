//! How a message travels in a NOTIFY payload, which PostgreSQL keeps as text without NUL.
//!
//! A payload that does not start with ESC (`0x1b`) is the message itself, as text: this is
//! what `pg_notify('chan', 'hello')` from SQL sends. Anything else is wrapped:
//!
//! - `ESC 'b' <base64>`: a binary message, delivered byte-exact (a binary WebSocket frame);
//! - `ESC 't' <base64>`: a text message that cannot travel as itself (it starts with ESC
//!   or holds a NUL);
//! - `ESC 'm' <JSON>`: a message with an event id or type (the publisher's `Event-Id` and
//!   `Event-Type` headers): `{"i": id, "y": type, "t": text}`, or `"b": base64` instead of
//!   `"t"` for a binary message; `i` and `y` are left out when absent.
//!
//! base64 is the standard alphabet with padding; line breaks in it are ignored (SQL's
//! `encode(data, 'base64')` makes them). A payload that starts with ESC but is
//! not a valid envelope is delivered as the text it is.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

const ESC: u8 = 0x1b;

/// PostgreSQL refuses a NOTIFY payload of 8000 bytes or more.
pub const MAX_PAYLOAD: usize = 7999;

/// A message as subscribers get it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Text(std::borrow::Cow<'a, [u8]>),
    Binary(Vec<u8>),
}

impl Message<'_> {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Message::Text(t) => t,
            Message::Binary(b) => b,
        }
    }

    pub fn is_binary(&self) -> bool {
        matches!(self, Message::Binary(_))
    }
}

/// A message's EventSource id and type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    /// Where a stored message stands in its channel (the store's notifications).
    pub stored: Option<Position>,
    /// The message was too large for its notification: it is read from the store.
    pub fetch: bool,
}

/// A stored message's offset in its channel, with its time (Unix seconds) and tag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub epoch: i64,
    pub offset: i64,
    pub second: i64,
    pub tag: i64,
}

impl Meta {
    fn is_empty(&self) -> bool {
        self.event_id.is_none() && self.event_type.is_none()
    }
}

/// The NOTIFY payload of a text message with its event id and type.
pub fn wrap_text_with(text: &str, meta: &Meta) -> String {
    if meta.is_empty() {
        return wrap_text(text);
    }
    meta_envelope(meta, "t", text.into())
}

/// `ESC 'm'` and the JSON object: the metadata, and the message under `key`.
fn meta_envelope(meta: &Meta, key: &str, message: serde_json::Value) -> String {
    let mut o = serde_json::Map::new();
    if let Some(i) = &meta.event_id {
        o.insert("i".into(), i.as_str().into());
    }
    if let Some(y) = &meta.event_type {
        o.insert("y".into(), y.as_str().into());
    }
    o.insert(key.into(), message);
    let mut s = String::from("\u{1b}m");
    s.push_str(&serde_json::Value::Object(o).to_string());
    s
}

/// The NOTIFY payload of a binary message with its event id and type.
pub fn wrap_binary_with(data: &[u8], meta: &Meta) -> String {
    if meta.is_empty() {
        return wrap_binary(data);
    }
    meta_envelope(meta, "b", STANDARD.encode(data).into())
}

/// The message a NOTIFY payload carries, with its event id and type.
pub fn unwrap_with_meta(payload: &str) -> (Message<'_>, Meta) {
    if let Some(json) = payload.strip_prefix("\u{1b}m") {
        if let Ok(serde_json::Value::Object(o)) = serde_json::from_str(json) {
            let field = |k: &str| o.get(k).and_then(|v| v.as_str()).map(str::to_string);
            let number = |k: &str| o.get(k).and_then(serde_json::Value::as_i64);
            let stored = number("o").map(|offset| Position {
                epoch: number("e").unwrap_or(0),
                offset,
                second: number("s").unwrap_or(0),
                tag: number("g").unwrap_or(0),
            });
            let fetch = o.get("f").and_then(serde_json::Value::as_bool).unwrap_or(false);
            let meta = Meta { event_id: field("i"), event_type: field("y"), stored, fetch };
            if fetch && stored.is_some() {
                return (Message::Text(Vec::new().into()), meta);
            }
            if let Some(t) = field("t") {
                return (Message::Text(t.into_bytes().into()), meta);
            }
            if let Some(b) = field("b").and_then(|b| STANDARD.decode(b).ok()) {
                return (Message::Binary(b), meta);
            }
        }
    }
    (unwrap(payload), Meta::default())
}

/// The NOTIFY payload of a text message.
pub fn wrap_text(text: &str) -> String {
    if text.as_bytes().first() == Some(&ESC) || text.contains('\0') {
        envelope(b't', text.as_bytes())
    } else {
        text.to_string()
    }
}

/// The NOTIFY payload of a binary message.
pub fn wrap_binary(data: &[u8]) -> String {
    envelope(b'b', data)
}

/// The length of [`wrap_binary`]'s result, without building it.
pub fn wrapped_binary_len(len: usize) -> usize {
    2 + len.div_ceil(3) * 4
}

fn envelope(kind: u8, data: &[u8]) -> String {
    let mut s = String::with_capacity(wrapped_binary_len(data.len()));
    s.push(ESC as char);
    s.push(kind as char);
    STANDARD.encode_string(data, &mut s);
    s
}

/// The NOTIFY payload that tells every worker an admin deleted the channel; `text` is
/// what its subscribers get (push-stream's message id -2).
pub fn wrap_deleted(text: &[u8]) -> String {
    envelope(b'd', text)
}

/// The deleted message's text, if the payload is [`wrap_deleted`]'s.
pub fn deleted_text(payload: &str) -> Option<Vec<u8>> {
    if let Some(data) = payload.strip_prefix("\u{1b}d") {
        return STANDARD.decode(data).ok();
    }
    let json = payload.strip_prefix("\u{1b}m")?;
    match serde_json::from_str(json).ok()? {
        serde_json::Value::Object(o) => STANDARD.decode(o.get("d")?.as_str()?).ok(),
        _ => None,
    }
}

/// The payload for a channel whose LISTEN name is derived (see
/// [`crate::protocol::channels::listen_name`]): the same message in an `ESC 'm'` envelope
/// that also carries the channel id under `"c"`.
pub fn with_channel(payload: &str, id: &str) -> String {
    let mut o = match payload.strip_prefix("\u{1b}m").map(serde_json::from_str) {
        Some(Ok(serde_json::Value::Object(o))) => o,
        _ => {
            let mut o = serde_json::Map::new();
            if let Some(text) = deleted_text(payload) {
                o.insert("d".into(), STANDARD.encode(text).into());
            } else {
                match unwrap(payload) {
                    Message::Binary(b) => o.insert("b".into(), STANDARD.encode(b).into()),
                    Message::Text(t) => {
                        o.insert("t".into(), String::from_utf8_lossy(&t).into_owned().into())
                    }
                };
            }
            o
        }
    };
    o.insert("c".into(), id.into());
    let mut s = String::from("\u{1b}m");
    s.push_str(&serde_json::Value::Object(o).to_string());
    s
}

/// What is notified for a message to `channel` (prefix + `id`): the payload itself, or,
/// when the channel's LISTEN name is derived, the payload with the channel id.
pub fn for_channel(channel: &str, id: &str, payload: &str) -> String {
    if crate::protocol::channels::is_derived(channel) {
        with_channel(payload, id)
    } else {
        payload.to_string()
    }
}

/// The whole PostgreSQL channel name a store notification under a derived LISTEN name
/// carries (`"n"`), if any.
pub fn channel_name_of(payload: &str) -> Option<String> {
    let json = payload.strip_prefix("\u{1b}m")?;
    match serde_json::from_str(json).ok()? {
        serde_json::Value::Object(o) => o.get("n")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The channel id an `ESC 'm'` envelope carries, if any.
pub fn channel_of(payload: &str) -> Option<String> {
    let json = payload.strip_prefix("\u{1b}m")?;
    match serde_json::from_str(json).ok()? {
        serde_json::Value::Object(o) => o.get("c")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The message a NOTIFY payload carries.
pub fn unwrap(payload: &str) -> Message<'_> {
    let raw = payload.as_bytes();
    if raw.len() >= 2 && raw[0] == ESC {
        // PostgreSQL's encode(…, 'base64') breaks lines every 76 characters
        let decoded = STANDARD.decode(&raw[2..]).or_else(|e| {
            let packed: Vec<u8> =
                raw[2..].iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
            if packed.len() + 2 == raw.len() {
                Err(e)
            } else {
                STANDARD.decode(packed)
            }
        });
        if let Ok(data) = decoded {
            match raw[1] {
                b'b' => return Message::Binary(data),
                b't' => return Message::Text(data.into()),
                _ => {}
            }
        }
    }
    Message::Text(raw.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_channel_travels_with_any_message() {
        let meta = Meta { event_id: Some("7".into()), ..Meta::default() };
        for p in [
            "plain".to_string(),
            wrap_text("\u{1b}odd\0"),
            wrap_binary(b"\xff\x00"),
            wrap_text_with("with meta", &meta),
            wrap_deleted(b"gone"),
        ] {
            let long = with_channel(&p, "a-long-id");
            assert_eq!(channel_of(&long).as_deref(), Some("a-long-id"));
            assert_eq!(deleted_text(&long), deleted_text(&p));
            if deleted_text(&p).is_none() {
                assert_eq!(unwrap_with_meta(&long), unwrap_with_meta(&p), "{p:?}");
            }
        }
        assert_eq!(channel_of("plain"), None);
    }

    #[test]
    fn deleted_round_trips() {
        let p = wrap_deleted(b"Channel deleted");
        assert_eq!(deleted_text(&p).as_deref(), Some(&b"Channel deleted"[..]));
        assert_eq!(deleted_text("Channel deleted"), None);
        assert_eq!(deleted_text(&wrap_binary(b"x")), None);
    }

    #[test]
    fn plain_text_travels_as_itself() {
        assert_eq!(wrap_text("hello"), "hello");
        assert_eq!(unwrap("hello"), Message::Text(b"hello"[..].into()));
        assert_eq!(unwrap(""), Message::Text(b""[..].into()));
    }

    #[test]
    fn binary_round_trips_byte_exact() {
        for data in [&b""[..], b"\0", b"\x00\xff\x1b\x80", &[7u8; 1000][..]] {
            let p = wrap_binary(data);
            assert_eq!(p.len(), wrapped_binary_len(data.len()));
            assert!(!p.contains('\0'));
            assert_eq!(unwrap(&p), Message::Binary(data.to_vec()));
            assert!(unwrap(&p).is_binary());
        }
    }

    #[test]
    fn text_that_cannot_travel_is_wrapped() {
        for text in ["\x1bb", "\x1b", "a\0b", "\x1bthello"] {
            let p = wrap_text(text);
            assert_ne!(p, text);
            assert!(!p.contains('\0'));
            assert_eq!(unwrap(&p), Message::Text(text.as_bytes().into()), "{text:?}");
        }
    }

    #[test]
    fn base64_from_sql_may_break_lines() {
        let data = vec![0xa5u8; 100];
        let mut p = wrap_binary(&data);
        p.insert(78, '\n');
        assert_eq!(unwrap(&p), Message::Binary(data));
    }

    /// Random messages round-trip, and no payload ever holds a NUL (a stand-in for a
    /// fuzz target: the input space is small and every case is checked).
    #[test]
    fn random_messages_round_trip() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..5_000 {
            let len = (next() % 64) as usize;
            let data: Vec<u8> = (0..len).map(|_| (next() % 256) as u8).collect();
            let p = wrap_binary(&data);
            assert!(!p.contains('\0'));
            assert_eq!(unwrap(&p), Message::Binary(data.clone()));
            // any text, including ESC and NUL at any place
            let text: String = data.iter().map(|&b| char::from(b % 128)).collect();
            let p = wrap_text(&text);
            assert!(!p.contains('\0'));
            assert_eq!(unwrap(&p).bytes(), text.as_bytes(), "{text:?}");
            // and whatever PostgreSQL hands over decodes to something, never panics
            let _ = unwrap(&String::from_utf8_lossy(&data));
        }
    }

    #[test]
    fn event_id_and_type_travel_with_the_message() {
        let meta = Meta {
            event_id: Some("e-1".into()),
            event_type: Some("news".into()),
            ..Meta::default()
        };
        let p = wrap_text_with("héllo \"x\"\n\0", &meta);
        assert!(!p.contains('\0'));
        let (m, got) = unwrap_with_meta(&p);
        assert_eq!(m.bytes(), "héllo \"x\"\n\0".as_bytes());
        assert_eq!(got, meta);
        let only_type = Meta { event_type: Some("t".into()), ..Meta::default() };
        assert_eq!(unwrap_with_meta(&wrap_text_with("x", &only_type)).1, only_type);
        // without metadata nothing changes
        assert_eq!(wrap_text_with("plain", &Meta::default()), "plain");
        assert_eq!(
            unwrap_with_meta("plain"),
            (Message::Text(b"plain"[..].into()), Meta::default())
        );
        // a broken envelope is text
        assert_eq!(unwrap_with_meta("\u{1b}m{").0.bytes(), "\u{1b}m{".as_bytes());
        let p = wrap_binary_with(b"\xff\0", &meta);
        let (m, got) = unwrap_with_meta(&p);
        assert_eq!((m, got), (Message::Binary(vec![0xff, 0]), meta));
    }

    #[test]
    fn a_broken_envelope_is_text() {
        for p in ["\x1bb!!", "\x1bx", "\x1bqYWJj", "\x1b"] {
            assert_eq!(unwrap(p), Message::Text(p.as_bytes().into()));
        }
    }
}
