//! Operations (SPEC §8) below the gateway: the registry of live connections (what drains
//! and `/connections` act on) and returning memory to the OS after bursts. Reload and
//! drain themselves are the gateway's.

pub mod memory;
pub mod registry;
