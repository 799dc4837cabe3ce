//! `/v1/transit/...`: the Vault Transit secrets engine's HTTP API, for the
//! operations this engine supports. Field names, envelopes, `vault:vN:`
//! strings and status codes follow Vault, so Vault clients work unmodified.
//!
//! Bodies are read leniently, as Vault does: unknown fields are ignored and
//! numbers or booleans may arrive as strings. Wrongly typed fields are a 400.
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use serde_json::{json, Map, Value};

use super::{blocking, rfc3339, Call};
use crate::engine::crypto::{ExportKind, HashAlgorithm, KeyType, RsaPadding, SignOptions};
use crate::engine::keyring::{KeyConfigChange, KeyOptions, KeyRing};
use crate::engine::wrap::{ImportSource, Mechanism, OaepHash, Unwrap};
use crate::engine::{EngineError, Principal};
use crate::gateway::rescue::{self, ApiError};

/// Vault caps `transit/random` too; a bound keeps one call from asking for gigabytes.
const MAX_RANDOM_BYTES: usize = 128 * 1024;

pub async fn handle(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let route = &call.path["/v1/transit/".len()..];
    let segments: Vec<&str> = route.split('/').collect();
    let list = lists(call);
    let m = call.method.clone();
    match segments.as_slice() {
        ["keys"] | ["keys", ""] if list => list_keys(call),
        ["keys", name] if !name.is_empty() => match m {
            Method::POST | Method::PUT => create_key(call, name).await,
            Method::GET => read_key(call, name),
            Method::DELETE => delete_key(call, name).await,
            _ => Err(ApiError::MethodNotAllowed),
        },
        ["keys", name, "config"] => post(call, |c| configure_key(c, name)).await,
        ["keys", name, "rotate"] => post(call, |c| rotate_key(c, name)).await,
        ["keys", name, "trim"] => post(call, |c| trim_key(c, name)).await,
        ["keys", name, "import"] => post(call, |c| import_key(c, name)).await,
        ["keys", name, "import_version"] => post(call, |c| import_key_version(c, name)).await,
        ["keys", name, "wrap"] => post(call, |c| wrap_key(c, name)).await,
        ["keys", name, "unwrap"] => post(call, |c| unwrap_key(c, name)).await,
        ["wrapping_key"] => match m {
            Method::GET => wrapping_key(call).await,
            _ => Err(ApiError::MethodNotAllowed),
        },
        ["encrypt", name] => post(call, |c| async move { encrypt(c, name) }).await,
        ["decrypt", name] => post(call, |c| async move { decrypt(c, name) }).await,
        ["rewrap", name] => post(call, |c| async move { rewrap(c, name) }).await,
        ["datakey", kind, name] => post(call, |c| async move { datakey(c, kind, name) }).await,
        ["hash"] => post(call, |c| async move { hash(c, None) }).await,
        ["hash", alg] => post(call, |c| async move { hash(c, Some(alg)) }).await,
        ["export", kind, name] if call.method == Method::GET => export(call, kind, name, None),
        ["export", kind, name, version] if call.method == Method::GET => {
            export(call, kind, name, Some(version))
        }
        ["export", ..] => Err(ApiError::MethodNotAllowed),
        ["backup", name] if call.method == Method::GET => backup_key(call, name),
        ["backup", ..] => Err(ApiError::MethodNotAllowed),
        ["restore"] => post(call, |c| restore_key(c, None)).await,
        ["restore", name] => post(call, |c| restore_key(c, Some(name))).await,
        ["sign", name] => post(call, |c| async move { sign(c, name, None) }).await,
        ["sign", name, alg] => post(call, |c| async move { sign(c, name, Some(alg)) }).await,
        ["verify", name] => post(call, |c| async move { verify(c, name, None) }).await,
        ["verify", name, alg] => post(call, |c| async move { verify(c, name, Some(alg)) }).await,
        ["hmac", name] => post(call, |c| async move { hmac(c, name, None) }).await,
        ["hmac", name, alg] => post(call, |c| async move { hmac(c, name, Some(alg)) }).await,
        ["random"] => post(call, |c| async move { random(c, None) }).await,
        ["random", a] => post(call, |c| async move { random(c, Some(a)) }).await,
        // Vault's `random/:source/:bytes`; the source is always the OS RNG here.
        ["random", _source, b] => post(call, |c| async move { random(c, Some(b)) }).await,
        _ => Err(ApiError::NotFound),
    }
}

/// Whether the request is a list, as this handler reads it (also used by
/// the access-policy phase, so both read it the same way).
pub(crate) fn lists(call: &Call<'_>) -> bool {
    call.method.as_str() == "LIST"
        || (call.method == Method::GET && call.query_param("list").is_some_and(go_parse_bool))
}

/// Vault reads `?list=` with Go's `strconv.ParseBool`; hvac's `client.list()`
/// sends a Python bool, `list=True`.
fn go_parse_bool(v: &str) -> bool {
    matches!(v, "" | "1" | "t" | "T" | "true" | "TRUE" | "True")
}

