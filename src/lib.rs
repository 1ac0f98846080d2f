//! pgpush: an nginx module that turns nginx into a push server fed by PostgreSQL
//! LISTEN/NOTIFY, accepting nginx-push-stream-module's configuration.
//!
//! Layout:
//! - [`config`]: pure parsers for directive values (unit-tested, no nginx);
//! - `nginx`: the module, directives and lifecycle (tested by `t/` against real nginx).

pub mod config;
pub mod counters;
pub mod hub;
pub mod postgres;
pub mod protocol;
pub mod recent;

// The nginx-facing layer links against nginx symbols that only exist inside an nginx
// binary, so the unit-test harness (which is a plain executable) leaves it out.
#[cfg(not(test))]
pub mod nginx;
