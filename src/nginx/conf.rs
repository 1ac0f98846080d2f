//! The directive table, its setters and the merged, typed configurations.
//!
//! Every directive goes through one setter, [`cmd_set`], which reads what to do from the
//! [`Spec`] that `ngx_command_t::post` points at. Typed values reuse nginx's own stock
//! slots (`ngx_conf_set_msec_slot` and friends), so `30s`, `1m` and `on` mean what they
//! mean everywhere else in nginx; their terse errors are reworded so that the `[emerg]`
//! names the directive and the value.

use core::ffi::{c_char, c_void, CStr};
use core::{mem, ptr};
use std::collections::BTreeSet;

use nginx_sys::{
    ngx_command_t, ngx_conf_t, ngx_flag_t, ngx_http_complex_value_t, ngx_http_request_t, ngx_int_t,
    ngx_msec_t, ngx_str_t, ngx_uint_t, time_t, NGX_CONF_NOARGS, NGX_CONF_TAKE1, NGX_CONF_TAKE12,
    NGX_CONF_TAKE2, NGX_CONF_UNSET, NGX_HTTP_LIF_CONF, NGX_HTTP_LOC_CONF, NGX_HTTP_LOC_CONF_OFFSET,
    NGX_HTTP_MAIN_CONF, NGX_HTTP_MAIN_CONF_OFFSET, NGX_HTTP_SRV_CONF, NGX_LOG_EMERG, NGX_LOG_WARN,
};
use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::http::{HttpModuleMainConf, Merge, MergeConfigError};
use ngx::{ngx_conf_log_error, ngx_string};

use crate::config::conninfo::{self, ConnInfo};
use crate::config::values::{
    self, Padding, PublisherMode, Reconnect, Shown, SubscriberMode, ValueError,
};
use crate::nginx::HttpPgPushModule;
use crate::protocol::template::Template;

const NGX_CONF_UNSET_PTR: *mut ngx_http_complex_value_t = NGX_CONF_UNSET as isize as *mut _;
const NGX_CONF_UNSET_MSEC: ngx_msec_t = NGX_CONF_UNSET as ngx_msec_t;
const NGX_CONF_UNSET_UINT: ngx_uint_t = NGX_CONF_UNSET as ngx_uint_t;
const NGX_CONF_UNSET_SIZE: usize = NGX_CONF_UNSET as usize;

/// `push_stream_subscriber_output_limit`: a few dozen maximal NOTIFY payloads.
pub const DEFAULT_OUTPUT_LIMIT: usize = 256 * 1024;

/// An empty `ngx_str_t` (the stock str slot's "unset").
const NULL_STR: ngx_str_t = ngx_str_t { len: 0, data: ptr::null_mut() };

/// `http {}` level settings.
#[derive(Debug)]
pub struct MainConf {
    pub shared_memory_size: usize,
    pub shared_memory_name: Option<String>,
    pub channel_deleted_message_text: ngx_str_t,
    pub channel_inactivity_time: time_t,
    pub ping_message_text: ngx_str_t,
    pub timeout_with_body: ngx_flag_t,
    pub message_ttl: time_t,
    pub max_subscribers_per_channel: ngx_uint_t,
    pub max_messages_stored_per_channel: ngx_uint_t,
    pub max_channel_id_length: ngx_uint_t,
    pub max_number_of_channels: ngx_uint_t,
    pub max_number_of_wildcard_channels: ngx_uint_t,
    pub wildcard_channel_prefix: ngx_str_t,
    pub events_channel_id: ngx_str_t,

    pub postgres: Option<ConnInfo>,
    pub postgres_channel_prefix: ngx_str_t,
    pub postgres_reconnect: Option<Reconnect>,

    /// Some location subscribes or publishes: the module is in use in this configuration.
    pub has_push_locations: bool,
    /// Directives already warned about as having no effect yet (one line per name).
    warned: BTreeSet<&'static str>,
}

