//! EventSource subscribers (`--url http://...`): one GET with `Accept: text/event-stream`,
//! then the events of the response, chunked or not; the data lines of each event are its
//! message. Comments (pings, padding) are skipped.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct EventStream {
    sock: TcpStream,
    /// Raw bytes read and not parsed yet.
    raw: Vec<u8>,
    /// The body so far (de-chunked), not yet cut into events.
    body: Vec<u8>,
    chunked: bool,
    /// Bytes left in the current chunk; `None` between chunks.
    in_chunk: Option<usize>,
    ended: bool,
}

/// Connects and reads the response head, bounded by `timeout`.
pub async fn connect(url: &str, timeout: Duration) -> Result<EventStream, String> {
    let rest = url.strip_prefix("http://").ok_or("an EventSource URL starts with http://")?;
    let (host, path) =
        rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let open = async {
        let mut sock = TcpStream::connect(host).await.map_err(|e| format!("connect: {e}"))?;
        sock.set_nodelay(true).ok();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
        );
        sock.write_all(req.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::with_capacity(1024);
        let end = loop {
            if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            let mut buf = [0u8; 1024];
            let n = sock.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed before the response head".to_string());
            }
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            let line = head.lines().next().unwrap_or_default().to_string();
            return Err(format!("answered {line}"));
        }
        let chunked = head.contains("transfer-encoding: chunked");
        raw.drain(..end + 4);
        Ok(EventStream { sock, raw, body: Vec::new(), chunked, in_chunk: None, ended: false })
    };
    match tokio::time::timeout(timeout, open).await {
        Ok(r) => r,
        Err(_) => Err("connect: timed out".into()),
    }
}

impl EventStream {
    /// The data of the next event; `None` once the stream has ended.
    pub async fn next_event(&mut self) -> Option<Result<Vec<u8>, String>> {
        loop {
            if let Some(event) = self.take_event() {
                return Some(Ok(event));
            }
            if self.ended {
                return None;
            }
            let mut buf = [0u8; 4096];
            match self.sock.read(&mut buf).await {
                Ok(0) => self.ended = true,
                Ok(n) => {
                    self.raw.extend_from_slice(&buf[..n]);
                    if let Err(e) = self.dechunk() {
                        return Some(Err(e));
                    }
                }
                Err(e) => return Some(Err(format!("read: {e}"))),
            }
        }
    }

    /// Moves what `raw` holds of the body into `body`.
    fn dechunk(&mut self) -> Result<(), String> {
        if !self.chunked {
            self.body.append(&mut self.raw);
            return Ok(());
        }
        loop {
            match self.in_chunk {
                Some(0) => {
                    // the CRLF after a chunk's data
                    if self.raw.len() < 2 {
                        return Ok(());
                    }
                    self.raw.drain(..2);
                    self.in_chunk = None;
                }
                Some(left) => {
                    if self.raw.is_empty() {
                        return Ok(());
                    }
                    let n = left.min(self.raw.len());
                    self.body.extend(self.raw.drain(..n));
                    self.in_chunk = Some(left - n);
                }
                None => {
                    let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                        return Ok(());
                    };
                    let size = std::str::from_utf8(&self.raw[..eol])
                        .ok()
                        .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
                        .ok_or("a bad chunk size")?;
                    self.raw.drain(..eol + 2);
                    if size == 0 {
                        self.ended = true;
                        return Ok(());
                    }
                    self.in_chunk = Some(size);
                }
            }
        }
    }

    /// The data lines of the first complete event in `body`, if any; comment-only blocks
    /// are dropped.
    fn take_event(&mut self) -> Option<Vec<u8>> {
        loop {
            let end = self.body.windows(2).position(|w| w == b"\n\n")?;
            let block: Vec<u8> = self.body.drain(..end + 2).collect();
            let mut data: Option<Vec<u8>> = None;
            for line in block.split(|&b| b == b'\n') {
                if let Some(v) = line.strip_prefix(b"data:") {
                    let v = v.strip_prefix(b" ").unwrap_or(v);
                    let d = data.get_or_insert_with(Vec::new);
                    if !d.is_empty() {
                        d.push(b'\n');
                    }
                    d.extend_from_slice(v);
                }
            }
            if let Some(d) = data {
                return Some(d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(chunked: bool) -> EventStream {
        // a socket is not needed to parse
        let std = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = std.local_addr().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let sock = rt.block_on(TcpStream::connect(addr)).unwrap();
        EventStream {
            sock,
            raw: Vec::new(),
            body: Vec::new(),
            chunked,
            in_chunk: None,
            ended: false,
        }
    }

    fn chunk(data: &[u8]) -> Vec<u8> {
        let mut c = format!("{:x}\r\n", data.len()).into_bytes();
        c.extend_from_slice(data);
        c.extend_from_slice(b"\r\n");
        c
    }

    #[test]
    fn events_from_chunks() {
        let mut s = stream(true);
        s.raw.extend(chunk(b": \n"));
        s.raw.extend(chunk(b"data: {\"t\":5}\n\n:\n"));
        s.raw.extend(chunk(b"data: a\n"));
        // a chunk cut in two reads
        let half = chunk(b"data: b\n\n");
        s.raw.extend_from_slice(&half[..5]);
        s.dechunk().unwrap();
        assert_eq!(s.take_event().as_deref(), Some(&b"{\"t\":5}"[..]));
        assert_eq!(s.take_event(), None);
        s.raw.extend_from_slice(&half[5..]);
        s.raw.extend_from_slice(b"0\r\n\r\n");
        s.dechunk().unwrap();
        assert_eq!(s.take_event().as_deref(), Some(&b"a\nb"[..]));
        assert!(s.ended);
    }
}
