-- wrk script: uniform random GETs over the mixed set /a/<size>/m<i>, i < OBJECTS (sizes 1-48 KiB,
-- the same formula as loadtool's mixed_size).
local n = tonumber(os.getenv("OBJECTS") or "20000")
local prefix = os.getenv("PREFIX") or "m"
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("seed", counter)
end
function init()
  math.randomseed(os.time() * 1000 + (seed or 0))
end
function request()
  local i = math.random(0, n - 1)
  return wrk.format("GET", "/a/" .. (1024 * (1 + (i * 7919) % 48)) .. "/" .. prefix .. i)
end
