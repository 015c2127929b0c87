//! What every Stowage process shares: configuration, authentication, the server bootstrap
//! (health, reflection, grpc-web, CORS, graceful shutdown), logs, Redis, background tasks and
//! the clients services use to call each other.

pub mod auth;
pub mod config;
pub mod incoming;
pub mod mesh;
pub mod paging;
pub mod redis;
pub mod server;
pub mod signing;
pub mod status;
pub mod tasks;
pub mod telemetry;
pub mod time;
pub mod validate;

pub use auth::{Identity, Minter, Verifier, identity};
pub use config::Config;
pub use server::{DegradedProbe, Dependency, GrpcServer};
pub use tasks::Background;
