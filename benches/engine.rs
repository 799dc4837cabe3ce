//! Per key type and operation, single-threaded ops/s of
//!   (a) the raw aws-lc-rs call,
//!   (b) the same operation through hsmgate's in-process engine API
//!       (`hsmgate::engine::Engine` on a temp data dir: principal check, key
//!       ring lookup, version selection, Vault `vault:vN:` formatting), and
//!   (c) SoftHSM2 through PKCS#11 (`cryptoki`) for ECDSA P-256 sign,
//!       RSA-2048 PSS sign and AES-256-GCM 1 KiB encrypt, when the module
//!       exists and a token is ready (benches/engine.sh sets that up).
//!
//! Measured in one run and interleaved: every round runs each variant of an
//! operation for `BENCH_MS` milliseconds, alternating which goes first, and
//! the table reports the median round. Read the ratios, not the absolute
//! numbers, on a shared machine.
//!
//!   cargo bench --bench engine            (SoftHSM2 rows "skipped" without a token)
//!   benches/engine.sh                     (installs softhsm2, inits a token, runs this)
//!
//! Knobs: BENCH_ROUNDS (default 5), BENCH_MS (default 300),
//! SOFTHSM2_MODULE (default /usr/lib/softhsm/libsofthsm2.so),
//! SOFTHSM2_TOKEN_LABEL (default hsmgate-bench), SOFTHSM2_PIN (default 1234).
use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::rsa::{
    KeySize, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey,
    OAEP_SHA256_MGF1SHA256,
};
use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, RsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING,
    ECDSA_P384_SHA384_ASN1_SIGNING, RSA_PSS_SHA256,
};
use hsmgate::config::EngineConfig;
use hsmgate::engine::crypto::{HashAlgorithm, KeyType, RsaPadding, SignOptions};
use hsmgate::engine::keyring::{format_vault, KeyOptions};
use hsmgate::engine::secret::SecretString;
use hsmgate::engine::{Engine, Principal, Role};

