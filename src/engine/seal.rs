//! How the store's key-encryption key (KEK) is obtained: the seal.
//!
//! Every record is sealed under the data master key; the master key is kept
//! only wrapped (AES-256-GCM) under the KEK, inside the store (see
//! [`super::store`]). The KEK comes from one of three places:
//!
//! - `auto`: the file `master.key` (mode 0600) beside the store. The engine
//!   opens by itself at start (the default; README walkthrough).
//! - `passphrase`: argon2id of an operator passphrase with the salt and
//!   parameters stored in the store's metadata. Nothing on disk opens the
//!   store; the engine starts `sealed` until the passphrase is supplied.
//! - `shamir`: a random KEK split M-of-N (Shamir over GF(256), the `blahaj`
//!   crate) at init; the shares are returned once and never stored. The
//!   engine starts `sealed` until M shares are supplied. Shares given so far
//!   live in memory only. A share is read as base64 or hex (Vault's
//!   `keys_base64` and `keys`).
//!
//! The rekey ([`Engine::rekey_seal`], [`Engine::rekey_verify`]) replaces the
//! passphrase or the split without touching the master key or any record.
use argon2::{Algorithm, Argon2, Params, Version};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::crypto;
use super::secret::{SecretBytes, SecretString};
use super::store::StoreError;
use super::{lock, read, write, Engine, EngineError, Principal, Role};

/// The seal mode chosen in config (`[engine] seal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SealMode {
    #[default]
    Auto,
    Passphrase,
    Shamir {
        threshold: u8,
        shares: u8,
    },
}

impl SealMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            SealMode::Auto => "auto",
            SealMode::Passphrase => "passphrase",
            SealMode::Shamir { .. } => "shamir",
        }
    }
}

/// Below this a passphrase is guessable offline even with argon2id.
pub const MIN_PASSPHRASE_LEN: usize = 12;
pub const MAX_PASSPHRASE_LEN: usize = 1024;

/// argon2id parameters for new passphrase seals: 64 MiB, 3 passes, 1 lane
/// (RFC 9106's second recommended option).
const ARGON2_M_COST_KIB: u32 = 64 * 1024;
const ARGON2_T_COST: u32 = 3;
const ARGON2_P_COST: u32 = 1;

/// What the store records about its seal (plaintext metadata, not secret).
/// The mode is also bound into the wrapped master key's associated data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SealParams {
    Auto,
    Passphrase {
        /// base64, 16 random bytes.
        salt: String,
        m_cost: u32,
        t_cost: u32,
        p_cost: u32,
    },
    Shamir {
        threshold: u8,
        shares: u8,
    },
}

impl SealParams {
    pub fn type_name(&self) -> &'static str {
        match self {
            SealParams::Auto => "auto",
            SealParams::Passphrase { .. } => "passphrase",
            SealParams::Shamir { .. } => "shamir",
        }
    }

    /// (threshold, shares) in Vault's seal-status terms.
    pub fn t_n(&self) -> (u8, u8) {
        match self {
            SealParams::Auto | SealParams::Passphrase { .. } => (1, 1),
            SealParams::Shamir { threshold, shares } => (*threshold, *shares),
        }
    }

    pub fn matches(&self, mode: &SealMode) -> bool {
        matches!(
            (self, mode),
            (SealParams::Auto, SealMode::Auto)
                | (SealParams::Passphrase { .. }, SealMode::Passphrase)
                | (SealParams::Shamir { .. }, SealMode::Shamir { .. })
        )
    }
}

pub fn validate_passphrase(passphrase: &str) -> Result<(), EngineError> {
    if passphrase.chars().count() < MIN_PASSPHRASE_LEN {
        return Err(EngineError::InvalidRequest(format!(
            "the unseal passphrase must be at least {MIN_PASSPHRASE_LEN} characters"
        )));
    }
    if passphrase.len() > MAX_PASSPHRASE_LEN {
        return Err(EngineError::InvalidRequest(format!(
            "the unseal passphrase must be at most {MAX_PASSPHRASE_LEN} bytes"
        )));
    }
    Ok(())
}

/// New passphrase parameters (fresh salt) and the KEK they give.
pub fn new_passphrase_seal(passphrase: &str) -> Result<(SealParams, SecretBytes), EngineError> {
    validate_passphrase(passphrase)?;
    let salt = crypto::random_bytes(16)?;
    let params = SealParams::Passphrase {
        salt: STANDARD.encode(&*salt),
        m_cost: ARGON2_M_COST_KIB,
        t_cost: ARGON2_T_COST,
        p_cost: ARGON2_P_COST,
    };
    let kek = passphrase_kek(&params, passphrase)?;
    Ok((params, kek))
}