async fn post<'c, F, Fut>(call: &'c Call<'c>, f: F) -> Result<Response<Full<Bytes>>, ApiError>
where
    F: FnOnce(&'c Call<'c>) -> Fut,
    Fut: std::future::Future<Output = Result<Response<Full<Bytes>>, ApiError>>,
{
    if call.method == Method::POST || call.method == Method::PUT {
        f(call).await
    } else {
        Err(ApiError::MethodNotAllowed)
    }
}

// ----- lenient body access ----------------------------------------------

struct Body(Map<String, Value>);

impl Body {
    fn parse(call: &Call<'_>) -> Result<Body, ApiError> {
        match call.json::<Value>()? {
            Value::Object(m) => Ok(Body(m)),
            _ => Err(ApiError::BadRequest(
                "the request body must be a JSON object".into(),
            )),
        }
    }

    fn from_item(v: &Value) -> Result<Body, String> {
        match v {
            Value::Object(m) => Ok(Body(m.clone())),
            _ => Err("each batch_input item must be a JSON object".into()),
        }
    }

    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn str(&self, k: &str) -> Result<Option<&str>, String> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("{k} must be a string")),
        }
    }

    fn bool(&self, k: &str) -> Result<Option<bool>, String> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if s == "true" || s == "1" => Ok(Some(true)),
            Some(Value::String(s)) if s == "false" || s == "0" || s.is_empty() => Ok(Some(false)),
            Some(_) => Err(format!("{k} must be a boolean")),
        }
    }

    fn u32(&self, k: &str) -> Result<Option<u32>, String> {
        let n = match self.get(k) {
            None => return Ok(None),
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) if s.is_empty() => return Ok(None),
            Some(Value::String(s)) => s.parse::<u64>().ok(),
            Some(_) => None,
        };
        n.and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| format!("{k} must be a non-negative integer"))
    }

    /// A Vault duration field (`TypeDurationSecond`) in whole seconds; see
    /// [`duration_seconds`].
    fn duration(&self, k: &str) -> Result<Option<u64>, String> {
        self.get(k).map(|v| duration_seconds(k, v)).transpose()
    }

    fn b64(&self, k: &str) -> Result<Option<Vec<u8>>, String> {
        match self.str(k)? {
            None => Ok(None),
            Some(s) => crate::engine::keyring::decode_b64(s.trim().as_bytes())
                .map(Some)
                .ok_or_else(|| format!("{k} is not valid base64")),
        }
    }

    fn batch(&self) -> Result<Option<&Vec<Value>>, String> {
        match self.get("batch_input") {
            None => Ok(None),
            Some(Value::Array(items)) if !items.is_empty() => Ok(Some(items)),
            Some(Value::Array(_)) => Err("batch_input must not be empty".into()),
            Some(_) => Err("batch_input must be a list".into()),
        }
    }
}

fn bad(msg: String) -> ApiError {
    ApiError::BadRequest(msg)
}

/// Vault's `TypeDurationSecond` (go-secure-stdlib `ParseDurationSecond`),
/// in whole seconds: a JSON integer of seconds, or a string that is empty
/// (0), an integer of seconds (`"3600"`), an integer of days (`"30d"`) or a
/// Go duration (`"1h"`, `"90m"`, `"1h30m"`, `"1.5h"`), truncated to the
/// second as Vault does. Anything else, a negative value, or more than Go's
/// `time.Duration` holds (about 292 years) is refused.
fn duration_seconds(k: &str, v: &Value) -> Result<u64, String> {
    const NANOS: i128 = 1_000_000_000;
    let malformed = || {
        format!(
            "{k} must be a duration: seconds (3600), days (\"30d\") or a Go duration \
             (\"1h\", \"90m\", \"1h30m\")"
        )
    };
    let nanos: i128 = match v {
        Value::Number(n) => i128::from(n.as_i64().ok_or_else(malformed)?) * NANOS,
        Value::String(s) if s.is_empty() => 0,
        Value::String(s) => {
            if let Ok(secs) = s.parse::<i64>() {
                i128::from(secs) * NANOS
            } else if let Some(days) = s.strip_suffix('d') {
                i128::from(days.parse::<i64>().map_err(|_| malformed())?) * 86_400 * NANOS
            } else {
                parse_go_duration(s).ok_or_else(malformed)?
            }
        }
        _ => return Err(malformed()),
    };
    if nanos.abs() > i128::from(i64::MAX) {
        return Err(format!("{k} is too large"));
    }
    // A negative period falls under Vault's "0 or at least an hour" rule.
    u64::try_from(nanos / NANOS).map_err(|_| {
        format!("auto rotate period must be 0 to disable or at least an hour; {k} is negative")
    })
}

