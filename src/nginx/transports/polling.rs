//! `push_stream_subscriber polling`: the request is answered at once, with the stored
//! messages after the client's position (see [`super::longpoll::poll`]), or, when there is
//! nothing new, with push-stream's `304`, echoing the client's position (`Last-Modified`
//! from `If-Modified-Since`, `Etag` from `If-None-Match`, or the values of
//! `push_stream_last_received_message_time` and `_tag`). The channels are created, as
//! push-stream does, so they show in channel info.

use nginx_sys::{ngx_http_request_t, ngx_int_t};

use crate::counters::Refusal;
use crate::nginx::events::{self, Event};
use crate::nginx::http;
use crate::nginx::zone;

/// Creates a polling request's channels, as push-stream does; the refusal to send if there
/// are too many.
pub fn touch(r: &mut ngx_http_request_t, ids: &[&str]) -> Result<(), ngx_int_t> {
    let limits = http::counter_limits(r, false);
    for id in ids {
        match zone::touch(id.as_bytes(), &limits) {
            Ok(true) => events::emit(Event::ChannelCreated, id.as_bytes()),
            Ok(false) | Err(Refusal::Full) => {}
            Err(_) => return Err(http::send_explain(r, 403, "Number of channels were exceeded.")),
        }
    }
    Ok(())
}

/// push-stream's answer when there is nothing new: `304`, echoing the client's position.
pub fn not_modified(r: &mut ngx_http_request_t) -> ngx_int_t {
    let (time, tag) = http::position(r);
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
    if http::arg(r, b"callback").is_some() {
        // JSONP, even with nothing to send, as push-stream
        http::set_javascript(r);
    } else {
        // SAFETY: the request is alive; the content type of the location, as push-stream
        // sends
        unsafe { nginx_sys::ngx_http_set_content_type(r) };
    }
    http::send_header_only(r, 304)
}
