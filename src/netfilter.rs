//! Netfilter.