/// Go's `time.ParseDuration`, in nanoseconds: an optional sign, then one or
/// more decimal numbers each with a unit (`ns`, `us`, `µs`, `μs`, `ms`,
/// `s`, `m`, `h`); `"0"` alone needs no unit. `None` for anything else.
fn parse_go_duration(s: &str) -> Option<i128> {
    let (negative, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let digits = |t: &str| t.bytes().take_while(u8::is_ascii_digit).count();
    let mut total: i128 = 0;
    while !rest.is_empty() {
        let (int, after) = rest.split_at(digits(rest));
        rest = after;
        let mut frac = "";
        if let Some(after) = rest.strip_prefix('.') {
            let (f, after) = after.split_at(digits(after));
            frac = f;
            rest = after;
        }
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        let unit_len = rest
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (unit, after) = rest.split_at(unit_len);
        rest = after;
        let scale: i128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        // More integer digits than an i64 holds overflow in Go too.
        let whole: i128 = if int.is_empty() {
            0
        } else {
            i128::from(int.parse::<i64>().ok()?)
        };
        let mut value = whole.checked_mul(scale)?;
        if !frac.is_empty() {
            // Digits past the 18th are below a nanosecond for every unit.
            let kept = &frac[..frac.len().min(18)];
            let f: i128 = kept.parse().ok()?;
            value += f * scale / 10i128.pow(kept.len() as u32);
        }
        total = total.checked_add(value)?;
        if total > i128::from(i64::MAX) {
            return None;
        }
    }
    Some(if negative { -total } else { total })
}

// ----- keys -----------------------------------------------------------

fn key_info(ring: &KeyRing) -> Result<Value, ApiError> {
    let mut keys = Map::new();
    for (v, kv) in &ring.versions {
        let entry = match kv.material.public_key().map_err(EngineError::from)? {
            Some(pk) => json!({
                "creation_time": rfc3339(kv.created),
                "name": pk.name,
                "public_key": pk.public_key,
            }),
            None => json!(kv.created),
        };
        keys.insert(v.to_string(), entry);
    }
    let t = ring.key_type;
    let mut info = json!({
        "name": ring.name,
        "type": t.as_str(),
        "keys": keys,
        "latest_version": ring.latest_version,
        "min_available_version": ring.min_available_version,
        "min_decryption_version": ring.min_decryption_version,
        "min_encryption_version": ring.min_encryption_version,
        "deletion_allowed": ring.deletion_allowed,
        "derived": ring.derived,
        "exportable": ring.exportable,
        "allow_plaintext_backup": ring.allow_plaintext_backup,
        "imported_key": ring.imported_key,
        "auto_rotate_period": ring.auto_rotate_period,
        "supports_encryption": t.supports_encryption(),
        "supports_decryption": t.supports_encryption(),
        "supports_derivation": t.supports_derivation(),
        "supports_signing": t.supports_signing(),
    });
    if ring.allow_wrap || ring.allow_unwrap {
        // hsmgate's key-encryption-key attributes (docs/TRANSIT.md).
        info["allow_wrap"] = json!(ring.allow_wrap);
        info["allow_unwrap"] = json!(ring.allow_unwrap);
    }
    if ring.imported_key {
        info["allow_rotation"] = json!(ring.allow_rotation);
    }
    if ring.derived {
        info["kdf"] = json!("hkdf_sha256");
        info["convergent_encryption"] = json!(ring.convergent_encryption);
        if ring.convergent_encryption {
            info["convergent_encryption_version"] = json!(3);
        }
    }
    Ok(info)
}

fn list_keys(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let names = call.engine().list_keys(&by)?;
    if names.is_empty() {
        // Vault answers an empty LIST with 404; clients expect it.
        return Err(ApiError::ObjectNotFound);
    }
    call.ok(json!({ "keys": names }))
}

async fn create_key(call: &Call<'_>, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let body = Body::parse(call)?;
    let opts = key_options(&body)?;
    // Checked before the blocking pool: a refusal costs no key generation.
    opts.validate()?;
    let name = name.to_string();
    let ring = blocking(call.engine(), move |e| e.create_key(&by, &name, &opts)).await?;
    call.ok(key_info(&ring)?)
}

/// The key options of a `keys/:name` create, an import or an unwrap.
fn key_options(body: &Body) -> Result<KeyOptions, ApiError> {
    let flag =
        |k: &str| -> Result<bool, ApiError> { Ok(body.bool(k).map_err(bad)?.unwrap_or(false)) };
    let key_type = KeyType::parse(body.str("type").map_err(bad)?.unwrap_or("aes256-gcm96"))
        .map_err(EngineError::from)?;
    Ok(KeyOptions {
        key_type,
        exportable: flag("exportable")?,
        allow_plaintext_backup: flag("allow_plaintext_backup")?,
        derived: flag("derived")?,
        convergent_encryption: flag("convergent_encryption")?,
        allow_wrap: flag("allow_wrap")?,
        allow_unwrap: flag("allow_unwrap")?,
        allow_rotation: flag("allow_rotation")?,
        auto_rotate_period: body
            .duration("auto_rotate_period")
            .map_err(bad)?
            .unwrap_or(0),
    })
}

// ----- key wrap and import (docs/TRANSIT.md) -----------------------------

/// Vault's `GET transit/wrapping_key`: the RSA-4096 public key for BYOK
/// import, created on first use.
async fn wrapping_key(call: &Call<'_>) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let pem = blocking(call.engine(), move |e| e.vault_wrapping_key(&by)).await?;
    call.ok(json!({ "public_key": pem }))
}

fn required_b64(body: &Body, k: &str) -> Result<Vec<u8>, ApiError> {
    body.b64(k)
        .map_err(bad)?
        .ok_or_else(|| bad(format!("missing {k}")))
}

/// What an import carries: exactly one of `ciphertext` (the key wrapped
/// for the wrapping key, with `hash_function`) and `public_key` (a PEM
/// SubjectPublicKeyInfo). Vault takes `ciphertext` when both are sent;
/// hsmgate refuses the ambiguity.
fn import_source(body: &Body) -> Result<ImportSource, ApiError> {
    let given = |k: &str| body.get(k).is_some_and(|v| !v.is_null());
    match (given("ciphertext"), given("public_key")) {
        (true, true) => Err(bad(
            "only one of ciphertext and public_key may be set: ciphertext imports the \
             private key (wrapped), public_key only the public key"
                .into(),
        )),
        (false, false) => Err(bad(
            "one of ciphertext (the wrapped private key) or public_key (a PEM public key) \
             is required"
                .into(),
        )),
        (true, false) => Ok(ImportSource::Wrapped {
            hash: OaepHash::parse(body.str("hash_function").map_err(bad)?)?,
            ciphertext: required_b64(body, "ciphertext")?,
        }),
        (false, true) => Ok(ImportSource::PublicKey(
            body.str("public_key")
                .map_err(bad)?
                .unwrap_or_default()
                .to_string(),
        )),
    }
}

/// Vault's `keys/:name/import`: `ciphertext` = base64(RSA-OAEP(ephemeral
/// AES-256 key) ‖ AES-KWP(ephemeral key, key)), or `public_key` for a
/// verification-only key.
async fn import_key(call: &Call<'_>, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let body = Body::parse(call)?;
    // Vault refuses the field itself, whatever its value.
    if body.0.contains_key("convergent_encryption") {
        return Err(bad(
            "import cannot be used on keys with convergent encryption enabled".into(),
        ));
    }
    let opts = key_options(&body)?;
    let source = import_source(&body)?;
    let name = name.to_string();
    let ring = blocking(call.engine(), move |e| match &source {
        ImportSource::Wrapped { ciphertext, hash } => {
            e.import_key(&by, &name, &opts, ciphertext, *hash)
        }
        ImportSource::PublicKey(pem) => e.import_public_key(&by, &name, &opts, pem),
    })
    .await?;
    call.ok(key_info(&ring)?)
}

/// Vault's `keys/:name/import_version`: a new version of an imported key,
/// or (`version`, or a matching latest version) the private key of a
/// public-key-only version.
async fn import_key_version(
    call: &Call<'_>,
    name: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let body = Body::parse(call)?;
    let source = import_source(&body)?;
    let version = body.u32("version").map_err(bad)?.filter(|v| *v != 0);
    let name = name.to_string();
    let ring = blocking(call.engine(), move |e| {
        e.import_key_version(&by, &name, &source, version)
    })
    .await?;
    call.ok(key_info(&ring)?)
}

fn mechanism(body: &Body) -> Result<Mechanism, ApiError> {
    Ok(Mechanism::parse(
        body.str("mechanism").map_err(bad)?.unwrap_or("aes-kwp"),
    )?)
}

fn required_str<'b>(body: &'b Body, k: &str) -> Result<&'b str, ApiError> {
    body.str(k)
        .map_err(bad)?
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad(format!("missing {k}")))
}

