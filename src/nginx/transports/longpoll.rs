//! `push_stream_subscriber long-polling`: the request waits for the next message on any of
//! its channels and is answered with it (`200`, the header template, the message, the
//! footer template), or, at `push_stream_longpolling_connection_ttl` (else
//! `push_stream_subscriber_connection_ttl`), with `304` (or `200` and push-stream's
//! timeout message, id -3 "Timed out", with `push_stream_timeout_with_body on`). `?callback=`
//! wraps the message in JSONP. It lives for one message at most.
//!
//! While it waits, a plain HTTP/1.x long-poll is parked ([`super::parked`]): its request is
//! freed and the connection alone waits, about 1 KB instead of 10; the answer goes to the
//! request that replays it. Any other long-poll is held as an ordinary nginx request.

use core::ffi::c_void;
use core::ptr;
use std::rc::Rc;

use nginx_sys::{
    ngx_connection_t, ngx_event_t, ngx_http_cleanup_t, ngx_http_request_t, ngx_int_t, ngx_msec_t,
};

use super::parked;
use crate::nginx::conf::LocConf;
use crate::nginx::http::{self, finalize, DONE};
use crate::nginx::lifecycle::{self, Encoding, SubKey, Subscription, Transport};
use crate::nginx::worker;
use crate::postgres::cells::Reply;
use crate::postgres::store::{Since, Stored};
use crate::protocol::template::Values;

/// Long-pollers of one location share an encoded message.
const KIND: u16 = 0x8000;

pub struct LongPoller {
    /// Null once parked.
    r: *mut ngx_http_request_t,
    cln: *mut ngx_http_cleanup_t,
    lcf: &'static LocConf,
    sub: Subscription,
    /// The messages that answer this request, with the time and tag of the last one.
    answer: Vec<Rc<[u8]>>,
    stamp: (i64, u64),
    done: bool,
    /// Whether it joined its channels (a polling request only reads their history).
    joined: bool,
    /// The history read in flight, for a polling request.
    reading: Option<u64>,
    /// Its history starts with the gap message: `X-Pgpush-Gap: 1` too.
    gap: bool,
    /// How it parks: the head to replay; `None` when it stays a held request.
    park: Option<Park>,
    /// The answer of a parked poller, waiting for its replay.
    reply: Option<Answer>,
}

/// A parked poller's connection and request head.
struct Park {
    c: *mut ngx_connection_t,
    head: Vec<u8>,
    /// The header buffer's size: a replay must fit in it.
    capacity: usize,
    start: (nginx_sys::time_t, ngx_msec_t),
    /// The connection's write handler before the parking was posted on it.
    write_handler: nginx_sys::ngx_event_handler_pt,
}

/// What answers a request.
pub struct Answer {
    status: u32,
    messages: Vec<Rc<[u8]>>,
    stamp: Option<(i64, u64)>,
    gap: bool,
}

/// A long-polling request: joins its channels and waits.
pub fn subscribe(
    r: &mut ngx_http_request_t,
    channels: Vec<(String, u32)>,
) -> Result<ngx_int_t, ngx_int_t> {
    let lcf = http::loc_conf(r);
    let poller = Box::new(LongPoller {
        r: ptr::from_mut(r),
        cln: ptr::null_mut(),
        lcf,
        sub: Subscription::admit(r, lcf, channels),
        answer: Vec::new(),
        stamp: (0, 0),
        done: false,
        joined: true,
        reading: None,
        gap: false,
        park: None,
        reply: None,
    });
    let parkable = parked::can_park(r);
    let raw = hold(r, poller)?;
    // SAFETY: raw is live until the cleanup, which leaves first
    let key = unsafe { SubKey::new(&mut *raw) };
    lifecycle::join(key);
    let ttl = match lcf.longpolling_connection_ttl {
        t if t != nginx_sys::NGX_CONF_UNSET as ngx_msec_t => t,
        _ => lcf.subscriber_connection_ttl,
    };
    // SAFETY: the connection's write event is unused while the request waits
    let wev = unsafe { (*r.connection).write };
    if ttl != nginx_sys::NGX_CONF_UNSET as ngx_msec_t {
        // SAFETY: as above
        unsafe { nginx_sys::ngx_add_timer(wev, ttl) };
    }
    // SAFETY: raw is live (the request holds it)
    let poller = unsafe { &mut *raw };
    if parkable && !poller.done {
        // the head is rebuilt when it parks: a busy channel's poll is answered before
        poller.park = Some(Park {
            c: r.connection,
            head: Vec::new(),
            capacity: 0,
            start: (0, 0),
            write_handler: None,
        });
        // A client whose last message is recent (its If-Modified-Since) is on a busy
        // channel: it waits PARK_AFTER as an ordinary request first, and is most likely
        // answered before (a replay costs more CPU than that wait costs memory). Any
        // other poll is parked at once, from the event loop.
        let (since, _) = http::position(r);
        // SAFETY: nginx's cached time
        let now = nginx_sys::ngx_time();
        if since >= 0 && now - since <= (PARK_AFTER / 1000) as nginx_sys::time_t {
            r.read_event_handler = Some(waiting_read);
            // SAFETY: the read event has no timer of nginx's while the request waits
            unsafe { nginx_sys::ngx_add_timer((*r.connection).read, PARK_AFTER) };
        } else {
            // SAFETY: the request's connection, its write event unused while it waits
            unsafe { post_park(r.connection, poller) };
        }
    }
    Ok(DONE)
}

