"""Every key type and the deeper Transit operations through unmodified hvac.

Run by tests/hvac.rs (hvac_engine_depth) with the same environment as
test_walkthrough.py: HSMGATE_ADDR, HSMGATE_CA, HSMGATE_TOKEN (a crypto user).
Covers rewrap, datakey, batch encrypt/decrypt, sign/verify for each
signing key type (RSA with both paddings, JWS marshaling), export of an
exportable key, and auto_rotate_period through hvac's own parameters. Calls go through hvac's own methods; a plain write is used
only where hvac refuses a type name client-side.
"""

import base64
import os
import sys

import hvac
from hvac import exceptions

ADDR = os.environ["HSMGATE_ADDR"]
CA = os.environ["HSMGATE_CA"]
TOKEN = os.environ["HSMGATE_TOKEN"]

checks = 0


def check(cond, what):
    global checks
    assert cond, what
    checks += 1


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def create(transit, client, name, key_type, **kwargs):
    try:
        transit.create_key(name=name, key_type=key_type, **kwargs)
    except exceptions.ParamValidationError:
        # hvac refuses some type names client-side; the server takes them.
        client.write_data(f"transit/keys/{name}", data={"type": key_type, **kwargs})
    check(transit.read_key(name=name)["data"]["type"] == key_type, f"create {key_type}")


ENCRYPTION_TYPES = ["aes128-gcm96", "aes256-gcm96", "chacha20-poly1305", "rsa-2048"]
SIGNING_TYPES = ["ed25519", "ecdsa-p256", "ecdsa-p384", "ecdsa-p521", "rsa-2048", "rsa-3072", "rsa-4096"]


def encryption_types(transit, client):
    for ty in ENCRYPTION_TYPES:
        name = f"enc-{ty}"
        create(transit, client, name, ty)
        items = [b"one", b"two \x00", b"three"]
        resp = transit.encrypt_data(name=name, batch_input=[{"plaintext": b64(p)} for p in items])
        cts = [r["ciphertext"] for r in resp["data"]["batch_results"]]
        check(all(c.startswith("vault:v1:") for c in cts), f"{ty} batch encrypt: {cts}")
        resp = transit.decrypt_data(name=name, batch_input=[{"ciphertext": c} for c in cts])
        check([unb64(r["plaintext"]) for r in resp["data"]["batch_results"]] == items, f"{ty} batch decrypt")

        transit.rotate_key(name=name)
        new = transit.rewrap_data(name=name, ciphertext=cts[0])["data"]["ciphertext"]
        check(new.startswith("vault:v2:"), f"{ty} rewrap to v2: {new}")
        pt = transit.decrypt_data(name=name, ciphertext=new)["data"]["plaintext"]
        check(unb64(pt) == items[0], f"{ty} rewrapped decrypts")

        for bits in (128, 256, 512):
            dk = transit.generate_data_key(name=name, key_type="plaintext", bits=bits)["data"]
            check(len(unb64(dk["plaintext"])) == bits // 8, f"{ty} datakey {bits}")
            back = transit.decrypt_data(name=name, ciphertext=dk["ciphertext"])["data"]["plaintext"]
            check(back == dk["plaintext"], f"{ty} datakey ciphertext decrypts")
        wrapped = transit.generate_data_key(name=name, key_type="wrapped")["data"]
        check("plaintext" not in wrapped or wrapped["plaintext"] is None, f"{ty} wrapped datakey: {wrapped}")
    print("ok batch encrypt/decrypt, rewrap, datakey for", ", ".join(ENCRYPTION_TYPES), flush=True)


def signing_types(transit, client):
    msg = b64(b"pay bob 5")
    bad = b64(b"pay bob 500")
    for ty in SIGNING_TYPES:
        name = f"sig-{ty}"
        create(transit, client, name, ty)
        variants = [{}]
        if ty.startswith("rsa"):
            variants = [{"signature_algorithm": "pss"}, {"signature_algorithm": "pkcs1v15"}]
        if ty.startswith("ecdsa"):
            variants = [{}, {"marshaling_algorithm": "jws"}]
        for extra in variants:
            for hash_algorithm in ("sha2-256", "sha2-512"):
                sig = transit.sign_data(name=name, hash_input=msg, hash_algorithm=hash_algorithm, **extra)
                sig = sig["data"]["signature"]
                check(sig.startswith("vault:v1:"), f"{ty} {extra} signature: {sig}")
                ok = transit.verify_signed_data(
                    name=name, hash_input=msg, signature=sig, hash_algorithm=hash_algorithm, **extra
                )["data"]["valid"]
                check(ok is True, f"{ty} {extra} {hash_algorithm} verifies")
                ok = transit.verify_signed_data(
                    name=name, hash_input=bad, signature=sig, hash_algorithm=hash_algorithm, **extra
                )["data"]["valid"]
                check(ok is False, f"{ty} {extra} tampered input is invalid")
    print("ok sign/verify for", ", ".join(SIGNING_TYPES), flush=True)


def export(transit, client):
    create(transit, client, "exp", "aes256-gcm96", exportable=True)
    keys = transit.export_key(name="exp", key_type="encryption-key")["data"]["keys"]
    check(len(unb64(keys["1"])) == 32, f"exported AES key: {keys}")
    one = transit.export_key(name="exp", key_type="encryption-key", version="latest")["data"]["keys"]
    check(one == keys, "export of the latest version")
    create(transit, client, "exp-ec", "ecdsa-p256", exportable=True)
    pem = transit.export_key(name="exp-ec", key_type="signing-key")["data"]["keys"]["1"]
    check(pem.startswith("-----BEGIN EC PRIVATE KEY-----"), f"exported ECDSA key: {pem[:40]}")
    create(transit, client, "sealed-in", "aes256-gcm96")
    try:
        transit.export_key(name="sealed-in", key_type="encryption-key")
    except exceptions.InvalidRequest:
        check(True, "a non-exportable key is refused")
    else:
        raise AssertionError("a non-exportable key was exported")
    print("ok export of exportable keys only", flush=True)


def auto_rotation(transit, client):
    # hvac's own parameters: create_key and update_key_configuration send
    # auto_rotate_period as given; read_key shows it in seconds.
    transit.create_key(name="auto", auto_rotate_period="1h")
    check(transit.read_key(name="auto")["data"]["auto_rotate_period"] == 3600, "create 1h")
    transit.update_key_configuration(name="auto", auto_rotate_period="2h")
    check(transit.read_key(name="auto")["data"]["auto_rotate_period"] == 7200, "config 2h")
    try:
        transit.update_key_configuration(name="auto", auto_rotate_period="30m")
    except exceptions.InvalidRequest:
        check(True, "30m is refused")
    else:
        raise AssertionError("an auto_rotate_period under an hour was accepted")
    check(transit.read_key(name="auto")["data"]["auto_rotate_period"] == 7200, "unchanged")
    transit.update_key_configuration(name="auto", auto_rotate_period="0")
    check(transit.read_key(name="auto")["data"]["auto_rotate_period"] == 0, "0 turns it off")
    print("ok auto_rotate_period", flush=True)


def main():
    client = hvac.Client(url=ADDR, token=TOKEN, verify=CA)
    transit = client.secrets.transit
    encryption_types(transit, client)
    signing_types(transit, client)
    export(transit, client)
    auto_rotation(transit, client)
    print(f"hvac engine-depth: {checks} checks passed against {ADDR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