/// hsmgate's `keys/:name/wrap`: one version of an exportable key, wrapped
/// under `wrapping_key` (an `allow_wrap` key) with AES-KW or AES-KWP.
async fn wrap_key(call: &Call<'_>, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let body = Body::parse(call)?;
    let kek = required_str(&body, "wrapping_key")?.to_string();
    let mech = mechanism(&body)?;
    let version = body.u32("version").map_err(bad)?.filter(|v| *v != 0);
    let kek_version = body
        .u32("wrapping_key_version")
        .map_err(bad)?
        .filter(|v| *v != 0);
    let name = name.to_string();
    let w = blocking(call.engine(), move |e| {
        e.wrap_key(&by, &name, version, &kek, kek_version, mech)
    })
    .await?;
    call.ok(json!({
        "wrapped_key": STANDARD.encode(&w.wrapped),
        "mechanism": w.mechanism.as_str(),
        "type": w.key_type.as_str(),
        "version": w.version,
        "wrapping_key_version": w.wrapping_key_version,
    }))
}

/// hsmgate's `keys/:name/unwrap`: a new key ring `name` from `wrapped_key`,
/// unwrapped under `wrapping_key` (an `allow_unwrap` key).
async fn unwrap_key(call: &Call<'_>, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let body = Body::parse(call)?;
    let kek = required_str(&body, "wrapping_key")?.to_string();
    let mech = mechanism(&body)?;
    let kek_version = body
        .u32("wrapping_key_version")
        .map_err(bad)?
        .filter(|v| *v != 0);
    let wrapped = required_b64(&body, "wrapped_key")?;
    let opts = key_options(&body)?;
    let name = name.to_string();
    let ring = blocking(call.engine(), move |e| {
        e.unwrap_key(
            &by,
            &name,
            &opts,
            &Unwrap {
                wrapping_key: &kek,
                wrapping_key_version: kek_version,
                mechanism: mech,
                wrapped: &wrapped,
            },
        )
    })
    .await?;
    call.ok(key_info(&ring)?)
}