/// argon2id(passphrase, salt) with the stored parameters: the KEK.
pub fn passphrase_kek(params: &SealParams, passphrase: &str) -> Result<SecretBytes, EngineError> {
    let SealParams::Passphrase {
        salt,
        m_cost,
        t_cost,
        p_cost,
    } = params
    else {
        return Err(EngineError::Internal("not a passphrase seal".into()));
    };
    if passphrase.len() > MAX_PASSPHRASE_LEN {
        return Err(EngineError::InvalidRequest(format!(
            "the unseal passphrase must be at most {MAX_PASSPHRASE_LEN} bytes"
        )));
    }
    let salt = STANDARD
        .decode(salt)
        .map_err(|_| EngineError::Internal("stored seal salt is not base64".into()))?;
    let params = Params::new(*m_cost, *t_cost, *p_cost, Some(32))
        .map_err(|e| EngineError::Internal(format!("stored argon2 parameters: {e}")))?;
    let mut out = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase.as_bytes(), &salt, &mut *out)
        .map_err(|e| EngineError::Internal(format!("argon2: {e}")))?;
    Ok(SecretBytes::from_slice(&*out))
}

/// A random KEK and its `shares` Shamir shares (base64), any `threshold` of
/// which rebuild it.
pub fn new_shamir_seal(
    threshold: u8,
    shares: u8,
) -> Result<(SealParams, SecretBytes, Vec<String>), EngineError> {
    if threshold < 2 || threshold > shares {
        return Err(EngineError::Internal(format!(
            "shamir threshold {threshold} of {shares} is not valid"
        )));
    }
    let kek = crypto::random_bytes(32)?;
    let dealer = blahaj::Sharks(threshold).dealer(&kek);
    let encoded = dealer
        .take(shares as usize)
        .map(|share| {
            let bytes = Zeroizing::new(Vec::<u8>::from(&share));
            STANDARD.encode(&*bytes)
        })
        .collect();
    Ok((
        SealParams::Shamir { threshold, shares },
        SecretBytes::from_slice(&kek),
        encoded,
    ))
}

/// Decodes one submitted share: `x || y`, 33 bytes for a 32-byte KEK, as
/// base64 (`keys_base64` from init) or hex (`keys`), both of which Vault's
/// unseal takes. 66 hex digits is hex; anything else must be base64 (the
/// lengths differ, so no share reads both ways).
pub fn decode_share(text: &str) -> Result<Zeroizing<Vec<u8>>, EngineError> {
    let text = text.trim();
    let decoded = if text.len() == 66 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(text).ok()
    } else {
        STANDARD.decode(text).ok()
    };
    let bytes = Zeroizing::new(decoded.ok_or_else(|| {
        EngineError::InvalidRequest(
            "an unseal share must be base64 (keys_base64 from init) or hex (keys)".into(),
        )
    })?);
    if bytes.len() != 33 || bytes[0] == 0 {
        return Err(EngineError::InvalidRequest(
            "an unseal share is 33 bytes (the share index, then 32 bytes); this one is not".into(),
        ));
    }
    Ok(bytes)
}

/// The hex form (Vault's `keys`) of base64 shares (`keys_base64`).
pub fn shares_hex(shares: &[String]) -> Vec<String> {
    shares
        .iter()
        .filter_map(|s| STANDARD.decode(s).ok().map(Zeroizing::new))
        .map(|b| hex::encode(&*b))
        .collect()
}

/// Rebuilds the KEK from `threshold` or more distinct shares. Wrong shares
/// rebuild a wrong KEK; only opening the wrapped master key tells.
pub fn combine_shares(
    threshold: u8,
    shares: &[Zeroizing<Vec<u8>>],
) -> Result<SecretBytes, EngineError> {
    let parsed: Vec<blahaj::Share> = shares
        .iter()
        .map(|s| blahaj::Share::try_from(s.as_slice()))
        .collect::<Result<_, _>>()
        .map_err(|e| EngineError::InvalidRequest(format!("unseal share: {e}")))?;
    let secret = Zeroizing::new(
        blahaj::Sharks(threshold)
            .recover(&parsed)
            .map_err(|e| EngineError::InvalidRequest(format!("unseal shares: {e}")))?,
    );
    Ok(SecretBytes::from_slice(&secret))
}

