//! Stream definitions and the registry that maps them to running workers.

pub mod definition;
pub mod registry;

pub use definition::{StreamDefinition, StreamKey};
pub use registry::{Origin, Registry, StreamEntry, SubscribeFailure};