fn read_key(call: &Call<'_>, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let ring = call.engine().read_key(&by, name)?;
    call.ok(key_info(&ring)?)
}

async fn delete_key(call: &Call<'_>, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let name = name.to_string();
    blocking(call.engine(), move |e| e.delete_key(&by, &name)).await?;
    Ok(rescue::empty_response(StatusCode::NO_CONTENT))
}

async fn configure_key(call: &Call<'_>, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let body = Body::parse(call)?;
    let change = KeyConfigChange {
        min_decryption_version: body.u32("min_decryption_version").map_err(bad)?,
        min_encryption_version: body.u32("min_encryption_version").map_err(bad)?,
        deletion_allowed: body.bool("deletion_allowed").map_err(bad)?,
        exportable: body.bool("exportable").map_err(bad)?,
        allow_plaintext_backup: body.bool("allow_plaintext_backup").map_err(bad)?,
        auto_rotate_period: body.duration("auto_rotate_period").map_err(bad)?,
    };
    let name = name.to_string();
    let ring = blocking(call.engine(), move |e| e.configure_key(&by, &name, &change)).await?;
    call.ok(key_info(&ring)?)
}

async fn rotate_key(call: &Call<'_>, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let name = name.to_string();
    let ring = blocking(call.engine(), move |e| e.rotate_key(&by, &name)).await?;
    call.ok(key_info(&ring)?)
}

async fn trim_key(call: &Call<'_>, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let body = Body::parse(call)?;
    let min = body
        .u32("min_available_version")
        .map_err(bad)?
        .ok_or_else(|| bad("missing min_available_version".into()))?;
    let name = name.to_string();
    let ring = blocking(call.engine(), move |e| e.trim_key(&by, &name, min)).await?;
    call.ok(key_info(&ring)?)
}

// ----- batches ----------------------------------------------------------

/// Runs `one` over a single request or every `batch_input` item. As in Vault,
/// a batch with any failed item answers 400 (or `partial_failure_response_code`
/// when some items succeeded) with every item's result or error.
fn single_or_batch(
    call: &Call<'_>,
    body: &Body,
    one: impl Fn(&Body) -> Result<Value, String>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let Some(items) = body.batch().map_err(bad)? else {
        return call.ok(one(body).map_err(bad)?);
    };
    let mut failed = 0usize;
    let results: Vec<Value> = items
        .iter()
        .map(|item| {
            let result = Body::from_item(item).and_then(|b| {
                let mut r = one(&b)?;
                if let (Some(reference), Value::Object(m)) = (b.get("reference"), &mut r) {
                    m.insert("reference".into(), reference.clone());
                }
                Ok(r)
            });
            result.unwrap_or_else(|e| {
                failed += 1;
                let mut err = json!({ "error": e });
                if let Some(reference) = item.get("reference") {
                    err["reference"] = reference.clone();
                }
                err
            })
        })
        .collect();
    let status = if failed == 0 {
        StatusCode::OK
    } else if failed < items.len() {
        body.u32("partial_failure_response_code")
            .ok()
            .flatten()
            .and_then(|c| u16::try_from(c).ok())
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST)
    } else {
        StatusCode::BAD_REQUEST
    };
    Ok(call.respond(status, &json!({ "batch_results": results }), None))
}

/// Engine errors inside a batch item become that item's message (the key
/// and the caller were already checked once for the whole request).
/// Storage and internal failures keep their detail in the log, as in rescue.
fn item_error(e: EngineError) -> String {
    match e {
        EngineError::Storage(_) | EngineError::Internal(_) => {
            tracing::error!(error = %e, "batch item failed");
            "internal error; see the server log".into()
        }
        e => e.to_string(),
    }
}

// ----- operations -------------------------------------------------------

