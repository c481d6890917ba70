//! Operations (SPEC §8): the registry of live connections, graceful drain on shutdown, and
//! hot reload on SIGHUP.

pub mod registry;
pub mod reload;
