//! Publishers: pg_notify over tokio-postgres, HTTP POST (nchan's publisher, pgpush's
//! push_stream_publisher) over a small keep-alive HTTP/1.1 client, or WebSocket clients
//! that send text frames (pgpush's push_stream_websocket_allow_publish, nchan's
//! WebSocket publisher).
//!
//! A pacing task hands out sequence numbers at the requested rate; publisher tasks take
//! them and stamp each payload with the time just before it leaves.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Mutex};
use tokio_tungstenite::tungstenite::Message;

use crate::subscribe::Ws;
use crate::util::{channel_name, now_ns, Endpoint};

/// Counters shared by the publisher tasks.
#[derive(Default)]
pub struct PubStats {
    pub sent: AtomicU64,
    pub errors: AtomicU64,
    /// Unix nanoseconds of the first and the last message sent (0: none yet).
    pub first_send_ns: AtomicU64,
    pub last_send_ns: AtomicU64,
    /// Statements, requests or WebSocket frames sent.
    pub statements: AtomicU64,
    /// Frames the server sent to the WebSocket publishers (pgpush: the sender's own
    /// messages back; nchan: the channel info answering each message), read and dropped.
    pub replies: AtomicU64,
}

impl PubStats {
    fn mark_sent(&self, n: u64, at_ns: u64) {
        let _ = self.first_send_ns.compare_exchange(0, at_ns, Ordering::Relaxed, Ordering::Relaxed);
        self.last_send_ns.fetch_max(now_ns().max(at_ns), Ordering::Relaxed);
        self.sent.fetch_add(n, Ordering::Relaxed);
    }
}

/// The message body: `{"seq":N,"t":UNIX_NANOS}`, padded with a `"pad"` member up to
/// `size` bytes when `size` is larger than that.
pub fn payload(seq: u64, t_ns: u64, size: usize) -> String {
    let mut s = format!("{{\"seq\":{seq},\"t\":{t_ns}");
    const PAD_OVERHEAD: usize = ",\"pad\":\"\"}".len();
    if size > s.len() + PAD_OVERHEAD {
        let n = size - s.len() - PAD_OVERHEAD;
        s.push_str(",\"pad\":\"");
        s.extend(std::iter::repeat_n('x', n));
        s.push('"');
    }
    s.push('}');
    s
}

/// Hands out `messages` sequence numbers, `rate` per second (0: as fast as the publishers
/// take them).
pub async fn pace(tx: mpsc::Sender<u64>, messages: u64, rate: f64) {
    let start = tokio::time::Instant::now();
    for seq in 0..messages {
        if rate > 0.0 {
            tokio::time::sleep_until(start + Duration::from_secs_f64(seq as f64 / rate)).await;
        }
        if tx.send(seq).await.is_err() {
            return;
        }
    }
}

pub type Queue = Arc<Mutex<mpsc::Receiver<u64>>>;

/// Takes one sequence number (waiting for it) and then up to `max - 1` more that are
/// already queued. Empty: the pacing task is done.
async fn take(queue: &Queue, max: usize) -> Vec<u64> {
    let mut rx = queue.lock().await;
    let mut batch = Vec::new();
    if let Some(seq) = rx.recv().await {
        batch.push(seq);
        while batch.len() < max {
            match rx.try_recv() {
                Ok(seq) => batch.push(seq),
                Err(_) => break,
            }
        }
    }
    batch
}

pub struct Plan {
    pub channels: usize,
    pub prefix: String,
    pub size: usize,
}

impl Plan {
    fn channel_index(&self, seq: u64) -> usize {
        (seq % self.channels as u64) as usize
    }

    fn channel_of(&self, seq: u64) -> String {
        channel_name(&self.prefix, self.channel_index(seq))
    }
}

/// Connects to PostgreSQL (the caller checks the host is local).
pub async fn pg_connect(conninfo: &str) -> Result<tokio_postgres::Client, String> {
    let (client, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("PostgreSQL connection failed: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("loadgen: PostgreSQL connection: {e}");
        }
    });
    Ok(client)
}

