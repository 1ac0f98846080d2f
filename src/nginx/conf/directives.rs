//! The directive table and its setters.
//!
//! Every directive goes through one setter, [`cmd_set`], which reads what to do from the
//! [`Spec`] that `ngx_command_t::post` points at. Typed values reuse nginx's own stock
//! slots (`ngx_conf_set_msec_slot` and friends), so `30s`, `1m` and `on` mean what they
//! mean everywhere else in nginx; their terse errors are reworded so that the `[emerg]`
//! names the directive and the value. Content handlers are not installed here: the
//! module's merge gives each location the handler of its role.

use core::ffi::{c_char, c_void, CStr};
use core::{mem, ptr};

use nginx_sys::{
    ngx_command_t, ngx_conf_t, ngx_http_complex_value_t, ngx_int_t, ngx_str_t, ngx_uint_t,
    NGX_CONF_1MORE, NGX_CONF_NOARGS, NGX_CONF_TAKE1, NGX_CONF_TAKE12, NGX_CONF_TAKE2,
    NGX_HTTP_LIF_CONF, NGX_HTTP_LOC_CONF, NGX_HTTP_LOC_CONF_OFFSET, NGX_HTTP_MAIN_CONF,
    NGX_HTTP_MAIN_CONF_OFFSET, NGX_HTTP_SRV_CONF, NGX_LOG_EMERG, NGX_LOG_WARN,
};
use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::http::HttpModuleMainConf;
use ngx::{ngx_conf_log_error, ngx_string};

use std::rc::Rc;
use std::sync::Arc;

use super::{ConfError, LocConf, MainConf, Position, SqlHook, NGX_CONF_UNSET_SIZE};
use crate::config::conninfo::{self, ConnInfo};
use crate::config::values::{self, Padding, PublisherMode, Reconnect, SubscriberMode, ValueError};
use crate::nginx::HttpPgPushModule;

/// How a directive's arguments are parsed and stored.
pub enum Kind {
    /// `on`/`off`, `ngx_flag_t`.
    Flag,
    /// A number, `ngx_uint_t`; `positive` rejects 0 as push-stream does.
    Num { positive: bool },
    /// A time in milliseconds, `ngx_msec_t`.
    Msec { positive: bool },
    /// A time in seconds, `time_t`.
    Sec { positive: bool },
    /// A size (`64k`, `1m`), `usize`.
    Size,
    /// A string, `ngx_str_t`.
    Str { nonempty: bool },
    /// A string with variables, `*mut ngx_http_complex_value_t`.
    Complex,
    /// Our own parser.
    Custom(fn(&mut ngx_conf_t, *mut c_void) -> Result<(), ConfError>),
}

/// What `ngx_command_t::post` points at.
pub struct Spec {
    pub kind: Kind,
    /// False while the behaviour behind the directive is not built: it is then accepted,
    /// checked, and reported with one `[warn] ... has no effect yet`.
    pub ready: bool,
}

macro_rules! directive {
    ($name:literal, $ctx:expr, $args:expr, $conf:expr, $off:expr, $kind:expr, $ready:expr) => {
        ngx_command_t {
            name: ngx_string!($name),
            type_: ($ctx | $args) as ngx_uint_t,
            set: Some(cmd_set),
            conf: $conf,
            offset: $off,
            post: {
                static SPEC: Spec = Spec { kind: $kind, ready: $ready };
                ptr::addr_of!(SPEC).cast_mut().cast()
            },
        }
    };
}

/// `http` only.
macro_rules! main {
    ($name:literal, $args:expr, $field:ident, $kind:expr, $ready:expr) => {
        directive!(
            $name,
            NGX_HTTP_MAIN_CONF,
            $args,
            NGX_HTTP_MAIN_CONF_OFFSET,
            mem::offset_of!(MainConf, $field),
            $kind,
            $ready
        )
    };
}

/// `http`, `server` and `location`.
macro_rules! any {
    ($name:literal, $args:expr, $field:ident, $kind:expr, $ready:expr) => {
        directive!(
            $name,
            NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF,
            $args,
            NGX_HTTP_LOC_CONF_OFFSET,
            mem::offset_of!(LocConf, $field),
            $kind,
            $ready
        )
    };
}