impl Default for MainConf {
    fn default() -> Self {
        Self {
            shared_memory_size: NGX_CONF_UNSET_SIZE,
            shared_memory_name: None,
            channel_deleted_message_text: NULL_STR,
            channel_inactivity_time: NGX_CONF_UNSET as time_t,
            ping_message_text: NULL_STR,
            timeout_with_body: NGX_CONF_UNSET as ngx_flag_t,
            message_ttl: NGX_CONF_UNSET as time_t,
            max_subscribers_per_channel: NGX_CONF_UNSET_UINT,
            max_messages_stored_per_channel: NGX_CONF_UNSET_UINT,
            max_channel_id_length: NGX_CONF_UNSET_UINT,
            max_number_of_channels: NGX_CONF_UNSET_UINT,
            max_number_of_wildcard_channels: NGX_CONF_UNSET_UINT,
            wildcard_channel_prefix: NULL_STR,
            events_channel_id: NULL_STR,
            postgres: None,
            postgres_channel_prefix: NULL_STR,
            postgres_reconnect: None,
            has_push_locations: false,
            warned: BTreeSet::new(),
        }
    }
}

impl MainConf {
    /// Applies push-stream's defaults to whatever the configuration left unset.
    pub fn init(&mut self) {
        // "unlimited" is the unset value itself for the limits, as in push-stream.
        init_str(&mut self.channel_deleted_message_text, "Channel deleted");
        init_str(&mut self.ping_message_text, "");
        init_str(&mut self.wildcard_channel_prefix, "");
        init_str(&mut self.events_channel_id, "");
        init_str(&mut self.postgres_channel_prefix, "");
        init(&mut self.channel_inactivity_time, NGX_CONF_UNSET as time_t, 30);
        init(&mut self.timeout_with_body, NGX_CONF_UNSET as ngx_flag_t, 0);
        init(&mut self.message_ttl, NGX_CONF_UNSET as time_t, 1800);
        if self.shared_memory_size == NGX_CONF_UNSET_SIZE {
            self.shared_memory_size = 32 * 1024 * 1024;
        }
        self.postgres_reconnect.get_or_insert_with(Reconnect::default);
    }

    /// `push_stream_postgres_channel_prefix` (checked to be UTF-8 by its setter).
    pub fn channel_prefix(&self) -> &str {
        core::str::from_utf8(self.postgres_channel_prefix.as_bytes()).unwrap_or_default()
    }

    /// A limit as `Some(n)`, or `None` when unlimited.
    pub fn limit(v: ngx_uint_t) -> Option<usize> {
        (v != NGX_CONF_UNSET_UINT).then_some(v)
    }
}

/// Where a directive was written, for errors detected after the block is parsed.
#[derive(Clone, Debug, Default)]
pub struct Position {
    pub file: String,
    pub line: ngx_uint_t,
}

impl Position {
    fn of(cf: &ngx_conf_t) -> Option<Self> {
        // SAFETY: conf_file is valid while a directive is being parsed
        let f = unsafe { cf.conf_file.as_ref()? };
        Some(Self { file: f.file.name.to_string(), line: f.line })
    }
}

