-- wrk script: Zipf-like (P(k) ~ 1/k) GETs over /a/<size>/z<k>, k < OBJECTS: inverse-CDF sampling,
-- k = floor(OBJECTS^u). Sizes follow loadtool's mixed_size (1-48 KiB).
local n = tonumber(os.getenv("OBJECTS") or "30000")
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("seed", counter)
end
function init()
  math.randomseed(os.time() * 1000 + (seed or 0))
end
function request()
  local i = math.floor(n ^ math.random()) - 1
  return wrk.format("GET", "/a/" .. (1024 * (1 + (i * 7919) % 48)) .. "/z" .. i)
end