/// Like `any!`, and also inside `if` in a location.
macro_rules! any_if {
    ($name:literal, $args:expr, $field:ident, $kind:expr, $ready:expr) => {
        directive!(
            $name,
            NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF | NGX_HTTP_LIF_CONF,
            $args,
            NGX_HTTP_LOC_CONF_OFFSET,
            mem::offset_of!(LocConf, $field),
            $kind,
            $ready
        )
    };
}

/// `location` only.
macro_rules! loc {
    ($name:literal, $args:expr, $field:ident, $kind:expr, $ready:expr) => {
        directive!(
            $name,
            NGX_HTTP_LOC_CONF,
            $args,
            NGX_HTTP_LOC_CONF_OFFSET,
            mem::offset_of!(LocConf, $field),
            $kind,
            $ready
        )
    };
}

const T1: u32 = NGX_CONF_TAKE1;
const READY: bool = true;

use Kind::{Complex, Custom, Flag};
const NUM_POS: Kind = Kind::Num { positive: true };
const MSEC: Kind = Kind::Msec { positive: false };
const MSEC_POS: Kind = Kind::Msec { positive: true };
const SEC: Kind = Kind::Sec { positive: false };
const SEC_POS: Kind = Kind::Sec { positive: true };
const STR: Kind = Kind::Str { nonempty: false };
const STR_NONEMPTY: Kind = Kind::Str { nonempty: true };

/// Every directive pgpush accepts: push-stream 0.6.0's, the fork's `*_request` hooks, and
/// our `push_stream_postgres*`. README.md's directive reference must list each one (t/00).
#[rustfmt::skip]
pub static mut NGX_HTTP_PGPUSH_COMMANDS: [ngx_command_t; 51] = [
    /* locations and their role */
    loc!("push_stream_channels_statistics", NGX_CONF_NOARGS, channels_statistics, Custom(set_channels_statistics), READY),
    loc!("push_stream_publisher", NGX_CONF_NOARGS | T1, publisher, Custom(set_publisher), READY),
    loc!("push_stream_subscriber", NGX_CONF_NOARGS | T1, subscriber, Custom(set_subscriber), READY),
    any_if!("push_stream_channels_path", T1, channels_path, Complex, READY),

    /* http-level settings */
    main!("push_stream_shared_memory_size", NGX_CONF_TAKE12, shared_memory_size, Custom(set_shared_memory_size), READY),
    main!("push_stream_channel_deleted_message_text", T1, channel_deleted_message_text, STR, READY),
    main!("push_stream_channel_inactivity_time", T1, channel_inactivity_time, SEC, READY),
    main!("push_stream_ping_message_text", T1, ping_message_text, STR, READY),
    main!("push_stream_timeout_with_body", T1, timeout_with_body, Flag, READY),
    main!("push_stream_message_ttl", T1, message_ttl, SEC_POS, READY),
    main!("push_stream_max_subscribers_per_channel", T1, max_subscribers_per_channel, NUM_POS, READY),
    main!("push_stream_max_messages_stored_per_channel", T1, max_messages_stored_per_channel, NUM_POS, READY),
    main!("push_stream_max_channel_id_length", T1, max_channel_id_length, NUM_POS, READY),
    main!("push_stream_max_number_of_channels", T1, max_number_of_channels, NUM_POS, READY),
    main!("push_stream_max_number_of_wildcard_channels", T1, max_number_of_wildcard_channels, NUM_POS, READY),
    main!("push_stream_wildcard_channel_prefix", T1, wildcard_channel_prefix, STR, READY),
    main!("push_stream_events_channel_id", T1, events_channel_id, STR, READY),

    /* per-location behaviour */
    any_if!("push_stream_store_messages", T1, store_messages, Flag, READY),
    any!("push_stream_channel_info_on_publish", T1, channel_info_on_publish, Flag, READY),
    any!("push_stream_authorized_channels_only", T1, authorized_channels_only, Flag, READY),
    any!("push_stream_header_template_file", T1, header_template, Custom(set_header_template_file), READY),
    any!("push_stream_header_template", T1, header_template, Custom(set_header_template), READY),
    any!("push_stream_message_template", T1, message_template, STR_NONEMPTY, READY),
    any!("push_stream_footer_template", T1, footer_template, STR, READY),
    any!("push_stream_wildcard_channel_max_qtd", T1, wildcard_channel_max_qtd, NUM_POS, READY),
    any!("push_stream_ping_message_interval", T1, ping_message_interval, MSEC_POS, READY),
    any!("push_stream_subscriber_connection_ttl", T1, subscriber_connection_ttl, MSEC_POS, READY),
    any!("push_stream_subscriber_output_limit", T1, subscriber_output_limit, Kind::Size, READY),
    any!("push_stream_longpolling_connection_ttl", T1, longpolling_connection_ttl, MSEC_POS, READY),
    any!("push_stream_websocket_allow_publish", T1, websocket_allow_publish, Flag, READY),
    any_if!("push_stream_last_received_message_time", T1, last_received_message_time, Complex, READY),
    any_if!("push_stream_last_received_message_tag", T1, last_received_message_tag, Complex, READY),
    any_if!("push_stream_last_event_id", T1, last_event_id, Complex, READY),
    any!("push_stream_user_agent", T1, user_agent, Complex, READY),
    any!("push_stream_padding_by_user_agent", T1, padding_by_user_agent, Custom(set_padding_by_user_agent), READY),
    any!("push_stream_allowed_origins", T1, allowed_origins, Complex, READY),
    any_if!("push_stream_allow_connections_to_events_channel", T1, allow_connections_to_events_channel, Flag, READY),

    /* the fork's hooks: a subrequest to this URI on each event */
    any!("push_stream_client_subscribed_request", T1, client_subscribed_request, Complex, READY),
    any!("push_stream_client_unsubscribed_request", T1, client_unsubscribed_request, Complex, READY),
    any!("push_stream_client_publish_request", T1, client_publish_request, Complex, READY),

    /* PostgreSQL */
    main!("push_stream_postgres", T1, postgres, Custom(set_postgres), READY),
    main!("push_stream_postgres_channel_prefix", T1, postgres_channel_prefix, Custom(set_postgres_channel_prefix), READY),
    main!("push_stream_postgres_reconnect", NGX_CONF_TAKE2, postgres_reconnect, Custom(set_postgres_reconnect), READY),
    main!("push_stream_postgres_publish_timeout", T1, postgres_publish_timeout, MSEC, READY),
    main!("push_stream_postgres_schema", T1, postgres_schema, STR_NONEMPTY, READY),
    main!("push_stream_postgres_schema_install", T1, postgres_schema_install, Flag, READY),
    main!("push_stream_postgres_node_listener", T1, postgres_node_listener, Flag, READY),
    any!("push_stream_postgres_on_subscribe", NGX_CONF_1MORE, postgres_on_subscribe, Custom(set_sql_hook), READY),
    any!("push_stream_postgres_on_unsubscribe", NGX_CONF_1MORE, postgres_on_unsubscribe, Custom(set_sql_hook), READY),
    any!("push_stream_postgres_on_publish", NGX_CONF_1MORE, postgres_on_publish, Custom(set_sql_hook), READY),
    ngx_command_t::empty(),
];

