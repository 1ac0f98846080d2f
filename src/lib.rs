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
// binary, so the unit-test harness and the fuzz targets (plain executables) leave it out.
#[cfg(not(any(test, fuzzing)))]
pub mod nginx;