/// `location` level settings (also settable at `http` and `server` level where push-stream
/// allows it).
#[derive(Debug)]
pub struct LocConf {
    pub subscriber: Option<SubscriberMode>,
    pub publisher: Option<PublisherMode>,
    pub channels_statistics: bool,
    /// Where the subscriber/publisher/statistics directive is, for the missing-path error.
    pub role_position: Option<(&'static str, Position)>,

    pub channels_path: *mut ngx_http_complex_value_t,
    pub store_messages: ngx_flag_t,
    pub channel_info_on_publish: ngx_flag_t,
    pub authorized_channels_only: ngx_flag_t,
    pub header_template: ngx_str_t,
    pub message_template: ngx_str_t,
    pub footer_template: ngx_str_t,
    pub wildcard_channel_max_qtd: ngx_uint_t,
    pub ping_message_interval: ngx_msec_t,
    pub subscriber_connection_ttl: ngx_msec_t,
    pub longpolling_connection_ttl: ngx_msec_t,
    pub websocket_allow_publish: ngx_flag_t,
    pub last_received_message_time: *mut ngx_http_complex_value_t,
    pub last_received_message_tag: *mut ngx_http_complex_value_t,
    pub last_event_id: *mut ngx_http_complex_value_t,
    pub user_agent: *mut ngx_http_complex_value_t,
    pub padding_by_user_agent: Option<Vec<Padding>>,
    pub allowed_origins: *mut ngx_http_complex_value_t,
    pub allow_connections_to_events_channel: ngx_flag_t,

    pub client_subscribed_request: *mut ngx_http_complex_value_t,
    pub client_unsubscribed_request: *mut ngx_http_complex_value_t,
    pub client_publish_request: *mut ngx_http_complex_value_t,

    pub postgres_on_subscribe: ngx_str_t,
    pub postgres_on_unsubscribe: ngx_str_t,
    pub postgres_on_publish: ngx_str_t,

    /// Unsent output a subscriber may hold before it is closed as too slow.
    pub subscriber_output_limit: usize,
    /// `message_template`, parsed once at merge.
    pub template: Option<Template>,
}

impl Default for LocConf {
    fn default() -> Self {
        Self {
            subscriber: None,
            publisher: None,
            channels_statistics: false,
            role_position: None,
            channels_path: NGX_CONF_UNSET_PTR,
            store_messages: NGX_CONF_UNSET as ngx_flag_t,
            channel_info_on_publish: NGX_CONF_UNSET as ngx_flag_t,
            authorized_channels_only: NGX_CONF_UNSET as ngx_flag_t,
            header_template: NULL_STR,
            message_template: NULL_STR,
            footer_template: NULL_STR,
            wildcard_channel_max_qtd: NGX_CONF_UNSET_UINT,
            ping_message_interval: NGX_CONF_UNSET_MSEC,
            subscriber_connection_ttl: NGX_CONF_UNSET_MSEC,
            longpolling_connection_ttl: NGX_CONF_UNSET_MSEC,
            websocket_allow_publish: NGX_CONF_UNSET as ngx_flag_t,
            last_received_message_time: NGX_CONF_UNSET_PTR,
            last_received_message_tag: NGX_CONF_UNSET_PTR,
            last_event_id: NGX_CONF_UNSET_PTR,
            user_agent: NGX_CONF_UNSET_PTR,
            padding_by_user_agent: None,
            allowed_origins: NGX_CONF_UNSET_PTR,
            allow_connections_to_events_channel: NGX_CONF_UNSET as ngx_flag_t,
            client_subscribed_request: NGX_CONF_UNSET_PTR,
            client_unsubscribed_request: NGX_CONF_UNSET_PTR,
            client_publish_request: NGX_CONF_UNSET_PTR,
            postgres_on_subscribe: NULL_STR,
            postgres_on_unsubscribe: NULL_STR,
            postgres_on_publish: NULL_STR,
            subscriber_output_limit: NGX_CONF_UNSET_SIZE,
            template: None,
        }
    }
}

impl Merge for LocConf {
    fn merge(&mut self, prev: &Self) -> Result<(), MergeConfigError> {
        merge_ptr(&mut self.channels_path, prev.channels_path);
        merge(&mut self.store_messages, prev.store_messages, NGX_CONF_UNSET as _, 0);
        merge(&mut self.channel_info_on_publish, prev.channel_info_on_publish, -1, 1);
        merge(&mut self.authorized_channels_only, prev.authorized_channels_only, -1, 0);
        merge_str(&mut self.header_template, prev.header_template, "");
        merge_str(&mut self.message_template, prev.message_template, "~text~");
        merge_str(&mut self.footer_template, prev.footer_template, "");
        merge(
            &mut self.wildcard_channel_max_qtd,
            prev.wildcard_channel_max_qtd,
            NGX_CONF_UNSET_UINT,
            NGX_CONF_UNSET_UINT,
        );
        merge(
            &mut self.ping_message_interval,
            prev.ping_message_interval,
            NGX_CONF_UNSET_MSEC,
            NGX_CONF_UNSET_MSEC,
        );
        merge(
            &mut self.subscriber_connection_ttl,
            prev.subscriber_connection_ttl,
            NGX_CONF_UNSET_MSEC,
            NGX_CONF_UNSET_MSEC,
        );
        merge(
            &mut self.longpolling_connection_ttl,
            prev.longpolling_connection_ttl,
            NGX_CONF_UNSET_MSEC,
            NGX_CONF_UNSET_MSEC,
        );
        merge(&mut self.websocket_allow_publish, prev.websocket_allow_publish, -1, 0);
        merge_ptr(&mut self.last_received_message_time, prev.last_received_message_time);
        merge_ptr(&mut self.last_received_message_tag, prev.last_received_message_tag);
        merge_ptr(&mut self.last_event_id, prev.last_event_id);
        merge_ptr(&mut self.user_agent, prev.user_agent);
        if self.padding_by_user_agent.is_none() {
            self.padding_by_user_agent.clone_from(&prev.padding_by_user_agent);
        }
        merge_ptr(&mut self.allowed_origins, prev.allowed_origins);
        merge(
            &mut self.allow_connections_to_events_channel,
            prev.allow_connections_to_events_channel,
            -1,
            0,
        );
        merge_ptr(&mut self.client_subscribed_request, prev.client_subscribed_request);
        merge_ptr(&mut self.client_unsubscribed_request, prev.client_unsubscribed_request);
        merge_ptr(&mut self.client_publish_request, prev.client_publish_request);
        merge_str(&mut self.postgres_on_subscribe, prev.postgres_on_subscribe, "");
        merge_str(&mut self.postgres_on_unsubscribe, prev.postgres_on_unsubscribe, "");
        merge_str(&mut self.postgres_on_publish, prev.postgres_on_publish, "");
        merge(
            &mut self.subscriber_output_limit,
            prev.subscriber_output_limit,
            NGX_CONF_UNSET_SIZE,
            DEFAULT_OUTPUT_LIMIT,
        );
        self.template = Some(Template::parse(self.message_template.as_bytes()));
        Ok(())
    }
}

fn merge<T: Copy + PartialEq>(v: &mut T, prev: T, unset: T, default: T) {
    if *v == unset {
        *v = if prev == unset { default } else { prev };
    }
}

fn init<T: Copy + PartialEq>(v: &mut T, unset: T, default: T) {
    if *v == unset {
        *v = default;
    }
}

fn merge_ptr<T>(v: &mut *mut T, prev: *mut T) {
    let unset = NGX_CONF_UNSET as isize as *mut T;
    if *v == unset {
        *v = if prev == unset { ptr::null_mut() } else { prev };
    }
}

fn merge_str(v: &mut ngx_str_t, prev: ngx_str_t, default: &'static str) {
    if v.data.is_null() {
        *v = if prev.data.is_null() { static_str(default) } else { prev };
    }
}

fn init_str(v: &mut ngx_str_t, default: &'static str) {
    if v.data.is_null() {
        *v = static_str(default);
    }
}

fn static_str(s: &'static str) -> ngx_str_t {
    // nginx never writes through a configuration string.
    ngx_str_t { len: s.len(), data: s.as_ptr().cast_mut() }
}

impl LocConf {
    /// Checks that need the merged location, reported at the directive that needs them.
    pub fn check(&self, cf: &mut ngx_conf_t) -> Result<(), ConfError> {
        if let Some((name, pos)) = &self.role_position {
            if self.channels_path.is_null() && !self.channels_statistics {
                emerg_at(
                    cf,
                    pos,
                    format_args!("\"push_stream_channels_path\" must be set for \"{name}\""),
                );
                return Err(ConfError::Logged);
            }
        }
        Ok(())
    }
}

fn emerg_at(cf: &mut ngx_conf_t, pos: &Position, msg: core::fmt::Arguments<'_>) {
    // SAFETY: cf->log is the configuration log
    ngx::ngx_log_error!(NGX_LOG_EMERG, cf.log, "{} in {}:{}", msg, pos.file, pos.line);
}

/* the directive table */

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

/// A failed directive, turned into nginx's message by [`cmd_set`].
#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    #[error("is duplicate")]
    Duplicate,
    /// `invalid value "<value>" in "<directive>" directive, <reason>`
    #[error("invalid value \"{value}\": {reason}")]
    Invalid { value: String, reason: String },
    /// Already logged.
    #[error("failed")]
    Logged,
}