/// The names of all directives, in table order.
pub fn directive_names() -> impl Iterator<Item = &'static str> {
    // SAFETY: the table is only written by nginx during module init; we read names only.
    let table = unsafe { &*ptr::addr_of!(NGX_HTTP_PGPUSH_COMMANDS) };
    table.iter().take_while(|c| !c.name.data.is_null()).map(|c| {
        // SAFETY: names are static ASCII literals
        unsafe { core::str::from_utf8_unchecked(c.name.as_bytes()) }
    })
}

/* the one setter */

extern "C" fn cmd_set(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes a valid cf and this module's command; post points at a Spec.
    let (cf, cmd) = unsafe { (&mut *cf, &*cmd) };
    let spec = unsafe { &*cmd.post.cast::<Spec>() };

    let result = set_value(cf, cmd, spec, conf);
    let name = String::from_utf8_lossy(cmd.name.as_bytes());
    match result {
        Ok(()) => {
            if !spec.ready {
                warn_not_yet(cf, cmd);
            }
            NGX_CONF_OK
        }
        Err(ConfError::Duplicate) => c"is duplicate".as_ptr().cast_mut(),
        Err(ConfError::Invalid { value, reason }) => {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "invalid value \"{}\" in \"{}\" directive, {}",
                value,
                name,
                reason
            );
            NGX_CONF_ERROR
        }
        Err(ConfError::Logged) => NGX_CONF_ERROR,
    }
}