fn encrypt(call: &Call<'_>, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let body = Body::parse(call)?;
    check_key(call, &by, name)?;
    single_or_batch(call, &body, |b| {
        let plaintext = b.b64("plaintext")?.ok_or("missing plaintext to encrypt")?;
        let aad = b.b64("associated_data")?.unwrap_or_default();
        let context = b.b64("context")?;
        let version = b.u32("key_version")?;
        let (ciphertext, v) = call
            .engine()
            .encrypt(&by, name, &plaintext, &aad, context.as_deref(), version)
            .map_err(item_error)?;
        Ok(json!({ "ciphertext": ciphertext, "key_version": v }))
    })
}

fn decrypt(call: &Call<'_>, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let body = Body::parse(call)?;
    check_key(call, &by, name)?;
    single_or_batch(call, &body, |b| {
        let ciphertext = b
            .str("ciphertext")?
            .ok_or("missing ciphertext to decrypt")?;
        let aad = b.b64("associated_data")?.unwrap_or_default();
        let context = b.b64("context")?;
        let plaintext = call
            .engine()
            .decrypt(&by, name, ciphertext, &aad, context.as_deref())
            .map_err(item_error)?;
        Ok(json!({ "plaintext": STANDARD.encode(&*plaintext) }))
    })
}

fn rewrap(call: &Call<'_>, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let body = Body::parse(call)?;
    check_key(call, &by, name)?;
    single_or_batch(call, &body, |b| {
        let ciphertext = b.str("ciphertext")?.ok_or("missing ciphertext to rewrap")?;
        let aad = b.b64("associated_data")?.unwrap_or_default();
        let context = b.b64("context")?;
        let version = b.u32("key_version")?;
        let (ciphertext, v) = call
            .engine()
            .rewrap(&by, name, ciphertext, &aad, context.as_deref(), version)
            .map_err(item_error)?;
        Ok(json!({ "ciphertext": ciphertext, "key_version": v }))
    })
}

fn datakey(call: &Call<'_>, kind: &str, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let with_plaintext = match kind {
        "plaintext" => true,
        "wrapped" => false,
        other => {
            return Err(bad(format!(
                "invalid datakey type {other:?}: use plaintext or wrapped"
            )))
        }
    };
    let body = Body::parse(call)?;
    let bits = body.u32("bits").map_err(bad)?.unwrap_or(256);
    let aad = body
        .b64("associated_data")
        .map_err(bad)?
        .unwrap_or_default();
    let context = body.b64("context").map_err(bad)?;
    let version = body.u32("key_version").map_err(bad)?;
    let (key, ciphertext, v) =
        call.engine()
            .data_key(&by, name, bits, &aad, context.as_deref(), version)?;
    let mut data = json!({ "ciphertext": ciphertext, "key_version": v });
    if with_plaintext {
        data["plaintext"] = json!(STANDARD.encode(&*key));
    }
    call.ok(data)
}

fn hash(call: &Call<'_>, path_alg: Option<&str>) -> Result<Response<Full<Bytes>>, ApiError> {
    // Stateless, but still a crypto-user operation like random.
    let by = call.principal()?;
    let body = Body::parse(call)?;
    let alg = hash_param(&body, "algorithm", path_alg).map_err(bad)?;
    let input = body
        .b64("input")
        .map_err(bad)?
        .ok_or_else(|| bad("missing input to hash".into()))?;
    let sum = call.engine().hash(&by, alg, &input)?;
    let sum = match body.str("format").map_err(bad)?.unwrap_or("hex") {
        "hex" => hex::encode(sum),
        "base64" => STANDARD.encode(sum),
        other => {
            return Err(bad(format!(
                "unsupported encoding format {other:?}; use hex or base64"
            )))
        }
    };
    call.ok(json!({ "sum": sum }))
}

fn export(
    call: &Call<'_>,
    kind: &str,
    name: &str,
    version: Option<&str>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let kind = ExportKind::parse(kind).ok_or_else(|| {
        bad(format!(
            "invalid export type {kind:?}: use encryption-key, signing-key, hmac-key or public-key"
        ))
    })?;
    let version = match version {
        None | Some("") => None,
        Some("latest") => Some(call.engine().read_key(&by, name)?.latest_version),
        Some(v) => Some(
            v.parse::<u32>()
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| bad("version must be a positive integer or \"latest\"".into()))?,
        ),
    };
    let (key_type, keys) = call.engine().export_key(&by, name, kind, version)?;
    let mut map = Map::new();
    for (v, k) in &keys {
        map.insert(v.to_string(), Value::String(k.as_str().to_owned()));
    }
    call.ok(json!({ "name": name, "type": key_type.as_str(), "keys": map }))
}

/// Vault's `backup/:name` (see `engine::transit_backup`).
fn backup_key(call: &Call<'_>, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let backup = call.engine().backup_transit_key(&by, name)?;
    call.ok(json!({ "backup": backup.as_str() }))
}

