//! Stream definitions, the registry that maps them to running workers, and the MongoDB store
//! that shares admin-API definitions between instances.

pub mod definition;
pub mod registry;
pub mod store;

pub use definition::{StreamDefinition, StreamKey};
pub use registry::{Applied, Origin, Registry, Removed, Requester, StreamEntry, SubscribeFailure};
pub use store::{Put, Store, StoreError};
