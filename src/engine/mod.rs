//! The software HSM engine.
pub mod crypto;
pub mod secret;