impl ConfError {
    fn invalid(value: &[u8], reason: impl ToString) -> Self {
        Self::Invalid { value: Shown(value).to_string(), reason: reason.to_string() }
    }
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
const NOT_YET: bool = false;
const READY: bool = true;

use Kind::{Complex, Custom, Flag};
const NUM_POS: Kind = Kind::Num { positive: true };
const MSEC_POS: Kind = Kind::Msec { positive: true };
const SEC: Kind = Kind::Sec { positive: false };
const SEC_POS: Kind = Kind::Sec { positive: true };
const STR: Kind = Kind::Str { nonempty: false };
const STR_NONEMPTY: Kind = Kind::Str { nonempty: true };

/// Every directive pgpush accepts: push-stream 0.6.0's, the fork's `*_request` hooks, and
/// our `push_stream_postgres*`. README.md's directive reference must list each one (t/00).
#[rustfmt::skip]
pub static mut NGX_HTTP_PGPUSH_COMMANDS: [ngx_command_t; 47] = [
    /* locations and their role */
    loc!("push_stream_channels_statistics", NGX_CONF_NOARGS, channels_statistics, Custom(set_channels_statistics), NOT_YET),
    loc!("push_stream_publisher", NGX_CONF_NOARGS | T1, publisher, Custom(set_publisher), READY),
    loc!("push_stream_subscriber", NGX_CONF_NOARGS | T1, subscriber, Custom(set_subscriber), READY),
    any_if!("push_stream_channels_path", T1, channels_path, Complex, READY),

    /* http-level settings */
    main!("push_stream_shared_memory_size", NGX_CONF_TAKE12, shared_memory_size, Custom(set_shared_memory_size), NOT_YET),
    main!("push_stream_channel_deleted_message_text", T1, channel_deleted_message_text, STR, NOT_YET),
    main!("push_stream_channel_inactivity_time", T1, channel_inactivity_time, SEC, NOT_YET),
    main!("push_stream_ping_message_text", T1, ping_message_text, STR, NOT_YET),
    main!("push_stream_timeout_with_body", T1, timeout_with_body, Flag, NOT_YET),
    main!("push_stream_message_ttl", T1, message_ttl, SEC_POS, NOT_YET),
    main!("push_stream_max_subscribers_per_channel", T1, max_subscribers_per_channel, NUM_POS, NOT_YET),
    main!("push_stream_max_messages_stored_per_channel", T1, max_messages_stored_per_channel, NUM_POS, NOT_YET),
    main!("push_stream_max_channel_id_length", T1, max_channel_id_length, NUM_POS, READY),
    main!("push_stream_max_number_of_channels", T1, max_number_of_channels, NUM_POS, NOT_YET),
    main!("push_stream_max_number_of_wildcard_channels", T1, max_number_of_wildcard_channels, NUM_POS, NOT_YET),
    main!("push_stream_wildcard_channel_prefix", T1, wildcard_channel_prefix, STR, NOT_YET),
    main!("push_stream_events_channel_id", T1, events_channel_id, STR, NOT_YET),

    /* per-location behaviour */
    any_if!("push_stream_store_messages", T1, store_messages, Flag, NOT_YET),
    any!("push_stream_channel_info_on_publish", T1, channel_info_on_publish, Flag, NOT_YET),
    any!("push_stream_authorized_channels_only", T1, authorized_channels_only, Flag, NOT_YET),
    any!("push_stream_header_template_file", T1, header_template, Custom(set_header_template_file), READY),
    any!("push_stream_header_template", T1, header_template, Custom(set_header_template), READY),
    any!("push_stream_message_template", T1, message_template, STR_NONEMPTY, READY),
    any!("push_stream_footer_template", T1, footer_template, STR, READY),
    any!("push_stream_wildcard_channel_max_qtd", T1, wildcard_channel_max_qtd, NUM_POS, NOT_YET),
    any!("push_stream_ping_message_interval", T1, ping_message_interval, MSEC_POS, READY),
    any!("push_stream_subscriber_connection_ttl", T1, subscriber_connection_ttl, MSEC_POS, READY),
    any!("push_stream_subscriber_output_limit", T1, subscriber_output_limit, Kind::Size, READY),
    any!("push_stream_longpolling_connection_ttl", T1, longpolling_connection_ttl, MSEC_POS, NOT_YET),
    any!("push_stream_websocket_allow_publish", T1, websocket_allow_publish, Flag, NOT_YET),
    any_if!("push_stream_last_received_message_time", T1, last_received_message_time, Complex, NOT_YET),
    any_if!("push_stream_last_received_message_tag", T1, last_received_message_tag, Complex, NOT_YET),
    any_if!("push_stream_last_event_id", T1, last_event_id, Complex, NOT_YET),
    any!("push_stream_user_agent", T1, user_agent, Complex, NOT_YET),
    any!("push_stream_padding_by_user_agent", T1, padding_by_user_agent, Custom(set_padding_by_user_agent), NOT_YET),
    any!("push_stream_allowed_origins", T1, allowed_origins, Complex, NOT_YET),
    any_if!("push_stream_allow_connections_to_events_channel", T1, allow_connections_to_events_channel, Flag, NOT_YET),

    /* the fork's hooks: a subrequest to this URI on each event */
    any!("push_stream_client_subscribed_request", T1, client_subscribed_request, Complex, NOT_YET),
    any!("push_stream_client_unsubscribed_request", T1, client_unsubscribed_request, Complex, NOT_YET),
    any!("push_stream_client_publish_request", T1, client_publish_request, Complex, NOT_YET),

    /* PostgreSQL */
    main!("push_stream_postgres", T1, postgres, Custom(set_postgres), READY),
    main!("push_stream_postgres_channel_prefix", T1, postgres_channel_prefix, Custom(set_postgres_channel_prefix), READY),
    main!("push_stream_postgres_reconnect", NGX_CONF_TAKE2, postgres_reconnect, Custom(set_postgres_reconnect), READY),
    any!("push_stream_postgres_on_subscribe", T1, postgres_on_subscribe, STR_NONEMPTY, NOT_YET),
    any!("push_stream_postgres_on_unsubscribe", T1, postgres_on_unsubscribe, STR_NONEMPTY, NOT_YET),
    any!("push_stream_postgres_on_publish", T1, postgres_on_publish, STR_NONEMPTY, NOT_YET),
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
    if positive && *field == 0 {
        return Err(ConfError::invalid(&value, "it must be greater than zero"));
    }
    if let Kind::Str { nonempty: true } = spec.kind {
        if value.is_empty() {
            return Err(ConfError::invalid(&value, "it must not be empty"));
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
            ConfError::invalid(v.as_bytes(), format!("it must be one of: {accepted}"))
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
    )?;
    // SAFETY: set_role just stored the mode in this field
    let mode = unsafe { (*field.cast::<Option<SubscriberMode>>()).unwrap_or_default() };
    if mode != SubscriberMode::WebSocket {
        ngx_conf_log_error!(
            NGX_LOG_WARN,
            cf,
            "\"push_stream_subscriber {}\" has no effect yet: only \"websocket\" is built, \
             other modes answer 501",
            mode.name()
        );
    }
    set_handler(cf, crate::nginx::subscriber::handler)
}

fn set_publisher(cf: &mut ngx_conf_t, field: *mut c_void) -> Result<(), ConfError> {
    set_role(
        cf,
        field,
        "push_stream_publisher",
        PublisherMode::ACCEPTED,
        PublisherMode::parse,
        PublisherMode::default(),
    )?;
    set_handler(cf, crate::nginx::publisher::handler)
}

/// Makes this location's content ours.
fn set_handler(
    cf: &mut ngx_conf_t,
    handler: extern "C" fn(*mut ngx_http_request_t) -> ngx_int_t,
) -> Result<(), ConfError> {
    use ngx::http::{HttpModuleLocationConf, NgxHttpCoreModule};
    let clcf = NgxHttpCoreModule::location_conf_mut(cf).ok_or(ConfError::Logged)?;
    clcf.handler = Some(handler);
    Ok(())
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
        return Err(ConfError::Duplicate);
    }
    let mut name = args(cf)[1];
    // SAFETY: resolves relative to the configuration prefix, allocating from cf->pool
    if unsafe { nginx_sys::ngx_conf_full_name(cf.cycle, &mut name, 1) } != 0 {
        return Err(ConfError::Logged);
    }
    let path = name.to_string();
    let content = std::fs::read(&path).map_err(|e| ConfError::invalid(path.as_bytes(), e))?;
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
    *slot =
        Some(values::padding_by_user_agent(s).map_err(|e| ConfError::invalid(v.as_bytes(), e))?);
    Ok(())
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