/// Vault's `restore(/:name)`: `backup`, `force`. 204 as in Vault.
async fn restore_key(
    call: &Call<'_>,
    name: Option<&str>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let body = Body::parse(call)?;
    let backup = zeroize::Zeroizing::new(required_str(&body, "backup")?.to_string());
    let force = body.bool("force").map_err(bad)?.unwrap_or(false);
    let name = name.filter(|n| !n.is_empty()).map(str::to_string);
    blocking(call.engine(), move |e| {
        e.restore_transit_key(&by, &backup, name.as_deref(), force)
    })
    .await?;
    Ok(rescue::empty_response(StatusCode::NO_CONTENT))
}

/// Resolves the key once before a batch, so a missing key or a dead engine
/// is one clear error rather than N item errors.
fn check_key(call: &Call<'_>, by: &Principal, name: &str) -> Result<(), ApiError> {
    call.engine()
        .read_key(by, name)
        .map(|_| ())
        .map_err(ApiError::from)
}

fn hash_param(body: &Body, key: &str, path_alg: Option<&str>) -> Result<HashAlgorithm, String> {
    let name = match path_alg {
        Some(a) => Some(a),
        None => body.str(key)?,
    };
    HashAlgorithm::parse(name.unwrap_or("sha2-256")).map_err(|e| e.to_string())
}

/// Vault's signing knobs, read from the request (or one batch item, which
/// may override them). `hash_algorithm` in the path wins over the body.
struct SignParams {
    opts: SignOptions,
    jws: bool,
}

fn sign_params(body: &Body, item: &Body, path_alg: Option<&str>) -> Result<SignParams, String> {
    let pick = |k: &str| -> Result<Option<String>, String> {
        Ok(match item.str(k)? {
            Some(v) => Some(v.to_owned()),
            None => body.str(k)?.map(str::to_owned),
        })
    };
    let hash = match path_alg {
        Some(a) => a.to_owned(),
        None => pick("hash_algorithm")?.unwrap_or_else(|| "sha2-256".into()),
    };
    let hash = HashAlgorithm::parse(&hash).map_err(|e| e.to_string())?;
    let rsa_padding = match pick("signature_algorithm")? {
        None => RsaPadding::Pss,
        Some(a) => RsaPadding::parse(&a).map_err(|e| e.to_string())?,
    };
    // Signing always uses a salt of the hash length; verification accepts
    // that and the maximum (see docs/TRANSIT.md).
    match pick("salt_length")?.as_deref() {
        None | Some("auto") | Some("hash") => {}
        Some(other) => {
            return Err(format!(
                "unsupported salt_length {other:?}: hsmgate supports \"auto\" and \"hash\""
            ))
        }
    }
    let prehashed = match item.bool("prehashed")? {
        Some(p) => p,
        None => body.bool("prehashed")?.unwrap_or(false),
    };
    let jws = match pick("marshaling_algorithm")?.as_deref() {
        None | Some("asn1") => false,
        Some("jws") => true,
        Some(other) => {
            return Err(format!(
                "unsupported marshaling_algorithm {other:?}: use asn1 or jws"
            ))
        }
    };
    Ok(SignParams {
        opts: SignOptions {
            hash,
            prehashed,
            rsa_padding,
        },
        jws,
    })
}

fn sign(
    call: &Call<'_>,
    name: &str,
    path_alg: Option<&str>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let body = Body::parse(call)?;
    check_key(call, &by, name)?;
    // Options that are wrong for the whole request fail it as a whole.
    sign_params(&body, &Body(Map::new()), path_alg).map_err(bad)?;
    let version = body.u32("key_version").map_err(bad)?;
    single_or_batch(call, &body, |b| {
        let p = sign_params(&body, b, path_alg)?;
        let input = b.b64("input")?.ok_or("missing input to sign")?;
        let context = b.b64("context")?;
        let (signature, v) = call
            .engine()
            .sign(
                &by,
                name,
                &input,
                p.opts,
                context.as_deref(),
                version,
                p.jws,
            )
            .map_err(item_error)?;
        Ok(json!({ "signature": signature, "key_version": v }))
    })
}

fn verify(
    call: &Call<'_>,
    name: &str,
    path_alg: Option<&str>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let body = Body::parse(call)?;
    check_key(call, &by, name)?;
    sign_params(&body, &Body(Map::new()), path_alg).map_err(bad)?;
    single_or_batch(call, &body, |b| {
        let input = b.b64("input")?.ok_or("missing input to verify")?;
        let valid = match (b.str("signature")?, b.str("hmac")?) {
            (Some(sig), None) => {
                let p = sign_params(&body, b, path_alg)?;
                let context = b.b64("context")?;
                call.engine()
                    .verify(&by, name, &input, sig, p.opts, context.as_deref(), p.jws)
                    .map_err(item_error)?
            }
            (None, Some(mac)) => {
                let hash = hmac_hash(&body, b, path_alg)?;
                call.engine()
                    .verify_hmac(&by, name, &input, mac, hash)
                    .map_err(item_error)?
            }
            (Some(_), Some(_)) => return Err("provide either signature or hmac, not both".into()),
            (None, None) => return Err("missing signature or hmac to verify".into()),
        };
        Ok(json!({ "valid": valid }))
    })
}