/// How long a poll from a busy channel waits as an ordinary request before it is parked.
const PARK_AFTER: ngx_msec_t = 1000;

/// Posts the parking on the connection's write event (the request may not be freed inside
/// its handler, nor inside nginx's request handler, which use it afterwards).
///
/// # Safety
/// `c` is the connection of the poller's waiting request.
unsafe fn post_park(c: *mut ngx_connection_t, poller: &mut LongPoller) {
    let Some(park) = poller.park.as_mut() else { return };
    let wev = (*c).write;
    park.write_handler = (*wev).handler;
    (*wev).handler = Some(park_posted);
    if (*wev).posted() == 0 {
        nginx_sys::ngx_post_event(wev, core::ptr::addr_of_mut!(nginx_sys::ngx_posted_events));
    }
}

/// The request's read handler while it waits to be parked: nginx's own check of the
/// client, and the parking timer.
extern "C" fn waiting_read(r: *mut ngx_http_request_t) {
    // SAFETY: nginx calls this with a live request
    unsafe {
        let c = (*r).connection;
        let rev = (*c).read;
        if (*rev).timedout() == 0 {
            return nginx_sys::ngx_http_test_reading(r);
        }
        (*rev).set_timedout(0);
        let slot = *(*r)
            .ctx
            .add(<crate::nginx::HttpPgPushModule as ngx::http::HttpModule>::module().ctx_index);
        if let Some(poller) = slot.cast::<LongPoller>().as_mut() {
            post_park(c, poller);
        }
    }
}

/// Posted on the connection's write event by [`subscribe`]: parks the poller if it still
/// waits.
extern "C" fn park_posted(wev: *mut ngx_event_t) {
    // SAFETY: the connection's data is still the request (nothing else ran on it), whose
    // module context slot holds the poller until the request is freed
    let poller = unsafe {
        let r = (*(*wev).data.cast::<ngx_connection_t>()).data.cast::<ngx_http_request_t>();
        let slot = *(*r)
            .ctx
            .add(<crate::nginx::HttpPgPushModule as ngx::http::HttpModule>::module().ctx_index);
        match slot.cast::<LongPoller>().as_mut() {
            Some(p) if p.r == r => p,
            _ => return,
        }
    };
    let Some(park) = poller.park.as_ref() else { return };
    // SAFETY: wev is live
    unsafe { (*wev).handler = park.write_handler };
    if poller.done {
        return;
    }
    // SAFETY: the request waits
    let Some((head, capacity)) = parked::head(unsafe { &*poller.r }) else {
        // it stays an ordinary held request
        poller.park = None;
        return;
    };
    let data = ptr::from_mut(poller).cast();
    // SAFETY: the request waits, outside its handler; the cleanup that would free the
    // poller with it is disarmed first: the poller is the connection's from now
    let start = unsafe {
        (*poller.cln).handler = None;
        parked::park(poller.r, data, parked_read, parked_write)
    };
    if let Some(park) = poller.park.as_mut() {
        (park.head, park.capacity, park.start) = (head, capacity, start);
    }
    poller.r = ptr::null_mut();
    poller.cln = ptr::null_mut();
    // the freed requests go back to the system in a moment
    worker::with(|w| w.after_burst());
}

/// Read events of a parked connection: the client going away ends the poller.
extern "C" fn parked_read(rev: *mut ngx_event_t) {
    // SAFETY: a parked connection's data is its poller
    let (c, poller) = unsafe {
        let c = (*rev).data.cast::<ngx_connection_t>();
        (c, &mut *(*c).data.cast::<LongPoller>())
    };
    let Some(park) = poller.park.as_mut() else { return };
    // SAFETY: c is parked
    if !unsafe { parked::read_client(c, &mut park.head, park.capacity) } {
        // SAFETY: the poller is the connection's, and goes with it
        unsafe { close_parked(c) };
    }
}

