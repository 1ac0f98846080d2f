//! How a message travels in a NOTIFY payload, which PostgreSQL keeps as text without NUL.
//!
//! A payload that does not start with ESC (`0x1b`) is the message itself, as text: this is
//! what `pg_notify('chan', 'hello')` from SQL sends. Anything else is wrapped:
//!
//! - `ESC 'b' <base64>`: a binary message, delivered byte-exact (a binary WebSocket frame);
//! - `ESC 't' <base64>`: a text message that cannot travel as itself (it starts with ESC
//!   or holds a NUL).
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
    fn a_broken_envelope_is_text() {
        for p in ["\x1bb!!", "\x1bx", "\x1bqYWJj", "\x1b"] {
            assert_eq!(unwrap(p), Message::Text(p.as_bytes().into()));
        }
    }
}
