-- wrk script: Vault-Transit encrypt of a 1 KiB plaintext through hsmgate.
--
--   VAULT_TOKEN=... wrk -t1 -c64 -d10s --latency -s benches/transit.lua https://127.0.0.1:8200
--
-- Environment:
--   VAULT_TOKEN       the client token (a crypto user's), or
--   VAULT_TOKEN_FILE  a file holding it (first line); VAULT_TOKEN wins
--   TRANSIT_KEY       key name (default "bench")
--   PLAINTEXT_BYTES   plaintext size before base64 (default 1024)
--
-- The plaintext is random, drawn once per wrk thread; every request sends the
-- same body. That is fair for AES-GCM: each encryption draws a fresh nonce.

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

local key = os.getenv("TRANSIT_KEY") or "bench"
local size = tonumber(os.getenv("PLAINTEXT_BYTES") or "1024")

wrk.method = "POST"
wrk.path = "/v1/transit/encrypt/" .. key
wrk.headers["X-Vault-Token"] = read_token()
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"plaintext":"' .. base64(random_bytes(size)) .. '"}'