/// HMAC verify reads `hash_algorithm` first, then the older `algorithm`,
/// as Vault does; a batch item may override the request.
fn hmac_hash(body: &Body, item: &Body, path_alg: Option<&str>) -> Result<HashAlgorithm, String> {
    if path_alg.is_some() {
        return hash_param(item, "hash_algorithm", path_alg);
    }
    for b in [item, body] {
        for k in ["hash_algorithm", "algorithm"] {
            if let Some(name) = b.str(k)? {
                return HashAlgorithm::parse(name).map_err(|e| e.to_string());
            }
        }
    }
    Ok(HashAlgorithm::Sha2_256)
}

fn hmac(
    call: &Call<'_>,
    name: &str,
    path_alg: Option<&str>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let body = Body::parse(call)?;
    check_key(call, &by, name)?;
    hmac_hash(&body, &Body(Map::new()), path_alg).map_err(bad)?;
    let version = body.u32("key_version").map_err(bad)?;
    single_or_batch(call, &body, |b| {
        let hash = hmac_hash(&body, b, path_alg)?;
        let input = b.b64("input")?.ok_or("missing input to HMAC")?;
        let (mac, v) = call
            .engine()
            .hmac(&by, name, &input, hash, version)
            .map_err(item_error)?;
        Ok(json!({ "hmac": mac, "key_version": v }))
    })
}

fn random(call: &Call<'_>, path_arg: Option<&str>) -> Result<Response<Full<Bytes>>, ApiError> {
    let by = call.principal()?;
    let body = Body::parse(call)?;
    // The path segment is a byte count (`random/32`) or, as in Vault, a format.
    let (path_bytes, path_format) = match path_arg {
        Some(a) if a.bytes().all(|b| b.is_ascii_digit()) && !a.is_empty() => (Some(a), None),
        Some(a) => (None, Some(a)),
        None => (None, None),
    };
    let n = match path_bytes {
        Some(s) => s
            .parse::<u32>()
            .map_err(|_| bad("bytes must be a positive integer".into()))?,
        None => body.u32("bytes").map_err(bad)?.unwrap_or(32),
    } as usize;
    if n == 0 || n > MAX_RANDOM_BYTES {
        return Err(bad(format!(
            "bytes must be between 1 and {MAX_RANDOM_BYTES}"
        )));
    }
    let format = match path_format {
        Some(f) => f,
        None => body.str("format").map_err(bad)?.unwrap_or("base64"),
    };
    let bytes = call.engine().random(&by, n)?;
    let encoded = match format {
        "base64" => STANDARD.encode(&*bytes),
        "hex" => hex::encode(&*bytes),
        other => {
            return Err(bad(format!(
                "unsupported encoding format {other:?}; use base64 or hex"
            )))
        }
    };
    call.ok(json!({ "random_bytes": encoded }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(v: Value) -> Result<u64, String> {
        duration_seconds("auto_rotate_period", &v)
    }

    #[test]
    fn durations_read_as_vault_reads_them() {
        for (input, want) in [
            (json!(0), 0),
            (json!(3600), 3600),
            (json!(""), 0),
            (json!("0"), 0),
            (json!("0s"), 0),
            (json!("3600"), 3600),
            (json!("1"), 1),
            (json!("1h"), 3600),
            (json!("+1h"), 3600),
            (json!("2h"), 7200),
            (json!("30m"), 1800),
            (json!("90m"), 5400),
            (json!("1h30m"), 5400),
            (json!("1.5h"), 5400),
            (json!(".5h"), 1800),
            (json!("3600.9s"), 3600),
            (json!("3600000ms"), 3600),
            (json!("1h0.5s"), 3600),
            (json!("30d"), 2_592_000),
            (json!("0d"), 0),
            (json!("2562047h"), 2_562_047 * 3600),
        ] {
            assert_eq!(secs(input.clone()), Ok(want), "{input}");
        }
    }

    #[test]
    fn bad_durations_are_refused_with_a_clear_message() {
        for input in [
            json!("garbage"),
            json!("h"),
            json!("."),
            json!(".h"),
            json!("1x"),
            json!("1hh"),
            json!("1 h"),
            json!(" 1h"),
            json!("1.5d"),
            json!("d"),
            json!("-"),
            json!(1.5),
            json!(3600.0),
            json!(true),
            json!([3600]),
            json!({"h": 1}),
            json!("99999999999999999999h"),
            json!("3000000h"),
            json!("200000d"),
        ] {
            let err = secs(input.clone()).unwrap_err();
            assert!(err.contains("auto_rotate_period"), "{input}: {err}");
        }
        for negative in [json!(-1), json!("-3600"), json!("-1h"), json!("-30d")] {
            let err = secs(negative.clone()).unwrap_err();
            assert!(err.contains("at least an hour"), "{negative}: {err}");
        }
    }
}