const KIB: usize = 1024;
/// Message signed by the signature rows (the engine hashes it, as raw does).
const MSG: &[u8] = b"hsmgate engine benchmark: a short message to sign, 64 bytes long";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `f` repeatedly for about `for_`; returns operations per second.
fn measure(for_: Duration, f: &mut dyn FnMut()) -> f64 {
    // Short warm-up so the first variant does not pay for cold caches.
    for _ in 0..3 {
        f();
    }
    let start = Instant::now();
    let mut n: u64 = 0;
    let mut batch: u64 = 1;
    loop {
        for _ in 0..batch {
            f();
        }
        n += batch;
        let el = start.elapsed();
        if el >= for_ {
            return n as f64 / el.as_secs_f64();
        }
        // Grow batches so the clock is read rarely for fast ops.
        if batch < 1024 {
            batch *= 2;
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One operation with its variants (raw, engine, maybe SoftHSM2).
struct Row<'a> {
    name: &'static str,
    goal: f64,
    raw: Box<dyn FnMut() + 'a>,
    /// The raw call plus the Vault `vault:v1:<base64>` encoding the engine's
    /// API returns: separates the format's cost from the engine's own.
    raw_encoded: Option<Box<dyn FnMut() + 'a>>,
    engine: Box<dyn FnMut() + 'a>,
    softhsm: Option<Box<dyn FnMut() + 'a>>,
}

/// Medians of one row: ops/s, and (ops/s, ratio) pairs where measured.
struct Measured {
    name: &'static str,
    raw: f64,
    encoded: Option<(f64, f64)>,
    engine: f64,
    ratio: f64,
    goal: f64,
    softhsm: Option<(f64, f64)>,
}

fn main() {
    // `cargo bench` passes `--bench`; nothing here takes arguments.
    let rounds = env_u64("BENCH_ROUNDS", 5).max(1) as usize;
    let per = Duration::from_millis(env_u64("BENCH_MS", 300).max(10));

    let rng = SystemRandom::new();
    let mut plaintext = vec![0u8; KIB];
    rng.fill(&mut plaintext).unwrap();

    // ---- the engine ------------------------------------------------------
    let dir = tempfile::tempdir().expect("temp dir");
    let engine = Engine::open(dir.path(), EngineConfig::default()).expect("open engine");
    let token = std::fs::read_to_string(dir.path().join("init-token")).expect("init token");
    engine
        .init(
            &SecretString::new("benchmark crypto officer password".into()),
            &SecretString::new(token),
        )
        .expect("init engine");
    let now = SystemTime::now();
    let cu = Principal {
        username: "bench".into(),
        role: Role::CryptoUser,
        issued_at: now,
        expires_at: now + Duration::from_secs(24 * 3600),
        app_policies: Vec::new(),
    };
    for (name, kt) in [
        ("aes", KeyType::Aes256Gcm96),
        ("chacha", KeyType::Chacha20Poly1305),
        ("mac", KeyType::Hmac),
        ("ed", KeyType::Ed25519),
        ("p256", KeyType::EcdsaP256),
        ("p384", KeyType::EcdsaP384),
        ("rsa", KeyType::Rsa2048),
    ] {
        engine
            .create_key(&cu, name, &KeyOptions::new(kt))
            .expect("create key");
    }
    let pss = SignOptions {
        hash: HashAlgorithm::Sha2_256,
        prehashed: false,
        rsa_padding: RsaPadding::Pss,
    };
    let ec256 = SignOptions::from(HashAlgorithm::Sha2_256);
    let ec384 = SignOptions::from(HashAlgorithm::Sha2_384);
    let (rsa_ct, _) = engine
        .encrypt(&cu, "rsa", &plaintext[..32], b"", None, None)
        .expect("engine rsa encrypt");

    // ---- raw aws-lc-rs keys --------------------------------------------
    let mut aes_key = [0u8; 32];
    rng.fill(&mut aes_key).unwrap();
    let aes = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &aes_key).unwrap());
    let chacha = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &aes_key).unwrap());
    let mac = hmac::Key::new(hmac::HMAC_SHA256, &aes_key);
    let ed = Ed25519KeyPair::generate().unwrap();
    let p256 = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
    let p384 = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_ASN1_SIGNING).unwrap();
    let rsa = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
    let rsa_dec = PrivateDecryptingKey::generate(KeySize::Rsa2048).unwrap();
    let rsa_enc = OaepPublicEncryptingKey::new(rsa_dec.public_key()).unwrap();
    let rsa_dec = OaepPrivateDecryptingKey::new(rsa_dec).unwrap();
    let mut raw_rsa_ct = vec![0u8; rsa_enc.ciphertext_size()];
    rsa_enc
        .encrypt(
            &OAEP_SHA256_MGF1SHA256,
            &plaintext[..32],
            &mut raw_rsa_ct,
            None,
        )
        .unwrap();

    // Raw AEAD seal as a careful caller would do it: a prepared key, a
    // fresh random nonce, the plaintext copied into an output buffer.
    let raw_seal = |key: &LessSafeKey| {
        let mut nonce = [0u8; 12];
        rng.fill(&mut nonce).unwrap();
        let mut out = Vec::with_capacity(12 + KIB + 16);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&plaintext);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
                &mut out[12..],
            )
            .unwrap();
        out.extend_from_slice(tag.as_ref());
        out
    };

    let softhsm = softhsm::Bench::open();
    let softhsm_status = match &softhsm {
        Ok(_) => "measured".to_string(),
        Err(why) => format!("skipped ({why})"),
    };

    let e = &engine;
    let cu = &cu;
    let pt = &plaintext;
    let mut rows: Vec<Row> = vec![
        Row {
            name: "AES-256-GCM encrypt 1 KiB",
            goal: 0.70,
            raw: Box::new(|| {
                black_box(raw_seal(&aes));
            }),
            raw_encoded: Some(Box::new(|| {
                black_box(format_vault(1, &raw_seal(&aes)));
            })),
            engine: Box::new(move || {
                black_box(e.encrypt(cu, "aes", pt, b"", None, None).unwrap());
            }),
            softhsm: softhsm
                .as_ref()
                .ok()
                .map(|s| Box::new(move || s.aes_gcm_encrypt(pt)) as Box<dyn FnMut()>),
        },
        Row {
            name: "ChaCha20-Poly1305 encrypt 1 KiB",
            goal: 0.70,
            raw: Box::new(|| {
                black_box(raw_seal(&chacha));
            }),
            raw_encoded: Some(Box::new(|| {
                black_box(format_vault(1, &raw_seal(&chacha)));
            })),
            engine: Box::new(move || {
                black_box(e.encrypt(cu, "chacha", pt, b"", None, None).unwrap());
            }),
            softhsm: None,
        },
        Row {
            name: "HMAC-SHA256 1 KiB",
            goal: 0.70,
            raw: Box::new(|| {
                black_box(hmac::sign(&mac, pt));
            }),
            raw_encoded: Some(Box::new(|| {
                black_box(format_vault(1, hmac::sign(&mac, pt).as_ref()));
            })),
            engine: Box::new(move || {
                black_box(
                    e.hmac(cu, "mac", pt, HashAlgorithm::Sha2_256, None)
                        .unwrap(),
                );
            }),
            softhsm: None,
        },
        Row {
            name: "Ed25519 sign",
            goal: 0.70,
            raw: Box::new(|| {
                black_box(ed.sign(MSG));
            }),
            raw_encoded: None,
            engine: Box::new(move || {
                black_box(e.sign(cu, "ed", MSG, ec256, None, None, false).unwrap());
            }),
            softhsm: None,
        },
        Row {
            name: "ECDSA P-256 sign (SHA-256)",
            goal: 0.70,
            raw: Box::new(|| {
                black_box(p256.sign(&rng, MSG).unwrap());
            }),
            raw_encoded: None,
            engine: Box::new(move || {
                black_box(e.sign(cu, "p256", MSG, ec256, None, None, false).unwrap());
            }),
            softhsm: softhsm
                .as_ref()
                .ok()
                .map(|s| Box::new(move || s.p256_sign(MSG)) as Box<dyn FnMut()>),
        },
        Row {
            name: "ECDSA P-384 sign (SHA-384)",
            goal: 0.70,
            raw: Box::new(|| {
                black_box(p384.sign(&rng, MSG).unwrap());
            }),
            raw_encoded: None,
            engine: Box::new(move || {
                black_box(e.sign(cu, "p384", MSG, ec384, None, None, false).unwrap());
            }),
            softhsm: None,
        },
        Row {
            name: "RSA-2048 PSS sign (SHA-256)",
            goal: 0.90,
            raw: Box::new(|| {
                let mut sig = vec![0u8; rsa.public_modulus_len()];
                rsa.sign(&RSA_PSS_SHA256, &rng, MSG, &mut sig).unwrap();
                black_box(sig);
            }),
            raw_encoded: None,
            engine: Box::new(move || {
                black_box(e.sign(cu, "rsa", MSG, pss, None, None, false).unwrap());
            }),
            softhsm: softhsm
                .as_ref()
                .ok()
                .map(|s| Box::new(move || s.rsa_pss_sign(MSG)) as Box<dyn FnMut()>),
        },
        Row {
            name: "RSA-2048 OAEP-SHA256 decrypt",
            goal: 0.90,
            raw: Box::new(|| {
                let mut out = vec![0u8; rsa_dec.min_output_size()];
                let n = rsa_dec
                    .decrypt(&OAEP_SHA256_MGF1SHA256, &raw_rsa_ct, &mut out, None)
                    .unwrap()
                    .len();
                black_box(n);
            }),
            raw_encoded: None,
            engine: Box::new(|| {
                black_box(e.decrypt(cu, "rsa", &rsa_ct, b"", None).unwrap());
            }),
            softhsm: None,
        },
    ];

    println!(
        "engine bench: {rounds} rounds x {} ms per variant, single thread; SoftHSM2: {softhsm_status}",
        per.as_millis()
    );
    let mut results = Vec::new();
    for row in rows.iter_mut() {
        let (mut raw, mut enc, mut eng, mut hsm) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds {
            // Alternate the order so drift hits every variant alike.
            if r % 2 == 0 {
                raw.push(measure(per, &mut row.raw));
                if let Some(f) = row.raw_encoded.as_mut() {
                    enc.push(measure(per, f));
                }
                eng.push(measure(per, &mut row.engine));
                if let Some(f) = row.softhsm.as_mut() {
                    hsm.push(measure(per, f));
                }
            } else {
                if let Some(f) = row.softhsm.as_mut() {
                    hsm.push(measure(per, f));
                }
                eng.push(measure(per, &mut row.engine));
                if let Some(f) = row.raw_encoded.as_mut() {
                    enc.push(measure(per, f));
                }
                raw.push(measure(per, &mut row.raw));
            }
        }
        // Ratio per round (same moment on the machine), then the median.
        let mut ratios: Vec<f64> = raw.iter().zip(&eng).map(|(r, e)| e / r).collect();
        let mut vs_enc: Vec<f64> = enc.iter().zip(&eng).map(|(r, e)| e / r).collect();
        let mut vs_hsm: Vec<f64> = eng.iter().zip(&hsm).map(|(e, h)| e / h).collect();
        let res = Measured {
            name: row.name,
            raw: median(&mut raw),
            encoded: (!enc.is_empty()).then(|| (median(&mut enc), median(&mut vs_enc))),
            engine: median(&mut eng),
            ratio: median(&mut ratios),
            goal: row.goal,
            softhsm: (!hsm.is_empty()).then(|| (median(&mut hsm), median(&mut vs_hsm))),
        };
        eprintln!("  done: {}", row.name);
        results.push(res);
    }

    println!();
    println!("| op | raw aws-lc-rs ops/s | raw + vault:v1 encoding ops/s | engine ops/s | engine/raw | goal | met | engine/(raw + encoding) | SoftHSM2 ops/s | engine/SoftHSM2 |");
    println!("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|");
    for m in results {
        let (e, ve) = match m.encoded {
            Some((e, ve)) => (format!("{e:.0}"), format!("{:.0}%", ve * 100.0)),
            None => ("–".into(), "–".into()),
        };
        let (h, vh) = match m.softhsm {
            Some((h, vh)) => (format!("{h:.0}"), format!("{vh:.1}×")),
            None => ("–".into(), "–".into()),
        };
        println!(
            "| {} | {:.0} | {e} | {:.0} | {:.0}% | ≥ {:.0}% | {} | {ve} | {h} | {vh} |",
            m.name,
            m.raw,
            m.engine,
            m.ratio * 100.0,
            m.goal * 100.0,
            if m.ratio >= m.goal { "yes" } else { "**no**" },
        );
    }
    drop(rows);

    // The encoder behind the `vault:vN:` strings, side by side in this run:
    // the scalar `base64` crate the engine used before, and `base64-simd`,
    // which `format_vault` uses now (an AES-GCM 1 KiB ciphertext is 1,052
    // bytes with nonce and tag).
    let sealed = vec![0x5au8; 1052];
    let (mut scalar, mut simd) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        scalar.push(measure(per, &mut || {
            use base64::Engine as _;
            black_box(base64::engine::general_purpose::STANDARD.encode(&sealed));
        }));
        simd.push(measure(per, &mut || {
            black_box(base64_simd::STANDARD.encode_to_string(&sealed));
        }));
    }
    let (scalar, simd) = (median(&mut scalar), median(&mut simd));
    println!();
    println!(
        "base64 of 1,052 bytes: scalar `base64` {scalar:.0} ops/s, `base64-simd` {simd:.0} ops/s ({:.1}×)",
        simd / scalar
    );
}

