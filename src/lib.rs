//! wsgate: a frame-aware WebSocket edge gateway.
//!
//! # Layout
//! - [`config`]: YAML → validated, typed [`config::Config`] (errors with file:line:column
//!   and key path).
//! - [`listener`]: accept loop; one task per connection runs the HTTP/1.1 upgrade, the
//!   upstream handshake, the relay and the access-log line.
//! - [`handshake`]: route matching and the upgrade checks of SPEC §3 (pure).
//! - [`http_util`]: cookie and query-string lookup, removal and redaction, and `%XX`
//!   decoding, shared by admission, sticky keys, the admin API and the handshake (a leaf).
//! - [`upstream`]: backend pools (sticky rendezvous hashing, health, DNS, drain) and
//!   connecting to a backend, completing its handshake before the 101.
//! - [`relay`]: the frame-aware, unbuffered relay of SPEC §4/§5 ([`relay::frame`] parses
//!   and validates headers; [`relay::pump`] moves one direction's bytes).
//! - [`observe`]: the JSON access log, Prometheus metrics and tracing setup.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, `/connections`, backend drain
//!   (`/upstreams/...`).
//! - [`ops`]: the registry of live connections, drain and hot reload (SPEC §8).
//! - [`echo`]: the built-in demo echo upstream.
//! - [`ids`]: connection ids.
//! - [`log_budget`]: the shared rate limit on pre-HTTP failure warnings (a leaf).
//! - [`fuzzing`]: entry points for the fuzz targets and their corpus replay.

pub mod admin;
pub mod admission;
pub mod config;
pub mod echo;
pub mod fuzzing;
pub mod gateway;
pub mod handshake;
pub mod http_util;
pub mod ids;
pub mod listener;
pub mod log_budget;
pub mod observe;
pub mod ops;
pub mod outcome;
pub mod relay;
pub mod shared;
pub mod tls;
pub mod upstream;

pub use gateway::{Gateway, StartError, start, start_with};
pub use shared::Shared;
