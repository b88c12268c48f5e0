//! The GaussDB (for MySQL) backup-encryption API: the signed HTTP client, its credential
//! providers, the pure signer, the region table.

pub mod client;
pub mod credentials;
pub mod regions;
pub mod signer;

pub use client::{Call, CallError, Client, ClientError, Exchange};
