"""hsmgate's Transit API through the unmodified hvac client.

Run by tests/hvac.rs against a freshly initialized server, with:
  HSMGATE_ADDR   https://127.0.0.1:PORT
  HSMGATE_CA     the server's certificate (PEM), the only trust anchor
  HSMGATE_TOKEN  a crypto-user session token

Nothing here patches or subclasses hvac: what passes here works for any
application that points stock hvac at hsmgate. Calls go through hvac's own
methods wherever hvac has one; a plain write is used only where hvac refuses
the request client-side (it will not create a key of type "hmac").

Each section prints one "ok" line; the last line is a summary. Any failed
assert exits non-zero with a traceback naming the check.
"""

import base64
import importlib.metadata
import os
import sys

import hvac
from hvac import exceptions

ADDR = os.environ["HSMGATE_ADDR"]
CA = os.environ["HSMGATE_CA"]
TOKEN = os.environ["HSMGATE_TOKEN"]

checks = 0


def check(cond, what):
    """A plain assert that also counts, so the summary says how much ran."""
    global checks
    assert cond, what
    checks += 1


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def raises(exc, fn, *args, **kwargs):
    """hvac maps the status to the exception class (400 InvalidRequest, 403
    Forbidden, 404 InvalidPath) and reads messages from Vault's
    {"errors": [...]} body: both must come through."""
    try:
        fn(*args, **kwargs)
    except exc as e:
        if e.__class__ is not exceptions.ParamValidationError:  # that one is hvac's own
            check(isinstance(e.errors, list), f"an errors list in {e!r}: {e.text}")
            # Vault's 404 for a missing object is {"errors": []}; others say why.
            if exc is not exceptions.InvalidPath:
                check(e.errors and all(isinstance(m, str) for m in e.errors), f"an error message: {e.text}")
        return e
    raise AssertionError(f"{fn.__name__}{args}{kwargs} did not raise {exc.__name__}")


def ok(section):
    print(f"ok {section}", flush=True)


def auth(client):
    check(client.is_authenticated(), "is_authenticated() with the crypto-user token")
    stranger = hvac.Client(url=ADDR, token="hvs.not-a-real-token", verify=CA)
    check(not stranger.is_authenticated(), "is_authenticated() with a bogus token")
    # An empty token: hvac answers False without asking the server. (None
    # would make hvac pick up VAULT_TOKEN or ~/.vault-token.)
    check(not hvac.Client(url=ADDR, token="", verify=CA).is_authenticated(), "no token")
    raises(exceptions.Forbidden, stranger.secrets.transit.list_keys)
    health = client.sys.read_health_status(method="GET")
    check(health["initialized"] and not health["sealed"], f"sys/health: {health}")
    check(client.sys.read_health_status(method="HEAD").status_code == 200, "HEAD sys/health")
    ok("auth: is_authenticated, bogus token is 403, sys/health GET and HEAD")


def create_keys(transit, client):
    for name, key_type in [
        ("aes", "aes256-gcm96"),
        ("ed", "ed25519"),
        ("ec", "ecdsa-p256"),
    ]:
        resp = transit.create_key(name=name, key_type=key_type)
        # Vault answers 204 or 200 with the key; hvac hands back a dict for a 200.
        if isinstance(resp, dict):
            check(resp["data"]["type"] == key_type, f"create {name}: {resp}")
        else:
            check(resp.status_code == 204, f"create {name}: {resp.status_code}")
    # No key_type at all: Vault's default is aes256-gcm96.
    transit.create_key(name="dflt")
    check(transit.read_key(name="dflt")["data"]["type"] == "aes256-gcm96", "default type")

    # hvac's create_key refuses "hmac" client-side, so a plain write it is.
    e = raises(exceptions.ParamValidationError, transit.create_key, name="hm", key_type="hmac")
    check("hmac" in str(e), "hvac refuses key_type=hmac itself")
    client.write_data("transit/keys/hm", data={"type": "hmac"})
    check(transit.read_key(name="hm")["data"]["type"] == "hmac", "hmac key via write_data")
    ok("create_key: aes256-gcm96, ed25519, ecdsa-p256, default, hmac (write_data)")


def read_and_list(transit, client):
    aes = transit.read_key(name="aes")["data"]
    check(aes["name"] == "aes" and aes["type"] == "aes256-gcm96", f"read aes: {aes}")
    check(aes["latest_version"] == 1 and list(aes["keys"]) == ["1"], f"versions: {aes}")
    check(aes["supports_encryption"] and not aes["supports_signing"], f"supports_*: {aes}")

    ed = transit.read_key(name="ed")["data"]
    check(ed["supports_signing"] and not ed["supports_encryption"], f"ed supports_*: {ed}")
    pub = unb64(ed["keys"]["1"]["public_key"])
    check(len(pub) == 32, f"ed25519 public key is 32 bytes, got {len(pub)}")
    ec = transit.read_key(name="ec")["data"]
    check("BEGIN PUBLIC KEY" in ec["keys"]["1"]["public_key"], f"ecdsa public key PEM: {ec}")

    raises(exceptions.InvalidPath, transit.read_key, name="no-such-key")

    want = {"aes", "ed", "ec", "dflt", "hm"}
    # hvac sends a real LIST request...
    names = set(transit.list_keys()["data"]["keys"])
    check(names == want, f"LIST transit/keys: {names}")
    # ...or GET ?list=true with strict_http (client.list() is in vault_parity).
    strict = hvac.Client(url=ADDR, token=TOKEN, verify=CA, strict_http=True)
    check(set(strict.secrets.transit.list_keys()["data"]["keys"]) == want, "strict_http list")
    ok("read_key, list_keys (LIST, and GET ?list=true with strict_http)")


