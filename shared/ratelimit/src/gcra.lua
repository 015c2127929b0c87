-- GCRA (generic cell rate algorithm) over every bucket of one call: the call takes one unit
-- from all of them or, when any of them is empty, from none.
--
-- KEYS[i]   a bucket; its value is the theoretical arrival time (TAT) in microseconds.
-- ARGV[2i-1] the bucket's emission interval: microseconds between calls at the sustained rate.
-- ARGV[2i]   the bucket's tolerance: interval x burst, how far the TAT may run ahead of now.
--
-- Returns {1, 0, 0} when allowed, {0, retry_after_ms, i} when refused, where i is the bucket
-- that makes the call wait longest.

-- Redis's clock, not the callers': every replica of every service sees the same time.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

local new_tats = {}
local wait, worst = 0, 0
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local tolerance = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then
    tat = now
  end
  local new_tat = tat + interval
  local allow_at = new_tat - tolerance
  if allow_at > now and allow_at - now > wait then
    wait = allow_at - now
    worst = i
  end
  new_tats[i] = new_tat
end

if worst > 0 then
  return {0, math.ceil(wait / 1000), worst}
end

for i, key in ipairs(KEYS) do
  -- The key expires when its TAT is reached: from then on a missing key means the same as
  -- the stored one, so idle subjects cost no memory. '%.0f' keeps all 16 digits (a bare
  -- number would be formatted with 14).
  local ttl = math.ceil((new_tats[i] - now) / 1000)
  redis.call('SET', key, string.format('%.0f', new_tats[i]), 'PX', ttl)
end
return {1, 0, 0}