/// A rekey: the current unseal secret, and the new seal to wrap the same
/// master key under (`POST /v1/hsm/rekey`).
pub struct RekeyRequest {
    /// The current passphrase (one item), or at least the threshold of
    /// current shares (base64 or hex).
    pub current: Vec<SecretString>,
    /// Passphrase mode: the new passphrase.
    pub new_passphrase: Option<SecretString>,
    /// Shamir mode: the new split, M of N.
    pub new_threshold: Option<u8>,
    pub new_shares: Option<u8>,
}

/// What a rekey hands back once: the new shares in Shamir mode.
pub struct RekeyOutcome {
    pub seal_type: &'static str,
    pub threshold: u8,
    pub shares_total: u8,
    /// base64 shares (Vault's `keys_base64`); empty in passphrase mode.
    pub shares: Vec<String>,
    /// Shamir: the new split takes effect only once `threshold` of the new
    /// shares come back through [`Engine::rekey_verify`] (Vault's
    /// `require_verification`); until then the current shares stay valid.
    pub verification_required: bool,
}

/// The limits `[engine] shamir_threshold` / `shamir_shares` have in config.
const SHAMIR_RANGE: std::ops::RangeInclusive<u8> = 2..=16;

impl Engine {
    /// Rekey: the crypto officer replaces the unseal secret (a new
    /// passphrase, or a new M-of-N split) without changing the master key
    /// or any record. The current secret must be supplied and must rebuild
    /// the KEK that opened the store, so a stolen officer session alone can
    /// neither lock the operators out nor obtain a secret that opens a copy
    /// of the data dir. The new seal and the re-wrapped master key are one
    /// store transaction ([`super::store::Store::rekey`]). A wrong current
    /// secret is counted in `unseal_failures` and changes nothing.
    ///
    /// Passphrase mode takes effect at once (the officer typed the new
    /// passphrase). Shamir mode only begins: the new shares are returned
    /// and nothing is written until they come back through
    /// [`Engine::rekey_verify`], so shares lost on the way (a dropped
    /// response, a crash) cannot lock the store.
    pub fn rekey_seal(
        &self,
        by: &Principal,
        req: RekeyRequest,
    ) -> Result<RekeyOutcome, EngineError> {
        Engine::require(by, Role::CryptoOfficer)?;
        let params = {
            let inner = read(&self.inner);
            inner
                .active
                .as_ref()
                .ok_or(EngineError::NotActive(inner.state))?
                .store
                .seal_params()
        };
        // The slow part (argon2id, twice in passphrase mode) runs without
        // the state lock; the store re-checks the KEK under its own.
        let (current_kek, new_params, new_kek, shares) = match &params {
            SealParams::Auto => {
                return Err(EngineError::InvalidRequest(
                    "rekey needs seal = \"passphrase\" or \"shamir\"; in auto mode \
                     POST /v1/hsm/rotate-master-key replaces the key file"
                        .into(),
                ))
            }
            SealParams::Passphrase { .. } => {
                if req.new_threshold.is_some() || req.new_shares.is_some() {
                    return Err(EngineError::InvalidRequest(
                        "secret_threshold and secret_shares are for seal = \"shamir\"".into(),
                    ));
                }
                let [current] = req.current.as_slice() else {
                    return Err(EngineError::InvalidRequest(
                        "current_keys must hold exactly the current passphrase".into(),
                    ));
                };
                let new = req.new_passphrase.as_ref().ok_or_else(|| {
                    EngineError::InvalidRequest("rekey needs new_passphrase".into())
                })?;
                if new.expose_secret() == current.expose_secret() {
                    return Err(EngineError::InvalidRequest(
                        "the new passphrase must differ from the current one".into(),
                    ));
                }
                validate_passphrase(new.expose_secret())?;
                let current_kek = passphrase_kek(&params, current.expose_secret())?;
                let (new_params, new_kek) = new_passphrase_seal(new.expose_secret())?;
                (current_kek, new_params, new_kek, Vec::new())
            }
            SealParams::Shamir { threshold, .. } => {
                if req.new_passphrase.is_some() {
                    return Err(EngineError::InvalidRequest(
                        "new_passphrase is for seal = \"passphrase\"".into(),
                    ));
                }
                let (Some(t), Some(n)) = (req.new_threshold, req.new_shares) else {
                    return Err(EngineError::InvalidRequest(
                        "rekey needs secret_threshold and secret_shares".into(),
                    ));
                };
                if !SHAMIR_RANGE.contains(&t) || !SHAMIR_RANGE.contains(&n) || t > n {
                    return Err(EngineError::InvalidRequest(format!(
                        "secret_threshold {t} of secret_shares {n}: both must be 2 to 16 and \
                         the threshold at most the number of shares"
                    )));
                }
                let mut decoded: Vec<Zeroizing<Vec<u8>>> = Vec::with_capacity(req.current.len());
                for share in &req.current {
                    let share = decode_share(share.expose_secret())?;
                    if decoded.iter().any(|s| s[0] == share[0]) {
                        return Err(EngineError::InvalidRequest(
                            "current_keys holds two shares with the same index".into(),
                        ));
                    }
                    decoded.push(share);
                }
                if decoded.len() < *threshold as usize {
                    return Err(EngineError::InvalidRequest(format!(
                        "current_keys needs at least {threshold} current shares"
                    )));
                }
                let current_kek = combine_shares(*threshold, &decoded)?;
                let (new_params, new_kek, shares) = new_shamir_seal(t, n)?;
                (current_kek, new_params, new_kek, shares)
            }
        };
        // key_writes before the state lock (the order rotation uses), taken
        // only now so key writes never wait for argon2id; the store's own
        // key lock orders the rekey against a master-key rotation.
        let _serial = lock(&self.key_writes);
        let mut inner = write(&self.inner);
        let state = inner.state;
        let store = &inner
            .active
            .as_ref()
            .ok_or(EngineError::NotActive(state))?
            .store;
        let verification_required = matches!(new_params, SealParams::Shamir { .. });
        let done = if verification_required {
            store.rekey_begin(&current_kek, &new_kek, new_params.clone())
        } else {
            store.rekey(&current_kek, new_kek, new_params.clone())
        };
        match done {
            Ok(()) => {}
            Err(StoreError::WrongKek) => {
                inner.unseal_failures += 1;
                tracing::warn!(
                    user = %by.username,
                    failures = inner.unseal_failures,
                    "rekey refused: the current unseal secret is wrong"
                );
                return Err(EngineError::UnsealFailed(
                    "the current passphrase or shares do not open this store's key; \
                     nothing changed"
                        .into(),
                ));
            }
            Err(e) => return Err(e.into()),
        }
        let (threshold, shares_total) = new_params.t_n();
        let seal_type = new_params.type_name();
        if verification_required {
            tracing::warn!(
                user = %by.username,
                threshold,
                shares = shares_total,
                "rekey begun: new shares issued; the current ones stay valid until \
                 POST /v1/hsm/rekey/verify"
            );
        } else {
            inner.seal_params = Some(new_params);
            tracing::warn!(
                user = %by.username,
                seal = seal_type,
                "unseal secret rekeyed; the old one no longer opens the store"
            );
        }
        Ok(RekeyOutcome {
            seal_type,
            threshold,
            shares_total,
            shares,
            verification_required,
        })
    }