/// The ttl timer of a parked connection.
extern "C" fn parked_write(wev: *mut ngx_event_t) {
    // SAFETY: as in parked_read
    let poller =
        unsafe { &mut *(*(*wev).data.cast::<ngx_connection_t>()).data.cast::<LongPoller>() };
    // SAFETY: wev is live
    if unsafe { (*wev).timedout() } == 0 {
        return;
    }
    unsafe { (*wev).set_timedout(0) };
    poller.timed_out();
}

/// The client of a parked poller is gone: it leaves and the connection closes.
///
/// # Safety
/// `c` is a parked connection whose data is its poller.
unsafe fn close_parked(c: *mut ngx_connection_t) {
    let mut poller = Box::from_raw((*c).data.cast::<LongPoller>());
    if poller.joined {
        poller.joined = false;
        lifecycle::leave(SubKey::new(&mut *poller));
    }
    drop(poller);
    nginx_sys::ngx_http_close_connection(c);
}

/// Posted once a parked poller has its answer: replays its request.
extern "C" fn replay_posted(rev: *mut ngx_event_t) {
    // SAFETY: a parked connection's data is its poller, which has left its channels
    unsafe {
        let c = (*rev).data.cast::<ngx_connection_t>();
        let poller = Box::from_raw((*c).data.cast::<LongPoller>());
        let LongPoller { park, reply, .. } = *poller;
        match (park, reply) {
            (Some(park), Some(reply)) => parked::replay(c, park.head, Box::new(reply), park.start),
            _ => nginx_sys::ngx_http_close_connection(c),
        }
    }
}

/// The answer of a parked long-poll, for the request that replays it.
pub fn replayed(r: &mut ngx_http_request_t) -> Option<ngx_int_t> {
    let answer = parked::take(r)?.downcast::<Answer>().ok()?;
    Some(answer_request(r, http::loc_conf(r), *answer))
}

/// Keeps the poller with its request until the request is freed, and holds the request
/// until it is answered (the handler's NGX_DONE returns one count).
fn hold(r: &mut ngx_http_request_t, poller: Box<LongPoller>) -> Result<*mut LongPoller, ngx_int_t> {
    // SAFETY: the cleanup is allocated from the request pool and runs when it is freed
    let cln = unsafe { nginx_sys::ngx_http_cleanup_add(r, 0) };
    if cln.is_null() {
        return Err(nginx_sys::NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t);
    }
    let raw = Box::into_raw(poller);
    // SAFETY: cln is fresh; raw is ours until the cleanup takes it back
    unsafe {
        (*raw).cln = cln;
        (*cln).handler = Some(cleanup);
        (*cln).data = raw.cast();
        *r.ctx.add(<crate::nginx::HttpPgPushModule as ngx::http::HttpModule>::module().ctx_index) =
            raw.cast();
    }
    // SAFETY: r->main is the request itself
    unsafe { (*r.main).set_count((*r.main).count() + 1) };
    r.read_event_handler = Some(nginx_sys::ngx_http_test_reading);
    r.write_event_handler = Some(on_write);
    Ok(raw)
}

/// `polling`: answered at once. With a store and a position (`.bN`, a last event id, or
/// a time and tag), with the stored messages after it; else, or with none, `304`.
pub fn poll(
    r: &mut ngx_http_request_t,
    channels: Vec<(String, u32)>,
) -> Result<ngx_int_t, ngx_int_t> {
    let prefix = http::main_conf(r).channel_prefix().len();
    let ids: Vec<&str> = channels.iter().map(|(c, _)| c.get(prefix..).unwrap_or(c)).collect();
    super::polling::touch(r, &ids)?;
    let backtracks: Vec<u32> = channels.iter().map(|(_, b)| *b).collect();
    let since = lifecycle::resume_points(r, &backtracks);
    let asked: Vec<(String, Since)> =
        channels.iter().zip(since).filter_map(|((c, _), s)| s.map(|s| (c.clone(), s))).collect();
    if asked.is_empty() {
        return Ok(super::polling::not_modified(r));
    }
    let lcf = http::loc_conf(r);
    let poller = Box::new(LongPoller {
        r: ptr::from_mut(r),
        cln: ptr::null_mut(),
        lcf,
        sub: Subscription::default(),
        answer: Vec::new(),
        stamp: (0, 0),
        done: false,
        joined: false,
        reading: None,
        gap: false,
        park: None,
        reply: None,
    });
    let raw = hold(r, poller)?;
    let asked_ids: Vec<String> =
        asked.iter().map(|(c, _)| c.get(prefix..).unwrap_or(c).to_string()).collect();
    let done: worker::HistoryDone = Box::new(move |result| {
        // SAFETY: the cleanup drops this read before it frees the poller
        let poller = unsafe { &mut *raw };
        poller.reading = None;
        poller.polled(result, &asked_ids);
    });
    let id = match lifecycle::cached(&asked) {
        Some(lists) => worker::with(|w| w.answered(lists, done)),
        None => worker::with(|w| w.history(asked, done)),
    };
    // SAFETY: raw is live until the request's cleanup
    unsafe { (*raw).reading = id };
    Ok(DONE)
}

