-- wrk script: GETs over /<KIND>/<size>/<NAME_PREFIX><i> (KIND: a, the default, or js), i < OBJECTS,
-- sizes 1-48 KiB (loadtool's mixed_size); ACCEPT_ENCODING, when set, is sent with each. DIST=uniform (default) picks i uniformly; DIST=zipf draws P(k) ~ 1/k by
-- inverse-CDF sampling, k = floor(OBJECTS^u), i = k - 1.
local n = tonumber(os.getenv("OBJECTS") or "20000")
-- (NAME_PREFIX, not PREFIX: `perf record -- wrk` sets PREFIX=/usr in its child's environment.)
local prefix = os.getenv("NAME_PREFIX") or "m"
local zipf = os.getenv("DIST") == "zipf"
local kind = os.getenv("KIND") or "a"
local headers = {}
if os.getenv("ACCEPT_ENCODING") then
  headers["Accept-Encoding"] = os.getenv("ACCEPT_ENCODING")
end
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("seed", counter)
end
function init()
  math.randomseed(os.time() * 1000 + (seed or 0))
end
function request()
  local i
  if zipf then
    i = math.floor(n ^ math.random()) - 1
  else
    i = math.random(0, n - 1)
  end
  return wrk.format("GET", "/" .. kind .. "/" .. (1024 * (1 + (i * 7919) % 48)) .. "/" .. prefix .. i, headers)
end
