//! The server side of RFC 6455: the handshake checks (with push-stream's error texts) and
//! unmasked server frames, encoded once per message and shared by every subscriber.
//! tungstenite is the one frame codec, both ways: it parses client frames, and its
//! `FrameHeader` writes the head of ours (the payload is appended straight after it, so
//! a message is copied once into its shared frame).

use base64::Engine;
use tungstenite::protocol::frame::coding::OpCode;
use tungstenite::protocol::frame::FrameHeader;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xa;

/// Close codes used by pgpush.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// What the handshake request carried.
#[derive(Debug, Default, Clone, Copy)]
pub struct HandshakeRequest<'a> {
    pub upgrade: Option<&'a [u8]>,
    pub connection: Option<&'a [u8]>,
    pub key: Option<&'a [u8]>,
    pub version: Option<&'a [u8]>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error(
        "Don't have at least one of the mandatory headers: Connection, Upgrade, \
         Sec-WebSocket-Key and Sec-WebSocket-Version"
    )]
    MissingHeaders,
    #[error("Version not supported. Supported versions: 8, 13")]
    Version,
    #[error("Sec-WebSocket-Key must be 16 bytes in base64.")]
    BadKey,
}

/// The versions accepted, as push-stream lists them in `Sec-WebSocket-Version` when it
/// refuses another one. Version 8 (hybi-08) has RFC 6455's handshake and framing.
pub const SUPPORTED_VERSIONS: &str = "8, 13";

/// Checks a version 8 or 13 handshake and returns the `Sec-WebSocket-Accept` value.
pub fn accept(req: &HandshakeRequest<'_>) -> Result<String, HandshakeError> {
    let (Some(upgrade), Some(connection), Some(key), Some(version)) =
        (req.upgrade, req.connection, req.key, req.version)
    else {
        return Err(HandshakeError::MissingHeaders);
    };
    if !has_token(upgrade, b"websocket") || !has_token(connection, b"upgrade") {
        return Err(HandshakeError::MissingHeaders);
    }
    if !matches!(version.trim_ascii(), b"13" | b"8") {
        return Err(HandshakeError::Version);
    }
    let key = key.trim_ascii();
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(raw) if raw.len() == 16 => {}
        _ => return Err(HandshakeError::BadKey),
    }
    Ok(tungstenite::handshake::derive_accept_key(key))
}

/// A comma-separated header contains `token`, case-insensitively.
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Appends one unmasked, final server frame.
pub fn encode(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(payload.len() + 10);
    let header = FrameHeader { opcode: OpCode::from(opcode), ..FrameHeader::default() };
    // writing into a Vec cannot fail
    let _ = header.format(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// A close frame; the reason is cut to fit the 125-byte control frame limit on a UTF-8
/// boundary.
pub fn encode_close(code: u16, reason: &str, out: &mut Vec<u8>) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(OP_CLOSE, &payload, out);
}

/// The `101` response head, push-stream's: only the headers WebSocket needs, its no-cache
/// headers, and the explanation of a refused channel, which then follows as a 1008 close
/// frame.
pub fn response_head(accept: &str, explain: Option<&str>) -> Vec<u8> {
    let mut h = Vec::with_capacity(256);
    h.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\n");
    h.extend_from_slice(b"Connection: Upgrade\r\n");
    // the no-cache headers before the accept key: push-stream's specs read them with
    // their line end
    h.extend_from_slice(b"Expires: Thu, 01 Jan 1970 00:00:01 GMT\r\n");
    h.extend_from_slice(b"Cache-Control: no-cache, no-store, must-revalidate\r\n");
    h.extend_from_slice(b"Sec-WebSocket-Accept: ");
    h.extend_from_slice(accept.as_bytes());
    h.extend_from_slice(b"\r\n");
    if let Some(e) = explain {
        h.extend_from_slice(b"X-Nginx-PushStream-Explain: ");
        h.extend_from_slice(e.as_bytes());
        h.extend_from_slice(b"\r\n");
    }
    h.extend_from_slice(b"\r\n");
    h
}

/// A close frame without a status code, as push-stream sends at the connection ttl.
pub const EMPTY_CLOSE: [u8; 2] = [0x80 | OP_CLOSE, 0];

/// push-stream's close reason for a refused channel: `{"http_status": N, "explain":"..."}`.
pub fn channel_error_reason(status: u16, explain: &str) -> String {
    let explain = serde_json::Value::from(explain);
    format!("{{\"http_status\": {status}, \"explain\":{explain}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(key: &'a [u8], version: &'a [u8]) -> HandshakeRequest<'a> {
        HandshakeRequest {
            upgrade: Some(b"websocket"),
            connection: Some(b"keep-alive, Upgrade"),
            key: Some(key),
            version: Some(version),
        }
    }

    #[test]
    fn handshake() {
        // RFC 6455 section 1.3
        assert_eq!(
            accept(&req(b"dGhlIHNhbXBsZSBub25jZQ==", b"13")).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert!(accept(&req(b"dGhlIHNhbXBsZSBub25jZQ==", b"8")).is_ok());
        assert_eq!(accept(&req(b"dGhlIHNhbXBsZSBub25jZQ==", b"7")), Err(HandshakeError::Version));
        assert_eq!(accept(&req(b"short", b"13")), Err(HandshakeError::BadKey));
        let mut r = req(b"dGhlIHNhbXBsZSBub25jZQ==", b"13");
        r.upgrade = None;
        assert_eq!(accept(&r), Err(HandshakeError::MissingHeaders));
        r.upgrade = Some(b"h2c");
        assert_eq!(accept(&r), Err(HandshakeError::MissingHeaders));
        let mut r = req(b"dGhlIHNhbXBsZSBub25jZQ==", b"13");
        r.connection = Some(b"keep-alive");
        assert_eq!(accept(&r), Err(HandshakeError::MissingHeaders));
    }

    #[test]
    fn frames() {
        let mut out = Vec::new();
        encode(OP_TEXT, b"hi", &mut out);
        assert_eq!(out, [0x81, 2, b'h', b'i']);
        out.clear();
        encode(OP_BINARY, &[0; 126], &mut out);
        assert_eq!(&out[..4], &[0x82, 126, 0, 126]);
        out.clear();
        encode(OP_TEXT, &vec![b'x'; 70_000], &mut out);
        assert_eq!(&out[..10], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        assert_eq!(out.len(), 70_010);
        out.clear();
        encode_close(close::POLICY, &"é".repeat(100), &mut out);
        assert_eq!(out[0], 0x88);
        assert_eq!(out[1], 124);
        assert_eq!(&out[2..4], &[0x03, 0xf0]);
        assert!(std::str::from_utf8(&out[4..]).is_ok());
    }

    #[test]
    fn head() {
        let h = response_head("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", None);
        assert_eq!(
            h,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\
              Expires: Thu, 01 Jan 1970 00:00:01 GMT\r\n\
              Cache-Control: no-cache, no-store, must-revalidate\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
        let h = String::from_utf8(response_head("k", Some("No channel id provided."))).unwrap();
        assert!(h.ends_with("X-Nginx-PushStream-Explain: No channel id provided.\r\n\r\n"));
    }

    #[test]
    fn channel_error() {
        assert_eq!(
            channel_error_reason(400, "Channel id is too large."),
            "{\"http_status\": 400, \"explain\":\"Channel id is too large.\"}"
        );
    }
}