    /// Completes a Shamir rekey: at least the new threshold of the new
    /// shares (base64 or hex) must rebuild the new KEK, which must open the
    /// pending wrapped master key; then the new split replaces the current
    /// one in one store transaction. Wrong shares are counted in
    /// `unseal_failures` and leave the rekey pending.
    pub fn rekey_verify(
        &self,
        by: &Principal,
        shares: &[SecretString],
    ) -> Result<RekeyOutcome, EngineError> {
        Engine::require(by, Role::CryptoOfficer)?;
        let _serial = lock(&self.key_writes);
        let mut inner = write(&self.inner);
        let state = inner.state;
        let store = &inner
            .active
            .as_ref()
            .ok_or(EngineError::NotActive(state))?
            .store;
        let Some(SealParams::Shamir { threshold, .. }) = store.pending_rekey() else {
            return Err(EngineError::InvalidRequest(
                "no Shamir rekey is pending (POST /v1/hsm/rekey first; a restart, seal or \
                 master-key rotation drops a pending one)"
                    .into(),
            ));
        };
        let mut decoded: Vec<Zeroizing<Vec<u8>>> = Vec::with_capacity(shares.len());
        for share in shares {
            let share = decode_share(share.expose_secret())?;
            if decoded.iter().any(|s| s[0] == share[0]) {
                return Err(EngineError::InvalidRequest(
                    "keys holds two shares with the same index".into(),
                ));
            }
            decoded.push(share);
        }
        if decoded.len() < threshold as usize {
            return Err(EngineError::InvalidRequest(format!(
                "verification needs at least {threshold} of the new shares"
            )));
        }
        let kek = combine_shares(threshold, &decoded)?;
        let params = match store.rekey_commit(kek) {
            Ok(p) => p,
            Err(StoreError::WrongKek) => {
                inner.unseal_failures += 1;
                tracing::warn!(
                    user = %by.username,
                    failures = inner.unseal_failures,
                    "rekey verification refused: not the new shares"
                );
                return Err(EngineError::UnsealFailed(
                    "these are not the new shares; the rekey stays pending and the current \
                     shares stay valid"
                        .into(),
                ));
            }
            Err(StoreError::Meta(m)) => return Err(EngineError::InvalidRequest(m)),
            Err(e) => return Err(e.into()),
        };
        let (threshold, shares_total) = params.t_n();
        let seal_type = params.type_name();
        inner.seal_params = Some(params);
        tracing::warn!(
            user = %by.username,
            threshold,
            shares = shares_total,
            "rekey verified; the old shares no longer open the store"
        );
        Ok(RekeyOutcome {
            seal_type,
            threshold,
            shares_total,
            shares: Vec::new(),
            verification_required: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_threshold_shares_rebuild_the_kek_and_fewer_or_others_do_not() {
        let (_, kek, shares) = new_shamir_seal(3, 5).unwrap();
        let decoded: Vec<_> = shares.iter().map(|s| decode_share(s).unwrap()).collect();
        for pick in [[0, 1, 2], [4, 2, 0], [1, 3, 4]] {
            let chosen: Vec<_> = pick.iter().map(|i| decoded[*i].clone()).collect();
            let got = combine_shares(3, &chosen).unwrap();
            assert_eq!(got.expose_secret(), kek.expose_secret());
        }
        // Two shares are refused outright.
        assert!(combine_shares(3, &decoded[..2]).is_err());
        // Shares of another split rebuild something else.
        let (_, _, other) = new_shamir_seal(3, 5).unwrap();
        let mixed = vec![
            decoded[0].clone(),
            decoded[1].clone(),
            decode_share(&other[2]).unwrap(),
        ];
        let wrong = combine_shares(3, &mixed).unwrap();
        assert_ne!(wrong.expose_secret(), kek.expose_secret());
    }

    #[test]
    fn malformed_shares_are_refused() {
        assert!(decode_share("not base64!").is_err());
        assert!(decode_share(&STANDARD.encode([1u8; 10])).is_err());
        assert!(decode_share(&STANDARD.encode([0u8; 33])).is_err());
        assert!(decode_share(&STANDARD.encode([1u8; 33])).is_ok());
        // Hex: the right length with a non-hex digit, one digit short, one
        // too many, a zero index.
        let good = hex::encode([7u8; 33]);
        assert!(decode_share(&good).is_ok());
        assert!(decode_share(&format!("{}g", &good[..65])).is_err());
        assert!(decode_share(&good[..65]).is_err());
        assert!(decode_share(&format!("{good}0")).is_err());
        assert!(decode_share(&hex::encode([0u8; 33])).is_err());
    }

    #[test]
    fn a_share_reads_the_same_in_hex_and_base64() {
        let (_, kek, shares) = new_shamir_seal(2, 3).unwrap();
        let hexed = shares_hex(&shares);
        assert_eq!(hexed.len(), 3);
        for (b, h) in shares.iter().zip(&hexed) {
            assert_eq!(h.len(), 66);
            assert_eq!(*decode_share(b).unwrap(), *decode_share(h).unwrap());
            assert_eq!(
                *decode_share(&h.to_uppercase()).unwrap(),
                *decode_share(b).unwrap()
            );
        }
        // One share in each form rebuilds the KEK.
        let mixed = vec![
            decode_share(&shares[0]).unwrap(),
            decode_share(&hexed[2]).unwrap(),
        ];
        assert_eq!(
            combine_shares(2, &mixed).unwrap().expose_secret(),
            kek.expose_secret()
        );
    }

    #[test]
    fn the_passphrase_kek_depends_on_passphrase_and_salt() {
        let (params, kek) = new_passphrase_seal("a long operator passphrase").unwrap();
        let again = passphrase_kek(&params, "a long operator passphrase").unwrap();
        assert_eq!(kek.expose_secret(), again.expose_secret());
        let wrong = passphrase_kek(&params, "a long operator passphrasE").unwrap();
        assert_ne!(kek.expose_secret(), wrong.expose_secret());
        let (params2, _) = new_passphrase_seal("a long operator passphrase").unwrap();
        let other_salt = passphrase_kek(&params2, "a long operator passphrase").unwrap();
        assert_ne!(kek.expose_secret(), other_salt.expose_secret());
        assert!(new_passphrase_seal("short").is_err());
    }
}
