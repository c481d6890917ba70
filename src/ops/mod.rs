//! Operations (SPEC §8): the registry of live connections, graceful drain on shutdown, hot
//! reload on SIGHUP, and returning memory to the OS after bursts.

pub mod memory;
pub mod registry;
pub mod reload;