/// SoftHSM2 over PKCS#11: one logged-in session, session (non-token) keys.
mod softhsm {
    use std::hint::black_box;
    use std::path::Path;

    use aws_lc_rs::digest;
    use aws_lc_rs::rand::{SecureRandom, SystemRandom};
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::aead::GcmParams;
    use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
    use cryptoki::mechanism::{Mechanism, MechanismType};
    use cryptoki::object::{Attribute, ObjectHandle};
    use cryptoki::session::{Session, UserType};
    use cryptoki::types::AuthPin;

    /// DER OID of prime256v1 (secp256r1), CKA_EC_PARAMS.
    const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

    pub struct Bench {
        session: Session,
        aes: ObjectHandle,
        p256: ObjectHandle,
        rsa: ObjectHandle,
        rng: SystemRandom,
        // Dropped last: the session must close before the library finalizes.
        _ctx: Pkcs11,
    }

    impl Bench {
        pub fn open() -> Result<Bench, String> {
            let module = std::env::var("SOFTHSM2_MODULE")
                .unwrap_or_else(|_| "/usr/lib/softhsm/libsofthsm2.so".into());
            if !Path::new(&module).exists() {
                return Err(format!("no PKCS#11 module at {module}"));
            }
            let label =
                std::env::var("SOFTHSM2_TOKEN_LABEL").unwrap_or_else(|_| "hsmgate-bench".into());
            let pin = std::env::var("SOFTHSM2_PIN").unwrap_or_else(|_| "1234".into());
            let ctx = Pkcs11::new(&module).map_err(|e| format!("loading {module}: {e}"))?;
            ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
                .map_err(|e| format!("C_Initialize: {e}"))?;
            let slot = ctx
                .get_slots_with_token()
                .map_err(|e| format!("listing slots: {e}"))?
                .into_iter()
                .find(|s| {
                    ctx.get_token_info(*s)
                        .is_ok_and(|t| t.label().trim_end() == label)
                })
                .ok_or_else(|| {
                    format!("no token labelled {label:?}; run benches/engine.sh to create one")
                })?;
            let session = ctx
                .open_rw_session(slot)
                .map_err(|e| format!("C_OpenSession: {e}"))?;
            session
                .login(UserType::User, Some(&AuthPin::new(pin.into())))
                .map_err(|e| format!("C_Login: {e}"))?;
            let err = |what: &str| {
                let what = what.to_string();
                move |e: cryptoki::error::Error| format!("{what}: {e}")
            };
            let aes = session
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Token(false),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Encrypt(true),
                        Attribute::Decrypt(true),
                        Attribute::ValueLen(32.into()),
                    ],
                )
                .map_err(err("AES key generation"))?;
            let (_, p256) = session
                .generate_key_pair(
                    &Mechanism::EccKeyPairGen,
                    &[
                        Attribute::Token(false),
                        Attribute::Verify(true),
                        Attribute::EcParams(P256_OID.to_vec()),
                    ],
                    &[
                        Attribute::Token(false),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Sign(true),
                    ],
                )
                .map_err(err("P-256 key generation"))?;
            let (_, rsa) = session
                .generate_key_pair(
                    &Mechanism::RsaPkcsKeyPairGen,
                    &[
                        Attribute::Token(false),
                        Attribute::Verify(true),
                        Attribute::ModulusBits(2048.into()),
                        Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                    ],
                    &[
                        Attribute::Token(false),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Sign(true),
                    ],
                )
                .map_err(err("RSA-2048 key generation"))?;
            let bench = Bench {
                session,
                aes,
                p256,
                rsa,
                rng: SystemRandom::new(),
                _ctx: ctx,
            };
            // One of each up front so a missing mechanism says so clearly.
            bench.try_aes(&[0u8; 16]).map_err(err("AES-GCM encrypt"))?;
            bench.try_p256(b"probe").map_err(err("ECDSA sign"))?;
            bench.try_rsa(b"probe").map_err(err("RSA-PSS sign"))?;
            Ok(bench)
        }

        fn try_aes(&self, plaintext: &[u8]) -> cryptoki::error::Result<Vec<u8>> {
            let mut iv = [0u8; 12];
            self.rng.fill(&mut iv).expect("random IV");
            let params = GcmParams::new(&mut iv, &[], 128.into())?;
            self.session
                .encrypt(&Mechanism::AesGcm(params), self.aes, plaintext)
        }

        /// CKM_ECDSA over a SHA-256 digest computed here (as the engine and
        /// raw rows hash the message themselves).
        fn try_p256(&self, msg: &[u8]) -> cryptoki::error::Result<Vec<u8>> {
            let d = digest::digest(&digest::SHA256, msg);
            self.session.sign(&Mechanism::Ecdsa, self.p256, d.as_ref())
        }

        fn try_rsa(&self, msg: &[u8]) -> cryptoki::error::Result<Vec<u8>> {
            let params = PkcsPssParams {
                hash_alg: MechanismType::SHA256,
                mgf: PkcsMgfType::MGF1_SHA256,
                s_len: 32.into(),
            };
            self.session
                .sign(&Mechanism::Sha256RsaPkcsPss(params), self.rsa, msg)
        }

        pub fn aes_gcm_encrypt(&self, plaintext: &[u8]) {
            black_box(self.try_aes(plaintext).expect("SoftHSM2 AES-GCM encrypt"));
        }
        pub fn p256_sign(&self, msg: &[u8]) {
            black_box(self.try_p256(msg).expect("SoftHSM2 ECDSA sign"));
        }
        pub fn rsa_pss_sign(&self, msg: &[u8]) {
            black_box(self.try_rsa(msg).expect("SoftHSM2 RSA-PSS sign"));
        }
    }
}
