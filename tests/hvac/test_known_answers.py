"""Vault-format checks through unmodified hvac, each one decided by a local
computation with the `cryptography` package, so a wrong byte fails the run.

Run by tests/hvac.rs (hvac_known_answers) with the same environment as
test_walkthrough.py: HSMGATE_ADDR, HSMGATE_CA, HSMGATE_TOKEN (a crypto user).

What test_engine_depth.py already does (round trips through the server
only) is not repeated; here every answer is checked against an independent
result:
- BYOK import in Vault's documented flow (GET wrapping_key, RSA-OAEP-SHA256
  of an ephemeral AES-256 key + AES-KWP of the target key, POST
  keys/:name/import through hvac's adapter) of AES-128/256-GCM,
  ChaCha20-Poly1305, HMAC, Ed25519, ECDSA P-256/384/521 and RSA-2048 keys;
  engine ciphertexts opened locally (`vault:v1:` + base64(nonce || ct || tag),
  12-byte nonce), local ciphertexts opened by the engine, datakeys (plaintext
  and wrapped, 128/256/512 bits) opened locally, batch encrypt/decrypt with a
  per-item error, rewrap, HMACs equal to local HMACs, deterministic
  signatures (Ed25519, RSA PKCS#1 v1.5) byte-equal to local ones, local
  signatures accepted by the engine (ASN.1 and JWS), export equal to what
  was imported;
- generated keys of every asymmetric type: signatures with pss/pkcs1v15,
  asn1/jws, verified locally with the public key from read_key;
- backup_key/restore_key (Vault's backup/:name, restore/:name) of a known
  imported key, its ciphertexts opened locally after the restore;
- export of an exportable key checked by use (its HMAC key recomputes the
  engine's HMAC), refusal for a non-exportable one (every export type), and
  refusal of an import wrapped for another wrapping key;
- public_key import (ed25519, ECDSA, RSA key pairs made here): local
  signatures verify in the engine, signing is refused, RSA encrypts to the
  local key, import_version with the wrapped private key completes it.
"""

import base64
import hashlib
import hmac as hmac_mod
import os
import sys

import hvac
from hvac import exceptions
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric import padding as apad
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

ADDR = os.environ["HSMGATE_ADDR"]
CA = os.environ["HSMGATE_CA"]
TOKEN = os.environ["HSMGATE_TOKEN"]

checks = 0


def check(cond, what):
    global checks
    assert cond, what
    checks += 1


def ok(section):
    print(f"ok {section}", flush=True)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def body_of(value: str, version=1) -> str:
    prefix = f"vault:v{version}:"
    check(value.startswith(prefix), f"{prefix} prefix: {value}")
    return value[len(prefix):]


