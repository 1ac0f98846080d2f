//! push-stream's `streaming` and `eventsource` subscribers on the wire, after the response
//! head (nginx's): one HTTP/1.1 chunk per message, header, footer or ping, and the last chunk.
//!
//! EventSource follows push-stream 0.6.0: header and footer template lines become `: `
//! comments (the header defaults to `: \n`), the message template is applied to every
//! line of a message as `data: ` lines, preceded by `id:` and `event:` lines when the
//! message has an event id or type, and followed by an empty line; the ping is the comment
//! `: -1\n`.

use crate::protocol::template::{Template, Values};

/// `data` as one chunk (or as itself, without chunked encoding).
pub fn chunk(data: &[u8], chunked: bool, out: &mut Vec<u8>) {
    if !chunked {
        out.extend_from_slice(data);
        return;
    }
    if data.is_empty() {
        // an empty chunk would end the response
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The chunk that ends a chunked response.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// The EventSource ping.
pub const EVENTSOURCE_PING: &[u8] = b": -1\n";

/// Lines of a text, split on CRLF, CR or LF, empty ones dropped.
fn lines(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    text.split(|&b| b == b'\n' || b == b'\r').filter(|l| !l.is_empty())
}

/// A header or footer template as EventSource comments: each line `: line\n`, unless the
/// template already starts with `": "`.
pub fn eventsource_comments(text: &[u8]) -> Vec<u8> {
    if text.starts_with(b": ") {
        return text.to_vec();
    }
    let mut out = Vec::new();
    for l in lines(text) {
        out.extend_from_slice(b": ");
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    out
}

/// The default EventSource header when none is configured.
pub const EVENTSOURCE_HEADER: &[u8] = b": \n";

/// One message as an EventSource event.
pub fn eventsource_message(template: Option<&Template>, v: &Values<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    if !v.event_id.is_empty() {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(v.event_id.as_bytes());
        out.push(b'\n');
    }
    if !v.event_type.is_empty() {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(v.event_type.as_bytes());
        out.push(b'\n');
    }
    let mut any = false;
    let mut line_out = Vec::new();
    for l in lines(v.text) {
        any = true;
        line_out.clear();
        match template {
            Some(t) if !t.is_identity() => t.render(&Values { text: l, ..*v }, &mut line_out),
            _ => line_out.extend_from_slice(l),
        }
        data_lines(&line_out, &mut out);
    }
    if !any {
        // an event without a data line is never dispatched by a browser
        out.extend_from_slice(b"data: \n");
    }
    out.push(b'\n');
    out
}

/// A rendered line as `data: ` lines (a template may itself hold line breaks). As
/// push-stream, only LF splits it: a template's `\r\n` ends its data line with a CR,
/// which an EventSource client reads as the same line end.
fn data_lines(rendered: &[u8], out: &mut Vec<u8>) {
    if rendered.starts_with(b"data: ") {
        out.extend_from_slice(rendered);
        if !rendered.ends_with(b"\n") {
            out.push(b'\n');
        }
        return;
    }
    let mut n = 0;
    for l in rendered.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(l);
        out.push(b'\n');
        n += 1;
    }
    if n == 0 {
        out.extend_from_slice(b"data: \n");
    }
}

/// push-stream's reading of a tag: an optional `W/`, then a number, its sign dropped.
pub fn parse_tag(v: &[u8]) -> Option<u64> {
    let v = match v.strip_prefix(b"W/") {
        Some(rest) if v.len() > 2 => rest,
        _ => v,
    };
    let v = v.strip_prefix(b"-").unwrap_or(v);
    let digits: &[u8] = &v[..v.iter().take_while(|b| b.is_ascii_digit()).count()];
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_as_push_stream_reads_them() {
        assert_eq!(parse_tag(b"W/3"), Some(3));
        assert_eq!(parse_tag(b"3"), Some(3));
        assert_eq!(parse_tag(b"-7"), Some(7));
        assert_eq!(parse_tag(b"W/"), None);
        assert_eq!(parse_tag(b"abc"), None);
        assert_eq!(parse_tag(b"12xyz"), Some(12));
    }

    #[test]
    fn chunks() {
        let mut out = Vec::new();
        chunk(b"hello", true, &mut out);
        chunk(&[b'x'; 26], true, &mut out);
        chunk(b"", true, &mut out);
        assert_eq!(&out[..10], b"5\r\nhello\r\n");
        assert!(out[10..].starts_with(b"1a\r\n"));
        assert_eq!(out.len(), 10 + 4 + 26 + 2);
        let mut raw = Vec::new();
        chunk(b"hello", false, &mut raw);
        assert_eq!(raw, b"hello");
    }

    #[test]
    fn eventsource_messages_as_push_stream_writes_them() {
        let v = Values { text: b"line 1\nline 2\rline 3\r\nline 4", ..Values::default() };
        assert_eq!(
            eventsource_message(None, &v),
            b"data: line 1\ndata: line 2\ndata: line 3\ndata: line 4\n\n"
        );
        let v = Values { text: b"test message", event_id: "e1", event_type: "t", ..v };
        assert_eq!(eventsource_message(None, &v), b"id: e1\nevent: t\ndata: test message\n\n");
        let t = Template::parse(b"{\"id\":\"~id~\", \"message\":\"~text~\"}");
        let v = Values { text: b"test message", id: 1, ..Values::default() };
        assert_eq!(
            eventsource_message(Some(&t), &v),
            b"data: {\"id\":\"1\", \"message\":\"test message\"}\n\n"
        );
        // a template's CRLF stays at the end of its data line, as push-stream writes it
        let t = Template::parse(b"~text~\r\n");
        let v = Values { text: b"msg 3", ..Values::default() };
        assert_eq!(eventsource_message(Some(&t), &v), b"data: msg 3\r\n\n");
        let empty = Values { event_type: "gap", ..Values::default() };
        assert_eq!(eventsource_message(None, &empty), b"event: gap\ndata: \n\n");
    }

    #[test]
    fn eventsource_comments_per_line() {
        assert_eq!(
            eventsource_comments(b"header line 1\nheader line 2\rheader line 3\r\nheader line 4"),
            b": header line 1\n: header line 2\n: header line 3\n: header line 4\n"
        );
        assert_eq!(eventsource_comments(b": already\n"), b": already\n");
        assert_eq!(eventsource_comments(b""), b"");
    }
}
