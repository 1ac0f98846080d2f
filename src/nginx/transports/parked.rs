//! Parking a waiting request: its request is freed and only the bare connection is kept,
//! with the request head rebuilt from what nginx parsed; when the answer is known, the head
//! is fed back to nginx on the same connection as a new request, which goes through the
//! location again (access checks, headers, filters, the access log) and is answered by the
//! content handler from what was kept for it here.
//!
//! A held HTTP/1.x request costs about 10 KB (its pool, header buffer and variables); a
//! parked one costs its connection's small pool and the head. Only what can be replayed
//! exactly is parked: a main GET without a body over plain HTTP/1.x, whose head fits in the
//! connection's header buffer, on a connection whose pool nothing else has registered a
//! cleanup with. Anything else stays an ordinary held request.
//!
//! Replaying starts the connection afresh, as nginx does at accept: a new connection pool
//! (the old one holds the previous request's connection-level allocations, which would
//! otherwise pile up poll after poll) and `ngx_http_init_connection`, with the connection's
//! `recv` answering the rebuilt head once before it reads the socket again.

use core::ffi::c_void;
use core::ptr;
use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;

use nginx_sys::{
    ngx_connection_t, ngx_event_t, ngx_http_request_t, ngx_log_t, ngx_posted_events, ngx_recv_pt,
    NGX_HTTP_GET,
};

/// What a replay hands its request: the answer, and when the parked request started.
struct Replay {
    head: Vec<u8>,
    recv: ngx_recv_pt,
    answer: Option<Box<dyn Any>>,
    start: (nginx_sys::time_t, nginx_sys::ngx_msec_t),
}

thread_local! {
    /// Replays in flight, by connection.
    static REPLAYS: RefCell<HashMap<usize, Replay>> = RefCell::new(HashMap::new());
}

/// Whether the request is of a kind that can be parked (its head is rebuilt only when it
/// is, by [`head`]).
pub fn can_park(r: &ngx_http_request_t) -> bool {
    // SAFETY: a live request and its connection
    let c = unsafe { &*r.connection };
    let main = ptr::eq(r.main, r);
    let http1 = r.http_version == nginx_sys::NGX_HTTP_VERSION_10 as usize
        || r.http_version == nginx_sys::NGX_HTTP_VERSION_11 as usize;
    let body = r.headers_in.content_length_n > 0 || r.headers_in.chunked() != 0;
    let exiting = crate::nginx::worker::exiting();
    if !main
        || !http1
        || body
        || exiting
        || r.method != NGX_HTTP_GET as usize
        || !c.ssl.is_null()
        || !c.proxy_protocol.is_null()
        || c.buffer.is_null()
        || !ptr::eq(r.header_in, c.buffer)
        || !pool_is_plain(c)
    {
        return false;
    }
    true
}

