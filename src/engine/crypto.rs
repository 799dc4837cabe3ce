//! Key types and cryptographic operations.