def encrypt_decrypt(transit):
    secret = b"attack at dawn \x00\xff binary too"
    ct = transit.encrypt_data(name="aes", plaintext=b64(secret))["data"]["ciphertext"]
    check(ct.startswith("vault:v1:"), f"ciphertext prefix: {ct}")
    pt = transit.decrypt_data(name="aes", ciphertext=ct)["data"]["plaintext"]
    check(unb64(pt) == secret, "decrypt round trip")
    again = transit.encrypt_data(name="aes", plaintext=b64(secret))["data"]["ciphertext"]
    check(again != ct, "a fresh nonce per encryption")

    # AEAD associated data: bound to the ciphertext, not stored in it.
    aad = b64(b"tenant=42")
    ct = transit.encrypt_data(name="aes", plaintext=b64(secret), associated_data=aad)["data"]["ciphertext"]
    pt = transit.decrypt_data(name="aes", ciphertext=ct, associated_data=aad)["data"]["plaintext"]
    check(unb64(pt) == secret, "round trip with associated_data")
    raises(exceptions.InvalidRequest, transit.decrypt_data, name="aes", ciphertext=ct, associated_data=b64(b"tenant=43"))
    raises(exceptions.InvalidRequest, transit.decrypt_data, name="aes", ciphertext=ct)

    # Tampered ciphertext and a signing key used for encryption are 400s.
    body = bytearray(unb64(ct.split(":", 2)[2]))
    body[-1] ^= 1
    raises(exceptions.InvalidRequest, transit.decrypt_data, name="aes", ciphertext="vault:v1:" + b64(bytes(body)))
    raises(exceptions.InvalidRequest, transit.encrypt_data, name="ed", plaintext=b64(secret))
    ok("encrypt_data/decrypt_data, associated_data, tamper and wrong-AAD rejected")


def batches(transit):
    items = [b"first", b"", b"third \x00"]
    # hvac sends "plaintext": null beside batch_input.
    resp = transit.encrypt_data(
        name="aes",
        batch_input=[{"plaintext": b64(p), "reference": f"r{i}"} for i, p in enumerate(items)],
    )
    results = resp["data"]["batch_results"]
    check(len(results) == len(items), f"batch encrypt results: {results}")
    check(all(r["ciphertext"].startswith("vault:v1:") for r in results), f"batch cts: {results}")
    check([r.get("reference") for r in results] == ["r0", "r1", "r2"], f"references: {results}")

    resp = transit.decrypt_data(name="aes", batch_input=[{"ciphertext": r["ciphertext"]} for r in results])
    plains = [unb64(r["plaintext"]) for r in resp["data"]["batch_results"]]
    check(plains == items, f"batch decrypt: {plains}")
    ok("batch encrypt/decrypt via batch_input, order and references kept")


def sign_verify(transit):
    msg = b64(b"pay alice 10 coins")
    tampered = b64(b"pay alice 1000 coins")

    sig = transit.sign_data(name="ed", hash_input=msg)["data"]["signature"]
    check(sig.startswith("vault:v1:") and len(unb64(sig.split(":", 2)[2])) == 64, f"ed25519 sig: {sig}")
    check(transit.verify_signed_data(name="ed", hash_input=msg, signature=sig)["data"]["valid"] is True, "ed25519 verify")
    check(transit.verify_signed_data(name="ed", hash_input=tampered, signature=sig)["data"]["valid"] is False, "ed25519 tampered")

    sig = transit.sign_data(name="ec", hash_input=msg, hash_algorithm="sha2-256")["data"]["signature"]
    check(sig.startswith("vault:v1:"), f"ecdsa sig: {sig}")
    valid = transit.verify_signed_data(name="ec", hash_input=msg, signature=sig, hash_algorithm="sha2-256")
    check(valid["data"]["valid"] is True, "ecdsa-p256 verify")
    valid = transit.verify_signed_data(name="ec", hash_input=tampered, signature=sig, hash_algorithm="sha2-256")
    check(valid["data"]["valid"] is False, "ecdsa-p256 tampered")
    # A signature from another key: well-formed, and still valid=false.
    other = transit.sign_data(name="ed", hash_input=msg)["data"]["signature"]
    valid = transit.verify_signed_data(name="ec", hash_input=msg, signature=other, hash_algorithm="sha2-256")
    check(valid["data"]["valid"] is False, "ecdsa-p256 verify of an ed25519 signature")
    ok("sign_data/verify_signed_data: ed25519, ecdsa-p256 sha2-256, tampered input is valid=false")