fn warn_not_yet(cf: &mut ngx_conf_t, cmd: &ngx_command_t) {
    let Some(mcf) = HttpPgPushModule::main_conf_mut(cf) else {
        return;
    };
    // SAFETY: command names are static literals
    let name: &'static str = unsafe {
        core::str::from_utf8_unchecked(core::slice::from_raw_parts(cmd.name.data, cmd.name.len))
    };
    if mcf.warned.insert(name) {
        ngx_conf_log_error!(NGX_LOG_WARN, cf, "\"{}\" has no effect yet", name);
    }
}

fn set_value(
    cf: &mut ngx_conf_t,
    cmd: &ngx_command_t,
    spec: &Spec,
    conf: *mut c_void,
) -> Result<(), ConfError> {
    let value = args(cf).get(1).map(|s| s.as_bytes().to_vec()).unwrap_or_default();
    let stock: unsafe extern "C" fn(
        *mut ngx_conf_t,
        *mut ngx_command_t,
        *mut c_void,
    ) -> *mut c_char = match spec.kind {
        Kind::Flag => nginx_sys::ngx_conf_set_flag_slot,
        Kind::Num { .. } => nginx_sys::ngx_conf_set_num_slot,
        Kind::Msec { .. } => nginx_sys::ngx_conf_set_msec_slot,
        Kind::Sec { .. } => nginx_sys::ngx_conf_set_sec_slot,
        Kind::Size => nginx_sys::ngx_conf_set_size_slot,
        Kind::Str { .. } => nginx_sys::ngx_conf_set_str_slot,
        Kind::Complex => nginx_sys::ngx_http_set_complex_value_slot,
        Kind::Custom(f) => {
            // SAFETY: offset was computed with offset_of! on this conf's type
            let field = unsafe { conf.cast::<u8>().add(cmd.offset) }.cast();
            return f(cf, field);
        }
    };

    // The stock slots read `post` as an ngx_conf_post_t: hand them a copy without ours.
    let mut plain = ngx_command_t { post: ptr::null_mut(), ..*cmd };
    // SAFETY: the stock slot gets what nginx would give it
    let rv = unsafe { stock(cf, &mut plain, conf) };
    if rv == NGX_CONF_ERROR {
        return Err(ConfError::Logged);
    }
    if !rv.is_null() {
        // SAFETY: stock slots return static C strings
        let msg = unsafe { CStr::from_ptr(rv) }.to_bytes();
        return Err(match msg {
            b"is duplicate" => ConfError::Duplicate,
            _ => ConfError::invalid(&value, expected(&spec.kind)),
        });
    }

    // SAFETY: as above; Num/Msec/Sec/Size fields are all machine words
    let field = unsafe { &*conf.cast::<u8>().add(cmd.offset).cast::<isize>() };
    let positive = match spec.kind {
        Kind::Num { positive } | Kind::Msec { positive } | Kind::Sec { positive } => positive,
        Kind::Size => true,
        _ => false,
    };
    // push-stream's wording, which its own setup specs look for
    let name = String::from_utf8_lossy(cmd.name.as_bytes());
    if positive && *field == 0 {
        return Err(ConfError::invalid(&value, format!("{name} cannot be zero")));
    }
    if let Kind::Str { nonempty: true } = spec.kind {
        if value.is_empty() {
            return Err(ConfError::invalid(&value, format!("{name} cannot be blank")));
        }
    }
    Ok(())
}

fn expected(kind: &Kind) -> &'static str {
    match kind {
        Kind::Num { .. } => "it must be a number",
        Kind::Msec { .. } | Kind::Sec { .. } => {
            "it must be a time, e.g. \"500ms\", \"30s\", \"1m\""
        }
        Kind::Flag => "it must be \"on\" or \"off\"",
        Kind::Size => "it must be a size, e.g. \"256k\"",
        _ => "it cannot be parsed",
    }
}

fn args(cf: &ngx_conf_t) -> &[ngx_str_t] {
    // SAFETY: cf->args is an array of ngx_str_t while a directive is being parsed
    unsafe { cf.args.as_ref().map(|a| a.as_slice()).unwrap_or_default() }
}

/* custom setters: each gets a pointer to its own field */

