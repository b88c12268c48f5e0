//! Operations: the worker's metrics and its `/metrics`, `/livez` and `/readyz` endpoint.
//!
//! - [`metrics`]: the registry and what the pipeline records in it.
//! - [`server`]: the HTTP endpoint on `ops.listen`.

pub mod metrics;
pub mod server;

pub use metrics::Metrics;
pub use server::serve;