def hmacs(transit):
    msg = b64(b"webhook body")
    tampered = b64(b"webhook body!")
    for key in ["aes", "hm"]:
        mac = transit.generate_hmac(name=key, hash_input=msg)["data"]["hmac"]
        check(mac.startswith("vault:v1:") and len(unb64(mac.split(":", 2)[2])) == 32, f"{key} hmac: {mac}")
        # hvac 2.4's verify_signed_data takes hmac= directly.
        check(transit.verify_signed_data(name=key, hash_input=msg, hmac=mac)["data"]["valid"] is True, f"{key} verify hmac")
        check(transit.verify_signed_data(name=key, hash_input=tampered, hmac=mac)["data"]["valid"] is False, f"{key} tampered hmac")

    ok("generate_hmac with the aes and hmac keys, verify_signed_data(hmac=), tampered is valid=false")


def rotation(transit):
    secret = b"written before the rotation"
    old = transit.encrypt_data(name="aes", plaintext=b64(secret))["data"]["ciphertext"]
    resp = transit.rotate_key(name="aes")
    if not isinstance(resp, dict):
        check(resp.status_code in (200, 204), f"rotate: {resp.status_code}")
    key = transit.read_key(name="aes")["data"]
    check(key["latest_version"] == 2 and sorted(key["keys"]) == ["1", "2"], f"after rotate: {key}")

    new = transit.encrypt_data(name="aes", plaintext=b64(secret))["data"]["ciphertext"]
    check(new.startswith("vault:v2:"), f"new ciphertext uses v2: {new}")
    for ct in (old, new):
        pt = transit.decrypt_data(name="aes", ciphertext=ct)["data"]["plaintext"]
        check(unb64(pt) == secret, f"decrypt {ct[:9]} after rotation")
    ok("rotate_key: v1 ciphertext still decrypts, new ciphertext is vault:v2:")


def random_bytes(transit):
    r = transit.generate_random_bytes(n_bytes=32)["data"]["random_bytes"]
    check(len(unb64(r)) == 32, f"32 random bytes: {r}")
    check(transit.generate_random_bytes(n_bytes=32)["data"]["random_bytes"] != r, "two draws differ")
    h = transit.generate_random_bytes(n_bytes=16, output_format="hex")["data"]["random_bytes"]
    check(len(h) == 32 and int(h, 16) >= 0, f"hex random: {h}")
    ok("generate_random_bytes: base64 and hex")


def vault_parity(transit, client):
    """Calls whose exact wire shape differs from the common path. Each runs
    on its own, so one report names every gap; any gap fails the run."""
    gaps = []

    def expect(cond, what):
        if cond:
            check(True, what)
        else:
            gaps.append(what)
            print(f"GAP {what}", flush=True)

    # client.list() sends GET ?list=True (a Python bool in the query). Vault
    # reads the flag with Go's strconv.ParseBool, which takes True/TRUE/t/1.
    listed = client.list("transit/keys")
    expect(
        isinstance(listed, dict) and "aes" in listed.get("data", {}).get("keys", []),
        f"client.list('transit/keys') -> GET /v1/transit/keys?list=True should list the keys, hvac got {listed!r}",
    )

    # generate_hmac sends "algorithm"; verify_signed_data sends
    # "hash_algorithm" also for hmac=, and Vault's HMAC verify reads
    # hash_algorithm first, then the deprecated "algorithm".
    msg = b64(b"webhook body")
    mac = transit.generate_hmac(name="hm", hash_input=msg, algorithm="sha2-512")["data"]["hmac"]
    expect(len(unb64(mac.split(":", 2)[2])) == 64, f"generate_hmac(algorithm='sha2-512') gives 64 bytes: {mac}")
    valid = transit.verify_signed_data(name="hm", hash_input=msg, hmac=mac, hash_algorithm="sha2-512")["data"]["valid"]
    expect(
        valid is True,
        f"verify_signed_data(hmac=<sha2-512 hmac>, hash_algorithm='sha2-512') should be valid, got valid={valid}",
    )

    if gaps:
        raise AssertionError(f"{len(gaps)} Vault-compatibility gap(s):\n  " + "\n  ".join(gaps))
    ok("vault parity: client.list() GET ?list=True, HMAC verify with hash_algorithm")


def main():
    version = importlib.metadata.version("hvac")
    check(version.startswith("2.4."), f"this walk-through targets hvac 2.4.x, found {version}")
    client = hvac.Client(url=ADDR, token=TOKEN, verify=CA)
    transit = client.secrets.transit

    auth(client)
    create_keys(transit, client)
    read_and_list(transit, client)
    encrypt_decrypt(transit)
    batches(transit)
    sign_verify(transit)
    hmacs(transit)
    rotation(transit)
    random_bytes(transit)
    vault_parity(transit, client)
    print(f"hvac {version} walk-through: {checks} checks passed against {ADDR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