fn set_role<T>(
    cf: &mut ngx_conf_t,
    field: *mut c_void,
    directive: &'static str,
    accepted: &str,
    parse: fn(&[u8]) -> Option<T>,
    default: T,
) -> Result<(), ConfError> {
    // SAFETY: the field is an Option<T> (see the table)
    let slot = unsafe { &mut *field.cast::<Option<T>>() };
    if slot.is_some() {
        return Err(ConfError::Duplicate);
    }
    let mode = match args(cf).get(1) {
        None => default,
        Some(v) => parse(v.as_bytes()).ok_or_else(|| {
            let shown = String::from_utf8_lossy(v.as_bytes());
            // push-stream's wording, which its own setup specs look for
            let reason =
                format!("invalid {directive} mode value: {shown}, accepted values ({accepted})");
            ConfError::invalid(v.as_bytes(), reason)
        })?,
    };
    *slot = Some(mode);
    mark_role(cf, directive)
}

/// Records where a role directive is (see [`LocConf::check`]) and flags the module in use.
fn mark_role(cf: &mut ngx_conf_t, directive: &'static str) -> Result<(), ConfError> {
    let pos = Position::of(cf).unwrap_or_default();
    // SAFETY: called from a location-level setter, loc conf is ours
    let lcf = unsafe { loc_conf_of(cf) };
    if let Some((other, _)) = lcf.role_position.replace((directive, pos)) {
        if other != directive {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "\"{}\" cannot be combined with \"{}\" in one location",
                directive,
                other
            );
            return Err(ConfError::Logged);
        }
    }
    if let Some(mcf) = HttpPgPushModule::main_conf_mut(cf) {
        mcf.has_push_locations = true;
    }
    Ok(())
}

/// The location configuration being parsed.
///
/// # Safety
/// Only from setters of location-level directives.
unsafe fn loc_conf_of(cf: &mut ngx_conf_t) -> &'static mut LocConf {
    use ngx::http::HttpModuleLocationConf;
    HttpPgPushModule::location_conf_mut(cf).expect("pgpush loc conf")
}

fn set_subscriber(cf: &mut ngx_conf_t, field: *mut c_void) -> Result<(), ConfError> {
    set_role(
        cf,
        field,
        "push_stream_subscriber",
        SubscriberMode::ACCEPTED,
        SubscriberMode::parse,
        SubscriberMode::default(),
    )
}

fn set_publisher(cf: &mut ngx_conf_t, field: *mut c_void) -> Result<(), ConfError> {
    set_role(
        cf,
        field,
        "push_stream_publisher",
        PublisherMode::ACCEPTED,
        PublisherMode::parse,
        PublisherMode::default(),
    )
}

fn set_channels_statistics(cf: &mut ngx_conf_t, field: *mut c_void) -> Result<(), ConfError> {
    // SAFETY: the field is a bool
    let slot = unsafe { &mut *field.cast::<bool>() };
    if *slot {
        return Err(ConfError::Duplicate);
    }
    *slot = true;
    mark_role(cf, "push_stream_channels_statistics")
}

fn set_shared_memory_size(cf: &mut ngx_conf_t, field: *mut c_void) -> Result<(), ConfError> {
    // SAFETY: the field is MainConf::shared_memory_size; the name follows in MainConf
    let size = unsafe { &mut *field.cast::<usize>() };
    if *size != NGX_CONF_UNSET_SIZE {
        return Err(ConfError::Duplicate);
    }
    let a = args(cf);
    let mut v = a[1];
    // SAFETY: ngx_parse_size only reads the string
    let n = unsafe { nginx_sys::ngx_parse_size(&mut v) };
    if n <= 0 {
        return Err(ConfError::invalid(a[1].as_bytes(), "it must be a size, e.g. \"32m\""));
    }
    // SAFETY: ngx_pagesize is set before the configuration is read
    let min = 32 * unsafe { nginx_sys::ngx_pagesize };
    if (n as usize) < min {
        // push-stream's wording, which its own setup specs look for
        let reason =
            format!("The push_stream_shared_memory_size value must be at least {}KiB", min >> 10);
        return Err(ConfError::invalid(a[1].as_bytes(), reason));
    }
    *size = n as usize;
    if let Some(name) = a.get(2) {
        let name = name.to_string();
        let mcf = HttpPgPushModule::main_conf_mut(cf).ok_or(ConfError::Logged)?;
        mcf.shared_memory_name = Some(name);
    }
    Ok(())
}

fn set_header_template(cf: &mut ngx_conf_t, field: *mut c_void) -> Result<(), ConfError> {
    // SAFETY: the field is an ngx_str_t
    let slot = unsafe { &mut *field.cast::<ngx_str_t>() };
    if !slot.data.is_null() {
        return Err(ConfError::Duplicate);
    }
    *slot = args(cf)[1];
    Ok(())
}

