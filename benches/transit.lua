-- wrk script: one Vault-Transit operation through hsmgate (or any Transit
-- server), the same request body every time.
--
--   VAULT_TOKEN=... wrk -t1 -c64 -d10s --latency -s benches/transit.lua https://127.0.0.1:8200
--   OP=sign TRANSIT_KEY=bench-p256 VAULT_TOKEN=... wrk ... -s benches/transit.lua ...
--
-- Environment:
--   VAULT_TOKEN       the client token (a crypto user's), or
--   VAULT_TOKEN_FILE  a file holding it (first line); VAULT_TOKEN wins
--   OP                encrypt (default) | decrypt | hmac | sign | batch-encrypt
--   TRANSIT_KEY       key name (default "bench")
--   PLAINTEXT_BYTES   plaintext / input size before base64 (default 1024)
--   CIPHERTEXT        for OP=decrypt: a "vault:v1:..." ciphertext of that key
--   BATCH             for OP=batch-encrypt: items per request (default 100),
--                     each a PLAINTEXT_BYTES plaintext
--   TOKEN_HEADER      header carrying the token (default X-Vault-Token)
--
-- The plaintext is random, drawn once per wrk thread; every request sends the
-- same body. That is fair for AES-GCM (each encryption draws a fresh nonce),
-- for HMAC and signatures (no caching anywhere in the path).

local function read_token()
  local t = os.getenv("VAULT_TOKEN")
  if t and t ~= "" then return t end
  local path = os.getenv("VAULT_TOKEN_FILE")
  if path and path ~= "" then
    local f = assert(io.open(path, "r"), "cannot open VAULT_TOKEN_FILE " .. path)
    t = f:read("*l")
    f:close()
    if t and t ~= "" then return t end
  end
  error("set VAULT_TOKEN or VAULT_TOKEN_FILE")
end

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

local function base64(bytes)
  local out = {}
  for i = 1, #bytes, 3 do
    local a, b, c = bytes:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local c1 = math.floor(n / 262144) % 64
    local c2 = math.floor(n / 4096) % 64
    local c3 = math.floor(n / 64) % 64
    local c4 = n % 64
    out[#out + 1] = B64:sub(c1 + 1, c1 + 1) .. B64:sub(c2 + 1, c2 + 1)
      .. (b and B64:sub(c3 + 1, c3 + 1) or "=")
      .. (c and B64:sub(c4 + 1, c4 + 1) or "=")
  end
  return table.concat(out)
end

local function random_bytes(n)
  local t = {}
  for i = 1, n do t[i] = string.char(math.random(0, 255)) end
  return table.concat(t)
end

-- os.time() alone would give every thread the same seed within a second.
math.randomseed(os.time() + math.floor((os.clock() * 1e6) % 1e6))

local op = os.getenv("OP") or "encrypt"
local key = os.getenv("TRANSIT_KEY") or "bench"
local size = tonumber(os.getenv("PLAINTEXT_BYTES") or "1024")

local path, body
if op == "encrypt" then
  path = "/v1/transit/encrypt/" .. key
  body = '{"plaintext":"' .. base64(random_bytes(size)) .. '"}'
elseif op == "decrypt" then
  local ct = os.getenv("CIPHERTEXT")
  assert(ct and ct:sub(1, 6) == "vault:", "OP=decrypt needs CIPHERTEXT=vault:v1:...")
  path = "/v1/transit/decrypt/" .. key
  body = '{"ciphertext":"' .. ct .. '"}'
elseif op == "hmac" then
  path = "/v1/transit/hmac/" .. key
  body = '{"input":"' .. base64(random_bytes(size)) .. '"}'
elseif op == "sign" then
  path = "/v1/transit/sign/" .. key
  body = '{"input":"' .. base64(random_bytes(size)) .. '"}'
elseif op == "batch-encrypt" then
  local n = tonumber(os.getenv("BATCH") or "100")
  local items = {}
  for i = 1, n do items[i] = '{"plaintext":"' .. base64(random_bytes(size)) .. '"}' end
  path = "/v1/transit/encrypt/" .. key
  body = '{"batch_input":[' .. table.concat(items, ",") .. ']}'
else
  error("unknown OP " .. op .. " (encrypt, decrypt, hmac, sign, batch-encrypt)")
end

wrk.method = "POST"
wrk.path = path
wrk.headers[os.getenv("TOKEN_HEADER") or "X-Vault-Token"] = read_token()
wrk.headers["Content-Type"] = "application/json"
wrk.body = body
