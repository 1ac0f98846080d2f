//! Small helpers: time, channel names, URLs (loopback only), durations.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall-clock time in Unix nanoseconds: the publisher stamps it into the payload and the
/// subscriber subtracts it from its own, both on this machine.
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

pub fn channel_name(prefix: &str, index: usize) -> String {
    format!("{prefix}{index}")
}

/// The send time in a payload: the digits after `"t":`.
pub fn parse_t(payload: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"t\":";
    let at = payload.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = &payload[at..];
    let end = digits.iter().position(|b| !b.is_ascii_digit()).unwrap_or(digits.len());
    if end == 0 {
        return None;
    }
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// "1s", "500ms", "2m", "1.5" (seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(v) = s.strip_suffix("ms") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60.0)
    } else {
        (s, 1.0)
    };
    let n: f64 = num.trim().parse().map_err(|_| format!("invalid duration {s:?}"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(n * scale))
}

/// Whether a host name or address is on this machine's loopback.
pub fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The parts of an `http://` or `ws://` URL that a plain TCP client needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// host:port for TcpStream::connect.
    pub addr: String,
    /// The Host header.
    pub host_header: String,
    /// Path and query, possibly still holding `{channel}`.
    pub path: String,
}

pub fn parse_url(url: &str) -> Result<Endpoint, String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("not a URL: {url}"))?;
    let default_port = match scheme {
        "http" | "ws" => 80,
        _ => return Err(format!("{url}: only http:// and ws:// are supported")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => {
            let port: u16 =
                authority[i + 1..].parse().map_err(|_| format!("{url}: invalid port"))?;
            (&authority[..i], port)
        }
        _ => (authority, default_port),
    };
    if !is_loopback(host) {
        return Err(format!(
            "{url}: only loopback hosts (127.0.0.1, localhost, [::1]) are allowed"
        ));
    }
    let host = if host.eq_ignore_ascii_case("localhost") { "127.0.0.1" } else { host };
    Ok(Endpoint {
        addr: format!("{host}:{port}"),
        host_header: authority.to_string(),
        path: path.to_string(),
    })
}

/// Checks that a libpq connection string only names unix sockets or loopback hosts.
pub fn check_pg_local(conninfo: &str) -> Result<(), String> {
    let config: tokio_postgres::Config =
        conninfo.parse().map_err(|e| format!("invalid --pg connection string: {e}"))?;
    for host in config.get_hosts() {
        if let tokio_postgres::config::Host::Tcp(h) = host {
            if !is_loopback(h) {
                return Err(format!("--pg host {h} is not a loopback address"));
            }
        }
    }
    for addr in config.get_hostaddrs() {
        if !addr.is_loopback() {
            return Err(format!("--pg hostaddr {addr} is not a loopback address"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let e = parse_url("http://127.0.0.1:8081/pub?id={channel}").unwrap();
        assert_eq!(e.addr, "127.0.0.1:8081");
        assert_eq!(e.host_header, "127.0.0.1:8081");
        assert_eq!(e.path, "/pub?id={channel}");
        let e = parse_url("ws://localhost/ws").unwrap();
        assert_eq!(e.addr, "127.0.0.1:80");
        assert_eq!(parse_url("ws://[::1]:9/").unwrap().addr, "[::1]:9");
        assert!(parse_url("ws://10.0.0.1:80/").is_err());
        assert!(parse_url("ws://example.com/").is_err());
        assert!(parse_url("https://127.0.0.1/").is_err());
    }

    #[test]
    fn pg_hosts() {
        assert!(check_pg_local("host=127.0.0.1 port=5432 user=postgres").is_ok());
        assert!(check_pg_local("host=/tmp/x user=postgres").is_ok());
        assert!(check_pg_local("host=192.168.1.1 user=postgres").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn send_time() {
        assert_eq!(parse_t(br#"{"seq":1,"t":1700000000123456789}"#), Some(1700000000123456789));
        assert_eq!(parse_t(br#"{"seq":1}"#), None);
        assert_eq!(parse_t(br#"{"t":}"#), None);
    }
}