def unb64url(text: str) -> bytes:
    """JWS marshaling: URL-safe base64 without padding (RFC 7515 §2)."""
    check("=" not in text and "+" not in text and "/" not in text, f"base64url, no padding: {text}")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def raises(exc, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except exc as e:
        return e
    raise AssertionError(f"{fn.__name__}{args}{kwargs} did not raise {exc.__name__}")


HASHES = {"sha2-256": hashes.SHA256, "sha2-384": hashes.SHA384, "sha2-512": hashes.SHA512}
HASHLIB = {"sha2-256": hashlib.sha256, "sha2-384": hashlib.sha384, "sha2-512": hashlib.sha512}
AEADS = {"aes128-gcm96": (AESGCM, 16), "aes256-gcm96": (AESGCM, 32), "chacha20-poly1305": (ChaCha20Poly1305, 32)}


def create(transit, client, name, key_type, **kwargs):
    try:
        transit.create_key(name=name, key_type=key_type, **kwargs)
    except exceptions.ParamValidationError:
        client.write_data(f"transit/keys/{name}", data={"type": key_type, **kwargs})


# ----- BYOK: Vault's import flow ----------------------------------------------


def wrapping_key(client):
    pem = client.adapter.get("/v1/transit/wrapping_key")["data"]["public_key"]
    key = serialization.load_pem_public_key(pem.encode())
    check(isinstance(key, rsa.RSAPublicKey) and key.key_size == 4096, "the wrapping key is RSA-4096")
    return key


def byok_wrap(wrapping, target: bytes) -> str:
    """CKM_RSA_AES_KEY_WRAP as Vault documents it for keys/:name/import."""
    ephemeral = os.urandom(32)
    oaep = apad.OAEP(mgf=apad.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    return b64(wrapping.encrypt(ephemeral, oaep) + aes_key_wrap_with_padding(ephemeral, target))


def import_key(client, wrapping, name, key_type, material: bytes, **extra):
    resp = client.adapter.post(
        f"/v1/transit/keys/{name}/import",
        json={"ciphertext": byok_wrap(wrapping, material), "type": key_type, "hash_function": "SHA256", **extra},
    )
    if isinstance(resp, dict):
        check(resp["data"]["type"] == key_type, f"import {name}: {resp}")
    info = client.secrets.transit.read_key(name=name)["data"]
    check(info["type"] == key_type and info.get("imported_key") is True, f"imported {name}: {info}")


def pkcs8(private_key) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def open_locally(cls, key: bytes, ciphertext: str, aad=None) -> bytes:
    blob = unb64(body_of(ciphertext))
    check(len(blob) >= 12 + 16, f"nonce || ct || tag: {len(blob)} bytes")
    return cls(key).decrypt(blob[:12], blob[12:], aad)


def seal_locally(cls, key: bytes, plaintext: bytes, aad=None) -> str:
    nonce = os.urandom(12)
    return "vault:v1:" + b64(nonce + cls(key).encrypt(nonce, plaintext, aad))


def imported_aead(transit, client, wrapping):
    for ty, (cls, size) in AEADS.items():
        name = f"imp-{ty}"
        known = os.urandom(size)
        import_key(client, wrapping, name, ty, known, exportable=True, allow_rotation=True)
        secret = b"moved in from another HSM \x00\xff"

        ct = transit.encrypt_data(name=name, plaintext=b64(secret))["data"]["ciphertext"]
        check(len(unb64(body_of(ct))) == 12 + len(secret) + 16, f"{ty}: 12-byte nonce, ct, 16-byte tag")
        check(open_locally(cls, known, ct) == secret, f"{ty}: the engine's ciphertext opens locally")
        aad = b"tenant=42"
        ct = transit.encrypt_data(name=name, plaintext=b64(secret), associated_data=b64(aad))["data"]["ciphertext"]
        check(open_locally(cls, known, ct, aad) == secret, f"{ty}: with associated_data")

        mine = seal_locally(cls, known, secret)
        pt = transit.decrypt_data(name=name, ciphertext=mine)["data"]["plaintext"]
        check(unb64(pt) == secret, f"{ty}: a locally made ciphertext opens in the engine")

        for bits in (128, 256, 512):
            dk = transit.generate_data_key(name=name, key_type="plaintext", bits=bits)["data"]
            plain = unb64(dk["plaintext"])
            check(len(plain) == bits // 8, f"{ty} datakey/plaintext bits={bits}")
            check(open_locally(cls, known, dk["ciphertext"]) == plain, f"{ty} datakey {bits} opens locally")
            wrapped = transit.generate_data_key(name=name, key_type="wrapped", bits=bits)["data"]
            check(wrapped.get("plaintext") is None, f"{ty} datakey/wrapped has no plaintext: {wrapped}")
            check(len(open_locally(cls, known, wrapped["ciphertext"])) == bits // 8, f"{ty} wrapped {bits}")
        # hvac refuses other sizes itself; the server must too.
        raises(exceptions.ParamValidationError, transit.generate_data_key, name=name, key_type="plaintext", bits=100)
        raises(exceptions.InvalidRequest, client.write_data, f"transit/datakey/plaintext/{name}", data={"bits": 100})

        # Batch: every item opens locally; one tampered item fails alone.
        items = [b"first", b"", b"third"]
        res = transit.encrypt_data(name=name, batch_input=[{"plaintext": b64(p)} for p in items])
        cts = [r["ciphertext"] for r in res["data"]["batch_results"]]
        check([open_locally(cls, known, c) for c in cts] == items, f"{ty}: batch ciphertexts open locally")
        blob = bytearray(unb64(body_of(cts[1])))
        blob[-1] ^= 1
        bad = "vault:v1:" + b64(bytes(blob))
        e = raises(exceptions.InvalidRequest, transit.decrypt_data, name=name,
                   batch_input=[{"ciphertext": cts[0]}, {"ciphertext": bad}, {"ciphertext": mine}])
        results = e.json["data"]["batch_results"]
        check(unb64(results[0]["plaintext"]) == items[0], f"{ty}: item 0 of a partly failed batch: {results}")
        check(results[1].get("error") and "plaintext" not in results[1], f"{ty}: item 1 has its own error: {results}")
        check(unb64(results[2]["plaintext"]) == secret, f"{ty}: item 2 of a partly failed batch: {results}")
        e = raises(exceptions.InvalidRequest, transit.encrypt_data, name=name,
                   batch_input=[{"plaintext": b64(b"fine")}, {"plaintext": "not base64!"}])
        results = e.json["data"]["batch_results"]
        check(open_locally(cls, known, results[0]["ciphertext"]) == b"fine", f"{ty}: encrypt item 0: {results}")
        check(results[1].get("error"), f"{ty}: encrypt item 1 has its own error: {results}")

        # Rewrap of a locally made v1 ciphertext to v2 (allow_rotation).
        transit.rotate_key(name=name)
        new = transit.rewrap_data(name=name, ciphertext=mine)["data"]["ciphertext"]
        body_of(new, 2)
        check(unb64(transit.decrypt_data(name=name, ciphertext=new)["data"]["plaintext"]) == secret, f"{ty} rewrap")
        raises(Exception, open_locally, cls, known, new.replace("vault:v2:", "vault:v1:"))

        keys = transit.export_key(name=name, key_type="encryption-key", version=1)["data"]["keys"]
        check(unb64(keys["1"]) == known, f"{ty}: export of version 1 is the imported key")
    ok("BYOK import (" + ", ".join(AEADS) + "): local open/seal, datakeys, batch with a per-item error, rewrap, export")


def imported_hmac(transit, client, wrapping):
    known = os.urandom(32)
    import_key(client, wrapping, "imp-hmac", "hmac", known)
    msg = b"webhook body"
    for alg in ("sha2-256", "sha2-512"):
        want = hmac_mod.new(known, msg, HASHLIB[alg]).digest()
        got = transit.generate_hmac(name="imp-hmac", hash_input=b64(msg), algorithm=alg)["data"]["hmac"]
        check(unb64(body_of(got)) == want, f"hmac {alg} equals the local HMAC")
        mine = "vault:v1:" + b64(want)
        valid = transit.verify_signed_data(name="imp-hmac", hash_input=b64(msg), hmac=mine, hash_algorithm=alg)
        check(valid["data"]["valid"] is True, f"a local {alg} HMAC verifies")
        other = "vault:v1:" + b64(hmac_mod.new(known, msg + b"!", HASHLIB[alg]).digest())
        valid = transit.verify_signed_data(name="imp-hmac", hash_input=b64(msg), hmac=other, hash_algorithm=alg)
        check(valid["data"]["valid"] is False, f"an HMAC of other input is valid=false ({alg})")
    e = raises(exceptions.InvalidRequest, transit.export_key, name="imp-hmac", key_type="hmac-key")
    check(e.errors, "an imported key that is not exportable is not exported")
    ok("BYOK import of an HMAC key: HMACs equal local ones, local HMACs verify")


def verify_locally(public, key_type, sig: bytes, msg: bytes, alg="sha2-256", padding=None):
    """Raises InvalidSignature when the signature is not good."""
    if key_type == "ed25519":
        public.verify(sig, msg)
    elif key_type.startswith("ecdsa"):
        public.verify(sig, msg, ec.ECDSA(HASHES[alg]()))
    else:
        h = HASHES[alg]()
        pad = apad.PKCS1v15() if padding == "pkcs1v15" else apad.PSS(mgf=apad.MGF1(h), salt_length=apad.PSS.AUTO)
        public.verify(sig, msg, pad, h)


def sign_locally(private, key_type, msg: bytes, alg="sha2-256", padding=None) -> bytes:
    """A signature made outside the engine (PSS with a hash-length salt, as Vault's)."""
    if key_type == "ed25519":
        return private.sign(msg)
    if key_type.startswith("ecdsa"):
        return private.sign(msg, ec.ECDSA(HASHES[alg]()))
    h = HASHES[alg]()
    pad = apad.PKCS1v15() if padding == "pkcs1v15" else apad.PSS(mgf=apad.MGF1(h), salt_length=h.digest_size)
    return private.sign(msg, pad, h)


def jws_to_der(key_type, raw: bytes) -> bytes:
    """JWS ECDSA signatures are r || s, each the curve's scalar size."""
    if not key_type.startswith("ecdsa"):
        return raw
    n = {"ecdsa-p256": 32, "ecdsa-p384": 48, "ecdsa-p521": 66}[key_type]
    check(len(raw) == 2 * n, f"{key_type} JWS signature is r || s, {2 * n} bytes: {len(raw)}")
    return encode_dss_signature(int.from_bytes(raw[:n], "big"), int.from_bytes(raw[n:], "big"))


def der_to_jws(key_type, der: bytes) -> bytes:
    if not key_type.startswith("ecdsa"):
        return der
    n = {"ecdsa-p256": 32, "ecdsa-p384": 48, "ecdsa-p521": 66}[key_type]
    r, s = decode_dss_signature(der)
    return r.to_bytes(n, "big") + s.to_bytes(n, "big")


def engine_signature(transit, name, key_type, msg, alg, marshaling, padding=None):
    extra = {"marshaling_algorithm": marshaling}
    if padding:
        extra["signature_algorithm"] = padding
    sig = transit.sign_data(name=name, hash_input=b64(msg), hash_algorithm=alg, **extra)["data"]["signature"]
    body = body_of(sig)
    raw = unb64url(body) if marshaling == "jws" else unb64(body)
    return sig, (jws_to_der(key_type, raw) if marshaling == "jws" else raw)


def sign_cases(key_type):
    algs = {"ecdsa-p384": ["sha2-384"], "ecdsa-p521": ["sha2-512"]}.get(key_type, ["sha2-256", "sha2-512"])
    paddings = ["pss", "pkcs1v15"] if key_type.startswith("rsa") else [None]
    return [(a, p, m) for a in algs for p in paddings for m in ("asn1", "jws")]


SIGNING_TYPES = ["ed25519", "ecdsa-p256", "ecdsa-p384", "ecdsa-p521", "rsa-2048", "rsa-3072", "rsa-4096"]


def public_key_of(transit, name, key_type):
    text = transit.read_key(name=name)["data"]["keys"]["1"]["public_key"]
    if key_type == "ed25519":
        return ed25519.Ed25519PublicKey.from_public_bytes(unb64(text))
    return serialization.load_pem_public_key(text.encode())


def generated_signing(transit, client):
    msg = b"pay bob 5"
    for ty in SIGNING_TYPES:
        name = f"gen-{ty}"
        create(transit, client, name, ty)
        public = public_key_of(transit, name, ty)
        for alg, padding, marshaling in sign_cases(ty):
            _, sig = engine_signature(transit, name, ty, msg, alg, marshaling, padding)
            verify_locally(public, ty, sig, msg, alg, padding)
            check(True, f"{ty} {alg} {padding} {marshaling} verifies locally")
            try:
                verify_locally(public, ty, sig, msg + b"0", alg, padding)
            except InvalidSignature:
                check(True, f"{ty}: the local check can fail")
            else:
                raise AssertionError(f"{ty}: a signature verified for other input")
    ok("sign for " + ", ".join(SIGNING_TYPES) + " (pss/pkcs1v15, asn1/jws) verified locally")


def imported_signing(transit, client, wrapping):
    msg = b"signed where the key came from"
    keys = {
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
        "ecdsa-p256": ec.generate_private_key(ec.SECP256R1()),
        "ecdsa-p384": ec.generate_private_key(ec.SECP384R1()),
        "ecdsa-p521": ec.generate_private_key(ec.SECP521R1()),
        "rsa-2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }
    for ty, private in keys.items():
        name = f"imp-{ty}"
        import_key(client, wrapping, name, ty, pkcs8(private), exportable=True)
        public = private.public_key()
        for alg, padding, marshaling in sign_cases(ty):
            sig_text, sig = engine_signature(transit, name, ty, msg, alg, marshaling, padding)
            verify_locally(public, ty, sig, msg, alg, padding)
            # Deterministic schemes: byte-equal to the local signature.
            if ty == "ed25519":
                check(sig == private.sign(msg), f"ed25519 {marshaling}: byte-equal to the local signature")
            if padding == "pkcs1v15":
                local = private.sign(msg, apad.PKCS1v15(), HASHES[alg]())
                check(sig == local, f"{ty} pkcs1v15 {alg}: byte-equal to the local signature")
            # A local signature, marshaled the same way, verifies in the engine.
            local = sign_locally(private, ty, msg, alg, padding)
            if marshaling == "jws":
                text = "vault:v1:" + base64.urlsafe_b64encode(der_to_jws(ty, local)).decode().rstrip("=")
            else:
                text = "vault:v1:" + b64(local)
            extra = {"marshaling_algorithm": marshaling}
            if padding:
                extra["signature_algorithm"] = padding
            for good, m in ((True, msg), (False, msg + b"!")):
                valid = transit.verify_signed_data(name=name, hash_input=b64(m), signature=text, hash_algorithm=alg, **extra)
                check(valid["data"]["valid"] is good, f"{ty} {alg} {padding} {marshaling}: local signature valid={good}")
            # The engine's own signature text verifies in the engine too.
            valid = transit.verify_signed_data(name=name, hash_input=b64(msg), signature=sig_text, hash_algorithm=alg, **extra)
            check(valid["data"]["valid"] is True, f"{ty} {marshaling}: engine signature verifies")

        exported = transit.export_key(name=name, key_type="signing-key")["data"]["keys"]["1"]
        if ty == "ed25519":
            raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                        serialization.NoEncryption())
            pub = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            check(unb64(exported) == raw + pub, "ed25519 export is seed || public key (Go's form)")
        else:
            back = serialization.load_pem_private_key(exported.encode(), password=None)
            check(back.private_numbers() == private.private_numbers(), f"{ty}: export is the imported key")
    ok("BYOK import of " + ", ".join(keys) + ": engine signatures verify locally (deterministic ones byte-equal), "
       "local signatures verify in the engine (asn1 and jws), export equals the import")


def export_and_refusals(transit, client, wrapping):
    create(transit, client, "exp-hmac", "aes256-gcm96", exportable=True)
    hkey = unb64(transit.export_key(name="exp-hmac", key_type="hmac-key")["data"]["keys"]["1"])
    msg = b"compare me"
    got = transit.generate_hmac(name="exp-hmac", hash_input=b64(msg))["data"]["hmac"]
    check(unb64(body_of(got)) == hmac_mod.new(hkey, msg, hashlib.sha256).digest(),
          "the exported hmac-key recomputes the engine's HMAC")
    valid = transit.verify_signed_data(name="exp-hmac", hash_input=b64(msg), hmac=got)["data"]["valid"]
    check(valid is True, "verify of the engine's HMAC")

    create(transit, client, "kept-in", "ecdsa-p256")
    for kind in ("signing-key", "hmac-key", "encryption-key"):
        raises(exceptions.InvalidRequest, transit.export_key, name="kept-in", key_type=kind)
        check(True, f"non-exportable: export {kind} refused")

    # Wrapped for another wrapping key: refused, nothing created.
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=4096).public_key()
    e = raises(exceptions.InvalidRequest, client.adapter.post, "/v1/transit/keys/forged/import",
               json={"ciphertext": byok_wrap(stranger, os.urandom(32)), "type": "aes256-gcm96"})
    check(e.errors, f"an import for another wrapping key is refused: {e.text}")
    raises(exceptions.InvalidPath, transit.read_key, name="forged")
    check(True, "the refused import created no key")
    ok("export checked by use; non-exportable and foreign-wrapped imports refused")


def backup_and_restore(transit, client, wrapping):
    """Vault's backup/:name and restore/:name through hvac's own helpers;
    the restored key is the known one (its ciphertexts open locally)."""
    known = os.urandom(32)
    import_key(client, wrapping, "imp-backup", "aes256-gcm96", known, exportable=True, allow_plaintext_backup=True)
    mine = seal_locally(AESGCM, known, b"kept across restore")
    backup = transit.backup_key(name="imp-backup")["data"]["backup"]
    resp = transit.restore_key(backup=backup, name="restored")
    check(getattr(resp, "status_code", None) == 204, f"restore answers 204: {resp}")
    pt = transit.decrypt_data(name="restored", ciphertext=mine)["data"]["plaintext"]
    check(unb64(pt) == b"kept across restore", "the restored key opens a locally made ciphertext")
    ct = transit.encrypt_data(name="restored", plaintext=b64(b"again"))["data"]["ciphertext"]
    check(open_locally(AESGCM, known, ct) == b"again", "the restored key is the imported key")
    raises(exceptions.InvalidRequest, transit.restore_key, backup=backup, name="restored")
    check(True, "restore over an existing key without force is refused")
    create(transit, client, "no-backup", "aes256-gcm96", exportable=True)
    raises(exceptions.InvalidRequest, transit.backup_key, name="no-backup")
    check(True, "backup of a key without allow_plaintext_backup is refused")
    ok("backup_key/restore_key: the restored key is the known key; refusals")

def imported_public_keys(transit, client, wrapping):
    """Vault's public_key import: a key pair made here, only its public key
    imported; the engine verifies local signatures, RSA encrypts to the
    local private key, signing is refused; import_version with the wrapped
    private key completes version 1, which then signs."""
    msg = b"signed by the key holder"
    keys = {
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
        "ecdsa-p384": ec.generate_private_key(ec.SECP384R1()),
        "rsa-2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }
    for ty, private in keys.items():
        name = f"pubimp-{ty}"
        pem = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        client.adapter.post(f"/v1/transit/keys/{name}/import", json={"type": ty, "public_key": pem})
        shown = public_key_of(transit, name, ty)
        check(
            shown.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            == private.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo),
            f"{ty}: keys/:name shows the imported public key",
        )
        alg = "sha2-384" if ty == "ecdsa-p384" else "sha2-256"
        local = sign_locally(private, ty, msg, alg)
        for good, m in ((True, msg), (False, msg + b"!")):
            valid = transit.verify_signed_data(name=name, hash_input=b64(m), signature="vault:v1:" + b64(local),
                                               hash_algorithm=alg)
            check(valid["data"]["valid"] is good, f"{ty}: a local signature verifies: {good}")
        e = raises(exceptions.InvalidRequest, transit.sign_data, name=name, hash_input=b64(msg), hash_algorithm=alg)
        check("only a public key" in str(e), f"{ty}: signing is refused, saying why: {e}")
        if ty.startswith("rsa"):
            ct = transit.encrypt_data(name=name, plaintext=b64(b"for the holder"))["data"]["ciphertext"]
            oaep = apad.OAEP(mgf=apad.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
            check(private.decrypt(unb64(body_of(ct)), oaep) == b"for the holder", "RSA encrypts to the holder")
            raises(exceptions.InvalidRequest, transit.decrypt_data, name=name, ciphertext=ct)
        client.adapter.post(
            f"/v1/transit/keys/{name}/import_version",
            json={"ciphertext": byok_wrap(wrapping, pkcs8(private)), "hash_function": "SHA256"},
        )
        check(transit.read_key(name=name)["data"]["latest_version"] == 1, f"{ty}: version 1 completed")
        _, sig = engine_signature(transit, name, ty, msg, alg, "asn1")
        verify_locally(private.public_key(), ty, sig, msg, alg)
    ok("public_key import of " + ", ".join(keys) + ": local signatures verify, signing refused, RSA encrypts; "
       "import_version with the private key completes the version")


def main():
    client = hvac.Client(url=ADDR, token=TOKEN, verify=CA)
    transit = client.secrets.transit
    wrapping = wrapping_key(client)
    imported_aead(transit, client, wrapping)
    imported_hmac(transit, client, wrapping)
    generated_signing(transit, client)
    imported_signing(transit, client, wrapping)
    imported_public_keys(transit, client, wrapping)
    export_and_refusals(transit, client, wrapping)
    backup_and_restore(transit, client, wrapping)
    print(f"hvac known answers: {checks} checks passed against {ADDR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
