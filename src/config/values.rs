//! Pure parsers for directive values that nginx has no stock setter for.
//!
//! The FFI setters in `crate::nginx::conf` call these and turn an `Err` into an `[emerg]`
//! naming the directive, the value and file:line.

use core::fmt;
use core::time::Duration;

/// `push_stream_subscriber [mode]`; push-stream's default is `streaming`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SubscriberMode {
    #[default]
    Streaming,
    Polling,
    LongPolling,
    EventSource,
    WebSocket,
}

impl SubscriberMode {
    pub const ACCEPTED: &'static str = "streaming, polling, long-polling, eventsource, websocket";

    pub fn name(self) -> &'static str {
        match self {
            Self::Streaming => "streaming",
            Self::Polling => "polling",
            Self::LongPolling => "long-polling",
            Self::EventSource => "eventsource",
            Self::WebSocket => "websocket",
        }
    }

    pub fn parse(v: &[u8]) -> Option<Self> {
        Some(match v {
            b"streaming" => Self::Streaming,
            b"polling" => Self::Polling,
            b"long-polling" => Self::LongPolling,
            b"eventsource" => Self::EventSource,
            b"websocket" => Self::WebSocket,
            _ => return None,
        })
    }
}

/// `push_stream_publisher [mode]`; `admin` also allows DELETE.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PublisherMode {
    #[default]
    Normal,
    Admin,
}

impl PublisherMode {
    pub const ACCEPTED: &'static str = "normal, admin";

    pub fn parse(v: &[u8]) -> Option<Self> {
        match v {
            b"normal" => Some(Self::Normal),
            b"admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes.
pub const PG_MAX_IDENTIFIER: usize = 63;

/// Why a directive value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValueError {
    #[error("it must be at most {max} bytes, as PostgreSQL channel names are")]
    TooLong { max: usize },
    #[error("it must not contain NUL bytes")]
    Nul,
    #[error("it must be UTF-8")]
    NotUtf8,
    #[error("the minimum must not exceed the maximum")]
    MinAboveMax,
    #[error("it must be greater than zero")]
    Zero,
    /// push-stream's wording: the entries are `regex,header size,message size`, separated
    /// by `:`; the message names the value from the first entry that does not parse.
    #[error("{0}")]
    Padding(String),
}

/// `push_stream_postgres_channel_prefix`: the PostgreSQL channel is prefix + channel id, so
/// the prefix alone must leave room for at least one byte of id.
pub fn channel_prefix(v: &[u8]) -> Result<(), ValueError> {
    if v.contains(&0) {
        return Err(ValueError::Nul);
    }
    if core::str::from_utf8(v).is_err() {
        return Err(ValueError::NotUtf8);
    }
    if v.len() >= PG_MAX_IDENTIFIER {
        return Err(ValueError::TooLong { max: PG_MAX_IDENTIFIER - 1 });
    }
    Ok(())
}

/// `push_stream_postgres_reconnect <min> <max>`: the bounds of the exponential backoff.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reconnect {
    pub min: Duration,
    pub max: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self { min: Duration::from_millis(100), max: Duration::from_secs(10) }
    }
}

impl Reconnect {
    pub fn new(min: Duration, max: Duration) -> Result<Self, ValueError> {
        if min.is_zero() || max.is_zero() {
            return Err(ValueError::Zero);
        }
        if min > max {
            return Err(ValueError::MinAboveMax);
        }
        Ok(Self { min, max })
    }
}

/// One entry of `push_stream_padding_by_user_agent`, e.g. `[Ii][Ee],366,0`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Padding {
    pub user_agent: String,
    pub header_size: usize,
    pub message_size: usize,
}

/// push-stream's padding after a header or message of `len` bytes when the rule asks for
/// `min`: nothing if it is long enough, else the shortfall rounded up to the next 100 bytes,
/// at most `max` (the largest size of the location's rules), which is used as it is once
/// the shortfall reaches its last hundred.
pub fn padding_len(min: usize, len: usize, max: usize) -> usize {
    if min <= len {
        return 0;
    }
    let step = (min - len) / 100;
    if step >= max / 100 {
        max
    } else {
        (step + 1) * 100
    }
}

/// Padding bytes: `\r\n` pairs (aligned to end on `\n`), or for EventSource a comment
/// line of colons.
pub fn padding_bytes(n: usize, eventsource: bool, out: &mut Vec<u8>) {
    if n == 0 {
        return;
    }
    if eventsource {
        out.extend(core::iter::repeat(b':').take(n - 1));
        out.push(b'\n');
    } else {
        if n % 2 == 1 {
            out.push(b'\n');
        }
        for _ in 0..n / 2 {
            out.extend_from_slice(b"\r\n");
        }
    }
}