fn set_header_template_file(cf: &mut ngx_conf_t, field: *mut c_void) -> Result<(), ConfError> {
    // SAFETY: the field is an ngx_str_t, shared with push_stream_header_template
    let slot = unsafe { &mut *field.cast::<ngx_str_t>() };
    if !slot.data.is_null() {
        // push-stream's words
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "\"push_stream_header_template_file\" directive is duplicate or template set by \
             'push_stream_header_template'"
        );
        return Err(ConfError::Logged);
    }
    let mut name = args(cf)[1];
    // SAFETY: resolves relative to the configuration prefix, allocating from cf->pool
    if unsafe { nginx_sys::ngx_conf_full_name(cf.cycle, &mut name, 1) } != 0 {
        return Err(ConfError::Logged);
    }
    let path = name.to_string();
    let content = match std::fs::read(&path) {
        Ok(c) => c,
        Err(e) => {
            // push-stream's words, then why
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "push stream module: unable to open file \"{}\" for header template ({})",
                path,
                e
            );
            return Err(ConfError::Logged);
        }
    };
    let pool = cf.pool;
    // SAFETY: cf->pool outlives the configuration
    let data = unsafe { nginx_sys::ngx_pnalloc(pool, content.len().max(1)) }.cast::<u8>();
    if data.is_null() {
        return Err(ConfError::Logged);
    }
    // SAFETY: data has room for content
    unsafe { ptr::copy_nonoverlapping(content.as_ptr(), data, content.len()) };
    *slot = ngx_str_t { len: content.len(), data };
    Ok(())
}

fn set_padding_by_user_agent(cf: &mut ngx_conf_t, field: *mut c_void) -> Result<(), ConfError> {
    // SAFETY: the field is an Option<Vec<Padding>>
    let slot = unsafe { &mut *field.cast::<Option<Vec<Padding>>>() };
    if slot.is_some() {
        return Err(ConfError::Duplicate);
    }
    let v = args(cf)[1];
    let s = core::str::from_utf8(v.as_bytes())
        .map_err(|_| ConfError::invalid(v.as_bytes(), "it must be UTF-8"))?;
    let rules =
        values::padding_by_user_agent(s).map_err(|e| ConfError::invalid(v.as_bytes(), e))?;
    let mut compiled = Vec::with_capacity(rules.len());
    for rule in &rules {
        compiled.push(compile_regex(cf, &rule.user_agent)?);
    }
    *slot = Some(rules);
    // SAFETY: a location-level setter
    unsafe { loc_conf_of(cf) }.padding_regex = compiled;
    Ok(())
}

/// A user-agent pattern, compiled by nginx's PCRE wrapper in the configuration pool.
fn compile_regex(
    cf: &mut ngx_conf_t,
    pattern: &str,
) -> Result<*mut nginx_sys::ngx_regex_t, ConfError> {
    let mut errstr = [0u8; nginx_sys::NGX_MAX_CONF_ERRSTR as usize];
    // SAFETY: an all-zero compile request is nginx's own starting point
    let mut rc: nginx_sys::ngx_regex_compile_t = unsafe { core::mem::zeroed() };
    // SAFETY: configuration pool memory, as long-lived as the regex compiled from it
    let data = unsafe { nginx_sys::ngx_pnalloc(cf.pool, pattern.len().max(1)) }.cast::<u8>();
    if data.is_null() {
        return Err(ConfError::Logged);
    }
    // SAFETY: data has room for the pattern
    unsafe { ptr::copy_nonoverlapping(pattern.as_ptr(), data, pattern.len()) };
    rc.pattern = ngx_str_t { len: pattern.len(), data };
    rc.pool = cf.pool;
    rc.err = ngx_str_t { len: errstr.len(), data: errstr.as_mut_ptr() };
    // SAFETY: rc is filled as nginx expects
    if unsafe { nginx_sys::ngx_regex_compile(&mut rc) } != nginx_sys::NGX_OK as isize {
        let why = String::from_utf8_lossy(rc.err.as_bytes()).into_owned();
        return Err(ConfError::invalid(pattern.as_bytes(), why));
    }
    Ok(rc.regex)
}

