//! `push_stream_subscriber polling`: the request is answered at once. Messages are not
//! stored yet (issue 11), so there is never anything new: the answer is push-stream's
//! `304`, echoing the client's position (`Last-Modified` from `If-Modified-Since`, `Etag`
//! from `If-None-Match`, or the values of `push_stream_last_received_message_time` and
//! `_tag`). The channels are created, as push-stream does, so they show in channel info.

use nginx_sys::{ngx_http_request_t, ngx_int_t};

use crate::counters::Refusal;
use crate::nginx::events::{self, Event};
use crate::nginx::http;
use crate::nginx::zone;
use crate::protocol::stream;

/// Answers a polling request whose channels passed every check.
pub fn answer(r: &mut ngx_http_request_t, ids: &[String]) -> ngx_int_t {
    let limits = http::counter_limits(r, false);
    for id in ids {
        match zone::touch(id.as_bytes(), &limits) {
            Ok(true) => events::emit(Event::ChannelCreated, id.as_bytes()),
            Ok(false) | Err(Refusal::Full) => {}
            Err(_) => return http::send_explain(r, 403, "Number of channels were exceeded."),
        }
    }
    let (time, tag) = position(r);
    if time > 0 {
        r.headers_out.last_modified_time = time;
    }
    if let Some(tag) = tag {
        if http::header_out(r, "Etag", &format!("W/{tag}")).is_err() {
            return http::ERROR;
        }
    }
    if http::no_cache(r).is_err() {
        return http::ERROR;
    }
    // SAFETY: the request is alive; the content type of the location, as push-stream sends
    unsafe { nginx_sys::ngx_http_set_content_type(r) };
    http::send_header_only(r, 304)
}

/// The client's position: the time (`-1` if none) and the tag.
fn position(r: &mut ngx_http_request_t) -> (nginx_sys::time_t, Option<u64>) {
    let lcf = http::loc_conf(r);
    let from = |r: &mut ngx_http_request_t,
                cv: *mut nginx_sys::ngx_http_complex_value_t,
                header: &str|
     -> Option<Vec<u8>> {
        if cv.is_null() {
            http::header_in(r, header).map(<[u8]>::to_vec)
        } else {
            http::complex_value(r, cv)
                .filter(|v| !v.is_empty())
                .map(|v| crate::protocol::channels::unescape(&v))
        }
    };
    let time = from(r, lcf.last_received_message_time, "If-Modified-Since")
        .map(|mut v| {
            // SAFETY: the parser reads len bytes
            unsafe { nginx_sys::ngx_parse_http_time(v.as_mut_ptr(), v.len()) }
        })
        .unwrap_or(-1);
    let tag =
        from(r, lcf.last_received_message_tag, "If-None-Match").and_then(|v| stream::parse_tag(&v));
    (time, tag)
}