pub fn padding_by_user_agent(v: &str) -> Result<Vec<Padding>, ValueError> {
    let entry = |entry: &str| -> Option<Padding> {
        let mut it = entry.rsplitn(3, ',');
        let message = it.next()?;
        let header = it.next()?;
        let ua = it.next().filter(|s| !s.is_empty())?;
        Some(Padding {
            user_agent: ua.to_string(),
            header_size: header.trim().parse().ok()?,
            message_size: message.trim().parse().ok()?,
        })
    };
    let mut out = Vec::new();
    let mut at = 0;
    for part in v.split(':') {
        match entry(part) {
            Some(p) => out.push(p),
            None if at == 0 => {
                return Err(ValueError::Padding(format!("padding pattern not match the value {v}")))
            }
            None => {
                let rest = &v[at..];
                return Err(ValueError::Padding(format!(
                    "error applying padding pattern to {rest}"
                )));
            }
        }
        at += part.len() + 1;
    }
    Ok(out)
}

/// Renders bytes of a directive value for a log line.
pub struct Shown<'a>(pub &'a [u8]);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(SubscriberMode::parse(b"websocket"), Some(SubscriberMode::WebSocket));
        assert_eq!(SubscriberMode::parse(b"long-polling"), Some(SubscriberMode::LongPolling));
        assert_eq!(SubscriberMode::parse(b"eventsource"), Some(SubscriberMode::EventSource));
        assert_eq!(SubscriberMode::parse(b"polling"), Some(SubscriberMode::Polling));
        assert_eq!(SubscriberMode::parse(b"streaming"), Some(SubscriberMode::Streaming));
        assert_eq!(SubscriberMode::parse(b"WebSocket"), None);
        assert_eq!(SubscriberMode::parse(b"longpolling"), None);
        assert_eq!(SubscriberMode::default(), SubscriberMode::Streaming);
        assert_eq!(PublisherMode::parse(b"admin"), Some(PublisherMode::Admin));
        assert_eq!(PublisherMode::parse(b"normal"), Some(PublisherMode::Normal));
        assert_eq!(PublisherMode::parse(b""), None);
    }

    #[test]
    fn prefix() {
        assert!(channel_prefix(b"").is_ok());
        assert!(channel_prefix(b"app_").is_ok());
        assert!(channel_prefix(&[b'a'; 62]).is_ok());
        assert_eq!(channel_prefix(&[b'a'; 63]), Err(ValueError::TooLong { max: 62 }));
        assert_eq!(channel_prefix(b"a\0b"), Err(ValueError::Nul));
    }

    #[test]
    fn reconnect() {
        let ms = Duration::from_millis;
        assert_eq!(Reconnect::new(ms(100), ms(10_000)).unwrap(), Reconnect::default());
        assert_eq!(Reconnect::new(ms(5), ms(5)).unwrap().max, ms(5));
        assert_eq!(Reconnect::new(ms(6), ms(5)), Err(ValueError::MinAboveMax));
        assert_eq!(Reconnect::new(ms(0), ms(5)), Err(ValueError::Zero));
    }

    #[test]
    fn padding() {
        let p = padding_by_user_agent("[Ii][Ee],366,0:Android 2,4097,4097").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].user_agent, "[Ii][Ee]");
        assert_eq!((p[0].header_size, p[0].message_size), (366, 0));
        assert_eq!(p[1].user_agent, "Android 2");
        // a regex may itself contain commas
        let p = padding_by_user_agent("a{1,2},1,2").unwrap();
        assert_eq!(p[0].user_agent, "a{1,2}");
        // push-stream's specs: rules 1024/508 and 4097/0, a 10-byte header
        assert_eq!(padding_len(1024, 10, 4097), 1100);
        assert_eq!(padding_len(4097, 10, 4097), 4097);
        assert_eq!(padding_len(0, 10, 4097), 0);
        assert_eq!(padding_len(508, 10, 508), 500);
        let sizes: Vec<usize> =
            [1, 105, 221, 331, 435, 502, 550].iter().map(|&l| padding_len(545, l, 545)).collect();
        assert_eq!(sizes, [545, 500, 400, 300, 200, 100, 0]);
        let mut p = Vec::new();
        padding_bytes(6, false, &mut p);
        assert_eq!(p, b"\r\n\r\n\r\n");
        p.clear();
        padding_bytes(5, true, &mut p);
        assert_eq!(p, b"::::\n");
        let bad = |v: &str| padding_by_user_agent(v).unwrap_err().to_string();
        assert_eq!(bad("user_agent,as,df"), "padding pattern not match the value user_agent,as,df");
        assert_eq!(
            bad("user_agent,10,0:other_user_agent;20;0:another_user_agent,30,0"),
            "error applying padding pattern to other_user_agent;20;0:another_user_agent,30,0"
        );
        assert!(padding_by_user_agent("ie,1").is_err());
        assert!(padding_by_user_agent(",1,2").is_err());
        assert!(padding_by_user_agent("ie,x,2").is_err());
        assert!(padding_by_user_agent("ie,1,2:").is_err());
    }
}