/// One pg_notify publisher: a single message with `SELECT pg_notify($1, $2)`, a batch
/// with one statement over two arrays (one transaction, so delivered at its commit).
pub async fn pg_publisher(
    client: tokio_postgres::Client,
    queue: Queue,
    plan: Arc<Plan>,
    batch: usize,
    stats: Arc<PubStats>,
) {
    let one = match client.prepare("SELECT pg_notify($1, $2)").await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("loadgen: prepare: {e}");
            stats.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let many = match client
        .prepare("SELECT pg_notify(c, p) FROM unnest($1::text[], $2::text[]) AS t(c, p)")
        .await
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("loadgen: prepare: {e}");
            stats.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    loop {
        let seqs = take(&queue, batch.max(1)).await;
        if seqs.is_empty() {
            return;
        }
        let t = now_ns();
        let channels: Vec<String> = seqs.iter().map(|&s| plan.channel_of(s)).collect();
        let payloads: Vec<String> = seqs.iter().map(|&s| payload(s, t, plan.size)).collect();
        let res = if seqs.len() == 1 {
            client.execute(&one, &[&channels[0], &payloads[0]]).await
        } else {
            client.execute(&many, &[&channels, &payloads]).await
        };
        stats.statements.fetch_add(1, Ordering::Relaxed);
        match res {
            Ok(_) => stats.mark_sent(seqs.len() as u64, t),
            Err(e) => {
                if stats.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("loadgen: pg_notify: {e}");
                }
                if client.is_closed() {
                    return;
                }
            }
        }
    }
}

/// A minimal HTTP/1.1 client for POSTs on one keep-alive connection.
struct HttpConn {
    endpoint: Endpoint,
    io: Option<BufReader<TcpStream>>,
    head: String,
}

impl HttpConn {
    fn new(endpoint: Endpoint) -> Self {
        HttpConn { endpoint, io: None, head: String::new() }
    }

    async fn connect(&mut self) -> Result<&mut BufReader<TcpStream>, String> {
        if self.io.is_none() {
            let s = tokio::time::timeout(
                Duration::from_secs(5),
                TcpStream::connect(self.endpoint.addr.as_str()),
            )
            .await
            .map_err(|_| format!("connect to {}: timed out", self.endpoint.addr))?
            .map_err(|e| format!("connect to {}: {e}", self.endpoint.addr))?;
            s.set_nodelay(true).ok();
            self.io = Some(BufReader::with_capacity(16 * 1024, s));
        }
        Ok(self.io.as_mut().expect("connected above"))
    }

    /// POSTs `body` to `path`; returns the status code.
    async fn post(&mut self, path: &str, body: &str) -> Result<u16, String> {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: text/plain\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.endpoint.host_header,
            body.len()
        );
        let r = self.exchange(req.as_bytes()).await;
        if r.is_err() {
            self.io = None;
        }
        r
    }

    async fn exchange(&mut self, req: &[u8]) -> Result<u16, String> {
        let mut head = std::mem::take(&mut self.head);
        let io = self.connect().await?;
        io.get_mut().write_all(req).await.map_err(|e| format!("write: {e}"))?;
        head.clear();
        let mut status = 0u16;
        let mut length: Option<usize> = None;
        let mut chunked = false;
        let mut close = false;
        loop {
            let line_start = head.len();
            let n = io.read_line(&mut head).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed by the server".into());
            }
            let line = head[line_start..].trim_end().to_ascii_lowercase();
            if line_start == 0 {
                status = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
                if status == 0 {
                    return Err(format!("bad status line {line:?}"));
                }
            } else if line.is_empty() {
                break;
            } else if let Some(v) = line.strip_prefix("content-length:") {
                length = v.trim().parse().ok();
            } else if let Some(v) = line.strip_prefix("transfer-encoding:") {
                chunked = v.contains("chunked");
            } else if let Some(v) = line.strip_prefix("connection:") {
                close = v.contains("close");
            }
        }
        if chunked {
            loop {
                let mut size_line = String::new();
                io.read_line(&mut size_line).await.map_err(|e| format!("read: {e}"))?;
                let hex = size_line.trim().split(';').next().unwrap_or("");
                let size = usize::from_str_radix(hex, 16).map_err(|_| "bad chunk size")?;
                // The chunk and its CRLF (the last one: the trailer's empty line).
                let mut skip = vec![0u8; size + 2];
                io.read_exact(&mut skip).await.map_err(|e| format!("read: {e}"))?;
                if size == 0 {
                    break;
                }
            }
        } else if let Some(len) = length {
            let mut skip = vec![0u8; len];
            io.read_exact(&mut skip).await.map_err(|e| format!("read: {e}"))?;
        } else if status >= 200 && status != 204 && status != 304 {
            // No length: the body runs to the end of the connection.
            let mut rest = Vec::new();
            io.read_to_end(&mut rest).await.map_err(|e| format!("read: {e}"))?;
            close = true;
        }
        if close {
            self.io = None;
        }
        self.head = head;
        Ok(status)
    }
}

