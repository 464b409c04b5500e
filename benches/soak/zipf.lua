-- wrk script: a Zipf-like mix over N objects (s ~ 1), plus 5% dynamic requests.
local N = tonumber(os.getenv("SOAK_OBJECTS") or "20000")
math.randomseed(os.time())
request = function()
  if math.random() < 0.05 then
    return wrk.format("GET", "/api/" .. math.random(1, 1000))
  end
  -- Inverse-CDF sampling of a 1/k distribution: k = floor(N^u).
  local k = math.floor(N ^ math.random())
  return wrk.format("GET", "/obj/" .. k)
end
