//! The typed configurations: `http {}` level ([`MainConf`]) and location level
//! ([`LocConf`]), their defaults, merge and post-merge checks. The directive table that
//! fills them is in [`directives`].

use core::ptr;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::sync::Arc;

use nginx_sys::{
    ngx_conf_t, ngx_flag_t, ngx_http_complex_value_t, ngx_msec_t, ngx_str_t, ngx_uint_t, time_t,
    NGX_CONF_UNSET, NGX_LOG_EMERG,
};
use ngx::http::{Merge, MergeConfigError};

use crate::config::conninfo::ConnInfo;
use crate::config::values::{Padding, PublisherMode, Reconnect, Shown, SubscriberMode};
use crate::protocol::template::Template;

pub mod directives;

pub use self::directives::NGX_HTTP_PGPUSH_COMMANDS;

pub(crate) const NGX_CONF_UNSET_PTR: *mut ngx_http_complex_value_t =
    NGX_CONF_UNSET as isize as *mut _;
pub(crate) const NGX_CONF_UNSET_MSEC: ngx_msec_t = NGX_CONF_UNSET as ngx_msec_t;
pub(crate) const NGX_CONF_UNSET_UINT: ngx_uint_t = NGX_CONF_UNSET as ngx_uint_t;
pub(crate) const NGX_CONF_UNSET_SIZE: usize = NGX_CONF_UNSET as usize;

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
    /// How long a publish waits for PostgreSQL while the connection is down.
    pub postgres_publish_timeout: ngx_msec_t,
    /// The store's schema (`push_stream_postgres_schema`).
    pub postgres_schema: ngx_str_t,
    /// Whether nginx installs the store's schema (`push_stream_postgres_schema_install`).
    pub postgres_schema_install: ngx_flag_t,
    /// One listening connection per node (`push_stream_postgres_node_listener`).
    pub postgres_node_listener: ngx_flag_t,
    /// Some location stores messages: the side connections use the store.
    pub store: bool,

    /// Some location subscribes or publishes: the module is in use in this configuration.
    pub has_push_locations: bool,
    /// Some location has SQL hooks: each worker opens a connection for them.
    pub has_sql_hooks: bool,
    /// Directives already warned about as having no effect yet (one line per name).
    pub(crate) warned: BTreeSet<&'static str>,
    /// The counter zone ([`crate::nginx::zone`]), when some location uses the module.
    pub zone: *mut nginx_sys::ngx_shm_zone_t,
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
            postgres_publish_timeout: NGX_CONF_UNSET_MSEC,
            postgres_schema: NULL_STR,
            postgres_schema_install: NGX_CONF_UNSET as ngx_flag_t,
            postgres_node_listener: NGX_CONF_UNSET as ngx_flag_t,
            store: false,
            has_push_locations: false,
            has_sql_hooks: false,
            warned: BTreeSet::new(),
            zone: ptr::null_mut(),
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
        init(&mut self.postgres_publish_timeout, NGX_CONF_UNSET_MSEC, 5000);
        init_str(&mut self.postgres_schema, "pgpush");
        init(&mut self.postgres_schema_install, NGX_CONF_UNSET as ngx_flag_t, 1);
        init(&mut self.postgres_node_listener, NGX_CONF_UNSET as ngx_flag_t, 0);
    }

    /// How the side connections use the store, when some location stores messages.
    pub fn store_config(&self) -> Option<crate::postgres::store::StoreConfig> {
        if !self.store {
            return None;
        }
        let ttl = std::time::Duration::from_secs(self.message_ttl.max(1) as u64);
        Some(crate::postgres::store::StoreConfig {
            schema: String::from_utf8_lossy(self.postgres_schema.as_bytes()).into_owned(),
            install: self.postgres_schema_install != 0,
            max_stored: Self::limit(self.max_messages_stored_per_channel).map(|n| n as i64),
            ttl,
            // often enough that expired rows are few, rarely enough to cost nothing
            clean_every: ttl
                .clamp(std::time::Duration::from_secs(1), std::time::Duration::from_secs(10)),
        })
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

/// What a location's checks need from the `http` level.
#[derive(Clone, Copy, Debug, Default)]
pub struct MainChecks {
    pub has_postgres: bool,
    pub has_wildcard_prefix: bool,
    pub max_wildcard_channels: Option<usize>,
}

/// Where a directive was written, for errors detected after the block is parsed.
#[derive(Clone, Debug, Default)]
pub struct Position {
    pub file: String,
    pub line: ngx_uint_t,
}

impl Position {
    pub(crate) fn of(cf: &ngx_conf_t) -> Option<Self> {
        // SAFETY: conf_file is valid while a directive is being parsed
        let f = unsafe { cf.conf_file.as_ref()? };
        Some(Self { file: f.file.name.to_string(), line: f.line })
    }
}

/// `push_stream_postgres_on_* "<sql>" [value ...]`.
#[derive(Debug)]
pub struct SqlHook {
    pub sql: Arc<str>,
    /// `$3`, `$4`...: values with variables, evaluated on the subscriber's request.
    pub values: Vec<*mut ngx_http_complex_value_t>,
    /// Where it was written, for the check that PostgreSQL is configured.
    pub position: Position,
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
    /// The rules' user-agent patterns, compiled (same order).
    pub padding_regex: Vec<*mut nginx_sys::ngx_regex_t>,
    pub allowed_origins: *mut ngx_http_complex_value_t,
    pub allow_connections_to_events_channel: ngx_flag_t,

    pub client_subscribed_request: *mut ngx_http_complex_value_t,
    pub client_unsubscribed_request: *mut ngx_http_complex_value_t,
    pub client_publish_request: *mut ngx_http_complex_value_t,

    pub postgres_on_subscribe: Option<Rc<SqlHook>>,
    pub postgres_on_unsubscribe: Option<Rc<SqlHook>>,
    pub postgres_on_publish: Option<Rc<SqlHook>>,

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
            padding_regex: Vec::new(),
            allowed_origins: NGX_CONF_UNSET_PTR,
            allow_connections_to_events_channel: NGX_CONF_UNSET as ngx_flag_t,
            client_subscribed_request: NGX_CONF_UNSET_PTR,
            client_unsubscribed_request: NGX_CONF_UNSET_PTR,
            client_publish_request: NGX_CONF_UNSET_PTR,
            postgres_on_subscribe: None,
            postgres_on_unsubscribe: None,
            postgres_on_publish: None,
            subscriber_output_limit: NGX_CONF_UNSET_SIZE,
            template: None,
        }
    }
}