extern "C" fn cleanup(data: *mut c_void) {
    // SAFETY: data is the Box leaked in subscribe(); cleanups run once
    let mut poller = unsafe { Box::from_raw(data.cast::<LongPoller>()) };
    if let Some(id) = poller.reading.take() {
        worker::with(|w| drop(w.take_history(id)));
    }
    if !poller.joined {
        return;
    }
    // SAFETY: the key of this transport, leaving before it is freed
    lifecycle::leave(unsafe { SubKey::new(&mut *poller) });
}

/// The request's write handler while it waits: only the ttl timer wakes it.
extern "C" fn on_write(r: *mut ngx_http_request_t) {
    // SAFETY: the request is alive; its module context slot holds the poller
    let (wev, poller) = unsafe {
        let slot = *(*r)
            .ctx
            .add(<crate::nginx::HttpPgPushModule as ngx::http::HttpModule>::module().ctx_index);
        ((*(*r).connection).write, slot.cast::<LongPoller>().as_mut())
    };
    let Some(poller) = poller else { return };
    // SAFETY: the connection's write event
    if unsafe { (*wev).timedout() } == 0 {
        return;
    }
    unsafe { (*wev).set_timedout(0) };
    poller.timed_out();
}

impl LongPoller {
    fn timed_out(&mut self) {
        if self.done {
            return;
        }
        let with_body = http::cycle_main_conf().is_some_and(|m| m.timeout_with_body == 1);
        if with_body {
            let v = Values {
                text: b"Timed out",
                id: -3,
                time: "Thu, 01 Jan 1970 00:00:00 GMT",
                ..Values::default()
            };
            let body = Rc::from(self.render(&v));
            self.respond(200, &[body], None);
        } else {
            self.respond(304, &[], None);
        }
    }

    /// A polling request's history arrived: it answers with it, or `304`.
    fn polled(&mut self, result: Result<Vec<Vec<Stored>>, String>, ids: &[String]) {
        let lists = match result {
            Ok(lists) => lists,
            Err(why) => {
                ngx::ngx_log_error!(
                    nginx_sys::NGX_LOG_ERR,
                    // SAFETY: a waiting request is alive
                    unsafe { (*(*self.r).connection).log },
                    "pgpush: no history for a polling request: {}",
                    why
                );
                Vec::new()
            }
        };
        for (id, list) in ids.iter().zip(lists) {
            for m in list {
                let time = lifecycle::stored_time(&m);
                self.gap |= m.offset == crate::postgres::store::GAP_OFFSET;
                let v = lifecycle::stored_values(&m, id, &time);
                self.answer.push(Rc::from(self.render(&v)));
                if m.offset > 0 {
                    self.stamp = (m.second, m.tag.max(0) as u64);
                }
            }
        }
        if self.answer.is_empty() {
            self.done = true;
            // SAFETY: a waiting request is alive
            let r = unsafe { &mut *self.r };
            let rc = super::polling::not_modified(r);
            return finalize(r, rc);
        }
        let messages = std::mem::take(&mut self.answer);
        let stamp = self.stamp;
        self.respond(200, &messages, Some(stamp));
    }

    fn render(&self, v: &Values<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        match self.lcf.template.as_ref() {
            Some(t) if !t.is_identity() => t.render(v, &mut out),
            _ => out.extend_from_slice(v.text),
        }
        out
    }

