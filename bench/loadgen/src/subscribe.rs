//! WebSocket subscribers: connect under a concurrency limit, then read frames and record
//! each message's end-to-end latency until told to stop.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::util::{now_ns, parse_t};

/// Counters that the main task watches while the subscribers run.
pub struct Shared {
    pub connected: AtomicU64,
    pub failed: AtomicU64,
    /// Subscribers whose connection ended (closed or failed) after it was open.
    pub dropped: AtomicU64,
    pub received: AtomicU64,
    /// Unix nanoseconds of the latest message received (0: none yet).
    pub last_recv_ns: AtomicU64,
    /// Connected subscribers per channel, for the expected delivery count.
    pub per_channel: Vec<AtomicU32>,
}

impl Shared {
    pub fn new(channels: usize) -> Self {
        Shared {
            connected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            received: AtomicU64::new(0),
            last_recv_ns: AtomicU64::new(0),
            per_channel: (0..channels).map(|_| AtomicU32::new(0)).collect(),
        }
    }
}

/// What one subscriber saw.
#[derive(Default)]
pub struct Outcome {
    pub received: u64,
    /// Frames without a send time in them.
    pub unparsed: u64,
    /// Messages that came as binary frames rather than text.
    pub binary: u64,
    /// Messages sent before this run started (a server replaying stored messages).
    pub stale: u64,
    /// Latencies in microseconds.
    pub latencies: Vec<u32>,
    pub error: Option<String>,
}

pub struct Subscriber {
    pub url: String,
    pub channel: usize,
    pub limit: Arc<Semaphore>,
    pub connect_timeout: Duration,
    pub shared: Arc<Shared>,
    pub stop: watch::Receiver<bool>,
    /// Messages stamped before this (Unix ns) are stale: not this run's.
    pub since_ns: u64,
}

impl Subscriber {
    pub async fn run(mut self) -> Outcome {
        let mut out = Outcome::default();
        let config = WebSocketConfig::default()
            .read_buffer_size(1024)
            .write_buffer_size(0)
            .max_message_size(Some(1 << 20));
        let shared = self.shared.clone();
        let mut ws = {
            let permit = tokio::select! {
                p = self.limit.acquire() => p,
                _ = self.stop.changed() => return out,
            };
            let connect = tokio::time::timeout(
                self.connect_timeout,
                tokio_tungstenite::connect_async_with_config(self.url.as_str(), Some(config), true),
            );
            let res = tokio::select! {
                r = connect => r,
                _ = self.stop.changed() => return out,
            };
            drop(permit);
            match res {
                Ok(Ok((ws, _response))) => ws,
                Ok(Err(e)) => {
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                    out.error = Some(format!("connect: {e}"));
                    return out;
                }
                Err(_) => {
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                    out.error = Some("connect: timed out".into());
                    return out;
                }
            }
        };
        shared.per_channel[self.channel].fetch_add(1, Ordering::Relaxed);
        shared.connected.fetch_add(1, Ordering::Relaxed);

        // One stop future for the whole loop: making a new one per frame costs more than
        // the frame itself.
        let mut stop = self.stop.clone();
        let stopped = stop.changed();
        tokio::pin!(stopped);
        loop {
            let frame = tokio::select! {
                biased;
                _ = &mut stopped => break,
                f = ws.next() => f,
            };
            match frame {
                Some(Ok(Message::Text(t))) => self.record(&mut out, t.as_bytes()),
                Some(Ok(Message::Binary(b))) => {
                    out.binary += 1;
                    self.record(&mut out, &b)
                }
                Some(Ok(Message::Close(c))) => {
                    out.error = Some(format!("closed by the server: {c:?}"));
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                // Pings are answered by tungstenite itself.
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    out.error = Some(format!("read: {e}"));
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                None => {
                    out.error = Some("connection closed".into());
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
        out
    }

    fn record(&self, out: &mut Outcome, data: &[u8]) {
        let now = now_ns();
        match parse_t(data) {
            Some(t) if t < self.since_ns => {
                out.stale += 1;
                return;
            }
            Some(t) => {
                out.received += 1;
                let us = now.saturating_sub(t) / 1000;
                out.latencies.push(us.min(u64::from(u32::MAX)) as u32);
            }
            None => {
                out.received += 1;
                out.unparsed += 1;
            }
        }
        self.shared.received.fetch_add(1, Ordering::Relaxed);
        self.shared.last_recv_ns.fetch_max(now, Ordering::Relaxed);
    }
}