impl Merge for LocConf {
    fn merge(&mut self, prev: &Self) -> Result<(), MergeConfigError> {
        // the role is inherited, as push-stream's location type is: an `if` block of a
        // subscriber location is a subscriber (nginx keeps the location's content handler);
        // a nested location gets no handler from it (see `has_own_role`)
        if !self.has_own_role() {
            self.subscriber = prev.subscriber;
            self.publisher = prev.publisher;
            self.channels_statistics = prev.channels_statistics;
            self.role_position.clone_from(&prev.role_position);
        }
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
            self.padding_regex.clone_from(&prev.padding_regex);
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
        for (v, prev) in [
            (&mut self.postgres_on_subscribe, &prev.postgres_on_subscribe),
            (&mut self.postgres_on_unsubscribe, &prev.postgres_on_unsubscribe),
            (&mut self.postgres_on_publish, &prev.postgres_on_publish),
        ] {
            if v.is_none() {
                v.clone_from(prev);
            }
        }
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
    /// Whether a role directive (subscriber, publisher, statistics) is written in this very
    /// block, before merging (after it, the inherited role counts too).
    pub fn has_own_role(&self) -> bool {
        self.subscriber.is_some() || self.publisher.is_some() || self.channels_statistics
    }

    /// The SQL hooks of this location.
    pub fn sql_hooks(&self) -> impl Iterator<Item = &SqlHook> {
        [&self.postgres_on_subscribe, &self.postgres_on_unsubscribe, &self.postgres_on_publish]
            .into_iter()
            .filter_map(|h| h.as_deref())
    }

    /// Whether a subscriber of this location runs any hook.
    pub fn has_hooks(&self) -> bool {
        self.sql_hooks().next().is_some()
            || !self.client_subscribed_request.is_null()
            || !self.client_unsubscribed_request.is_null()
            || !self.client_publish_request.is_null()
    }

    /// Checks that need the merged location, reported at the directive that needs them.
    pub fn check(&self, cf: &mut ngx_conf_t, main: &MainChecks) -> Result<(), ConfError> {
        let has_postgres = main.has_postgres;
        if !has_postgres {
            if let Some(h) = self.sql_hooks().next() {
                emerg_at(
                    cf,
                    &h.position,
                    format_args!("SQL hooks need \"push_stream_postgres\" in the http block"),
                );
                return Err(ConfError::Logged);
            }
        }
        if let Some((name, pos)) = &self.role_position {
            if self.channels_path.is_null() && !self.channels_statistics {
                // push-stream's wording, which its own setup specs look for
                emerg_at(
                    cf,
                    pos,
                    format_args!(
                        "push stream module: push_stream_channels_path must be set. (\"{name}\" \
                         needs it)"
                    ),
                );
                return Err(ConfError::Logged);
            }
        }
        if let Some(qtd) = MainConf::limit(self.wildcard_channel_max_qtd) {
            let problem = if !main.has_wildcard_prefix {
                Some("cannot set wildcard channel max qtd if push_stream_wildcard_channel_prefix is not set or blank")
            } else if main.max_wildcard_channels.is_some_and(|max| max < qtd) {
                Some("max number of wildcard channels cannot be smaller than value in push_stream_wildcard_channel_max_qtd")
            } else {
                None
            };
            if let Some(problem) = problem {
                ngx::ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{}", problem);
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
    pub(crate) fn invalid(value: &[u8], reason: impl ToString) -> Self {
        Self::Invalid { value: Shown(value).to_string(), reason: reason.to_string() }
    }
}
