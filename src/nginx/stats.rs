//! `push_stream_channels_statistics`: the node's summary, or the info of channels (`ALL`,
//! a `prefix*`, or the ids of the path), from the counter zone, in the format `Accept`
//! asks for. The publisher's channel info is answered here too.

use nginx_sys::{ngx_http_request_t, ngx_int_t, NGX_HTTP_GET};

use crate::counters::{Info, Summary};
use crate::nginx::http::{self, ERROR, OK};
use crate::nginx::zone;
use crate::protocol::channels;
use crate::protocol::info::{self, Format, Head, Totals};

/// push-stream 0.6.0's version headers, which its clients and specs look for.
const TAG: &str = "0.5.5";
const COMMIT: &str = "3bc016f811d50374251960db091557571dfd7393";

pub extern "C" fn handler(r: *mut ngx_http_request_t) -> ngx_int_t {
    // SAFETY: nginx passes the request being processed
    let r = unsafe { &mut *r };
    if http::no_cache(r).is_err()
        || http::header_out(r, "X-Nginx-PushStream-Tag", TAG).is_err()
        || http::header_out(r, "X-Nginx-PushStream-Commit", COMMIT).is_err()
    {
        return ERROR;
    }
    if r.method != NGX_HTTP_GET as usize {
        return http::send_not_allowed(r, "GET");
    }
    // SAFETY: the request is in its content phase
    let rc = unsafe { nginx_sys::ngx_http_discard_request_body(r) };
    if rc != OK {
        return rc;
    }
    let (path, limits) = http::channels_path(r);
    let path = channels::unescape(&path);
    if path.is_empty() {
        return send_summary(r);
    }
    let mut found = Vec::new();
    let mut named = 0;
    for seg in path.split(|&b| b == b'/').filter(|s| !s.is_empty()) {
        // the same path syntax as everywhere: a `.bN` backtrack is not part of the id
        let (seg, _) = channels::split_backtrack(seg);
        if limits.max_id_length.is_some_and(|max| seg.len() > max) {
            return http::send_explain(r, 400, "Channel id is too large.");
        }
        if let Some(star) = seg.iter().position(|&b| b == b'*') {
            return send_infos(r, &zone::list(&seg[..star]), true);
        }
        if seg == b"ALL" {
            return send_infos(r, &zone::list(b""), true);
        }
        named += 1;
        found.extend(zone::info(seg));
    }
    if named == 0 {
        return send_summary(r);
    }
    send_infos(r, &found, found.len() > 1)
}

fn format(r: &ngx_http_request_t) -> Format {
    info::select(http::header_in(r, "Accept"))
}

fn head(s: &Summary, now: u64) -> Head {
    Head {
        hostname: hostname(),
        time: info::iso_time(now),
        channels: s.channels,
        wildcard_channels: s.wildcard_channels,
        uptime: now.saturating_sub(s.started),
    }
}

/// Channel info: one channel alone, or a group (lists, and paths naming several); an
/// empty single answer is a 404.
pub fn send_infos(r: &mut ngx_http_request_t, infos: &[Info], group: bool) -> ngx_int_t {
    let f = format(r);
    let body = match infos {
        [] if !group => return http::send_header_only(r, nginx_sys::NGX_HTTP_NOT_FOUND),
        [one] if !group => info::single(f.kind, one),
        _ => info::group(f.kind, &head(&zone::summary(), now()), infos),
    };
    http::send_body(r, 200, f.content_type, body.as_bytes())
}

fn send_summary(r: &mut ngx_http_request_t) -> ngx_int_t {
    let f = format(r);
    let s = zone::summary();
    let now = now();
    let head = head(&s, now);
    let totals = Totals {
        published: s.published,
        stored: s.stored,
        subscribers: s.subscribers,
        channels_in_delete: s.channels_in_delete,
    };
    let body = info::summary(f.kind, &head, &totals, &info::workers(&s.workers, now));
    http::send_body(r, 200, f.content_type, body.as_bytes())
}

fn now() -> u64 {
    // SAFETY: nginx's cached time is always set
    unsafe { (*nginx_sys::ngx_cached_time).sec as u64 }
}

fn hostname() -> String {
    // SAFETY: the cycle's hostname is set at startup
    unsafe {
        let cycle = &*nginx_sys::ngx_cycle;
        String::from_utf8_lossy(cycle.hostname.as_bytes()).into_owned()
    }
}
