-- wrk script: GETs over /a/<size>/<PREFIX><i>, i < OBJECTS, sizes 1-48 KiB (loadtool's
-- mixed_size). DIST=uniform (default) picks i uniformly; DIST=zipf draws P(k) ~ 1/k by
-- inverse-CDF sampling, k = floor(OBJECTS^u), i = k - 1.
local n = tonumber(os.getenv("OBJECTS") or "20000")
local prefix = os.getenv("PREFIX") or "m"
local zipf = os.getenv("DIST") == "zipf"
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
  return wrk.format("GET", "/a/" .. (1024 * (1 + (i * 7919) % 48)) .. "/" .. prefix .. i)
end