/// One HTTP publisher connection: POST each message to the URL template's channel.
pub async fn http_publisher(
    endpoint: Endpoint,
    path_template: String,
    queue: Queue,
    plan: Arc<Plan>,
    stats: Arc<PubStats>,
) {
    let mut conn = HttpConn::new(endpoint);
    loop {
        let seqs = take(&queue, 1).await;
        let Some(&seq) = seqs.first() else { return };
        let path = path_template.replace("{channel}", &plan.channel_of(seq));
        let t = now_ns();
        let body = payload(seq, t, plan.size);
        stats.statements.fetch_add(1, Ordering::Relaxed);
        match conn.post(&path, &body).await {
            Ok(code) if (200..300).contains(&code) => stats.mark_sent(1, t),
            Ok(code) => {
                if stats.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("loadgen: POST {path}: HTTP {code}");
                }
            }
            Err(e) => {
                if stats.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("loadgen: POST {path}: {e}");
                }
                // Do not spin on a dead server.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Which WebSocket publisher connection sends each message. A connection publishes to
/// the channel of its URL only, so connection `j` is opened on channel `j % channels`
/// (every channel needs one: `connections >= channels`), and a channel's messages go
/// round-robin over its connections.
#[derive(Debug)]
pub struct WsRoute {
    by_channel: Vec<Vec<usize>>,
    next: Vec<usize>,
}

impl WsRoute {
    pub fn new(connections: usize, channels: usize) -> Result<Self, String> {
        if channels == 0 || connections < channels {
            return Err(format!(
                "--publish ws opens one connection per channel at least: --publishers \
                 ({connections}) must be at least --channels ({channels})"
            ));
        }
        let mut by_channel = vec![Vec::new(); channels];
        for j in 0..connections {
            by_channel[Self::channel_of_connection(j, channels)].push(j);
        }
        Ok(WsRoute { by_channel, next: vec![0; channels] })
    }

    pub fn channel_of_connection(j: usize, channels: usize) -> usize {
        j % channels
    }

    /// The connection that sends the next message of `channel`.
    pub fn pick(&mut self, channel: usize) -> usize {
        let conns = &self.by_channel[channel];
        let j = conns[self.next[channel] % conns.len()];
        self.next[channel] = (self.next[channel] + 1) % conns.len();
        j
    }
}

/// Hands each sequence number to the WebSocket publisher connection of its channel (in
/// order: a connection sends its messages in the order they were paced).
pub async fn ws_router(
    queue: Queue,
    mut route: WsRoute,
    plan: Arc<Plan>,
    senders: Vec<mpsc::Sender<u64>>,
    stats: Arc<PubStats>,
) {
    loop {
        let seqs = take(&queue, 1).await;
        let Some(&seq) = seqs.first() else { return };
        let j = route.pick(plan.channel_index(seq));
        if senders[j].send(seq).await.is_err() {
            // That connection's writer ended (its connection failed): not sent.
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The sending half of one WebSocket publisher: each message as one text frame, stamped
/// just before it is written.
pub async fn ws_writer(
    mut sink: SplitSink<Ws, Message>,
    mut rx: mpsc::Receiver<u64>,
    plan: Arc<Plan>,
    stats: Arc<PubStats>,
) {
    while let Some(seq) = rx.recv().await {
        let t = now_ns();
        let body = payload(seq, t, plan.size);
        stats.statements.fetch_add(1, Ordering::Relaxed);
        match sink.send(Message::text(body)).await {
            Ok(()) => stats.mark_sent(1, t),
            Err(e) => {
                if stats.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("loadgen: WebSocket publisher: send: {e}");
                }
                return;
            }
        }
    }
}

/// The receiving half of one WebSocket publisher: reads and drops whatever the server
/// sends (answering pings, which tungstenite does while it reads) until told to stop.
/// Returns how the connection ended if it ended first.
pub async fn ws_reader(
    mut stream: SplitStream<Ws>,
    mut stop: watch::Receiver<bool>,
    stats: Arc<PubStats>,
) -> Option<String> {
    let stopped = stop.changed();
    tokio::pin!(stopped);
    loop {
        let frame = tokio::select! {
            biased;
            _ = &mut stopped => return None,
            f = stream.next() => f,
        };
        match frame {
            Some(Ok(Message::Text(_) | Message::Binary(_))) => {
                stats.replies.fetch_add(1, Ordering::Relaxed);
            }
            Some(Ok(Message::Close(c))) => {
                return Some(format!("publisher closed by the server: {c:?}"));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Some(format!("publisher read: {e}")),
            None => return Some("publisher connection closed".into()),
        }
    }
}

/// Waits for every publisher task, at most until `deadline`; returns false on timeout.
pub async fn join_all(tasks: Vec<tokio::task::JoinHandle<()>>, deadline: Instant) -> bool {
    for t in tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        let abort = t.abort_handle();
        if tokio::time::timeout(left, t).await.is_err() {
            abort.abort();
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_shape_and_padding() {
        assert_eq!(payload(7, 123, 0), r#"{"seq":7,"t":123}"#);
        let p = payload(7, 123, 100);
        assert_eq!(p.len(), 100);
        assert!(p.starts_with(r#"{"seq":7,"t":123,"pad":"xx"#));
        assert!(p.ends_with(r#"x"}"#));
        assert_eq!(crate::util::parse_t(p.as_bytes()), Some(123));
        // Too small to pad: left as is.
        assert_eq!(payload(7, 123, 20), r#"{"seq":7,"t":123}"#);
    }

    #[test]
    fn ws_route_one_connection_per_channel() {
        let mut r = WsRoute::new(3, 3).unwrap();
        assert_eq!((r.pick(0), r.pick(1), r.pick(2), r.pick(0)), (0, 1, 2, 0));
        assert!(WsRoute::new(2, 3).is_err(), "a channel without a connection");
        assert!(WsRoute::new(1, 0).is_err());
    }

    #[test]
    fn ws_route_round_robin_within_a_channel() {
        // 5 connections over 2 channels: channel 0 has 0, 2, 4; channel 1 has 1, 3.
        let mut r = WsRoute::new(5, 2).unwrap();
        let zero: Vec<usize> = (0..4).map(|_| r.pick(0)).collect();
        assert_eq!(zero, [0, 2, 4, 0]);
        let one: Vec<usize> = (0..3).map(|_| r.pick(1)).collect();
        assert_eq!(one, [1, 3, 1]);
        for j in 0..5 {
            assert_eq!(WsRoute::channel_of_connection(j, 2), j % 2);
        }
    }

    #[test]
    fn plan_channels_round_robin() {
        let plan = Plan { channels: 3, prefix: "b".into(), size: 0 };
        assert_eq!(plan.channel_index(4), 1);
        assert_eq!(plan.channel_of(5), "b2");
    }
}