    /// Answers, or, parked, keeps the answer for the replay and leaves its channels.
    fn respond(&mut self, status: u32, messages: &[Rc<[u8]>], stamp: Option<(i64, u64)>) {
        self.done = true;
        let answer = Answer { status, messages: messages.to_vec(), stamp, gap: self.gap };
        if !self.r.is_null() {
            // SAFETY: a waiting request is alive (its cleanup ends the poller)
            let r = unsafe { &mut *self.r };
            if self.park.is_some() {
                // the parking timer must not reach what follows on the connection
                // SAFETY: the request's connection
                unsafe {
                    let rev = (*r.connection).read;
                    if (*rev).timer_set() != 0 {
                        nginx_sys::ngx_del_timer(rev);
                    }
                }
            }
            let rc = answer_request(r, self.lcf, answer);
            return finalize(r, rc);
        }
        let Some(park) = self.park.as_ref() else { return };
        let c = park.c;
        self.reply = Some(answer);
        if self.joined {
            self.joined = false;
            // SAFETY: the key of this live transport; it stays allocated until the replay
            lifecycle::leave(unsafe { SubKey::new(self) });
        }
        // SAFETY: c is parked; its ttl timer must not reach the replayed request
        unsafe {
            if (*(*c).write).timer_set() != 0 {
                nginx_sys::ngx_del_timer((*c).write);
            }
            if crate::nginx::worker::exiting() {
                // a worker that shuts down may exit before it runs posted events: the
                // replay runs now, and frees this poller (nothing may touch self after)
                return replay_posted((*c).read);
            }
            parked::post(c, replay_posted);
        }
    }
}

/// Answers: the header and footer templates around the messages, JSONP with `?callback=`;
/// `304` has no body. A message's time and tag are its `Last-Modified` and `Etag`, else
/// now and `W/0`. Returns what to finalize the request with.
fn answer_request(r: &mut ngx_http_request_t, lcf: &LocConf, answer: Answer) -> ngx_int_t {
    let Answer { status, messages, stamp, gap } = answer;
    let mut body = Vec::new();
    if status != 304 {
        let callback = http::arg(r, b"callback");
        body.extend_from_slice(lcf.header_template.as_bytes());
        match &callback {
            Some(cb) => {
                body.extend_from_slice(cb);
                body.extend_from_slice(b"([");
                for (k, m) in messages.iter().enumerate() {
                    if k > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(m);
                }
                body.extend_from_slice(b"]);");
            }
            None => messages.iter().for_each(|m| body.extend_from_slice(m)),
        }
        body.extend_from_slice(lcf.footer_template.as_bytes());
        if callback.is_some() {
            http::set_javascript(r);
        }
    }
    if r.headers_out.content_type.len == 0 {
        // SAFETY: the request is alive
        unsafe { nginx_sys::ngx_http_set_content_type(r) };
    }
    let (sec, tag) = stamp.unwrap_or((nginx_sys::ngx_time() as i64, 0));
    r.headers_out.last_modified_time = sec as _;
    let etag = format!("W/{tag}");
    if gap && http::header_out(r, "X-Pgpush-Gap", "1").is_err() {
        return nginx_sys::NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
    }
    let headers = [
        ("Etag", etag.as_str()),
        ("Expires", "Thu, 01 Jan 1970 00:00:01 GMT"),
        ("Cache-Control", "no-cache, no-store, must-revalidate"),
    ];
    for (k, v) in headers {
        if http::header_out(r, k, v).is_err() {
            return nginx_sys::NGX_HTTP_INTERNAL_SERVER_ERROR as ngx_int_t;
        }
    }
    if status == 304 {
        http::send_header_only(r, 304)
    } else {
        http::send_unsized_body(r, status, &body)
    }
}

impl Transport for LongPoller {
    fn subscription(&mut self) -> &mut Subscription {
        &mut self.sub
    }

    fn ready(&mut self) {}

    fn accepts(&self) -> bool {
        !self.done
    }

    fn encoding(&self) -> Encoding {
        let identity = self.lcf.template.as_ref().map_or(true, |t| t.is_identity());
        let template = if identity { ptr::null() } else { ptr::from_ref(self.lcf).cast() };
        Encoding { kind: KIND, template }
    }

    fn encode(&self, message: &Values<'_>) -> Rc<[u8]> {
        Rc::from(self.render(message))
    }

    fn queue(&mut self, encoded: Rc<[u8]>, _channel: &str) {
        self.answer.push(encoded);
        self.stamp = lifecycle::current_stamp();
    }

    fn flush(&mut self) {
        if self.done || self.answer.is_empty() {
            return;
        }
        let messages = std::mem::take(&mut self.answer);
        let (sec, tag) = self.stamp;
        self.respond(200, &messages, (sec > 0).then_some((sec, tag)));
    }

    fn going_away(&mut self) {
        if !self.done {
            self.respond(304, &[], None);
        }
    }

    fn reply(&mut self, _rows: Vec<Reply>) {}

    /// The deleted message was its answer already.
    fn finish(&mut self) {}

    /// A long-poll's client polls again right after its answer.
    fn lingers(&self) -> bool {
        true
    }
}