fn set_postgres(cf: &mut ngx_conf_t, field: *mut c_void) -> Result<(), ConfError> {
    // SAFETY: the field is an Option<ConnInfo>
    let slot = unsafe { &mut *field.cast::<Option<ConnInfo>>() };
    if slot.is_some() {
        return Err(ConfError::Duplicate);
    }
    let v = args(cf)[1];
    let s = core::str::from_utf8(v.as_bytes())
        .map_err(|_| ConfError::invalid(b"(not UTF-8)", "it must be UTF-8"))?;
    let ci = conninfo::parse(s).map_err(|e| ConfError::Invalid {
        value: conninfo::mask_password(s),
        reason: e.to_string(),
    })?;
    *slot = Some(ci);
    Ok(())
}

fn set_postgres_channel_prefix(cf: &mut ngx_conf_t, field: *mut c_void) -> Result<(), ConfError> {
    // SAFETY: the field is an ngx_str_t
    let slot = unsafe { &mut *field.cast::<ngx_str_t>() };
    if !slot.data.is_null() {
        return Err(ConfError::Duplicate);
    }
    let v = args(cf)[1];
    values::channel_prefix(v.as_bytes()).map_err(|e| ConfError::invalid(v.as_bytes(), e))?;
    *slot = v;
    Ok(())
}

fn set_postgres_reconnect(cf: &mut ngx_conf_t, field: *mut c_void) -> Result<(), ConfError> {
    // SAFETY: the field is an Option<Reconnect>
    let slot = unsafe { &mut *field.cast::<Option<Reconnect>>() };
    if slot.is_some() {
        return Err(ConfError::Duplicate);
    }
    let a = args(cf);
    let mut ms = [core::time::Duration::ZERO; 2];
    for (i, d) in ms.iter_mut().enumerate() {
        let mut v = a[i + 1];
        // SAFETY: ngx_parse_time only reads the string
        let n: ngx_int_t = unsafe { nginx_sys::ngx_parse_time(&mut v, 0) };
        if n < 0 {
            return Err(ConfError::invalid(
                a[i + 1].as_bytes(),
                expected(&Kind::Msec { positive: true }),
            ));
        }
        *d = core::time::Duration::from_millis(n as u64);
    }
    let r = Reconnect::new(ms[0], ms[1]).map_err(|e: ValueError| {
        let shown = format!("{} {}", a[1], a[2]);
        ConfError::invalid(shown.as_bytes(), e)
    })?;
    *slot = Some(r);
    Ok(())
}

fn set_sql_hook(cf: &mut ngx_conf_t, field: *mut c_void) -> Result<(), ConfError> {
    // SAFETY: the field is an Option<Rc<SqlHook>>
    let slot = unsafe { &mut *field.cast::<Option<Rc<SqlHook>>>() };
    if slot.is_some() {
        return Err(ConfError::Duplicate);
    }
    let a = args(cf).to_vec();
    let sql = core::str::from_utf8(a[1].as_bytes())
        .map_err(|_| ConfError::invalid(a[1].as_bytes(), "it must be UTF-8"))?;
    if sql.trim().is_empty() {
        return Err(ConfError::invalid(a[1].as_bytes(), "it must not be empty"));
    }
    let mut values = Vec::new();
    for v in &a[2..] {
        values.push(compile_complex(cf, *v)?);
    }
    let position = Position::of(cf).unwrap_or_default();
    *slot = Some(Rc::new(SqlHook { sql: Arc::from(sql), values, position }));
    Ok(())
}

/// A value with variables, compiled into the configuration pool.
fn compile_complex(
    cf: &mut ngx_conf_t,
    mut value: ngx_str_t,
) -> Result<*mut ngx_http_complex_value_t, ConfError> {
    // SAFETY: pool memory for the compiled value, as the stock slot allocates it
    let cv = unsafe {
        nginx_sys::ngx_pcalloc(cf.pool, mem::size_of::<ngx_http_complex_value_t>())
            .cast::<ngx_http_complex_value_t>()
    };
    if cv.is_null() {
        return Err(ConfError::Logged);
    }
    // SAFETY: an all-zero compile request is nginx's own starting point
    let mut ccv: nginx_sys::ngx_http_compile_complex_value_t = unsafe { mem::zeroed() };
    ccv.cf = cf;
    ccv.value = &mut value;
    ccv.complex_value = cv;
    // SAFETY: ccv is filled as ngx_http_set_complex_value_slot fills it
    if unsafe { nginx_sys::ngx_http_compile_complex_value(&mut ccv) } != 0 {
        return Err(ConfError::Logged);
    }
    Ok(cv)
}