/// The request's head as nginx parsed it, with the size of the header buffer it must fit
/// in, if the request can be parked.
pub fn head(r: &ngx_http_request_t) -> Option<(Vec<u8>, usize)> {
    if !can_park(r) {
        return None;
    }
    // SAFETY: a live request and its connection
    let c = unsafe { &*r.connection };
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(r.request_line.as_bytes());
    head.extend_from_slice(b"\r\n");
    // SAFETY: headers_in.headers is a list of ngx_table_elt_t for the request's life
    for (k, v) in unsafe { ngx::http::list_iterator(&r.headers_in.headers) } {
        head.extend_from_slice(k.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(v.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    // SAFETY: the header buffer: what the client sent after this request's head
    unsafe {
        let b = &*c.buffer;
        let rest = b.last.offset_from(b.pos);
        if rest > 0 {
            head.extend_from_slice(core::slice::from_raw_parts(b.pos, rest as usize));
        }
        let capacity = b.end.offset_from(b.start) as usize;
        head.shrink_to_fit();
        (head.len() <= capacity).then_some((head, capacity))
    }
}

/// Whether the connection pool holds nothing but what nginx's accept and HTTP init put
/// there (and this module's replay cleanup): no other cleanup, and no large block but the
/// header buffer.
fn pool_is_plain(c: &ngx_connection_t) -> bool {
    // SAFETY: the connection's pool and its lists
    unsafe {
        let pool = &*c.pool;
        let mut cln = pool.cleanup;
        while let Some(k) = cln.as_ref() {
            if k.handler.map(|h| h as *const () as usize) != Some(forget as *const () as usize) {
                return false;
            }
            cln = k.next;
        }
        let header = (*c.buffer).start.cast::<c_void>();
        let mut large = pool.large;
        while let Some(l) = large.as_ref() {
            if !l.alloc.is_null() && l.alloc != header {
                return false;
            }
            large = l.next;
        }
    }
    true
}

/// Frees the request and keeps its connection, driven from now by `on_read` and `on_write`
/// with `data` as the connection's data. The request is not logged: its replay is.
/// Returns the request's start time, for the replay.
///
/// # Safety
/// `r` is a live request that [`head`] accepted, not inside its handler, whose cleanups
/// no longer refer to anything that outlives it.
pub unsafe fn park(
    r: *mut ngx_http_request_t,
    data: *mut c_void,
    on_read: unsafe extern "C" fn(*mut ngx_event_t),
    on_write: unsafe extern "C" fn(*mut ngx_event_t),
) -> (nginx_sys::time_t, nginx_sys::ngx_msec_t) {
    let start = ((*r).start_sec, (*r).start_msec);
    (*r).set_logged(1);
    keep_connection(r, data, on_read, on_write, c"waiting for a message");
    start
}

/// Frees a request (logging it unless it is marked logged) and keeps its bare connection,
/// driven from now by `on_read` and `on_write` with `data` as its data; the request's
/// header buffer goes too.
///
/// # Safety
/// `r` is a live request, not inside its handler, whose cleanups no longer refer to
/// anything that outlives it.
pub unsafe fn keep_connection(
    r: *mut ngx_http_request_t,
    data: *mut c_void,
    on_read: unsafe extern "C" fn(*mut ngx_event_t),
    on_write: unsafe extern "C" fn(*mut ngx_event_t),
    action: &'static core::ffi::CStr,
) {
    let c = &mut *(*r).connection;
    nginx_sys::ngx_http_free_request(r, 0);
    // nginx marks the connection destroyed when it frees a request; it is not, it is ours
    c.set_destroyed(0);
    c.data = data;
    (*c.read).handler = Some(on_read);
    (*c.write).handler = Some(on_write);
    (*c.log).action = action.as_ptr().cast_mut();
    // the header buffer: a large allocation of the connection pool
    if let Some(b) = c.buffer.as_ref() {
        nginx_sys::ngx_pfree(c.pool, b.start.cast());
        c.buffer = ptr::null_mut();
    }
}

/// Reads what the client of a parked connection sends: pipelined bytes are kept after
/// the head, up to `capacity` in all. Returns false once the client is gone (or sent too
/// much).
///
/// # Safety
/// `c` is a parked connection.
pub unsafe fn read_client(c: *mut ngx_connection_t, head: &mut Vec<u8>, capacity: usize) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        let Some(recv) = (*c).recv else { return false };
        let n = recv(c, buf.as_mut_ptr(), buf.len());
        match n {
            n if n > 0 => {
                head.extend_from_slice(&buf[..n as usize]);
                if head.len() > capacity {
                    return false;
                }
            }
            n if n == nginx_sys::NGX_AGAIN as isize => {
                return nginx_sys::ngx_handle_read_event((*c).read, 0) == 0;
            }
            _ => return false,
        }
    }
}

/// Posts the replay of a parked connection: `handler` runs from the event loop, and calls
/// [`replay`].
///
/// # Safety
/// `c` is a parked connection.
pub unsafe fn post(c: *mut ngx_connection_t, handler: unsafe extern "C" fn(*mut ngx_event_t)) {
    let rev = (*c).read;
    (*rev).handler = Some(handler);
    if (*rev).posted() == 0 {
        nginx_sys::ngx_post_event(rev, ptr::addr_of_mut!(ngx_posted_events));
    }
}

/// Starts the connection afresh and feeds it `head`; the request it makes gets `answer`
/// from [`take`]. On failure the connection is closed.
///
/// # Safety
/// `c` is a parked connection whose data nothing refers to any more.
pub unsafe fn replay(
    c: *mut ngx_connection_t,
    head: Vec<u8>,
    answer: Box<dyn Any>,
    start: (nginx_sys::time_t, nginx_sys::ngx_msec_t),
) {
    let cc = &mut *c;
    if !fresh_pool(cc) {
        return nginx_sys::ngx_http_close_connection(c);
    }
    let cln = nginx_sys::ngx_pool_cleanup_add(cc.pool, 0);
    if cln.is_null() {
        return nginx_sys::ngx_http_close_connection(c);
    }
    (*cln).handler = Some(forget);
    (*cln).data = c.cast();
    let replay = Replay { head, recv: cc.recv, answer: Some(answer), start };
    REPLAYS.with(|m| m.borrow_mut().insert(c as usize, replay));
    cc.recv = Some(replay_recv);
    // the parked request and its replay are one request to keepalive_requests
    cc.requests = cc.requests.saturating_sub(1);
    cc.data = ptr::null_mut();
    cc.buffer = ptr::null_mut();
    (*cc.read).set_ready(1);
    nginx_sys::ngx_http_init_connection(c);
}

/// The answer kept for this request, if it is a replay; its start time becomes the
/// parked request's.
pub fn take(r: &mut ngx_http_request_t) -> Option<Box<dyn Any>> {
    if !ptr::eq(r.main, r) {
        return None;
    }
    let key = r.connection as usize;
    let replay = REPLAYS.with(|m| {
        let mut m = m.borrow_mut();
        let fed = m.get(&key).is_some_and(|rp| rp.head.is_empty());
        if fed {
            m.remove(&key)
        } else {
            None
        }
    })?;
    (r.start_sec, r.start_msec) = replay.start;
    replay.answer
}

/// A new pool for the connection, holding copies of what accept put in the old one (its
/// log, addresses); the old one is destroyed.
unsafe fn fresh_pool(c: &mut ngx_connection_t) -> bool {
    let old = c.pool;
    let pool = nginx_sys::ngx_create_pool((*c.listening).pool_size, c.log);
    if pool.is_null() {
        return false;
    }
    let copy = |src: *const u8, len: usize| -> *mut u8 {
        let dst = nginx_sys::ngx_pnalloc(pool, len.max(1)).cast::<u8>();
        if !dst.is_null() && len > 0 {
            ptr::copy_nonoverlapping(src, dst, len);
        }
        dst
    };
    let log = copy(c.log.cast(), size_of::<ngx_log_t>()).cast::<ngx_log_t>();
    let sockaddr = copy(c.sockaddr.cast(), c.socklen as usize);
    let text = copy(c.addr_text.data, c.addr_text.len);
    let local = if c.local_sockaddr.is_null() {
        ptr::null_mut()
    } else {
        copy(c.local_sockaddr.cast(), c.local_socklen as usize)
    };
    if log.is_null() || sockaddr.is_null() || text.is_null() {
        nginx_sys::ngx_destroy_pool(pool);
        return false;
    }
    (*log).data = ptr::null_mut();
    (*log).handler = None;
    c.log = log;
    (*c.read).log = log;
    (*c.write).log = log;
    (*pool).log = log;
    c.sockaddr = sockaddr.cast();
    c.addr_text.data = text;
    if !local.is_null() {
        c.local_sockaddr = local.cast();
    }
    c.pool = pool;
    nginx_sys::ngx_destroy_pool(old);
    true
}

/// The connection's `recv` during a replay: the head first, then the socket again.
unsafe extern "C" fn replay_recv(c: *mut ngx_connection_t, buf: *mut u8, size: usize) -> isize {
    let key = c as usize;
    let fed = REPLAYS.with(|m| {
        let mut m = m.borrow_mut();
        let rp = m.get_mut(&key)?;
        (*c).recv = rp.recv;
        let n = rp.head.len().min(size);
        ptr::copy_nonoverlapping(rp.head.as_ptr(), buf, n);
        rp.head.clear();
        Some(n as isize)
    });
    match fed {
        Some(n) => n,
        None => nginx_sys::NGX_ERROR as isize,
    }
}

/// The replay's cleanup: the connection closed (or started afresh) before its request
/// took the answer.
unsafe extern "C" fn forget(data: *mut c_void) {
    let key = data as usize;
    let gone = REPLAYS.with(|m| m.borrow_mut().remove(&key));
    drop(gone);
}
