//! The PROXY protocol v1/v2 parser (read before TLS, from trusted proxies):
//! any bytes parse or are refused; a parsed header claims no more bytes than
//! it was given nor than the protocol allows, and parses the same from
//! exactly those bytes (what follows belongs to TLS and must not matter).
#![no_main]
use hsmgate::gateway::proxy_protocol::{parse, ParseError, V2_MAX};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok((header, len)) => {
            assert!(len <= data.len(), "claimed {len} of {} bytes", data.len());
            assert!(len <= V2_MAX, "header of {len} bytes");
            assert_eq!(parse(&data[..len]), Ok((header, len)), "{data:?}");
        }
        Err(ParseError::Incomplete) => {
            // More bytes may complete it; never more than the protocol's
            // longest header is waited for.
            assert!(data.len() < V2_MAX, "incomplete after {} bytes", data.len());
        }
        Err(_) => {}
    }
});
