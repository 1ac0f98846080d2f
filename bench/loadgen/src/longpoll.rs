//! Long-polling subscribers (`--long-poll` with an `http://` URL): a GET that the server
//! holds until a message comes; each answer's body is one message (or, for a server that
//! answers several at once, several lines). The next GET goes out at once on the same
//! keep-alive connection, carrying the answer's `Last-Modified` and `Etag` back as
//! `If-Modified-Since` and `If-None-Match`, as push-stream's and nchan's clients do. A 304
//! (the server's timeout) is simply asked again.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct LongPoll {
    sock: TcpStream,
    addr: String,
    host: String,
    path: String,
    raw: Vec<u8>,
    last_modified: Option<String>,
    etag: Option<String>,
}

/// One parsed answer.
struct Answer {
    status: u16,
    body: Vec<u8>,
    close: bool,
}

/// Connects and sends the first request, bounded by `timeout`.
pub async fn connect(url: &str, timeout: Duration) -> Result<LongPoll, String> {
    let rest = url.strip_prefix("http://").ok_or("a long-polling URL starts with http://")?;
    let (host, path) =
        rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let open = async {
        let sock = TcpStream::connect(host).await.map_err(|e| format!("connect: {e}"))?;
        sock.set_nodelay(true).ok();
        let mut lp = LongPoll {
            sock,
            addr: host.to_string(),
            host: host.to_string(),
            path,
            raw: Vec::with_capacity(512),
            last_modified: None,
            etag: None,
        };
        lp.ask().await?;
        Ok(lp)
    };
    match tokio::time::timeout(timeout, open).await {
        Ok(r) => r,
        Err(_) => Err("connect: timed out".into()),
    }
}

impl LongPoll {
    async fn ask(&mut self) -> Result<(), String> {
        let mut req = format!("GET {} HTTP/1.1\r\nHost: {}\r\n", self.path, self.host);
        if let Some(v) = &self.last_modified {
            req.push_str(&format!("If-Modified-Since: {v}\r\n"));
        }
        if let Some(v) = &self.etag {
            req.push_str(&format!("If-None-Match: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.sock.write_all(req.as_bytes()).await.map_err(|e| format!("write: {e}"))
    }

    /// The messages of the next answer with a body; `None` when the server ended the
    /// connection between answers.
    pub async fn next_messages(&mut self) -> Option<Result<Vec<Vec<u8>>, String>> {
        loop {
            let answer = match self.read_answer().await {
                Ok(Some(a)) => a,
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            };
            if answer.close {
                // keep-alive used up: a new connection for the next poll
                match TcpStream::connect(&self.addr).await {
                    Ok(s) => {
                        s.set_nodelay(true).ok();
                        self.sock = s;
                        self.raw.clear();
                    }
                    Err(e) => return Some(Err(format!("reconnect: {e}"))),
                }
            }
            if let Err(e) = self.ask().await {
                return Some(Err(e));
            }
            match answer.status {
                200 => {
                    let lines = answer
                        .body
                        .split(|&b| b == b'\n')
                        .filter(|l| !l.is_empty())
                        .map(<[u8]>::to_vec)
                        .collect();
                    return Some(Ok(lines));
                }
                304 => continue,
                s => return Some(Err(format!("answered {s}"))),
            }
        }
    }

    async fn fill(&mut self) -> Result<bool, String> {
        let mut buf = [0u8; 4096];
        match self.sock.read(&mut buf).await {
            Ok(0) => Ok(false),
            Ok(n) => {
                self.raw.extend_from_slice(&buf[..n]);
                Ok(true)
            }
            Err(e) => Err(format!("read: {e}")),
        }
    }

    async fn read_answer(&mut self) -> Result<Option<Answer>, String> {
        let end = loop {
            if let Some(at) = self.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            if !self.fill().await? {
                return if self.raw.is_empty() {
                    Ok(None)
                } else {
                    Err("connection closed in a response head".into())
                };
            }
        };
        let head = String::from_utf8_lossy(&self.raw[..end]).into_owned();
        self.raw.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or("a bad status line")?;
        let (mut length, mut chunked, mut close) = (None, false, false);
        for line in lines {
            let Some((name, value)) = line.split_once(':') else { continue };
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse::<usize>().ok(),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                "last-modified" => self.last_modified = Some(value.to_string()),
                "etag" => self.etag = Some(value.to_string()),
                _ => {}
            }
        }
        let body = if chunked {
            self.read_chunked().await?
        } else {
            let n = length.unwrap_or(0);
            while self.raw.len() < n {
                if !self.fill().await? {
                    return Err("connection closed in a body".into());
                }
            }
            self.raw.drain(..n).collect()
        };
        Ok(Some(Answer { status, body, close }))
    }

    async fn read_chunked(&mut self) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        loop {
            let eol = loop {
                if let Some(at) = self.raw.windows(2).position(|w| w == b"\r\n") {
                    break at;
                }
                if !self.fill().await? {
                    return Err("connection closed in a chunk".into());
                }
            };
            let size = std::str::from_utf8(&self.raw[..eol])
                .ok()
                .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
                .ok_or("a bad chunk size")?;
            self.raw.drain(..eol + 2);
            while self.raw.len() < size + 2 {
                if !self.fill().await? {
                    return Err("connection closed in a chunk".into());
                }
            }
            body.extend(self.raw.drain(..size));
            self.raw.drain(..2);
            if size == 0 {
                return Ok(body);
            }
        }
    }
}
